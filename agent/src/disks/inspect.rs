//! Inspection of a device for signatures: partition tables, filesystems, RAID, LVM, LUKS, ZFS.
//!
//! Owns: reading the first and last MiB of a device (opened read-only, never written) plus a
//! sparse scan of the whole device (`scan_windows`), and naming every on-disk signature found
//! there, cross-checked with util-linux `blkid -p` (at 0 and at 1 MiB) and `wipefs -n` when
//! they are installed. The tools can only add findings, never remove one of ours: a disk is
//! blank only when neither our probes nor the tools find anything and every byte read is zero.
//!
//! Never opens a device for writing, never runs a tool that writes (`blkid -p` probes
//! read-only, `wipefs -n` is `--no-act`).
//!
//! The hook for `prepare`: `Inspection::filesystem` reports the ext4/xfs type, label and UUID,
//! so a disk carrying the agent's own marker can be told apart from a foreign filesystem.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;

use crate::host::exec::Exec;

/// How much of each end of the device is read. 1 MiB covers every signature probed here: the
/// GPT backup header (last LBA), the md 0.90/1.0 superblocks (last 64/8 KiB), ZFS labels L2/L3
/// (last 512 KiB) at the end; MBR, GPT, ext, xfs, btrfs (64 KiB), swap (pagesize up to 64 KiB),
/// LUKS, LVM (sectors 0-3), md 1.1/1.2 and ZFS labels L0/L1 (first 512 KiB) at the start.
pub const PROBE_BYTES: u64 = 1 << 20;

/// Timeout for one `blkid -p` or `wipefs -n` run. Both read a few KiB per probe; on a healthy
/// disk they answer in milliseconds. Ten seconds absorbs a busy or slow (network-attached)
/// device; past that the tool is killed and the disk is reported as not inspectable rather than
/// blank.
pub const CROSS_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The second offset `blkid -p --offset` probes: 1 MiB, the start of a partition created by
/// any current partitioning tool (2048 512-byte sectors).
const BLKID_PARTITION_OFFSET: u64 = 1 << 20;

/// Timeout for `blkid --version` / `wipefs --version`: no I/O, so one second is generous.
const VERSION_TIMEOUT: Duration = Duration::from_secs(1);

const MD_MAGIC: u32 = 0xa92b_4efc;
const ZFS_UBERBLOCK_MAGIC: u64 = 0x00ba_b10c;
/// ZFS vdev label size; labels L0, L1 at the start and L2, L3 at the end of the device.
const ZFS_LABEL: u64 = 256 << 10;
/// The uberblock ring starts 128 KiB into each label; slots are at least 1 KiB.
const ZFS_UBERBLOCK_RING: u64 = 128 << 10;
const ZFS_UBERBLOCK_SLOT: u64 = 1 << 10;

/// Errors of inspection.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The device cannot be opened or read (permissions, gone, I/O error).
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A cross-check tool hung past `CROSS_CHECK_TIMEOUT` or failed in an unexpected way: the
    /// disk cannot be called blank.
    #[error("{tool} on {path}: {problem}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        problem: String,
    },
}

impl InspectError {
    /// Low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            InspectError::Read { .. } => "read",
            InspectError::Tool { .. } => "tool",
        }
    }
}

/// One signature found on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Signature {
    /// Short name: `mbr`, `gpt`, `ext4`, `xfs`, `btrfs`, `swap`, `luks`, `lvm2`, `md`, `zfs`,
    /// `data` (non-zero bytes, no known signature), or a tool's own type name.
    pub kind: String,
    /// Where it was found, as a human reads it (`primary at LBA 1 (512-byte sectors)`).
    pub detail: String,
    /// `nodekeeper` for our probes, else the tool and version (`blkid 2.38.1`).
    pub found_by: String,
}

/// A filesystem the device carries, with what `prepare` needs to recognise its own marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Filesystem {
    /// `ext2`, `ext3`, `ext4`, `xfs`, `btrfs`, `swap`.
    pub fs_type: String,
    pub label: String,
    /// Canonical lower-case `8-4-4-4-12` form.
    pub uuid: String,
}

/// What inspection found on one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    pub signatures: Vec<Signature>,
    /// The filesystem our probes identified, with label and UUID (the `Ours` hook).
    pub filesystem: Option<Filesystem>,
    /// The cross-check tools that ran, with their versions (`blkid 2.38.1`).
    pub cross_checked_with: Vec<String>,
}

/// Options for one inspection.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Also run `blkid -p` and `wipefs -n` (when installed) and add their findings.
    pub cross_check: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { cross_check: true }
    }
}

// === impl Inspection ===

impl Inspection {
    /// No signature at all, and the ends of the device are all zeros.
    pub fn is_blank(&self) -> bool {
        self.signatures.is_empty()
    }

