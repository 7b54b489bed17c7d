//! Acknowledgements: every accepted delta, sync or recovery frame is
//! acknowledged at once (the sooner the sender hears, the sooner its
//! in-flight hits settle), and each acknowledgement echoes the frame's
//! timestamp, from which the sender estimates the peer's clock offset and
//! the round trip.

use super::{ReplicaStore, Replicator};
use crate::slot::NodeSlot;
use crate::time::Nanos;
use crate::wire::{Ack, Frame, Slots};

/// The four timestamps of one acknowledged frame, NTP's `t1..t4`: sent here,
/// received there, answered there, answer received here (each by the clock
/// of the node that took it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckTimes {
    pub sent: u64,
    pub received: u64,
    pub replied: u64,
    pub returned: u64,
}

impl AckTimes {
    /// The timestamps an acknowledgement carries, completed by its arrival.
    pub fn of(ack: &Ack, now: Nanos) -> Self {
        AckTimes {
            sent: ack.echo_sent_at,
            received: ack.received_at,
            replied: ack.replied_at,
            returned: now.as_u64(),
        }
    }

    /// `(offset, round trip)` of this sample; `None` when the timestamps
    /// cannot be a real exchange (nothing echoed, or time running backwards).
    pub fn sample(&self) -> Option<(i128, i128)> {
        let (t1, t2, t3, t4) = (
            i128::from(self.sent),
            i128::from(self.received),
            i128::from(self.replied),
            i128::from(self.returned),
        );
        if t1 > 0 && t4 >= t1 && t3 >= t2 {
            let offset = ((t2 - t1) + (t3 - t4)) / 2;
            let rtt = ((t4 - t1) - (t3 - t2)).max(0);
            Some((offset, rtt))
        } else {
            None
        }
    }
}

/// A peer's clock as seen from here: `peer clock − our clock`, smoothed,
/// the last round trip taken, and the shortest seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockEstimate {
    /// Estimated `peer clock − our clock`, in nanoseconds, smoothed.
    pub offset_ns: i64,
    /// The round trip of the last sample taken.
    pub rtt: Nanos,
    /// The shortest round trip seen (creeping up while samples are refused,
    /// so that a lasting change of path is adopted).
    pub floor: Nanos,
}

/// How much slower than the shortest round trip a sample may be and still
/// be taken: its offset error is at most half its round trip, so a sample
/// read late (a paused or starved process on either side) would move the
/// clock by up to half the pause.
const RTT_SLACK: Nanos = Nanos::from_millis(1);

/// What a refused sample adds to the floor, besides an eighth of it.
const FLOOR_CREEP: Nanos = Nanos::from_micros(100);

impl ClockEstimate {
    /// Folds in one acknowledgement: the first sample is taken as it is,
    /// later offsets move the estimate by an eighth of the difference.
    /// Samples that cannot be real change nothing, and a sample whose round
    /// trip exceeds twice the shortest seen plus a millisecond is refused
    /// (the minimum-delay filter of NTP, simplified): each refusal raises
    /// the floor by an eighth and 0.1 ms, however late the sample, so a
    /// lasting change of path is taken after a dozen or two samples while a
    /// burst of frames read late moves nothing.
    pub fn update(self, times: AckTimes) -> ClockEstimate {
        let Some((offset, rtt)) = times.sample() else {
            return self;
        };
        let rtt = Nanos::new(rtt as u64);
        if self.rtt == Nanos::ZERO {
            return ClockEstimate {
                offset_ns: offset as i64,
                rtt,
                floor: rtt,
            };
        }
        let floor = if self.floor == Nanos::ZERO {
            self.rtt
        } else {
            self.floor
        };
        if rtt > floor * 2 + RTT_SLACK {
            return ClockEstimate {
                floor: (floor + Nanos::new(floor.as_u64() / 8) + FLOOR_CREEP).min(rtt),
                ..self
            };
        }
        ClockEstimate {
            offset_ns: (i128::from(self.offset_ns) * 7 / 8 + offset / 8) as i64,
            rtt,
            floor: floor.min(rtt),
        }
    }
}

