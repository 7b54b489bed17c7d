//! A cluster node: the thin async shell around the state machines.
//!
//! [`Node::start`] binds the QUIC transport, builds the limiter, and spawns
//! one task that owns the replicator and the membership state machine. That
//! task only moves bytes and time between them and the transport: frames in,
//! transmits out, timers from `poll_timeout`. Everything it decides comes from
//! `cluster::replication`, `cluster::membership` and `core::share`.
//!
//! The node admits nothing until it has recovered its own slots from its
//! peers (or its snapshot, or the recovery timeout passed with no peer to ask).
//! On shutdown it ships a final delta, leaves the membership, writes a
//! snapshot and closes its connections.

pub mod config;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::clock::SystemClock;
use crate::cluster::membership::{Member, MemberEvent, Membership, MembershipConfig};
use crate::cluster::replication::{
    ClaimEvent, Delivered, PeerState, ReplicationConfig, ReplicationStats, Replicator,
};
use crate::cluster::snapshot;
use crate::core::descriptor::Descriptors;
use crate::core::rules::RuleSet;
use crate::core::share::ShareView;
use crate::core::slot::NodeSlot;
use crate::core::time::{Clock, Nanos};
use crate::core::wire::{Frame, Kind, RulesFrame, Swim};
use crate::limiter::{Begun, CheckError, Decision, Finished, Limiter, LimiterConfig, Pending};
use crate::net::{Incoming, NodeTls, Transport};

pub use config::{Chaos, ConfigError, NodeFile, NodeSettings};

/// Why a node could not start. Nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("rules: {0}")]
    Rules(String),
    #[error("tls: {0}")]
    Tls(#[from] crate::net::TlsError),
    #[error("transport: {0}")]
    Transport(#[from] crate::net::TransportError),
    #[error("limiter: {0}")]
    Limiter(#[from] crate::limiter::SetupError),
    #[error("snapshot {path}: {reason}")]
    Snapshot { path: String, reason: String },
}

/// The version of the rules in force: a Lamport-style counter and the slot
/// of the node that put them in force. Larger wins everywhere.
pub type RulesVersion = (u64, u16);

/// Why new rules were refused. The rules in force stay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PutRulesError {
    #[error("{0}")]
    Invalid(String),
    #[error("rules text of {0} bytes exceeds the {max}-byte limit", max = crate::core::wire::MAX_RULES_BYTES)]
    TooLarge(usize),
    #[error("the node is shutting down")]
    Stopped,
}

enum Command {
    PutRules {
        text: String,
        reply: tokio::sync::oneshot::Sender<Result<RulesVersion, PutRulesError>>,
    },
    /// A request counted provisionally near its limit, to be confirmed by
    /// the peers' answers.
    Confirm {
        pending: Pending,
        reply: tokio::sync::oneshot::Sender<Decision>,
    },
}

/// What the node's task publishes for readiness, metrics and tests.
#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    pub rules_version: RulesVersion,
    /// The last reload of the rules file that failed, if the latest did.
    pub rules_file_error: Option<String>,
    /// Hits admitted here that some peer has not acknowledged yet.
    pub unacked_hits: u64,
    pub ready: bool,
    /// Live members, this node excluded.
    pub live: Vec<u16>,
    /// Every member ever seen, this node excluded.
    pub known: Vec<u16>,
    pub peers: BTreeMap<u16, PeerState>,
    pub replication: ReplicationStats,
    pub unacked_rounds: usize,
    /// Per peer, our rounds it has not acknowledged yet.
    pub peer_unacked_rounds: BTreeMap<u16, usize>,
    pub minority: bool,
    pub snapshots_written: u64,
}

