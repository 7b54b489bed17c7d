//! Keys changed locally since the last shipping round.
//!
//! The decision path journals a key the first time it dirties the key's entry
//! in a round (the entry's dirty bit says whether it already did), so a hot
//! key costs one journal push per round, not one per hit. The replicator
//! drains the journal every sync interval. Shards keep threads that dirty
//! different keys off each other's lock.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::key::CounterKey;

const SHARDS: usize = 16;

/// `(limit id, key digest)` pairs waiting to be shipped.
#[derive(Debug)]
pub struct Journal {
    shards: [Mutex<Vec<CounterKey>>; SHARDS],
    shipped: ShippedKeys,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            shards: std::array::from_fn(|_| Mutex::new(Vec::new())),
            shipped: ShippedKeys::default(),
        }
    }
}

/// The keys whose values the replicator took, kept for the node's
/// write-ahead journal while it is on.
///
/// A key is taken (its dirty bit cleared and its values read, under its
/// lock) once per shipping round after it changed; a change after that
/// marks it dirty again and it is taken in a later round. So the keys
/// taken, read again when the journal writes, cover every change of this
/// node's slots, and replication keeps its single dirty bit.
///
/// Rounds are counted so that a decision can wait for its own change to be
/// written: a change made while `started` reads `r` is taken by round
/// `r + 1` at the latest, and is among the kept keys once `sealed ≥ r + 1`.
#[derive(Debug, Default)]
pub struct ShippedKeys {
    on: AtomicBool,
    /// A set: a writer held up (a slow disk) must not see a hot key once
    /// per round it missed.
    keys: Mutex<HashSet<CounterKey>>,
    started: AtomicU64,
    sealed: AtomicU64,
}

impl ShippedKeys {
    /// Starts keeping taken keys (the journal's writer drains them).
    pub fn keep(&self) {
        self.on.store(true, Ordering::SeqCst);
    }
    /// Whether taken keys are kept.
    pub fn is_kept(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }
    /// A shipping round begins (the replicator drains the changed keys).
    pub fn begin_round(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }
    /// The replicator took `key`'s values in the current round.
    pub fn taken(&self, key: CounterKey) {
        if self.is_kept() {
            self.keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key);
        }
    }
    /// No round is under way: every round begun so far has been taken in
    /// full. Called by the task that runs the rounds, between them.
    pub fn seal(&self) {
        self.sealed
            .store(self.started.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    /// Rounds begun so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }
    /// Rounds taken in full so far.
    pub fn sealed(&self) -> u64 {
        self.sealed.load(Ordering::SeqCst)
    }
    /// Takes the kept keys, with the sealed rounds they include at least
    /// (read before the keys, so every key of those rounds is here).
    pub fn drain(&self) -> (u64, Vec<CounterKey>) {
        let sealed = self.sealed();
        let keys = std::mem::take(&mut *self.keys.lock().unwrap_or_else(|p| p.into_inner()));
        (sealed, keys.into_iter().collect())
    }
}

impl Journal {
    /// Journals `counter` for the next round. Callers push a key once per
    /// round, when they first dirty its entry.
    pub fn push(&self, counter: CounterKey) {
        self.shards[(counter.key.0 as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(counter);
    }

    /// Takes everything journaled so far, leaving the journal empty.
    pub fn drain(&self) -> Vec<CounterKey> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            if all.is_empty() {
                all = std::mem::take(&mut *s);
            } else {
                all.append(&mut s);
            }
        }
        all
    }

    /// The keys taken for shipping, for the write-ahead journal.
    pub fn shipped(&self) -> &ShippedKeys {
        &self.shipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{KeyDigest, LimitId};

    #[test]
    fn drain_takes_everything_once() {
        let j = Journal::default();
        for k in 0..100u64 {
            j.push(CounterKey::new(LimitId(7), KeyDigest(k)));
        }
        let mut got = j.drain();
        got.sort();
        assert_eq!(got.len(), 100);
        assert_eq!(got[99], CounterKey::new(LimitId(7), KeyDigest(99)));
        assert!(j.drain().is_empty());
    }

    #[test]
    fn shipped_keys_are_kept_only_when_asked_and_sealed_by_round() {
        let j = Journal::default();
        let key = CounterKey::new(LimitId(1), KeyDigest(2));
        let s = j.shipped();
        s.begin_round();
        s.taken(key);
        assert_eq!(s.drain(), (0, vec![]), "not kept yet");
        s.keep();
        s.begin_round();
        s.taken(key);
        // The round is under way: its keys are there but not sealed.
        assert_eq!(s.drain(), (0, vec![key]));
        s.taken(key);
        s.seal();
        assert_eq!(s.started(), 2);
        assert_eq!(s.drain(), (2, vec![key]));
        assert_eq!(s.drain(), (2, vec![]));
    }
}
