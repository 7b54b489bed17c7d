//! A cluster node: the thin async shell around the state machines.
//!
//! [`Node::start`] binds the QUIC transport, builds the limiter, and spawns
//! one task that owns the node's sans-IO core ([`NodeCore`]: replication,
//! membership, the rules register, the recovery gate and the share view).
//! That task only moves bytes and time between the core and the world:
//! frames in, transmits out, timers from `poll_timeout`, and the I/O the
//! core's events ask for (peers to dial, rules to keep on disk). It also
//! does the node's file work: snapshots, the rules file, the rules state.
//!
//! The node admits nothing until it has recovered its own slots from its
//! peers: all of them, or after the recovery timeout a majority of the
//! configured cluster (see `Replicator::check_recovered`); never on time alone.
//! On shutdown it ships a final delta, leaves the membership, writes a
//! snapshot and closes its connections.
//!
//! # Layout
//!
//! - this module: [`Node`], [`NodeHandle`], [`NodeApi`] (what front-ends
//!   use: the decision path, status, rules admin) and the node's side of
//!   confirmation (its `Confirm`: a request near its limit goes to the task).
//! - `driver`: the task that owns the core.
//! - `files`: snapshots and kept rules on disk.
//! - `journal`, `journal_files`: the write-ahead journal's writer thread,
//!   its segment files and their replay at start (see [`Durability`]).
//! - [`config`]: the configuration file and its checks; [`rules_state`]:
//!   the rules in force kept across restarts.
//! - [`notices`]: why a node is not ready, and the development defaults it
//!   runs with, in words for its operator.
//!   the rules in force kept across restarts; [`tokens`]: admin tokens by
//!   holder and the development defaults a node warns about.

pub mod config;
mod driver;
mod files;
mod journal;
mod journal_files;
mod members;
pub mod notices;
pub mod rules_state;
pub mod tokens;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::net::{NodeTls, Transport};
use drl_core::clock::SystemClock;
use drl_core::cluster::node_core::{CoreConfig, NodeCore};
use drl_core::cluster::replication::{PeerState, ReplicationStats};
use drl_core::decide::{
    Commit, Confirm, ConfirmFuture, Decider, ForwardRefund, RefundFuture, Unconfirmed,
};
use drl_core::key::CounterKey;
use drl_core::limiter::{Decided, Limiter, LimiterConfig, Pending, RefundError, RefundOutcome};
use drl_core::rules::{RuleSet, RulesError};
use drl_core::share::ShareView;
use drl_core::slot::NodeSlot;
use drl_core::time::{Clock, Nanos};

#[cfg(feature = "harness")]
pub use config::Chaos;
pub use config::{ConfigError, GrpcTls, NodeFile, NodeSettings};
pub use journal::{Durability, JournalStats};