/// What the HTTP API and metrics need of a running node. Cheap to clone.
#[derive(Clone)]
pub struct NodeApi {
    pub limiter: Arc<Limiter>,
    pub settings: NodeSettings,
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
    /// Checks a request of `cost` hits. Decided from local memory, except
    /// near a limit (see [`Limiter::begin_at`]): then the provisional hits
    /// go to every peer and the answer waits for theirs, one round trip, at
    /// most the claim timeout.
    pub async fn check(&self, d: &Descriptors<'_>, cost: u32) -> Result<Decision, CheckError> {
        let pending = match self.limiter.begin(d, cost)? {
            Begun::Decided(decision) => return Ok(decision),
            Begun::Confirm(pending) => pending,
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self
            .commands
            .send(Command::Confirm {
                pending: pending.clone(),
                reply,
            })
            .await;
        if sent.is_err() {
            // The node is stopping: nobody will confirm.
            return Ok(self
                .limiter
                .finish_at(self.limiter.clock().now(), &pending, None));
        }
        match answer.await {
            Ok(decision) => Ok(decision),
            Err(_) => Ok(self
                .limiter
                .finish_at(self.limiter.clock().now(), &pending, None)),
        }
    }
    /// Validates `text` and puts it in force on every node of the cluster
    /// (it reaches connected peers within a round trip and any node that
    /// connects later on its first connection). Invalid text changes nothing.
    pub async fn put_rules(&self, text: String) -> Result<RulesVersion, PutRulesError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::PutRules { text, reply })
            .await
            .map_err(|_| PutRulesError::Stopped)?;
        answer.await.map_err(|_| PutRulesError::Stopped)?
    }
}

