//! The registry of verified connections and the tasks that fill it.
//!
//! A peer slot may have two connections at once, the one this node dialed
//! and the one the peer dialed; frames are read from both and sent on the
//! dialed one when it exists. Every connection is registered, and its
//! events queued, under one ordering lock, so the consumer sees, for each
//! slot, `Connected`, its frames, then `Disconnected`, never out of order.
//! The state lock is a plain mutex never held across an await; sending
//! never takes the ordering lock, so a consumer that is behind cannot
//! deadlock against its own `send` or `set_peers` calls.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use quinn::{Connection, VarInt};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::time::{sleep, Instant};
use tracing::{debug, info, warn};

use super::close_code;
use super::link::{self, HandshakeError, LinkCounters, PeerId};
use super::transport::{
    Incoming, MAX_BACKOFF, MAX_PENDING_PER_SOURCE, MIN_BACKOFF, STREAM_QUEUE,
    UNKNOWN_HANDSHAKE_TIMEOUT,
};

/// Most peer addresses remembered (four per node of a 256-node cluster:
/// room for address changes without growing without bound; past 1,024
/// addresses, new ones are not remembered).
const MAX_KNOWN_ADDRS: usize = 1024;

/// A connection that lived this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(1);

pub(crate) struct Shared {
    pub endpoint: quinn::Endpoint,
    pub client: quinn::ClientConfig,
    pub own: PeerId,
    pub runtime: Handle,
    pub events: mpsc::Sender<Incoming>,
    /// Turns true once, when the transport closes.
    pub closing: watch::Sender<bool>,
    /// Held while a link is (un)registered and its event queued.
    pub order: tokio::sync::Mutex<()>,
    pub state: Mutex<State>,
    /// Handshake slots for hosts this node does not know.
    pub handshakes: Arc<Semaphore>,
    /// Handshake slots kept for known peer addresses, which strangers can
    /// never take.
    pub known_handshakes: Arc<Semaphore>,
    pub admission: AdmissionCounters,
}

/// What the accept loop did with incoming connection attempts.
#[derive(Default)]
pub(crate) struct AdmissionCounters {
    pub retried: AtomicU64,
    pub refused_busy: AtomicU64,
    pub refused_per_source: AtomicU64,
    pub accepted_known: AtomicU64,
    pub accepted_unknown: AtomicU64,
    pub failed: AtomicU64,
}

#[derive(Default)]
pub(crate) struct State {
    pub closed: bool,
    pub next_id: u64,
    pub dialers: HashMap<u16, Dialer>,
    pub seeds: HashMap<SocketAddr, Arc<Notify>>,
    pub links: HashMap<u16, PeerLinks>,
    pub counters: HashMap<u16, Arc<LinkCounters>>,
    /// Addresses of peers: dialed, seeds, and the sources of verified
    /// connections. A peer dials from the address it listens on (one socket
    /// per endpoint), so its attempts are recognised here.
    pub known_addrs: HashSet<SocketAddr>,
    /// Handshakes in flight per source IP, for unknown sources.
    pub pending_by_ip: HashMap<IpAddr, usize>,
}

impl State {
    fn remember(&mut self, addr: SocketAddr) {
        if self.known_addrs.len() < MAX_KNOWN_ADDRS {
            self.known_addrs.insert(addr);
        }
    }
}

pub(crate) struct Dialer {
    pub addr: SocketAddr,
    generation: u64,
    cancel: Arc<Notify>,
}

#[derive(Default)]
pub(crate) struct PeerLinks {
    /// The instance every link below belongs to.
    instance: u64,
    pub dialed: Option<Link>,
    pub accepted: Option<Link>,
}

impl PeerLinks {
    /// The connection frames go out on.
    pub(crate) fn preferred(&self) -> Option<&Link> {
        self.dialed.as_ref().or(self.accepted.as_ref())
    }

