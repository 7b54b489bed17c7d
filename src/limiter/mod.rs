//! The in-process limiter: rules in, decisions out.
//!
//! [`Limiter::check`] matches a request's descriptors against the rules, and
//! for every limit that applies locks that key's entry in the limit's
//! [`KeyTable`], reads the merged window, asks the algorithm, and, only if
//! every limit allows, counts the hit in this node's own slot. Entries are
//! locked in limit order, so two requests that share keys cannot deadlock,
//! and a denial by one limit leaves all others untouched.

pub mod index;
pub mod journal;
pub mod receipts;
pub mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::clock::SystemClock;
use crate::core::algorithm::{RateAlgorithm, Verdict};
use crate::core::descriptor::{self, DescriptorError, Descriptors};
use crate::core::key::{key_digest, KeySeed};
use crate::core::rules::{RuleSet, UnknownEndpoint};
use crate::core::share::{ShareView, Shares, MAX_NODES};
use crate::core::slot::NodeSlot;
use crate::core::time::{Clock, Nanos};
use crate::core::window::{Ring, SlotGrid, WindowCounts, MAX_BUCKETS};

pub use journal::Journal;
pub use receipts::{LimitRefund, RefundError, RefundOutcome};
pub use table::{Entry, KeyTable, TableError, TableStats, MAX_INFLIGHT};

/// How the limiter is sized and where it sits in the cluster.
#[derive(Clone, Debug)]
pub struct LimiterConfig {
    /// This node's slot in every counter.
    pub own_slot: NodeSlot,
    /// Slots per counter: the most nodes the cluster may have.
    pub slots: usize,
    /// Most keys tracked per limit; beyond it the least recently used go.
    pub max_keys: usize,
    /// Seed of key digests, shared by the cluster.
    pub seed: KeySeed,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            own_slot: NodeSlot::new(0),
            slots: 1,
            max_keys: 1 << 20,
            seed: KeySeed::default(),
        }
    }
}

/// The outcome of a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    /// The cost is larger than a matching limit can ever admit.
    Never,
}

/// The decision for one request, described by the limit that decided it:
/// the one that denied (the longest wait if several did), or when all
/// allowed the one with the least left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The deciding limit, or `None` when no limit applied.
    pub quota: Option<QuotaState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaState {
    /// Position of the limit in the rule set that decided (`RuleSet::limits`).
    pub limit_index: usize,
    /// The limit's stable id.
    pub limit_id: u64,
    pub limit: u64,
    pub period: Nanos,
    pub remaining: u64,
    pub reset_after: Nanos,
    /// Zero when allowed.
    pub retry_after: Nanos,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.outcome == Outcome::Allowed
    }
}

/// Why a request could not be checked. Nothing was counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Descriptor(#[from] DescriptorError),
    #[error(transparent)]
    UnknownEndpoint(#[from] UnknownEndpoint),
    /// The node restarted and has not yet recovered its counts from its
    /// peers or its snapshot; admitting now could reset someone's quota.
    #[error("this node is recovering its counts after a restart and admits nothing yet")]
    Recovering,
}

/// Errors from building a limiter or loading rules into it. The running rules,
/// if any, stay in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    #[error("own slot {own} does not fit in a cluster of {slots} slots")]
    SlotOutOfRange { own: usize, slots: usize },
    #[error("limit {limit}: {source}")]
    Table { limit: String, source: TableError },
    #[error("a cluster has at most {MAX_NODES} slots, got {0}")]
    TooManySlots(usize),
}

/// A rule set with one key table per limit.
struct Compiled {
    rules: Arc<RuleSet>,
    tables: Vec<Arc<KeyTable>>,
    by_id: HashMap<u64, usize>,
}

/// What a clustered limiter adds: shares, the journal of changed keys, and
/// the recovery gate.
struct ClusterHooks {
    view: ArcSwap<ShareView>,
    journal: Arc<Journal>,
    admitting: AtomicBool,
    /// Called when a request was refused only because this node's in-flight
    /// share of a key is spent: shipping now, rather than at the next sync
    /// tick, brings the acknowledgements that free it sooner.
    wake: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// Most limits one request may match before the check falls back to a heap
/// buffer.
const INLINE_MATCHES: usize = 8;

pub struct Limiter<C: Clock = SystemClock> {
    clock: C,
    config: LimiterConfig,
    compiled: ArcSwap<Compiled>,
    cluster: Option<ClusterHooks>,
    receipts: receipts::Receipts,
}

impl Limiter<SystemClock> {
    pub fn new(rules: RuleSet, config: LimiterConfig) -> Result<Self, SetupError> {
        Limiter::with_clock(rules, config, SystemClock)
    }
}

impl<C: Clock> Limiter<C> {
    pub fn with_clock(rules: RuleSet, config: LimiterConfig, clock: C) -> Result<Self, SetupError> {
        if config.own_slot.index() >= config.slots {
            return Err(SetupError::SlotOutOfRange {
                own: config.own_slot.index(),
                slots: config.slots,
            });
        }
        let compiled = compile(Arc::new(rules), &config, &HashMap::new())?;
        let receipts = receipts::Receipts::new(
            crate::core::receipt::ReceiptKey::derive(config.seed),
            rand::random(),
            receipts::MAX_SPENT,
        );
        Ok(Limiter {
            clock,
            config,
            compiled: ArcSwap::from_pointee(compiled),
            cluster: None,
            receipts,
        })
    }

