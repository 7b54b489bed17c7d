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

use std::sync::Arc;

use smallvec::SmallVec;

use super::confirm::{Pending, PendingHit};
use super::decision::{Check, Decided, Decision, Outcome};
use super::judge::{count_hit, decide_shared, judge_alone, Judged};
use super::table::{self, Entry, KeyTable};
use super::{CheckError, Compiled, Limiter};
use crate::algorithm::{RateAlgorithm, Verdict};
use crate::descriptor::Descriptors;
use crate::key::{CounterKey, KeyDigest, LimitId};
use crate::rules::request::RequestLimit;
use crate::rules::CompiledLimit;
use crate::time::{Clock, Nanos};
use crate::window::{Ring, WindowCounts, MAX_BUCKETS, SMALL_RING};

/// What `Limiter::begin_at` did with a request.
#[derive(Clone, Debug)]
pub enum Begun {
    /// Decided at once, from local memory.
    Decided(Decided),
    /// Counted provisionally; the peers' answers decide it. Boxed: it is
    /// the rare case, and every decision moves a `Begun`.
    Confirm(Box<Pending>),
}

/// Most limits one request may match before the check falls back to a heap
/// buffer.
const INLINE_MATCHES: usize = 8;

/// Which limit a match is judged by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Target {
    /// A limit of the rules in force, by its index.
    Rule(u32),
    /// A limit a check carries, by its position in the request's list.
    Request(u32),
}

/// One limit and key a request touches, and the check it belongs to.
/// Sorted by `order` (the lock order: the rules' limits by index, then
/// request-defined limits' grids by id, both the same for every request),
/// then key, then check: checks of one request that share a key sit side
/// by side and are judged together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Match {
    /// Where the limit's table stands in the lock order.
    pub(super) order: u64,
    /// The key's digest under that limit.
    pub(super) key: KeyDigest,
    /// The check's position in the request.
    pub(super) check: u32,
    /// The limit.
    pub(super) target: Target,
}

impl Match {
    /// A match of limit `index` of the rules in force, whose table stands
    /// at `order` in the lock order.
    pub(super) fn rule(index: usize, order: u32, key: KeyDigest, check: u32) -> Self {
        Match {
            order: u64::from(order),
            key,
            check,
            target: Target::Rule(index as u32),
        }
    }
}

/// The request-defined limits of one request with their tables, by
/// position.
pub(super) type RequestTargets = SmallVec<[(Arc<KeyTable>, Arc<RequestLimit>); 2]>;

/// Where the matches of one request find their tables and limits.
pub(super) struct Targets<'r> {
    compiled: &'r Compiled,
    requests: &'r [(Arc<KeyTable>, Arc<RequestLimit>)],
}

impl<'r> Targets<'r> {
    /// The rules in force and no request-defined limit.
    pub(super) fn rules(compiled: &'r Compiled) -> Self {
        Targets {
            compiled,
            requests: &[],
        }
    }

