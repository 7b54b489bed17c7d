//! The public face of the async shell: one QUIC endpoint per node, the
//! peers it keeps connections to, and sending. The connections themselves
//! live in `peers`, one connection's tasks in `link`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch, Semaphore};

use super::link::PeerId;
use super::peers::{self, Link, Shared, State};
use super::tls::{peer_certificate, verify_cert_slot, IdentityError, NodeTls};
use drl_core::wire::MAX_FRAME_BYTES;

/// Capacity of the event queue handed out by [`Transport::bind`].
pub const EVENT_QUEUE: usize = 4096;
/// Stream frames queued per connection before [`SendError::Backlogged`].
pub const STREAM_QUEUE: usize = 32;
/// Handshakes (TLS and slot exchange) in flight at once from unknown
/// addresses; more are refused. Known peer addresses have as many again of
/// their own.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Handshakes in flight at once from one unknown source IP.
pub const MAX_PENDING_PER_SOURCE: usize = 8;
/// Longest an unknown source may take to finish its TLS handshake and slot
/// exchange (a peer on a LAN needs milliseconds; known peers get
/// five seconds).
pub const UNKNOWN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the accept loop did with incoming connection attempts, since bind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Unknown, unvalidated sources answered with a stateless Retry.
    pub retried: u64,
    /// Refused because every handshake slot of their pool was taken.
    pub refused_busy: u64,
    /// Refused because their source IP had too many handshakes in flight.
    pub refused_per_source: u64,
    /// Verified connections from known peer addresses.
    pub accepted_known: u64,
    /// Verified connections from other addresses.
    pub accepted_unknown: u64,
    /// Handshakes that failed or timed out.
    pub failed: u64,
}
/// First reconnect delay; doubles per failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the transport reports to its consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A frame from a verified peer slot: from a datagram (`reliable` false)
    /// or a whole unidirectional stream (`reliable` true).
    Frame {
        /// The sender's slot, as its certificate proves.
        from: u16,
        /// The frame, undecoded; at most `MAX_FRAME_BYTES`.
        bytes: Vec<u8>,
        /// True if it came on a stream, false if in a datagram.
        reliable: bool,
    },
    /// The slot went from no connection to one (dialed or accepted), or
    /// its node restarted: a new instance replaced the old one's
    /// connections, reported as `Disconnected` then `Connected`. `addr` is
    /// the remote address of that connection.
    Connected {
        /// The peer's slot.
        slot: u16,
        /// The peer's address on that connection.
        addr: SocketAddr,
    },
    /// The slot's last connection closed, or its node restarted.
    Disconnected {
        /// The peer's slot.
        slot: u16,
    },
}

/// How [`Transport::send`] sent a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// An unreliable QUIC datagram.
    Datagram,
    /// Queued for its own unidirectional stream.
    Stream,
}

/// Counters of one peer slot, over its live connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Round-trip estimate of the connection frames are sent on.
    pub rtt: Duration,
    /// UDP bytes sent on the live connections (all QUIC packets, since each
    /// connection opened).
    pub udp_tx_bytes: u64,
    /// UDP bytes received on the live connections.
    pub udp_rx_bytes: u64,
    /// UDP datagrams (QUIC packets) sent on the live connections.
    pub udp_tx_datagrams: u64,
    /// Datagrams from this slot dropped because the event queue was full
    /// (since the transport started).
    pub frames_dropped: u64,
    /// Stream frames from this slot refused for exceeding `MAX_FRAME_BYTES`
    /// (since the transport started).
    pub frames_too_long: u64,
}

/// Why [`Transport::bind`] failed. Nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Called outside a tokio runtime.
    #[error("the transport must be started inside a tokio runtime")]
    NoRuntime,
    /// The node's own certificate lacks `slot-<slot>.drl.internal`, so its
    /// peers would refuse it.
    #[error("the node certificate does not prove slot {slot}: {source}")]
    CertificateNotForSlot {
        /// The node's slot.
        slot: u16,
        /// Why the certificate does not prove it.
        source: IdentityError,
    },
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        source: std::io::Error,
    },
}

/// Why [`Transport::send`] did not send. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No live connection to the slot (or its stream writer has stopped).
    #[error("no connection to slot {0}")]
    NotConnected(u16),
    /// The frame is longer than `MAX_FRAME_BYTES`.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The frame's length, in bytes.
        len: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// [`STREAM_QUEUE`] frames to the slot already wait for their streams.
    #[error("stream queue to slot {0} is full")]
    Backlogged(u16),
    /// quinn refused the datagram (the peer turned datagrams off, or the
    /// connection is closing).
    #[error("datagram to slot {slot} refused: {source}")]
    Datagram {
        /// The peer's slot.
        slot: u16,
        /// quinn's reason.
        source: quinn::SendDatagramError,
    },
}

