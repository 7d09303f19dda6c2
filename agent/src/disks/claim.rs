//! The exclusive claim on a device between its last inspection and the write (#14).
//!
//! Owns: opening the device `O_RDONLY|O_EXCL` (the kernel then refuses every other exclusive
//! opener: a mount, mkfs, md, LVM, another agent), checking that the device behind the fd is
//! still the disk discovery saw (major:minor, size, serial, by-id target), inspecting it again
//! through that fd, and handing the tools a path that cannot be re-bound to another device:
//! `/proc/self/fd/N` of a second, plain fd kept open for the claim's life (a loop device with
//! an open fd cannot be detached and re-attached; an NVMe namespace that went away leaves the fd
//! pointing at the dead device, never at the disk that inherits its name).
//!
//! Must never: write. The tools write, through `tool_path`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::Disk;
use super::inspect::{self, InspectError};
use crate::host::HostPaths;

/// Why a claim was refused: nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another exclusive opener holds the device (mounted, mkfs running, md/LVM member).
    #[error("{disk}: cannot claim the device exclusively: {source}")]
    Busy {
        disk: String,
        source: std::io::Error,
    },
    /// The device behind the name is not the disk discovery saw (a kernel name re-bound).
    #[error("{disk}: the device changed since discovery: {what}")]
    Identity { disk: String, what: String },
    /// Inspected again through the claimed fd, the device is no longer blank.
    #[error("{disk}: no longer blank when claimed for writing: {reason}")]
    NotBlank { disk: String, reason: String },
    /// Read again through the claimed fd, the device no longer proves to be ours (reclaim).
    #[error("{disk}: no longer provably ours when claimed for wiping: {reason}")]
    NotOurs { disk: String, reason: String },
    /// The device could not be read again.
    #[error(transparent)]
    Inspect(#[from] InspectError),
}

/// A device held exclusively and verified blank; `tool_path` names it for the tools.
#[derive(Debug)]
pub struct Claim {
    /// The `O_EXCL` fd: held from the re-inspection until `release_exclusive`.
    exclusive: Option<File>,
    /// A plain fd kept open for the claim's life; the tools reach the device through it.
    keep: File,
}

impl Claim {
    /// Claims `disk` (by its kernel name under `paths.dev`), checks its identity against what
    /// discovery recorded, and inspects it again through the claimed fd with `opts`.
    pub fn take(
        paths: &HostPaths,
        disk: &Disk,
        opts: inspect::Options,
    ) -> Result<Claim, ClaimError> {
        Self::take_checked(paths, disk, false, |f| {
            let ins = inspect::inspect_file(f, &disk.dev_path, opts)?;
            if !ins.is_blank() {
                return Err(ClaimError::NotBlank {
                    disk: disk.name.clone(),
                    reason: ins.reason(),
                });
            }
            Ok(())
        })
    }

    /// The reclaim claim: `O_RDWR|O_EXCL` (the wipe writes through `exclusive_file`), the
    /// same identity check, then `prove_ours` reads the device again through the fd.
    pub fn take_owned(
        paths: &HostPaths,
        disk: &Disk,
        prove_ours: impl FnOnce(&File) -> Result<(), ClaimError>,
    ) -> Result<Claim, ClaimError> {
        Self::take_checked(paths, disk, true, prove_ours)
    }

    fn take_checked(
        paths: &HostPaths,
        disk: &Disk,
        writable: bool,
        check: impl FnOnce(&File) -> Result<(), ClaimError>,
    ) -> Result<Claim, ClaimError> {
        let dev = &disk.dev_path;
        let exclusive = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
            .open(dev)
            .map_err(|source| ClaimError::Busy {
                disk: disk.name.clone(),
                source,
            })?;
        check_identity(paths, disk, &exclusive)?;
        check(&exclusive)?;
        let keep = File::open(dev).map_err(|source| ClaimError::Busy {
            disk: disk.name.clone(),
            source,
        })?;
        // The same device behind both fds (nothing re-bound the name between the two opens).
        let same = |f: &File| f.metadata().map(|m| m.rdev()).ok();
        if same(&keep) != same(&exclusive) {
            return Err(ClaimError::Identity {
                disk: disk.name.clone(),
                what: "the name was re-bound while it was being claimed".into(),
            });
        }
        // The tools are separate processes: they reach the fd through /proc/self/fd only when
        // it survives exec.
        nix::fcntl::fcntl(
            &keep,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(|e| ClaimError::Busy {
            disk: disk.name.clone(),
            source: e.into(),
        })?;
        Ok(Claim {
            exclusive: Some(exclusive),
            keep,
        })
    }

    /// The path a tool opens: `/proc/self/fd/N`, in the tool's own process the inherited fd,
    /// which names this device whatever happens to its kernel name.
    pub fn tool_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.keep.as_raw_fd()))
    }

    /// `major:minor` of the claimed device (as sysfs writes it), from the plain fd.
    pub fn device_number(&self) -> Option<String> {
        let rdev = self.keep.metadata().ok()?.rdev();
        Some(format!(
            "{}:{}",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        ))
    }

    /// The exclusive fd (writable when taken with `take_owned`), until `release_exclusive`.
    pub fn exclusive_file(&self) -> Option<&File> {
        self.exclusive.as_ref()
    }

    /// Gives up the exclusive open right before a tool that claims the device itself (mkfs
    /// opens it `O_EXCL` and would get EBUSY). The window until the tool's own exclusive open
    /// is documented in docs/disks.md; the plain fd stays, so the name cannot be re-bound.
    pub fn release_exclusive(&mut self) {
        self.exclusive = None;
    }
}

/// The fd's device is the disk discovery saw: major:minor from sysfs, size, serial, by-id.
fn check_identity(paths: &HostPaths, disk: &Disk, fd: &File) -> Result<(), ClaimError> {
    let fail = |what: String| ClaimError::Identity {
        disk: disk.name.clone(),
        what,
    };
    let meta = fd.metadata().map_err(|e| fail(format!("fstat: {e}")))?;
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let sys_dev = read_trim(&paths.sys(&format!("class/block/{}/dev", disk.name)));
    if meta.file_type().is_file() {
        // Regular files stand in for devices in unit tests: no sysfs identity to compare.
        return Ok(());
    }
    if sys_dev.as_deref() != Some(&format!("{major}:{minor}")) {
        return Err(fail(format!(
            "the fd is {major}:{minor}, sysfs says {} is {sys_dev:?}",
            disk.name
        )));
    }
    let size = {
        use std::io::{Seek, SeekFrom};
        let mut f = fd;
        f.seek(SeekFrom::End(0))
            .map_err(|e| fail(format!("size: {e}")))?
    };
    if size != disk.size_bytes {
        return Err(fail(format!(
            "size {size}, discovery saw {}",
            disk.size_bytes
        )));
    }
    let serial = read_trim(&paths.sys(&format!("block/{}/device/serial", disk.name)));
    if let Some(s) = serial
        && s != disk.serial
    {
        return Err(fail(format!(
            "serial {s:?}, discovery saw {:?}",
            disk.serial
        )));
    }
    if let Some(by_id) = &disk.by_id {
        let link = paths.dev.join(by_id.trim_start_matches("/dev/"));
        let target = std::fs::read_link(&link)
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
        if target.as_deref() != Some(disk.name.as_str()) {
            return Err(fail(format!("{by_id} now points at {target:?}")));
        }
    }
    Ok(())
}

fn read_trim(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}
