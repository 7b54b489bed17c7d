//! The node's file work: the snapshot and the rules kept across restarts,
//! read at start (a file that does not verify is moved aside, never fatal)
//! and written whole (a temporary file, fsync, rename).

use std::path::Path;

use drl_core::clock::SystemClock;
use drl_core::cluster::snapshot;
use drl_core::limiter::Limiter;
use drl_core::rules::RuleSet;
use drl_core::time::{Clock, Nanos};

use super::{rules_state, RulesVersion};

/// Why the snapshot found at start was not merged. Never fails the start:
/// the file is moved aside and the node recovers its counts from its peers.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotLoadError {
    #[error("snapshot {} unreadable", path.display())]
    /// The snapshot file could not be read.
    Read {
        /// The snapshot file.
        path: std::path::PathBuf,
        #[source]
        /// The I/O error.
        source: std::io::Error,
    },
    #[error("snapshot {} refused", path.display())]
    /// The snapshot file is corrupt, or from another cluster or layout.
    Refused {
        /// The snapshot file.
        path: std::path::PathBuf,
        #[source]
        /// Why it was refused.
        source: snapshot::SnapshotError,
    },
}

/// The rules kept at `path` by an earlier run, if they verify and parse. A
/// file that does not is reported and moved aside; the node then runs its
/// configured rules and adopts its peers' newer ones before it is ready.
pub(super) fn load_rules_state(path: &Path) -> Option<(RuleSet, RulesVersion)> {
    let refused = match rules_state::PersistedRules::load(path) {
        Ok(None) => return None,
        Ok(Some(kept)) => match RuleSet::from_toml(&kept.text) {
            Ok(rules) => {
                tracing::info!(
                    version = kept.version.counter,
                    origin = kept.version.origin,
                    "running the rules kept from before the restart"
                );
                return Some((rules, kept.version));
            }
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(
        ".corrupt-{}",
        SystemClock::raw().now().as_u64() / 1_000_000_000
    ));
    let moved = std::fs::rename(path, std::path::PathBuf::from(&aside));
    tracing::error!(
        path = %path.display(), reason = %refused, moved = moved.is_ok(),
        "kept rules refused and moved aside; running the configured rules"
    );
    None
}

/// What loading the snapshot at start came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotLoad {
    /// A verified snapshot was merged.
    pub restored: bool,
    /// The snapshot was refused (corrupt, unreadable, of another version or
    /// cluster) and moved to this path; the node recovers from its peers.
    pub moved_aside: Option<std::path::PathBuf>,
}

/// Merges the snapshot at `path`, if there is one and it verifies. A file
/// that cannot be read or verified is reported, moved aside as
/// `<path>.corrupt-<unix seconds>` (so the next snapshot does not overwrite
/// the evidence), and the node starts without it: its peers' recovery syncs
/// bring its counts back. Never fails the start.
pub(super) fn load_snapshot(limiter: &Limiter, path: &Path, now: Nanos) -> SnapshotLoad {
    let refused = match std::fs::read(path) {
        Ok(bytes) => match snapshot::restore(limiter, now, &bytes) {
            Ok(stats) => {
                tracing::info!(path = %path.display(), applied = stats.applied, "snapshot merged");
                return SnapshotLoad {
                    restored: true,
                    moved_aside: None,
                };
            }
            Err(source) => SnapshotLoadError::Refused {
                path: path.to_owned(),
                source,
            },
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return SnapshotLoad::default(),
        Err(source) => SnapshotLoadError::Read {
            path: path.to_owned(),
            source,
        },
    };
    let refused = error_chain(&refused);
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{}", now.as_u64() / 1_000_000_000));
    let aside = std::path::PathBuf::from(aside);
    match std::fs::rename(path, &aside) {
        Ok(()) => tracing::error!(
            path = %path.display(), moved_to = %aside.display(), reason = %refused,
            "snapshot refused and moved aside; recovering from peers"
        ),
        Err(e) => tracing::error!(
            path = %path.display(), reason = %refused, error = %e,
            "snapshot refused and could not be moved aside; recovering from peers"
        ),
    }
    SnapshotLoad {
        restored: false,
        moved_aside: Some(aside),
    }
}

/// An error and its sources, as one line: `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}

/// Modification time and length of a file, to notice changes.
pub(super) fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Writes `bytes` to `path` so that a crash at any moment leaves either the
/// previous file or the new one, whole: a temporary file in the same
/// directory, fsynced, renamed over `path`, then the directory fsynced so
/// the rename itself is durable.
pub(super) fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(&dir)?.sync_all()
}

pub(super) fn write_snapshot(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_durably(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_writes_replace_the_file_whole_and_leave_no_temporary() {
        let dir = std::env::temp_dir().join(format!("drl-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/state.bin");
        write_durably(&path, b"first").unwrap();
        write_durably(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.bin")]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
