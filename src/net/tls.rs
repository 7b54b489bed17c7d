//! TLS material of one node and the QUIC configurations built from it.
//!
//! Both configurations trust the cluster CA alone and use the *ring*
//! provider explicitly, so nothing depends on a process-wide default
//! provider. Session resumption is off: every connection runs a full
//! handshake and presents a full certificate chain, so a slot check never
//! rests on a cached session.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::{verify_server_name, Resumption, WebPkiServerVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::{slot_server_name, ALPN};

/// Idle connections close after this long without a packet.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive interval: well under the idle timeout, so a live peer never
/// idles out even when there is nothing to gossip.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Datagram buffer on each side, sized for bursts of deltas.
pub const DATAGRAM_BUFFER_BYTES: usize = 4 << 20;
/// Concurrent unidirectional streams a peer may open: each holds at most
/// one frame of up to `MAX_FRAME_BYTES` while it is read.
pub const MAX_CONCURRENT_STREAMS: u32 = 64;

/// Why a node's TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// A PEM file's content is not PEM, or holds no usable private key.
    #[error("malformed PEM in the {what}: {source}")]
    Pem {
        /// Which input: the CA file, the certificate file or the key file.
        what: &'static str,
        /// The parser's complaint.
        source: rustls_pki_types::pem::Error,
    },
    /// An input that must hold a certificate holds none (which one).
    #[error("no certificate found in the {0}")]
    NoCertificate(&'static str),
    /// A CA certificate rustls cannot trust as a root.
    #[error("the CA certificate is not usable as a trust anchor: {0}")]
    Anchor(rustls::Error),
    /// The verifier of peer certificates could not be built from the CAs.
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
    /// rustls refused the node's certificate chain or key (for example, a key
    /// that does not match the certificate).
    #[error("the node certificate or key is unusable: {0}")]
    NodeCertificate(rustls::Error),
    /// The rustls configuration has no cipher suite QUIC can start with.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] NoInitialCipherSuite),
}

/// Why a certificate does not prove a name or slot.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The connection carries no peer certificate.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The name to check is not a DNS name.
    #[error("{0:?} is not a valid DNS name")]
    InvalidName(String),
    /// The certificate is not valid X.509.
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(rustls::Error),
    /// The certificate does not carry the name.
    #[error("the certificate is not valid for {name}: {source}")]
    NameMismatch {
        /// The name checked.
        name: String,
        /// rustls's reason.
        source: rustls::Error,
    },
}

/// A node's TLS identity: the cluster CA it trusts and the certificate and
/// key it presents, turned into quinn server and client configurations.
#[derive(Clone)]
pub struct NodeTls {
    certificate: CertificateDer<'static>,
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Reads PEM files: the cluster CA (one or more certificates, all
    /// trusted: an old and a new CA during rotation), the node's
    /// certificate chain (leaf first) and its private key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<NodeTls, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        NodeTls::from_pem(&read(ca)?, &read(cert)?, &read(key)?)
    }

    /// Like [`NodeTls::load`], from PEM text in memory.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<NodeTls, TlsError> {
        let ca = parse_certs(ca_pem, "CA file")?;
        let chain = parse_certs(cert_pem, "certificate file")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::Pem {
            what: "key file",
            source,
        })?;
        NodeTls::from_der(ca, chain, key)
    }

    /// From DER: CA certificates, the node's chain (leaf first), its key.
    pub fn from_der(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<NodeTls, TlsError> {
        let certificate = chain
            .first()
            .cloned()
            .ok_or(TlsError::NoCertificate("certificate chain"))?;
        if ca.is_empty() {
            return Err(TlsError::NoCertificate("CA list"));
        }
        let mut roots = RootCertStore::empty();
        for anchor in ca {
            roots.add(anchor).map_err(TlsError::Anchor)?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let transport = Arc::new(transport_config());

        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::NodeCertificate)?
            .with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()?,
            )
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::NodeCertificate)?;
        server_tls.alpn_protocols = vec![ALPN.to_vec()];
        server_tls.session_storage = Arc::new(NoServerSessionStorage {});
        server_tls.send_tls13_tickets = 0;
        server_tls.max_early_data_size = 0;
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
        server.transport_config(transport.clone());

        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::NodeCertificate)?
            .with_webpki_verifier(
                WebPkiServerVerifier::builder_with_provider(roots, provider).build()?,
            )
            .with_client_auth_cert(chain, key)
            .map_err(TlsError::NodeCertificate)?;
        client_tls.alpn_protocols = vec![ALPN.to_vec()];
        client_tls.resumption = Resumption::disabled();
        client_tls.enable_early_data = false;
        let mut client =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
        client.transport_config(transport);

        Ok(NodeTls {
            certificate,
            server,
            client,
        })
    }

    /// The node's own (leaf) certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// Server side: requires a client certificate chaining to the cluster
    /// CA, ALPN `drl/1`.
    pub fn server_config(&self) -> quinn::ServerConfig {
        self.server.clone()
    }

    /// Client side: trusts only the cluster CA, presents the node's
    /// certificate, ALPN `drl/1`.
    pub fn client_config(&self) -> quinn::ClientConfig {
        self.client.clone()
    }
}