impl Replicator {
    /// The clock offsets (`peer clock − ours`, ns) of the peers that can
    /// speak for the cluster's time: live, connected, and measured at
    /// least once. What `cluster::clock_sync` steers by.
    pub fn clock_offsets(&self) -> impl Iterator<Item = i64> + '_ {
        self.peers
            .values()
            .filter(|p| p.live && p.connected && p.rtt > Nanos::ZERO)
            .map(|p| p.clock_offset_ns)
    }

    /// Our clock moved by `by_ns` (its correction changed): every peer's
    /// offset from it moves by as much the other way, at once, so that the
    /// smoothed estimates stay true instead of lagging the correction.
    pub fn shift_clock_estimates(&mut self, by_ns: i64) {
        for p in self.peers.values_mut() {
            p.clock_offset_ns = p.clock_offset_ns.saturating_sub(by_ns);
        }
    }

    /// Acknowledges a frame at once. The ack echoes the frame's timestamp.
    pub(super) fn note_received(&mut self, now: Nanos, from: NodeSlot, s: &Slots) {
        if self.peers.get(&from).is_some_and(|p| p.owed_sync) {
            // Not until it holds our state (see `PeerState::owed_sync`).
            return;
        }
        let ack = Frame::Ack(Ack {
            slot: self.cfg.own.get(),
            rounds: vec![s.round],
            echo_sent_at: s.sent_at,
            received_at: now.as_u64(),
            replied_at: now.as_u64(),
        });
        self.send(from, ack.encode(), false);
    }

    /// A peer acknowledged frames of ours: update its clock estimate, close
    /// the full sync it completes, and settle rounds nobody else waits on.
    pub(super) fn on_ack(
        &mut self,
        now: Nanos,
        from: NodeSlot,
        a: &Ack,
        store: &(impl ReplicaStore + ?Sized),
    ) {
        if a.echo_sent_at != 0 {
            self.note_acked(from, Nanos::new(a.echo_sent_at));
        }
        let times = AckTimes::of(a, now);
        if let Some(p) = self.peers.get_mut(&from) {
            if a.echo_sent_at >= p.clock_since.as_u64() {
                let est = p.clock().update(times);
                p.clock_offset_ns = est.offset_ns;
                p.rtt = est.rtt;
                p.rtt_floor = est.floor;
            }
        }
        let acked: Vec<u64> = a
            .rounds
            .iter()
            .flat_map(|r| self.aliases.remove(r).unwrap_or_else(|| vec![*r]))
            .collect();
        for original in acked {
            if let Some(sync) = self.peers.get_mut(&from).and_then(|p| p.sync_out.as_mut()) {
                if sync.pending.remove(&original).is_some() && sync.pending.is_empty() {
                    // The peer holds our whole state as of the sync's start.
                    let start = sync.start;
                    if let Some(p) = self.peers.get_mut(&from) {
                        p.sync_out = None;
                        p.needs_sync = false;
                        p.owed_sync = false;
                    }
                    self.stop_waiting_for(store, from, start);
                }
            }
            let Some(round) = self.rounds.get_mut(&original) else {
                continue;
            };
            round.waiting.remove(&from);
            if round.waiting.is_empty() {
                self.settle(original, store);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(sent: u64, received: u64, replied: u64, returned: u64) -> AckTimes {
        AckTimes {
            sent,
            received,
            replied,
            returned,
        }
    }

    #[test]
    fn offset_and_round_trip_come_from_the_four_timestamps() {
        // The peer runs 1,000 ns ahead; 200 ns each way; 50 ns to answer.
        let t = times(10_000, 11_200, 11_250, 10_450);
        assert_eq!(t.sample(), Some((1_000, 400)));
        let est = ClockEstimate::default().update(t);
        assert_eq!(est.offset_ns, 1_000);
        assert_eq!(est.rtt, Nanos::new(400));
    }

    #[test]
    fn later_samples_move_the_offset_by_an_eighth() {
        let first = ClockEstimate::default().update(times(10_000, 11_200, 11_250, 10_450));
        // Now the peer seems 9,000 ns ahead: the estimate moves 1/8 of the way.
        let second = first.update(times(20_000, 29_200, 29_250, 20_450));
        assert_eq!(second.offset_ns, 1_000 * 7 / 8 + 9_000 / 8);
        assert_eq!(second.rtt, Nanos::new(400));
    }

    #[test]
    fn a_sample_read_late_is_refused_and_a_lasting_slower_path_is_taken() {
        let ms = |n: u64| n * 1_000_000;
        // 400 ns round trips, the peer 1,000 ns ahead.
        let est = ClockEstimate::default().update(times(10_000, 11_200, 11_250, 10_450));
        // Read 200 ms late (a pause): the offset would jump by 100 ms.
        let late = times(ms(10), ms(210) + 1_200, ms(210) + 1_250, ms(210) + 1_450);
        let after = est.update(late);
        assert_eq!(after.offset_ns, est.offset_ns);
        assert_eq!(after.rtt, est.rtt);
        assert!(after.floor > est.floor);
        // A path that is 5 ms each way from now on is taken after a while.
        let mut e = after;
        let mut taken = None;
        for i in 0..200u64 {
            let t1 = ms(1_000 + i * 10);
            let next = e.update(times(
                t1,
                t1 + ms(5) + 1_000,
                t1 + ms(5) + 1_000,
                t1 + ms(10),
            ));
            if next.rtt == Nanos::new(ms(10)) && taken.is_none() {
                taken = Some(i);
            }
            e = next;
        }
        let taken = taken.expect("a lasting slower path is adopted");
        assert!((5..60).contains(&taken), "after {taken} samples");
        assert!((e.offset_ns - 1_000).abs() < 50, "{e:?}");
    }

    #[test]
    fn impossible_samples_change_nothing() {
        let est = ClockEstimate {
            offset_ns: 5,
            rtt: Nanos::new(9),
            floor: Nanos::new(9),
        };
        // Nothing echoed.
        assert_eq!(est.update(times(0, 1, 2, 3)), est);
        // The answer arrived before the frame left.
        assert_eq!(est.update(times(100, 1, 2, 50)), est);
        // Answered before it was received.
        assert_eq!(est.update(times(100, 9, 2, 150)), est);
    }
}
