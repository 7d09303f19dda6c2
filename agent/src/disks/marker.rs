//! Ownership: what the agent prepared (`<stateDir>/disks/owned.json`) and the marker on the disk
//! that proves it (our filesystem label and a UUID we generated; for RAID0 members, the md
//! array UUID in their md superblock).
//!
//! The state file alone never makes a disk ours: `classify` reads the device and only a disk
//! whose on-disk marker equals the recorded one is `Ours`. A recorded disk that reads blank was
//! lost (EC2 stop/start wipes instance store); a recorded disk with any other signature is
//! someone else's and stays untouched. This module reads devices; it never writes one.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Disk, FsType, PrepareMode};

/// Bytes read from the start of a device: covers the ext superblock (at 1024), the xfs one
/// (at 0) and the md 1.2 superblock (at 4096).
const PROBE_BYTES: usize = 8192;
const EXT_MAGIC: u16 = 0xEF53;
const XFS_MAGIC: &[u8; 4] = b"XFSB";
const MD_MAGIC: u32 = 0xa92b_4efc;
/// The RAID0 array's md name (`mdadm --name`) and its `/dev/md/` link.
pub const MD_NAME: &str = "nodekeeper";

#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    /// owned.json could not be read, parsed or written.
    #[error("disks state {}: {error}", path.display())]
    State { path: PathBuf, error: String },
}

/// One disk (or the RAID0 array) the agent prepared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnedDisk {
    /// Kernel name when prepared (informational: names move across reboots; the key is by-id).
    pub name: String,
    pub by_id: Option<String>,
    pub serial: String,
    pub size_bytes: u64,
    pub mode: PrepareMode,
    /// Filesystem and raid0 modes: the marker written by mkfs.
    pub fs_type: Option<FsType>,
    pub label: Option<String>,
    pub uuid: Option<String>,
    /// Host path of the mount (filesystem, raid0).
    pub mount_path: Option<PathBuf>,
    /// raid0: the md array UUID (32 hex digits, as in the members' superblocks) and members' keys.
    pub md_uuid: Option<String>,
    #[serde(default)]
    pub members: Vec<String>,
    /// Set once mkfs (or mdadm + mkfs) completed: only a prepared disk that reads blank is lost;
    /// one recorded but never finished is simply prepared again.
    #[serde(default)]
    pub prepared: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    /// Key (`disk_key`) -> what we prepared on it. The RAID0 array's key is `md:nodekeeper`.
    pub disks: BTreeMap<String, OwnedDisk>,
}

/// `<stateDir>/disks/owned.json`, replaced atomically on every change.
#[derive(Debug)]
pub struct OwnedStore {
    path: PathBuf,
    pub owned: Owned,
}

impl OwnedStore {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("disks/owned.json")
    }

    pub fn load(state_dir: &Path) -> Result<Self, MarkerError> {
        let path = Self::path(state_dir);
        let err = |e: String| MarkerError::State {
            path: path.clone(),
            error: e,
        };
        // Missing: nothing prepared yet. Anything else that is not a whole, well-formed record
        // (empty, truncated, garbage, a symlink, a FIFO) is an error: the caller refuses to
        // act, and the file is left as it is for an operator (never replaced by an empty one).
        let owned = match crate::state_file::read_to_string_no_symlink(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Owned::default(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(Self { path, owned })
    }

    /// Atomic replace (temp file, fsync, rename) so a crash never leaves half a file.
    pub fn persist(&self) -> Result<(), MarkerError> {
        let err = |e: std::io::Error| MarkerError::State {
            path: self.path.clone(),
            error: e.to_string(),
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = crate::state_file::create_fresh(&tmp).map_err(err)?;
        f.write_all(
            serde_json::to_string_pretty(&self.owned)
                .expect("serializes")
                .as_bytes(),
        )
        .map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)
    }
}

/// The stable key of a disk: its by-id name when it has one, else its kernel name.
pub fn disk_key(disk: &Disk) -> String {
    disk.by_id
        .as_deref()
        .map(|b| b.rsplit('/').next().unwrap_or(b).to_string())
        .unwrap_or_else(|| disk.name.clone())
}

/// `nk-` + 8 hex digits of FNV-1a over the key: fits xfs's 12-character label limit.
pub fn label_for(key: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    format!("nk-{h:08x}")
}

/// A random version-4 UUID from the kernel's generator (no extra crate for 16 bytes).
pub fn new_uuid() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(format_uuid(&b))
}