/// Why a node could not start. Nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    /// The configuration is invalid.
    Config(#[from] ConfigError),
    /// The rules file could not be read.
    #[error(
        "cannot read the rules file {}: {source} (set `rules` in the node's config, \
         DRL_RULES or --rules; deploy/rules.example.toml is a sample to start from)",
        path.display()
    )]
    RulesFile {
        /// The rules file named in the configuration.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The rules file is not a valid rule file.
    #[error("rules: {0}")]
    Rules(#[from] RulesError),
    #[error("tls: {0}")]
    /// The TLS material could not be loaded.
    Tls(#[from] crate::net::TlsError),
    #[error("transport: {0}")]
    /// The peer transport could not bind or start.
    Transport(#[from] crate::net::TransportError),
    #[error("limiter: {0}")]
    /// The limiter could not hold the rules.
    Limiter(#[from] drl_core::limiter::SetupError),
    #[error("journal writer: {0}")]
    /// The journal's writer thread could not be started.
    Journal(#[source] std::io::Error),
}

pub use drl_core::cluster::node_core::{ForgetError, PutRulesError, RulesOutcome, RulesVersion};
pub use files::{SnapshotLoad, SnapshotLoadError};

use driver::Driver;
use files::{file_stamp, load_rules_state, load_snapshot};
use members::{alone_after, SLOT_CAPACITY};

enum Command {
    PutRules {
        change: RulesChange,
        reply: tokio::sync::oneshot::Sender<Result<RulesOutcome, PutRulesError>>,
    },
    /// A request counted provisionally near its limit, to be confirmed by
    /// the peers' answers.
    Confirm {
        pending: Pending,
        reply: tokio::sync::oneshot::Sender<Decided>,
    },
    /// An admin reset of counters, cluster-wide.
    ResetCounters {
        counters: Vec<CounterKey>,
        reply: tokio::sync::oneshot::Sender<ResetOutcome>,
    },
    /// An operator forgets a member gone for good, cluster-wide.
    ForgetMember {
        slot: u16,
        reply: tokio::sync::oneshot::Sender<Result<(), ForgetError>>,
    },
    /// A refund of a receipt the node in `issuer` issued, to forward there.
    ForwardRefund {
        issuer: u16,
        receipt: String,
        reply: tokio::sync::oneshot::Sender<Result<RefundOutcome, RefundError>>,
    },
}

/// The answer to [`NodeApi::reset_counters`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResetOutcome {
    /// Net hits this node cleared from its own slot.
    pub cleared_here: u64,
    /// Peers that cleared their own slot before the answer.
    pub acked: Vec<u16>,
    /// Configured peers that had not: the record goes to them until they
    /// do (a partitioned peer applies it when the partition heals).
    pub pending: Vec<u16>,
}

/// The node stopped before it could answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the node is stopping")]
pub struct Stopping;
/// A rules change as an operator asks for it.
pub struct RulesChange {
    /// The new rules, parsed.
    pub rules: RuleSet,
    /// Made against this version (`If-Match`): refused unless it is still
    /// the version in force.
    pub if_match: Option<RulesVersion>,
    /// Who asks (an admin token's name), for the audit log.
    pub by: String,
}

impl RulesChange {
    /// `rules` asked for by `by`, whatever version is in force.
    pub fn new(rules: RuleSet, by: impl Into<String>) -> RulesChange {
        RulesChange {
            rules,
            if_match: None,
            by: by.into(),
        }
    }
}

/// The rules in force with their version, as one consistent pair.
#[derive(Clone)]
pub struct RulesInForce {
    /// The version.
    pub version: RulesVersion,
    /// The rules.
    pub rules: Arc<RuleSet>,
}

/// The longest a request waits for its confirmation before it is refused,
/// should the node's task be held up: ten claim timeouts.
const CONFIRM_PATIENCE: Duration = Duration::from_millis(500);

/// What the node's task publishes for readiness, metrics and tests.
#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    /// The version of the rules in force.
    pub rules_version: RulesVersion,
    /// The last reload of the rules file that failed, if the latest did.
    pub rules_file_error: Option<String>,
    /// Hits admitted here that some peer has not acknowledged yet.
    pub unacked_hits: u64,
    /// The recovery gate is open: the node admits requests.
    pub ready: bool,
    /// Live members, this node excluded.
    pub live: Vec<u16>,
    /// Every member ever seen, this node excluded.
    pub known: Vec<u16>,
    /// The other members now: remembered, joined or heard of, and not
    /// forgotten (the cluster's size is one more).
    pub members: Vec<u16>,
    /// What replication knows of each peer, by slot.
    pub peers: BTreeMap<u16, PeerState>,
    /// Replication counters.
    pub replication: ReplicationStats,
    /// Our rounds still waiting for some peer's acknowledgement.
    pub unacked_rounds: usize,
    /// Per peer, our rounds it has not acknowledged yet.
    pub peer_unacked_rounds: BTreeMap<u16, usize>,
    /// This node and its live peers are at most half the cluster.
    pub minority: bool,
    /// Snapshots written since start.
    pub snapshots_written: u64,
    /// Snapshots refused at start (corrupt or unreadable) and moved aside.
    pub snapshots_refused: u64,
    /// Where the refused snapshot went.
    pub snapshot_moved_aside: Option<std::path::PathBuf>,
    /// What the transport did with incoming connection attempts.
    pub admission: crate::net::AdmissionStats,
    /// This node's clock against the cluster's (offset, correction, gate).
    pub clock: drl_core::cluster::clock_sync::ClockStatus,
}

/// What the protocol front-ends and metrics need of a running node.
/// Cheap to clone.
#[derive(Clone)]
pub struct NodeApi {
    /// The node's limiter: its rules, keys and memory, for admin and
    /// metrics. Decisions go through [`NodeApi::decider`].
    pub limiter: Arc<Limiter>,
    /// The node's checked settings.
    pub settings: NodeSettings,
    decider: Decider,
    status: Arc<Mutex<NodeStatus>>,
    rules: Arc<Mutex<RulesInForce>>,
    commands: mpsc::Sender<Command>,
    journal: Option<Arc<JournalStats>>,
}

impl NodeApi {
    /// The rules in force and their version, as the node's task last put
    /// them in force (at once, not on the status tick).
    pub fn rules(&self) -> RulesInForce {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// The write-ahead journal's state; `None` when the node keeps no
    /// journal (`durability = "none"` or no `snapshot_path`).
    pub fn journal(&self) -> Option<&JournalStats> {
        self.journal.as_deref()
    }
    /// The latest published status (refreshed every 50 ms).
    pub fn status(&self) -> NodeStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    /// Ready to admit: the node has recovered its counts.
    pub fn is_ready(&self) -> bool {
        self.limiter.is_admitting()
    }
    /// The node's decision path: every protocol decides through it. Near a
    /// limit it confirms with the peers through the node's core.
    pub fn decider(&self) -> &Decider {
        &self.decider
    }
    /// Puts parsed rules in force here and proposes them to every live
    /// peer (they reach connected peers within a round trip and any node
    /// that connects later on its first connection), and answers once the
    /// outcome is known: confirmed by every live peer and a majority,
    /// superseded by a greater version, or unconfirmed in time (see
    /// `drl_core::cluster::rules_register`). Parse with
    /// [`RuleSet::from_toml`] first: text is checked once, at the edge. A
    /// refusal ([`PutRulesError`]) changes nothing.
    pub async fn put_rules(&self, change: RulesChange) -> Result<RulesOutcome, PutRulesError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::PutRules { change, reply })
            .await
            .map_err(|_| PutRulesError::Stopped)?;
        answer.await.map_err(|_| PutRulesError::Stopped)?
    }
    /// Resets `counters` cluster-wide (an admin operation): this node clears
    /// its own slot of them at once, every other node clears its own when
    /// the record reaches it, once, and no merge brings the old counts
    /// back. Answers once the live peers have applied it (or after a
    /// second), naming those that had not.
    pub async fn reset_counters(
        &self,
        counters: Vec<CounterKey>,
    ) -> Result<ResetOutcome, Stopping> {
        self.ask(|reply| Command::ResetCounters { counters, reply })
            .await
    }
    /// Forgets member `slot` here and at every member that does not hold
    /// it alive (see `NodeCore::handle_forget`): an operator's answer to a
    /// majority lost at once.
    pub async fn forget_member(&self, slot: u16) -> Result<Result<(), ForgetError>, Stopping> {
        self.ask(|reply| Command::ForgetMember { slot, reply })
            .await
    }
    /// Sends the node's task a command and waits for its answer.
    async fn ask<T>(
        &self,
        command: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Command,
    ) -> Result<T, Stopping> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| Stopping)?;
        answer.await.map_err(|_| Stopping)
    }
}