/// The peer transport of one node. Cheap to clone; dropping the last clone
/// closes everything, as [`Transport::shutdown`] does without waiting.
#[derive(Clone)]
pub struct Transport {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("own_slot", &self.shared().own.slot)
            .finish_non_exhaustive()
    }
}

/// Held by the handles only: tasks hold `Shared`, so its drop means the
/// user is gone.
struct Owner {
    shared: Arc<Shared>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl Transport {
    /// Listens on `listen` (port 0 picks one) as `own_slot`, which `tls`'s
    /// certificate must prove. Must be called inside a tokio runtime.
    /// Returns the transport and the queue of what it receives.
    pub fn bind(
        listen: SocketAddr,
        tls: NodeTls,
        own_slot: u16,
    ) -> Result<(Transport, mpsc::Receiver<Incoming>), TransportError> {
        verify_cert_slot(tls.certificate(), own_slot).map_err(|source| {
            TransportError::CertificateNotForSlot {
                slot: own_slot,
                source,
            }
        })?;
        let runtime = Handle::try_current().map_err(|_| TransportError::NoRuntime)?;
        let endpoint = {
            let _entered = runtime.enter();
            quinn::Endpoint::server(tls.server_config(), listen)
        }
        .map_err(|source| TransportError::Bind {
            addr: listen,
            source,
        })?;
        let (events, receiver) = mpsc::channel(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            endpoint,
            client: tls.client_config(),
            own: PeerId {
                slot: own_slot,
                instance: new_instance(),
            },
            runtime: runtime.clone(),
            events,
            closing: watch::Sender::new(false),
            order: tokio::sync::Mutex::new(()),
            state: Mutex::new(State::default()),
            handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
            known_handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
            admission: Default::default(),
        });
        runtime.spawn(peers::accept_loop(shared.clone()));
        let transport = Transport {
            owner: Arc::new(Owner { shared }),
        };
        Ok((transport, receiver))
    }

