//! Deciding a request from the counts in memory.
//!
//! Every check of a request is resolved to the limits that apply and a key
//! per limit; the entries are locked in limit order (so two requests that
//! share keys cannot deadlock), each limit judges the request's whole cost
//! on its key, and only when every limit of every check allows are the hits
//! counted, in this node's own slot. A denial by one limit leaves all
//! others untouched.
//!
//! On a cluster node a limit also reserves the peers' in-flight shares
//! (`share`): far from the limit the decision is exact whatever the peers
//! are doing; near it the request is counted provisionally and handed back
//! as [`Begun::Confirm`] for the peers to confirm (`confirm`).

use smallvec::SmallVec;

use super::confirm::{Pending, PendingHit};
use super::decision::{Check, Decided, Decision, Outcome};
use super::table::{self, Entry, MAX_INFLIGHT};
use super::{CheckError, Compiled, Limiter};
use crate::algorithm::{Algorithm, RateAlgorithm, Summary, Verdict};
use crate::descriptor::Descriptors;
use crate::key::{CounterKey, KeyDigest, LimitId};
use crate::rules::RuleSet;
use crate::share::{ShareView, Shares, MAX_NODES};
use crate::slot::NodeSlot;
use crate::time::{Clock, Nanos};
use crate::window::{Ring, SlotGrid, WindowCounts, MAX_BUCKETS, SMALL_RING};

/// What `Limiter::begin_at` did with a request.
#[derive(Clone, Debug)]
pub enum Begun {
    /// Decided at once, from local memory.
    Decided(Decided),
    /// Counted provisionally; the peers' answers decide it.
    Confirm(Pending),
}

/// Most limits one request may match before the check falls back to a heap
/// buffer.
const INLINE_MATCHES: usize = 8;

/// One limit and key a request touches, and the check it belongs to.
/// Sorted by limit (the lock order), then key, then check: checks of one
/// request that share a key sit side by side and are judged together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Match {
    /// The limit's position in the rules in force.
    pub(super) index: usize,
    /// The key's digest under that limit.
    pub(super) key: KeyDigest,
    /// The check's position in the request.
    pub(super) check: u32,
}

