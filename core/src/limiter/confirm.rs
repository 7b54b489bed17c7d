//! The limiter's side of confirmation near a limit: the provisional hits
//! of a request waiting for its peers' answers, the judgement once they
//! have answered, and the holds that make a node decide a key by
//! confirmation while a peer's claim on it may be undecided.
//!
//! The protocol itself (tickets, claims, answers, timeouts, yields) is the
//! cluster's: `cluster::confirm`. This module only reads and writes counts.
//! Without the `cluster` feature nothing confirms, and most of it is unused.
#![cfg_attr(not(feature = "cluster"), allow(dead_code))]

use std::sync::atomic::Ordering;

use super::decision::{Decided, Decision, Outcome, QuotaState};
use super::evaluate::CountsBuf;
use super::table::{Entry, MAX_INFLIGHT};
use super::{Compiled, Limiter};
use crate::rules::CompiledLimit;
use std::sync::Arc;

use crate::algorithm::RateAlgorithm;
use crate::key::{CounterKey, KeyDigest, LimitId};
use crate::peer_set::PeerSet;
use crate::rules::request::RequestLimit;
use crate::share::{Shares, SlotTotals};
use crate::slot::NodeSlot;
use crate::time::{Clock, Nanos};
use crate::window::{Ring, SlotGrid, WindowCounts};

/// How long a key stays under confirmation after a claim, unless the node
/// says otherwise: twice the default claim timeout.
pub const DEFAULT_CONFIRM_HOLD: Nanos = Nanos::from_millis(100);

/// Most peers' claims remembered per held key; older ones are forgotten
/// (a forgotten claim only makes a conflict end in two refusals).
const MAX_HELD_CLAIMS: usize = 8;

/// A key under confirmation: until when, and the peers' claims on it that
/// may still be undecided (`(slot, when the claim's hit was counted, until
/// when it can be pending)`), which decide who yields in a conflict.
#[derive(Clone, Debug, Default)]
pub(super) struct Hold {
    until: Nanos,
    claims: Vec<(u16, Nanos, Nanos)>,
}

/// Hits counted provisionally by `Limiter::begin_at`: the request is
/// admitted only if, once every peer it waits for has answered with its own
/// counts, the limits still allow it (`Limiter::finish_or_yield_at`);
/// otherwise the hits are given back.
#[derive(Clone, Debug)]
pub struct Pending {
    /// Hits charged by each check of the request.
    pub costs: Vec<u32>,
    /// The limit each check carries, if any (see `Check::limit`).
    pub limits: Vec<Option<Arc<RequestLimit>>>,
    /// When the hits were counted.
    pub started: Nanos,
    /// The provisional hits, one per check and applicable limit, in the
    /// lock order.
    pub hits: Vec<PendingHit>,
    /// What the request would be answered if admitted (its quota report).
    pub provisional: Decided,
    /// When `Limiter::finish_or_yield_at` judged it (and where its hits
    /// now sit): the arrival, or the start of a later bucket if the ring
    /// moved on.
    pub judged_at: Nanos,
}

impl Pending {
    pub(super) fn new(costs: &[u32], started: Nanos, provisional: Decided) -> Self {
        Pending {
            costs: costs.to_vec(),
            limits: vec![None; costs.len()],
            started,
            hits: Vec::new(),
            provisional,
            judged_at: started,
        }
    }

    /// The `(limit, key)` pairs the request holds hits on, each once.
    pub fn keys(&self) -> Vec<CounterKey> {
        let mut keys: Vec<CounterKey> = self
            .hits
            .iter()
            .map(|h| CounterKey::new(h.limit, h.key))
            .collect();
        keys.dedup();
        keys
    }
}

/// One provisional hit: where it was counted, and for which check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingHit {
    /// The limit's stable id.
    pub limit: LimitId,
    /// The key's digest.
    pub key: KeyDigest,
    /// The epoch of the window bucket the hit was counted in.
    pub epoch: u64,
    /// The check of the request it was counted for.
    pub check: u32,
    /// Hits counted.
    pub cost: u32,
    /// The index of the rules' limit it was counted for (`u32::MAX` for a
    /// limit the check carried).
    pub index: u32,
}

