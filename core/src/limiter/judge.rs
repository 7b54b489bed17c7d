//! How one limit judges one locked key: on a lone limiter from the window
//! (or the memo a hot key's last decision left), counting admitted hits in
//! this node's slot; on a cluster node with the peers' in-flight shares
//! reserved, which says whether the request can be decided here or needs
//! the peers' confirmation.

use super::evaluate::CountsBuf;
use super::table::{Entry, MAX_INFLIGHT};
use crate::algorithm::{Algorithm, RateAlgorithm, Summary, Verdict};
use crate::share::{ShareView, Shares, SlotTotals};
use crate::slot::NodeSlot;
use crate::time::Nanos;
use crate::window::{Ring, SlotGrid, WindowCounts};

/// What a clustered decision found.
pub(super) struct Shared {
    /// The verdict to report: the merged counts' own, without the peers'
    /// reservations (so `remaining` is what is really left).
    pub(super) verdict: Verdict,
    /// The request fits the merged counts but not with the peers' shares
    /// reserved (or the key is under confirmation): ask the peers.
    pub(super) confirm: bool,
    /// This node's in-flight share of the key is spent.
    pub(super) capped: bool,
}

/// The verdict of `algorithm` on `cost` more hits on the locked `entry` of
/// a limiter with no peers, and for a window algorithm the window's summary
/// before them. A hot key decides from the summary its last decision left,
/// without reading the window (see `table`).
#[inline]
pub(super) fn judge_alone(
    entry: &Entry<'_>,
    algorithm: &Algorithm,
    now: Nanos,
    cost: u32,
    counts: &mut CountsBuf,
) -> (Verdict, Option<Judged>) {
    let spec = entry.spec();
    let now_epoch = spec.epoch(now);
    if let Some(s) = entry.memo(now_epoch) {
        if let Some(verdict) = algorithm.admit_summary(now, now_epoch, s, cost) {
            let judged = Judged {
                summary: s,
                epoch: now_epoch,
                from_memo: true,
            };
            return (verdict, Some(judged));
        }
    }
    let nets = counts.get(spec.buckets());
    Ring::read(entry, &spec, now, nets);
    let judged = algorithm.reads_summary().then(|| Judged {
        summary: Summary::of(nets),
        epoch: now_epoch,
        from_memo: false,
    });
    let verdict = algorithm.decide(&WindowCounts { spec, now, nets }, cost);
    (verdict, judged)
}

/// What [`judge_alone`] saw of a window algorithm's key.
#[derive(Clone, Copy)]
pub(super) struct Judged {
    /// The window's summary before the request.
    summary: Summary,
    /// The bucket of now.
    epoch: u64,
    /// Decided from the key's memo: its newest bucket is `epoch`.
    from_memo: bool,
}

/// Counts `cost` admitted hits in this node's slot of the locked `entry`
/// and returns their bucket's epoch. Given what the decision saw of a
/// window algorithm's key, leaves the summary after them for the next one.
#[inline]
pub(super) fn count_hit(
    entry: &mut Entry<'_>,
    now: Nanos,
    own: NodeSlot,
    cost: u32,
    judged: Option<Judged>,
) -> u64 {
    let spec = entry.spec();
    let Some(mut j) = judged else {
        return Ring::add(entry, &spec, now, own, cost);
    };
    // The hits just counted land in the current bucket.
    j.summary.newer = j.summary.newer.saturating_add(u64::from(cost));
    if j.from_memo {
        let row = Ring::row_of_newest(entry, &spec, j.epoch);
        entry.add_p_keeping_memo(row, own.index(), cost, j.summary.newer);
        return j.epoch;
    }
    let epoch = Ring::add(entry, &spec, now, own, cost);
    entry.set_memo(j.epoch, j.summary);
    epoch
}

/// A decision on a cluster node (see `share`). A request that the merged
/// counts refuse is refused (counts only grow: exact). One that fits even
/// with every peer's in-flight share counted as already arrived, and within
/// this node's own in-flight share, is admitted at once. Anything else is
/// near the limit: with `can_confirm` it is confirmed with the peers
/// (exact, one round trip), otherwise refused for one acknowledgement wait.
#[allow(clippy::too_many_arguments)]
pub(super) fn decide_shared(
    view: &ShareView,
    algorithm: &Algorithm,
    entry: &Entry<'_>,
    nets: &mut [u64],
    now: Nanos,
    cost: u32,
    confirming: bool,
    can_confirm: bool,
) -> Shared {
    let spec = entry.spec();
    let plain = algorithm.decide(&WindowCounts { spec, now, nets }, cost);
    let done = |verdict| Shared {
        verdict,
        confirm: false,
        capped: false,
    };
    if view.members.is_just(NodeSlot::new(view.own)) || cost == 0 {
        // Alone: nobody to reserve for, nobody to wait for. A status query
        // (cost 0) counts nothing.
        return done(plain);
    }
    let Verdict::Allow {
        remaining,
        reset_after,
    } = plain
    else {
        return done(plain);
    };
    let near = |capped| {
        if can_confirm {
            Shared {
                verdict: plain,
                confirm: true,
                capped,
            }
        } else {
            Shared {
                verdict: Verdict::Deny {
                    remaining,
                    retry_after: view.ack_wait,
                    reset_after,
                },
                confirm: false,
                capped,
            }
        }
    };
    if confirming || view.confirm_all {
        return near(false);
    }
    let quota = algorithm.quota();
    let mut totals = SlotTotals::from_elem(0, view.members.width().min(entry.slot_count()));
    Ring::slot_hits(entry, &spec, now, &mut totals);
    let shares = Shares::new(
        view,
        view.budget(quota, u64::from(MAX_INFLIGHT)),
        quota,
        &totals,
    );
    let reserved = shares.reserved();
    let fits = match nets.last_mut() {
        Some(last) => {
            *last += reserved;
            let v = algorithm.decide(&WindowCounts { spec, now, nets }, cost);
            if let Some(last) = nets.last_mut() {
                *last -= reserved;
            }
            v.is_allowed()
        }
        None => false,
    };
    if !fits {
        return near(false);
    }
    let inflight = u64::from(entry.inflight());
    // What every peer this node waits for has surely seen of it.
    let acked = totals
        .get(usize::from(view.own))
        .copied()
        .unwrap_or(0)
        .saturating_sub(inflight);
    if inflight + u64::from(cost) > shares.own_cap(acked) {
        return near(true);
    }
    done(plain)
}