impl<C: Clock> Limiter<C> {
    /// Decides the checks of one request together now, from local memory
    /// only: see `Limiter::begin_at`. A request that needs the peers'
    /// confirmation is refused for one acknowledgement wait instead (its
    /// provisional hits are given back): this call never waits.
    pub(crate) fn check_all_at(
        &self,
        now: Nanos,
        checks: &[Check<'_>],
    ) -> Result<Decided, CheckError> {
        match self.evaluate(now, checks, false)? {
            Begun::Decided(decided) => Ok(decided),
            // Not produced when confirmation is off; deny rather than panic.
            Begun::Confirm(p) => {
                self.give_back(now, &p);
                Ok(self.denied_for_now(&p))
            }
        }
    }

    /// Starts the decision of a request of one or more checks: the
    /// decision path every protocol takes (through
    /// [`crate::decide::Decider`]).
    ///
    /// Most requests are decided at once from local memory
    /// ([`Begun::Decided`]): while a key is far enough from its limit that
    /// the peers' reserved in-flight shares fit, the decision is safe
    /// whatever they are doing. Near the limit (within the peers' shares of
    /// it, which for small limits is always), or when a peer has asked to
    /// confirm a hit on the key, a request the merged counts allow is
    /// counted provisionally and returned as [`Begun::Confirm`]: the node
    /// sends the provisional values to the peers it waits for, each answers
    /// with its own current counts, and `Limiter::finish_or_yield_at`
    /// decides exactly on what they said. A request the merged counts deny
    /// is denied at once: counts only grow, so the denial is exact.
    ///
    /// On `Err` nothing was counted: every check is validated against the
    /// rules before any entry is touched.
    pub(crate) fn begin_at(&self, now: Nanos, checks: &[Check<'_>]) -> Result<Begun, CheckError> {
        self.evaluate(now, checks, true)
    }

    pub(super) fn evaluate(
        &self,
        now: Nanos,
        checks: &[Check<'_>],
        can_confirm: bool,
    ) -> Result<Begun, CheckError> {
        let compiled = self.compiled.load();
        let mut matches = Matches::new();
        for (i, c) in checks.iter().enumerate() {
            // A request has far fewer checks than `u32::MAX`: the APIs cap
            // them long before (`MAX_CHECKS`).
            self.resolve(&compiled, &c.descriptors, i as u32, &mut matches)?;
        }
        matches.sort();
        if !self.is_admitting() {
            return Err(CheckError::Recovering);
        }
        let costs: SmallVec<[u32; 4]> = checks.iter().map(|c| c.cost).collect();
        Ok(self.decide(&compiled, now, matches.as_slice(), &costs, can_confirm))
    }

    /// The limits that apply to `d` (check number `check` of its request)
    /// under `compiled`, each with its key, appended to `matches`. The key
    /// material is hashed once per matching rule; each limit's key is
    /// derived from that digest.
    pub(super) fn resolve(
        &self,
        compiled: &Compiled,
        d: &Descriptors<'_>,
        check: u32,
        matches: &mut Matches,
    ) -> Result<(), CheckError> {
        compiled.rules.check_endpoint(d)?;
        let hasher = &self.hasher;
        compiled.rules.for_each_rule_match(d, |m| {
            let digest = hasher.values(m.key_fields.iter().map(|f| d.get(f).unwrap_or("")));
            for limit in m.limits {
                matches.push(Match {
                    index: limit.index,
                    key: hasher.for_limit(limit.id, digest),
                    check,
                });
            }
        });
        Ok(())
    }

    /// [`Limiter::decide`] for one limit on a limiter with no peers: the
    /// same steps without the bookkeeping of several keys. `hint` is where
    /// the caller last found the key ([`super::KeyTable::get_or_insert_hinted`];
    /// [`table::NO_HINT`] if it keeps none).
    #[inline]
    pub(super) fn decide_alone(
        &self,
        compiled: &Compiled,
        now: Nanos,
        index: usize,
        key: KeyDigest,
        cost: u32,
        hint: &mut u32,
    ) -> Decision {
        if let Some(never) = never_admissible(&compiled.rules, index, now, cost) {
            return never;
        }
        let limit = &compiled.rules.limits()[index];
        let mut entry = compiled.tables[index].get_or_insert_hinted(key, now, hint);
        let mut counts = CountsBuf::new();
        let (verdict, summary) = judge_alone(&entry, &limit.algorithm, now, cost, &mut counts);
        if verdict.is_allowed() && cost > 0 {
            count_hit(&mut entry, now, self.config.own_slot, cost, summary);
        }
        drop(entry);
        Decision::of(limit, verdict)
    }

    /// Decides a request whose limits and keys are resolved (`matches`,
    /// sorted) and whose checks cost `costs`.
    pub(super) fn decide(
        &self,
        compiled: &Compiled,
        now: Nanos,
        matches: &[Match],
        costs: &[u32],
        can_confirm: bool,
    ) -> Begun {
        if let (None, &[m], &[cost]) = (&self.cluster, matches, costs) {
            // The common case in process: one check, one limit, no peers.
            let mut hint = table::NO_HINT;
            let decision = self.decide_alone(compiled, now, m.index, m.key, cost, &mut hint);
            return Begun::Decided(Decided::single(decision));
        }
        let several = costs.len() != 1;
        if let Some(never) = never_admissible_request(&compiled.rules, now, matches, costs) {
            return Begun::Decided(never);
        }
        let view = self.cluster.as_ref().map(|c| c.view.load());
        let mut entries = Guards::new();
        let mut overall = Decision::UNLIMITED;
        let mut each = if several {
            vec![Decision::UNLIMITED; costs.len()]
        } else {
            Vec::new()
        };
        let mut counts = CountsBuf::new();
        let mut confirm = false;
        for group in Groups::new(matches, costs) {
            let table = &compiled.tables[group.index];
            let spec = table.spec();
            let mut entry = table.get_or_insert(group.key, now);
            let limit = &compiled.rules.limits()[group.index];
            let mut summary = None;
            let verdict = match view.as_deref() {
                None => {
                    let (verdict, s) =
                        judge_alone(&entry, &limit.algorithm, now, group.cost, &mut counts);
                    summary = s;
                    verdict
                }
                Some(view) => {
                    let nets = counts.get(spec.buckets());
                    Ring::read(&entry, spec, now, nets);
                    let confirming = self.is_confirming(&mut entry, limit.id, now);
                    let shared = decide_shared(
                        view,
                        &limit.algorithm,
                        &entry,
                        nets,
                        now,
                        group.cost,
                        confirming,
                        can_confirm,
                    );
                    if shared.capped {
                        if let Some(wake) = self.cluster.as_ref().and_then(|c| c.wake.get()) {
                            wake();
                        }
                    }
                    confirm |= shared.confirm;
                    shared.verdict
                }
            };
            overall.absorb(limit, verdict);
            if several {
                for m in group.members {
                    each[m.check as usize].absorb(limit, verdict);
                }
            }
            entries.push((limit.id, entry, summary, group));
        }
        if overall.outcome != Outcome::Allowed {
            for (decision, &cost) in each.iter_mut().zip(costs) {
                if decision.is_allowed() {
                    *decision = decision.not_counted(cost);
                }
            }
            return Begun::Decided(Decided::new(overall, each, costs.len()));
        }
        let decided = Decided::new(overall, each, costs.len());
        let journal = self.cluster.as_ref().map(|c| &c.journal);
        let mut pending = confirm.then(|| Pending::new(costs, now, decided.clone()));
        for (limit_id, entry, summary, group) in entries.iter_mut() {
            if group.cost == 0 {
                continue;
            }
            // Every entry of one request lives in its own limit's table.
            let epoch = count_hit(entry, now, self.config.own_slot, group.cost, *summary);
            let Some(journal) = journal else {
                continue;
            };
            match pending.as_mut() {
                // Confirmed hits are seen by every peer waited for before
                // they are admitted: not in flight.
                Some(p) => {
                    for m in group.members {
                        let cost = costs[m.check as usize];
                        if cost > 0 {
                            p.hits.push(PendingHit {
                                limit: *limit_id,
                                key: entry.key(),
                                epoch,
                                check: m.check,
                                cost,
                            });
                        }
                    }
                    self.hold_confirming(entry, *limit_id, now);
                }
                None => entry.add_unshipped(group.cost),
            }
            if entry.mark_dirty() {
                journal.push(CounterKey::new(*limit_id, entry.key()));
            }
        }
        match pending {
            Some(p) => Begun::Confirm(p),
            None => Begun::Decided(decided),
        }
    }
}

/// The requests' matches that share a limit and key, judged as one.
#[derive(Clone, Copy)]
pub(super) struct Group<'m> {
    pub(super) index: usize,
    pub(super) key: KeyDigest,
    /// The members' costs together.
    pub(super) cost: u32,
    pub(super) members: &'m [Match],
}

/// The groups of sorted matches.
pub(super) struct Groups<'m, 'c> {
    matches: &'m [Match],
    costs: &'c [u32],
}

impl<'m, 'c> Groups<'m, 'c> {
    pub(super) fn new(matches: &'m [Match], costs: &'c [u32]) -> Self {
        Groups { matches, costs }
    }
}

impl<'m> Iterator for Groups<'m, '_> {
    type Item = Group<'m>;
    #[inline]
    fn next(&mut self) -> Option<Group<'m>> {
        let first = *self.matches.first()?;
        let len = self
            .matches
            .iter()
            .take_while(|m| m.index == first.index && m.key == first.key)
            .count();
        let (members, rest) = self.matches.split_at(len);
        self.matches = rest;
        let cost = members.iter().fold(0u32, |sum, m| {
            sum.saturating_add(self.costs.get(m.check as usize).copied().unwrap_or(0))
        });
        Some(Group {
            index: first.index,
            key: first.key,
            cost,
            members,
        })
    }
}