/// The node's side of [`Confirm`]: a provisional request goes to the
/// node's task, which owns the core; the answer comes back on a oneshot.
struct ConfirmThroughTask {
    commands: mpsc::Sender<Command>,
}

impl Confirm for ConfirmThroughTask {
    fn confirm(&self, pending: Pending) -> ConfirmFuture {
        let commands = self.commands.clone();
        Box::pin(async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if commands
                .send(Command::Confirm { pending, reply })
                .await
                .is_err()
            {
                // The node is stopping: nobody will confirm.
                return Err(Unconfirmed::Dropped);
            }
            // The node's task decides within the claim timeout; if it is held
            // up, refuse rather than hang, and leave the hits to it: whatever
            // it decides later, a request nobody waits for any more is given
            // back.
            match tokio::time::timeout(CONFIRM_PATIENCE, answer).await {
                Ok(Ok(decided)) => Ok(decided),
                // The task stopped without deciding: nobody else will give back.
                Ok(Err(_)) => Err(Unconfirmed::Dropped),
                Err(_) => Err(Unconfirmed::Late),
            }
        })
    }
}

/// The node's side of [`ForwardRefund`]: the refund goes to the node's
/// task, which forwards it to the issuer over the peer connection.
struct ForwardThroughTask {
    commands: mpsc::Sender<Command>,
}