/// Checks that `cert` is valid for the DNS name `name` (a subject
/// alternative name match, wildcards included). It does not check the
/// chain: use it on certificates a TLS handshake already verified.
pub fn verify_cert_name(cert: &CertificateDer<'_>, name: &str) -> Result<(), IdentityError> {
    let parsed = ParsedCertificate::try_from(cert).map_err(IdentityError::Unparsable)?;
    let server_name =
        ServerName::try_from(name).map_err(|_| IdentityError::InvalidName(name.to_string()))?;
    verify_server_name(&parsed, &server_name).map_err(|source| IdentityError::NameMismatch {
        name: name.to_string(),
        source,
    })
}

/// Checks that `cert` proves `slot`: it carries `slot-<slot>.drl.internal`.
pub fn verify_cert_slot(cert: &CertificateDer<'_>, slot: u16) -> Result<(), IdentityError> {
    verify_cert_name(cert, &slot_server_name(slot))
}

/// The leaf certificate the peer of `conn` presented in its handshake.
pub(crate) fn peer_certificate(
    conn: &quinn::Connection,
) -> Result<CertificateDer<'static>, IdentityError> {
    conn.peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.into_iter().next())
        .ok_or(IdentityError::NoCertificate)
}

fn parse_certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

fn transport_config() -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
            IDLE_TIMEOUT.as_millis() as u32,
        ))))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER_BYTES))
        .datagram_send_buffer_size(DATAGRAM_BUFFER_BYTES)
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS))
        // One full frame fits the window of its stream.
        .stream_receive_window(VarInt::from_u32(2 << 20))
        .receive_window(VarInt::from_u32(16 << 20))
        .send_window(16 << 20);
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::certs::{ClusterCa, NodeCertSpec};

    fn node(ca: &ClusterCa, slot: u16) -> crate::net::NodeCert {
        ca.issue(&NodeCertSpec {
            name: format!("node-{slot}"),
            slot,
            hosts: vec!["node.example".into()],
        })
        .expect("issue")
    }

    #[test]
    fn node_certificate_proves_its_slot_only() {
        let ca = ClusterCa::generate().expect("ca");
        let cert = node(&ca, 7);
        let tls = NodeTls::from_pem(
            ca.cert_pem().as_bytes(),
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
        )
        .expect("loads");
        let leaf = tls.certificate();
        verify_cert_slot(leaf, 7).expect("own slot");
        assert!(verify_cert_slot(leaf, 8).is_err());
        assert!(verify_cert_slot(leaf, 70).is_err());
        for name in ["drl.internal", "node-7", "localhost", "node.example"] {
            verify_cert_name(leaf, name).expect(name);
        }
        verify_cert_name(leaf, "127.0.0.1").expect("loopback address");
        assert!(matches!(
            verify_cert_name(leaf, "not a name"),
            Err(IdentityError::InvalidName(_))
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let ca = ClusterCa::generate().expect("ca");
        let cert = node(&ca, 1);
        let (ca_pem, cert_pem, key_pem) = (
            ca.cert_pem().as_bytes(),
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
        );
        assert!(NodeTls::from_pem(b"", cert_pem, key_pem).is_err());
        assert!(NodeTls::from_pem(ca_pem, b"junk", key_pem).is_err());
        assert!(NodeTls::from_pem(ca_pem, cert_pem, b"").is_err());
        // A key that is not the certificate's.
        let other = node(&ca, 2);
        assert!(NodeTls::from_pem(ca_pem, cert_pem, other.key_pem.as_bytes()).is_err());
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01]);
        assert!(matches!(
            verify_cert_slot(&junk, 1),
            Err(IdentityError::Unparsable(_))
        ));
        assert!(matches!(
            NodeTls::load(
                Path::new("/nonexistent/ca.pem"),
                Path::new("a"),
                Path::new("b")
            ),
            Err(TlsError::Read { .. })
        ));
    }
}