    /// Makes this limiter a cluster node: decisions reserve the peers'
    /// shares described by `view`, every local change is journaled for the
    /// replicator, and nothing is admitted until [`Limiter::set_admitting`]
    /// says the node has recovered its counts.
    pub fn clustered(mut self, view: ShareView) -> Result<Self, SetupError> {
        if self.config.slots > MAX_NODES {
            return Err(SetupError::TooManySlots(self.config.slots));
        }
        self.cluster = Some(ClusterHooks {
            view: ArcSwap::from_pointee(view),
            journal: Arc::new(Journal::default()),
            admitting: AtomicBool::new(false),
            wake: std::sync::OnceLock::new(),
        });
        Ok(self)
    }

    /// Sets what to call when a key's in-flight share is spent (once).
    pub fn set_wake(&self, wake: impl Fn() + Send + Sync + 'static) {
        if let Some(c) = &self.cluster {
            let _ = c.wake.set(Box::new(wake));
        }
    }

    /// Replaces the cluster picture (after a membership change).
    pub fn set_share_view(&self, view: ShareView) {
        if let Some(c) = &self.cluster {
            c.view.store(Arc::new(view));
        }
    }

    pub fn share_view(&self) -> Option<Arc<ShareView>> {
        self.cluster.as_ref().map(|c| c.view.load_full())
    }

    /// Keys changed locally, for the replicator. `None` when not clustered.
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.cluster.as_ref().map(|c| &c.journal)
    }

    /// Opens (or closes) the recovery gate of a clustered limiter.
    pub fn set_admitting(&self, admitting: bool) {
        if let Some(c) = &self.cluster {
            c.admitting.store(admitting, Ordering::Release);
        }
    }

    /// False while a clustered node is still recovering its counts.
    pub fn is_admitting(&self) -> bool {
        self.cluster
            .as_ref()
            .is_none_or(|c| c.admitting.load(Ordering::Acquire))
    }

    /// The key table of the limit with stable id `id` in the rules in force.
    pub fn table_by_id(&self, id: u64) -> Option<Arc<KeyTable>> {
        let compiled = self.compiled.load();
        compiled.by_id.get(&id).map(|&i| compiled.tables[i].clone())
    }

    /// Every `(limit id, table)` of the rules in force.
    pub fn tables(&self) -> Vec<(u64, Arc<KeyTable>)> {
        let compiled = self.compiled.load();
        compiled
            .rules
            .limits()
            .iter()
            .zip(&compiled.tables)
            .map(|(l, t)| (l.id, t.clone()))
            .collect()
    }

