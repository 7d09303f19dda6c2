//! Opening the agent's own state files (the sysctl journal and its lock, disks' owned.json,
//! published.json and lock) so that a broken or hostile state dir can never block the agent
//! (issue #15): every open is O_NONBLOCK (a FIFO, which would block `open` or `read` until a
//! writer comes, returns at once) and anything but a regular file is refused with an error
//! naming what it is. The caller turns the error into its capability's degraded health; the
//! agent serves. Credentials read at run time (bearer tokens, TLS certificates, keys and CAs,
//! swapped by kubelet under a running agent) go through `read_capped` for the same reason: a
//! FIFO in their place froze every worker thread (issue #19 adversary).

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

/// State files are small JSON records; anything larger is not ours.
pub const MAX_STATE_FILE_BYTES: u64 = 16 << 20;

/// The whole text of the state file at `path`; NotFound when there is none.
pub fn read_to_string(path: &Path) -> std::io::Result<String> {
    read(path, nix::fcntl::OFlag::O_NONBLOCK)
}

/// As [`read_to_string`], and a symlink in the file's own place is refused, never read through
/// (what it points at is not a record the agent wrote): disks' `owned.json` and
/// `published.json` (#14-c). `O_NOFOLLOW` concerns the last component only, so a symlinked
/// state dir still works.
pub fn read_to_string_no_symlink(path: &Path) -> std::io::Result<String> {
    read(
        path,
        nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOFOLLOW,
    )
}

fn read(path: &Path, flags: nix::fcntl::OFlag) -> std::io::Result<String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
        .map_err(|e| refuse_symlink(e, path))?;
    regular(file, path).and_then(|f| {
        let mut text = String::new();
        f.take(MAX_STATE_FILE_BYTES + 1).read_to_string(&mut text)?;
        if text.len() as u64 > MAX_STATE_FILE_BYTES {
            return Err(std::io::Error::other(format!(
                "larger than {MAX_STATE_FILE_BYTES} bytes: not a nodekeeper state file"
            )));
        }
        Ok(text)
    })
}

/// At most `max_bytes` of the regular file at `path` (O_NONBLOCK open: a FIFO or device is
/// refused at once, never waited on); InvalidData when it is larger or not a regular file.
pub fn read_capped(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let file = regular(file, path)?;
    let mut bytes = Vec::new();
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is larger than {max_bytes} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// A lock file at `path`, created when missing, opened for writing (for `flock`).
pub fn open_lock(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    regular(file, path)
}

/// ELOOP from an `O_NOFOLLOW` open, said plainly.
fn refuse_symlink(e: std::io::Error, path: &Path) -> std::io::Error {
    if e.raw_os_error() != Some(nix::libc::ELOOP) {
        return e;
    }
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "{} is a symbolic link, not a regular file: refused (a state file must be a plain file)",
            path.display()
        ),
    )
}

/// Creates `path` for an atomic replace (written, fsynced, renamed by the caller): whatever
/// is there (a temp file from a crash, a planted symlink) is removed first and the file is
/// created `O_EXCL`, which never follows a symlink, so the agent never writes through one.
pub fn create_fresh(path: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// `file` when it is a regular file; else an error saying what it is instead.
fn regular(file: File, path: &Path) -> std::io::Result<File> {
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    let what = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "not a file"
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "{} is {what}, not a regular file: refused (state and credential files must be plain files)",
            path.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_capped_refuses_a_fifo_at_once_and_a_file_over_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("tls.crt");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = read_capped(&fifo, 1024).unwrap_err();
        assert!(err.to_string().contains("a FIFO"), "{err}");
        let big = dir.path().join("token");
        std::fs::write(&big, vec![b'a'; 1025]).unwrap();
        assert_eq!(
            read_capped(&big, 1024).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        std::fs::write(&big, b"secret").unwrap();
        assert_eq!(read_capped(&big, 1024).unwrap(), b"secret");
    }

    #[test]
    fn a_fifo_is_refused_at_once_for_reading_and_locking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("originals.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Without O_NONBLOCK both would block forever (no writer / no reader ever comes).
        let e = read_to_string(&fifo).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        assert!(e.to_string().contains("originals.json"), "{e}");
        assert!(open_lock(&fifo).is_err());
        let d = dir.path().join("sub");
        std::fs::create_dir(&d).unwrap();
        assert!(read_to_string(&d).is_err());
    }

    #[test]
    fn a_symlink_in_a_state_files_place_is_refused_and_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("someone-elses");
        std::fs::write(&target, "{}").unwrap();
        let link = dir.path().join("owned.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = read_to_string_no_symlink(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // A symlinked state dir is fine.
        let dir_link = dir.path().join("state");
        std::os::unix::fs::symlink(dir.path(), &dir_link).unwrap();
        assert_eq!(
            read_to_string_no_symlink(&dir_link.join("someone-elses")).unwrap(),
            "{}"
        );
        assert!(e.to_string().contains("owned.json"), "{e}");
        let tmp = dir.path().join("owned.tmp");
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        use std::io::Write as _;
        create_fresh(&tmp).unwrap().write_all(b"ours").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "{}");
        assert_eq!(std::fs::read_to_string(&tmp).unwrap(), "ours");
    }

    #[test]
    fn a_regular_file_is_read_and_a_missing_one_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.json");
        std::fs::write(&f, "{}").unwrap();
        assert_eq!(read_to_string(&f).unwrap(), "{}");
        assert!(open_lock(&f).is_ok());
        let missing = read_to_string(&dir.path().join("none")).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        assert!(open_lock(&dir.path().join("new.lock")).is_ok(), "created");
    }
}
