//! The in-process limiter: rules in, decisions out.
//!
//! [`Limiter::check`] matches a request's descriptors against the rules, and
//! for every limit that applies locks that key's entry in the limit's
//! [`KeyTable`], reads the merged window, asks the algorithm, and, only if
//! every limit allows, counts the hit in this node's own slot. Entries are
//! locked in limit order, so two requests that share keys cannot deadlock,
//! and a denial by one limit leaves all others untouched.

mod handle;
pub mod index;
pub mod journal;
pub mod receipts;
pub mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::algorithm::{RateAlgorithm, Summary, Verdict};
use crate::clock::SystemClock;
use crate::descriptor::{self, DescriptorError, Descriptors};
use crate::key::{KeyHasher, KeySeed};
use crate::rules::{CompiledLimit, RuleName, RuleSet, UnknownEndpoint};
use crate::share::{ShareView, Shares, MAX_NODES};
use crate::slot::NodeSlot;
use crate::time::{Clock, Nanos};
use crate::window::{Ring, SlotGrid, WindowCounts, MAX_BUCKETS, SMALL_RING};

pub use handle::Handle;
pub use journal::Journal;
pub use receipts::{LimitRefund, RefundError, RefundOutcome};
pub use table::{Entry, KeyTable, MemoryBudget, TableError, TableStats, MAX_INFLIGHT};

/// How the limiter is sized and where it sits in the cluster.
#[derive(Clone, Debug)]
pub struct LimiterConfig {
    /// This node's slot in every counter.
    pub own_slot: NodeSlot,
    /// Slots per counter: the most nodes the cluster may have.
    pub slots: usize,
    /// Most keys tracked per limit; beyond it the least recently used go.
    pub max_keys: usize,
    /// Most bytes all key tables together may hold (`None`: no budget
    /// beyond `max_keys`); beyond it the limit holding the most gives back
    /// its least recently used keys.
    pub max_memory: Option<usize>,
    /// Seed of key digests, shared by the cluster.
    pub seed: KeySeed,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            own_slot: NodeSlot::new(0),
            slots: 1,
            max_keys: 1 << 20,
            max_memory: None,
            seed: KeySeed::default(),
        }
    }
}

/// The outcome of a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every matching limit allows; the hit is counted.
    Allowed,
    /// Some limit denies; nothing is counted.
    Denied,
    /// The cost is larger than a matching limit can ever admit.
    Never,
}

/// The decision for one request, described by the limit that decided it:
/// the one that denied (the longest wait if several did), or when all
/// allowed the one with the least left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Allowed, denied, or never admissible.
    pub outcome: Outcome,
    /// The deciding limit, or `None` when no limit applied.
    pub quota: Option<QuotaState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// Where the deciding limit stands for the request's key, as the API
/// reports it (remaining quota, reset and retry times).
pub struct QuotaState {
    /// Position of the limit in the rule set that decided (`RuleSet::limits`).
    pub limit_index: usize,
    /// Name of the rule the deciding limit belongs to, taken when the
    /// decision was made (so it stays right across a reload).
    pub rule: RuleName,
    /// The limit's stable id.
    pub limit_id: u64,
    /// The limit's quota per period.
    pub limit: u64,
    /// The limit's period.
    pub period: Nanos,
    /// Cost units left in the quota after this request (when denied: left
    /// now, less than the cost).
    pub remaining: u64,
    /// Time until the quota is whole again if nothing else arrives.
    pub reset_after: Nanos,
    /// Zero when allowed.
    pub retry_after: Nanos,
}

