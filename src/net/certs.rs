//! A cluster CA and node certificates, for development clusters and tests.
//!
//! Production clusters may bring their own CA; what this transport needs of a
//! node certificate is written in [`ClusterCa::issue`]. One rule matters for
//! security: a certificate must never carry the `slot-<n>.drl.internal` name
//! of a slot other than its node's, or its holder can speak for that slot.
//! The generator refuses any name under `drl.internal` for that reason.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::{slot_server_name, CLUSTER_SERVER_NAME};

/// What goes into one node's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCertSpec {
    /// Node name: 1 to 63 ASCII letters, digits or `-`, not starting or
    /// ending with `-`. Used as a DNS name in the certificate and as the
    /// file stem of its PEM files.
    pub name: String,
    /// The slot the certificate proves.
    pub slot: u16,
    /// Extra names the node is reached by: IP addresses or DNS names.
    pub hosts: Vec<String>,
}

/// Why certificates could not be made or written. Files written before the
/// failure stay on disk.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A node name that is not a DNS label (see [`NodeCertSpec::name`]).
    #[error("invalid node name {0:?}: use 1-63 ASCII letters, digits or '-'")]
    InvalidName(String),
    /// An extra host under `drl.internal`, which could let a node speak for
    /// another slot.
    #[error("host name {0:?} is reserved: names under drl.internal are issued per slot")]
    ReservedHost(String),
    /// An extra host that is neither an IP address nor a DNS name.
    #[error("invalid host name {0:?}")]
    InvalidHost(String),
    /// Two specs with one node name: their files would overwrite each other.
    #[error("node name {0:?} appears twice")]
    DuplicateName(String),
    /// Two specs with one slot: both certificates would prove it.
    #[error("slot {0} appears twice")]
    DuplicateSlot(u16),
    /// rcgen could not build a key or certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// A PEM file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why it could not be written.
        source: std::io::Error,
    },
}

/// A node certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct NodeCert {
    /// The certificate, signed by the cluster CA.
    pub cert_pem: String,
    /// Its private key. Secret: [`Debug`](std::fmt::Debug) leaves it
    /// out.
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert").finish_non_exhaustive()
    }
}

/// A freshly generated cluster CA that can issue node certificates.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new CA (ECDSA P-256) that may sign node certificates only: path
    /// length 0, so a node certificate can never act as a CA.
    pub fn generate() -> Result<ClusterCa, CertError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(&key);
        set_validity(&mut params, 20);
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        })
    }

    /// The CA that [`generate_dev_certs`] wrote into `dir` (`ca.pem` and
    /// `ca-key.pem`), to issue one more node certificate: the issuer's name
    /// is rebuilt from the key as [`ClusterCa::generate`] made it.
    pub fn load(dir: &Path) -> Result<ClusterCa, CertError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| CertError::Read { path, source })
        };
        let cert_pem = read("ca.pem")?;
        let key = KeyPair::from_pem(&read("ca-key.pem")?)?;
        let params = ca_params(&key);
        Ok(ClusterCa {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// The CA certificate, PEM-encoded: what every node trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM-encoded: keep it off the nodes.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A node certificate signed by this CA. It carries the subject
    /// alternative names [`node_names`] lists, the `serverAuth` and
    /// `clientAuth` extended key usages (each node is both), and no CA
    /// rights.
    pub fn issue(&self, spec: &NodeCertSpec) -> Result<NodeCert, CertError> {
        let key = KeyPair::generate()?;
        let params = node_params(spec)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A node certificate with the right names that no CA signed: every
/// cluster member must refuse it. For tests and demonstrations.
pub fn self_signed_node_cert(spec: &NodeCertSpec) -> Result<NodeCert, CertError> {
    let key = KeyPair::generate()?;
    let cert = node_params(spec)?.self_signed(&key)?;
    Ok(NodeCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The subject alternative names of a node certificate, in order: the node
/// name, `slot-<slot>.drl.internal`, `drl.internal`, `localhost`,
/// `127.0.0.1`, `::1`, then each of `hosts`; duplicates removed.
pub fn node_names(spec: &NodeCertSpec) -> Result<Vec<String>, CertError> {
    check_name(&spec.name)?;
    let mut names = vec![
        spec.name.clone(),
        slot_server_name(spec.slot),
        CLUSTER_SERVER_NAME.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for host in &spec.hosts {
        check_host(host)?;
        names.push(host.clone());
    }
    let mut seen = HashSet::new();
    names.retain(|name| seen.insert(name.to_ascii_lowercase()));
    Ok(names)
}

/// Certificate specs for a local cluster: `node-0` … `node-<n−1>` on slots
/// 0 … n−1, loopback names only.
pub fn local_cluster_specs(nodes: u16) -> Vec<NodeCertSpec> {
    (0..nodes)
        .map(|slot| NodeCertSpec {
            name: format!("node-{slot}"),
            slot,
            hosts: vec![],
        })
        .collect()
}

/// Writes a fresh cluster CA and one certificate per node into `dir`
/// (created if missing): `ca.pem`, `ca-key.pem`, `<name>.pem` and
/// `<name>-key.pem`. Private keys are written with mode 0600 on Unix.
/// Existing files of those names are replaced. Every spec is checked before
/// anything is written.
pub fn generate_dev_certs(dir: &Path, nodes: &[NodeCertSpec]) -> Result<(), CertError> {
    let mut names = HashSet::new();
    let mut slots = HashSet::new();
    for spec in nodes {
        node_names(spec)?;
        if !names.insert(spec.name.to_ascii_lowercase()) {
            return Err(CertError::DuplicateName(spec.name.clone()));
        }
        if !slots.insert(spec.slot) {
            return Err(CertError::DuplicateSlot(spec.slot));
        }
    }
    let ca = ClusterCa::generate()?;
    let issued = nodes
        .iter()
        .map(|spec| ca.issue(spec).map(|cert| (spec, cert)))
        .collect::<Result<Vec<_>, _>>()?;

    fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    write_file(&dir.join("ca.pem"), ca.cert_pem(), false)?;
    write_file(&dir.join("ca-key.pem"), &ca.key_pem(), true)?;
    for (spec, cert) in issued {
        write_node_cert(dir, &spec.name, &cert)?;
    }
    Ok(())
}

/// `<name>.pem` and `<name>-key.pem` (mode 0600) in `dir`.
fn write_node_cert(dir: &Path, name: &str, cert: &NodeCert) -> Result<(), CertError> {
    write_file(&dir.join(format!("{name}.pem")), &cert.cert_pem, false)?;
    write_file(&dir.join(format!("{name}-key.pem")), &cert.key_pem, true)
}

/// A cluster CA's name and rights, from its key: a CA may sign node
/// certificates only (path length 0), and its name carries a tag of its
/// key, so that a certificate from another cluster's CA fails as "unknown
/// issuer" rather than "bad signature".
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let tag: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("drl cluster CA {tag}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "drl");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Issues with the CA in `dir` one more node certificate and writes it
/// there (`<name>.pem`, `<name>-key.pem`), for a node that joins a running
/// cluster.
pub fn issue_dev_cert(dir: &Path, spec: &NodeCertSpec) -> Result<(), CertError> {
    let cert = ClusterCa::load(dir)?.issue(spec)?;
    write_node_cert(dir, &spec.name, &cert)
}

fn node_params(spec: &NodeCertSpec) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = node_names(spec)?
        .into_iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name
                .as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| CertError::InvalidHost(name.clone())),
        })
        .collect::<Result<_, _>>()?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, spec.name.as_str());
    params
        .distinguished_name
        .push(DnType::OrganizationName, "drl");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, 10);
    Ok(params)
}

/// Valid from January 1st of last year (tolerates skewed clocks) for
/// `years` years.
fn set_validity(params: &mut CertificateParams, years: i32) {
    const SECONDS_PER_YEAR: u64 = 31_556_952;
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let year = 1970 + i32::try_from(since_epoch / SECONDS_PER_YEAR).unwrap_or(0);
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

fn check_name(name: &str) -> Result<(), CertError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(CertError::InvalidName(name.to_string()))
    }
}

