//! `drl node`: one node and its HTTP API.
//!
//! Configuration comes from three places, each overriding the one before:
//! the TOML file (`--config`, see `deploy/node.example.toml`), environment
//! variables (`DRL_<FIELD>`), and flags (`--<field>`). Every field of the
//! file has both. Relative paths in the file are taken from the file's
//! folder; relative paths given by flag or variable from the working folder.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::logging::{self, LogFormat};
use super::{runtime, CliError, ShutdownSignal};
use crate::node::{NodeFile, NodeSettings};

/// `drl node`: the configuration file's fields as flags and environment
/// variables; each one given overrides the file's value (module docs).
#[derive(Debug, Default, clap::Args)]
pub struct NodeArgs {
    /// The configuration file (TOML). Without it every field has its default.
    #[arg(long, env = "DRL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Stable name of this node; also in its certificate.
    #[arg(long, env = "DRL_NAME")]
    pub name: Option<String>,
    /// This node's slot: 0 to 65535, unique in the cluster, kept across
    /// restarts.
    #[arg(long, env = "DRL_SLOT")]
    pub slot: Option<u16>,
    /// Take the slot from the number after the last `-` of the node name
    /// (`drl-2` → 2): a StatefulSet pod's ordinal.
    #[arg(long, env = "DRL_SLOT_FROM_NAME")]
    pub slot_from_name: bool,
    /// No longer used (the cluster's size is its membership); accepted
    /// with a warning.
    #[arg(long, env = "DRL_CLUSTER_SIZE", hide = true)]
    pub cluster_size: Option<usize>,
    /// How long a member declared dead stays one before the majority
    /// forgets it (default 30s).
    #[arg(long, env = "DRL_FORGET_AFTER")]
    pub forget_after: Option<String>,
    /// UDP address for peer traffic (QUIC).
    #[arg(long, env = "DRL_LISTEN_PEER")]
    pub listen_peer: Option<SocketAddr>,
    /// The address peers should dial (default: listen_peer).
    #[arg(long, env = "DRL_ADVERTISE_PEER")]
    pub advertise_peer: Option<SocketAddr>,
    /// TCP address of the HTTP API.
    #[arg(long, env = "DRL_LISTEN_HTTP")]
    pub listen_http: Option<SocketAddr>,
    /// TCP address of the gRPC API (Envoy's rate limit service and
    /// drl.v1); default: no gRPC listener.
    #[arg(long, env = "DRL_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// TLS certificate of the gRPC API (PEM); with --grpc-tls-key.
    #[arg(long, env = "DRL_GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// TLS private key of the gRPC API (PEM).
    #[arg(long, env = "DRL_GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,
    /// Require gRPC clients to present a certificate signed by this CA (PEM).
    #[arg(long, env = "DRL_GRPC_TLS_CLIENT_CA")]
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// TCP address of the RESP (Redis protocol) API: `CL.THROTTLE`,
    /// `DRL.CHECK`; default: no RESP listener.
    #[arg(long, env = "DRL_RESP_LISTEN")]
    pub resp_listen: Option<SocketAddr>,
    /// Also serve HTTP/2 (h2c, prior knowledge) on the HTTP API's port.
    #[arg(long, env = "DRL_HTTP2")]
    pub http2: bool,
    /// TCP address of the operations listener (probes, metrics, rules admin).
    #[arg(long, env = "DRL_LISTEN_ADMIN")]
    pub listen_admin: Option<SocketAddr>,
    /// Overload: most requests in flight on each decision listener; one
    /// more is answered 503 at once (0: no cap).
    #[arg(long, env = "DRL_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Overload: a request that would wait longer than this is answered
    /// 503 at once ("5ms"; "0s": never).
    #[arg(long, env = "DRL_QUEUE_DEADLINE")]
    pub queue_deadline: Option<String>,
    /// Peers to contact at start, comma-separated `host:port` (DNS names are
    /// resolved again every discovery_interval).
    #[arg(long, env = "DRL_SEEDS", value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// How often seeds are resolved again.
    #[arg(long, env = "DRL_DISCOVERY_INTERVAL")]
    pub discovery_interval: Option<String>,
    /// The rules file (TOML), watched for changes.
    #[arg(long, env = "DRL_RULES")]
    pub rules: Option<PathBuf>,
    /// How often deltas are shipped to peers ("5ms").
    #[arg(long, env = "DRL_SYNC_INTERVAL")]
    pub sync_interval: Option<String>,
    /// strict, available or bounded.
    #[arg(long, env = "DRL_SHARE_POLICY")]
    pub share_policy: Option<String>,
    /// For bounded: the fraction of a limit a cut-off node may exceed by.
    #[arg(long, env = "DRL_BOUNDED_FRACTION")]
    pub bounded_fraction: Option<f64>,
    /// In-flight budget as a fraction of each limit.
    #[arg(long, env = "DRL_INFLIGHT_FRACTION")]
    pub inflight_fraction: Option<f64>,
    /// Most keys tracked per limit.
    #[arg(long, env = "DRL_MAX_KEYS")]
    pub max_keys: Option<usize>,
    /// Most memory the keys of all limits may hold together (e.g. `512MiB`).
    #[arg(long, env = "DRL_MAX_MEMORY")]
    pub max_memory: Option<String>,
    /// Where to keep the local snapshot (default: no snapshots).
    #[arg(long, env = "DRL_SNAPSHOT_PATH")]
    pub snapshot_path: Option<PathBuf>,
    /// How often to write the snapshot ("10s").
    #[arg(long, env = "DRL_SNAPSHOT_INTERVAL")]
    pub snapshot_interval: Option<String>,
    /// The journal beside the snapshot: none, interval or sync.
    #[arg(long, env = "DRL_DURABILITY")]
    pub durability: Option<String>,
    /// How often `interval` fsyncs the journal ("1s").
    #[arg(long, env = "DRL_DURABILITY_INTERVAL")]
    pub durability_interval: Option<String>,
    /// How long a restarted node waits for peers before admitting anyway.
    #[arg(long, env = "DRL_RECOVERY_TIMEOUT")]
    pub recovery_timeout: Option<String>,
    /// The cluster CA (PEM).
    #[arg(long, env = "DRL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM).
    #[arg(long, env = "DRL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "DRL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Cluster secret for key digests: 32 hex digits, the same on every node.
    #[arg(long, env = "DRL_KEY_SEED", hide_env_values = true)]
    pub key_seed: Option<String>,
    /// Bearer token of the admin routes (none: the admin API is disabled).
    #[arg(long, env = "DRL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Run even with the development admin token (a development node).
    #[arg(long, env = "DRL_ALLOW_DEV_ADMIN_TOKEN")]
    pub allow_dev_admin_token: bool,
    /// FOR TESTS ONLY: play this node with a clock this many milliseconds
    /// off (negative: behind). Hidden from --help.
    #[arg(long, hide = true, allow_hyphen_values = true)]
    pub test_clock_offset_ms: Option<i64>,
    /// Log lines as text or JSON (one object per line), on stderr.
    #[arg(long, env = "DRL_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

impl NodeArgs {
    /// The file (or defaults) with every given flag and variable laid over it.
    pub fn node_file(&self) -> Result<(NodeFile, PathBuf), CliError> {
        let cwd = std::env::current_dir()?;
        let (mut file, base) = match &self.config {
            Some(path) => {
                let file = NodeFile::load(path)?;
                let dir = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map_or_else(|| cwd.clone(), |p| cwd.join(p));
                (file, dir)
            }
            None => (NodeFile::default(), cwd.clone()),
        };
        if self.cluster_size.is_some() {
            file.cluster_size = self.cluster_size;
        }
        let from_cwd = |p: &PathBuf| -> PathBuf {
            if p.is_absolute() {
                p.clone()
            } else {
                cwd.join(p)
            }
        };
        macro_rules! lay {
            ($($field:ident),*) => {$(
                if let Some(v) = &self.$field {
                    file.$field = v.clone();
                }
            )*};
        }
        lay!(
            name,
            slot,
            forget_after,
            listen_peer,
            listen_http,
            seeds,
            discovery_interval,
            sync_interval,
            share_policy,
            bounded_fraction,
            inflight_fraction,
            max_keys,
            snapshot_interval,
            durability,
            durability_interval,
            recovery_timeout
        );
        if let Some(v) = self.max_in_flight {
            file.overload.max_in_flight = v;
        }
        if let Some(v) = &self.queue_deadline {
            file.overload.queue_deadline = v.clone();
        }
        if let Some(v) = self.advertise_peer {
            file.advertise_peer = Some(v);
        }
        if let Some(v) = &self.max_memory {
            file.max_memory = Some(v.clone());
        }
        if let Some(v) = self.grpc_listen {
            file.grpc_listen = Some(v);
        }
        for (flag, field) in [
            (&self.grpc_tls_cert, &mut file.grpc_tls_cert),
            (&self.grpc_tls_key, &mut file.grpc_tls_key),
            (&self.grpc_tls_client_ca, &mut file.grpc_tls_client_ca),
        ] {
            if let Some(v) = flag {
                *field = Some(from_cwd(v));
            }
        }
        if let Some(v) = self.resp_listen {
            file.resp_listen = Some(v);
        }
        if self.http2 {
            file.http2 = true;
        }
        if let Some(v) = self.listen_admin {
            file.listen_admin = Some(v);
        }
        if let Some(v) = &self.key_seed {
            file.key_seed = Some(v.clone());
        }
        if let Some(v) = &self.admin_token {
            file.admin_token = Some(v.clone());
        }
        if self.allow_dev_admin_token {
            file.allow_dev_admin_token = true;
        }
        if let Some(v) = &self.snapshot_path {
            file.snapshot_path = Some(from_cwd(v));
        }
        for (flag, field) in [
            (&self.rules, &mut file.rules),
            (&self.tls_ca, &mut file.tls_ca),
            (&self.tls_cert, &mut file.tls_cert),
            (&self.tls_key, &mut file.tls_key),
        ] {
            if let Some(v) = flag {
                *field = from_cwd(v);
            }
        }
        if let Some(ms) = self.test_clock_offset_ms {
            file.test_clock_offset_ms = ms;
        }
        if self.slot_from_name {
            file.slot = slot_from_name(&file.name)?;
        }
        Ok((file, base))
    }