fn format_uuid(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// What the first bytes of a device say about ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDisk {
    /// An ext2/3/4 or xfs filesystem with this label and UUID.
    Filesystem {
        fs_type: FsType,
        label: String,
        uuid: String,
    },
    /// A Linux md member (1.x superblock at 4 KiB) of the array with this UUID and name.
    MdMember { array_uuid: String, name: String },
    /// None of the above (blank, or a signature this module does not parse: inspection decides).
    Other,
}

/// Reads the ext, xfs and md 1.2 superblocks at the start of `dev`.
pub fn read_marker(dev: &Path) -> std::io::Result<OnDisk> {
    let mut f = std::fs::File::open(dev)?;
    let mut buf = vec![0u8; PROBE_BYTES];
    f.seek(SeekFrom::Start(0))?;
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    buf.truncate(got);
    Ok(parse_marker(&buf))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

pub fn parse_marker(buf: &[u8]) -> OnDisk {
    // ext2/3/4: superblock at 1024; magic at +0x38, UUID at +0x68, volume name at +0x78.
    if buf.len() >= 1024 + 0x88 {
        let sb = &buf[1024..];
        if u16::from_le_bytes([sb[0x38], sb[0x39]]) == EXT_MAGIC {
            return OnDisk::Filesystem {
                fs_type: FsType::Ext4,
                uuid: format_uuid(&sb[0x68..0x78]),
                label: cstr(&sb[0x78..0x88]),
            };
        }
    }
    // xfs: superblock at 0; magic, UUID at 32, fname (12 bytes) at 108.
    if buf.len() >= 120 && &buf[0..4] == XFS_MAGIC {
        return OnDisk::Filesystem {
            fs_type: FsType::Xfs,
            uuid: format_uuid(&buf[32..48]),
            label: cstr(&buf[108..120]),
        };
    }
    // md 1.2: superblock at 4096; magic (le32), set_uuid at +16, set_name (32 bytes) at +32.
    if buf.len() >= 4096 + 64 {
        let sb = &buf[4096..];
        if u32::from_le_bytes([sb[0], sb[1], sb[2], sb[3]]) == MD_MAGIC {
            return OnDisk::MdMember {
                array_uuid: sb[16..32].iter().map(|x| format!("{x:02x}")).collect(),
                name: cstr(&sb[32..64]),
            };
        }
    }
    OnDisk::Other
}

/// The md name stored by `mdadm --name` may carry a `homehost:` prefix.
pub fn is_our_md_name(name: &str) -> bool {
    name.rsplit(':').next() == Some(MD_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_is_stable_and_fits_xfs() {
        let l = label_for("nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1");
        assert_eq!(l, label_for("nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1"));
        assert_ne!(l, label_for("nvme-Amazon_EC2_NVMe_Instance_Storage_AWS2"));
        assert!(l.len() <= 12, "{l}");
        assert!(l.starts_with("nk-"));
    }

    #[test]
    fn parses_ext_xfs_and_md_superblocks() {
        let mut ext = vec![0u8; PROBE_BYTES];
        ext[1024 + 0x38..1024 + 0x3a].copy_from_slice(&EXT_MAGIC.to_le_bytes());
        ext[1024 + 0x68..1024 + 0x78].copy_from_slice(&[0xab; 16]);
        ext[1024 + 0x78..1024 + 0x83].copy_from_slice(b"nk-0123abcd");
        assert_eq!(
            parse_marker(&ext),
            OnDisk::Filesystem {
                fs_type: FsType::Ext4,
                label: "nk-0123abcd".into(),
                uuid: "abababab-abab-abab-abab-abababababab".into()
            }
        );
        let mut xfs = vec![0u8; PROBE_BYTES];
        xfs[0..4].copy_from_slice(XFS_MAGIC);
        xfs[108..111].copy_from_slice(b"nk-");
        assert!(
            matches!(parse_marker(&xfs), OnDisk::Filesystem { fs_type: FsType::Xfs, label, .. } if label == "nk-")
        );
        let mut md = vec![0u8; PROBE_BYTES];
        md[4096..4100].copy_from_slice(&MD_MAGIC.to_le_bytes());
        md[4096 + 32..4096 + 32 + 15].copy_from_slice(b"host:nodekeeper");
        match parse_marker(&md) {
            OnDisk::MdMember { name, array_uuid } => {
                assert!(is_our_md_name(&name));
                assert_eq!(array_uuid.len(), 32);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_marker(&[0u8; PROBE_BYTES]), OnDisk::Other);
    }

    #[test]
    fn uuid_is_v4_shaped() {
        let u = new_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
