//! Writing sysctls all-or-nothing, recording originals (the journal), detecting drift,
//! reverting.
//!
//! Every write is read back (the kernel may clamp or refuse); the first failure restores every
//! key this apply already changed. Originals, and the values of the keys the kernel changes along
//! with a key (`dependants`), are persisted to the state dir *before* the first write, so a crash
//! mid-apply still knows what to restore; an original leaves the journal only after its restore
//! was read back. A restore that fails keeps it and is reported by key.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dependants;
use super::netns::NetnsIdentity;
use super::profile::{Desired, SysctlValue};

/// Larger than any sysctl value; bounds a read of a misconfigured path (e.g. a device node).
const MAX_VALUE_BYTES: u64 = 64 * 1024;

/// Longest wait for one read or write of a key file. A sysctl answers in microseconds; one that
/// blocks (a write waiting on rtnl, a handler stuck in a hung modprobe) must cost the pass at
/// most this, not the whole reconciler: the key is then quarantined and the pass goes on.
pub const KEY_IO_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A write was refused; every key changed before it was restored (but `unrestored`).
    #[error(
        "writing {key} = {value:?} failed: {error}; {rolled_back} earlier change(s) rolled back{}",
        not_restored(.unrestored)
    )]
    WriteFailed {
        key: String,
        value: String,
        error: String,
        rolled_back: usize,
        unrestored: Vec<String>,
    },
    /// The kernel accepted the write but kept another value (clamped); rolled back likewise.
    #[error(
        "{key}: wrote {wanted:?} but the kernel kept {got:?}; {rolled_back} change(s) rolled back{}",
        not_restored(.unrestored)
    )]
    NotAccepted {
        key: String,
        wanted: String,
        got: String,
        rolled_back: usize,
        unrestored: Vec<String>,
    },
    /// Reading a key failed.
    #[error("reading {key}: {error}")]
    Read { key: String, error: String },
    /// The originals file could not be read or written; nothing was changed.
    #[error("sysctl state {}: {error}", path.display())]
    State { path: PathBuf, error: String },
    /// Restoring some originals failed; they stay recorded and are retried.
    #[error("reverting failed, originals kept in the journal for: {}", .0.join("; "))]
    Revert(Vec<String>),
}

/// The tail of a rollback message: which keys are still changed (their originals stay recorded).
fn not_restored(unrestored: &[String]) -> String {
    if unrestored.is_empty() {
        String::new()
    } else {
        format!(
            "; NOT restored (originals kept in the journal for `nodekeeper sysctl revert`): {}",
            unrestored.join("; ")
        )
    }
}

impl ApplyError {
    /// Low-cardinality label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::WriteFailed { .. } => "write_failed",
            Self::NotAccepted { .. } => "not_accepted",
            Self::Read { .. } => "read_failed",
            Self::State { .. } => "state",
            Self::Revert(_) => "revert_failed",
        }
    }

    /// The one key this failure is about, when it is about one key (to quarantine it).
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::WriteFailed { key, .. }
            | Self::NotAccepted { key, .. }
            | Self::Read { key, .. } => Some(key),
            Self::State { .. } | Self::Revert(_) => None,
        }
    }

    /// Keys a rollback could not restore (`key: why`).
    pub fn unrestored(&self) -> &[String] {
        match self {
            Self::WriteFailed { unrestored, .. } | Self::NotAccepted { unrestored, .. } => {
                unrestored
            }
            _ => &[],
        }
    }
}

/// `/proc/sys` (or a test tree standing in for it).
#[derive(Debug, Clone)]
pub struct SysctlFs {
    root: PathBuf,
    /// Unit tests: path -> how many more writes succeed before each write fails with EIO.
    #[cfg(test)]
    pub faults: std::sync::Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
    /// Key files with a read or write still outstanding past its deadline: the next call on
    /// such a key fails at once, so a stuck key holds one thread, never a growing pile.
    stuck: Arc<Mutex<BTreeSet<PathBuf>>>,
}

impl SysctlFs {
    pub fn new(proc_root: &Path) -> Self {
        Self {
            root: proc_root.join("sys"),
            #[cfg(test)]
            faults: Default::default(),
            stuck: Default::default(),
        }
    }