    /// Checked settings.
    pub fn settings(&self) -> Result<NodeSettings, CliError> {
        let (file, base) = self.node_file()?;
        Ok(file.settings(&base)?)
    }

    /// Checked settings, and the listeners' limits (the `[overload]`
    /// table's admission).
    pub fn settings_and_limits(
        &self,
    ) -> Result<(NodeSettings, crate::server::ServerLimits), CliError> {
        let (file, base) = self.node_file()?;
        let admission = file.overload.limits().map_err(CliError::Usage)?;
        let limits = crate::server::ServerLimits {
            admission,
            ..Default::default()
        };
        Ok((file.settings(&base)?, limits))
    }
}

/// `drl-2` → 2.
pub fn slot_from_name(name: &str) -> Result<u16, CliError> {
    name.rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "--slot-from-name: node name {name:?} does not end in -<number>"
            ))
        })
}

/// `drl node`: runs until SIGTERM or SIGINT, then drains and stops.
pub fn run_node(args: &NodeArgs) -> Result<(), CliError> {
    logging::init(args.log_format);
    let (settings, limits) = args.settings_and_limits()?;
    runtime()?.block_on(async {
        let mut signal = ShutdownSignal::new()?;
        crate::server::run_with_limits(settings, limits, async move { signal.recv().await })
            .await?;
        Ok(())
    })
}