impl Decision {
    /// True when the request was admitted.
    pub fn is_allowed(&self) -> bool {
        self.outcome == Outcome::Allowed
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
    #[error("a cluster has at most {MAX_NODES} slots, got {0}")]
    /// More slots than [`MAX_NODES`].
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
    /// Keys under confirmation `(limit, key)` → until when decisions on them
    /// wait for the peers' answers (see [`Limiter::begin_at`]). The entry's
    /// confirming bit says whether to look here at all.
    confirming: dashmap::DashMap<(u64, u64), Hold>,
    /// How long a key stays under confirmation after a claim on it.
    confirm_hold: std::sync::atomic::AtomicU64,
}

/// A key under confirmation: until when, and the peers' claims on it that
/// may still be undecided (`(slot, when the claim's hit was counted, until
/// when it can be pending)`), which decide who yields in a conflict.
#[derive(Clone, Debug, Default)]
struct Hold {
    until: Nanos,
    claims: Vec<(u16, Nanos, Nanos)>,
}

/// Most peers' claims remembered per held key; older ones are forgotten
/// (a forgotten claim only makes a conflict end in two refusals).
const MAX_HELD_CLAIMS: usize = 8;

/// How a confirmed request ended, or why its decision must wait a little.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// The request's final decision; if allowed, its hits stay counted.
    Decided(Decision),
    /// Refused as things stand, but peers (bit per slot) hold claims on
    /// the same keys that were counted later than this one and may still be
    /// undecided: their losers give their hits back at once, so decide
    /// again when a frame from one of them arrives (or refuse at the
    /// claim's deadline). The earlier claim wins a conflict, as a single
    /// node deciding in arrival order would.
    Yield {
        /// A bit per peer slot whose claims this request waits on.
        blocking: u64,
    },
}

/// How long a key stays under confirmation after a claim, unless the node
/// says otherwise: twice the default claim timeout.
pub const DEFAULT_CONFIRM_HOLD: Nanos = Nanos::from_millis(100);

/// Hits counted provisionally by [`Limiter::begin_at`]: the request is
/// admitted only if, once every peer it waits for has answered with its own
/// counts, the limits still allow it ([`Limiter::finish_at`]); otherwise the
/// hits are given back.
#[derive(Clone, Debug)]
pub struct Pending {
    /// Hits charged per applicable limit.
    pub cost: u32,
    /// When the hits were counted.
    pub started: Nanos,
    /// The provisional hits, one per applicable limit.
    pub hits: Vec<PendingHit>,
    /// What the request would be answered if admitted (its quota report).
    pub provisional: Decision,
    /// When [`Limiter::finish_at`] judged it (and where its hits now sit):
    /// the arrival, or the start of a later bucket if the ring moved on.
    pub judged_at: Nanos,
}

/// One provisional hit: where it was counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingHit {
    /// The limit's stable id.
    pub limit: u64,
    /// The key's digest.
    pub key: u64,
    /// The epoch of the window bucket the hit was counted in.
    pub epoch: u64,
}

/// What [`Limiter::begin_at`] did with a request.
#[derive(Clone, Debug)]
pub enum Begun {
    /// Decided at once, from local memory.
    Decided(Decision),
    /// Counted provisionally; the peers' answers decide it.
    Confirm(Pending),
}

/// Most limits one request may match before the check falls back to a heap
/// buffer.
const INLINE_MATCHES: usize = 8;

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
}