    pub fn config(&self) -> &LimiterConfig {
        &self.config
    }

    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.compiled.load().rules.clone()
    }

    /// Puts new rules in force. Limits whose id is unchanged keep their
    /// counters; new limits start empty; removed limits are dropped.
    pub fn replace_rules(&self, rules: RuleSet) -> Result<(), SetupError> {
        let old = self.compiled.load();
        let by_id: HashMap<u64, Arc<KeyTable>> = old
            .rules
            .limits()
            .iter()
            .zip(&old.tables)
            .map(|(l, t)| (l.id, t.clone()))
            .collect();
        let compiled = compile(Arc::new(rules), &self.config, &by_id)?;
        self.compiled.store(Arc::new(compiled));
        Ok(())
    }

    /// The simplest call: may `user_id` call `endpoint` now? Invalid input is
    /// answered with `false` (fail closed); use [`Limiter::check`] to learn why.
    pub fn allow_request(&self, user_id: &str, endpoint: &str) -> bool {
        let fields = [
            (descriptor::USER, user_id),
            (descriptor::ENDPOINT, endpoint),
        ];
        match Descriptors::new(&fields) {
            Ok(d) => self.check(&d, 1).is_ok_and(|d| d.is_allowed()),
            Err(_) => false,
        }
    }

    /// Checks a request of `cost` hits now. `cost == 0` reports the state
    /// without counting anything.
    pub fn check(&self, d: &Descriptors<'_>, cost: u32) -> Result<Decision, CheckError> {
        self.check_at(self.clock.now(), d, cost)
    }

    /// [`Limiter::check`] at an explicit time (simulations and tests).
    pub fn check_at(
        &self,
        now: Nanos,
        d: &Descriptors<'_>,
        cost: u32,
    ) -> Result<Decision, CheckError> {
        let compiled = self.compiled.load();
        compiled.rules.check_endpoint(d)?;
        if !self.is_admitting() {
            return Err(CheckError::Recovering);
        }
        let view = self.cluster.as_ref().map(|c| c.view.load());
        let mut matches = Matches::new();
        compiled.rules.for_each_match(d, |m| {
            let values = m.key_fields.iter().map(|f| d.get(f).unwrap_or(""));
            matches.push((
                m.limit.index,
                key_digest(self.config.seed, m.limit.id, values),
            ));
        });
        // Lock order: by limit, so that requests sharing keys cannot deadlock.
        matches.sort_by_key(|&(index, _)| index);
        if let Some(never) =
            never_admissible(&compiled.rules, matches.iter().map(|m| m.0), now, cost)
        {
            return Ok(never);
        }

        let mut entries = Guards::new();
        let mut decision = Decision {
            outcome: Outcome::Allowed,
            quota: None,
        };
        let mut counts = CountsBuf::new();
        for &(index, key) in matches.iter() {
            let table = &compiled.tables[index];
            let spec = table.spec();
            let entry = table.get_or_insert(key, now);
            let nets = counts.get(spec.buckets());
            Ring::read(&entry, spec, now, nets);
            let limit = &compiled.rules.limits()[index];
            let verdict = match view.as_deref() {
                None => limit.algorithm.decide(
                    &WindowCounts {
                        spec: *spec,
                        now,
                        nets,
                    },
                    cost,
                ),
                Some(view) => {
                    let (verdict, capped) =
                        decide_shared(view, &limit.algorithm, &entry, nets, now, cost);
                    if capped {
                        if let Some(wake) = self.cluster.as_ref().and_then(|c| c.wake.get()) {
                            wake();
                        }
                    }
                    verdict
                }
            };
            decision.absorb(index, limit.id, &limit.algorithm, verdict);
            entries.push((limit.id, entry));
        }
        if decision.outcome == Outcome::Allowed && cost > 0 {
            let journal = self.cluster.as_ref().map(|c| &c.journal);
            for (limit_id, entry) in entries.iter_mut() {
                // Every entry of one check lives in its own limit's table.
                Ring::add(entry, &entry.spec(), now, self.config.own_slot, cost);
                if let Some(journal) = journal {
                    entry.add_unshipped(cost);
                    if entry.mark_dirty() {
                        journal.push(*limit_id, entry.key());
                    }
                }
            }
        }
        Ok(decision)
    }

    /// Gives back `cost` hits for work that turned out not to count. Returns
    /// the smallest amount refunded across the matching limits (hits whose
    /// window has passed cannot be refunded).
    ///
    /// Trusted, in-process use only (an embedded application refunding its
    /// own work, simulation oracles): it takes the caller's word for what
    /// was charged. Callers from outside the process refund through
    /// [`Limiter::refund_receipt`].
    pub fn refund(&self, d: &Descriptors<'_>, cost: u32) -> Result<u32, CheckError> {
        self.refund_at(self.clock.now(), d, cost)
    }

    pub fn refund_at(&self, now: Nanos, d: &Descriptors<'_>, cost: u32) -> Result<u32, CheckError> {
        let compiled = self.compiled.load();
        compiled.rules.check_endpoint(d)?;
        let mut refunded: Option<u32> = None;
        compiled.rules.for_each_match(d, |m| {
            let values = m.key_fields.iter().map(|f| d.get(f).unwrap_or(""));
            let key = key_digest(self.config.seed, m.limit.id, values);
            let table = &compiled.tables[m.limit.index];
            let given = match table.get(key) {
                Some(mut entry) => {
                    let given =
                        Ring::refund(&mut entry, table.spec(), now, self.config.own_slot, cost);
                    if given > 0 && entry.mark_dirty() {
                        if let Some(c) = &self.cluster {
                            c.journal.push(m.limit.id, entry.key());
                        }
                    }
                    given
                }
                None => 0,
            };
            refunded = Some(refunded.map_or(given, |r| r.min(given)));
        });
        Ok(refunded.unwrap_or(0))
    }

    /// Frees up to `budget` idle keys per table. New keys already pay for a
    /// little of this; a driver may call it on a timer to return memory sooner.
    pub fn sweep_at(&self, now: Nanos, budget: usize) -> usize {
        let compiled = self.compiled.load();
        compiled.tables.iter().map(|t| t.sweep(now, budget)).sum()
    }

    /// Keys tracked, over all limits.
    pub fn keys_tracked(&self) -> usize {
        self.compiled.load().tables.iter().map(|t| t.len()).sum()
    }

    /// Live keys pushed out by the key cap, over all limits since start.
    pub fn evictions(&self) -> u64 {
        self.sum_stat(|s| s.evictions.load(Ordering::Relaxed))
    }

    /// Keys freed because their window passed, over all limits since start.
    pub fn expirations(&self) -> u64 {
        self.sum_stat(|s| s.expirations.load(Ordering::Relaxed))
    }

    fn sum_stat(&self, f: impl Fn(&TableStats) -> u64) -> u64 {
        self.compiled
            .load()
            .tables
            .iter()
            .map(|t| f(t.stats()))
            .sum()
    }

    /// The key table of the limit at `index` in the rules in force.
    pub fn table(&self, index: usize) -> Option<Arc<KeyTable>> {
        self.compiled.load().tables.get(index).cloned()
    }
}