/// How a confirmed request ended, or why its decision must wait a little.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finished {
    /// The request's final decision; if allowed, its hits stay counted.
    Decided(Decided),
    /// Refused as things stand, but peers hold claims on
    /// the same keys that were counted later than this one and may still be
    /// undecided: their losers give their hits back at once, so decide
    /// again when a frame from one of them arrives (or refuse at the
    /// claim's deadline). The earlier claim wins a conflict, as a single
    /// node deciding in arrival order would.
    Yield {
        /// The peer slots whose claims this request waits on.
        blocking: PeerSet,
    },
}

impl<C: Clock> Limiter<C> {
    /// Decides a request that `Limiter::begin_at` counted provisionally,
    /// once the peers have answered: `answered` is the set of peer slots
    /// whose answers carried their own counts of the keys,
    /// or `None` when they did not all answer in time. Peers the view
    /// reserves for that did not answer (declared dead, under `strict`) are
    /// counted at their in-flight share. Admitted hits stay counted; refused
    /// ones are given back.
    ///
    /// The request is judged as of when it arrived (`pending.started`, where
    /// its hit was counted) on everything known now: hits that arrived since
    /// count as if already there, which can only refuse more, so the
    /// judgement is as safe as one made now, and the admitted history is
    /// what the algorithm would have seen had the answers been instant.
    ///
    /// A refusal caused by peers' claims counted later than this one (while
    /// they may still be undecided) is answered with [`Finished::Yield`]
    /// when `may_yield`: nothing is given back, and the caller decides
    /// again after hearing from them.
    pub(crate) fn finish_or_yield_at(
        &self,
        now: Nanos,
        pending: &mut Pending,
        answered: Option<&PeerSet>,
        may_yield: bool,
    ) -> Finished {
        let Some(answered) = answered else {
            self.give_back(now, pending);
            return Finished::Decided(self.denied_for_now(pending));
        };
        let compiled = self.compiled.load();
        let view = self.cluster.as_ref().map(|c| c.view.load_full());
        let several = pending.costs.len() != 1;
        let mut overall = Decision::UNLIMITED;
        let mut each = if several {
            vec![Decision::UNLIMITED; pending.costs.len()]
        } else {
            Vec::new()
        };
        let mut counts = CountsBuf::new();
        let mut judged_at = pending.started;
        let own = self.config.own_slot;
        let mut start = 0;
        while start < pending.hits.len() {
            let first = pending.hits[start];
            let len = pending.hits[start..]
                .iter()
                .take_while(|h| h.limit == first.limit && h.key == first.key)
                .count();
            let group = start..start + len;
            start += len;
            // The counter's table (a limit removed by a reload in the
            // meantime no longer applies).
            let Some(table) = self.table_by_id(first.limit) else {
                continue;
            };
            let spec = *table.spec();
            let Some(mut entry) = table.get(first.key) else {
                continue;
            };
            // As of the arrival, unless a later hit has since moved the
            // ring on and wiped a bucket that window needs: then as of the
            // start of the newest bucket (the earliest moment the ring still
            // holds whole).
            let newest = entry.newest(spec.epoch(now));
            let at = pending.started.max(spec.epoch_start(newest)).min(now);
            let mut cost = 0u32;
            for hit in &mut pending.hits[group.clone()] {
                cost = cost.saturating_add(hit.cost);
                if spec.epoch(at) != hit.epoch {
                    // Judged later than it was counted: count it where it is
                    // judged, as the algorithm would place it.
                    Ring::refund_epoch(&mut entry, &spec, now, own, hit.epoch, hit.cost);
                    hit.epoch = Ring::add(&mut entry, &spec, at, own, hit.cost);
                    if entry.mark_dirty() {
                        if let Some(c) = &self.cluster {
                            c.journal.push(CounterKey::new(hit.limit, hit.key));
                        }
                    }
                }
            }
            judged_at = judged_at.max(at);
            let nets = counts.get(spec.buckets());
            Ring::read(&entry, &spec, at, nets);
            // Judge the request as if not yet counted.
            if let Some(i) = Ring::read_index(&spec, at, spec.epoch(at)) {
                nets[i] = nets[i].saturating_sub(u64::from(cost));
            }
            let reads = nets.to_vec();
            // Every hit is judged by its own limit (the checks of one request
            // may reach one counter through different lists of a rule).
            for hit in &pending.hits[group] {
                let Some(limit) = self.limit_of(&compiled, pending, hit) else {
                    continue;
                };
                let nets = counts.get(spec.buckets());
                nets.copy_from_slice(&reads);
                if let Some(view) = view.as_deref() {
                    let mut silent = view.reserve.difference(answered);
                    silent.remove(NodeSlot::new(view.own));
                    if !silent.is_empty() {
                        let mut totals =
                            SlotTotals::from_elem(0, view.members.width().min(entry.slot_count()));
                        Ring::slot_hits(&entry, &spec, at, &mut totals);
                        let quota = limit.algorithm.quota();
                        let shares = Shares::new(
                            view,
                            view.budget(quota, u64::from(MAX_INFLIGHT)),
                            quota,
                            &totals,
                        );
                        if let Some(last) = nets.last_mut() {
                            *last += shares.reserved_for(&silent);
                        }
                    }
                }
                let verdict = limit.algorithm.decide(
                    &WindowCounts {
                        spec,
                        now: at,
                        nets,
                    },
                    cost,
                );
                overall.absorb(limit, verdict);
                if several {
                    each[hit.check as usize].absorb(limit, verdict);
                }
            }
        }
        // Checks whose limits were all far from full kept no hit here: they
        // are reported as they were decided.
        if several {
            for (decision, provisional) in each.iter_mut().zip(pending.provisional.each()) {
                if decision.quota.is_none() {
                    *decision = *provisional;
                }
            }
        } else if overall.quota.is_none() {
            overall = pending.provisional.decision();
        }
        if several {
            overall = each.iter().fold(Decision::UNLIMITED, |mut o, d| {
                o.absorb_decision(d);
                o
            });
        }
        pending.judged_at = judged_at;
        // Waits were computed from the judgement; the answer leaves now.
        let waited = now.saturating_sub(judged_at);
        for d in std::iter::once(&mut overall).chain(each.iter_mut()) {
            if let Some(q) = d.quota.as_mut() {
                q.reset_after = q.reset_after.saturating_sub(waited);
                if q.retry_after != Nanos::MAX {
                    q.retry_after = q.retry_after.saturating_sub(waited);
                }
            }
        }
        if overall.outcome == Outcome::Denied && may_yield {
            let blocking = self.later_claims(now, pending);
            if !blocking.is_empty() {
                return Finished::Yield { blocking };
            }
        }
        if overall.outcome != Outcome::Allowed {
            self.give_back(now, pending);
            for (decision, &cost) in each.iter_mut().zip(&pending.costs) {
                if decision.is_allowed() {
                    *decision = decision.not_counted(cost);
                }
            }
        }
        Finished::Decided(Decided::new(overall, each, pending.costs.len()))
    }