/// The `Never` decision when `cost` exceeds what the limit at `index` can
/// ever admit, found without touching any key: such a request must not
/// create entries (a flood of them would evict real keys).
#[inline]
fn never_admissible(rules: &RuleSet, index: usize, now: Nanos, cost: u32) -> Option<Decision> {
    // Every limit admits at least one hit.
    if cost <= 1 {
        return None;
    }
    never_admissible_cost(rules, index, now, cost).map(|v| Decision::of(&rules.limits()[index], v))
}

/// [`never_admissible`] once the cost is above one: out of line, so that
/// the common single-hit check stays a compare.
fn never_admissible_cost(rules: &RuleSet, index: usize, now: Nanos, cost: u32) -> Option<Verdict> {
    let empty = [0u64; MAX_BUCKETS];
    let limit = &rules.limits()[index];
    let spec = limit.algorithm.window();
    let counts = WindowCounts {
        spec,
        now,
        nets: &empty[..spec.buckets()],
    };
    let verdict = limit.algorithm.decide(&counts, cost);
    matches!(verdict, Verdict::Never { .. }).then_some(verdict)
}

/// [`never_admissible`] for a whole request: `Never` when some limit can
/// never admit its share of the request. The checks with such a limit say
/// so; the others are reported unlimited (they were not looked at).
fn never_admissible_request(
    rules: &RuleSet,
    now: Nanos,
    matches: &[Match],
    costs: &[u32],
) -> Option<Decided> {
    let mut decided: Option<(Decision, Vec<Decision>)> = None;
    for group in Groups::new(matches, costs) {
        if group.cost <= 1 {
            continue;
        }
        let Some(verdict) = never_admissible_cost(rules, group.index, now, group.cost) else {
            continue;
        };
        let limit = &rules.limits()[group.index];
        let (overall, each) = decided.get_or_insert_with(|| {
            let each = if costs.len() == 1 {
                Vec::new()
            } else {
                vec![Decision::UNLIMITED; costs.len()]
            };
            (Decision::UNLIMITED, each)
        });
        overall.absorb(limit, verdict);
        for m in group.members {
            if let Some(d) = each.get_mut(m.check as usize) {
                d.absorb(limit, verdict);
            }
        }
    }
    decided.map(|(overall, each)| Decided::new(overall, each, costs.len()))
}

