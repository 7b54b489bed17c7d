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

pub mod config;
pub mod rules_state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::net::{Incoming, NodeTls, Transport};
use drl_core::clock::SystemClock;
use drl_core::cluster::confirm::Ticket;
use drl_core::cluster::node_core::{CoreConfig, CoreEvent, NodeCore};
use drl_core::cluster::replication::{PeerState, ReplicationStats};
use drl_core::cluster::snapshot;
use drl_core::decide::{Confirm, ConfirmFuture, Decider};
use drl_core::limiter::{Decided, Finished, Limiter, LimiterConfig, Pending};
use drl_core::rules::{RuleSet, RulesError};
use drl_core::share::ShareView;
use drl_core::slot::NodeSlot;
use drl_core::time::{Clock, Nanos};

#[cfg(feature = "harness")]
pub use config::Chaos;
pub use config::{ConfigError, GrpcTls, NodeFile, NodeSettings};

/// Why a node could not start. Nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    /// The configuration is invalid.
    Config(#[from] ConfigError),
    /// The rules file could not be read.
    #[error("rules file {}", path.display())]
    RulesFile {
        /// The rules file named in the configuration.
        path: std::path::PathBuf,
        #[source]
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
}

/// Why the snapshot found at start was not merged. Never fails the start:
/// the file is moved aside and the node recovers its counts from its peers.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotLoadError {
    #[error("snapshot {} unreadable", path.display())]
    /// The snapshot file could not be read.
    Read {
        /// The snapshot file.
        path: std::path::PathBuf,
        #[source]
        /// The I/O error.
        source: std::io::Error,
    },
    #[error("snapshot {} refused", path.display())]
    /// The snapshot file is corrupt, or from another cluster or layout.
    Refused {
        /// The snapshot file.
        path: std::path::PathBuf,
        #[source]
        /// Why it was refused.
        source: snapshot::SnapshotError,
    },
}

pub use drl_core::cluster::node_core::{PutRulesError, RulesVersion};

enum Command {
    PutRules {
        rules: RuleSet,
        reply: tokio::sync::oneshot::Sender<Result<RulesVersion, PutRulesError>>,
    },
    /// A request counted provisionally near its limit, to be confirmed by
    /// the peers' answers.
    Confirm {
        pending: Pending,
        reply: tokio::sync::oneshot::Sender<Decided>,
    },
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
    commands: mpsc::Sender<Command>,
}

impl NodeApi {
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
    /// Puts parsed `rules` in force on every node of the cluster (they
    /// reach connected peers within a round trip and any node that connects
    /// later on its first connection). Parse with [`RuleSet::from_toml`]
    /// first: text is checked once, at the edge. A refusal changes nothing.
    pub async fn put_rules(&self, rules: RuleSet) -> Result<RulesVersion, PutRulesError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::PutRules { rules, reply })
            .await
            .map_err(|_| PutRulesError::Stopped)?;
        answer.await.map_err(|_| PutRulesError::Stopped)?
    }
}

/// The node's side of [`Confirm`]: a provisional request goes to the
/// node's task, which owns the core; the answer comes back on a oneshot.
struct ConfirmThroughTask {
    limiter: Arc<Limiter>,
    commands: mpsc::Sender<Command>,
}

impl Confirm for ConfirmThroughTask {
    fn confirm(&self, mut pending: Pending) -> ConfirmFuture {
        let limiter = self.limiter.clone();
        let commands = self.commands.clone();
        Box::pin(async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let sent = commands
                .send(Command::Confirm {
                    pending: pending.clone(),
                    reply,
                })
                .await;
            let refuse = |pending: &mut Pending| match limiter.finish_or_yield_at(
                limiter.clock().now(),
                pending,
                None,
                false,
            ) {
                Finished::Decided(decided) => decided,
                Finished::Yield { .. } => limiter.refused_pending(pending),
            };
            if sent.is_err() {
                // The node is stopping: nobody will confirm; give back.
                return refuse(&mut pending);
            }
            // The node's task decides within the claim timeout; if it is held
            // up, refuse rather than hang, and leave the hits to it: whatever
            // it decides later, a request nobody waits for any more is given
            // back.
            match tokio::time::timeout(CONFIRM_PATIENCE, answer).await {
                Ok(Ok(decided)) => decided,
                // The task stopped without deciding: nobody else will give back.
                Ok(Err(_)) => refuse(&mut pending),
                Err(_) => limiter.refused_pending(&pending),
            }
        })
    }
}