fn check_host(host: &str) -> Result<(), CertError> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let lower = host.to_ascii_lowercase();
    let lower = lower.trim_end_matches('.');
    if lower.ends_with(&format!(".{CLUSTER_SERVER_NAME}")) {
        return Err(CertError::ReservedHost(host.to_string()));
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.*".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(CertError::InvalidHost(host.to_string()))
    }
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    let fail = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(fail)?;
    // A file that already existed keeps its old mode through `open`:
    // tighten it before the key goes in.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    file.write_all(contents.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, slot: u16, hosts: &[&str]) -> NodeCertSpec {
        NodeCertSpec {
            name: name.to_string(),
            slot,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn names_cover_slot_cluster_loopback_and_hosts() {
        let names = node_names(&spec("node-a", 3, &["10.0.0.7", "a.example", "localhost"]))
            .expect("valid spec");
        assert_eq!(
            names,
            [
                "node-a",
                "slot-3.drl.internal",
                "drl.internal",
                "localhost",
                "127.0.0.1",
                "::1",
                "10.0.0.7",
                "a.example"
            ]
        );
    }

    #[test]
    fn names_that_could_claim_a_slot_are_refused() {
        for host in ["slot-4.drl.internal", "*.drl.internal", "x.DRL.internal."] {
            assert!(matches!(
                node_names(&spec("a", 3, &[host])),
                Err(CertError::ReservedHost(_))
            ));
        }
        for name in [
            "",
            "-a",
            "a/b",
            "slot-4.drl.internal",
            "..",
            &"x".repeat(64),
        ] {
            assert!(matches!(
                node_names(&spec(name, 3, &[])),
                Err(CertError::InvalidName(_))
            ));
        }
        assert!(matches!(
            node_names(&spec("a", 3, &["bad host"])),
            Err(CertError::InvalidHost(_))
        ));
    }

    #[test]
    fn duplicates_are_refused_before_writing() {
        let dir = std::env::temp_dir().join(format!("drl-certs-dup-{}", std::process::id()));
        let err = generate_dev_certs(&dir, &[spec("a", 1, &[]), spec("b", 1, &[])]);
        assert!(matches!(err, Err(CertError::DuplicateSlot(1))));
        let err = generate_dev_certs(&dir, &[spec("a", 1, &[]), spec("A", 2, &[])]);
        assert!(matches!(err, Err(CertError::DuplicateName(_))));
        assert!(!dir.exists());
    }

    #[cfg(unix)]
    #[test]
    fn writes_pem_files_with_private_keys_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("drl-certs-{}", std::process::id()));
        generate_dev_certs(&dir, &[spec("a", 1, &[]), spec("b", 2, &["b.local"])])
            .expect("certificates");
        for file in ["ca.pem", "a.pem", "b.pem"] {
            let text = fs::read_to_string(dir.join(file)).expect("written");
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{file}");
        }
        for file in ["ca-key.pem", "a-key.pem", "b-key.pem"] {
            let meta = fs::metadata(dir.join(file)).expect("written");
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
        }
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