    #[inline]
    pub(super) fn table(&self, t: Target) -> &'r KeyTable {
        match t {
            Target::Rule(i) => &self.compiled.tables[i as usize],
            Target::Request(j) => &self.requests[j as usize].0,
        }
    }

    #[inline]
    pub(super) fn limit(&self, t: Target) -> &'r CompiledLimit {
        match t {
            Target::Rule(i) => &self.compiled.rules.limits()[i as usize],
            Target::Request(j) => self.requests[j as usize].1.limit(),
        }
    }
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
        if let (None, [c]) = (&self.cluster, checks) {
            if c.limit.is_none() {
                return self
                    .decide_check_alone(now, &c.descriptors, c.cost)
                    .map(|d| Begun::Decided(Decided::single(d)));
            }
        }
        let compiled = self.compiled.load();
        let mut matches = Matches::new();
        let mut requests = RequestTargets::new();
        for (i, c) in checks.iter().enumerate() {
            // A request has far fewer checks than `u32::MAX`: the APIs cap
            // them long before.
            let check = i as u32;
            match &c.limit {
                None => self.resolve(&compiled, &c.descriptors, check, &mut matches)?,
                Some(limit) => {
                    let table =
                        self.requests
                            .for_request(now, limit, &self.config, &self.budget)?;
                    matches.push(Match {
                        order: limit.limit().id.0,
                        key: self.request_key(&c.descriptors, limit),
                        check,
                        target: Target::Request(requests.len() as u32),
                    });
                    requests.push((table, limit.clone()));
                }
            }
        }
        matches.sort();
        if !self.is_admitting() {
            return Err(CheckError::Recovering);
        }
        let costs: SmallVec<[u32; 4]> = checks.iter().map(|c| c.cost).collect();
        let targets = Targets {
            compiled: &compiled,
            requests: &requests,
        };
        Ok(self.decide(&targets, now, matches.as_slice(), &costs, can_confirm))
    }

    /// A request of one check against the rules on a limiter with no
    /// peers: what the general path ([`Limiter::decide`]) decides for it,
    /// without assembling a request's answer, and for one limit without
    /// the bookkeeping of several keys ([`Limiter::decide_alone`]). A
    /// limiter with no peers never confirms and is always admitting.
    #[inline]
    pub(super) fn decide_check_alone(
        &self,
        now: Nanos,
        d: &Descriptors<'_>,
        cost: u32,
    ) -> Result<Decision, CheckError> {
        debug_assert!(self.cluster.is_none());
        let compiled = self.compiled.load();
        let mut matches = Matches::new();
        self.resolve(&compiled, d, 0, &mut matches)?;
        let targets = Targets::rules(&compiled);
        match matches.as_slice() {
            [] => return Ok(Decision::UNLIMITED),
            [m] => {
                let mut hint = table::NO_HINT;
                let (table, limit) = (targets.table(m.target), targets.limit(m.target));
                return Ok(self.decide_alone(table, limit, now, m.key, cost, &mut hint));
            }
            _ => {}
        }
        matches.sort();
        Ok(
            match self.decide(&targets, now, matches.as_slice(), &[cost], false) {
                Begun::Decided(decided) => decided.decision(),
                // Not produced without peers; deny rather than panic.
                Begun::Confirm(p) => {
                    self.give_back(now, &p);
                    self.denied_for_now(&p).decision()
                }
            },
        )
    }

    /// The key a check carrying `limit` counts under: every descriptor of
    /// the check (names and values) and the limit's parameters.
    pub(super) fn request_key(&self, d: &Descriptors<'_>, limit: &RequestLimit) -> KeyDigest {
        let values = self.hasher.values(d.iter().flat_map(|(n, v)| [n, v]));
        self.hasher
            .for_limit(limit.limit().id, values ^ limit.params())
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
        let start = matches.as_slice().len();
        let mut unlimited = false;
        // Rules keyed by the same fields hash the same values: a request
        // that many rules match (each keyed by `user`, say) hashes once.
        let mut last: Option<(&[String], u64)> = None;
        compiled.rules.for_each_rule_match(d, |m| {
            if m.unlimited || unlimited {
                unlimited = true;
                return;
            }
            let digest = match last {
                Some((fields, digest)) if fields == m.key_fields => digest,
                _ => {
                    let digest = hasher.values(m.key_fields.iter().map(|f| d.get(f).unwrap_or("")));
                    last = Some((m.key_fields, digest));
                    digest
                }
            };
            for limit in m.limits {
                let key = hasher.for_limit(limit.id, digest);
                let order = compiled.order[limit.index];
                matches.push(Match::rule(limit.index, order, key, check));
            }
        });
        if unlimited {
            // An unlimited rule exempts the check from every other.
            matches.truncate(start);
        }
        Ok(())
    }

    /// [`Limiter::decide`] for one limit on a limiter with no peers: the
    /// same steps without the bookkeeping of several keys. `hint` is where
    /// the caller last found the key ([`super::KeyTable::get_or_insert_hinted`];
    /// [`table::NO_HINT`] if it keeps none).
    #[inline]
    pub(super) fn decide_alone(
        &self,
        table: &KeyTable,
        limit: &CompiledLimit,
        now: Nanos,
        key: KeyDigest,
        cost: u32,
        hint: &mut u32,
    ) -> Decision {
        if let Some(never) = never_admissible(limit, now, cost) {
            return never;
        }
        let mut entry = table.get_or_insert_hinted(key, now, hint);
        let mut counts = CountsBuf::new();
        let (verdict, summary) = judge_alone(&entry, &limit.algorithm, now, cost, &mut counts);
        if verdict.is_allowed() && cost > 0 {
            count_hit(&mut entry, now, self.config.own_slot, cost, summary);
        }
        drop(entry);
        Decision::of(limit, verdict)
    }

    /// Decides a request whose limits and keys are resolved (`matches`,
    /// sorted, with their limits in `targets`) and whose checks cost
    /// `costs`.
    pub(super) fn decide(
        &self,
        targets: &Targets<'_>,
        now: Nanos,
        matches: &[Match],
        costs: &[u32],
        can_confirm: bool,
    ) -> Begun {
        if let (None, &[m], &[cost]) = (&self.cluster, matches, costs) {
            // The common case in process: one check, one limit, no peers.
            let mut hint = table::NO_HINT;
            let (table, limit) = (targets.table(m.target), targets.limit(m.target));
            let decision = self.decide_alone(table, limit, now, m.key, cost, &mut hint);
            return Begun::Decided(Decided::single(decision));
        }
        let several = costs.len() != 1;
        if let Some(never) = never_admissible_request(targets, now, matches, costs) {
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
            let table = targets.table(group.target);
            let spec = table.spec();
            let mut entry = table.get_or_insert(group.key, now);
            let limit = targets.limit(group.target);
            let mut summary = None;
            // Every member is judged by its own limit (the checks of one
            // request may reach one counter through different lists of a
            // rule); nearly always there is one member.
            for (n, m) in group.members.iter().enumerate() {
                let limit = targets.limit(m.target);
                let verdict = match view.as_deref() {
                    None => {
                        let (verdict, s) =
                            judge_alone(&entry, &limit.algorithm, now, group.cost, &mut counts);
                        // A memo is the summary before this request's hits;
                        // keep it only when one limit judged the key.
                        summary = if n == 0 { s } else { None };
                        verdict
                    }
                    Some(view) => {
                        let nets = counts.get(spec.buckets());
                        Ring::read(&entry, spec, now, nets);
                        // A shadow limit never denies: nothing to confirm.
                        let confirming =
                            !limit.shadow && self.is_confirming(&mut entry, limit.id, now);
                        let shared = decide_shared(
                            view,
                            &limit.algorithm,
                            &entry,
                            nets,
                            now,
                            group.cost,
                            confirming,
                            can_confirm || limit.shadow,
                        );
                        if shared.capped {
                            if let Some(wake) = self.cluster.as_ref().and_then(|c| c.wake.get()) {
                                wake();
                            }
                        }
                        confirm |= shared.confirm && !limit.shadow;
                        shared.verdict
                    }
                };
                overall.absorb(limit, verdict);
                if several {
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
        let mut pending = confirm.then(|| {
            let mut p = Pending::new(costs, now, decided.clone());
            for m in matches {
                if let Target::Request(j) = m.target {
                    p.limits[m.check as usize] = Some(targets.requests[j as usize].1.clone());
                }
            }
            p
        });
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
                                index: match m.target {
                                    Target::Rule(i) => i,
                                    Target::Request(_) => u32::MAX,
                                },
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
            Some(p) => Begun::Confirm(Box::new(p)),
            None => Begun::Decided(decided),
        }
    }
}

/// The requests' matches that share a limit and key, judged as one.
#[derive(Clone, Copy)]
pub(super) struct Group<'m> {
    pub(super) target: Target,
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
            .take_while(|m| m.order == first.order && m.key == first.key)
            .count();
        let (members, rest) = self.matches.split_at(len);
        self.matches = rest;
        let cost = members.iter().fold(0u32, |sum, m| {
            sum.saturating_add(self.costs.get(m.check as usize).copied().unwrap_or(0))
        });
        Some(Group {
            target: first.target,
            key: first.key,
            cost,
            members,
        })
    }
}