    /// The reason `disks list` shows: `has xfs signature`, `has gpt, ext4 signatures`, with the
    /// tools that confirmed or added findings.
    pub fn reason(&self) -> String {
        // Each kind once, annotated with the tool when only a tool found it.
        let mut kinds: Vec<String> = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        for s in &self.signatures {
            if seen.contains(&s.kind.as_str()) {
                continue;
            }
            seen.push(&s.kind);
            let native = self
                .signatures
                .iter()
                .any(|o| o.kind == s.kind && o.found_by == NATIVE);
            kinds.push(if native {
                s.kind.clone()
            } else {
                format!("{} (found by {})", s.kind, s.found_by)
            });
        }
        let mut out = match kinds.len() {
            0 => "blank".to_string(),
            // The last resort has no name: say what was seen instead.
            1 if kinds[0] == "data" => format!(
                "has data without a known signature ({})",
                self.signatures[0].detail
            ),
            1 => format!("has {} signature", kinds[0]),
            _ => format!("has {} signatures", kinds.join(", ")),
        };
        if !self.cross_checked_with.is_empty() {
            out.push_str(&format!(
                "; cross-checked with {}",
                self.cross_checked_with.join(", ")
            ));
        }
        out
    }

    fn add(&mut self, kind: &str, detail: impl Into<String>, found_by: &str) {
        self.signatures.push(Signature {
            kind: kind.to_string(),
            detail: detail.into(),
            found_by: found_by.to_string(),
        });
    }
}

const NATIVE: &str = "nodekeeper";

