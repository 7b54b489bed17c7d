//! The node's task: it owns the [`NodeCore`] and moves bytes and time
//! between it and the world (frames in, transmits out, timers from
//! `poll_timeout`), hands each confirmed request to the task waiting on its
//! ticket, and does the I/O the core's events ask for (peers to dial, rules
//! to keep on disk) and the node's file work (snapshots, the rules file).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use drl_core::clock::SystemClock;
use drl_core::cluster::confirm::Ticket;
use drl_core::cluster::node_core::{CoreEvent, NodeCore, RulesOutcome, RulesTicket};
use drl_core::cluster::snapshot;
use drl_core::limiter::{Decided, Limiter};
use drl_core::rules::{RuleSet, RulesDiff};
use drl_core::slot::NodeSlot;
use drl_core::time::{Clock, Nanos};

#[cfg(feature = "harness")]
use super::config;
use super::files::{file_stamp, write_snapshot};
use super::{
    rules_state, Command, NodeSettings, NodeStatus, PutRulesError, ResetOutcome, RulesChange,
    RulesInForce, RulesVersion,
};
use crate::net::{Incoming, Transport};

/// Idle keys each table looks at per second, beside the two every new key
/// pays for.
const SWEEP_PER_TABLE: usize = 32;

/// Where the outcome of a rules change goes.
pub(super) type RulesReply = tokio::sync::oneshot::Sender<Result<RulesOutcome, PutRulesError>>;

/// The one task that owns the node's core and does its I/O.
pub(super) struct Driver {
    pub(super) clock: SystemClock,
    /// Steers `clock`'s correction toward the cluster's time.
    pub(super) clock_sync: drl_core::cluster::clock_sync::ClockDiscipline,
    pub(super) limiter: Arc<Limiter>,
    pub(super) settings: NodeSettings,
    pub(super) transport: Transport,
    pub(super) core: NodeCore,
    pub(super) status: Arc<Mutex<NodeStatus>>,
    /// The rules in force and their version, published as they change.
    pub(super) rules_in_force: Arc<Mutex<RulesInForce>>,
    /// The version last written to the rules state file.
    pub(super) kept_version: Option<RulesVersion>,
    /// Where the member list is kept (none: nowhere).
    pub(super) members_path: Option<std::path::PathBuf>,
    /// Who waits for the outcome of each rules change made here.
    pub(super) rules_waiters: std::collections::HashMap<RulesTicket, RulesReply>,
    pub(super) next_snapshot: Nanos,
    pub(super) next_discovery: Nanos,
    pub(super) next_status: Nanos,
    pub(super) snapshots_written: u64,
    /// Where the rules in force are kept across restarts.
    pub(super) rules_state: Option<std::path::PathBuf>,
    pub(super) rules_file: Option<(std::time::SystemTime, u64)>,
    pub(super) next_rules_check: Nanos,
    pub(super) rules_file_error: Option<String>,
    #[cfg(feature = "harness")]
    pub(super) chaos: Option<(config::Chaos, rand::rngs::StdRng)>,
    /// Who waits for each request under confirmation.
    pub(super) waiters: std::collections::HashMap<Ticket, tokio::sync::oneshot::Sender<Decided>>,
    /// Who waits for each admin reset, and what it cleared here.
    pub(super) reset_waiters:
        std::collections::HashMap<u64, (u64, tokio::sync::oneshot::Sender<ResetOutcome>)>,
    /// Who waits for each forwarded refund.
    pub(super) refund_waiters: std::collections::HashMap<
        u64,
        tokio::sync::oneshot::Sender<
            Result<drl_core::limiter::RefundOutcome, drl_core::limiter::RefundError>,
        >,
    >,
    /// The write-ahead journal, cut at each snapshot.
    pub(super) journal: Option<Arc<super::journal::Journal>>,
}