impl Limiter<SystemClock> {
    /// A limiter on the system clock. Errors if `config` is inconsistent or a
    /// limit's table cannot be built.
    pub fn new(rules: RuleSet, config: LimiterConfig) -> Result<Self, SetupError> {
        Limiter::with_clock(rules, config, SystemClock)
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
            rand::random(),
            receipts::MAX_SPENT,
        );
        Ok(Limiter {
            clock,
            hasher: KeyHasher::new(config.seed),
            generation: AtomicU64::new(0),
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
        if self.config.slots > MAX_NODES {
            return Err(SetupError::TooManySlots(self.config.slots));
        }
        self.cluster = Some(ClusterHooks {
            view: ArcSwap::from_pointee(view),
            journal: Arc::new(Journal::default()),
            admitting: AtomicBool::new(false),
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
    pub fn set_share_view(&self, view: ShareView) {
        if let Some(c) = &self.cluster {
            c.view.store(Arc::new(view));
        }
    }

    /// The cluster picture in force; `None` when not clustered.
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
        let by_id: HashMap<u64, Arc<KeyTable>> = old
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
    /// (see [`Limiter::begin_at`]) answers here with a denial and a
    /// `retry_after` of one acknowledgement wait instead: this call never
    /// waits. Callers that can wait use `begin_at`.
    pub fn check_at(
        &self,
        now: Nanos,
        d: &Descriptors<'_>,
        cost: u32,
    ) -> Result<Decision, CheckError> {
        match self.evaluate(now, d, cost, false)? {
            Begun::Decided(decision) => Ok(decision),
            // Not produced when confirmation is off; deny rather than panic.
            Begun::Confirm(p) => {
                self.give_back(now, &p);
                Ok(self.denied_for_now(&p))
            }
        }
    }

    /// Starts a check of `cost` hits now: see [`Limiter::begin_at`].
    pub fn begin(&self, d: &Descriptors<'_>, cost: u32) -> Result<Begun, CheckError> {
        self.begin_at(self.clock.now(), d, cost)
    }

    /// Starts a check that may need the peers' confirmation.
    ///
    /// Most requests are decided at once from local memory
    /// ([`Begun::Decided`]): while a key is far enough from its limit that
    /// the peers' reserved in-flight shares fit, the decision is safe
    /// whatever they are doing. Near the limit (within the peers' shares of
    /// it, which for small limits is always), or when a peer has asked to
    /// confirm a hit on the key, a request the merged counts allow is
    /// counted provisionally and returned as [`Begun::Confirm`]: the caller
    /// sends the provisional values to every peer it waits for, each answers
    /// with its own current counts, and [`Limiter::finish_at`] decides
    /// exactly on what they said. A request the merged counts deny is
    /// denied at once: counts only grow, so the denial is exact.
    pub fn begin_at(
        &self,
        now: Nanos,
        d: &Descriptors<'_>,
        cost: u32,
    ) -> Result<Begun, CheckError> {
        self.evaluate(now, d, cost, true)
    }

    fn evaluate(
        &self,
        now: Nanos,
        d: &Descriptors<'_>,
        cost: u32,
        can_confirm: bool,
    ) -> Result<Begun, CheckError> {
        let compiled = self.compiled.load();
        let mut matches = Matches::new();
        self.resolve(&compiled, d, &mut matches)?;
        if !self.is_admitting() {
            return Err(CheckError::Recovering);
        }
        Ok(self.decide(&compiled, now, matches.as_slice(), cost, can_confirm))
    }

    /// The limits that apply to `d` under `compiled`, each with its key,
    /// sorted by limit (the lock order). The key material is hashed once
    /// per matching rule; each limit's key is derived from that digest.
    fn resolve(
        &self,
        compiled: &Compiled,
        d: &Descriptors<'_>,
        matches: &mut Matches,
    ) -> Result<(), CheckError> {
        compiled.rules.check_endpoint(d)?;
        let hasher = &self.hasher;
        compiled.rules.for_each_rule_match(d, |m| {
            let digest = hasher.values(m.key_fields.iter().map(|f| d.get(f).unwrap_or("")));
            for limit in m.limits {
                matches.push((limit.index, hasher.for_limit(limit.id, digest)));
            }
        });
        // Lock order: by limit, so that requests sharing keys cannot deadlock.
        matches.sort();
        Ok(())
    }

    /// [`Limiter::decide`] for one limit on a limiter with no peers: the
    /// same steps without the bookkeeping of several keys. `hint` is where
    /// the caller last found the key ([`KeyTable::get_or_insert_hinted`];
    /// [`table::NO_HINT`] if it keeps none).
    #[inline]
    fn decide_alone(
        &self,
        compiled: &Compiled,
        now: Nanos,
        index: usize,
        key: u64,
        cost: u32,
        hint: &mut u32,
    ) -> Decision {
        if let Some(never) = never_admissible(&compiled.rules, std::iter::once(index), now, cost) {
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
    /// sorted by limit index into `compiled`).
    fn decide(
        &self,
        compiled: &Compiled,
        now: Nanos,
        matches: &[(usize, u64)],
        cost: u32,
        can_confirm: bool,
    ) -> Begun {
        if let (None, &[(index, key)]) = (&self.cluster, matches) {
            // The common case in process: one limit, no peers.
            let mut hint = table::NO_HINT;
            return Begun::Decided(self.decide_alone(compiled, now, index, key, cost, &mut hint));
        }
        if let Some(never) =
            never_admissible(&compiled.rules, matches.iter().map(|m| m.0), now, cost)
        {
            return Begun::Decided(never);
        }
        let view = self.cluster.as_ref().map(|c| c.view.load());
        let mut entries = Guards::new();
        let mut decision = Decision {
            outcome: Outcome::Allowed,
            quota: None,
        };
        let mut counts = CountsBuf::new();
        let mut confirm = false;
        for &(index, key) in matches {
            let table = &compiled.tables[index];
            let spec = table.spec();
            let mut entry = table.get_or_insert(key, now);
            let limit = &compiled.rules.limits()[index];
            let algorithm = &limit.algorithm;
            let mut summary = None;
            let verdict = match view.as_deref() {
                None => {
                    let (verdict, s) = judge_alone(&entry, algorithm, now, cost, &mut counts);
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
                        cost,
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
            decision.absorb(limit, verdict);
            entries.push((limit.id, entry, summary));
        }
        if decision.outcome == Outcome::Allowed && cost > 0 {
            let journal = self.cluster.as_ref().map(|c| &c.journal);
            let mut pending = confirm.then(|| Pending {
                cost,
                started: now,
                hits: Vec::new(),
                provisional: decision,
                judged_at: now,
            });
            for (limit_id, entry, summary) in entries.iter_mut() {
                // Every entry of one check lives in its own limit's table.
                let epoch = count_hit(entry, now, self.config.own_slot, cost, *summary);
                if let Some(journal) = journal {
                    match pending.as_mut() {
                        // Confirmed hits are seen by every peer waited for
                        // before they are admitted: not in flight.
                        Some(p) => {
                            p.hits.push(PendingHit {
                                limit: *limit_id,
                                key: entry.key(),
                                epoch,
                            });
                            self.hold_confirming(entry, *limit_id, now);
                        }
                        None => entry.add_unshipped(cost),
                    }
                    if entry.mark_dirty() {
                        journal.push(*limit_id, entry.key());
                    }
                }
            }
            if let Some(p) = pending {
                return Begun::Confirm(p);
            }
        }
        Begun::Decided(decision)
    }

    /// Decides a request that [`Limiter::begin_at`] counted provisionally,
    /// once the peers have answered: `answered` is the set of peer slots
    /// (bit per slot) whose answers carried their own counts of the keys,
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
    pub fn finish_at(&self, now: Nanos, pending: &mut Pending, answered: Option<u64>) -> Decision {
        match self.finish_or_yield_at(now, pending, answered, false) {
            Finished::Decided(d) => d,
            // Not produced without `may_yield`.
            Finished::Yield { .. } => self.denied_for_now(pending),
        }
    }

    /// [`Limiter::finish_at`], except that a refusal caused by peers' claims
    /// counted later than this one (while they may still be undecided) is
    /// answered with [`Finished::Yield`] when `may_yield`: nothing is given
    /// back, and the caller decides again after hearing from them.
    pub fn finish_or_yield_at(
        &self,
        now: Nanos,
        pending: &mut Pending,
        answered: Option<u64>,
        may_yield: bool,
    ) -> Finished {
        let Some(answered) = answered else {
            self.give_back(now, pending);
            return Finished::Decided(self.denied_for_now(pending));
        };
        let compiled = self.compiled.load();
        let view = self.cluster.as_ref().map(|c| c.view.load_full());
        let mut decision = Decision {
            outcome: Outcome::Allowed,
            quota: None,
        };
        let mut counts = CountsBuf::new();
        let cost = pending.cost;
        let mut judged_at = pending.started;
        for hit in pending.hits.iter_mut() {
            // A limit removed by a reload in the meantime no longer applies.
            let Some(&index) = compiled.by_id.get(&hit.limit) else {
                continue;
            };
            let table = &compiled.tables[index];
            let limit = &compiled.rules.limits()[index];
            let spec = *table.spec();
            let Some(mut entry) = table.get(hit.key) else {
                continue;
            };
            // As of the arrival, unless a later hit has since moved the
            // ring on and wiped a bucket that window needs: then as of the
            // start of the newest bucket (the earliest moment the ring still
            // holds whole).
            let newest = entry.newest(spec.epoch(now));
            let at = pending.started.max(spec.epoch_start(newest)).min(now);
            if spec.epoch(at) != hit.epoch {
                // Judged later than it was counted: count it where it is
                // judged, as the algorithm would place it.
                let own = self.config.own_slot;
                Ring::refund_epoch(&mut entry, &spec, now, own, hit.epoch, cost);
                hit.epoch = Ring::add(&mut entry, &spec, at, own, cost);
                if entry.mark_dirty() {
                    if let Some(c) = &self.cluster {
                        c.journal.push(hit.limit, hit.key);
                    }
                }
            }
            judged_at = judged_at.max(at);
            let nets = counts.get(spec.buckets());
            Ring::read(&entry, &spec, at, nets);
            // Judge the request as if not yet counted.
            if let Some(i) = Ring::read_index(&spec, at, hit.epoch) {
                nets[i] = nets[i].saturating_sub(u64::from(cost));
            }
            if let Some(view) = view.as_deref() {
                let silent = view.reserve & !answered & !(1u64 << view.own);
                if silent != 0 {
                    let mut totals = [0u64; MAX_NODES];
                    let totals = &mut totals[..entry.slot_count().min(MAX_NODES)];
                    Ring::slot_hits(&entry, &spec, at, totals);
                    let quota = limit.algorithm.quota();
                    let shares = Shares::new(
                        view,
                        view.budget(quota, u64::from(MAX_INFLIGHT)),
                        quota,
                        totals,
                    );
                    if let Some(last) = nets.last_mut() {
                        *last += shares.reserved_for(silent);
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
            decision.absorb(limit, verdict);
        }
        pending.judged_at = judged_at;
        // Waits were computed from the judgement; the answer leaves now.
        let waited = now.saturating_sub(judged_at);
        if let Some(q) = decision.quota.as_mut() {
            q.reset_after = q.reset_after.saturating_sub(waited);
            if q.retry_after != Nanos::MAX {
                q.retry_after = q.retry_after.saturating_sub(waited);
            }
        }
        if decision.outcome == Outcome::Denied && may_yield {
            let blocking = self.later_claims(now, pending);
            if blocking != 0 {
                return Finished::Yield { blocking };
            }
        }
        if decision.outcome != Outcome::Allowed {
            self.give_back(now, pending);
        }
        Finished::Decided(decision)
    }

    /// Peers (bit per slot) holding claims on `pending`'s keys that were
    /// counted after it (ties by slot) and may still be undecided.
    fn later_claims(&self, now: Nanos, pending: &Pending) -> u64 {
        let Some(c) = &self.cluster else {
            return 0;
        };
        let own = self.config.own_slot.index() as u16;
        let mine = (pending.started, own);
        let mut blocking = 0u64;
        for hit in &pending.hits {
            if let Some(hold) = c.confirming.get(&(hit.limit, hit.key)) {
                for &(slot, started, until) in &hold.claims {
                    if until > now && (started, slot) > mine && usize::from(slot) < MAX_NODES {
                        blocking |= 1 << slot;
                    }
                }
            }
        }
        blocking
    }

    /// The answer to a provisional request that cannot wait any longer,
    /// without giving its hits back (whoever still holds the request will).
    pub fn refused_pending(&self, pending: &Pending) -> Decision {
        self.denied_for_now(pending)
    }

    /// The answer to a provisional request whose confirmation did not
    /// complete: denied, retry after one acknowledgement wait.
    fn denied_for_now(&self, pending: &Pending) -> Decision {
        let wait = self
            .cluster
            .as_ref()
            .map_or(Nanos::from_millis(10), |c| c.view.load().ack_wait);
        Decision {
            outcome: Outcome::Denied,
            quota: pending.provisional.quota.map(|q| QuotaState {
                retry_after: wait,
                ..q
            }),
        }
    }

    /// Takes back the provisional hits of a refused request.
    pub fn give_back(&self, now: Nanos, pending: &Pending) {
        let compiled = self.compiled.load();
        for hit in &pending.hits {
            let Some(&index) = compiled.by_id.get(&hit.limit) else {
                continue;
            };
            let table = &compiled.tables[index];
            let spec = *table.spec();
            let Some(mut entry) = table.get(hit.key) else {
                continue;
            };
            let given = Ring::refund_epoch(
                &mut entry,
                &spec,
                now,
                self.config.own_slot,
                hit.epoch,
                pending.cost,
            );
            if given > 0 && entry.mark_dirty() {
                if let Some(c) = &self.cluster {
                    c.journal.push(hit.limit, hit.key);
                }
            }
        }
    }

    /// Sets how long a key stays under confirmation after a claim on it.
    /// It must exceed the longest a claimant waits for answers.
    pub fn set_confirm_hold(&self, hold: Nanos) {
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
    pub fn hold_keys(&self, now: Nanos, keys: &[(u64, u64)], claim: Option<(u16, Nanos)>) {
        for &(limit, key) in keys {
            if let Some(table) = self.table_by_id(limit) {
                if let Some(mut entry) = table.get(key) {
                    self.hold_confirming(&mut entry, limit, now);
                    if let (Some((slot, started)), Some(c)) = (claim, &self.cluster) {
                        let until = now + Nanos::new(c.confirm_hold.load(Ordering::Relaxed));
                        if let Some(mut hold) = c.confirming.get_mut(&(limit, key)) {
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

    fn hold_confirming(&self, entry: &mut Entry<'_>, limit: u64, now: Nanos) {
        if let Some(c) = &self.cluster {
            let until = now + Nanos::new(c.confirm_hold.load(Ordering::Relaxed));
            entry.set_confirming(true);
            let mut hold = c.confirming.entry((limit, entry.key())).or_default();
            if hold.until < until {
                hold.until = until;
            }
        }
    }

    /// Whether decisions on this entry must be confirmed; clears a hold
    /// that has passed.
    fn is_confirming(&self, entry: &mut Entry<'_>, limit: u64, now: Nanos) -> bool {
        if !entry.is_confirming() {
            return false;
        }
        let Some(c) = &self.cluster else {
            return false;
        };
        let key = (limit, entry.key());
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
    pub fn prune_confirming(&self, now: Nanos) {
        if let Some(c) = &self.cluster {
            c.confirming.retain(|_, h| h.until > now);
        }
    }

    /// Keys currently under confirmation, for metrics.
    pub fn keys_confirming(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.confirming.len())
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
        self.prune_confirming(now);
        let compiled = self.compiled.load();
        compiled.tables.iter().map(|t| t.sweep(now, budget)).sum()
    }

    /// The node's memory budget: bytes held by every key table, the limit
    /// (`max_memory`) and the keys evicted to keep it.
    pub fn memory(&self) -> &MemoryBudget {
        &self.budget
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
    /// The decision of one limit's verdict.
    #[inline]
    fn of(limit: &CompiledLimit, verdict: Verdict) -> Decision {
        let mut decision = Decision {
            outcome: Outcome::Allowed,
            quota: None,
        };
        decision.absorb(limit, verdict);
        decision
    }

    /// Folds one limit's verdict into the decision: `Never` beats a denial,
    /// a denial beats an allowance, a longer wait beats a shorter one, and
    /// among allowances the one with least left describes the decision.
    #[inline]
    fn absorb(&mut self, limit: &CompiledLimit, verdict: Verdict) {
        let algorithm = &limit.algorithm;
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
            limit_index: limit.index,
            limit_id: limit.id,
            rule: limit.rule_name,
            limit: algorithm.quota(),
            period: algorithm.quota_period(),
            remaining,
            reset_after,
            retry_after,
        };
        if self.quota.is_none() {
            self.outcome = outcome;
            self.quota = Some(candidate);
            return;
        }
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
#[inline]
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
    never_admissible_cost(rules, indices, now, cost)
}

/// [`never_admissible`] once the cost is above one: out of line, so that
/// the common single-hit check stays a compare.
fn never_admissible_cost(
    rules: &RuleSet,
    indices: impl Iterator<Item = usize>,
    now: Nanos,
    cost: u32,
) -> Option<Decision> {
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
                .absorb(limit, verdict);
        }
    }
    decision
}

fn compile(
    rules: Arc<RuleSet>,
    config: &LimiterConfig,
    reuse: &HashMap<u64, Arc<KeyTable>>,
    budget: &Arc<MemoryBudget>,
) -> Result<Compiled, SetupError> {
    let mut tables = Vec::with_capacity(rules.limits().len());
    for limit in rules.limits() {
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
    let by_id = rules.limits().iter().map(|l| (l.id, l.index)).collect();
    Ok(Compiled {
        rules,
        tables,
        by_id,
    })
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
    algorithm: &crate::algorithm::Algorithm,
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
struct Judged {
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

/// A decision on a cluster node (see `share`). A request that the
/// merged counts refuse is refused (counts only grow: exact). One that fits
/// even with every peer's in-flight share counted as already arrived, and
/// within this node's own in-flight share, is admitted at once. Anything
/// else is near the limit: with `can_confirm` it is confirmed with the
/// peers (exact, one round trip), otherwise refused for one
/// acknowledgement wait.
#[allow(clippy::too_many_arguments)]
fn decide_shared(
    view: &ShareView,
    algorithm: &crate::algorithm::Algorithm,
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
struct Matches {
    inline: [(usize, u64); INLINE_MATCHES],
    len: usize,
    spill: Vec<(usize, u64)>,
}

impl Matches {
    fn new() -> Self {
        Matches {
            inline: [(0, 0); INLINE_MATCHES],
            len: 0,
            spill: Vec::new(),
        }
    }
    #[inline]
    fn push(&mut self, m: (usize, u64)) {
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
    fn as_slice(&self) -> &[(usize, u64)] {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }
    fn sort(&mut self) {
        if self.spill.is_empty() {
            if self.len > 1 {
                self.inline[..self.len].sort_unstable_by_key(|m| m.0);
            }
        } else {
            self.spill.sort_unstable_by_key(|m| m.0);
        }
    }
}

/// The locked entries of one check: on the stack up to `INLINE_MATCHES`.
/// Each with its limit's id and, for a window algorithm on a lone node, the
/// window's summary before this request.
type Guards<'t> = smallvec::SmallVec<[(u64, Entry<'t>, Option<Judged>); INLINE_MATCHES]>;

/// Stack space for one window's bucket counts: common windows use a small
/// buffer so that a check does not clear 512 bytes it will not read, and a
/// check decided from a key's memo clears none.
struct CountsBuf {
    small: Option<[u64; SMALL_RING]>,
    large: Option<[u64; MAX_BUCKETS]>,
}

impl CountsBuf {
    fn new() -> Self {
        CountsBuf {
            small: None,
            large: None,
        }
    }
    fn get(&mut self, buckets: usize) -> &mut [u64] {
        if buckets <= SMALL_RING {
            &mut self.small.get_or_insert([0; SMALL_RING])[..buckets]
        } else {
            &mut self.large.get_or_insert([0; MAX_BUCKETS])[..buckets]
        }
    }
}