/// What a clustered decision found.
struct Shared {
    /// The verdict to report: the merged counts' own, without the peers'
    /// reservations (so `remaining` is what is really left).
    verdict: Verdict,
    /// The request fits the merged counts but not with the peers' shares
    /// reserved (or the key is under confirmation): ask the peers.
    confirm: bool,
    /// This node's in-flight share of the key is spent.
    capped: bool,
}

/// The verdict of `algorithm` on `cost` more hits on the locked `entry` of
/// a limiter with no peers, and for a window algorithm the window's summary
/// before them. A hot key decides from the summary its last decision left,
/// without reading the window (see `table`).
#[inline]
fn judge_alone(
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
fn count_hit(
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
fn decide_shared(
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
    if view.members == 1 << view.own || cost == 0 {
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
    let mut totals = [0u64; MAX_NODES];
    let totals = &mut totals[..entry.slot_count().min(MAX_NODES)];
    Ring::slot_hits(entry, &spec, now, totals);
    let shares = Shares::new(
        view,
        view.budget(quota, u64::from(MAX_INFLIGHT)),
        quota,
        totals,
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

/// The limits and keys of one request, on the stack for the common case.
pub(super) struct Matches {
    inline: [Match; INLINE_MATCHES],
    len: usize,
    spill: Vec<Match>,
}

impl Matches {
    pub(super) fn new() -> Self {
        Matches {
            inline: [Match {
                index: 0,
                key: KeyDigest(0),
                check: 0,
            }; INLINE_MATCHES],
            len: 0,
            spill: Vec::new(),
        }
    }
    #[inline]
    fn push(&mut self, m: Match) {
        if self.len < INLINE_MATCHES && self.spill.is_empty() {
            self.inline[self.len] = m;
            self.len += 1;
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.inline[..self.len]);
            }
            self.spill.push(m);
        }
    }
    pub(super) fn as_slice(&self) -> &[Match] {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }
    /// Into the lock order: by limit, then key, then check.
    pub(super) fn sort(&mut self) {
        if self.spill.is_empty() {
            if self.len > 1 {
                self.inline[..self.len].sort_unstable();
            }
        } else {
            self.spill.sort_unstable();
        }
    }
}

/// The locked entries of one request: on the stack up to `INLINE_MATCHES`.
/// Each with its limit's id, for a window algorithm on a lone node the
/// window's summary before this request, and the matches it stands for.
type Guards<'t, 'm> = SmallVec<[(LimitId, Entry<'t>, Option<Judged>, Group<'m>); INLINE_MATCHES]>;

/// Stack space for one window's bucket counts: common windows use a small
/// buffer so that a check does not clear 512 bytes it will not read, and a
/// check decided from a key's memo clears none.
pub(super) struct CountsBuf {
    small: Option<[u64; SMALL_RING]>,
    large: Option<[u64; MAX_BUCKETS]>,
}

impl CountsBuf {
    pub(super) fn new() -> Self {
        CountsBuf {
            small: None,
            large: None,
        }
    }
    pub(super) fn get(&mut self, buckets: usize) -> &mut [u64] {
        if buckets <= SMALL_RING {
            &mut self.small.get_or_insert([0; SMALL_RING])[..buckets]
        } else {
            &mut self.large.get_or_insert([0; MAX_BUCKETS])[..buckets]
        }
    }
}
