//! Node configuration: the TOML file, parsed once into checked settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use drl_core::cluster::replication::SilencePolicy;
use drl_core::key::KeySeed;
use drl_core::rules::request::RequestLimitPolicy;
use drl_core::share::SharePolicy;
use drl_core::time::{parse_duration, Nanos};

pub use super::journal::Durability;

/// The configuration file as written. Every field has a default except the
/// TLS material's location.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeFile {
    /// Stable name of this node; also in its certificate.
    pub name: String,
    /// This node's slot: 0 to 65535, unique in the cluster, kept across
    /// restarts (a slot is a node's identity in every counter).
    pub slot: u16,
    /// No longer used: the cluster's size is its membership, learned from
    /// the peers. Accepted (with a warning) so that older files still load.
    pub cluster_size: Option<usize>,
    /// How long a member declared dead stays one (its share of every limit
    /// reserved, counted in majorities) before the majority forgets it. A
    /// member that stops cleanly is forgotten at once.
    pub forget_after: String,
    /// UDP address for peer traffic (QUIC).
    pub listen_peer: SocketAddr,
    /// The address peers should dial (default: `listen_peer`).
    pub advertise_peer: Option<SocketAddr>,
    /// TCP address of the HTTP API.
    pub listen_http: SocketAddr,
    /// TCP address of the gRPC API (Envoy's rate limit service and
    /// `drl.v1`); none: no gRPC listener.
    pub grpc_listen: Option<SocketAddr>,
    /// TLS for the gRPC API: this server's certificate and key (PEM). Both
    /// or neither; none: plaintext (h2c).
    pub grpc_tls_cert: Option<PathBuf>,
    /// This server's private key (PEM), paired with `grpc_tls_cert`.
    pub grpc_tls_key: Option<PathBuf>,
    /// With TLS: also require client certificates signed by this CA (PEM),
    /// which makes it mutual TLS.
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// TCP address of the RESP (Redis protocol) API: redis-cell's
    /// `CL.THROTTLE` and `DRL.CHECK` for this cluster's rules. None: no RESP
    /// listener (the default).
    pub resp_listen: Option<SocketAddr>,
    /// Also serve HTTP/2 (h2c with prior knowledge) on the HTTP API's port,
    /// beside HTTP/1.1. Off by default.
    pub http2: bool,
    /// TCP address of the operations listener (probes, metrics, rules
    /// admin), served apart from the decision port so that a flood of
    /// decisions cannot fail a health probe. None: the decision port only.
    pub listen_admin: Option<SocketAddr>,
    /// Peers to contact at start: `host:port`, IP or DNS name (a Kubernetes
    /// headless service resolves to every pod).
    pub seeds: Vec<String>,
    /// How often seeds are resolved again (DNS discovery).
    pub discovery_interval: String,
    /// The rules file (TOML).
    pub rules: PathBuf,
    /// How often deltas are shipped to peers.
    pub sync_interval: String,
    /// The longest a request near its limit waits on a peer that has gone
    /// silent before it is refused (a duration such as `5ms`).
    pub confirm_timeout: String,
    /// Silence after which a peer is fenced: its acknowledgements and
    /// answers are no longer awaited until it is heard again (a duration,
    /// or `off` to wait for the failure detector to declare it dead).
    pub fence_after: String,
    /// `strict`, `available` or `bounded`.
    pub share_policy: String,
    /// For `bounded`: the fraction of a limit a cut-off node may exceed by.
    pub bounded_fraction: f64,
    /// In-flight budget as a fraction of each limit.
    pub inflight_fraction: f64,
    /// Most keys tracked per limit.
    pub max_keys: usize,
    /// Most memory all limits' keys may hold together, in bytes or with a
    /// unit (`512MiB`, `2GB`); none: only `max_keys` bounds memory.
    pub max_memory: Option<String>,
    /// Where to keep the local snapshot. Default: `<name>.snapshot` in
    /// `data_dir`; with neither, no snapshots and no journal.
    pub snapshot_path: Option<PathBuf>,
    /// How often the snapshot is written (a duration such as `10s`).
    pub snapshot_interval: String,
    /// The write-ahead journal beside the snapshot: `none`, `interval`
    /// (fsync every `durability_interval`) or `sync` (an answer waits for
    /// its group's fsync). Needs `snapshot_path` (or `data_dir`).
    pub durability: String,
    /// For `interval`: how often the journal is fsynced (e.g. `1s`, `200ms`).
    pub durability_interval: String,
    /// Where the node keeps what it must find after a restart (the rules put
    /// in force through the admin API or by peers). Default: the snapshot's
    /// directory; with neither, rule changes are not kept across restarts.
    pub data_dir: Option<PathBuf>,
    /// How long a restarted node waits for every peer's answer; after it, a
    /// majority's answers are enough. Time alone never opens the gate.
    pub recovery_timeout: String,
    /// The furthest this node's corrected clock may be from the cluster's
    /// before it stops admitting (DESIGN.md, "Clocks"). Default 50ms.
    pub max_clock_offset: String,
    /// FOR TESTS ONLY: plays a node whose clock is this many milliseconds
    /// off the operating system's (negative: behind). Default 0.
    pub test_clock_offset_ms: i64,
    /// FOR TESTS ONLY: leave the clock uncorrected and the clock gate open
    /// (the earlier design, to compare with). Default false.
    pub test_clock_uncorrected: bool,
    /// The cluster CA, this node's certificate and key (PEM).
    pub tls_ca: PathBuf,
    /// This node's certificate (PEM), signed by `tls_ca`.
    pub tls_cert: PathBuf,
    /// This node's private key (PEM).
    pub tls_key: PathBuf,
    /// Cluster secret for key digests: 32 hex digits, the same on every node.
    pub key_seed: Option<String>,
    /// Bearer token for the admin routes of the HTTP API (named `admin`).
    pub admin_token: Option<String>,
    /// Run even with the development admin token (development nodes only).
    pub allow_dev_admin_token: bool,
    /// `[admin]`: named admin tokens.
    pub admin: super::tokens::AdminFile,
    /// Requests may carry their own limits (`CL.THROTTLE`, a check's
    /// `limit`), counted apart from the rules.
    pub request_limits: bool,
    /// Largest quota (limit, capacity, burst) a request may carry.
    pub request_limit_max: u32,
    /// Longest window (or period of a rate) a request may carry.
    pub request_window_max: String,
    /// Most distinct request-defined limits (parameter sets) a node tracks
    /// at once.
    pub request_parameter_sets_max: usize,
    /// `[overload]`: admission of the decision listeners (HTTP, gRPC, RESP).
    pub overload: crate::listen::OverloadFile,
}