    /// The limit a provisional hit is judged by: the one its check carries,
    /// else the rules' limit it was counted for (found by index, or by id
    /// if a reload moved it; `None` if a reload removed it).
    fn limit_of<'c>(
        &self,
        compiled: &'c Compiled,
        pending: &'c Pending,
        hit: &PendingHit,
    ) -> Option<&'c CompiledLimit> {
        if let Some(carried) = &pending.limits[hit.check as usize] {
            return Some(carried.limit());
        }
        let limits = compiled.rules.limits();
        match limits.get(hit.index as usize) {
            Some(l) if l.id == hit.limit => Some(l),
            _ => compiled.by_id.get(&hit.limit).map(|&i| &limits[i]),
        }
    }

    /// Peers holding claims on `pending`'s keys that were counted after it
    /// (ties by slot) and may still be undecided.
    fn later_claims(&self, now: Nanos, pending: &Pending) -> PeerSet {
        let Some(c) = &self.cluster else {
            return PeerSet::new();
        };
        let own = self.config.own_slot.index() as u16;
        let mine = (pending.started, own);
        let mut blocking = PeerSet::new();
        for hit in &pending.hits {
            if let Some(hold) = c.confirming.get(&CounterKey::new(hit.limit, hit.key)) {
                for &(slot, started, until) in &hold.claims {
                    if until > now && (started, slot) > mine {
                        blocking.insert(NodeSlot::new(slot));
                    }
                }
            }
        }
        blocking
    }

    /// The answer to a provisional request that cannot wait any longer,
    /// without giving its hits back (whoever still holds the request will).
    pub(crate) fn refused_pending(&self, pending: &Pending) -> Decided {
        self.denied_for_now(pending)
    }

    /// The answer to a provisional request whose confirmation did not
    /// complete: every check denied, retry after one acknowledgement wait.
    pub(super) fn denied_for_now(&self, pending: &Pending) -> Decided {
        let wait = self
            .cluster
            .as_ref()
            .map_or(Nanos::from_millis(10), |c| c.view.load().ack_wait);
        let refuse = |d: &Decision| Decision {
            outcome: Outcome::Denied,
            shadow: d.shadow,
            quota: d.quota.map(|q| QuotaState {
                retry_after: wait,
                ..q
            }),
        };
        let each = pending.provisional.each().iter().map(refuse).collect();
        let overall = refuse(&pending.provisional.decision());
        Decided::new(overall, each, pending.costs.len())
    }

    /// Takes back the provisional hits of a refused request.
    pub(crate) fn give_back(&self, now: Nanos, pending: &Pending) {
        let compiled = self.compiled.load();
        for hit in &pending.hits {
            let table = match compiled.by_id.get(&hit.limit) {
                Some(&index) => compiled.tables[index].clone(),
                None => match self.table_by_id(hit.limit) {
                    Some(t) => t,
                    None => continue,
                },
            };
            let spec = *table.spec();
            let Some(mut entry) = table.get(hit.key) else {
                continue;
            };
            let own = self.config.own_slot;
            let given = Ring::refund_epoch(&mut entry, &spec, now, own, hit.epoch, hit.cost);
            if given > 0 && entry.mark_dirty() {
                if let Some(c) = &self.cluster {
                    c.journal.push(CounterKey::new(hit.limit, hit.key));
                }
            }
        }
    }

    /// Sets how long a key stays under confirmation after a claim on it.
    /// It must exceed the longest a claimant waits for answers.
    pub(crate) fn set_confirm_hold(&self, hold: Nanos) {
        if let Some(c) = &self.cluster {
            c.confirm_hold.store(hold.as_u64(), Ordering::Relaxed);
        }
    }

    /// A peer asked to confirm hits on these keys (whose provisional values
    /// have just been merged): until the hold passes, this node decides them
    /// by confirmation too, so that no hit of its own can slip past the
    /// claimant's count unseen.
    ///
    /// `claim` is the claimant's slot and when its hits were counted (by its
    /// clock): it decides who yields when two claims conflict.
    pub(crate) fn hold_keys(&self, now: Nanos, keys: &[CounterKey], claim: Option<(u16, Nanos)>) {
        for &CounterKey { limit, key } in keys {
            if let Some(table) = self.table_by_id(limit) {
                if let Some(mut entry) = table.get(key) {
                    self.hold_confirming(&mut entry, limit, now);
                    if let (Some((slot, started)), Some(c)) = (claim, &self.cluster) {
                        let until = now + Nanos::new(c.confirm_hold.load(Ordering::Relaxed));
                        if let Some(mut hold) = c.confirming.get_mut(&CounterKey::new(limit, key)) {
                            hold.claims.retain(|x| x.2 > now && x.0 != slot);
                            if hold.claims.len() >= MAX_HELD_CLAIMS {
                                hold.claims.remove(0);
                            }
                            hold.claims.push((slot, started, until));
                        }
                    }
                }
            }
        }
    }

    pub(super) fn hold_confirming(&self, entry: &mut Entry<'_>, limit: LimitId, now: Nanos) {
        if let Some(c) = &self.cluster {
            let until = now + Nanos::new(c.confirm_hold.load(Ordering::Relaxed));
            entry.set_confirming(true);
            let mut hold = c
                .confirming
                .entry(CounterKey::new(limit, entry.key()))
                .or_default();
            if hold.until < until {
                hold.until = until;
            }
        }
    }

    /// Whether decisions on this entry must be confirmed; clears a hold
    /// that has passed.
    pub(super) fn is_confirming(&self, entry: &mut Entry<'_>, limit: LimitId, now: Nanos) -> bool {
        if !entry.is_confirming() {
            return false;
        }
        let Some(c) = &self.cluster else {
            return false;
        };
        let key = CounterKey::new(limit, entry.key());
        let live = c.confirming.get(&key).is_some_and(|h| h.until > now);
        if !live {
            c.confirming.remove_if(&key, |_, h| h.until <= now);
            entry.set_confirming(false);
        }
        live
    }

    /// Forgets holds that have passed (their entries' bits are cleared on
    /// the next decision): keeps the hold map to the keys claimed within
    /// the last hold, whatever the number of keys.
    pub(crate) fn prune_confirming(&self, now: Nanos) {
        if let Some(c) = &self.cluster {
            c.confirming.retain(|_, h| h.until > now);
        }
    }

    /// Keys currently under confirmation, for metrics.
    pub fn keys_confirming(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.confirming.len())
    }
}