/// Text logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    logging::init(LogFormat::Text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        node: NodeArgs,
    }

    #[test]
    fn flags_override_defaults() {
        let w = Wrap::parse_from([
            "x",
            "--slot",
            "2",
            "--name",
            "n",
            "--seeds",
            "a:1,b:2",
            "--share-policy",
            "bounded",
        ]);
        let (file, _) = w.node.node_file().unwrap();
        assert_eq!(file.slot, 2);
        assert_eq!(file.name, "n");
        assert_eq!(file.seeds, ["a:1", "b:2"]);
        assert_eq!(file.share_policy, "bounded");
        assert!(
            file.tls_ca.is_relative(),
            "defaults stay relative to the base"
        );
        assert_eq!(file.grpc_listen, None, "no gRPC listener by default");
        let w = Wrap::parse_from(["x", "--grpc-listen", "127.0.0.1:9400"]);
        assert_eq!(
            w.node.node_file().unwrap().0.grpc_listen,
            Some("127.0.0.1:9400".parse().unwrap())
        );
        assert_eq!(file.resp_listen, None, "no RESP listener by default");
        assert!(!file.http2, "HTTP/1.1 only by default");
        let w = Wrap::parse_from(["x", "--resp-listen", "127.0.0.1:6380", "--http2"]);
        let (file, _) = w.node.node_file().unwrap();
        assert_eq!(file.resp_listen, Some("127.0.0.1:6380".parse().unwrap()));
        assert!(file.http2);
        let w = Wrap::parse_from(["x", "--tls-ca", "c.pem"]);
        assert!(w.node.node_file().unwrap().0.tls_ca.is_absolute());
    }

    #[test]
    fn slots_come_from_names() {
        assert_eq!(slot_from_name("drl-12").unwrap(), 12);
        assert!(slot_from_name("drl").is_err());
        let w = Wrap::parse_from(["x", "--name", "drl-2", "--slot-from-name"]);
        assert_eq!(w.node.node_file().unwrap().0.slot, 2);
    }
}
