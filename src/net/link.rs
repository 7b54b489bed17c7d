//! One connection: the slot exchange that opens it, and the reader and
//! writer tasks that serve it until it closes.
//!
//! Nothing here trusts the peer: every read is bounded, every error ends
//! the read (or the connection) and is logged, none panics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, ReadToEndError, VarInt};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{debug, warn};

use super::tls::{peer_certificate, verify_cert_slot, IdentityError};
use super::transport::Incoming;
use super::{close_code, slot_server_name, CLUSTER_SERVER_NAME};
use drl_core::wire::MAX_FRAME_BYTES;

/// Longest a handshake and slot exchange may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection was not established.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("cannot start a connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("handshake timed out")]
    Timeout,
    #[error("announcement failed: {0}")]
    Announcement(String),
    #[error("peer announced slot {announced}, expected {expected}")]
    UnexpectedSlot { announced: u16, expected: u16 },
    #[error("peer identity refused: {0}")]
    Identity(#[from] IdentityError),
    #[error("the peer is this node's own slot")]
    SelfConnection,
}

impl HandshakeError {
    fn close_code(&self) -> u32 {
        match self {
            HandshakeError::SelfConnection => close_code::SELF,
            _ => close_code::IDENTITY,
        }
    }
}

/// Frames dropped on the way in from one slot, across its connections.
#[derive(Debug, Default)]
pub(crate) struct LinkCounters {
    /// Datagrams dropped because the event queue was full.
    pub dropped: AtomicU64,
    /// Streams stopped because they exceeded `MAX_FRAME_BYTES`.
    pub too_long: AtomicU64,
}

/// Who is at the other end of a connection: a slot, proven by the peer's
/// certificate, and the instance of the node holding it, random per
/// process start, so that a restarted peer is told apart from the one
/// whose connections it leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerId {
    pub slot: u16,
    pub instance: u64,
}

impl PeerId {
    /// Slot then instance, big-endian: the first unidirectional stream of
    /// each side.
    const ANNOUNCEMENT_BYTES: usize = 10;

    fn announcement(self) -> [u8; Self::ANNOUNCEMENT_BYTES] {
        let mut bytes = [0; Self::ANNOUNCEMENT_BYTES];
        bytes[..2].copy_from_slice(&self.slot.to_be_bytes());
        bytes[2..].copy_from_slice(&self.instance.to_be_bytes());
        bytes
    }

    fn parse(bytes: &[u8]) -> Option<PeerId> {
        let slot = bytes.get(..2)?.try_into().ok()?;
        let instance = bytes.get(2..)?.try_into().ok()?;
        Some(PeerId {
            slot: u16::from_be_bytes(slot),
            instance: u64::from_be_bytes(instance),
        })
    }
}

/// Dials `addr`. With `expected`, TLS itself checks the peer holds that
/// slot; without, the peer's announcement names it. Either way the returned
/// slot is proven by the peer's certificate.
pub(crate) async fn dial(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    own: PeerId,
    expected: Option<u16>,
) -> Result<(Connection, PeerId), HandshakeError> {
    let name = expected.map_or_else(|| CLUSTER_SERVER_NAME.to_string(), slot_server_name);
    let connecting = endpoint.connect_with(config, addr, &name)?;
    let conn = timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| HandshakeError::Timeout)??;
    let peer = verify(&conn, own, expected).await?;
    Ok((conn, peer))
}

/// Completes an incoming connection and learns its verified peer.
/// `limit` bounds the TLS handshake and the slot exchange together.
pub(crate) async fn accept(
    incoming: quinn::Incoming,
    own: PeerId,
    limit: Duration,
) -> Result<(Connection, PeerId), HandshakeError> {
    let connecting = incoming.accept()?;
    timeout(limit, async {
        let conn = connecting.await?;
        let peer = verify(&conn, own, None).await?;
        Ok((conn, peer))
    })
    .await
    .map_err(|_| HandshakeError::Timeout)?
}

/// Runs the exchange; on failure closes the connection with a code saying
/// why.
async fn verify(
    conn: &Connection,
    own: PeerId,
    expected: Option<u16>,
) -> Result<PeerId, HandshakeError> {
    let result = timeout(HANDSHAKE_TIMEOUT, exchange(conn, own, expected))
        .await
        .unwrap_or(Err(HandshakeError::Timeout));
    if let Err(error) = &result {
        conn.close(
            VarInt::from_u32(error.close_code()),
            error.to_string().as_bytes(),
        );
    }
    result
}

