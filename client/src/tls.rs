//! TLS for the gRPC transport (feature `tls`): rustls on ring, a custom CA
//! (the one that signed the nodes' certificates), an optional client
//! certificate for nodes that require mutual TLS (`grpc_tls_client_ca`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// How the client authenticates nodes, and itself to them.
///
/// ```
/// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir();
/// # let (ca, cert, key) = (dir.join("ca.pem"), dir.join("c.pem"), dir.join("k.pem"));
/// # let _ = || -> Result<(), Box<dyn std::error::Error>> {
/// use drl_client::TlsConfig;
///
/// let tls = TlsConfig::from_ca_file(&ca)?
///     .client_identity_files(&cert, &key)?
///     .server_name("node-0");
/// # Ok(()) };
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    roots: Vec<CertificateDer<'static>>,
    identity: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    server_name: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("roots", &self.roots.len())
            .field("client_identity", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    /// PEM text without what it should hold.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsConfig {
    /// Trusts the certificates of `ca_pem` (PEM, one or more) and no
    /// others.
    pub fn from_ca_pem(ca_pem: &[u8]) -> Result<Self, TlsError> {
        let roots = CertificateDer::pem_slice_iter(ca_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(format!("CA: {e}")))?;
        if roots.is_empty() {
            return Err(TlsError::Pem("CA: no certificate in the PEM text".into()));
        }
        Ok(TlsConfig {
            roots,
            identity: None,
            server_name: None,
        })
    }

    /// [`TlsConfig::from_ca_pem`] from a file.
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<Self, TlsError> {
        TlsConfig::from_ca_pem(&read(path.as_ref())?)
    }

    /// Presents this certificate chain and key (PEM) to nodes that ask for
    /// one (mutual TLS).
    pub fn client_identity(mut self, cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(format!("client certificate: {e}")))?;
        if chain.is_empty() {
            return Err(TlsError::Pem(
                "client certificate: none in the PEM text".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TlsError::Pem(format!("client key: {e}")))?;
        self.identity = Some((chain, Arc::new(key)));
        Ok(self)
    }

    /// [`TlsConfig::client_identity`] from files.
    pub fn client_identity_files(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let (cert, key) = (read(cert.as_ref())?, read(key.as_ref())?);
        self.client_identity(&cert, &key)
    }

    /// The name every node's certificate is checked against. Default: the
    /// node's IP address (its certificate must then name that address).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// The rustls connector (ALPN `h2`) and the fixed server name, if any.
    pub(crate) fn connector(
        &self,
    ) -> Result<(tokio_rustls::TlsConnector, Option<ServerName<'static>>), TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.roots {
            roots.add(c.clone())?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain.clone(), key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = match &self.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| TlsError::Pem(format!("server name {n:?}: {e}")))?,
            ),
            None => None,
        };
        Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read(path.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_a_clear_error() {
        let e = TlsConfig::from_ca_pem(b"not pem").unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
        assert!(TlsConfig::from_ca_file("/nonexistent/ca.pem")
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
    }
}
