//! The in-process limiter: rules in, decisions out.
//!
//! [`Limiter::check`] matches a request's descriptors against the rules, and
//! for every limit that applies locks that key's entry in the limit's
//! [`KeyTable`], reads the merged window, asks the algorithm, and, only if
//! every limit allows, counts the hit in this node's own slot. Entries are
//! locked in limit order, so two requests that share keys cannot deadlock,
//! and a denial by one limit leaves all others untouched.

mod confirm;
mod counters;
mod decision;
mod evaluate;
mod handle;
pub mod index;
pub mod journal;
mod judge;
pub mod receipts;
mod requests;
pub mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::algorithm::RateAlgorithm;
use crate::clock::SystemClock;
use crate::descriptor::{self, DescriptorError, Descriptors};
use crate::key::{CounterKey, KeyHasher, KeySeed, LimitId};
use crate::rules::request::{LimitSpec, RequestLimit, RequestLimitError, RequestLimitPolicy};
use crate::rules::{RuleSet, UnknownEndpoint};
use crate::share::ShareView;
use crate::slot::{NodeSlot, SLOT_SPACE};
use crate::time::{Clock, Nanos};
use crate::window::Ring;

pub use confirm::{Finished, Pending, PendingHit, DEFAULT_CONFIRM_HOLD};
pub use counters::CounterView;
pub use decision::{Check, Decided, Decision, Outcome, QuotaState};
pub use evaluate::Begun;
pub use handle::Handle;
pub use journal::{Journal, ShippedKeys};
pub use receipts::{LimitRefund, RefundError, RefundOutcome};
pub use table::{Entry, KeyTable, MemoryBudget, TableError, TableStats, MAX_INFLIGHT};

/// How the limiter is sized and where it sits in the cluster.
#[derive(Clone, Debug)]
pub struct LimiterConfig {
    /// This node's slot in every counter.
    pub own_slot: NodeSlot,
    /// Slots per counter: the most nodes the cluster may have, up to
    /// 65,536 ([`SLOT_SPACE`]).
    pub slots: usize,
    /// Most keys tracked per limit; beyond it the least recently used go.
    pub max_keys: usize,
    /// Most bytes all key tables together may hold (`None`: no budget
    /// beyond `max_keys`); beyond it the limit holding the most gives back
    /// its least recently used keys.
    pub max_memory: Option<usize>,
    /// Seed of key digests, shared by the cluster.
    pub seed: KeySeed,
    /// What requests may ask of request-defined limits.
    pub request_limits: RequestLimitPolicy,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            own_slot: NodeSlot::new(0),
            slots: 1,
            max_keys: 1 << 20,
            max_memory: None,
            seed: KeySeed::default(),
            request_limits: RequestLimitPolicy::default(),
        }
    }
}

