//! Runs a closure inside another network namespace, on a dedicated thread.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, and `/proc/sys/net` shows the namespace
//! of the thread that opens it; so the work runs on a fresh OS thread that enters the namespace
//! and exits afterwards. The tokio workers never change namespace.
//!
//! Identity: the namespace file is opened once ([`NetnsHandle::open`]); its device and inode are
//! the namespace's identity (what `/proc/PID/ns/net` reads as `net:[inode]`). Entering goes
//! through that open fd, never the path again (a PID reused meanwhile could name another
//! namespace, even the host's), and the thread checks after setns that it is in the namespace
//! it opened before running anything. The host's own namespace is refused.
//!
//! Lifetime: an inode is an identity only while the namespace lives; the kernel hands a freed
//! one to the next namespace. What outlives it in a journal is [`NetnsIdentity`]: the boot and
//! the namespace's cookie (`SO_NETNS_COOKIE`, Linux 5.14), which the kernel never reuses.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`) could not be opened.
    #[error("cannot open network namespace {}: {error}", path.display())]
    Open { path: PathBuf, error: String },
    /// setns(2) failed (needs CAP_SYS_ADMIN).
    #[error("cannot enter network namespace {}: {error}", path.display())]
    Enter { path: PathBuf, error: String },
    #[error("the thread working in network namespace {} panicked", path.display())]
    Panicked { path: PathBuf },
    /// The file names the host's namespace (init's, PID 1) or the one this process runs in.
    #[error("{} is the host's own network namespace ({id}); refusing to treat it as another one (omit --netns to work on the host)", path.display())]
    IsHost { path: PathBuf, id: String },
    /// The boot id or the namespace cookie could not be read.
    #[error("cannot tell which network namespace this is: {0}")]
    Identity(String),
    /// The namespace is not the one expected (a PID reused), or changed under the thread.
    #[error("network namespace {} is {found}, expected {expected}; refusing to touch it", path.display())]
    Changed {
        path: PathBuf,
        expected: String,
        found: String,
    },
}

/// A network namespace opened once: the fd that is entered and the identity it had when opened.
#[derive(Debug)]
pub struct NetnsHandle {
    path: PathBuf,
    file: std::fs::File,
    dev: u64,
    ino: u64,
}

/// The init process's namespace file: the host's network namespace.
const HOST_NETNS: &str = "/proc/1/ns/net";

/// The host's namespace: init's; where /proc/1 is not readable to us (some sandboxes hide
/// it even from root), the namespace of our topmost readable ancestor, the closest process to
/// init we can see.
fn host_identity() -> Option<(u64, u64)> {
    if let Ok(id) = identity(Path::new(HOST_NETNS)) {
        return Some(id);
    }
    let parent = |pid: &str| -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim();
        (ppid != "0").then(|| ppid.to_string())
    };
    let mut pid = "self".to_string();
    let mut found = identity(Path::new("/proc/self/ns/net")).ok();
    // Bounded: a racing exit could make the walk odd; the tree is never this deep.
    for _ in 0..64 {
        let Some(up) = parent(&pid) else { break };
        match identity(Path::new(&format!("/proc/{up}/ns/net"))) {
            Ok(id) => found = Some(id),
            Err(_) => break,
        }
        pid = up;
    }
    found
}

/// (device, inode) of a namespace file.
fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