impl Driver {
    pub(super) async fn run(
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
                // And when a pass of the timers takes longer than their
                // period, the next is due at once: without this, an
                // overloaded node would only ever run timers, never hear
                // the acknowledgements that end its resends, and never
                // take a command.
                self.take_queued(&mut incoming, &mut commands);
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
                    // Take whatever else is already queued before sending;
                    // with frames always queued, the biased select would
                    // never reach the commands (a rules change, a check
                    // waiting to confirm): each batch of frames lets some in.
                    self.take_queued(&mut incoming, &mut commands);
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

    /// Takes a bounded batch of what is queued: frames, then commands.
    fn take_queued(
        &mut self,
        incoming: &mut mpsc::Receiver<Incoming>,
        commands: &mut mpsc::Receiver<Command>,
    ) {
        for _ in 0..256 {
            match incoming.try_recv() {
                Ok(event) => self.on_incoming(event),
                Err(_) => break,
            }
        }
        for _ in 0..64 {
            match commands.try_recv() {
                Ok(command) => self.on_command(command),
                Err(_) => break,
            }
        }
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
            Command::PutRules { change, reply } => match self.put_rules(change, true) {
                Ok(ticket) => {
                    self.rules_waiters.insert(ticket, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Confirm { pending, reply } => {
                let now = self.clock.now();
                let ticket = self.core.handle_confirm(now, pending);
                self.waiters.insert(ticket, reply);
            }
            Command::ResetCounters { counters, reply } => {
                let now = self.clock.now();
                let (ticket, cleared) = self.core.handle_reset(now, &counters);
                self.reset_waiters.insert(ticket, (cleared, reply));
            }
            Command::ForgetMember { slot, reply } => {
                let now = self.clock.now();
                let outcome = self.core.handle_forget(now, NodeSlot::new(slot));
                // The answer shows the members as they are now.
                self.publish_status();
                let _ = reply.send(outcome);
            }
            Command::ForwardRefund {
                issuer,
                receipt,
                reply,
            } => {
                let now = self.clock.now();
                let ticket = self
                    .core
                    .handle_forward_refund(now, NodeSlot::new(issuer), receipt);
                self.refund_waiters.insert(ticket, reply);
            }
        }
    }

    /// Keeps a change's rules on disk and puts them in force as the next
    /// version from this node, proposed to its peers. An admin change
    /// (`admin`) is refused if the node sees no majority or cannot keep it
    /// on disk; a file reload is put in force regardless (the failure is
    /// logged). Every change put in force is logged under `drl::audit`.
    fn put_rules(
        &mut self,
        change: RulesChange,
        admin: bool,
    ) -> Result<RulesTicket, PutRulesError> {
        if admin {
            self.core.check_quorum()?;
        }
        let prepared = self.core.prepare_rules(change.rules, change.if_match)?;
        // Fifty names a list: a rule set of thousands changed whole is
        // still one readable line.
        let diff = RulesDiff::between(&self.limiter.rules(), prepared.rules()).capped(50);
        if let Err(e) = self.keep_rules(prepared.version(), prepared.text()) {
            if admin {
                return Err(PutRulesError::NotPersisted(e.to_string()));
            }
        }
        let (version, replaced) = (prepared.version(), self.core.rules_version());
        let ticket = self.core.commit_rules(prepared).inspect_err(|_| {
            // Not in force: the kept rules go back to those that are.
            let text = self.core.rules_text().to_owned();
            let _ = self.keep_rules(self.core.rules_version(), &text);
        })?;
        tracing::info!(
            target: "drl::audit",
            by = %change.by,
            version = %version,
            replaced = %replaced,
            if_match = change.if_match.is_some(),
            added = ?diff.added,
            removed = ?diff.removed,
            changed = ?diff.changed,
            "rules change accepted"
        );
        Ok(ticket)
    }

    /// Writes the rules in force to the rules state file, if there is one.
    fn keep_rules(&mut self, version: RulesVersion, text: &str) -> std::io::Result<()> {
        let Some(path) = &self.rules_state else {
            return Ok(());
        };
        let kept = rules_state::PersistedRules {
            version,
            text: text.to_owned(),
        };
        let result = kept.store(path);
        match &result {
            Ok(()) => self.kept_version = Some(version),
            Err(e) => tracing::error!(path = %path.display(), error = %e, "rules not kept on disk"),
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
            .and_then(|rules| self.put_rules(RulesChange::new(rules, "rules file"), false));
        self.rules_file_error = put.err().map(|e| e.to_string());
        if let Some(e) = &self.rules_file_error {
            tracing::warn!(error = %e, "rules file not reloaded");
        }
    }

    async fn on_timeout(&mut self) {
        if !self.settings.test_clock_uncorrected {
            let raw = self.clock.raw_now();
            self.core.discipline_clock(raw, &mut self.clock_sync);
        }
        let now = self.clock.now();
        self.core.handle_timeout(now);
        if now >= self.next_discovery {
            self.next_discovery = now + self.settings.discovery_interval;
            self.discover().await;
        }
        if now >= self.next_rules_check {
            self.next_rules_check = now + Nanos::from_secs(1);
            self.check_rules_file();
            // Idle keys back to the free lists, and request-defined limits'
            // tables that hold nothing any more.
            self.limiter.sweep_at(now, SWEEP_PER_TABLE);
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
        while let Some(done) = self.core.poll_reset_done() {
            if let Some((cleared_here, reply)) = self.reset_waiters.remove(&done.ticket) {
                let _ = reply.send(ResetOutcome {
                    cleared_here,
                    acked: done.acked.iter().map(|s| s.get()).collect(),
                    pending: done.pending.iter().map(|s| s.get()).collect(),
                });
            }
        }
        while let Some(done) = self.core.poll_refund_done() {
            if let Some(reply) = self.refund_waiters.remove(&done.ticket) {
                let _ = reply.send(done.result);
            }
        }
        while let Some(event) = self.core.poll_event() {
            match event {
                CoreEvent::Recovered => tracing::info!("recovered: admitting"),
                CoreEvent::RulesInForce { version, text } => {
                    // Rules committed here were kept before; peers' are kept
                    // now (a failure is logged, the rules stay in force).
                    if self.kept_version != Some(version) {
                        let _ = self.keep_rules(version, &text);
                    }
                    // Published before any answer to the peer leaves: a
                    // change confirmed by this node reads here at once.
                    *self
                        .rules_in_force
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = RulesInForce {
                        version: self.core.rules_version(),
                        rules: self.limiter.rules(),
                    };
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
                CoreEvent::Members(members) => {
                    if let Some(path) = &self.members_path {
                        if let Err(e) = super::members::store(path, &members) {
                            tracing::warn!(path = %path.display(), error = %e, "could not keep the member list");
                        }
                    }
                }
            }
        }
        while let Some((ticket, outcome)) = self.core.poll_rules_outcome() {
            tracing::info!(target: "drl::audit", outcome = ?outcome, "rules change ended");
            if let Some(reply) = self.rules_waiters.remove(&ticket) {
                let _ = reply.send(Ok(outcome));
            }
        }
        for slot in self.core.take_links_to_reset() {
            tracing::warn!(
                slot = slot.get(),
                "peer silent on an open connection: its connections are reset"
            );
            self.transport.reset_links(slot.get());
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
        // Between rounds: every key a round took is with the journal now.
        if let Some(tap) = drl_core::cluster::store::shipped_keys(&self.limiter) {
            tap.seal();
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
        s.clock = self.clock_sync.status();
        // The status reports slots by number.
        s.live = self.core.live().iter().map(|s| s.get()).collect();
        s.known = self.core.known().iter().map(|s| s.get()).collect();
        s.members = self.core.members().iter().map(|s| s.get()).collect();
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
        // A checkpoint: what the journal wrote before the new segment is in
        // the snapshot captured after it. The node's task never waits long
        // on a slow disk: without a new segment nothing is removed.
        let segment = match &self.journal {
            Some(j) => tokio::time::timeout(Duration::from_millis(50), j.rotate())
                .await
                .ok()
                .flatten(),
            None => None,
        };
        let now = self.clock.now().max(now);
        let bytes = snapshot::capture(&self.limiter, now);
        match tokio::task::spawn_blocking(move || write_snapshot(&path, &bytes)).await {
            Ok(Ok(())) => {
                self.snapshots_written += 1;
                if let (Some(j), Some(seq)) = (&self.journal, segment) {
                    j.checkpointed(seq);
                }
            }
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
        if let Some(j) = self.journal.clone() {
            let _ = tokio::task::spawn_blocking(move || j.stop()).await;
        }
        self.publish_status();
        // Give the last datagrams a moment to leave before closing.
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.transport.shutdown().await;
    }
}