    /// What the accept loop did with incoming attempts so far.
    pub fn admission_stats(&self) -> AdmissionStats {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.shared().admission;
        AdmissionStats {
            retried: c.retried.load(Relaxed),
            refused_busy: c.refused_busy.load(Relaxed),
            refused_per_source: c.refused_per_source.load(Relaxed),
            accepted_known: c.accepted_known.load(Relaxed),
            accepted_unknown: c.accepted_unknown.load(Relaxed),
            failed: c.failed.load(Relaxed),
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.owner.shared
    }

    /// The slot this node speaks as.
    pub fn own_slot(&self) -> u16 {
        self.shared().own.slot
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared().endpoint.local_addr()
    }

    /// Keeps one dialed connection to each listed peer, reconnecting with
    /// backoff ([`MIN_BACKOFF`] doubling to [`MAX_BACKOFF`]). Peers no longer
    /// listed, or listed at a new address, are forgotten: their dialed
    /// connection closes. This node's own slot is ignored; for a slot listed
    /// twice the last address wins. Connections peers dialed stay open.
    pub fn set_peers(&self, peers: Vec<(u16, SocketAddr)>) {
        let shared = self.shared();
        let wanted: HashMap<u16, SocketAddr> = peers
            .into_iter()
            .filter(|&(slot, _)| slot != shared.own.slot)
            .collect();
        let mut state = shared.state();
        if state.closed {
            return;
        }
        let stale: Vec<u16> = state
            .dialers
            .iter()
            .filter(|(slot, dialer)| wanted.get(slot) != Some(&dialer.addr))
            .map(|(slot, _)| *slot)
            .collect();
        for slot in stale {
            state.forget(slot);
        }
        for (slot, addr) in wanted {
            // A seed dial already under way to this address becomes the
            // slot's dialer when it answers: a second dial now would give the
            // peer two new connections from a restarting node at once, and
            // the one it keeps may not be the one its answers went out on.
            if !state.dialers.contains_key(&slot) && !state.seeds.contains_key(&addr) {
                state.start_dialer(shared, slot, addr, None);
            }
        }
    }

    /// Dials an address whose slot is unknown (a seed), retrying with
    /// backoff until it answers. Once the slot is learned and verified the
    /// peer is kept like a listed one (a later [`Transport::set_peers`]
    /// that does not list it forgets it) and, if the slot had no connection
    /// yet, `Connected` is reported. An address that turns out to be this
    /// node is dropped.
    pub fn connect_seed(&self, addr: SocketAddr) {
        let shared = self.shared();
        let mut state = shared.state();
        let known = state.seeds.contains_key(&addr)
            || state.dialers.values().any(|dialer| dialer.addr == addr);
        if state.closed || known {
            return;
        }
        state.start_seed(shared, addr);
    }

    /// Sends one frame to `slot`: as a datagram when it fits
    /// [`Transport::max_datagram_size`], else queued for its own stream.
    /// Never waits: when quinn's datagram buffer is full it drops the oldest
    /// queued datagram, and a full stream queue is [`SendError::Backlogged`].
    /// Uses the connection this node dialed, else the one the peer dialed.
    pub fn send(&self, slot: u16, bytes: Vec<u8>) -> Result<Via, SendError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(SendError::TooLarge {
                len: bytes.len(),
                max: MAX_FRAME_BYTES,
            });
        }
        let link = self.preferred(slot).ok_or(SendError::NotConnected(slot))?;
        match link.conn.max_datagram_size() {
            Some(max) if bytes.len() <= max => link
                .conn
                .send_datagram(bytes.into())
                .map(|()| Via::Datagram)
                .map_err(|source| SendError::Datagram { slot, source }),
            _ => link
                .frames
                .try_send(bytes)
                .map(|()| Via::Stream)
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => SendError::Backlogged(slot),
                    mpsc::error::TrySendError::Closed(_) => SendError::NotConnected(slot),
                }),
        }
    }

    /// Largest frame [`Transport::send`] sends as a datagram to `slot`.
    pub fn max_datagram_size(&self, slot: u16) -> Option<usize> {
        self.preferred(slot)?.conn.max_datagram_size()
    }

    /// Counters for `slot`, or `None` when it has no connection.
    pub fn stats(&self, slot: u16) -> Option<PeerStats> {
        let state = self.shared().state();
        let links = state.links.get(&slot)?;
        let mut stats = PeerStats {
            rtt: links.preferred()?.conn.rtt(),
            ..PeerStats::default()
        };
        for link in [&links.dialed, &links.accepted].into_iter().flatten() {
            let conn = link.conn.stats();
            stats.udp_tx_bytes += conn.udp_tx.bytes;
            stats.udp_rx_bytes += conn.udp_rx.bytes;
            stats.udp_tx_datagrams += conn.udp_tx.datagrams;
        }
        if let Some(counters) = state.counters.get(&slot) {
            stats.frames_dropped = counters.dropped.load(Ordering::Relaxed);
            stats.frames_too_long = counters.too_long.load(Ordering::Relaxed);
        }
        Some(stats)
    }

    /// Closes every connection to `slot` (the peer was silent on them while
    /// they were open); the dialers of both ends connect again.
    pub fn reset_links(&self, slot: u16) {
        let state = self.shared().state();
        if let Some(links) = state.links.get(&slot) {
            for link in [&links.dialed, &links.accepted].into_iter().flatten() {
                link.conn.close(
                    quinn::VarInt::from_u32(super::close_code::SILENT),
                    b"silent",
                );
            }
        }
    }

    /// Slots with at least one verified connection, ascending.
    pub fn connected(&self) -> Vec<u16> {
        let mut slots: Vec<u16> = self.shared().state().links.keys().copied().collect();
        slots.sort_unstable();
        slots
    }

    /// The certificate `slot` presented, for checks beyond the slot (the
    /// node name of its Hello, say).
    pub fn peer_certificate(&self, slot: u16) -> Option<CertificateDer<'static>> {
        peer_certificate(&self.preferred(slot)?.conn).ok()
    }

    /// Closes every connection and the endpoint, then waits (at most a
    /// second) for the peers to be told. Stops dialing for good; the event
    /// queue then reports `Disconnected` for each connected slot.
    pub async fn shutdown(&self) {
        let shared = self.shared();
        shared.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.endpoint.wait_idle()).await;
    }

    fn preferred(&self, slot: u16) -> Option<Link> {
        self.shared()
            .state()
            .links
            .get(&slot)
            .and_then(|links| links.preferred().cloned())
    }
}

/// A random instance id per transport: `RandomState` is seeded from the
/// operating system, and the clock separates two transports of one process.
fn new_instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    hasher.write_u128(now.as_nanos());
    hasher.finish()
}