/// Why a request could not be checked. Nothing was counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    /// A descriptor is malformed.
    Descriptor(#[from] DescriptorError),
    #[error(transparent)]
    /// The request names an endpoint no rule knows.
    UnknownEndpoint(#[from] UnknownEndpoint),
    #[error(transparent)]
    /// A request-defined limit was refused (off, out of bounds, invalid,
    /// or too many distinct ones on this node).
    RequestLimit(#[from] RequestLimitError),
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
    /// This node's slot is not below the slot count.
    SlotOutOfRange {
        /// The configured own slot.
        own: usize,
        /// The configured slot count.
        slots: usize,
    },
    #[error("limit {limit}: {source}")]
    /// A limit's key table could not be built.
    Table {
        /// The limit, as `rule#index`.
        limit: String,
        /// Why its table could not be built.
        source: TableError,
    },
    #[error("a cluster has at most {SLOT_SPACE} slots (one per node slot number), got {0}")]
    /// More slots than there are node slot numbers ([`SLOT_SPACE`],
    /// 65,536).
    TooManySlots(usize),
}

/// A rule set with a key table per counter: limits of one rule's lists that
/// share a counter (see `rules::limit::limit_id`) share their table.
struct Compiled {
    rules: Arc<RuleSet>,
    /// The table of each limit, by index.
    tables: Vec<Arc<KeyTable>>,
    /// Each limit's place in the lock order: the index of the first limit
    /// of its table, so that limits sharing a table lock it once.
    order: Vec<u32>,
    /// Each counter's first limit, by id.
    by_id: HashMap<LimitId, usize>,
    /// The budget this rule set's bytes are charged to while it lives.
    budget: Arc<MemoryBudget>,
    /// Bytes charged: the rule set and the lists above (the key tables
    /// charge their own).
    bytes: usize,
}

impl Drop for Compiled {
    fn drop(&mut self) {
        self.budget.credit_rules(self.bytes);
    }
}

/// What a clustered limiter adds: shares, the journal of changed keys, and
/// the recovery gate.
struct ClusterHooks {
    view: ArcSwap<ShareView>,
    journal: Arc<Journal>,
    admitting: AtomicBool,
    /// The clock gate: false while this node's clock is further from the
    /// cluster's than the configured bound (`cluster::clock_sync`).
    clock_in_bounds: AtomicBool,
    /// Called when a request was refused only because this node's in-flight
    /// share of a key is spent: shipping now, rather than at the next sync
    /// tick, brings the acknowledgements that free it sooner.
    wake: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Keys under confirmation `(limit, key)` → until when decisions on them
    /// wait for the peers' answers (see `Limiter::begin_at`). The entry's
    /// confirming bit says whether to look here at all.
    confirming: dashmap::DashMap<CounterKey, confirm::Hold>,
    /// How long a key stays under confirmation after a claim on it.
    confirm_hold: std::sync::atomic::AtomicU64,
}

/// The in-process limiter: a rule set, one key table per limit, and for a
/// clustered node the share view, journal and recovery gate. Shared by
/// reference between request tasks; rules are swapped atomically.
pub struct Limiter<C: Clock = SystemClock> {
    clock: C,
    config: LimiterConfig,
    /// Key digests under `config.seed`, its secrets expanded once.
    hasher: KeyHasher,
    /// Bumped after every rule change, so that a [`Handle`] can tell
    /// cheaply whether what it resolved is still in force.
    generation: AtomicU64,
    compiled: ArcSwap<Compiled>,
    cluster: Option<ClusterHooks>,
    receipts: receipts::Receipts,
    budget: Arc<MemoryBudget>,
    /// The tables of request-defined limits, one per bucket grid.
    requests: requests::RequestTables,
}

impl Limiter<SystemClock> {
    /// A limiter on the system clock. Errors if `config` is inconsistent or a
    /// limit's table cannot be built.
    pub fn new(rules: RuleSet, config: LimiterConfig) -> Result<Self, SetupError> {
        Limiter::with_clock(rules, config, SystemClock::raw())
    }
}

impl<C: Clock> Limiter<C> {
    /// A limiter reading time from `clock` (a manual clock in tests). Errors
    /// as [`Limiter::new`].
    pub fn with_clock(rules: RuleSet, config: LimiterConfig, clock: C) -> Result<Self, SetupError> {
        if config.own_slot.index() >= config.slots {
            return Err(SetupError::SlotOutOfRange {
                own: config.own_slot.index(),
                slots: config.slots,
            });
        }
        let budget = Arc::new(MemoryBudget::new(config.max_memory));
        let compiled = compile(Arc::new(rules), &config, &HashMap::new(), &budget)?;
        let receipts = receipts::Receipts::new(
            crate::receipt::ReceiptKey::derive(config.seed),
            run_id(),
            receipts::MAX_SPENT,
        );
        Ok(Limiter {
            clock,
            hasher: KeyHasher::new(config.seed),
            generation: AtomicU64::new(0),
            requests: requests::RequestTables::new(config.request_limits),
            config,
            compiled: ArcSwap::from_pointee(compiled),
            cluster: None,
            receipts,
            budget,
        })
    }

    /// Makes this limiter a cluster node: decisions reserve the peers'
    /// shares described by `view`, every local change is journaled for the
    /// replicator, and nothing is admitted until [`Limiter::set_admitting`]
    /// says the node has recovered its counts.
    pub fn clustered(mut self, view: ShareView) -> Result<Self, SetupError> {
        // Any cluster size the slot numbers can name: peer sets and the
        // key table's cells hold every slot up to `u16::MAX`.
        if self.config.slots > SLOT_SPACE {
            return Err(SetupError::TooManySlots(self.config.slots));
        }
        self.cluster = Some(ClusterHooks {
            view: ArcSwap::from_pointee(view),
            journal: Arc::new(Journal::default()),
            admitting: AtomicBool::new(false),
            clock_in_bounds: AtomicBool::new(true),
            wake: std::sync::OnceLock::new(),
            confirming: dashmap::DashMap::new(),
            confirm_hold: std::sync::atomic::AtomicU64::new(DEFAULT_CONFIRM_HOLD.as_u64()),
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
    #[cfg(feature = "cluster")]
    pub(crate) fn set_share_view(&self, view: ShareView) {
        if let Some(c) = &self.cluster {
            c.view.store(Arc::new(view));
        }
    }

    /// The cluster picture in force; `None` when not clustered.
    pub fn share_view(&self) -> Option<Arc<ShareView>> {
        self.cluster.as_ref().map(|c| c.view.load_full())
    }

    /// Keys changed locally, for the replicator. `None` when not clustered.
    #[cfg(feature = "cluster")]
    pub(crate) fn journal(&self) -> Option<&Arc<Journal>> {
        self.cluster.as_ref().map(|c| &c.journal)
    }

    /// Opens (or closes) the recovery gate of a clustered limiter.
    pub fn set_admitting(&self, admitting: bool) {
        if let Some(c) = &self.cluster {
            c.admitting.store(admitting, Ordering::Release);
        }
    }

    /// False while a clustered node is still recovering its counts, or
    /// while its clock is off the cluster's by more than the bound.
    pub fn is_admitting(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| {
            c.admitting.load(Ordering::Acquire) && c.clock_in_bounds.load(Ordering::Acquire)
        })
    }

    /// Opens (or closes) the clock gate of a clustered limiter: closed, the
    /// node admits nothing (as while recovering), because its windows would
    /// not be the cluster's.
    pub fn set_clock_in_bounds(&self, in_bounds: bool) {
        if let Some(c) = &self.cluster {
            c.clock_in_bounds.store(in_bounds, Ordering::Release);
        }
    }

    /// False while the clock gate is closed.
    pub fn clock_in_bounds(&self) -> bool {
        self.cluster
            .as_ref()
            .is_none_or(|c| c.clock_in_bounds.load(Ordering::Acquire))
    }

    /// The key table of the limit with stable id `id`: a limit of the rules
    /// in force, or the grid of request-defined limits this node has.
    pub(crate) fn table_by_id(&self, id: LimitId) -> Option<Arc<KeyTable>> {
        let compiled = self.compiled.load();
        match compiled.by_id.get(&id) {
            Some(&i) => Some(compiled.tables[i].clone()),
            None => self.requests.get(id),
        }
    }

    /// [`Limiter::table_by_id`], making the table of a request-defined
    /// limits' grid this node has not seen yet (a peer's counts, a
    /// snapshot's), as far as the operator's bound allows.
    pub(crate) fn table_for_merge(&self, id: LimitId) -> Option<Arc<KeyTable>> {
        self.table_by_id(id)
            .or_else(|| self.requests.get_or_make(id, &self.config, &self.budget))
    }

    /// Every `(limit id, table)`, each table once: the rules in force, then
    /// the grids of request-defined limits.
    pub fn tables(&self) -> Vec<(LimitId, Arc<KeyTable>)> {
        let compiled = self.compiled.load();
        // Each table once: limits that share a counter share its table.
        let mut all: Vec<(LimitId, Arc<KeyTable>)> = compiled
            .rules
            .limits()
            .iter()
            .zip(&compiled.tables)
            .filter(|(l, _)| compiled.order[l.index] as usize == l.index)
            .map(|(l, t)| (l.id, t.clone()))
            .collect();
        all.extend(self.requests.all());
        all
    }

    /// What requests may ask of request-defined limits here: the policy a
    /// front-end checks a request's own limit against
    /// (`RequestLimit::new`).
    pub fn request_limit_policy(&self) -> &RequestLimitPolicy {
        self.requests.policy()
    }

    /// The check of `d` at `cost` a front-end builds from a request:
    /// against the rules, or, when the request carries a limit of its own,
    /// against that limit alone, refused when it is beyond this node's
    /// policy (nothing counted).
    pub fn request_check<'d>(
        &self,
        d: Descriptors<'d>,
        cost: u32,
        limit: Option<&LimitSpec>,
    ) -> Result<Check<'d>, CheckError> {
        let Some(spec) = limit else {
            return Ok(Check::new(d, cost));
        };
        let limit = RequestLimit::new(spec, self.request_limit_policy())?;
        Ok(Check::with_limit(d, cost, Arc::new(limit)))
    }

    /// Distinct parameter sets of request-defined limits remembered now.
    pub fn request_parameter_sets(&self) -> usize {
        self.requests.parameter_sets()
    }

    /// The configuration this limiter was built with.
    pub fn config(&self) -> &LimiterConfig {
        &self.config
    }

    /// The clock decisions are made on.
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
        let by_id: HashMap<LimitId, Arc<KeyTable>> = old
            .rules
            .limits()
            .iter()
            .zip(&old.tables)
            .map(|(l, t)| (l.id, t.clone()))
            .collect();
        let compiled = compile(Arc::new(rules), &self.config, &by_id, &self.budget)?;
        self.compiled.store(Arc::new(compiled));
        self.generation.fetch_add(1, Ordering::Release);
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
    ///
    /// A clustered node that could only decide exactly by asking its peers
    /// (see `Limiter::begin_at`) answers here with a denial and a
    /// `retry_after` of one acknowledgement wait instead: this call never
    /// waits. Callers that can wait decide through
    /// [`crate::decide::Decider`].
    pub fn check_at(
        &self,
        now: Nanos,
        d: &Descriptors<'_>,
        cost: u32,
    ) -> Result<Decision, CheckError> {
        if self.cluster.is_none() {
            return self.decide_check_alone(now, d, cost);
        }
        let check = Check::new(*d, cost);
        self.check_all_at(now, std::slice::from_ref(&check))
            .map(|decided| decided.decision())
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

    /// [`Limiter::refund`] at time `now`.
    pub fn refund_at(&self, now: Nanos, d: &Descriptors<'_>, cost: u32) -> Result<u32, CheckError> {
        let compiled = self.compiled.load();
        compiled.rules.check_endpoint(d)?;
        let mut refunded: Option<u32> = None;
        compiled.rules.for_each_match(d, |m| {
            let values = m.key_fields.iter().map(|f| d.get(f).unwrap_or(""));
            let key = self.hasher.key(m.limit.id, values);
            let table = &compiled.tables[m.limit.index];
            let given = match table.get(key) {
                Some(mut entry) => {
                    let given =
                        Ring::refund(&mut entry, table.spec(), now, self.config.own_slot, cost);
                    if given > 0 && entry.mark_dirty() {
                        if let Some(c) = &self.cluster {
                            c.journal.push(CounterKey::new(m.limit.id, entry.key()));
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
        self.prune_confirming(now);
        let freed = self
            .tables()
            .iter()
            .map(|(_, t)| t.sweep(now, budget))
            .sum();
        self.requests.sweep();
        freed
    }

    /// The node's memory budget: bytes held by every key table, the limit
    /// (`max_memory`) and the keys evicted to keep it.
    pub fn memory(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Bytes held by the rules in force (compiled rule set and the key
    /// tables' fixed parts), counted against the memory budget: see
    /// [`MemoryBudget::rules_bytes`].
    pub fn rules_memory(&self) -> usize {
        self.budget.rules_bytes()
    }

    /// Keys tracked, over all limits.
    pub fn keys_tracked(&self) -> usize {
        self.tables().iter().map(|(_, t)| t.len()).sum()
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
        self.tables().iter().map(|(_, t)| f(t.stats())).sum()
    }

    /// The key table of the limit at `index` in the rules in force.
    pub fn table(&self, index: usize) -> Option<Arc<KeyTable>> {
        self.compiled.load().tables.get(index).cloned()
    }
}

/// A random id for this run of the limiter (it ties receipts to the run
/// that issued them), from the operating system's randomness as the
/// standard library's hash maps draw it: no random-number crate for one
/// number.
fn run_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn compile(
    rules: Arc<RuleSet>,
    config: &LimiterConfig,
    reuse: &HashMap<LimitId, Arc<KeyTable>>,
    budget: &Arc<MemoryBudget>,
) -> Result<Compiled, SetupError> {
    let mut tables: Vec<Arc<KeyTable>> = Vec::with_capacity(rules.limits().len());
    let mut order = Vec::with_capacity(rules.limits().len());
    // Limits of one rule's lists that share a counter share its table.
    let mut by_id: HashMap<LimitId, usize> = HashMap::new();
    for limit in rules.limits() {
        if let Some(&first) = by_id.get(&limit.id) {
            tables.push(tables[first].clone());
            order.push(first as u32);
            continue;
        }
        by_id.insert(limit.id, limit.index);
        order.push(limit.index as u32);
        let spec = limit.algorithm.window();
        let table = match reuse.get(&limit.id) {
            Some(t) if *t.spec() == spec && t.slots() == config.slots => t.clone(),
            _ => {
                let table = Arc::new(
                    KeyTable::new(spec, config.slots, config.max_keys)
                        .map_err(|source| SetupError::Table {
                            limit: format!("{}#{}", limit.rule, limit.index),
                            source,
                        })?
                        .with_home_slot(config.own_slot)
                        .with_budget(budget.clone()),
                );
                let weak: std::sync::Weak<dyn table::Reclaim> =
                    Arc::downgrade(&table) as std::sync::Weak<dyn table::Reclaim>;
                budget.register(weak);
                table
            }
        };
        tables.push(table);
    }
    use std::mem::size_of;
    let bytes = rules.heap_bytes()
        + tables.capacity() * size_of::<Arc<KeyTable>>()
        + order.capacity() * size_of::<u32>()
        // A hash map slot is the entry and a control byte.
        + by_id.capacity() * (size_of::<(LimitId, usize)>() + 1);
    budget.charge_rules(bytes);
    Ok(Compiled {
        rules,
        tables,
        order,
        by_id,
        budget: budget.clone(),
        bytes,
    })
}