impl Decision {
    /// Folds one limit's verdict into the decision: `Never` beats a denial,
    /// a denial beats an allowance, a longer wait beats a shorter one, and
    /// among allowances the one with least left describes the decision.
    fn absorb(
        &mut self,
        limit_index: usize,
        limit_id: u64,
        algorithm: &dyn RateAlgorithm,
        verdict: Verdict,
    ) {
        let (outcome, remaining, reset_after, retry_after) = match verdict {
            Verdict::Allow {
                remaining,
                reset_after,
            } => (Outcome::Allowed, remaining, reset_after, Nanos::ZERO),
            Verdict::Deny {
                remaining,
                retry_after,
                reset_after,
            } => (Outcome::Denied, remaining, reset_after, retry_after),
            Verdict::Never { .. } => (Outcome::Never, 0, Nanos::ZERO, Nanos::MAX),
        };
        let candidate = QuotaState {
            limit_index,
            limit_id,
            limit: algorithm.quota(),
            period: algorithm.quota_period(),
            remaining,
            reset_after,
            retry_after,
        };
        let rank = |o: Outcome| match o {
            Outcome::Allowed => 0,
            Outcome::Denied => 1,
            Outcome::Never => 2,
        };
        let replace = match &self.quota {
            None => true,
            Some(cur) => {
                let (new_rank, cur_rank) = (rank(outcome), rank(self.outcome));
                new_rank > cur_rank
                    || (new_rank == cur_rank
                        && match outcome {
                            Outcome::Allowed => remaining < cur.remaining,
                            _ => retry_after > cur.retry_after,
                        })
            }
        };
        if replace {
            self.outcome = outcome;
            self.quota = Some(candidate);
        }
    }
}

/// The `Never` decision when `cost` exceeds what one of the limits at
/// `indices` can ever admit, found without touching any key: such a request
/// must not create entries (a flood of them would evict real keys).
fn never_admissible(
    rules: &RuleSet,
    indices: impl Iterator<Item = usize>,
    now: Nanos,
    cost: u32,
) -> Option<Decision> {
    // Every limit admits at least one hit.
    if cost <= 1 {
        return None;
    }
    let empty = [0u64; MAX_BUCKETS];
    let mut decision: Option<Decision> = None;
    for index in indices {
        let limit = &rules.limits()[index];
        let spec = limit.algorithm.window();
        let counts = WindowCounts {
            spec,
            now,
            nets: &empty[..spec.buckets()],
        };
        let verdict = limit.algorithm.decide(&counts, cost);
        if let Verdict::Never { .. } = verdict {
            decision
                .get_or_insert(Decision {
                    outcome: Outcome::Never,
                    quota: None,
                })
                .absorb(index, limit.id, &limit.algorithm, verdict);
        }
    }
    decision
}