/// Each side announces itself on its first unidirectional stream and reads
/// the other's announcement; the other's certificate must prove the slot it
/// announced.
async fn exchange(
    conn: &Connection,
    own: PeerId,
    expected: Option<u16>,
) -> Result<PeerId, HandshakeError> {
    let announce = async {
        let mut stream = conn.open_uni().await?;
        stream
            .write_all(&own.announcement())
            .await
            .map_err(|e| HandshakeError::Announcement(e.to_string()))?;
        stream
            .finish()
            .map_err(|e| HandshakeError::Announcement(e.to_string()))
    };
    let learn = async {
        let mut stream = conn.accept_uni().await?;
        let bytes = stream
            .read_to_end(PeerId::ANNOUNCEMENT_BYTES)
            .await
            .map_err(|e| HandshakeError::Announcement(e.to_string()))?;
        PeerId::parse(&bytes).ok_or_else(|| {
            HandshakeError::Announcement(format!(
                "{} bytes instead of {}",
                bytes.len(),
                PeerId::ANNOUNCEMENT_BYTES
            ))
        })
    };
    let ((), peer) = tokio::try_join!(announce, learn)?;
    if let Some(expected) = expected {
        if peer.slot != expected {
            return Err(HandshakeError::UnexpectedSlot {
                announced: peer.slot,
                expected,
            });
        }
    }
    if peer.slot == own.slot {
        return Err(HandshakeError::SelfConnection);
    }
    verify_cert_slot(&peer_certificate(conn)?, peer.slot)?;
    Ok(peer)
}

/// Serves a verified connection until it closes: datagrams and streams in,
/// queued stream frames out.
pub(crate) async fn run(
    conn: &Connection,
    slot: u16,
    events: &mpsc::Sender<Incoming>,
    counters: &Arc<LinkCounters>,
    outgoing: mpsc::Receiver<Vec<u8>>,
) {
    tokio::join!(
        read_datagrams(conn, slot, events, counters),
        read_streams(conn, slot, events, counters),
        write_streams(conn, slot, outgoing),
    );
}

/// Never waits on the consumer: a datagram that does not fit the event
/// queue is dropped and counted, so a slow consumer cannot stall QUIC.
async fn read_datagrams(
    conn: &Connection,
    slot: u16,
    events: &mpsc::Sender<Incoming>,
    counters: &LinkCounters,
) {
    while let Ok(datagram) = conn.read_datagram().await {
        let frame = Incoming::Frame {
            from: slot,
            bytes: Vec::from(datagram),
            reliable: false,
        };
        match events.try_send(frame) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One task per stream, at most `MAX_CONCURRENT_STREAMS` at a time (the
/// peer may not open more); finished ones are reaped as we go.
async fn read_streams(
    conn: &Connection,
    slot: u16,
    events: &mpsc::Sender<Incoming>,
    counters: &Arc<LinkCounters>,
) {
    let mut readers = JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_uni() => match accepted {
                Ok(stream) => {
                    readers.spawn(read_frame(stream, slot, events.clone(), counters.clone()));
                }
                Err(_) => break,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    }
    // The connection is gone: frames still waiting for the consumer go too.
    readers.shutdown().await;
}

async fn read_frame(
    mut stream: quinn::RecvStream,
    from: u16,
    events: mpsc::Sender<Incoming>,
    counters: Arc<LinkCounters>,
) {
    match stream.read_to_end(MAX_FRAME_BYTES).await {
        Ok(bytes) => {
            let frame = Incoming::Frame {
                from,
                bytes,
                reliable: true,
            };
            // Waiting here is back-pressure: the peer's stream credit runs
            // out while the consumer is behind. An error means the consumer
            // is gone, and the frame with it.
            let _ = events.send(frame).await;
        }
        Err(ReadToEndError::TooLong) => {
            counters.too_long.fetch_add(1, Ordering::Relaxed);
            warn!(
                slot = from,
                "stream frame over {MAX_FRAME_BYTES} bytes refused"
            );
            // Fails only if the stream already ended: nothing left to stop.
            let _ = stream.stop(VarInt::from_u32(close_code::FRAME_TOO_LONG));
        }
        Err(ReadToEndError::Read(error)) => {
            debug!(slot = from, %error, "stream frame lost");
        }
    }
}

/// One stream per frame, written in queue order. Ends when the connection
/// closes or the link is dropped.
async fn write_streams(conn: &Connection, slot: u16, mut outgoing: mpsc::Receiver<Vec<u8>>) {
    loop {
        let frame = tokio::select! {
            frame = outgoing.recv() => match frame {
                Some(frame) => frame,
                None => return,
            },
            _ = conn.closed() => return,
        };
        let written = async {
            let mut stream = conn.open_uni().await?;
            stream.write_chunk(frame.into()).await?;
            stream.finish()?;
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        };
        if let Err(error) = written.await {
            debug!(slot, %error, "stream frame not sent");
            if conn.close_reason().is_some() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcement_round_trips_and_refuses_other_lengths() {
        let id = PeerId {
            slot: 0x0102,
            instance: 0x0304_0506_0708_090a,
        };
        let bytes = id.announcement();
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(PeerId::parse(&bytes), Some(id));
        assert_eq!(PeerId::parse(&bytes[..9]), None);
        assert_eq!(PeerId::parse(&[]), None);
        assert_eq!(PeerId::parse(&[0; 11]), None);
    }
}
