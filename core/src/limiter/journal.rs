//! Keys changed locally since the last shipping round.
//!
//! The decision path journals a key the first time it dirties the key's entry
//! in a round (the entry's dirty bit says whether it already did), so a hot
//! key costs one journal push per round, not one per hit. The replicator
//! drains the journal every sync interval. Shards keep threads that dirty
//! different keys off each other's lock.

use std::sync::Mutex;

use crate::key::CounterKey;

const SHARDS: usize = 16;

/// `(limit id, key digest)` pairs waiting to be shipped.
#[derive(Debug)]
pub struct Journal {
    shards: [Mutex<Vec<CounterKey>>; SHARDS],
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            shards: std::array::from_fn(|_| Mutex::new(Vec::new())),
        }
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
}