    fn side(&mut self, direction: Direction) -> &mut Option<Link> {
        match direction {
            Direction::Dialed => &mut self.dialed,
            Direction::Accepted => &mut self.accepted,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Link {
    id: u64,
    pub conn: Connection,
    pub frames: mpsc::Sender<Vec<u8>>,
    /// The dialer generation that made it; `None` when accepted.
    generation: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Dialed,
    Accepted,
}

/// How a link ended.
enum Served {
    /// Never registered: the transport closed or the dialer was replaced.
    Refused,
    /// Registered, served, now closed.
    Closed,
}

impl Shared {
    /// The registry, locked. Never held across an `.await`.
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something ever did, the
        // maps are still consistent enough to keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a connection event, waiting for room unless the transport is
    /// closing: a consumer that stopped reading must not keep tasks alive.
    async fn emit(&self, event: Incoming) {
        let mut closing = self.closing.subscribe();
        tokio::select! {
            biased;
            // An error means the consumer is gone; nothing to tell.
            _ = self.events.send(event) => {}
            _ = closing.wait_for(|&closing| closing) => {}
        }
    }

    /// Stops all dialing and closes the endpoint with every connection.
    pub(crate) fn close(&self) {
        let mut state = self.state();
        if state.closed {
            return;
        }
        state.closed = true;
        for (_, dialer) in state.dialers.drain() {
            dialer.cancel.notify_one();
        }
        for (_, cancel) in state.seeds.drain() {
            cancel.notify_one();
        }
        drop(state);
        self.closing.send_replace(true);
        self.endpoint
            .close(VarInt::from_u32(close_code::SHUTDOWN), b"shutdown");
    }
}

impl State {
    /// Starts a dialer task that keeps one connection to `slot` at `addr`,
    /// taking over `first` if a seed already connected. A dialer already
    /// running for the slot is superseded: its generation no longer matches.
    pub(crate) fn start_dialer(
        &mut self,
        shared: &Arc<Shared>,
        slot: u16,
        addr: SocketAddr,
        first: Option<(Connection, PeerId)>,
    ) {
        self.next_id += 1;
        let generation = self.next_id;
        let cancel = Arc::new(Notify::new());
        self.remember(addr);
        self.dialers.insert(
            slot,
            Dialer {
                addr,
                generation,
                cancel: cancel.clone(),
            },
        );
        let task = dial(shared.clone(), slot, addr, generation, cancel, first);
        shared.runtime.spawn(task);
    }

    /// Starts dialing `addr`, whose slot is not known yet.
    pub(crate) fn start_seed(&mut self, shared: &Arc<Shared>, addr: SocketAddr) {
        let cancel = Arc::new(Notify::new());
        self.remember(addr);
        self.seeds.insert(addr, cancel.clone());
        shared.runtime.spawn(seed(shared.clone(), addr, cancel));
    }

    /// Stops dialing `slot` and closes the connection its dialer made.
    pub(crate) fn forget(&mut self, slot: u16) {
        let Some(dialer) = self.dialers.remove(&slot) else {
            return;
        };
        dialer.cancel.notify_one();
        let dialed = self.links.get(&slot).and_then(|l| l.dialed.as_ref());
        if let Some(link) = dialed.filter(|link| link.generation == Some(dialer.generation)) {
            link.conn
                .close(VarInt::from_u32(close_code::FORGOTTEN), b"forgotten");
        }
    }
}

/// Admits incoming connection attempts so that hosts which cannot
/// authenticate never keep known peers out:
///
/// - an attempt from a known peer address takes a slot of its own pool
///   (strangers cannot exhaust it) with the full handshake timeout;
/// - an attempt from an unknown address whose source is not yet validated is
///   answered with a stateless QUIC Retry: it costs no slot and no state, and
///   a spoofed source never comes back with the token;
/// - a validated unknown source may hold at most `MAX_PENDING_PER_SOURCE`
///   handshakes per IP, from the shared pool of `MAX_PENDING_HANDSHAKES`,
///   each for at most `UNKNOWN_HANDSHAKE_TIMEOUT`.
pub(crate) async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let addr = incoming.remote_address();
        let known = shared.state().known_addrs.contains(&addr);
        let counters = &shared.admission;
        if !known && !incoming.remote_address_validated() {
            counters.retried.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            continue;
        }
        let pool = if known {
            &shared.known_handshakes
        } else {
            &shared.handshakes
        };
        let Ok(permit) = pool.clone().try_acquire_owned() else {
            debug!(%addr, known, "too many pending handshakes");
            counters.refused_busy.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        };
        let source = (!known).then_some(addr.ip());
        if let Some(ip) = source {
            let mut state = shared.state();
            let pending = state.pending_by_ip.entry(ip).or_default();
            if *pending >= MAX_PENDING_PER_SOURCE {
                drop(state);
                counters.refused_per_source.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
                continue;
            }
            *pending += 1;
        }
        let limit = if known {
            link::HANDSHAKE_TIMEOUT
        } else {
            UNKNOWN_HANDSHAKE_TIMEOUT
        };
        let task_shared = shared.clone();
        shared.runtime.spawn(async move {
            let accepted = link::accept(incoming, task_shared.own, limit).await;
            drop(permit);
            if let Some(ip) = source {
                let mut state = task_shared.state();
                if let Some(n) = state.pending_by_ip.get_mut(&ip) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        state.pending_by_ip.remove(&ip);
                    }
                }
            }
            let counters = &task_shared.admission;
            match accepted {
                Ok((conn, peer)) => {
                    if known {
                        counters.accepted_known.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counters.accepted_unknown.fetch_add(1, Ordering::Relaxed);
                    }
                    task_shared.state().remember(addr);
                    serve(&task_shared, conn, peer, Direction::Accepted, None).await;
                }
                Err(error) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    log_refusal(addr, &error);
                }
            }
        });
    }
}