/// A running node.
pub struct NodeHandle {
    /// The node's limiter, for decisions.
    pub limiter: Arc<Limiter>,
    /// The node's checked settings.
    pub settings: NodeSettings,
    peer_addr: SocketAddr,
    status: Arc<Mutex<NodeStatus>>,
    transport: Transport,
    stop: watch::Sender<bool>,
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
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
    pub async fn put_rules(&self, rules: RuleSet) -> Result<RulesVersion, PutRulesError> {
        self.api().put_rules(rules).await
    }
    /// A cloneable handle for the protocol front-ends and metrics.
    pub fn api(&self) -> NodeApi {
        NodeApi {
            limiter: self.limiter.clone(),
            settings: self.settings.clone(),
            decider: self.decider(),
            status: self.status.clone(),
            commands: self.commands.clone(),
        }
    }
    /// The node's decision path (see [`NodeApi::decider`]).
    pub fn decider(&self) -> Decider {
        let confirm = ConfirmThroughTask {
            limiter: self.limiter.clone(),
            commands: self.commands.clone(),
        };
        Decider::clustered(self.limiter.clone(), Arc::new(confirm))
    }
    /// Stops the node cleanly: final delta, leave, snapshot, close.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
    /// Stops the node dead, as a crash would: no final delta, no leave, no
    /// snapshot. For tests of crash recovery.
    pub async fn kill(self) {
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
        let clock = SystemClock;
        let now = clock.now();
        // Rules put in force before the restart (admin API, peers) win over
        // the configuration file's: they are newer by construction.
        let rules_state = settings.rules_state_path();
        let (rules, rules_version) = match rules_state.as_deref().map(load_rules_state) {
            Some(Some((kept, version))) => (kept, version),
            _ => (rules, (0, settings.slot)),
        };
        let rules_digest = rules.digest();
        let rules_text = rules.source().to_owned();
        let config = LimiterConfig {
            own_slot: NodeSlot::new(settings.slot),
            slots: settings.cluster_size,
            max_keys: settings.max_keys,
            max_memory: settings.max_memory,
            seed: settings.key_seed,
        };
        // From the first request on, the node sees the configured cluster:
        // members it has not heard from yet are reserved, never ignored.
        let limiter =
            Arc::new(Limiter::new(rules, config)?.clustered(ShareView::alone(settings.slot))?);
        let snapshot_load = match &settings.snapshot_path {
            Some(path) => load_snapshot(&limiter, path, now),
            None => SnapshotLoad::default(),
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
        // Process start time: a restarted node is a new incarnation.
        let incarnation = now.as_u64() / 1_000_000;
        let core = NodeCore::new(
            CoreConfig {
                name: settings.name.clone(),
                slot: NodeSlot::new(settings.slot),
                cluster_size: settings.cluster_size,
                policy: settings.policy,
                inflight_ppm: settings.inflight_ppm,
                sync_interval: settings.sync_interval,
                recovery_timeout: settings.recovery_timeout,
                snapshot_restored: snapshot_load.restored,
                incarnation,
                peer_addr,
                recovering: true,
            },
            limiter.clone(),
            rules_text,
            rules_version,
            rules_digest,
            now,
        );
        let status = Arc::new(Mutex::new(NodeStatus {
            snapshots_refused: u64::from(snapshot_load.moved_aside.is_some()),
            snapshot_moved_aside: snapshot_load.moved_aside.clone(),
            ..NodeStatus::default()
        }));
        let (stop, stop_rx) = watch::channel(false);
        let wake = Arc::new(tokio::sync::Notify::new());
        let waker = wake.clone();
        limiter.set_wake(move || waker.notify_one());
        let driver = Driver {
            clock,
            limiter: limiter.clone(),
            settings: settings.clone(),
            transport: transport.clone(),
            core,
            status: status.clone(),
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
        };
        let (commands, command_rx) = mpsc::channel(4096);
        let task = tokio::spawn(driver.run(incoming, stop_rx, wake, command_rx));
        Ok(NodeHandle {
            limiter,
            settings,
            peer_addr,
            status,
            transport,
            stop,
            commands,
            task,
        })
    }
}

/// The rules kept at `path` by an earlier run, if they verify and parse. A
/// file that does not is reported and moved aside; the node then runs its
/// configured rules and adopts its peers' newer ones before it is ready.
fn load_rules_state(path: &Path) -> Option<(RuleSet, RulesVersion)> {
    let refused = match rules_state::PersistedRules::load(path) {
        Ok(None) => return None,
        Ok(Some(kept)) => match RuleSet::from_toml(&kept.text) {
            Ok(rules) => {
                tracing::info!(
                    version = kept.version.0,
                    origin = kept.version.1,
                    "running the rules kept from before the restart"
                );
                return Some((rules, kept.version));
            }
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(
        ".corrupt-{}",
        SystemClock.now().as_u64() / 1_000_000_000
    ));
    let moved = std::fs::rename(path, std::path::PathBuf::from(&aside));
    tracing::error!(
        path = %path.display(), reason = %refused, moved = moved.is_ok(),
        "kept rules refused and moved aside; running the configured rules"
    );
    None
}

/// What loading the snapshot at start came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotLoad {
    /// A verified snapshot was merged.
    pub restored: bool,
    /// The snapshot was refused (corrupt, unreadable, of another version or
    /// cluster) and moved to this path; the node recovers from its peers.
    pub moved_aside: Option<std::path::PathBuf>,
}

/// Merges the snapshot at `path`, if there is one and it verifies. A file
/// that cannot be read or verified is reported, moved aside as
/// `<path>.corrupt-<unix seconds>` (so the next snapshot does not overwrite
/// the evidence), and the node starts without it: its peers' recovery syncs
/// bring its counts back. Never fails the start.
fn load_snapshot(limiter: &Limiter, path: &Path, now: Nanos) -> SnapshotLoad {
    let refused = match std::fs::read(path) {
        Ok(bytes) => match snapshot::restore(limiter, now, &bytes) {
            Ok(stats) => {
                tracing::info!(path = %path.display(), applied = stats.applied, "snapshot merged");
                return SnapshotLoad {
                    restored: true,
                    moved_aside: None,
                };
            }
            Err(source) => SnapshotLoadError::Refused {
                path: path.to_owned(),
                source,
            },
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return SnapshotLoad::default(),
        Err(source) => SnapshotLoadError::Read {
            path: path.to_owned(),
            source,
        },
    };
    let refused = error_chain(&refused);
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{}", now.as_u64() / 1_000_000_000));
    let aside = std::path::PathBuf::from(aside);
    match std::fs::rename(path, &aside) {
        Ok(()) => tracing::error!(
            path = %path.display(), moved_to = %aside.display(), reason = %refused,
            "snapshot refused and moved aside; recovering from peers"
        ),
        Err(e) => tracing::error!(
            path = %path.display(), reason = %refused, error = %e,
            "snapshot refused and could not be moved aside; recovering from peers"
        ),
    }
    SnapshotLoad {
        restored: false,
        moved_aside: Some(aside),
    }
}

/// An error and its sources, as one line: `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}

/// Modification time and length of a file, to notice changes.
fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Writes `bytes` to `path` so that a crash at any moment leaves either the
/// previous file or the new one, whole: a temporary file in the same
/// directory, fsynced, renamed over `path`, then the directory fsynced so
/// the rename itself is durable.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(&dir)?.sync_all()
}

fn write_snapshot(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_durably(path, bytes)
}

/// The one task that owns the node's core and does its I/O.
struct Driver {
    clock: SystemClock,
    limiter: Arc<Limiter>,
    settings: NodeSettings,
    transport: Transport,
    core: NodeCore,
    status: Arc<Mutex<NodeStatus>>,
    next_snapshot: Nanos,
    next_discovery: Nanos,
    next_status: Nanos,
    snapshots_written: u64,
    /// Where the rules in force are kept across restarts.
    rules_state: Option<std::path::PathBuf>,
    rules_file: Option<(std::time::SystemTime, u64)>,
    next_rules_check: Nanos,
    rules_file_error: Option<String>,
    #[cfg(feature = "harness")]
    chaos: Option<(config::Chaos, rand::rngs::StdRng)>,
    /// Who waits for each request under confirmation.
    waiters: std::collections::HashMap<Ticket, tokio::sync::oneshot::Sender<Decided>>,
}

impl Driver {
    async fn run(
        mut self,
        mut incoming: mpsc::Receiver<Incoming>,
        mut stop: watch::Receiver<bool>,
        wake: Arc<tokio::sync::Notify>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        loop {
            let now = self.clock.now();
            let deadline = [
                Some(self.core.poll_timeout()),
                Some(self.next_discovery),
                Some(self.next_status),
                self.settings
                    .snapshot_path
                    .as_ref()
                    .map(|_| self.next_snapshot),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + Nanos::from_millis(100));
            if deadline <= now {
                // Timers first: with frames always queued, the biased select
                // below would otherwise never reach its timer branch, and a
                // busy node would stop shipping and resending.
                self.on_timeout().await;
                self.flush();
                continue;
            }
            let wait = Duration::from(deadline.saturating_sub(now));
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                event = incoming.recv() => {
                    let Some(event) = event else { break };
                    self.on_incoming(event);
                    // Take whatever else is already queued before sending.
                    for _ in 0..256 {
                        match incoming.try_recv() {
                            Ok(event) => self.on_incoming(event),
                            Err(_) => break,
                        }
                    }
                }
                Some(command) = commands.recv() => self.on_command(command),
                _ = wake.notified() => {
                    let now = self.clock.now();
                    self.core.handle_wake(now);
                }
                _ = tokio::time::sleep(wait) => self.on_timeout().await,
            }
            self.flush();
        }
        self.finish().await;
    }