impl Default for NodeFile {
    fn default() -> Self {
        NodeFile {
            name: "node-0".into(),
            slot: 0,
            cluster_size: None,
            forget_after: "30s".into(),
            listen_peer: "127.0.0.1:7400".parse().expect("literal address"),
            advertise_peer: None,
            listen_http: "127.0.0.1:8400".parse().expect("literal address"),
            grpc_listen: None,
            grpc_tls_cert: None,
            grpc_tls_key: None,
            grpc_tls_client_ca: None,
            resp_listen: None,
            http2: false,
            listen_admin: None,
            seeds: Vec::new(),
            discovery_interval: "5s".into(),
            rules: PathBuf::from("rules.toml"),
            sync_interval: "5ms".into(),
            confirm_timeout: "5ms".into(),
            fence_after: "60ms".into(),
            share_policy: "strict".into(),
            bounded_fraction: 0.05,
            inflight_fraction: 0.02,
            max_keys: 1 << 20,
            max_memory: None,
            snapshot_path: None,
            snapshot_interval: "10s".into(),
            durability: "interval".into(),
            durability_interval: "1s".into(),
            data_dir: None,
            recovery_timeout: "3s".into(),
            max_clock_offset: "50ms".into(),
            test_clock_offset_ms: 0,
            test_clock_uncorrected: false,
            tls_ca: PathBuf::from("certs/ca.pem"),
            tls_cert: PathBuf::from("certs/node-0.pem"),
            tls_key: PathBuf::from("certs/node-0-key.pem"),
            key_seed: None,
            admin_token: None,
            allow_dev_admin_token: false,
            admin: Default::default(),
            request_limits: true,
            request_limit_max: 1_000_000,
            request_window_max: "1d".into(),
            request_parameter_sets_max: 10_000,
            overload: Default::default(),
        }
    }
}