    /// Runs `io` on the key file `file` on its own thread and waits at most `KEY_IO_DEADLINE`.
    /// Every read and write of a key goes through here: a file whose open, read or write
    /// blocks fails with `TimedOut` (and the caller quarantines the key) instead of blocking the
    /// pass; the thread is left to finish whenever the kernel lets it.
    fn with_deadline<T: Send + 'static>(
        &self,
        file: PathBuf,
        io: impl FnOnce(&Path) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let still_stuck = || {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "an earlier read or write of this key has not returned after {}s",
                    KEY_IO_DEADLINE.as_secs()
                ),
            )
        };
        if !self
            .stuck
            .lock()
            .expect("not poisoned")
            .insert(file.clone())
        {
            return Err(still_stuck());
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let stuck = Arc::clone(&self.stuck);
        let key = file.clone();
        let spawned = std::thread::Builder::new()
            .name("sysctl-key-io".into())
            .spawn(move || {
                let result = io(&file);
                // Released before the answer is sent: a caller that got it may call again.
                stuck.lock().expect("not poisoned").remove(&file);
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            // The closure (and its release of the key) never ran.
            self.stuck.lock().expect("not poisoned").remove(&key);
            return Err(e);
        }
        match rx.recv_timeout(KEY_IO_DEADLINE) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("blocked for more than {}s", KEY_IO_DEADLINE.as_secs()),
            )),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(std::io::Error::other("the key's I/O thread died"))
            }
        }
    }

    /// The file of a key path (`net/core/somaxconn`).
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }

    /// A file of the procfs this tree belongs to (`meminfo`, `loadavg`).
    pub fn proc_file(&self, name: &str) -> PathBuf {
        self.root.parent().unwrap_or(&self.root).join(name)
    }

    /// The key's current value, whitespace-normalised; None when the key does not exist.
    pub fn read(&self, path: &str) -> std::io::Result<String> {
        let text = self.with_deadline(self.root.join(path), |file| {
            let mut text = String::new();
            std::fs::File::open(file)?
                .take(MAX_VALUE_BYTES)
                .read_to_string(&mut text)?;
            Ok(text)
        })?;
        Ok(SysctlValue::normalise(&text))
    }

    pub fn exists(&self, path: &str) -> bool {
        self.root.join(path).is_file() || self.read(path).is_ok()
    }

    pub fn write(&self, path: &str, value: &str) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(left) = self.faults.lock().unwrap().get_mut(path) {
            if *left == 0 {
                return Err(std::io::Error::other("injected write failure"));
            }
            *left -= 1;
        }
        // One write(2) of the whole value: the kernel parses a sysctl per write call.
        let line = format!("{value}\n");
        self.with_deadline(self.root.join(path), move |file| {
            std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(file)?
                .write_all(line.as_bytes())
        })
    }

    /// Writes `value` and reads it back; Err says what went wrong.
    fn write_checked(&self, path: &str, value: &str) -> Result<(), String> {
        self.write(path, value).map_err(|e| e.to_string())?;
        match self.read(path) {
            Ok(got) if got == value => Ok(()),
            Ok(got) => Err(format!("wrote {value:?} but the kernel kept {got:?}")),
            Err(e) => Err(format!("reading back: {e}")),
        }
    }

    /// Current values of `paths` that exist.
    fn snapshot(&self, paths: &[String]) -> BTreeMap<String, String> {
        paths
            .iter()
            .filter_map(|p| self.read(p).ok().map(|v| (p.clone(), v)))
            .collect()
    }

    /// Writes `value` to `path`, then each dependant that no longer holds its value, reading
    /// every write back. A dependant that is gone (its interface was removed) needs nothing.
    /// `skip`: paths not to touch (keys a profile still sets).
    pub fn restore(
        &self,
        path: &str,
        value: &str,
        dependants: &BTreeMap<String, String>,
        skip: &BTreeSet<String>,
    ) -> Result<(), String> {
        self.write_checked(path, value)?;
        let mut failed = Vec::new();
        for (dep, old) in dependants {
            if skip.contains(dep) || !self.root.join(dep).exists() {
                continue;
            }
            if self.read(dep).ok().as_deref() == Some(old.as_str()) {
                continue;
            }
            if let Err(e) = self.write_checked(dep, old) {
                failed.push(format!("dependant {dep}: {e}"));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join(", "))
        }
    }
}

/// Who changed a key (and so who may put it back): the daemon reverts only its own entries
/// when they leave its profiles, a CLI `revert` only the CLI's unless `--all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    Daemon,
    Cli,
}

/// Which entries a revert restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only the entries of the store's holder.
    Own,
    /// Every entry, whoever recorded it (`nodekeeper sysctl revert --all`).
    All,
}

/// Original values of keys we changed, as they were before our first write.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Originals {
    /// Dotted key -> (path under /proc/sys, original value).
    pub keys: BTreeMap<String, (String, String)>,
    /// Dotted key -> the original values of the paths the kernel changes along with it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dependants: BTreeMap<String, BTreeMap<String, String>>,
    /// Dotted key -> who last applied it. A journal written before owners existed has none:
    /// [`OriginalsStore::load`] counts such entries as the CLI's (see docs/sysctl.md).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub owners: BTreeMap<String, Owner>,
    /// The network namespace (`net:[inode]`) the CLI recorded these originals in: replaying
    /// them from another namespace would write that one and leave this one changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// A `--netns` journal: the namespace it belongs to, beyond the inode in its file name
    /// (which the kernel reuses once the namespace is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_identity: Option<NetnsIdentity>,
}

impl Originals {
    /// The original already recorded for `path`, as a key's or as a dependant's.
    fn recorded(&self, path: &str) -> Option<String> {
        self.keys
            .values()
            .find(|(p, _)| p == path)
            .map(|(_, v)| v.clone())
            .or_else(|| {
                self.dependants
                    .values()
                    .find_map(|deps| deps.get(path).cloned())
            })
    }

    fn forget(&mut self, key: &str) {
        self.keys.remove(key);
        self.dependants.remove(key);
        self.owners.remove(key);
    }

    /// Who owns `key`'s entry; an entry without an owner (older journal) is the CLI's.
    pub fn owner(&self, key: &str) -> Owner {
        self.owners.get(key).copied().unwrap_or(Owner::Cli)
    }
}