    fn on_incoming(&mut self, event: Incoming) {
        let now = self.clock.now();
        match event {
            Incoming::Connected { slot, addr } => {
                self.core.handle_connected(now, NodeSlot::new(slot), addr)
            }
            Incoming::Disconnected { slot } => self.core.handle_disconnected(NodeSlot::new(slot)),
            Incoming::Frame { from, bytes, .. } => {
                self.core.handle_frame(now, NodeSlot::new(from), &bytes)
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::PutRules { rules, reply } => {
                let _ = reply.send(self.put_rules(rules, true));
            }
            Command::Confirm { pending, reply } => {
                let now = self.clock.now();
                let ticket = self.core.handle_confirm(now, pending);
                self.waiters.insert(ticket, reply);
            }
        }
    }

    /// Keeps `rules` on disk and puts them in force as the next
    /// version from this node. When `must_persist` (an admin change) a
    /// failure to keep it refuses the change; a file reload is put in force
    /// regardless (the failure is logged).
    fn put_rules(
        &mut self,
        rules: RuleSet,
        must_persist: bool,
    ) -> Result<RulesVersion, PutRulesError> {
        let prepared = self.core.prepare_rules(rules)?;
        if let Err(e) = self.keep_rules(prepared.version(), prepared.text()) {
            if must_persist {
                return Err(PutRulesError::NotPersisted(e.to_string()));
            }
        }
        Ok(self.core.commit_rules(prepared))
    }

    /// Writes the rules in force to the rules state file, if there is one.
    fn keep_rules(&self, version: RulesVersion, text: &str) -> std::io::Result<()> {
        let Some(path) = &self.rules_state else {
            return Ok(());
        };
        let kept = rules_state::PersistedRules {
            version,
            text: text.to_owned(),
        };
        let result = kept.store(path);
        if let Err(e) = &result {
            tracing::error!(path = %path.display(), error = %e, "rules not kept on disk");
        }
        result
    }

    /// Reloads the rules file when it changed; an invalid file is reported
    /// and the rules in force stay.
    fn check_rules_file(&mut self) {
        let stamp = file_stamp(&self.settings.rules);
        if stamp.is_none() || stamp == self.rules_file {
            return;
        }
        self.rules_file = stamp;
        let text = match std::fs::read_to_string(&self.settings.rules) {
            Ok(t) => t,
            Err(e) => {
                self.rules_file_error = Some(e.to_string());
                return;
            }
        };
        if self.core.runs(&text) {
            self.rules_file_error = None;
            return;
        }
        let put = RuleSet::from_toml(&text)
            .map_err(PutRulesError::from)
            .and_then(|rules| self.put_rules(rules, false));
        self.rules_file_error = put.err().map(|e| e.to_string());
        if let Some(e) = &self.rules_file_error {
            tracing::warn!(error = %e, "rules file not reloaded");
        }
    }

    async fn on_timeout(&mut self) {
        let now = self.clock.now();
        self.core.handle_timeout(now);
        if now >= self.next_discovery {
            self.next_discovery = now + self.settings.discovery_interval;
            self.discover().await;
        }
        if now >= self.next_rules_check {
            self.next_rules_check = now + Nanos::from_secs(1);
            self.check_rules_file();
        }
        if now >= self.next_status {
            self.next_status = now + Nanos::from_millis(50);
            self.publish_status();
        }
        if self.settings.snapshot_path.is_some() && now >= self.next_snapshot {
            self.next_snapshot = now + self.settings.snapshot_interval;
            self.snapshot(now).await;
        }
    }

    /// Resolves the seeds (DNS names included) and dials any address that is
    /// not a known peer yet; the core re-announces itself if it is alone.
    async fn discover(&mut self) {
        let now = self.clock.now();
        self.core.handle_discovery(now);
        for seed in self.settings.seeds.clone() {
            // The node's task answers confirmations too: a resolver that
            // hangs (a cut-off container's DNS) must not hold it up.
            let lookup = tokio::net::lookup_host(seed.as_str());
            let Ok(Ok(addrs)) = tokio::time::timeout(Duration::from_millis(200), lookup).await
            else {
                tracing::debug!(seed, "seed does not resolve");
                continue;
            };
            for addr in addrs {
                if addr != self.settings.listen_peer && !self.core.is_known_addr(addr) {
                    self.transport.connect_seed(addr);
                }
            }
        }
    }

    /// Carries out what the core asks: events first, then frames.
    fn flush(&mut self) {
        let now = self.clock.now();
        while let Some(confirmed) = self.core.poll_confirmed() {
            let told = match self.waiters.remove(&confirmed.ticket) {
                Some(reply) => reply.send(confirmed.decided.clone()).is_ok(),
                None => false,
            };
            if !told {
                // The caller is gone: nobody was told yes, give it back.
                self.core.handle_abandoned(now, &confirmed);
            }
        }
        while let Some(event) = self.core.poll_event() {
            match event {
                CoreEvent::Recovered => tracing::info!("recovered: admitting"),
                CoreEvent::RulesInForce { version, text } => {
                    // Rules committed here were kept before; peers' are kept
                    // now (a failure is logged, the rules stay in force).
                    let _ = self.keep_rules(version, &text);
                }
                CoreEvent::DialPeers(peers) => self
                    .transport
                    .set_peers(peers.into_iter().map(|(s, a)| (s.get(), a)).collect()),
                CoreEvent::MemberUp { slot, name } => {
                    tracing::info!(slot = slot.get(), %name, "member up")
                }
                CoreEvent::MemberDown { slot, name } => {
                    tracing::info!(slot = slot.get(), %name, "member down")
                }
            }
        }
        while let Some(t) = self.core.poll_transmit() {
            #[cfg(feature = "harness")]
            if !t.reliable && self.chaos.is_some() {
                self.send_with_chaos(t.to, t.bytes);
                continue;
            }
            // A frame to a peer with no connection is lost like a datagram;
            // replication resends what matters.
            let _ = self.transport.send(t.to.get(), t.bytes);
        }
    }

    /// Loses, duplicates or delays a datagram as the test's chaos says.
    #[cfg(feature = "harness")]
    fn send_with_chaos(&mut self, to: NodeSlot, bytes: Vec<u8>) {
        use rand::RngExt;
        let to = to.get();
        let Some((chaos, rng)) = self.chaos.as_mut() else {
            return;
        };
        if rng.random::<f64>() < chaos.loss {
            return;
        }
        let copies = if rng.random::<f64>() < chaos.duplicate {
            2
        } else {
            1
        };
        for _ in 0..copies {
            if rng.random::<f64>() < chaos.reorder {
                let delay = chaos.max_delay.mul_f64(rng.random::<f64>());
                let transport = self.transport.clone();
                let bytes = bytes.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = transport.send(to, bytes);
                });
            } else {
                let _ = self.transport.send(to, bytes.clone());
            }
        }
    }

    fn publish_status(&self) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let repl = self.core.replicator();
        s.ready = self.limiter.is_admitting();
        // The status reports slots by number.
        s.live = self.core.live().iter().map(|s| s.get()).collect();
        s.known = self.core.known().iter().map(|s| s.get()).collect();
        s.peers = repl
            .peers()
            .iter()
            .map(|(s, p)| (s.get(), p.clone()))
            .collect();
        s.replication = repl.stats().clone();
        s.unacked_rounds = repl.unacked_rounds();
        s.peer_unacked_rounds = repl
            .unacked_rounds_by_peer()
            .into_iter()
            .map(|(s, n)| (s.get(), n))
            .collect();
        s.minority = repl.in_minority();
        s.snapshots_written = self.snapshots_written;
        s.admission = self.transport.admission_stats();
        // `snapshots_refused` and `snapshot_moved_aside` are set once at start.
        s.rules_version = self.core.rules_version();
        s.rules_file_error = self.rules_file_error.clone();
        s.unacked_hits = repl.unacked_hits();
    }

    async fn snapshot(&mut self, now: Nanos) {
        let Some(path) = self.settings.snapshot_path.clone() else {
            return;
        };
        let bytes = snapshot::capture(&self.limiter, now);
        match tokio::task::spawn_blocking(move || write_snapshot(&path, &bytes)).await {
            Ok(Ok(())) => self.snapshots_written += 1,
            Ok(Err(e)) => tracing::warn!(error = %e, "snapshot not written"),
            Err(e) => tracing::warn!(error = %e, "snapshot task failed"),
        }
    }

    /// Clean exit: ship what is pending, say goodbye, keep a snapshot.
    async fn finish(mut self) {
        let now = self.clock.now();
        self.core.finish(now);
        self.flush();
        if self.settings.snapshot_path.is_some() {
            self.snapshot(now).await;
        }
        self.publish_status();
        // Give the last datagrams a moment to leave before closing.
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.transport.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_writes_replace_the_file_whole_and_leave_no_temporary() {
        let dir = std::env::temp_dir().join(format!("drl-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/state.bin");
        write_durably(&path, b"first").unwrap();
        write_durably(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.bin")]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
