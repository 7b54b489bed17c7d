//! The peer transport: QUIC with mutual TLS between the nodes of a cluster.
//!
//! This layer carries opaque frames (see `proto-spec/PROTOCOL.md`); it never
//! decodes them. What it guarantees is *who* sent a frame: every connection
//! it hands out has a verified peer slot.
//!
//! # Identity
//!
//! Every node holds a certificate signed by the cluster CA (see [`certs`]).
//! Both sides of a connection present one, and both verify the other's chain
//! against the cluster CA alone, so a host without a CA-signed certificate
//! cannot finish a handshake. A certificate proves a slot by carrying the
//! subject alternative name `slot-<n>.drl.internal` ([`slot_server_name`]);
//! every node certificate also carries [`CLUSTER_SERVER_NAME`].
//!
//! Right after the TLS handshake each side opens its first unidirectional
//! stream, writes its announcement and finishes the stream: its own slot
//! (`u16`) then its instance (`u64`, random per process start), both
//! big-endian, ten bytes in all. Each side checks that the other's
//! certificate proves the slot it announced, and a dialer that asked for a
//! given slot (server name `slot-<n>.drl.internal`) also checks that the
//! announcement is that slot. A dialer that knows only an address (a seed)
//! connects as [`CLUSTER_SERVER_NAME`] and learns the slot from the
//! announcement. Any mismatch closes the connection with
//! [`close_code::IDENTITY`]. Frames flow only after both checks pass.
//!
//! The instance tells a restarted peer from the connections its previous
//! process left behind: when a slot shows up with a new instance, the old
//! instance's connections are closed at once (rather than after the idle
//! timeout) and the consumer sees `Disconnected` then `Connected`.
//!
//! # Layout
//!
//! - [`certs`]: a cluster CA and node certificates (rcgen), for development
//!   clusters and tests.
//! - [`tls`]: [`NodeTls`], the rustls and quinn configurations of one node,
//!   and the certificate name checks.
//! - [`transport`]: [`Transport`], the async shell's public face: one
//!   endpoint, the peers to dial, sending, statistics.
//! - `peers`: the registry of verified connections and the tasks that fill
//!   it: the accept loop, a dialer per peer with backoff, seed dialers.
//! - `link`: one connection: the announcement exchange, then its readers
//!   and writer.

pub mod certs;
pub mod tls;
pub mod transport;

mod link;
mod peers;

pub use certs::{
    generate_dev_certs, issue_dev_cert, local_cluster_specs, CertError, ClusterCa, NodeCert,
    NodeCertSpec,
};
pub use tls::{verify_cert_name, verify_cert_slot, IdentityError, NodeTls, TlsError};
pub use transport::{
    AdmissionStats, Incoming, PeerStats, SendError, Transport, TransportError, Via,
};

/// The ALPN protocol every node speaks.
pub const ALPN: &[u8] = b"drl/1";

/// The name every node certificate carries; dialers that do not know the
/// slot behind an address (seeds) use it as the TLS server name.
pub const CLUSTER_SERVER_NAME: &str = "drl.internal";

/// The name that proves a slot: `slot-<slot>.drl.internal`.
pub fn slot_server_name(slot: u16) -> String {
    format!("slot-{slot}.{CLUSTER_SERVER_NAME}")
}

/// Application error codes this transport closes connections and stops
/// streams with. The peer sees them in `ConnectionError::ApplicationClosed`.
pub mod close_code {
    /// Orderly close: the node is shutting down.
    pub const SHUTDOWN: u32 = 0;
    /// The peer's announcement was missing, malformed, or its slot not
    /// proven by its certificate.
    pub const IDENTITY: u32 = 1;
    /// A newer connection to or from the same slot took this one's place,
    /// or the slot's node restarted.
    pub const REPLACED: u32 = 2;
    /// The peer is no longer listed.
    pub const FORGOTTEN: u32 = 3;
    /// The address turned out to be this node itself.
    pub const SELF: u32 = 4;
    /// Nothing arrived on the peer's connections for a while although they
    /// were open: closed so that both ends dial afresh.
    pub const SILENT: u32 = 5;
    /// Stream code: the frame was longer than `MAX_FRAME_BYTES`.
    pub const FRAME_TOO_LONG: u32 = 16;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_stable() {
        assert_eq!(slot_server_name(0), "slot-0.drl.internal");
        assert_eq!(slot_server_name(65535), "slot-65535.drl.internal");
    }
}