fn compile(
    rules: Arc<RuleSet>,
    config: &LimiterConfig,
    reuse: &HashMap<u64, Arc<KeyTable>>,
) -> Result<Compiled, SetupError> {
    let mut tables = Vec::with_capacity(rules.limits().len());
    for limit in rules.limits() {
        let spec = limit.algorithm.window();
        let table = match reuse.get(&limit.id) {
            Some(t) if *t.spec() == spec && t.slots() == config.slots => t.clone(),
            _ => Arc::new(
                KeyTable::new(spec, config.slots, config.max_keys)
                    .map_err(|source| SetupError::Table {
                        limit: format!("{}#{}", limit.rule, limit.index),
                        source,
                    })?
                    .with_home_slot(config.own_slot),
            ),
        };
        tables.push(table);
    }
    let by_id = rules.limits().iter().map(|l| (l.id, l.index)).collect();
    Ok(Compiled {
        rules,
        tables,
        by_id,
    })
}

/// A decision on a cluster node: the peers' shares are counted as if already
/// arrived, and an allowance is also held to this node's own in-flight share
/// (see `core::share`). The flag says the in-flight share alone refused it.
fn decide_shared(
    view: &ShareView,
    algorithm: &crate::core::algorithm::Algorithm,
    entry: &Entry<'_>,
    nets: &mut [u64],
    now: Nanos,
    cost: u32,
) -> (Verdict, bool) {
    let spec = entry.spec();
    let quota = algorithm.quota();
    if view.members == 1 << view.own {
        // Alone: nobody to reserve for, nobody to wait for.
        return (
            algorithm.decide(&WindowCounts { spec, now, nets }, cost),
            false,
        );
    }
    let mut totals = [0u64; MAX_NODES];
    let totals = &mut totals[..entry.slot_count().min(MAX_NODES)];
    Ring::slot_hits(entry, &spec, now, totals);
    let shares = Shares::new(
        view,
        view.budget(quota, u64::from(MAX_INFLIGHT)),
        quota,
        totals,
    );
    if let Some(last) = nets.last_mut() {
        *last += shares.reserved();
    }
    let inflight = u64::from(entry.inflight());
    // What every peer this node waits for has surely seen of it.
    let acked = totals
        .get(usize::from(view.own))
        .copied()
        .unwrap_or(0)
        .saturating_sub(inflight);
    let verdict = algorithm.decide(&WindowCounts { spec, now, nets }, cost);
    match verdict {
        Verdict::Allow {
            remaining,
            reset_after,
        } if inflight + u64::from(cost) > shares.own_cap(acked) => (
            Verdict::Deny {
                remaining,
                retry_after: view.ack_wait,
                reset_after,
            },
            true,
        ),
        v => (v, false),
    }
}

/// A small vector that stays on the stack for the common case: a check
/// that matches at most `INLINE_MATCHES` limits never allocates.
struct Inline<T, const N: usize> {
    inline: [Option<T>; N],
    len: usize,
    spill: Vec<T>,
}

impl<T, const N: usize> Inline<T, N> {
    fn new() -> Self {
        Inline {
            inline: std::array::from_fn(|_| None),
            len: 0,
            spill: Vec::new(),
        }
    }
    fn push(&mut self, v: T) {
        if self.len < N && self.spill.is_empty() {
            self.inline[self.len] = Some(v);
            self.len += 1;
        } else {
            if self.spill.is_empty() {
                self.spill
                    .extend(self.inline.iter_mut().filter_map(Option::take));
            }
            self.spill.push(v);
        }
    }
    fn iter(&self) -> impl Iterator<Item = &T> {
        self.inline.iter().flatten().chain(self.spill.iter())
    }
    fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.inline
            .iter_mut()
            .flatten()
            .chain(self.spill.iter_mut())
    }
    fn sort_by_key<K: Ord>(&mut self, f: impl Fn(&T) -> K) {
        if self.spill.is_empty() {
            self.inline[..self.len].sort_by_key(|v| v.as_ref().map(&f));
        } else {
            self.spill.sort_by_key(f);
        }
    }
}

type Matches = Inline<(usize, u64), INLINE_MATCHES>;
type Guards<'t> = Inline<(u64, Entry<'t>), INLINE_MATCHES>;

/// Stack space for one window's bucket counts: small windows use a small
/// buffer so that a check does not clear 512 bytes it will not read.
struct CountsBuf {
    small: [u64; 8],
    large: Option<[u64; MAX_BUCKETS]>,
}

impl CountsBuf {
    fn new() -> Self {
        CountsBuf {
            small: [0; 8],
            large: None,
        }
    }
    fn get(&mut self, buckets: usize) -> &mut [u64] {
        if buckets <= self.small.len() {
            &mut self.small[..buckets]
        } else {
            &mut self.large.get_or_insert([0; MAX_BUCKETS])[..buckets]
        }
    }
}