/// A running node.
pub struct NodeHandle {
    pub limiter: Arc<Limiter>,
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
    pub fn status(&self) -> NodeStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub fn transport(&self) -> &Transport {
        &self.transport
    }
    /// See [`NodeApi::put_rules`].
    pub async fn put_rules(&self, text: String) -> Result<RulesVersion, PutRulesError> {
        self.api().put_rules(text).await
    }
    /// A cloneable handle for the HTTP API and metrics.
    pub fn api(&self) -> NodeApi {
        NodeApi {
            limiter: self.limiter.clone(),
            settings: self.settings.clone(),
            status: self.status.clone(),
            commands: self.commands.clone(),
        }
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

pub struct Node;

impl Node {
    /// Starts a node from checked settings.
    pub async fn start(settings: NodeSettings) -> Result<NodeHandle, NodeError> {
        let text = std::fs::read_to_string(&settings.rules)
            .map_err(|e| NodeError::Rules(format!("{}: {e}", settings.rules.display())))?;
        let rules = RuleSet::from_toml(&text).map_err(|e| NodeError::Rules(e.to_string()))?;
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
        let rules_digest = rules.digest();
        let rules_text = rules.source().to_owned();
        let config = LimiterConfig {
            own_slot: NodeSlot::new(settings.slot),
            slots: settings.cluster_size,
            max_keys: settings.max_keys,
            seed: settings.key_seed,
        };
        let limiter =
            Arc::new(Limiter::new(rules, config)?.clustered(ShareView::alone(settings.slot))?);
        if let Some(path) = &settings.snapshot_path {
            load_snapshot(&limiter, path, now)?;
        }
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
        let mut rc = ReplicationConfig::new(NodeSlot::new(settings.slot), settings.name.clone());
        rc.sync_interval = settings.sync_interval;
        rc.policy = settings.policy;
        rc.recovery_timeout = settings.recovery_timeout;
        rc.expected_peers = settings.cluster_size - 1;
        // A peer's hold on a claimed key must outlast the claimant's wait.
        limiter.set_confirm_hold(rc.claim_timeout * 2);
        let repl = Replicator::new(rc, incarnation, true, now);
        let me = Member::new(settings.name.clone(), settings.slot, peer_addr, incarnation);
        let membership = Membership::new(
            me,
            MembershipConfig::lan(settings.cluster_size as u32),
            incarnation ^ u64::from(settings.slot),
        );
        let status = Arc::new(Mutex::new(NodeStatus::default()));
        let (stop, stop_rx) = watch::channel(false);
        let wake = Arc::new(tokio::sync::Notify::new());
        let waker = wake.clone();
        limiter.set_wake(move || waker.notify_one());
        let driver = Driver {
            clock,
            limiter: limiter.clone(),
            settings: settings.clone(),
            transport: transport.clone(),
            repl,
            membership,
            rules_digest,
            addrs: BTreeMap::new(),
            known: BTreeSet::new(),
            live: BTreeSet::new(),
            status: status.clone(),
            next_snapshot: now + settings.snapshot_interval,
            next_discovery: now,
            next_status: now,
            snapshots_written: 0,
            rules: crdts::LWWReg {
                val: rules_text,
                marker: (0, settings.slot),
            },
            rules_file: file_stamp(&settings.rules),
            next_rules_check: now + Nanos::from_secs(1),
            rules_file_error: None,
            chaos: settings.chaos.map(|c| {
                use rand::SeedableRng;
                (c, rand::rngs::StdRng::seed_from_u64(c.seed))
            }),
            confirming: std::collections::HashMap::new(),
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

fn load_snapshot(limiter: &Limiter, path: &Path, now: Nanos) -> Result<(), NodeError> {
    match std::fs::read(path) {
        Ok(bytes) => snapshot::restore(limiter, now, &bytes)
            .map(|_| ())
            .map_err(|e| NodeError::Snapshot {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NodeError::Snapshot {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Modification time and length of a file, to notice changes.
fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn write_snapshot(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The one task that owns the state machines.
struct Driver {
    clock: SystemClock,
    limiter: Arc<Limiter>,
    settings: NodeSettings,
    transport: Transport,
    repl: Replicator,
    membership: Membership,
    rules_digest: u64,
    /// Peer slot → its peer address, as learned from connections.
    addrs: BTreeMap<u16, SocketAddr>,
    known: BTreeSet<u16>,
    live: BTreeSet<u16>,
    status: Arc<Mutex<NodeStatus>>,
    next_snapshot: Nanos,
    next_discovery: Nanos,
    next_status: Nanos,
    snapshots_written: u64,
    /// The rules in force cluster-wide, last writer wins by version.
    rules: crdts::LWWReg<String, RulesVersion>,
    rules_file: Option<(std::time::SystemTime, u64)>,
    next_rules_check: Nanos,
    rules_file_error: Option<String>,
    chaos: Option<(config::Chaos, rand::rngs::StdRng)>,
    /// Requests waiting for their claim's answers, by ticket.
    confirming: std::collections::HashMap<u64, (Pending, tokio::sync::oneshot::Sender<Decision>)>,
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
                Some(self.repl.poll_timeout()),
                self.membership.poll_timeout(),
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
                    self.repl.ship_now(now, &self.limiter);
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
                self.addrs.insert(slot, addr);
                self.repl.peer_connected(now, slot, self.rules_digest);
                // A peer that missed a rules change learns it here.
                let frame = self.rules_frame();
                let _ = self.transport.send(slot, frame);
            }
            Incoming::Disconnected { slot } => self.repl.peer_disconnected(slot),
            Incoming::Frame { from, bytes, .. } => {
                let hello = bytes.get(1) == Some(&(Kind::Hello as u8));
                match self
                    .repl
                    .handle_frame(now, from, &bytes, &self.limiter, self.rules_digest)
                {
                    Ok(Delivered::Swim(swim)) => {
                        // Malformed membership payloads are refused inside.
                        let _ = self.membership.handle_data(now, &swim);
                    }
                    Ok(Delivered::Rules(rules)) => self.on_peer_rules(rules),
                    Ok(Delivered::Applied) if hello => self.introduce(now, from),
                    Ok(Delivered::Applied) => {}
                    Err(e) => tracing::debug!(from, error = %e, "frame refused"),
                }
            }
        }
    }

    fn rules_frame(&self) -> Vec<u8> {
        Frame::Rules(RulesFrame {
            version: self.rules.marker.0,
            origin: self.rules.marker.1,
            text: self.rules.val.clone(),
        })
        .encode()
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::PutRules { text, reply } => {
                let version = (self.rules.marker.0 + 1, self.settings.slot);
                let _ = reply.send(self.adopt_rules(text, version));
            }
            Command::Confirm { pending, reply } => {
                let now = self.clock.now();
                let keys = pending.hits.iter().map(|h| (h.limit, h.key)).collect();
                let ticket = self.repl.claim(now, pending.started, keys, &self.limiter);
                self.confirming.insert(ticket, (pending, reply));
            }
        }
    }

    /// Puts `text` in force at `version` if it is valid, and passes it on to
    /// every connected peer (flooding: a node that adopts newer rules
    /// forwards them once, so they reach nodes the origin cannot).
    fn adopt_rules(
        &mut self,
        text: String,
        version: RulesVersion,
    ) -> Result<RulesVersion, PutRulesError> {
        if text.len() > crate::core::wire::MAX_RULES_BYTES {
            return Err(PutRulesError::TooLarge(text.len()));
        }
        let rules = RuleSet::from_toml(&text).map_err(|e| PutRulesError::Invalid(e.to_string()))?;
        let digest = rules.digest();
        self.limiter
            .replace_rules(rules)
            .map_err(|e| PutRulesError::Invalid(e.to_string()))?;
        self.rules_digest = digest;
        self.rules.update(text, version);
        let frame = self.rules_frame();
        for slot in self.transport.connected() {
            let _ = self.transport.send(slot, frame.clone());
        }
        tracing::info!(version = version.0, origin = version.1, "rules in force");
        Ok(version)
    }

    fn on_peer_rules(&mut self, r: RulesFrame) {
        let version = (r.version, r.origin);
        if version <= self.rules.marker {
            return;
        }
        if let Err(e) = self.adopt_rules(r.text, version) {
            tracing::warn!(error = %e, "rules from a peer refused");
        }
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
        if text == self.rules.val {
            self.rules_file_error = None;
            return;
        }
        let version = (self.rules.marker.0 + 1, self.settings.slot);
        self.rules_file_error = self.adopt_rules(text, version).err().map(|e| e.to_string());
        if let Some(e) = &self.rules_file_error {
            tracing::warn!(error = %e, "rules file not reloaded");
        }
    }

    /// After a peer's hello: make sure membership knows it.
    fn introduce(&mut self, now: Nanos, slot: u16) {
        let (Some(peer), Some(&addr)) = (self.repl.peers().get(&slot), self.addrs.get(&slot))
        else {
            return;
        };
        let Some(incarnation) = peer.incarnation else {
            return;
        };
        if !self.membership.is_alive(slot) {
            self.membership
                .announce(now, Member::new(peer.name.clone(), slot, addr, incarnation));
        }
    }

    async fn on_timeout(&mut self) {
        let now = self.clock.now();
        self.membership.handle_timeout(now);
        self.repl.handle_timeout(now, &self.limiter);
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
    /// not a known peer yet. A node that has lost every member announces
    /// itself again to the peers it knows (SWIM stops probing when alone).
    async fn discover(&mut self) {
        let now = self.clock.now();
        if self.membership.members().is_empty() {
            for (&slot, &addr) in &self.addrs {
                if let Some(peer) = self.repl.peers().get(&slot) {
                    if !peer.name.is_empty() {
                        let member = Member::new(
                            peer.name.clone(),
                            slot,
                            addr,
                            peer.incarnation.unwrap_or(0),
                        );
                        self.membership.announce(now, member);
                    }
                }
            }
        }
        let own = self.membership.me().addr;
        for seed in self.settings.seeds.clone() {
            let Ok(addrs) = tokio::net::lookup_host(seed.as_str()).await else {
                tracing::debug!(seed, "seed does not resolve");
                continue;
            };
            for addr in addrs {
                let known = self.addrs.values().any(|a| *a == addr);
                if addr != own && addr != self.settings.listen_peer && !known {
                    self.transport.connect_seed(addr);
                }
            }
        }
    }

    fn flush(&mut self) {
        let now = self.clock.now();
        while let Some(event) = self.repl.poll_claim_event() {
            let (ticket, answered) = match event {
                ClaimEvent::Answered { ticket, answered } => (ticket, Some(answered)),
                ClaimEvent::Expired { ticket } => (ticket, None),
            };
            let Some((pending, reply)) = self.confirming.remove(&ticket) else {
                continue;
            };
            match self
                .limiter
                .finish_or_yield_at(now, &pending, answered, true)
            {
                Finished::Yield { blocking } => {
                    let deadline = pending.started + self.repl.config().claim_timeout;
                    let keys = pending.hits.iter().map(|h| (h.limit, h.key)).collect();
                    self.repl
                        .yield_to(ticket, keys, blocking, answered.unwrap_or(0), deadline);
                    self.confirming.insert(ticket, (pending, reply));
                }
                Finished::Decided(decision) => {
                    if !decision.is_allowed() {
                        // Its hits were given back: tell the peers now, a
                        // conflicting claim may be waiting for exactly that.
                        self.repl.ship_now(now, &self.limiter);
                    }
                    if reply.send(decision).is_err() && decision.is_allowed() {
                        // The caller is gone: nobody was told yes, give it back.
                        self.limiter.give_back(now, &pending);
                    }
                }
            }
        }
        while let Some(event) = self.membership.poll_event() {
            self.on_member_event(now, event);
        }
        while let Some((to, payload)) = self.membership.poll_transmit() {
            let frame = Frame::Swim(Swim { payload }).encode();
            let _ = self.transport.send(to.slot, frame);
        }
        while let Some(t) = self.repl.poll_transmit() {
            if !t.reliable && self.chaos.is_some() {
                self.send_with_chaos(t.to, t.bytes);
                continue;
            }
            // A frame to a peer with no connection is lost like a datagram;
            // replication resends what matters.
            let _ = self.transport.send(t.to, t.bytes);
        }
    }

    /// Loses, duplicates or delays a datagram as the test's chaos says.
    fn send_with_chaos(&mut self, to: u16, bytes: Vec<u8>) {
        use rand::RngExt;
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

    fn on_member_event(&mut self, now: Nanos, event: MemberEvent) {
        match event {
            MemberEvent::Up(m) | MemberEvent::Rejoined(m) => {
                if usize::from(m.slot) >= self.settings.cluster_size || m.slot == self.settings.slot
                {
                    return;
                }
                self.addrs.insert(m.slot, m.addr);
                self.known.insert(m.slot);
                self.live.insert(m.slot);
                self.repl.add_peer(m.slot);
                self.repl.set_liveness(&self.limiter, m.slot, true);
                tracing::info!(slot = m.slot, name = %m.name, "member up");
            }
            MemberEvent::Down(m) => {
                self.live.remove(&m.slot);
                self.repl.set_liveness(&self.limiter, m.slot, false);
                tracing::info!(slot = m.slot, name = %m.name, "member down");
            }
        }
        let peers = self
            .known
            .iter()
            .filter_map(|s| self.addrs.get(s).map(|a| (*s, *a)))
            .collect();
        self.transport.set_peers(peers);
        self.limiter.set_share_view(self.share_view());
        let _ = now;
    }

    fn share_view(&self) -> ShareView {
        let bits = |set: &BTreeSet<u16>| set.iter().fold(0u64, |m, &s| m | 1 << s);
        ShareView::for_cluster(
            self.settings.slot,
            bits(&self.known),
            bits(&self.live),
            self.repl.in_minority(),
            self.settings.policy,
            self.settings.inflight_ppm,
            self.settings.sync_interval * 2,
        )
    }

    fn publish_status(&self) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.ready = self.limiter.is_admitting();
        s.live = self.live.iter().copied().collect();
        s.known = self.known.iter().copied().collect();
        s.peers = self.repl.peers().clone();
        s.replication = self.repl.stats().clone();
        s.unacked_rounds = self.repl.unacked_rounds();
        s.peer_unacked_rounds = self.repl.unacked_rounds_by_peer();
        s.minority = self.repl.in_minority();
        s.snapshots_written = self.snapshots_written;
        s.rules_version = self.rules.marker;
        s.rules_file_error = self.rules_file_error.clone();
        s.unacked_hits = self.repl.unacked_hits();
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
        self.repl
            .handle_timeout(now.max(self.repl.poll_timeout()), &self.limiter);
        self.membership.leave(now);
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