impl ForwardRefund for ForwardThroughTask {
    fn forward(&self, issuer: u16, receipt: String) -> RefundFuture {
        let commands = self.commands.clone();
        Box::pin(async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let unreachable = RefundError::Unreachable { slot: issuer };
            if commands
                .send(Command::ForwardRefund {
                    issuer,
                    receipt,
                    reply,
                })
                .await
                .is_err()
            {
                return Err(unreachable);
            }
            // The core answers within its forward timeout; a task held up
            // longer than twice that is answered for.
            match tokio::time::timeout(2 * REFUND_PATIENCE, answer).await {
                Ok(Ok(result)) => result,
                _ => Err(unreachable),
            }
        })
    }
}

/// How long the core waits for an issuer's answer to a forwarded refund.
const REFUND_PATIENCE: std::time::Duration =
    std::time::Duration::from_nanos(drl_core::cluster::refunds::FORWARD_TIMEOUT.as_u64());

/// A running node.
pub struct NodeHandle {
    /// The node's limiter, for decisions.
    pub limiter: Arc<Limiter>,
    /// The node's checked settings.
    pub settings: NodeSettings,
    peer_addr: SocketAddr,
    status: Arc<Mutex<NodeStatus>>,
    rules: Arc<Mutex<RulesInForce>>,
    transport: Transport,
    stop: watch::Sender<bool>,
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
    journal: Option<Arc<journal::Journal>>,
    /// Under `sync` durability, what answers wait for.
    commit: Option<Arc<dyn Commit>>,
}

impl NodeHandle {
    /// The UDP address peers reach this node on.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }
    /// A copy of what the node's task last published.
    pub fn status(&self) -> NodeStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    /// The peer transport (QUIC endpoint and connections).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }
    /// See [`NodeApi::put_rules`].
    pub async fn put_rules(&self, change: RulesChange) -> Result<RulesOutcome, PutRulesError> {
        self.api().put_rules(change).await
    }
    /// A cloneable handle for the protocol front-ends and metrics.
    pub fn api(&self) -> NodeApi {
        NodeApi {
            limiter: self.limiter.clone(),
            settings: self.settings.clone(),
            decider: self.decider(),
            status: self.status.clone(),
            rules: self.rules.clone(),
            commands: self.commands.clone(),
            journal: self.journal.as_ref().map(|j| j.stats().clone()),
        }
    }
    /// The node's decision path (see [`NodeApi::decider`]).
    pub fn decider(&self) -> Decider {
        let confirm = ConfirmThroughTask {
            commands: self.commands.clone(),
        };
        let forward = ForwardThroughTask {
            commands: self.commands.clone(),
        };
        let decider = Decider::clustered(self.limiter.clone(), Arc::new(confirm))
            .with_forward(Arc::new(forward));
        match &self.commit {
            Some(commit) => decider.with_commit(commit.clone()),
            None => decider,
        }
    }
    /// Stops the node cleanly: final delta, leave, snapshot, close.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
    /// Stops the node dead, as a crash would: no final delta, no leave, no
    /// snapshot, nothing more journaled. For tests of crash recovery.
    pub async fn kill(self) {
        if let Some(j) = &self.journal {
            j.abort();
        }
        self.task.abort();
        let _ = self.task.await;
        self.transport.shutdown().await;
    }
}