/// Keeps one dialed connection to `slot` at `addr` until cancelled or
/// replaced by a newer dialer generation.
async fn dial(
    shared: Arc<Shared>,
    slot: u16,
    addr: SocketAddr,
    generation: u64,
    cancel: Arc<Notify>,
    mut first: Option<(Connection, PeerId)>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let dialed = match first.take() {
            Some(dialed) => Some(dialed),
            None => tokio::select! {
                _ = cancel.notified() => return,
                dialed = link::dial(&shared.endpoint, shared.client.clone(), addr, shared.own, Some(slot)) => {
                    dialed.map_err(|error| log_refusal(addr, &error)).ok()
                }
            },
        };
        if let Some((conn, peer)) = dialed {
            let since = Instant::now();
            let served = serve(&shared, conn, peer, Direction::Dialed, Some(generation)).await;
            if let Served::Refused = served {
                return;
            }
            if since.elapsed() >= STABLE_AFTER {
                backoff = MIN_BACKOFF;
            }
        }
        tokio::select! {
            _ = cancel.notified() => return,
            _ = sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Dials a seed until it answers, then hands the connection to a dialer.
async fn seed(shared: Arc<Shared>, addr: SocketAddr, cancel: Arc<Notify>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        tokio::select! {
            _ = cancel.notified() => return,
            dialed = link::dial(&shared.endpoint, shared.client.clone(), addr, shared.own, None) => match dialed {
                Ok((conn, peer)) => {
                    let mut state = shared.state();
                    state.seeds.remove(&addr);
                    if state.closed || state.dialers.contains_key(&peer.slot) {
                        // The slot already has a dialer (listed, or another
                        // seed address of the same node): it does the work.
                        conn.close(VarInt::from_u32(close_code::REPLACED), b"duplicate");
                    } else {
                        info!(%addr, slot = peer.slot, "seed answered");
                        state.start_dialer(&shared, peer.slot, addr, Some((conn, peer)));
                    }
                    return;
                }
                Err(HandshakeError::SelfConnection) => {
                    debug!(%addr, "seed is this node");
                    shared.state().seeds.remove(&addr);
                    return;
                }
                Err(error) => log_refusal(addr, &error),
            },
        }
        tokio::select! {
            _ = cancel.notified() => return,
            _ = sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// What registering a link changed for its slot.
struct Registered {
    id: u64,
    counters: Arc<LinkCounters>,
    /// The slot had no connection before.
    first: bool,
    /// The slot's connections belonged to an earlier instance of the peer
    /// and were closed.
    restarted: bool,
}

/// Registers a verified connection, serves it until it closes, and
/// unregisters it, queuing `Connected`/`Disconnected` when the slot gains
/// its first or loses its last connection, or its node restarted.
async fn serve(
    shared: &Arc<Shared>,
    conn: Connection,
    peer: PeerId,
    direction: Direction,
    generation: Option<u64>,
) -> Served {
    let slot = peer.slot;
    let (frames, outgoing) = mpsc::channel(STREAM_QUEUE);
    let order = shared.order.lock().await;
    let link = Link {
        id: 0,
        conn: conn.clone(),
        frames,
        generation,
    };
    let Some(registered) = register(&mut shared.state(), peer, direction, link) else {
        conn.close(VarInt::from_u32(close_code::FORGOTTEN), b"forgotten");
        return Served::Refused;
    };
    let addr = conn.remote_address();
    if registered.restarted {
        warn!(slot, %addr, "peer restarted: its old connections are closed");
        shared.emit(Incoming::Disconnected { slot }).await;
    }
    if registered.first || registered.restarted {
        info!(slot, %addr, ?direction, "peer connected");
        shared.emit(Incoming::Connected { slot, addr }).await;
    }
    drop(order);

    link::run(&conn, slot, &shared.events, &registered.counters, outgoing).await;

    let order = shared.order.lock().await;
    if unregister(&mut shared.state(), slot, direction, registered.id) {
        let reason = conn.close_reason().map(|r| r.to_string());
        info!(
            slot,
            reason = reason.unwrap_or_default(),
            "peer disconnected"
        );
        shared.emit(Incoming::Disconnected { slot }).await;
    }
    drop(order);
    Served::Closed
}

fn register(
    state: &mut State,
    peer: PeerId,
    direction: Direction,
    mut link: Link,
) -> Option<Registered> {
    let current = match link.generation {
        Some(generation) => state.dialers.get(&peer.slot).map(|d| d.generation) == Some(generation),
        None => true,
    };
    if state.closed || !current {
        return None;
    }
    state.next_id += 1;
    link.id = state.next_id;
    let id = link.id;
    let counters = state.counters.entry(peer.slot).or_default().clone();
    let links = state.links.entry(peer.slot).or_default();
    let mut restarted = false;
    if links.instance != peer.instance {
        for old in [links.dialed.take(), links.accepted.take()]
            .into_iter()
            .flatten()
        {
            restarted = true;
            old.conn
                .close(VarInt::from_u32(close_code::REPLACED), b"restarted");
        }
        links.instance = peer.instance;
    }
    let first = links.preferred().is_none() && !restarted;
    if let Some(old) = links.side(direction).replace(link) {
        old.conn
            .close(VarInt::from_u32(close_code::REPLACED), b"replaced");
    }
    Some(Registered {
        id,
        counters,
        first,
        restarted,
    })
}

/// Removes link `id` if it is still registered; true when that leaves the
/// slot without a connection.
fn unregister(state: &mut State, slot: u16, direction: Direction, id: u64) -> bool {
    let Some(links) = state.links.get_mut(&slot) else {
        return false;
    };
    let side = links.side(direction);
    if side.as_ref().map(|link| link.id) != Some(id) {
        // Replaced: whoever replaced it owns the slot's events now.
        return false;
    }
    *side = None;
    let empty = links.preferred().is_none();
    if empty {
        state.links.remove(&slot);
    }
    empty
}

fn log_refusal(addr: SocketAddr, error: &HandshakeError) {
    match error {
        HandshakeError::Identity(_) | HandshakeError::UnexpectedSlot { .. } => {
            warn!(%addr, %error, "peer refused");
        }
        _ => debug!(%addr, %error, "connection failed"),
    }
}