/// The originals file in the state dir; `None` path = keep in memory only (pod netns, tests).
///
/// Holds an exclusive lock (`<journal>.lock`, flock) for its lifetime: the daemon keeps the
/// journal in memory and rewrites it whole, so a CLI `apply`/`revert` on the same journal at the
/// same time would lose originals. The second one is refused with a message, never blocked.
#[derive(Debug)]
pub struct OriginalsStore {
    path: Option<PathBuf>,
    pub originals: Originals,
    /// Who holds the journal: the owner of every entry it records or adopts.
    pub holder: Owner,
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// Takes the journal's lock without waiting.
fn lock(journal: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, ApplyError> {
    let lock_path = journal.with_extension("lock");
    let err = |error: String| ApplyError::State {
        path: lock_path.clone(),
        error,
    };
    if let Some(dir) = lock_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let file = crate::state_file::open_lock(&lock_path).map_err(|e| err(e.to_string()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            err(if errno == nix::errno::Errno::EWOULDBLOCK {
                "held by another nodekeeper (the daemon, or another sysctl command): its journal would be overwritten; stop it or wait".into()
            } else {
                errno.to_string()
            })
        },
    )
}

impl OriginalsStore {
    /// Binds a journal with originals to the namespace `current` (`net:[inode]`, lifetime
    /// `identity`) it was written in; refuses (nothing written) when this command runs in another
    /// one, or in a namespace that reuses the inode of the dead one it was written in (same boot,
    /// another cookie). Across a reboot the inode alone decides (the host's namespace is new
    /// after every boot and its journal must stay usable) and the identity is refreshed.
    pub fn bind_to_netns(
        &mut self,
        current: &str,
        identity: &NetnsIdentity,
    ) -> Result<(), ApplyError> {
        let recorded = !self.originals.keys.is_empty();
        let refuse = |error: String| ApplyError::State {
            path: self.path.clone().unwrap_or_default(),
            error,
        };
        match (&self.originals.netns, &self.originals.netns_identity) {
            (Some(owner), _) if recorded && owner != current => Err(refuse(format!(
                "its originals were recorded in network namespace {owner}, this command runs in {current}: run it there (or from the host with --netns)"
            ))),
            (Some(_), Some(then))
                if recorded
                    && then.boot_id == identity.boot_id
                    && then.cookie != identity.cookie =>
            {
                Err(refuse(format!(
                    "its originals were recorded in a network namespace that is gone (cookie {:?}); {current} reuses its inode (cookie {:?}): refusing to replay them here",
                    then.cookie, identity.cookie
                )))
            }
            _ => {
                self.originals.netns = Some(current.to_string());
                self.originals.netns_identity = Some(identity.clone());
                Ok(())
            }
        }
    }

    /// Binds a `--netns` journal to the namespace `current` it is used in. A journal recorded in
    /// another namespace (a dead one whose inode this one reuses) is discarded: its file is
    /// deleted and its originals, never applied here, are returned for the log. A journal with
    /// originals but no identity (an older nodekeeper) is refused where this kernel could tell:
    /// it cannot be told apart from a dead namespace's.
    pub fn bind_to_netns_identity(
        &mut self,
        current: &NetnsIdentity,
    ) -> Result<Option<Originals>, ApplyError> {
        let path = self.path.clone().unwrap_or_default();
        let stale = match &self.originals.netns_identity {
            Some(recorded) => recorded != current,
            None if self.originals.keys.is_empty() || current.cookie.is_none() => false,
            None => {
                return Err(ApplyError::State {
                    path,
                    error: "recorded without a namespace cookie (by an older nodekeeper): it cannot be told apart from a dead namespace that had this inode; if nodekeeper changed this namespace, restore its keys by hand from the file, then delete the file".into(),
                });
            }
        };
        let discarded = if stale {
            let dead = std::mem::take(&mut self.originals);
            if self.path.is_some() {
                std::fs::remove_file(&path).map_err(|e| ApplyError::State {
                    path: path.clone(),
                    error: format!("discarding a dead namespace's record: {e}"),
                })?;
            }
            tracing::warn!(journal = %path.display(), dead = ?dead.netns_identity, current = ?current, keys = ?dead.keys, "discarded the sysctl record of a dead network namespace that had this one's inode: its originals are never applied here");
            Some(dead)
        } else {
            None
        };
        self.originals.netns_identity = Some(current.clone());
        Ok(discarded)
    }

    /// Loads (and locks) the journal at `path` for `holder`. Entries without an owner (a journal
    /// from before owners existed) become the CLI's: the daemon then never reverts or forgets
    /// them unless it applies that key itself, and `nodekeeper sysctl revert` still restores them.
    pub fn load(path: Option<PathBuf>, holder: Owner) -> Result<Self, ApplyError> {
        Self::load_with(path, holder, true)
    }

    /// Unit tests: a second view of a journal another store holds (as the daemon).
    #[cfg(test)]
    pub fn load_unlocked(path: Option<PathBuf>) -> Result<Self, ApplyError> {
        Self::load_with(path, Owner::Daemon, false)
    }

    fn load_with(
        path: Option<PathBuf>,
        holder: Owner,
        take_lock: bool,
    ) -> Result<Self, ApplyError> {
        let lock = match &path {
            Some(p) if take_lock => Some(lock(p)?),
            _ => None,
        };
        let mut originals: Originals = match &path {
            Some(p) if p.exists() => {
                let text = crate::state_file::read_to_string(p).map_err(|e| ApplyError::State {
                    path: p.clone(),
                    error: e.to_string(),
                })?;
                serde_json::from_str(&text).map_err(|e| ApplyError::State {
                    path: p.clone(),
                    error: e.to_string(),
                })?
            }
            _ => Originals::default(),
        };
        let unowned: Vec<String> = originals
            .keys
            .keys()
            .filter(|k| !originals.owners.contains_key(*k))
            .cloned()
            .collect();
        if !unowned.is_empty() {
            tracing::warn!(keys = ?unowned, "sysctl journal entries without an owner (written by an older nodekeeper) count as the CLI's: the daemon will not revert them; `nodekeeper sysctl revert` does");
            for key in unowned {
                originals.owners.insert(key, Owner::Cli);
            }
        }
        Ok(Self {
            path,
            originals,
            holder,
            _lock: lock,
        })
    }

    /// Atomic replace (write a temp file, fsync, rename) so a crash never leaves half a file.
    fn persist(&self) -> Result<(), ApplyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let err = |e: std::io::Error| ApplyError::State {
            path: path.clone(),
            error: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(
            serde_json::to_string_pretty(&self.originals)
                .expect("serializes")
                .as_bytes(),
        )
        .map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

/// What one apply changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ApplyReport {
    /// (key, old value, new value)
    pub changed: Vec<(String, String, String)>,
    pub unchanged: usize,
}

/// One key this apply is about to change: its value before, and its dependants' values before.
struct Change<'a> {
    desired: &'a Desired,
    old: String,
    dependants_before: BTreeMap<String, String>,
    /// Its original was first recorded by this apply (so a good rollback forgets it again).
    newly_recorded: bool,
    /// Who owned its entry before this apply adopted it (a good rollback gives it back).
    previous_owner: Option<Owner>,
}

/// Applies every desired key or none. Keys already at their value are not written.
pub fn apply(
    fs: &SysctlFs,
    desired: &[Desired],
    store: &mut OriginalsStore,
) -> Result<ApplyReport, ApplyError> {
    let mut report = ApplyReport::default();
    let mut changes = Vec::new();
    for d in desired {
        let current = fs.read(&d.path).map_err(|e| ApplyError::Read {
            key: d.key.clone(),
            error: e.to_string(),
        })?;
        if current == d.value {
            report.unchanged += 1;
        } else {
            changes.push(Change {
                desired: d,
                dependants_before: fs.snapshot(&dependants::dependants(fs, &d.key)),
                newly_recorded: !store.originals.keys.contains_key(&d.key),
                previous_owner: store.originals.owners.get(&d.key).copied(),
                old: current,
            });
        }
    }
    if changes.is_empty() {
        return Ok(report);
    }
    // Propagating keys first, so a key the set names itself is written after the propagation.
    changes.sort_by_key(|c| !dependants::propagates(&c.desired.key));
    for c in &changes {
        let d = c.desired;
        // First original wins: a path an earlier apply already changed (as a key or as a
        // dependant) is journalled with the value recorded then, not the changed value now.
        let old = store
            .originals
            .recorded(&d.path)
            .unwrap_or_else(|| c.old.clone());
        let deps: BTreeMap<String, String> = c
            .dependants_before
            .iter()
            .map(|(p, v)| {
                let v = store.originals.recorded(p).unwrap_or_else(|| v.clone());
                (p.clone(), v)
            })
            .collect();
        store
            .originals
            .keys
            .entry(d.key.clone())
            .or_insert_with(|| (d.path.clone(), old));
        // Whoever writes a key now holds it at a value, so it is the one to put it back; the
        // original stays the first one recorded.
        store.originals.owners.insert(d.key.clone(), store.holder);
        if !deps.is_empty() {
            store
                .originals
                .dependants
                .entry(d.key.clone())
                .or_insert(deps);
        }
    }
    store.persist()?;

    for (i, c) in changes.iter().enumerate() {
        let d = c.desired;
        let failure = match fs.write(&d.path, &d.value) {
            Err(e) => Failure::Refused(e.to_string()),
            Ok(()) => match fs.read(&d.path) {
                Ok(got) if got == d.value => continue,
                Ok(got) => Failure::Kept(got),
                Err(e) => Failure::Kept(format!("<unreadable: {e}>")),
            },
        };
        // A kept (clamped) value means the write landed: restore this key too.
        // A vector key may be refused at a later element after the first ones were stored: a
        // refused write that changed the value at all landed, and is rolled back too.
        let partly_written = matches!(failure, Failure::Refused(_))
            && fs.read(&d.path).ok().as_deref() != Some(c.old.as_str());
        let landed = if matches!(failure, Failure::Kept(_)) || partly_written {
            i + 1
        } else {
            i
        };
        let (rolled_back, unrestored) = rollback(fs, &changes[..landed]);
        // Keys never written, or restored and read back, lose the original this apply recorded
        // and go back to their previous owner; a key whose restore failed keeps both, so
        // `revert` can still put it back.
        for c in &changes {
            let key = &c.desired.key;
            if unrestored.iter().any(|(k, _)| k == key) {
                continue;
            }
            match c.previous_owner {
                _ if c.newly_recorded => store.originals.forget(key),
                Some(owner) => {
                    store.originals.owners.insert(key.clone(), owner);
                }
                None => {
                    store.originals.owners.remove(key);
                }
            }
        }
        let persisted = store.persist();
        let unrestored: Vec<String> = unrestored
            .into_iter()
            .map(|(k, e)| format!("{k}: {e}"))
            .collect();
        persisted?;
        return Err(match failure {
            Failure::Kept(got) => ApplyError::NotAccepted {
                key: d.key.clone(),
                wanted: d.value.clone(),
                got,
                rolled_back,
                unrestored,
            },
            Failure::Refused(error) => ApplyError::WriteFailed {
                key: d.key.clone(),
                value: d.value.clone(),
                error,
                rolled_back,
                unrestored,
            },
        });
    }
    report.changed = changes
        .iter()
        .map(|c| {
            (
                c.desired.key.clone(),
                c.old.clone(),
                c.desired.value.clone(),
            )
        })
        .collect();
    Ok(report)
}

enum Failure {
    /// The write itself failed (EINVAL, EPERM...).
    Refused(String),
    /// The write succeeded but reading back shows another value.
    Kept(String),
}

/// Restores `written` keys (and their dependants) to their values before this apply, newest
/// first, reading each back. Returns how many were restored and (key, why) for the rest.
fn rollback(fs: &SysctlFs, written: &[Change]) -> (usize, Vec<(String, String)>) {
    let mut ok = 0;
    let mut failed = Vec::new();
    for c in written.iter().rev() {
        let d = c.desired;
        match fs.restore(&d.path, &c.old, &c.dependants_before, &BTreeSet::new()) {
            Ok(()) => ok += 1,
            Err(error) => {
                tracing::error!(key = %d.key, value = %c.old, %error, "rollback write failed: the key stays changed and its original stays in the journal");
                failed.push((d.key.clone(), error));
            }
        }
    }
    (ok, failed)
}

/// Keys whose current value differs from the desired one: (desired, actual).
pub fn drifted<'a>(fs: &SysctlFs, desired: &'a [Desired]) -> Vec<(&'a Desired, String)> {
    desired
        .iter()
        .filter_map(|d| match fs.read(&d.path) {
            Ok(v) if v != d.value => Some((d, v)),
            Ok(_) => None,
            Err(e) => Some((d, format!("<unreadable: {e}>"))),
        })
        .collect()
}

/// What a revert did, key by key.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RevertReport {
    pub restored: Vec<String>,
    /// (key, why): still changed, original still recorded.
    pub failed: Vec<(String, String)>,
    /// Entries of another owner, left alone (out of the revert's scope).
    pub others: usize,
}