/// The `Never` decision when `cost` exceeds what `limit` can ever admit,
/// found without touching any key: such a request must not create entries
/// (a flood of them would evict real keys).
#[inline]
fn never_admissible(limit: &CompiledLimit, now: Nanos, cost: u32) -> Option<Decision> {
    // Every limit admits at least one hit.
    if cost <= 1 {
        return None;
    }
    never_admissible_cost(limit, now, cost).map(|v| Decision::of(limit, v))
}

/// [`never_admissible`] once the cost is above one: out of line, so that
/// the common single-hit check stays a compare.
fn never_admissible_cost(limit: &CompiledLimit, now: Nanos, cost: u32) -> Option<Verdict> {
    let empty = [0u64; MAX_BUCKETS];
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
    targets: &Targets<'_>,
    now: Nanos,
    matches: &[Match],
    costs: &[u32],
) -> Option<Decided> {
    let mut decided: Option<(Decision, Vec<Decision>)> = None;
    for group in Groups::new(matches, costs) {
        if group.cost <= 1 {
            continue;
        }
        for m in group.members {
            let limit = targets.limit(m.target);
            let Some(verdict) = never_admissible_cost(limit, now, group.cost) else {
                continue;
            };
            let (overall, each) = decided.get_or_insert_with(|| {
                let each = if costs.len() == 1 {
                    Vec::new()
                } else {
                    vec![Decision::UNLIMITED; costs.len()]
                };
                (Decision::UNLIMITED, each)
            });
            overall.absorb(limit, verdict);
            if let Some(d) = each.get_mut(m.check as usize) {
                d.absorb(limit, verdict);
            }
        }
    }
    decided.map(|(overall, each)| Decided::new(overall, each, costs.len()))
}

/// The limits and keys of one request, on the stack for the common case
/// (left uninitialised until pushed: a check of one limit writes one).
pub(super) struct Matches(SmallVec<[Match; INLINE_MATCHES]>);

impl Matches {
    pub(super) fn new() -> Self {
        Matches(SmallVec::new())
    }
    #[inline]
    pub(super) fn push(&mut self, m: Match) {
        self.0.push(m);
    }
    fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }
    #[inline]
    pub(super) fn as_slice(&self) -> &[Match] {
        &self.0
    }
    /// Into the lock order: by limit, then key, then check.
    #[inline]
    pub(super) fn sort(&mut self) {
        if self.0.len() > 1 {
            self.0.sort_unstable();
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