/// Checked settings: once built, every value is usable.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// Stable name of this node: 1 to 64 characters.
    pub name: String,
    /// This node's slot.
    pub slot: u16,
    /// The `cluster_size` an older configuration still sets (ignored).
    pub ignored_cluster_size: Option<usize>,
    /// How long a member declared dead stays one.
    pub forget_after: Nanos,
    /// UDP address for peer traffic (QUIC).
    pub listen_peer: SocketAddr,
    /// The address peers should dial, if not `listen_peer`.
    pub advertise_peer: Option<SocketAddr>,
    /// TCP address of the HTTP API.
    pub listen_http: SocketAddr,
    /// TCP address of the gRPC API; none: no gRPC listener.
    pub grpc_listen: Option<SocketAddr>,
    /// TLS of the gRPC API; none: plaintext (h2c).
    pub grpc_tls: Option<GrpcTls>,
    /// TCP address of the RESP API; none: no RESP listener.
    pub resp_listen: Option<SocketAddr>,
    /// Whether the HTTP API also serves HTTP/2 (h2c, prior knowledge).
    pub http2: bool,
    /// TCP address of the operations listener; none: the decision port only.
    pub listen_admin: Option<SocketAddr>,
    /// Peers to contact at start, as `host:port`.
    pub seeds: Vec<String>,
    /// How often seeds are resolved again.
    pub discovery_interval: Nanos,
    /// The rules file, resolved against the configuration's directory.
    pub rules: PathBuf,
    /// How often deltas are shipped to peers: 1ms to 1s.
    pub sync_interval: Nanos,
    /// The longest a confirmation waits on a silent peer: 1ms to 1s.
    pub confirm_timeout: Nanos,
    /// When a silent peer stops being waited for.
    pub silence: SilencePolicy,
    /// How a limit is shared while peers cannot be reached.
    pub policy: SharePolicy,
    /// In-flight budget per limit, in millionths of the limit.
    pub inflight_ppm: u32,
    /// Most keys tracked per limit: at least 1.
    pub max_keys: usize,
    /// Node-wide memory budget of the key tables, in bytes.
    pub max_memory: Option<usize>,
    /// Where the local snapshot is kept; none: no snapshots.
    pub snapshot_path: Option<PathBuf>,
    /// How often the snapshot is written.
    pub snapshot_interval: Nanos,
    /// What the write-ahead journal keeps on disk (with `snapshot_path`).
    pub durability: Durability,
    /// Where the rules in force are kept across restarts; see
    /// [`rules_state_path`](Self::rules_state_path).
    pub data_dir: Option<PathBuf>,
    /// How long a restarted node waits for every peer before a majority's
    /// answers are enough.
    pub recovery_timeout: Nanos,
    /// Beyond this offset from the cluster's time the node admits nothing.
    pub max_clock_offset: Nanos,
    /// For tests only: this node's clock is played this far off (ns).
    pub test_clock_offset_ns: i64,
    /// For tests only: no clock correction, no clock gate.
    pub test_clock_uncorrected: bool,
    /// The cluster CA (PEM).
    pub tls_ca: PathBuf,
    /// This node's certificate (PEM).
    pub tls_cert: PathBuf,
    /// This node's private key (PEM).
    pub tls_key: PathBuf,
    /// Cluster secret for key digests; the same on every node.
    pub key_seed: KeySeed,
    /// Bearer tokens of the admin routes, by holder; none: the admin API is
    /// disabled.
    pub admin_tokens: super::tokens::AdminTokens,
    /// Development defaults in use, one line each (see
    /// `node::tokens::insecure_defaults`).
    pub insecure_defaults: Vec<String>,
    /// What requests may ask of request-defined limits.
    pub request_limits: RequestLimitPolicy,
    /// Faults injected into this node's outgoing datagrams (tests only; not
    /// settable from the file; built with the `harness` feature).
    #[cfg(feature = "harness")]
    pub chaos: Option<Chaos>,
}