/// Inspects the device (or regular file) at `path`: opened read-only, then `inspect_file`.
pub fn inspect(path: &Path, opts: Options) -> Result<Inspection, InspectError> {
    // O_RDONLY: std's File::open. Nothing in this module opens for writing.
    let file = File::open(path).map_err(|source| InspectError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    inspect_file(&file, path, opts)
}

/// Inspects an open device: the first and last `PROBE_BYTES` read and every probe run over
/// them; when they show nothing, the sparse scan over the whole device (`scan_windows`), each
/// non-zero window probed as the start of a lost partition; then, on a disk still blank, the
/// cross-check tools on `path`. `prepare` calls this through the fd it holds exclusively, so
/// the bytes judged are the bytes of the device it is about to write.
pub fn inspect_file(file: &File, path: &Path, opts: Options) -> Result<Inspection, InspectError> {
    let read_err = |source| InspectError::Read {
        path: path.to_path_buf(),
        source,
    };
    let size = device_size(file).map_err(read_err)?;
    let head_len = size.min(PROBE_BYTES);
    let tail_off = size.saturating_sub(PROBE_BYTES);
    let head = read_at(file, 0, head_len).map_err(read_err)?;
    let tail = read_at(file, tail_off, size - tail_off).map_err(read_err)?;
    let ends = Ends {
        head,
        tail,
        tail_off,
        size,
    };
    let mut ins = probe(&ends);
    if ins.is_blank() {
        scan(file, path, size, &mut ins).map_err(read_err)?;
    }
    // The tools can only add findings, and one finding already makes a disk untouchable: ask
    // them only about disks our own probes call blank, which is where a second opinion matters.
    if opts.cross_check && ins.is_blank() {
        cross_check(path, &mut ins)?;
    }
    Ok(ins)
}

// === the sparse scan: evidence over the whole device ===

/// Dense part of the scan: every MiB boundary in the first GiB is a possible start of a lost
/// partition (partitioning tools align to 1 MiB; old DOS tables start at 63 sectors, inside
/// the first MiB, which is read whole).
pub const SCAN_DENSE_END: u64 = 1 << 30;
pub const SCAN_DENSE_STRIDE: u64 = 1 << 20;
/// At each dense boundary: the first 8 KiB (MBR/GPT, ext superblock at +1 KiB, xfs at 0, md
/// 1.2 at +4 KiB, LUKS, LVM, swap's 4 KiB page, the VMFS volume header) ...
pub const SCAN_DENSE_HEAD: u64 = 8 << 10;
/// ... and 4 KiB at +64 KiB (btrfs superblock, md 0.90/1.0 of a preceding 64 KiB-aligned
/// volume's end is in the previous boundary's window anyway).
pub const SCAN_DENSE_BTRFS: u64 = 64 << 10;
/// Sparse part, over the whole device: 64 KiB at every 64 MiB. Any run of non-zero bytes
/// longer than stride + window anywhere on the disk is seen. Reads of never-written (NVMe
/// deallocated, sparse loop) blocks return zeros fast: see docs/disks.md for the cost per TB.
pub const SCAN_STRIDE: u64 = 64 << 20;
pub const SCAN_WINDOW: u64 = 64 << 10;
/// Scan reads in flight (one thread each, for the scan's duration only).
pub const SCAN_READERS: usize = 16;
/// The VMFS volume header magic, at the start of the volume header (1 MiB into a VMFS volume).
const VMFS_VOLUME_MAGIC: u32 = 0xc001_d00d;

/// The windows the scan reads, by ascending offset, skipping what the head and tail reads
/// already covered. Public so tests and docs can state the rule exactly.
pub fn scan_windows(size: u64) -> Vec<(u64, u64)> {
    let mut w = Vec::new();
    let covered =
        |off: u64, len: u64| off + len <= PROBE_BYTES || off >= size.saturating_sub(PROBE_BYTES);
    let mut push = |off: u64, len: u64| {
        let len = len.min(size.saturating_sub(off));
        if len > 0 && !covered(off, len) {
            w.push((off, len));
        }
    };
    let mut off = SCAN_DENSE_STRIDE;
    while off < SCAN_DENSE_END.min(size) {
        push(off, SCAN_DENSE_HEAD);
        push(off + SCAN_DENSE_BTRFS, 4 << 10);
        if off.is_multiple_of(SCAN_STRIDE) {
            push(off, SCAN_WINDOW);
        }
        off += SCAN_DENSE_STRIDE;
    }
    let mut off = SCAN_DENSE_END.div_ceil(SCAN_STRIDE) * SCAN_STRIDE;
    while off < size {
        push(off, SCAN_WINDOW);
        off += SCAN_STRIDE;
    }
    w.sort();
    w
}

/// Reads every scan window (through an `O_DIRECT` fd when the device allows it, so a scan of a
/// multi-TB disk neither fills the page cache nor triggers readahead), `SCAN_READERS` reads in
/// flight: one read of zeros costs a device round trip (tens of microseconds on NVMe, a
/// scheduling delay on a loaded loop device), so the scan is latency-bound, not bandwidth-bound.
/// The lowest window with a non-zero byte is probed as the start of a volume and named
/// (`ext4 ... of a volume at offset 104857600`), or reported as `data`. One finding is enough.
fn scan(file: &File, path: &Path, size: u64, ins: &mut Inspection) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let direct = open_direct(path);
    let windows = scan_windows(size);
    // The lowest offset of a non-zero window found so far (u64::MAX: none); a reader skips
    // windows past it, so the scan ends soon after a finding.
    let lowest = AtomicU64::new(u64::MAX);
    let results: Vec<std::io::Result<Option<Finding>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..SCAN_READERS)
            .map(|reader| {
                let (windows, lowest, direct) = (&windows, &lowest, &direct);
                scope.spawn(move || -> std::io::Result<Option<Finding>> {
                    let mut buf = AlignedBuf::new(SCAN_WINDOW as usize);
                    for &(off, len) in windows.iter().skip(reader).step_by(SCAN_READERS) {
                        if off > lowest.load(Ordering::Relaxed) {
                            break;
                        }
                        let data = buf.slice(len as usize);
                        match direct {
                            Some(d) => d
                                .read_exact_at(data, off)
                                .or_else(|_| file.read_exact_at(data, off))?,
                            None => file.read_exact_at(data, off)?,
                        }
                        if data.iter().any(|b| *b != 0) {
                            lowest.fetch_min(off, Ordering::Relaxed);
                            return Ok(Some((off, data.to_vec())));
                        }
                    }
                    Ok(None)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("scan reader panicked")))
            })
            .collect()
    });
    let mut first: Option<(u64, Vec<u8>)> = None;
    for r in results {
        if let Some((off, data)) = r?
            && first.as_ref().is_none_or(|(o, _)| off < *o)
        {
            first = Some((off, data));
        }
    }
    let Some((off, data)) = first else {
        return Ok(());
    };
    let window = Ends {
        head: data,
        tail: Vec::new(),
        tail_off: size - off,
        size: size - off,
    };
    let mut found = probe(&window);
    found.signatures.retain(|s| s.kind != "data");
    if window.le32(0) == Some(VMFS_VOLUME_MAGIC) {
        found.add("vmfs", "VMFS volume header magic 0xc001d00d", NATIVE);
    }
    if found.signatures.is_empty() {
        let i = window.head.iter().position(|b| *b != 0).unwrap_or(0) as u64;
        ins.add(
            "data",
            format!("non-zero data at offset {} (sparse scan)", off + i),
            NATIVE,
        );
    } else {
        for s in found.signatures {
            ins.add(
                &s.kind,
                format!("{} of a volume at offset {off}", s.detail),
                NATIVE,
            );
        }
    }
    Ok(())
}

/// A scan window with a non-zero byte: its offset and bytes.
type Finding = (u64, Vec<u8>);

/// A second, `O_DIRECT` read-only fd on a block device; None for regular files and devices
/// that refuse it (the buffered fd is used then).
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
        .ok()
}

/// A buffer aligned to 4 KiB, as `O_DIRECT` wants (any logical block size up to 4 KiB).
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    fn new(len: usize) -> Self {
        let raw = vec![0u8; len + Self::ALIGN];
        let start = raw.as_ptr().align_offset(Self::ALIGN);
        Self { raw, start }
    }

    fn slice(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len]
    }
}

/// The size through the fd: seeking to the end works for block devices and regular files alike.
fn device_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

fn read_at(file: &File, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, off)?;
    Ok(buf)
}

// === probes ===

/// The first and last MiB of a device.
struct Ends {
    head: Vec<u8>,
    tail: Vec<u8>,
    /// Device offset of `tail[0]`.
    tail_off: u64,
    size: u64,
}

