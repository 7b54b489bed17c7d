//! The journal's segment files beside the snapshot, and their replay at
//! start.
//!
//! Segments are named `<snapshot file>.journal-<number>` (ten digits) in
//! the snapshot's directory. A segment is only ever appended to; the writer
//! starts a new one at each snapshot (and after a failed write), and
//! removes those before it once the snapshot is on disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use drl_core::cluster::wal;
use drl_core::key::KeySeed;
use drl_core::limiter::Limiter;
use drl_core::time::Nanos;

use super::journal::Segments;

/// Segment files on disk (see the module docs).
pub(crate) struct FileSegments {
    dir: PathBuf,
    prefix: String,
    seed: KeySeed,
    seq: u64,
    file: Option<File>,
}

fn prefix_of(snapshot: &Path) -> (PathBuf, String) {
    let dir = match snapshot.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = snapshot
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    (dir, format!("{name}.journal-"))
}

/// The segments beside `snapshot`, by number.
fn list(dir: &Path, prefix: &str) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let digits = name.strip_prefix(prefix)?;
            (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| Some((digits.parse().ok()?, e.path())))?
        })
        .collect();
    found.sort();
    found
}

impl FileSegments {
    /// Segments beside `snapshot`; the first one written is numbered `seq`.
    pub(crate) fn new(snapshot: &Path, seed: KeySeed, seq: u64) -> Self {
        let (dir, prefix) = prefix_of(snapshot);
        FileSegments {
            dir,
            prefix,
            seed,
            seq,
            file: None,
        }
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{}{seq:010}", self.prefix))
    }

    fn open(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            let mut f = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(self.path(self.seq))?;
            let started = f
                .write_all(&wal::segment_header(self.seed))
                // The new name must survive a crash along with what is
                // fsynced into it.
                .and_then(|()| File::open(&self.dir)?.sync_all());
            if let Err(e) = started {
                // Left torn in its header (removed at the next start); the
                // next attempt takes the next number.
                self.seq += 1;
                return Err(e);
            }
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }
}

impl Segments for FileSegments {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.open()?.write_all(bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    fn abandon(&mut self) {
        if self.file.take().is_some() {
            self.seq += 1;
        }
    }

    fn rotate(&mut self) -> io::Result<u64> {
        if self.file.take().is_some() {
            self.seq += 1;
        }
        Ok(self.seq)
    }

    fn remove_before(&mut self, seq: u64) -> io::Result<()> {
        for (n, path) in list(&self.dir, &self.prefix) {
            if n < seq {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    fn bytes(&self) -> u64 {
        list(&self.dir, &self.prefix)
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// What replaying the journal at start did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// Segments read.
    pub segments: u64,
    /// Records merged.
    pub records: u64,
    /// Values that raised a local value.
    pub applied: u64,
    /// Torn or corrupt tails cut (and segments torn in their header removed).
    pub tail_cuts: u64,
    /// Segments refused whole (another cluster, another format) and moved
    /// aside.
    pub refused: u64,
    /// The number the writer's first segment takes: above every segment
    /// found.
    pub next_seq: u64,
}

/// Replays every segment beside `snapshot` into the limiter, oldest first,
/// after the snapshot was merged. A torn or corrupt tail is cut off the
/// file (what precedes it stays); a segment that is not this cluster's
/// journal is moved aside as `<segment>.corrupt-<unix seconds>`. Never
/// fails the start.
pub(crate) fn recover(limiter: &Limiter, snapshot: &Path, now: Nanos) -> Recovered {
    let (dir, prefix) = prefix_of(snapshot);
    let mut out = Recovered::default();
    for (seq, path) in list(&dir, &prefix) {
        out.next_seq = out.next_seq.max(seq + 1);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "journal segment unreadable");
                continue;
            }
        };
        out.segments += 1;
        if bytes.len() < wal::HEADER_BYTES {
            // Torn while its header was written: it never held a record.
            out.tail_cuts += 1;
            tracing::warn!(path = %path.display(), bytes = bytes.len(), "journal segment torn in its header; removed");
            let _ = std::fs::remove_file(&path);
            continue;
        }
        match wal::replay(limiter, now, &bytes) {
            Ok(r) => {
                out.records += r.records;
                out.applied += r.applied;
                if let Some(fault) = r.fault {
                    out.tail_cuts += 1;
                    let cut = cut_at(&path, r.good_len);
                    tracing::warn!(
                        path = %path.display(), reason = %fault, kept_bytes = r.good_len,
                        cut_bytes = bytes.len() - r.good_len, cut = cut.is_ok(),
                        "journal tail cut"
                    );
                }
            }
            Err(e) => {
                out.refused += 1;
                let mut aside = path.as_os_str().to_owned();
                aside.push(format!(".corrupt-{}", now.as_u64() / 1_000_000_000));
                let moved = std::fs::rename(&path, PathBuf::from(&aside));
                tracing::error!(path = %path.display(), reason = %e, moved = moved.is_ok(), "journal segment refused and moved aside");
            }
        }
    }
    if out.segments > 0 {
        tracing::info!(
            segments = out.segments,
            records = out.records,
            applied = out.applied,
            tail_cuts = out.tail_cuts,
            "journal replayed"
        );
    }
    out
}

fn cut_at(path: &Path, len: usize) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(len as u64)?;
    f.sync_all()
}