/// Starts nodes: see [`Node::start`].
pub struct Node;

impl Node {
    /// Starts a node from checked settings.
    pub async fn start(settings: NodeSettings) -> Result<NodeHandle, NodeError> {
        let text =
            std::fs::read_to_string(&settings.rules).map_err(|source| NodeError::RulesFile {
                path: settings.rules.clone(),
                source,
            })?;
        let rules = RuleSet::from_toml(&text)?;
        let tls = NodeTls::load(&settings.tls_ca, &settings.tls_cert, &settings.tls_key)?;
        Self::start_with(settings, rules, tls).await
    }

    /// Starts a node from settings, rules and TLS material already loaded.
    pub async fn start_with(
        settings: NodeSettings,
        rules: RuleSet,
        tls: NodeTls,
    ) -> Result<NodeHandle, NodeError> {
        // Decisions and windows read the node's clock corrected toward the
        // cluster's (DESIGN.md, "Clocks"); the driver steers the correction.
        let correction = drl_core::corrected::ClockCorrection::new();
        let clock = SystemClock::raw()
            .with_test_offset(settings.test_clock_offset_ns)
            .corrected(correction.clone());
        let now = clock.now();
        for line in &settings.insecure_defaults {
            tracing::warn!("INSECURE DEVELOPMENT DEFAULT: {line}");
        }
        // Rules put in force before the restart (admin API, peers) win over
        // the configuration file's: they are newer by construction.
        let rules_state = settings.rules_state_path();
        let (rules, rules_version) = match rules_state.as_deref().map(load_rules_state) {
            Some(Some((kept, version))) => (kept, version),
            _ => {
                let version = RulesVersion::new(0, settings.slot, rules.digest());
                (rules, version)
            }
        };
        let rules_text = rules.source().to_owned();
        let config = LimiterConfig {
            own_slot: NodeSlot::new(settings.slot),
            slots: SLOT_CAPACITY,
            max_keys: settings.max_keys,
            max_memory: settings.max_memory,
            seed: settings.key_seed,
            request_limits: settings.request_limits,
        };
        // From the first request on, the node sees the configured cluster:
        // members it has not heard from yet are reserved, never ignored.
        let limiter = Arc::new(
            Limiter::with_clock(rules, config, clock.clone())?
                .clustered(ShareView::alone(settings.slot))?,
        );
        let snapshot_load = match &settings.snapshot_path {
            Some(path) => load_snapshot(&limiter, path, now),
            None => SnapshotLoad::default(),
        };
        // Snapshot, then journal, then (once running) peers: each can only
        // raise what the one before restored.
        let wake = Arc::new(tokio::sync::Notify::new());
        let (journal, journal_replayed) = start_journal(&settings, &limiter, now)?;
        let commit: Option<Arc<dyn Commit>> = match &journal {
            Some(j) if settings.durability == Durability::Sync => {
                Some(Arc::new(j.commit(limiter.clone(), wake.clone())))
            }
            _ => None,
        };
        let (transport, incoming) = Transport::bind(settings.listen_peer, tls, settings.slot)?;
        let peer_addr = match settings.advertise_peer {
            Some(a) => a,
            None => transport.local_addr().map_err(|e| {
                NodeError::Transport(crate::net::TransportError::Bind {
                    addr: settings.listen_peer,
                    source: e,
                })
            })?,
        };
        // The members this node knew of when it last ran: it waits for them
        // before it admits.
        let remembered = settings
            .members_path()
            .map(|p| members::load(&p, NodeSlot::new(settings.slot)))
            .unwrap_or_default();
        if let Some(size) = settings.ignored_cluster_size {
            tracing::warn!(
                cluster_size = size,
                "cluster_size is no longer used and is ignored: the cluster's size is its \
                 membership, learned from the peers (remove the setting)"
            );
        }
        // Process start time: a restarted node is a new incarnation.
        let incarnation = now.as_u64() / 1_000_000;
        let core = NodeCore::new(
            CoreConfig {
                name: settings.name.clone(),
                slot: NodeSlot::new(settings.slot),
                members: remembered.clone(),
                alone_after: alone_after(&settings),
                forget_after: settings.forget_after,
                policy: settings.policy,
                inflight_ppm: settings.inflight_ppm,
                sync_interval: settings.sync_interval,
                recovery_timeout: settings.recovery_timeout,
                snapshot_restored: snapshot_load.restored || journal_replayed,
                incarnation,
                peer_addr,
                recovering: true,
                confirm_timeout: settings.confirm_timeout,
                silence: settings.silence,
            },
            limiter.clone(),
            rules_text,
            rules_version,
            now,
        );
        let rules_in_force = Arc::new(Mutex::new(RulesInForce {
            version: rules_version,
            rules: limiter.rules(),
        }));
        let status = Arc::new(Mutex::new(NodeStatus {
            snapshots_refused: u64::from(snapshot_load.moved_aside.is_some()),
            snapshot_moved_aside: snapshot_load.moved_aside.clone(),
            ..NodeStatus::default()
        }));
        let (stop, stop_rx) = watch::channel(false);
        let waker = wake.clone();
        limiter.set_wake(move || waker.notify_one());
        let driver = Driver {
            clock_sync: drl_core::cluster::clock_sync::ClockDiscipline::new(
                correction,
                settings.max_clock_offset,
            ),
            clock,
            limiter: limiter.clone(),
            settings: settings.clone(),
            transport: transport.clone(),
            core,
            status: status.clone(),
            rules_in_force: rules_in_force.clone(),
            rules_waiters: std::collections::HashMap::new(),
            kept_version: None,
            members_path: settings.members_path(),
            next_snapshot: now + settings.snapshot_interval,
            next_discovery: now,
            next_status: now,
            snapshots_written: 0,
            rules_state,
            rules_file: file_stamp(&settings.rules),
            next_rules_check: now + Nanos::from_secs(1),
            rules_file_error: None,
            #[cfg(feature = "harness")]
            chaos: settings.chaos.map(|c| {
                use rand::SeedableRng;
                (c, rand::rngs::StdRng::seed_from_u64(c.seed))
            }),
            waiters: std::collections::HashMap::new(),
            reset_waiters: std::collections::HashMap::new(),
            refund_waiters: std::collections::HashMap::new(),
            journal: journal.clone(),
        };
        let (commands, command_rx) = mpsc::channel(4096);
        let task = tokio::spawn(driver.run(incoming, stop_rx, wake, command_rx));
        Ok(NodeHandle {
            limiter,
            settings,
            peer_addr,
            status,
            rules: rules_in_force,
            transport,
            stop,
            commands,
            task,
            journal,
            commit,
        })
    }
}

