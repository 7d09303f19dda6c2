//! Writing sysctls all-or-nothing, recording originals, detecting drift, reverting.
//!
//! Every write is read back (the kernel may clamp or refuse); the first failure restores every
//! key this apply already changed. Originals are persisted to the state dir *before* the first
//! write, so a crash mid-apply still knows what to restore.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::profile::{Desired, SysctlValue};

/// Larger than any sysctl value; bounds a read of a misconfigured path (e.g. a device node).
const MAX_VALUE_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A write was refused; every key changed before it was restored.
    #[error(
        "writing {key} = {value:?} failed: {error}; {rolled_back} earlier change(s) rolled back"
    )]
    WriteFailed {
        key: String,
        value: String,
        error: String,
        rolled_back: usize,
    },
    /// The kernel accepted the write but kept another value (clamped); rolled back likewise.
    #[error(
        "{key}: wrote {wanted:?} but the kernel kept {got:?}; {rolled_back} change(s) rolled back"
    )]
    NotAccepted {
        key: String,
        wanted: String,
        got: String,
        rolled_back: usize,
    },
    /// Reading a key failed.
    #[error("reading {key}: {error}")]
    Read { key: String, error: String },
    /// The originals file could not be read or written; nothing was changed.
    #[error("sysctl state {}: {error}", path.display())]
    State { path: PathBuf, error: String },
    /// Restoring some originals failed; they stay recorded and are retried.
    #[error("reverting failed for: {}", .0.join("; "))]
    Revert(Vec<String>),
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
}

/// `/proc/sys` (or a test tree standing in for it).
#[derive(Debug, Clone)]
pub struct SysctlFs {
    root: PathBuf,
}

impl SysctlFs {
    pub fn new(proc_root: &Path) -> Self {
        Self {
            root: proc_root.join("sys"),
        }
    }

    /// The key's current value, whitespace-normalised; None when the key does not exist.
    pub fn read(&self, path: &str) -> std::io::Result<String> {
        let mut text = String::new();
        std::fs::File::open(self.root.join(path))?
            .take(MAX_VALUE_BYTES)
            .read_to_string(&mut text)?;
        Ok(SysctlValue::normalise(&text))
    }

    pub fn exists(&self, path: &str) -> bool {
        self.root.join(path).is_file() || self.read(path).is_ok()
    }

    pub fn write(&self, path: &str, value: &str) -> std::io::Result<()> {
        // One write(2) of the whole value: the kernel parses a sysctl per write call.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(self.root.join(path))?;
        f.write_all(format!("{value}\n").as_bytes())
    }
}

/// Original values of keys we changed, as they were before our first write.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Originals {
    /// Dotted key -> (path under /proc/sys, original value).
    pub keys: BTreeMap<String, (String, String)>,
}

/// The originals file in the state dir; `None` path = keep in memory only (pod netns, tests).
#[derive(Debug)]
pub struct OriginalsStore {
    path: Option<PathBuf>,
    pub originals: Originals,
}

impl OriginalsStore {
    pub fn load(path: Option<PathBuf>) -> Result<Self, ApplyError> {
        let originals = match &path {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p).map_err(|e| ApplyError::State {
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
        Ok(Self { path, originals })
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
            changes.push((d, current));
        }
    }
    if changes.is_empty() {
        return Ok(report);
    }
    let newly_recorded: Vec<String> = changes
        .iter()
        .filter(|(d, _)| !store.originals.keys.contains_key(&d.key))
        .map(|(d, _)| d.key.clone())
        .collect();
    for (d, current) in &changes {
        store
            .originals
            .keys
            .entry(d.key.clone())
            .or_insert_with(|| (d.path.clone(), current.clone()));
    }
    store.persist()?;

    let mut written: Vec<(&Desired, &String)> = Vec::new();
    for (d, old) in &changes {
        let outcome = match fs.write(&d.path, &d.value) {
            Err(e) => Err(Failure::Refused(e.to_string())),
            Ok(()) => match fs.read(&d.path) {
                Ok(got) if got == d.value => Ok(()),
                Ok(got) => Err(Failure::Kept(got)),
                Err(e) => Err(Failure::Kept(format!("<unreadable: {e}>"))),
            },
        };
        let failure = match outcome {
            Ok(()) => {
                written.push((d, old));
                continue;
            }
            Err(f) => f,
        };
        // A kept (clamped) value means the write landed: restore this key too.
        let mut to_restore = written.clone();
        if matches!(failure, Failure::Kept(_)) {
            to_restore.push((d, old));
        }
        let rolled_back = rollback(fs, &to_restore);
        for k in &newly_recorded {
            store.originals.keys.remove(k);
        }
        store.persist()?;
        return Err(match failure {
            Failure::Kept(got) => ApplyError::NotAccepted {
                key: d.key.clone(),
                wanted: d.value.clone(),
                got,
                rolled_back,
            },
            Failure::Refused(error) => ApplyError::WriteFailed {
                key: d.key.clone(),
                value: d.value.clone(),
                error,
                rolled_back,
            },
        });
    }
    report.changed = written
        .iter()
        .map(|(d, old)| (d.key.clone(), (*old).clone(), d.value.clone()))
        .collect();
    Ok(report)
}

enum Failure {
    /// The write itself failed (EINVAL, EPERM...).
    Refused(String),
    /// The write succeeded but reading back shows another value.
    Kept(String),
}

/// Restores `written` keys to their old values, newest first; returns how many succeeded.
fn rollback(fs: &SysctlFs, written: &[(&Desired, &String)]) -> usize {
    let mut ok = 0;
    for (d, old) in written.iter().rev() {
        match fs.write(&d.path, old) {
            Ok(()) => ok += 1,
            Err(e) => {
                tracing::error!(key = %d.key, value = %old, error = %e, "rollback write failed")
            }
        }
    }
    ok
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

/// Restores the original of every recorded key not in `keep`, forgetting each one restored.
/// Returns the keys restored.
pub fn revert(
    fs: &SysctlFs,
    store: &mut OriginalsStore,
    keep: &BTreeSet<String>,
) -> Result<Vec<String>, ApplyError> {
    let mut restored = Vec::new();
    let mut failed = Vec::new();
    let targets: Vec<_> = store
        .originals
        .keys
        .iter()
        .filter(|(k, _)| !keep.contains(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, (path, original)) in targets {
        match fs.write(&path, &original) {
            Ok(()) => {
                store.originals.keys.remove(&key);
                restored.push(key);
            }
            Err(e) => failed.push(format!("{key} = {original:?}: {e}")),
        }
    }
    if !restored.is_empty() {
        store.persist()?;
    }
    if failed.is_empty() {
        Ok(restored)
    } else {
        Err(ApplyError::Revert(failed))
    }
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
        let state = dir.path().join("state/originals.json");
        let mut store = OriginalsStore::load(Some(state.clone())).unwrap();
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
        let mut store = OriginalsStore::load(Some(state.clone())).unwrap();
        apply(&fs, &[want("net.core.somaxconn", "16384")], &mut store).unwrap();
        assert_eq!(store.originals.keys["net.core.somaxconn"].1, "4096");
        let restored = revert(&fs, &mut store, &BTreeSet::new()).unwrap();
        assert_eq!(restored, vec!["net.core.somaxconn".to_string()]);
        assert_eq!(fs.read("net/core/somaxconn").unwrap(), "4096");
        assert!(
            OriginalsStore::load(Some(state))
                .unwrap()
                .originals
                .keys
                .is_empty()
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
}