/// TLS material of the gRPC API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcTls {
    /// This server's certificate chain (PEM).
    pub cert: PathBuf,
    /// This server's private key (PEM).
    pub key: PathBuf,
    /// Client certificates must be signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// Datagram faults a test can inject at a node's send path, over a real
/// transport: loss, duplication, and reordering by delay.
#[cfg(feature = "harness")]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Chaos {
    /// Probability that a datagram is dropped, in [0, 1].
    pub loss: f64,
    /// Probability that a datagram is sent twice, in [0, 1].
    pub duplicate: f64,
    /// Probability that a datagram is held back by up to `max_delay`.
    pub reorder: f64,
    /// Longest hold-back of a reordered datagram.
    pub max_delay: std::time::Duration,
    /// Seed of the fault RNG, so that a run can be replayed.
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
/// Why a configuration file could not be turned into [`NodeSettings`].
/// Nothing is started when this is returned.
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    /// The file could not be read.
    Read {
        /// The file named.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    /// The file is not valid TOML or has unknown or mistyped fields.
    Parse {
        /// The file named.
        path: PathBuf,
        /// The TOML error, with its position.
        source: toml::de::Error,
    },
    #[error("`{field}`: {reason}")]
    /// A field parsed but its value is out of range or inconsistent.
    Invalid {
        /// The field's name in the file.
        field: &'static str,
        /// What a valid value looks like.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn duration(field: &'static str, text: &str) -> Result<Nanos, ConfigError> {
    parse_duration(text).map_err(|e| invalid(field, e.to_string()))
}

/// The smallest memory budget accepted: one size class of arena chunks
/// for a few limits, so that a budget below it is a typo, not a setting.
pub const MIN_MAX_MEMORY: usize = 1 << 20;

/// Parses a byte size: a whole number of bytes, optionally followed by
/// `KB`, `MB`, `GB` (powers of 1000) or `KiB`, `MiB`, `GiB` (powers of 1024).
pub fn parse_memory(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a byte count such as 512MiB, got {text:?}"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit {other:?} (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = n
        .checked_mul(scale)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes < MIN_MAX_MEMORY {
        return Err(format!("at least 1MiB, got {text:?}"));
    }
    Ok(bytes)
}

fn fraction_ppm(field: &'static str, f: f64) -> Result<u32, ConfigError> {
    if !(f > 0.0 && f <= 1.0) {
        return Err(invalid(field, format!("must be in (0, 1], got {f}")));
    }
    Ok((f * 1_000_000.0).round() as u32)
}

impl NodeSettings {
    /// Where the rules in force are kept across restarts: `<name>.rules-state`
    /// in `data_dir`, or else beside the snapshot; `None` with neither.
    pub fn rules_state_path(&self) -> Option<PathBuf> {
        let dir = match (&self.data_dir, &self.snapshot_path) {
            (Some(d), _) => d.clone(),
            (None, Some(s)) => s.parent()?.to_owned(),
            (None, None) => return None,
        };
        Some(dir.join(format!("{}.rules-state", self.name)))
    }

    /// Where the node keeps the other members it knows of (beside the rules
    /// state): a restarted node waits for them before it admits, instead of
    /// taking itself for the first node of a new cluster.
    pub fn members_path(&self) -> Option<PathBuf> {
        let state = self.rules_state_path()?;
        Some(state.with_file_name(format!("{}.members", self.name)))
    }
}

impl NodeFile {
    /// A node of a local cluster laid out as `drl cluster`, the tests and the
    /// benchmarks do: `dir/rules.toml`, `dir/certs/` from
    /// [`crate::net::local_cluster_specs`], loopback addresses on ports the
    /// system picks.
    pub fn local(dir: &Path, slot: u16, seeds: Vec<String>) -> NodeFile {
        NodeFile {
            name: format!("node-{slot}"),
            slot,
            listen_peer: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen_http: SocketAddr::from(([127, 0, 0, 1], 0)),
            seeds,
            discovery_interval: "200ms".into(),
            rules: dir.join("rules.toml"),
            tls_ca: dir.join("certs/ca.pem"),
            tls_cert: dir.join(format!("certs/node-{slot}.pem")),
            tls_key: dir.join(format!("certs/node-{slot}-key.pem")),
            ..NodeFile::default()
        }
    }

    /// Reads and parses a configuration file; values are not checked yet
    /// (see [`settings`](Self::settings)).
    pub fn load(path: &Path) -> Result<NodeFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks every field; relative paths are taken from `base`.
    pub fn settings(&self, base: &Path) -> Result<NodeSettings, ConfigError> {
        if self.name.is_empty() || self.name.len() > 64 {
            return Err(invalid("name", "1 to 64 characters"));
        }
        let forget_after = duration("forget_after", &self.forget_after)?;
        if forget_after < Nanos::from_secs(1) || forget_after > Nanos::from_secs(3600) {
            return Err(invalid("forget_after", "between 1s and 1h"));
        }
        if self.max_keys == 0 {
            return Err(invalid("max_keys", "must be at least 1"));
        }
        let sync_interval = duration("sync_interval", &self.sync_interval)?;
        if sync_interval < Nanos::from_millis(1) || sync_interval > Nanos::from_secs(1) {
            return Err(invalid("sync_interval", "between 1ms and 1s"));
        }
        let confirm_timeout = duration("confirm_timeout", &self.confirm_timeout)?;
        if confirm_timeout < Nanos::from_millis(1) || confirm_timeout > Nanos::from_secs(1) {
            return Err(invalid("confirm_timeout", "between 1ms and 1s"));
        }
        let silence = match self.fence_after.as_str() {
            "off" => SilencePolicy::Detector,
            text => {
                let after = duration("fence_after", text)?;
                if after < sync_interval * 4 || after > Nanos::from_secs(10) {
                    return Err(invalid(
                        "fence_after",
                        "`off`, or between 4 sync intervals and 10s",
                    ));
                }
                SilencePolicy::Fence { after }
            }
        };
        let policy = match self.share_policy.as_str() {
            "strict" => SharePolicy::Strict,
            "available" => SharePolicy::Available,
            "bounded" => SharePolicy::Bounded {
                fraction_ppm: fraction_ppm("bounded_fraction", self.bounded_fraction)?,
            },
            other => {
                return Err(invalid(
                    "share_policy",
                    format!("{other:?}: use strict, available or bounded"),
                ))
            }
        };
        let key_seed = match &self.key_seed {
            None => KeySeed::default(),
            Some(hex) => {
                parse_seed(hex).ok_or_else(|| invalid("key_seed", "32 hexadecimal digits"))?
            }
        };
        let path = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }
        };
        let admin_tokens = self.admin_tokens()?;
        Ok(NodeSettings {
            insecure_defaults: super::tokens::insecure_defaults(&admin_tokens),
            admin_tokens,
            name: self.name.clone(),
            slot: self.slot,
            ignored_cluster_size: self.cluster_size,
            forget_after,
            listen_peer: self.listen_peer,
            advertise_peer: self.advertise_peer,
            listen_http: self.listen_http,
            grpc_listen: self.grpc_listen,
            grpc_tls: match (&self.grpc_tls_cert, &self.grpc_tls_key) {
                (Some(cert), Some(key)) => Some(GrpcTls {
                    cert: path(cert),
                    key: path(key),
                    client_ca: self.grpc_tls_client_ca.as_ref().map(path),
                }),
                (None, None) if self.grpc_tls_client_ca.is_some() => {
                    return Err(invalid(
                        "grpc_tls_client_ca",
                        "needs grpc_tls_cert and grpc_tls_key: client certificates are only asked for over TLS",
                    ))
                }
                (None, None) => None,
                _ => {
                    return Err(invalid(
                        "grpc_tls_cert",
                        "grpc_tls_cert and grpc_tls_key go together",
                    ))
                }
            },
            resp_listen: self.resp_listen,
            http2: self.http2,
            listen_admin: self.listen_admin,
            seeds: self.seeds.clone(),
            discovery_interval: duration("discovery_interval", &self.discovery_interval)?,
            rules: path(&self.rules),
            sync_interval,
            confirm_timeout,
            silence,
            policy,
            inflight_ppm: fraction_ppm("inflight_fraction", self.inflight_fraction)?,
            max_keys: self.max_keys,
            max_memory: self
                .max_memory
                .as_deref()
                .map(|t| parse_memory(t).map_err(|e| invalid("max_memory", e)))
                .transpose()?,
            // A data directory alone keeps counts too: the snapshot (and
            // the journal beside it) default to it.
            snapshot_path: match (&self.snapshot_path, &self.data_dir) {
                (Some(p), _) => Some(path(p)),
                (None, Some(dir)) => Some(path(dir).join(format!("{}.snapshot", self.name))),
                (None, None) => None,
            },
            snapshot_interval: duration("snapshot_interval", &self.snapshot_interval)?,
            durability: Durability::parse(
                &self.durability,
                duration("durability_interval", &self.durability_interval)?,
            )
            .map_err(|why| invalid("durability", why))?,
            data_dir: self.data_dir.as_ref().map(path),
            recovery_timeout: duration("recovery_timeout", &self.recovery_timeout)?,
            max_clock_offset: duration("max_clock_offset", &self.max_clock_offset)?,
            test_clock_offset_ns: self.test_clock_offset_ms.saturating_mul(1_000_000),
            test_clock_uncorrected: self.test_clock_uncorrected,
            tls_ca: path(&self.tls_ca),
            tls_cert: path(&self.tls_cert),
            tls_key: path(&self.tls_key),
            key_seed,
            request_limits: self.request_limit_policy()?,
            #[cfg(feature = "harness")]
            chaos: None,
        })
    }
}

impl NodeFile {
    fn admin_tokens(&self) -> Result<super::tokens::AdminTokens, ConfigError> {
        let tokens =
            super::tokens::AdminTokens::new(self.admin_token.as_deref(), &self.admin.tokens)?;
        tokens.check_development(self.allow_dev_admin_token)?;
        Ok(tokens)
    }

    fn request_limit_policy(&self) -> Result<RequestLimitPolicy, ConfigError> {
        if self.request_limit_max == 0 {
            return Err(invalid("request_limit_max", "must be at least 1"));
        }
        if self.request_parameter_sets_max == 0 {
            return Err(invalid("request_parameter_sets_max", "must be at least 1"));
        }
        Ok(RequestLimitPolicy {
            enabled: self.request_limits,
            max_quota: self.request_limit_max,
            max_window: duration("request_window_max", &self.request_window_max)?,
            max_parameter_sets: self.request_parameter_sets_max,
            ..RequestLimitPolicy::default()
        })
    }
}

fn parse_seed(hex: &str) -> Option<KeySeed> {
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let a = u64::from_str_radix(&hex[..16], 16).ok()?;
    let b = u64::from_str_radix(&hex[16..], 16).ok()?;
    Some(KeySeed(a, b))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