/// Restores the original (and dependants) of every recorded key in `scope` not in `keep` and
/// not in `hold`, forgetting each one only once it reads back. Never stops at a failure: every
/// key is tried. Dependants that are themselves kept keys, or keys of another owner left
/// alone, are not touched.
pub fn revert(
    fs: &SysctlFs,
    store: &mut OriginalsStore,
    keep: &BTreeSet<String>,
    hold: &BTreeSet<String>,
    scope: Scope,
) -> Result<RevertReport, ApplyError> {
    let mut report = RevertReport::default();
    let originals = &store.originals;
    let in_scope = |key: &str| scope == Scope::All || originals.owner(key) == store.holder;
    let kept_paths: BTreeSet<String> = originals
        .keys
        .iter()
        .filter(|(k, _)| keep.contains(*k) || !in_scope(k))
        .map(|(_, (p, _))| p.clone())
        .chain(keep.iter().map(|k| super::profile::key_path(k).1))
        .collect();
    let targets: Vec<_> = originals
        .keys
        .iter()
        .filter(|(k, _)| in_scope(k))
        .filter(|(k, _)| !keep.contains(*k) && !hold.contains(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    report.others = originals.keys.keys().filter(|k| !in_scope(k)).count();
    for (key, (path, original)) in targets {
        let deps = store
            .originals
            .dependants
            .get(&key)
            .cloned()
            .unwrap_or_default();
        match fs.restore(&path, &original, &deps, &kept_paths) {
            Ok(()) => {
                store.originals.forget(&key);
                report.restored.push(key);
            }
            Err(error) => {
                tracing::error!(key, original, %error, "restoring the original failed: it stays recorded");
                report.failed.push((key, error));
            }
        }
    }
    if !report.restored.is_empty() {
        store.persist()?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> (tempfile::TempDir, SysctlFs) {
        let dir = tempfile::tempdir().unwrap();
        for (path, v) in files {
            let p = dir.path().join("sys").join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        }
        let fs = SysctlFs::new(dir.path());
        (dir, fs)
    }

    /// What `nodekeeper sysctl revert --all` does: every entry, nothing kept or held.
    fn revert_everything(
        fs: &SysctlFs,
        store: &mut OriginalsStore,
    ) -> Result<RevertReport, ApplyError> {
        revert(fs, store, &BTreeSet::new(), &BTreeSet::new(), Scope::All)
    }

    /// The journal's path in `dir` and a store on it (the daemon's).
    fn journal_in(dir: &tempfile::TempDir) -> (PathBuf, OriginalsStore) {
        let state = dir.path().join("state/originals.json");
        let store = OriginalsStore::load_unlocked(Some(state.clone())).unwrap();
        (state, store)
    }

    /// The journal as it is on disk now.
    fn on_disk(state: &Path) -> Originals {
        OriginalsStore::load_unlocked(Some(state.to_path_buf()))
            .unwrap()
            .originals
    }

    fn want(key: &str, value: &str) -> Desired {
        let (key, path) = super::super::profile::key_path(key);
        Desired {
            key,
            path,
            value: value.into(),
            profile: "p".into(),
            priority: 0,
        }
    }

    #[test]
    fn applies_records_originals_and_reverts() {
        let (dir, fs) = tree(&[("net/core/somaxconn", "4096\n"), ("vm/swappiness", "60\n")]);
        let (state, mut store) = journal_in(&dir);
        let r = apply(
            &fs,
            &[
                want("net.core.somaxconn", "8192"),
                want("vm.swappiness", "60"),
            ],
            &mut store,
        )
        .unwrap();
        assert_eq!(
            r.changed,
            vec![("net.core.somaxconn".into(), "4096".into(), "8192".into())]
        );
        assert_eq!(r.unchanged, 1);
        assert_eq!(fs.read("net/core/somaxconn").unwrap(), "8192");
        // Originals survive a restart (reload from disk), and a second change keeps the first original.
        let mut store = OriginalsStore::load_unlocked(Some(state.clone())).unwrap();
        apply(&fs, &[want("net.core.somaxconn", "16384")], &mut store).unwrap();
        assert_eq!(store.originals.keys["net.core.somaxconn"].1, "4096");
        let restored = revert_everything(&fs, &mut store).unwrap().restored;
        assert_eq!(restored, vec!["net.core.somaxconn".to_string()]);
        assert_eq!(fs.read("net/core/somaxconn").unwrap(), "4096");
        assert!(on_disk(&state).keys.is_empty());
    }

    #[test]
    fn a_key_that_blocks_times_out_and_holds_one_thread_not_a_pile() {
        let (dir, fs) = tree(&[("vm/ok", "1")]);
        let fifo = dir.path().join("sys/vm/stuck");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let first = fs.read("vm/stuck").unwrap_err();
        assert_eq!(first.kind(), std::io::ErrorKind::TimedOut, "{first}");
        assert!(
            first.to_string().contains("blocked for more than"),
            "{first}"
        );
        // The first open is still waiting: the next read and write are refused, not queued.
        let again = fs.read("vm/stuck").unwrap_err();
        assert!(again.to_string().contains("has not returned"), "{again}");
        let write = fs.write("vm/stuck", "2").unwrap_err();
        assert!(write.to_string().contains("has not returned"), "{write}");
        assert_eq!(fs.read("vm/ok").unwrap(), "1", "other keys still answer");
        // Release the stuck open (a writer that closes at once: EOF); the key is usable again.
        drop(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&fifo)
                .unwrap(),
        );
        std::fs::remove_file(&fifo).unwrap();
        std::fs::write(&fifo, "3").unwrap();
        let back = (0..200).find_map(|_| match fs.read("vm/stuck") {
            Ok(v) => Some(v),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                None
            }
        });
        assert_eq!(
            back.as_deref(),
            Some("3"),
            "released once the stuck call returned"
        );
    }

    #[test]
    fn drift_is_detected() {
        let (_dir, fs) = tree(&[("net/core/somaxconn", "4096\n")]);
        let d = [want("net.core.somaxconn", "4096")];
        assert!(drifted(&fs, &d).is_empty());
        fs.write("net/core/somaxconn", "128").unwrap();
        assert_eq!(drifted(&fs, &d)[0].1, "128");
    }

    fn fail_after(fs: &SysctlFs, path: &str, writes: usize) {
        fs.faults.lock().unwrap().insert(path.into(), writes);
    }

    #[test]
    fn a_rollback_that_fails_keeps_the_original_recorded_and_names_the_key() {
        let (dir, fs) = tree(&[("net/core/somaxconn", "4096\n"), ("vm/zz", "0\n")]);
        let (state, mut store) = journal_in(&dir);
        // somaxconn takes the apply's write but refuses the rollback's; vm.zz refuses at once.
        fail_after(&fs, "net/core/somaxconn", 1);
        fail_after(&fs, "vm/zz", 0);
        let e = apply(
            &fs,
            &[want("net.core.somaxconn", "8192"), want("vm.zz", "1")],
            &mut store,
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("vm.zz"));
        assert_eq!(e.unrestored().len(), 1, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("0 earlier change(s) rolled back")
                && text.contains("NOT restored")
                && text.contains("net.core.somaxconn: injected write failure"),
            "{text}"
        );
        assert_eq!(fs.read("net/core/somaxconn").unwrap(), "8192");
        let reloaded = OriginalsStore::load_unlocked(Some(state.clone())).unwrap();
        assert_eq!(
            reloaded.originals.keys["net.core.somaxconn"].1, "4096",
            "the original of a key still changed stays in the journal"
        );
        assert!(
            !reloaded.originals.keys.contains_key("vm.zz"),
            "a key never written is not recorded"
        );
        // Once the key can be written again, revert puts it back and only then forgets it.
        fs.faults.lock().unwrap().clear();
        let mut store = reloaded;
        let r = revert_everything(&fs, &mut store).unwrap();
        assert_eq!(r.restored, ["net.core.somaxconn"]);
        assert_eq!(fs.read("net/core/somaxconn").unwrap(), "4096");
        assert!(on_disk(&state).keys.is_empty());
    }

    #[test]
    fn a_restore_the_kernel_does_not_keep_is_a_failure_not_a_forgotten_original() {
        let (dir, fs) = tree(&[("net/core/somaxconn", "4096\n"), ("vm/swappiness", "60\n")]);
        let (state, mut store) = journal_in(&dir);
        apply(
            &fs,
            &[
                want("net.core.somaxconn", "8192"),
                want("vm.swappiness", "1"),
            ],
            &mut store,
        )
        .unwrap();
        // somaxconn now reads back empty whatever is written (a /dev/null stands in for it).
        let file = dir.path().join("sys/net/core/somaxconn");
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink("/dev/null", &file).unwrap();
        let r = revert_everything(&fs, &mut store).unwrap();
        assert_eq!(
            r.restored,
            ["vm.swappiness"],
            "every other key is still restored"
        );
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].0, "net.core.somaxconn");
        assert!(r.failed[0].1.contains("kernel kept"), "{:?}", r.failed);
        assert_eq!(
            on_disk(&state).keys.keys().collect::<Vec<_>>(),
            ["net.core.somaxconn"]
        );
    }

    #[test]
    fn dependants_are_recorded_before_the_write_and_restored_after_the_key() {
        let (dir, fs) = tree(&[
            ("net/ipv4/ip_forward", "0\n"),
            ("net/ipv4/conf/all/forwarding", "0\n"),
            ("net/ipv4/conf/all/accept_redirects", "1\n"),
            ("net/ipv4/conf/lo/forwarding", "1\n"),
            ("vm/zz", "0\n"),
        ]);
        let (state, mut store) = journal_in(&dir);
        apply(&fs, &[want("net.ipv4.ip_forward", "1")], &mut store).unwrap();
        let recorded = &store.originals.dependants["net.ipv4.ip_forward"];
        assert_eq!(recorded["net/ipv4/conf/lo/forwarding"], "1");
        assert_eq!(recorded["net/ipv4/conf/all/accept_redirects"], "1");
        // What the kernel does on the way back: ip_forward=0 sets every interface to 0.
        for p in [
            "net/ipv4/conf/lo/forwarding",
            "net/ipv4/conf/all/accept_redirects",
        ] {
            fs.write(p, "0").unwrap();
        }
        let r = revert_everything(&fs, &mut store).unwrap();
        assert_eq!(r.restored, ["net.ipv4.ip_forward"]);
        assert_eq!(fs.read("net/ipv4/conf/lo/forwarding").unwrap(), "1");
        assert_eq!(fs.read("net/ipv4/conf/all/accept_redirects").unwrap(), "1");
        assert!(on_disk(&state).dependants.is_empty());
    }

    #[test]
    fn each_holder_reverts_only_its_own_entries_and_all_reverts_every_one() {
        let (dir, fs) = tree(&[("net/core/somaxconn", "4096\n"), ("vm/swappiness", "60\n")]);
        let (state, mut daemon) = journal_in(&dir);
        apply(&fs, &[want("net.core.somaxconn", "8192")], &mut daemon).unwrap();
        let mut cli = OriginalsStore::load_unlocked(Some(state.clone())).unwrap();
        cli.holder = Owner::Cli;
        apply(&fs, &[want("vm.swappiness", "7")], &mut cli).unwrap();
        assert_eq!(on_disk(&state).owner("vm.swappiness"), Owner::Cli);
        // The daemon, restarted, no longer wants somaxconn: it restores its own key only.
        let (_, mut daemon) = journal_in(&dir);
        let none = BTreeSet::new();
        let r = revert(&fs, &mut daemon, &none, &none, Scope::Own).unwrap();
        assert_eq!(
            (r.restored, r.others),
            (vec!["net.core.somaxconn".into()], 1)
        );
        assert_eq!(
            fs.read("vm/swappiness").unwrap(),
            "7",
            "the CLI's key is left"
        );
        assert_eq!(
            on_disk(&state).keys["vm.swappiness"].1,
            "60",
            "and recorded"
        );
        // `revert --all` from the daemon's side (or the CLI's) takes everything.
        let r = revert(&fs, &mut daemon, &none, &none, Scope::All).unwrap();
        assert_eq!(r.restored, ["vm.swappiness"]);
        assert_eq!(fs.read("vm/swappiness").unwrap(), "60");
        assert_eq!(on_disk(&state), Originals::default());
    }

    #[test]
    fn a_key_applied_over_another_owners_entry_is_adopted_and_a_rollback_gives_it_back() {
        let (dir, fs) = tree(&[("vm/swappiness", "60\n"), ("vm/zz", "0\n")]);
        let (state, mut cli) = journal_in(&dir);
        cli.holder = Owner::Cli;
        apply(&fs, &[want("vm.swappiness", "7")], &mut cli).unwrap();
        drop(cli);
        let (_, mut daemon) = journal_in(&dir);
        // An attempt that fails on a later key rolls swappiness back to the CLI's 7: the CLI
        // still owns it.
        fail_after(&fs, "vm/zz", 0);
        apply(
            &fs,
            &[want("vm.swappiness", "10"), want("vm.zz", "1")],
            &mut daemon,
        )
        .unwrap_err();
        assert_eq!(fs.read("vm/swappiness").unwrap(), "7");
        assert_eq!(on_disk(&state).owner("vm.swappiness"), Owner::Cli);
        // Applied for good: the daemon holds it now, with the first original.
        apply(&fs, &[want("vm.swappiness", "10")], &mut daemon).unwrap();
        let journal = on_disk(&state);
        assert_eq!(journal.owner("vm.swappiness"), Owner::Daemon);
        assert_eq!(journal.keys["vm.swappiness"].1, "60", "first original wins");
    }

    #[test]
    fn entries_of_a_journal_without_owners_count_as_the_clis() {
        let (dir, fs) = tree(&[("vm/swappiness", "7\n")]);
        let state = dir.path().join("state/originals.json");
        std::fs::create_dir_all(state.parent().unwrap()).unwrap();
        std::fs::write(
            &state,
            r#"{"keys": {"vm.swappiness": ["vm/swappiness", "60"]}}"#,
        )
        .unwrap();
        let mut daemon = OriginalsStore::load(Some(state.clone()), Owner::Daemon).unwrap();
        assert_eq!(daemon.originals.owners["vm.swappiness"], Owner::Cli);
        let none = BTreeSet::new();
        let r = revert(&fs, &mut daemon, &none, &none, Scope::Own).unwrap();
        assert_eq!((r.restored.len(), r.others), (0, 1));
        assert_eq!(fs.read("vm/swappiness").unwrap(), "7");
        assert_eq!(on_disk(&state).keys["vm.swappiness"].1, "60");
    }

    #[test]
    fn a_namespace_journal_recorded_in_a_dead_namespace_is_discarded_never_used() {
        let (dir, fs) = tree(&[("net/core/somaxconn", "4096\n")]);
        let id = |boot: &str, cookie: Option<u64>| NetnsIdentity {
            boot_id: boot.into(),
            cookie,
        };
        let (state, mut store) = journal_in(&dir);
        assert!(
            store
                .bind_to_netns_identity(&id("b1", Some(7)))
                .unwrap()
                .is_none()
        );
        apply(&fs, &[want("net.core.somaxconn", "8192")], &mut store).unwrap();
        // The same namespace again: its record is used.
        let (_, mut store) = journal_in(&dir);
        assert!(
            store
                .bind_to_netns_identity(&id("b1", Some(7)))
                .unwrap()
                .is_none()
        );
        assert_eq!(store.originals.keys["net.core.somaxconn"].1, "4096");
        // Another namespace with the same inode (another cookie, or another boot): discarded.
        for other in [id("b1", Some(8)), id("b2", Some(7)), id("b2", None)] {
            let (_, mut store) = journal_in(&dir);
            let dead = store.bind_to_netns_identity(&other).unwrap().unwrap();
            assert_eq!(dead.keys["net.core.somaxconn"].1, "4096");
            assert!(store.originals.keys.is_empty(), "nothing of it is kept");
            assert!(!state.exists(), "its file is deleted");
            assert_eq!(
                revert_everything(&fs, &mut store).unwrap().restored.len(),
                0
            );
            assert_eq!(
                fs.read("net/core/somaxconn").unwrap(),
                "8192",
                "never applied"
            );
            // Put the dead record back for the next case.
            let (_, mut again) = journal_in(&dir);
            again.originals = dead;
            again.persist().unwrap();
        }
        // A record without an identity (older nodekeeper): refused where the kernel has cookies,
        // used where it has none (the inode is all there is).
        let (_, mut legacy) = journal_in(&dir);
        legacy.originals.netns_identity = None;
        legacy.persist().unwrap();
        let (_, mut store) = journal_in(&dir);
        let e = store
            .bind_to_netns_identity(&id("b1", Some(7)))
            .unwrap_err();
        assert!(e.to_string().contains("without a namespace cookie"), "{e}");
        assert!(state.exists(), "kept for the operator");
        let (_, mut store) = journal_in(&dir);
        assert!(
            store
                .bind_to_netns_identity(&id("b1", None))
                .unwrap()
                .is_none()
        );
        assert_eq!(store.originals.keys.len(), 1);
    }

    #[test]
    fn the_host_journal_is_refused_in_a_namespace_that_reuses_a_dead_ones_inode() {
        let (dir, fs) = tree(&[("net/core/somaxconn", "4096\n")]);
        let id = |boot: &str, cookie: u64| NetnsIdentity {
            boot_id: boot.into(),
            cookie: Some(cookie),
        };
        let (_, mut store) = journal_in(&dir);
        store.bind_to_netns("net:[9]", &id("b1", 7)).unwrap();
        apply(&fs, &[want("net.core.somaxconn", "8192")], &mut store).unwrap();
        let e = store.bind_to_netns("net:[8]", &id("b1", 7)).unwrap_err();
        assert!(
            e.to_string()
                .contains("recorded in network namespace net:[9]"),
            "{e}"
        );
        let e = store.bind_to_netns("net:[9]", &id("b1", 8)).unwrap_err();
        assert!(e.to_string().contains("is gone"), "{e}");
        store.bind_to_netns("net:[9]", &id("b1", 7)).unwrap();
        // After a reboot the inode decides, and the identity is the new boot's.
        store.bind_to_netns("net:[9]", &id("b2", 1)).unwrap();
        assert_eq!(store.originals.netns_identity, Some(id("b2", 1)));
        assert_eq!(store.originals.keys["net.core.somaxconn"].1, "4096");
    }

    #[test]
    fn a_second_holder_of_the_journal_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state/originals.json");
        let first = OriginalsStore::load(Some(state.clone()), Owner::Cli).unwrap();
        let e = OriginalsStore::load(Some(state.clone()), Owner::Cli).unwrap_err();
        assert!(e.to_string().contains("held by another nodekeeper"), "{e}");
        drop(first);
        OriginalsStore::load(Some(state), Owner::Cli).unwrap();
    }
}