impl NetnsHandle {
    /// Opens the namespace at `path` and refuses the namespace this process itself runs in.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let open_err = |e: std::io::Error| NetnsError::Open {
            path: path.to_path_buf(),
            error: e.to_string(),
        };
        let file = std::fs::File::open(path).map_err(open_err)?;
        let m = file.metadata().map_err(open_err)?;
        let handle = Self {
            path: path.to_path_buf(),
            file,
            dev: m.dev(),
            ino: m.ino(),
        };
        // The host's namespace is init's (PID 1), wherever this process runs: the CLI may
        // itself run inside another namespace (`ip netns exec`, `kubectl exec`), so comparing
        // with /proc/self only would accept `/proc/<host pid>/ns/net`. Our own namespace is
        // refused too.
        let own = identity(Path::new("/proc/self/ns/net")).ok();
        let target = (handle.dev, handle.ino);
        if host_identity() == Some(target) || own == Some(target) {
            return Err(NetnsError::IsHost {
                path: path.to_path_buf(),
                id: handle.id(),
            });
        }
        Ok(handle)
    }

    /// `net:[inode]`, as `readlink /proc/PID/ns/net` shows it.
    pub fn id(&self) -> String {
        format!("net:[{}]", self.ino)
    }

    /// A file name unique to this namespace while it lives: `<dev>-<inode>`.
    pub fn key(&self) -> String {
        format!("{}-{}", self.dev, self.ino)
    }

    /// Fails unless this is the namespace `expected` (`net:[inode]`) named when it was found.
    pub fn expect_id(&self, expected: &str) -> Result<(), NetnsError> {
        if self.id() == expected {
            Ok(())
        } else {
            Err(NetnsError::Changed {
                path: self.path.clone(),
                expected: expected.to_string(),
                found: self.id(),
            })
        }
    }

    /// Runs `f` on a fresh thread inside this namespace, entered through the fd opened earlier
    /// and checked (device + inode of the thread's own namespace) before `f` runs.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = self.file.try_clone().map_err(|e| NetnsError::Open {
            path: self.path.clone(),
            error: e.to_string(),
        })?;
        let (path, want) = (self.path.clone(), (self.dev, self.ino));
        let id = self.id();
        let handle = std::thread::Builder::new()
            .name("nodekeeper-ns-network".into())
            .spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NetnsError::Enter {
                        path: path.clone(),
                        error: e.to_string(),
                    }
                })?;
                match identity(Path::new("/proc/thread-self/ns/net")) {
                    Ok(found) if found == want => Ok(f()),
                    found => Err(NetnsError::Changed {
                        path,
                        expected: id,
                        found: match found {
                            Ok((_, ino)) => format!("net:[{ino}]"),
                            Err(e) => format!("unreadable ({e})"),
                        },
                    }),
                }
            })
            .expect("spawning a thread");
        handle.join().map_err(|_| NetnsError::Panicked {
            path: self.path.clone(),
        })?
    }
}

// === namespace lifetime identity ===

/// What tells one network namespace from every other this node had, dead ones included: its
/// inode does not (reused once the namespace is gone). `cookie` is `None` on kernels before
/// 5.14, where only a reboot (a new `boot_id`) tells a reused inode apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetnsIdentity {
    /// `/proc/sys/kernel/random/boot_id`: cookies and inodes start over at every boot.
    pub boot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<u64>,
}

/// The identity of the calling thread's network namespace (call it inside the namespace).
pub fn current_identity() -> Result<NetnsIdentity, NetnsError> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| NetnsError::Identity(format!("reading the boot id: {e}")))?
        .trim()
        .to_string();
    Ok(NetnsIdentity {
        boot_id,
        cookie: cookie::current()
            .map_err(|e| NetnsError::Identity(format!("SO_NETNS_COOKIE: {e}")))?,
    })
}