impl Ends {
    /// Bytes at an absolute device offset, when they lie within what was read.
    fn at(&self, off: u64, len: usize) -> Option<&[u8]> {
        let end = off.checked_add(len as u64)?;
        if end <= self.head.len() as u64 {
            return Some(&self.head[off as usize..end as usize]);
        }
        if off >= self.tail_off && end <= self.size {
            let o = (off - self.tail_off) as usize;
            return Some(&self.tail[o..o + len]);
        }
        None
    }

    fn le16(&self, off: u64) -> Option<u16> {
        self.at(off, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn le32(&self, off: u64) -> Option<u32> {
        self.at(off, 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn is(&self, off: u64, magic: &[u8]) -> bool {
        self.at(off, magic.len()) == Some(magic)
    }
}

fn probe(e: &Ends) -> Inspection {
    let mut ins = Inspection::default();
    probe_partition_tables(e, &mut ins);
    probe_ext(e, &mut ins);
    probe_xfs(e, &mut ins);
    probe_btrfs(e, &mut ins);
    probe_swap(e, &mut ins);
    probe_luks(e, &mut ins);
    probe_lvm(e, &mut ins);
    probe_md(e, &mut ins);
    probe_zfs(e, &mut ins);
    if ins.signatures.is_empty() {
        // Last resort: anything but zeros is somebody's data (random fill, an unknown format,
        // an encrypted volume without a header).
        if let Some(i) = e.head.iter().position(|b| *b != 0) {
            ins.add(
                "data",
                format!("non-zero data in the first MiB, from offset {i}"),
                NATIVE,
            );
        } else if let Some(i) = e.tail.iter().position(|b| *b != 0) {
            ins.add(
                "data",
                format!(
                    "non-zero data in the last MiB, from offset {}",
                    e.tail_off + i as u64
                ),
                NATIVE,
            );
        }
    }
    ins
}

/// MBR: 0x55AA at 510 and a non-empty partition entry (type 0xEE alone is GPT's protective
/// MBR, reported as part of GPT). GPT: "EFI PART" at LBA 1 and at the last LBA, for 512- and
/// 4096-byte sectors.
fn probe_partition_tables(e: &Ends, ins: &mut Inspection) {
    let mut protective = false;
    if e.is(510, &[0x55, 0xAA]) {
        let types: Vec<u8> = (0..4)
            .filter_map(|i| e.at(446 + 16 * i + 4, 1).map(|b| b[0]))
            .filter(|t| *t != 0)
            .collect();
        if types.iter().all(|t| *t == 0xEE) && !types.is_empty() {
            protective = true;
        } else if !types.is_empty() {
            ins.add(
                "mbr",
                format!("0x55AA at 510 with {} partition entries", types.len()),
                NATIVE,
            );
        } else {
            ins.add(
                "mbr",
                "boot signature 0x55AA at 510 (no partition entries)",
                NATIVE,
            );
        }
    }
    for sector in [512u64, 4096] {
        if e.is(sector, b"EFI PART") {
            ins.add(
                "gpt",
                format!("primary header at LBA 1 ({sector}-byte sectors)"),
                NATIVE,
            );
        }
        if e.size >= sector && e.is(e.size - sector, b"EFI PART") {
            ins.add(
                "gpt",
                format!("backup header at the last LBA ({sector}-byte sectors)"),
                NATIVE,
            );
        }
    }
    if protective && !ins.signatures.iter().any(|s| s.kind == "gpt") {
        // A protective MBR without either GPT header: a damaged GPT, still somebody's disk.
        ins.add("gpt", "protective MBR (type 0xEE) at 446", NATIVE);
    }
}

/// ext2/3/4: magic 0xEF53 at 1080 (superblock at 1024, s_magic at +0x38); the version from the
/// feature flags as blkid decides it.
fn probe_ext(e: &Ends, ins: &mut Inspection) {
    if e.le16(1024 + 0x38) != Some(0xEF53) {
        return;
    }
    let compat = e.le32(1024 + 0x5C).unwrap_or(0);
    let incompat = e.le32(1024 + 0x60).unwrap_or(0);
    let ro_compat = e.le32(1024 + 0x64).unwrap_or(0);
    const HAS_JOURNAL: u32 = 0x4;
    // Incompat features ext3 lacks (extents, 64bit, flex_bg, ...), ro_compat ext3 lacks
    // (huge_file, gdt_csum, dir_nlink, extra_isize, metadata_csum...).
    const EXT4_INCOMPAT: u32 = !(0x2 | 0x4 | 0x10);
    const EXT4_RO_COMPAT: u32 = !(0x1 | 0x2 | 0x4);
    let kind = if incompat & EXT4_INCOMPAT != 0 || ro_compat & EXT4_RO_COMPAT != 0 {
        "ext4"
    } else if compat & HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    };
    ins.add(kind, "superblock magic 0xEF53 at 1080", NATIVE);
    ins.filesystem = Some(Filesystem {
        fs_type: kind.into(),
        label: c_string(e.at(1024 + 0x78, 16).unwrap_or(&[])),
        uuid: uuid(e.at(1024 + 0x68, 16)),
    });
}

/// xfs: "XFSB" at 0; UUID at 32, label (sb_fname) at 108.
fn probe_xfs(e: &Ends, ins: &mut Inspection) {
    if !e.is(0, b"XFSB") {
        return;
    }
    ins.add("xfs", "superblock magic \"XFSB\" at 0", NATIVE);
    ins.filesystem = Some(Filesystem {
        fs_type: "xfs".into(),
        label: c_string(e.at(108, 12).unwrap_or(&[])),
        uuid: uuid(e.at(32, 16)),
    });
}

/// btrfs: "_BHRfS_M" at 65600 (superblock at 64 KiB, magic at +64); fsid at +32, label at +299.
fn probe_btrfs(e: &Ends, ins: &mut Inspection) {
    const SB: u64 = 64 << 10;
    if !e.is(SB + 64, b"_BHRfS_M") {
        return;
    }
    ins.add("btrfs", "superblock magic \"_BHRfS_M\" at 65600", NATIVE);
    ins.filesystem = Some(Filesystem {
        fs_type: "btrfs".into(),
        label: c_string(e.at(SB + 299, 256).unwrap_or(&[])),
        uuid: uuid(e.at(SB + 32, 16)),
    });
}

/// swap: "SWAPSPACE2" (or the old "SWAP-SPACE") in the last 10 bytes of the first page, for
/// every page size Linux uses (4, 8, 16, 64 KiB).
fn probe_swap(e: &Ends, ins: &mut Inspection) {
    for page in [4096u64, 8192, 16384, 65536] {
        for magic in [&b"SWAPSPACE2"[..], b"SWAP-SPACE"] {
            if e.is(page - 10, magic) {
                ins.add(
                    "swap",
                    format!(
                        "\"{}\" at {} ({page}-byte pages)",
                        String::from_utf8_lossy(magic),
                        page - 10
                    ),
                    NATIVE,
                );
                if magic == b"SWAPSPACE2" {
                    ins.filesystem = Some(Filesystem {
                        fs_type: "swap".into(),
                        label: c_string(e.at(1024 + 28, 16).unwrap_or(&[])),
                        uuid: uuid(e.at(1024 + 12, 16)),
                    });
                }
                return;
            }
        }
    }
}

/// LUKS1/LUKS2: "LUKS\xba\xbe" at 0 (version at 6); LUKS2 also keeps a secondary header
/// ("SKUL\xba\xbe") at one of its fixed offsets (16 KiB .. 4 MiB), found when in the first MiB.
fn probe_luks(e: &Ends, ins: &mut Inspection) {
    if e.is(0, b"LUKS\xba\xbe") {
        let version = e.at(6, 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        ins.add(
            "luks",
            format!(
                "LUKS{} header magic at 0",
                version.map(|v| v.to_string()).unwrap_or_default()
            ),
            NATIVE,
        );
        return;
    }
    let mut off = 16u64 << 10;
    while off <= 4 << 20 {
        if e.is(off, b"SKUL\xba\xbe") {
            ins.add(
                "luks",
                format!("LUKS2 secondary header at {off} (primary missing)"),
                NATIVE,
            );
            return;
        }
        off *= 2;
    }
}

/// LVM2 PV: "LABELONE" at the start of one of sectors 0-3, with type "LVM2 001" at +24.
fn probe_lvm(e: &Ends, ins: &mut Inspection) {
    for sector in 0..4u64 {
        let off = sector * 512;
        if e.is(off, b"LABELONE") && e.is(off + 24, b"LVM2 001") {
            ins.add(
                "lvm2",
                format!("physical volume label \"LABELONE\" in sector {sector}"),
                NATIVE,
            );
            return;
        }
    }
}

/// Linux md RAID: magic 0xa92b4efc (little-endian) at the superblock of each format: 1.1 at 0,
/// 1.2 at 4 KiB, 1.0 at 8 KiB before the end (4 KiB aligned), 0.90 in the last 64 KiB-aligned
/// 64 KiB block.
fn probe_md(e: &Ends, ins: &mut Inspection) {
    let sectors = e.size / 512;
    let v10 = (sectors.saturating_sub(16) & !7) * 512;
    let v090 = (e.size & !(65536 - 1)).saturating_sub(65536);
    for (off, version) in [(0, "1.1"), (4096, "1.2"), (v10, "1.0"), (v090, "0.90")] {
        let magic_ok = e.le32(off) == Some(MD_MAGIC)
            || (version == "0.90" && e.at(off, 4) == Some(&MD_MAGIC.to_be_bytes()[..]));
        if magic_ok && e.size > 0 {
            ins.add(
                "md",
                format!("RAID superblock {version} (magic 0xa92b4efc at {off})"),
                NATIVE,
            );
            return;
        }
    }
}

/// ZFS: the uberblock magic 0x00bab10c (either byte order) in a slot of the uberblock ring of
/// any of the four vdev labels (two at the start, two at the end of the device).
fn probe_zfs(e: &Ends, ins: &mut Inspection) {
    if e.size < 4 * ZFS_LABEL {
        return;
    }
    let labels = [
        (0, 0),
        (1, ZFS_LABEL),
        (2, e.size / ZFS_LABEL * ZFS_LABEL - 2 * ZFS_LABEL),
        (3, e.size / ZFS_LABEL * ZFS_LABEL - ZFS_LABEL),
    ];
    for (n, label) in labels {
        let mut off = label + ZFS_UBERBLOCK_RING;
        while off < label + ZFS_LABEL {
            if let Some(b) = e.at(off, 8) {
                let v = [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
                if u64::from_le_bytes(v) == ZFS_UBERBLOCK_MAGIC
                    || u64::from_be_bytes(v) == ZFS_UBERBLOCK_MAGIC
                {
                    ins.add(
                        "zfs",
                        format!("uberblock magic 0x00bab10c in vdev label L{n} at {off}"),
                        NATIVE,
                    );
                    return;
                }
            }
            off += ZFS_UBERBLOCK_SLOT;
        }
    }
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim().to_string()
}

fn uuid(b: Option<&[u8]>) -> String {
    let Some(b) = b.filter(|b| b.len() == 16 && b.iter().any(|c| *c != 0)) else {
        return String::new();
    };
    let h: String = b.iter().map(|c| format!("{c:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

// === cross-check with util-linux ===

/// Runs `blkid -p -o export` and `wipefs -n -J` (each when installed) and adds every type they
/// report that our probes did not. A tool that hangs or fails unexpectedly is an error: the
/// disk must not be called blank on a probe that did not finish.
fn cross_check(path: &Path, ins: &mut Inspection) -> Result<(), InspectError> {
    if let Some(blkid) = tool("blkid") {
        let version = &blkid.version;
        // At 0, and at 1 MiB (2048 sectors: where a partition whose table was lost starts);
        // blkid probes only the offset it is given.
        for offset in [None, Some(BLKID_PARTITION_OFFSET)] {
            let offset_arg = offset.map(|o| o.to_string());
            let mut args = vec!["-p", "-o", "export"];
            if let Some(o) = &offset_arg {
                args.extend(["--offset", o.as_str()]);
            }
            let how = match offset {
                None => "blkid -p".to_string(),
                Some(o) => format!("blkid -p --offset {o}"),
            };
            let out = run_tool(blkid, path, &args)?;
            // blkid: 0 found, 2 nothing found, 8 ambivalent (several signatures).
            match out.status {
                0 => {
                    for line in out.stdout.lines() {
                        if let Some(t) = line
                            .strip_prefix("TYPE=")
                            .or_else(|| line.strip_prefix("PTTYPE="))
                        {
                            add_tool_finding(ins, t, &how, version);
                        }
                    }
                }
                2 => {}
                8 => add_tool_finding(
                    ins,
                    "ambivalent",
                    &format!("{how} (several signatures)"),
                    version,
                ),
                s => {
                    return Err(InspectError::Tool {
                        tool: "blkid",
                        path: path.to_path_buf(),
                        problem: format!("exit status {s}: {}", out.stderr.trim()),
                    });
                }
            }
        }
        ins.cross_checked_with.push(version.clone());
    }
    if let Some(wipefs) = tool("wipefs") {
        let version = &wipefs.version;
        let out = run_tool(wipefs, path, &["-n", "-J"])?;
        if out.status != 0 {
            return Err(InspectError::Tool {
                tool: "wipefs",
                path: path.to_path_buf(),
                problem: format!("exit status {}: {}", out.status, out.stderr.trim()),
            });
        }
        if !out.stdout.trim().is_empty() {
            let v: serde_json::Value =
                serde_json::from_str(&out.stdout).map_err(|e| InspectError::Tool {
                    tool: "wipefs",
                    path: path.to_path_buf(),
                    problem: format!("unreadable JSON: {e}"),
                })?;
            for sig in v["signatures"].as_array().into_iter().flatten() {
                if let Some(t) = sig["type"].as_str() {
                    add_tool_finding(ins, t, "wipefs -n", version);
                }
            }
        }
        ins.cross_checked_with.push(version.clone());
    }
    Ok(())
}

/// Our name for a blkid/wipefs type, so a finding both agree on is not listed twice.
fn normalise(tool_type: &str) -> &str {
    match tool_type {
        "dos" => "mbr",
        "PMBR" => "gpt",
        "crypto_LUKS" => "luks",
        "LVM2_member" => "lvm2",
        "linux_raid_member" => "md",
        "zfs_member" => "zfs",
        other => other,
    }
}

fn add_tool_finding(ins: &mut Inspection, tool_type: &str, how: &str, version: &str) {
    let kind = normalise(tool_type);
    if ins.signatures.iter().any(|s| s.kind == kind) {
        return;
    }
    // A tool's finding replaces our last-resort "data": it names what the data is.
    ins.signatures.retain(|s| s.kind != "data");
    ins.add(kind, format!("reported by {how}"), version);
}

struct ToolOutput {
    status: i32,
    stdout: String,
    stderr: String,
}

/// A cross-check tool found on this host: where it is and its version.
struct Tool {
    path: PathBuf,
    /// `blkid 2.38.1`, as reasons name it.
    version: String,
}

/// Directories searched after `$PATH`: util-linux lives in sbin, which a container's PATH may
/// lack.
const SBIN_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The tool, located once per process (absolute path, so each run is one execve rather than a
/// PATH walk) with its version from `--version` ("blkid from util-linux 2.38.1 (libblkid
/// ...)"); None when it is not installed.
fn tool(name: &'static str) -> Option<&'static Tool> {
    static BLKID: OnceLock<Option<Tool>> = OnceLock::new();
    static WIPEFS: OnceLock<Option<Tool>> = OnceLock::new();
    let cell = if name == "blkid" { &BLKID } else { &WIPEFS };
    cell.get_or_init(|| {
        let path_var = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::split_paths(&path_var)
            .chain(SBIN_DIRS.iter().map(PathBuf::from))
            .map(|d| d.join(name))
            .find(|p| p.is_file())?;
        let out = run_with_timeout(Exec::new(&path, VERSION_TIMEOUT).arg("--version")).ok()?;
        if out.status != 0 {
            return None;
        }
        let v = out
            .stdout
            .split("util-linux")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("unknown");
        Some(Tool {
            path,
            version: format!("{name} {v}"),
        })
    })
    .as_ref()
}

fn run_tool(tool: &Tool, path: &Path, args: &[&str]) -> Result<ToolOutput, InspectError> {
    let cmd = Exec::new(&tool.path, CROSS_CHECK_TIMEOUT)
        .args(args)
        .arg(path);
    let name = if tool.version.starts_with("blkid") {
        "blkid"
    } else {
        "wipefs"
    };
    run_with_timeout(cmd).map_err(|problem| InspectError::Tool {
        tool: name,
        path: path.to_path_buf(),
        problem,
    })
}

/// Runs a tool through `host::exec` (deadline, process-group kill, output cap) in the C locale,
/// so its output parses the same on every host. Any exit status is an answer here (blkid
/// exits 2 for "nothing found").
fn run_with_timeout(cmd: Exec) -> Result<ToolOutput, String> {
    let out = cmd.env("LC_ALL", "C").run().map_err(|e| e.to_string())?;
    Ok(ToolOutput {
        status: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// A 4 MiB zeroed image with `f` applied, inspected natively (no tools).
    fn image(f: impl FnOnce(&mut Vec<u8>)) -> Inspection {
        let mut buf = vec![0u8; 4 * MIB];
        f(&mut buf);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, &buf).unwrap();
        inspect(&p, Options { cross_check: false }).unwrap()
    }

    fn kinds(i: &Inspection) -> Vec<&str> {
        i.signatures.iter().map(|s| s.kind.as_str()).collect()
    }

    #[test]
    fn blank_is_blank() {
        let i = image(|_| {});
        assert!(i.is_blank(), "{i:?}");
        assert_eq!(i.reason(), "blank");
    }

    #[test]
    fn each_signature_is_named() {
        let end = 4 * MIB;
        type Fixture = Box<dyn FnOnce(&mut Vec<u8>)>;
        let cases: Vec<(&str, Fixture)> = vec![
            (
                "mbr",
                Box::new(|b| {
                    b[510] = 0x55;
                    b[511] = 0xAA;
                    b[446 + 4] = 0x83;
                }),
            ),
            (
                "gpt",
                Box::new(move |b| b[end - 512..end - 504].copy_from_slice(b"EFI PART")),
            ),
            (
                "ext4",
                Box::new(|b| {
                    b[1080] = 0x53;
                    b[1081] = 0xEF;
                    b[1024 + 0x60] = 0x40; // extents
                }),
            ),
            (
                "ext2",
                Box::new(|b| {
                    b[1080] = 0x53;
                    b[1081] = 0xEF;
                }),
            ),
            ("xfs", Box::new(|b| b[0..4].copy_from_slice(b"XFSB"))),
            (
                "btrfs",
                Box::new(|b| b[65600..65608].copy_from_slice(b"_BHRfS_M")),
            ),
            (
                "swap",
                Box::new(|b| b[16384 - 10..16384].copy_from_slice(b"SWAPSPACE2")),
            ),
            (
                "luks",
                Box::new(|b| b[0..6].copy_from_slice(b"LUKS\xba\xbe")),
            ),
            (
                "lvm2",
                Box::new(|b| {
                    b[512..520].copy_from_slice(b"LABELONE");
                    b[512 + 24..512 + 32].copy_from_slice(b"LVM2 001");
                }),
            ),
            (
                "md",
                Box::new(|b| b[4096..4100].copy_from_slice(&MD_MAGIC.to_le_bytes())),
            ),
            (
                "md",
                Box::new(move |b| {
                    let off = ((end / 512 - 16) & !7) * 512;
                    b[off..off + 4].copy_from_slice(&MD_MAGIC.to_le_bytes());
                }),
            ),
            (
                "zfs",
                Box::new(move |b| {
                    let off = end - ZFS_LABEL as usize + ZFS_UBERBLOCK_RING as usize + 3 * 1024;
                    b[off..off + 8].copy_from_slice(&ZFS_UBERBLOCK_MAGIC.to_le_bytes());
                }),
            ),
            ("data", Box::new(|b| b[300_000] = 1)),
            ("data", Box::new(move |b| b[end - 7] = 1)),
        ];
        for (want, f) in cases {
            let i = image(f);
            assert_eq!(kinds(&i), vec![want], "{i:?}");
            if want == "data" {
                assert!(
                    i.reason()
                        .starts_with("has data without a known signature (non-zero"),
                    "{}",
                    i.reason()
                );
            } else {
                assert_eq!(i.reason(), format!("has {want} signature"));
            }
        }
    }

    #[test]
    fn a_filesystem_whose_partition_table_was_lost_is_found_at_1_mib() {
        let i = image(|b| {
            b[MIB + 1080] = 0x53;
            b[MIB + 1081] = 0xEF;
        });
        assert_eq!(kinds(&i), vec!["ext2"], "{i:?}");
        assert!(
            i.signatures[0]
                .detail
                .ends_with("of a volume at offset 1048576"),
            "{i:?}"
        );
    }

    #[test]
    fn data_in_a_scan_window_past_the_first_mib_is_data() {
        let i = image(|b| b[2 * MIB + (64 << 10) + 100] = 7);
        assert_eq!(kinds(&i), vec!["data"], "{i:?}");
        assert_eq!(
            i.signatures[0].detail,
            format!(
                "non-zero data at offset {} (sparse scan)",
                2 * MIB + (64 << 10) + 100
            )
        );
    }

    #[test]
    fn a_vmfs_volume_header_at_1_mib_is_named() {
        let i = image(|b| b[MIB..MIB + 4].copy_from_slice(&VMFS_VOLUME_MAGIC.to_le_bytes()));
        assert_eq!(kinds(&i), vec!["vmfs"], "{i:?}");
    }

    /// The scan's promise: a run of non-zero bytes of stride + window anywhere on the disk
    /// overlaps a window; every window is 4 KiB aligned (O_DIRECT) and inside the device.
    #[test]
    fn the_scan_sees_every_long_run_and_reads_aligned_windows_only() {
        let size: u64 = 3_840_000_000_000 / 4096 * 4096; // a 3.84 TB instance-store disk
        let w = scan_windows(size);
        assert!(
            w.iter()
                .all(|(o, l)| o % 4096 == 0 && l % 512 == 0 && o + l <= size)
        );
        let run = SCAN_STRIDE + SCAN_WINDOW;
        let mut start = PROBE_BYTES;
        while start + run < size - PROBE_BYTES {
            assert!(
                w.iter().any(|(o, l)| *o < start + run && o + l > start),
                "a run at {start} is missed"
            );
            start += 7_777_777_777;
        }
        // Every MiB boundary of the first GiB is looked at.
        for m in 1..1024u64 {
            assert!(w.iter().any(|(o, _)| *o == m * MIB as u64), "{m} MiB");
        }
        // Bounded: about 16 k windows per TiB past the first GiB.
        assert!(w.len() < 2 * 1024 + 16 * 1024 * 4, "{}", w.len());
    }

    #[test]
    fn protective_mbr_belongs_to_gpt() {
        let i = image(|b| {
            b[510] = 0x55;
            b[511] = 0xAA;
            b[446 + 4] = 0xEE;
            b[512..520].copy_from_slice(b"EFI PART");
        });
        assert_eq!(kinds(&i), vec!["gpt"]);
    }

    #[test]
    fn ext4_label_and_uuid_are_reported_for_prepare() {
        let i = image(|b| {
            b[1080] = 0x53;
            b[1081] = 0xEF;
            b[1024 + 0x60] = 0x40;
            b[1024 + 0x68..1024 + 0x78].copy_from_slice(&[0x12; 16]);
            b[1024 + 0x78..1024 + 0x78 + 5].copy_from_slice(b"nk-01");
        });
        let fs = i.filesystem.unwrap();
        assert_eq!(fs.fs_type, "ext4");
        assert_eq!(fs.label, "nk-01");
        assert_eq!(fs.uuid, "12121212-1212-1212-1212-121212121212");
    }

    #[test]
    fn a_tool_finding_is_added_never_removed() {
        let mut i = Inspection::default();
        i.add("data", "non-zero", NATIVE);
        add_tool_finding(&mut i, "ntfs", "blkid -p", "blkid 2.38.1");
        add_tool_finding(&mut i, "crypto_LUKS", "blkid -p", "blkid 2.38.1");
        assert_eq!(kinds(&i), vec!["ntfs", "luks"]);
        i.cross_checked_with.push("blkid 2.38.1".into());
        assert_eq!(
            i.reason(),
            "has ntfs (found by blkid 2.38.1), luks (found by blkid 2.38.1) signatures; \
             cross-checked with blkid 2.38.1"
        );
        let mut j = Inspection::default();
        j.add("xfs", "XFSB", NATIVE);
        add_tool_finding(&mut j, "xfs", "blkid -p", "blkid 2.38.1");
        assert_eq!(kinds(&j), vec!["xfs"]);
    }
}