/// Replays the journal beside the snapshot, if any, and starts its writer
/// unless `durability` is `none` (then what was replayed is put in a
/// snapshot and the segments removed). Says whether anything was replayed.
fn start_journal(
    settings: &NodeSettings,
    limiter: &Arc<Limiter>,
    now: Nanos,
) -> Result<(Option<Arc<journal::Journal>>, bool), NodeError> {
    let Some(path) = &settings.snapshot_path else {
        return Ok((None, false));
    };
    let recovered = journal::recover(limiter, path, now);
    let replayed = recovered.records > 0;
    if settings.durability == Durability::None {
        if recovered.segments > 0 {
            let bytes = drl_core::cluster::snapshot::capture(limiter, now);
            match files::write_snapshot(path, &bytes) {
                Ok(()) => {
                    let mut old = journal::FileSegments::new(path, settings.key_seed, 0);
                    let _ = journal::Segments::remove_before(&mut old, u64::MAX);
                }
                Err(e) => tracing::warn!(error = %e, "snapshot after journal replay not written"),
            }
        }
        return Ok((None, replayed));
    }
    let stats = Arc::new(JournalStats::new(settings.durability));
    stats.recovered(&recovered);
    let segments = journal::FileSegments::new(path, settings.key_seed, recovered.next_seq);
    let journal =
        journal::Journal::start(limiter.clone(), segments, stats).map_err(NodeError::Journal)?;
    Ok((Some(Arc::new(journal)), replayed))
}