mod cookie {
    //! `getsockopt(SO_NETNS_COOKIE)` on a socket created in the calling thread's namespace.
    //!
    //! Neither nix, rustix nor socket2 name this option yet, and the agent forbids `unsafe`: the
    //! option is declared with nix's public `sockopt_impl!`, nix's own way to add an option it
    //! does not list. The `unsafe` getsockopt call is nix's (`GetStruct<u64>`: an 8-byte buffer,
    //! the returned length asserted); this module only supplies the level and the number.
    use nix::errno::Errno;
    use nix::libc; // the macro's expansion calls `libc::getsockopt`
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, getsockopt, socket};
    use nix::{getsockopt_impl, sockopt_impl}; // and these by their bare names

    /// `SO_NETNS_COOKIE` from include/uapi/asm-generic/socket.h (not yet in libc 0.2). Other
    /// values only on alpha, mips, parisc and sparc, where the cookie is not read.
    const SO_NETNS_COOKIE: libc::c_int = 71;

    sockopt_impl!(
        /// The cookie of the socket's network namespace.
        NetnsCookie,
        GetOnly,
        libc::SOL_SOCKET,
        SO_NETNS_COOKIE,
        u64
    );

    /// The calling thread's namespace cookie; `None` where the kernel (< 5.14) or the
    /// architecture does not offer it.
    pub fn current() -> Result<Option<u64>, Errno> {
        if !cfg!(any(
            target_arch = "x86_64",
            target_arch = "x86",
            target_arch = "aarch64",
            target_arch = "arm",
            target_arch = "riscv64",
            target_arch = "powerpc64",
            target_arch = "s390x",
            target_arch = "loongarch64"
        )) {
            return Ok(None);
        }
        // A socket belongs to the namespace of the thread that creates it.
        let socket = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        match getsockopt(&socket, NetnsCookie) {
            Ok(cookie) => Ok(Some(cookie)),
            Err(Errno::ENOPROTOOPT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Opens `path` and runs `f` inside it (see [`NetnsHandle`]).
pub fn in_netns<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    NetnsHandle::open(path)?.run(f)
}

/// Keys that `/proc/sys` scopes per network namespace on this kernel: everything under `net.`
/// except the few global ones (the unix socket limits are per-netns too, core rmem/wmem
/// defaults are not). `net.core.optmem_max` became per-namespace in Linux 6.9.
pub fn is_namespaced_on(key: &str, kernel_release: &str) -> bool {
    if key == "net.core.optmem_max" {
        return kernel_at_least(kernel_release, (6, 9));
    }
    is_namespaced(key)
}

/// As [`is_namespaced_on`] for a current kernel (config checks, before a kernel is known);
/// writes check [`is_namespaced_on`] with the running kernel.
pub fn is_namespaced(key: &str) -> bool {
    const GLOBAL_NET: &[&str] = &[
        "net.core.rmem_default",
        "net.core.rmem_max",
        "net.core.wmem_default",
        "net.core.wmem_max",
        "net.core.netdev_max_backlog",
        "net.ipv4.tcp_mem",
        "net.ipv4.udp_mem",
    ];
    key.starts_with("net.") && !GLOBAL_NET.contains(&key)
}

/// `6.18.44-fc` >= (6, 9); an unparsable release counts as old (the safe answer).
fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= want,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optmem_max_is_per_namespace_from_linux_6_9() {
        assert!(is_namespaced_on("net.core.optmem_max", "6.18.44-fc-v1272"));
        assert!(is_namespaced_on("net.core.optmem_max", "6.9.0"));
        assert!(!is_namespaced_on("net.core.optmem_max", "6.8.12-generic"));
        assert!(!is_namespaced_on("net.core.optmem_max", "5.15.0"));
        assert!(!is_namespaced_on("net.core.optmem_max", "garbage"));
        assert!(!is_namespaced_on("net.core.rmem_max", "6.18.0"));
        assert!(is_namespaced_on("net.core.somaxconn", "4.19.0"));
    }

    #[test]
    fn the_identity_is_stable_in_one_namespace_and_differs_in_another_as_root() {
        let here = current_identity().unwrap();
        assert_eq!(here, current_identity().unwrap(), "stable");
        assert_eq!(here.boot_id.len(), 36, "{here:?}");
        let cookie = here.cookie.expect("SO_NETNS_COOKIE (Linux >= 5.14)");
        // A thread that unshares gets a new namespace, and a new cookie; the boot is the same.
        let other = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map(|()| current_identity().unwrap())
        })
        .join()
        .unwrap();
        let Ok(other) = other else {
            eprintln!("skipped: unshare(CLONE_NEWNET) needs CAP_SYS_ADMIN");
            return;
        };
        assert_eq!(other.boot_id, here.boot_id);
        assert_ne!(other.cookie, Some(cookie), "{other:?} vs {here:?}");
        assert!(other.cookie.is_some());
    }

    #[test]
    fn the_hosts_own_namespace_is_refused() {
        let e = NetnsHandle::open(Path::new("/proc/self/ns/net")).unwrap_err();
        assert!(matches!(e, NetnsError::IsHost { .. }), "{e}");
        // Init's namespace by its own path, too (the CLI may run in another namespace).
        if std::fs::metadata(HOST_NETNS).is_ok() {
            let e = NetnsHandle::open(Path::new(HOST_NETNS)).unwrap_err();
            assert!(matches!(e, NetnsError::IsHost { .. }), "{e}");
        }
        assert!(
            e.to_string().contains("host's own network namespace"),
            "{e}"
        );
    }

    #[test]
    fn a_namespace_that_is_not_the_expected_one_is_refused() {
        // A handle whose recorded identity is not the namespace its fd holds (as when a PID
        // was reused between finding and opening): refused by id, and refused after setns.
        let handle = NetnsHandle {
            path: "/proc/self/ns/net".into(),
            file: std::fs::File::open("/proc/self/ns/net").unwrap(),
            dev: 0,
            ino: 1,
        };
        let e = handle.expect_id("net:[2]").unwrap_err();
        assert!(e.to_string().contains("expected net:[2]"), "{e}");
        // Entering through the fd lands in a namespace whose identity differs from the one
        // recorded at open: refused before the closure runs.
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let r = handle.run(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
        if let Err(NetnsError::Enter { .. }) = r {
            return; // not allowed to setns here (no CAP_SYS_ADMIN)
        }
        assert!(matches!(r, Err(NetnsError::Changed { .. })), "{r:?}");
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
