//! The commands behind `drl`, callable from tests.
//!
//! [`Cli`] is the whole command line (clap, derive); [`execute`] runs one
//! command and turns its outcome into an exit code. Each command lives in its
//! own module:
//!
//! - [`node`]: `drl node`, a node and its HTTP API, configured by file, flags
//!   and environment.
//! - [`cluster`]: `drl cluster`, a local cluster of child processes.
//! - [`remote`]: `drl check --node`, `drl rules get|put|validate`, over HTTP.
//! - [`local`]: `drl check --rules`, `drl rules validate FILE`, in process.
//! - [`load`]: `drl load`, the load generator, and [`latency`], its histogram;
//!   `load_report`, what a run measured (errors with their reasons) and how
//!   it is printed.
//! - [`logging`]: the log format (text or JSON; colour only on a terminal).
//! - [`doctor`]: `drl doctor`, what a running node or cluster waits for.
//! - `drl certs`: a development CA and node certificates.

/// `println!` for the long-running commands (`drl load`, `drl cluster`),
/// which keep `SIGPIPE` ignored for their sockets: a line written to a
/// closed stdout (`drl load | head -1`) is dropped instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!` that drops the line if stderr is gone, for the same commands.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub mod cluster;
pub mod cluster_add;
pub mod doctor;
pub mod latency;
pub mod load;
mod load_report;
mod load_resp;
pub mod local;
pub mod logging;
pub mod node;
pub mod remote;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use local::{check, load_rules, validate_rules, CheckArgs};

/// Exit status of `drl check` when a request was denied (429, or
/// `denied`/`never` in process), and of `drl doctor` when a node needs
/// attention: the command worked, the answer was no.
pub const EXIT_DENIED: u8 = 1;

/// Exit status of a command that failed (any [`CliError`] but
/// [`CliError::Denied`]).
pub const EXIT_ERROR: u8 = 2;

/// Why a command failed; [`execute`] prints it and exits with status
/// [`EXIT_ERROR`] ([`EXIT_DENIED`] for [`CliError::Denied`]).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `drl check`: some of the requests sent were denied. Not a failure
    /// of the command, but a script must be able to tell it from an allow.
    #[error("{denied} of {sent} requests denied")]
    Denied {
        /// Requests denied (429).
        denied: u32,
        /// Requests sent.
        sent: u32,
    },
    /// `drl doctor`: some node is unreachable or not well; its lines say why.
    #[error("{problems} problem(s) found")]
    Attention {
        /// Problem lines printed.
        problems: usize,
    },
    /// A file named on the command line could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// A rules file is not a valid rule set.
    #[error("{path}: {source}")]
    Rules {
        /// The rules file.
        path: PathBuf,
        /// What is wrong with it.
        source: drl_core::rules::RulesError,
    },
    /// A `-f` argument without `=`.
    #[error("descriptor {0:?} is not of the form name=value")]
    Field(String),
    /// The in-process limiter refused a request as malformed.
    #[error(transparent)]
    Check(#[from] drl_core::limiter::CheckError),
    /// The in-process limiter could not be built from the rules.
    #[error(transparent)]
    Setup(#[from] drl_core::limiter::SetupError),
    /// The node's configuration (file, environment or flags) is invalid.
    #[error("configuration: {0}")]
    Config(#[from] crate::node::ConfigError),
    /// A node or one of its front-ends could not start or serve.
    #[error(transparent)]
    Run(#[from] crate::server::RunError),
    /// An exchange with a node over HTTP failed.
    #[error(transparent)]
    Client(#[from] crate::http::client::ClientError),
    /// A node answered with a status other than the one the command expects.
    #[error("the node answered {status}: {body}")]
    Refused {
        /// The HTTP status code.
        status: u16,
        /// The answer's body, which says why.
        body: String,
    },
    /// Certificates could not be generated or written.
    #[error(transparent)]
    Certs(#[from] crate::net::CertError),
    /// Arguments that cannot work, or a command that cannot go on (a child
    /// node exited); the message says which.
    #[error("{0}")]
    Usage(String),
    /// Any other I/O failure: a runtime, a socket, a child process.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The `drl` command line.
#[derive(Debug, Parser)]
#[command(name = "drl", version, about = "A distributed rate limiter")]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands of `drl`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node and its HTTP API.
    Node(Box<node::NodeArgs>),
    /// Start a local cluster of N nodes as child processes of this program.
    Cluster(cluster::ClusterArgs),
    /// Check a request: against a node over HTTP (`--node`) or against a
    /// rules file in process (`--rules`).
    Check(CheckCommand),
    /// Read, replace or validate rules.
    Rules {
        /// What to do with the rules.
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// List a node's members, or forget members gone for good.
    Members {
        /// Forget this member (repeat for several), here and at every
        /// member that does not hold it alive: only for members gone for
        /// good when half the cluster or more was lost at once, never for
        /// one that is only cut off.
        #[arg(long = "forget", value_name = "SLOT")]
        forget: Vec<u16>,
        /// The node to ask.
        #[command(flatten)]
        admin: remote::AdminArgs,
    },
    /// Write a development cluster CA and node certificates.
    Certs(CertsArgs),
    /// Generate load against one or more nodes and report throughput and latency.
    Load(load::LoadArgs),
    /// Tell what a running node or cluster is waiting for: reachable, ready
    /// (and why not), peers, development defaults, clock offsets.
    Doctor(doctor::DoctorArgs),
}

/// `drl check`: exactly one of `--node` and `--rules`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["node", "rules"])))]
pub struct CheckCommand {
    /// A node's HTTP address, as http://host:port.
    #[arg(long, env = "DRL_NODE")]
    pub node: Option<String>,
    /// A rules file (TOML), checked by an in-process limiter.
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// A descriptor field, as `name=value` (repeat: `-f user=alice -f endpoint=/v1/search`).
    #[arg(short = 'f', long = "field", required = true)]
    pub fields: Vec<String>,
    /// Cost of each request.
    #[arg(long, default_value_t = 1)]
    pub cost: u32,
    /// How many times to send the request, back to back.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
}

/// `drl rules`: the rules on a node, or in a file.
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Print the rules in force on a node.
    Get {
        /// The node to ask.
        #[command(flatten)]
        admin: remote::AdminArgs,
    },
    /// Replace the rules of the whole cluster through one node.
    Put {
        /// The rules file (TOML).
        file: PathBuf,
        /// The node to put them through.
        #[command(flatten)]
        admin: remote::AdminArgs,
        /// Replace whatever rules are in force, without reading their
        /// version first (no If-Match): a change made meanwhile by someone
        /// else is overwritten.
        #[arg(long)]
        force: bool,
        /// Put in force rules that deny nothing (no limit, or only unlimited
        /// or shadow-mode rules), which lifts every limit of the cluster.
        #[arg(long)]
        allow_empty: bool,
    },
    /// Validate a rules file: offline, or by a node with `--node`.
    Validate {
        /// The rules file (TOML).
        file: PathBuf,
        /// Ask this node (http://host:port) instead of validating here.
        #[arg(long, env = "DRL_NODE")]
        node: Option<String>,
        /// The node's admin token.
        #[arg(long, env = "DRL_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

/// `drl certs`: what to generate, and where.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Where to write `ca.pem`, `ca-key.pem`, `<name>.pem`, `<name>-key.pem`.
    #[arg(long)]
    pub dir: PathBuf,
    /// How many node certificates (slots 0..N).
    #[arg(long)]
    pub nodes: u16,
    /// Node names are `<prefix>-<slot>`.
    #[arg(long, default_value = "node")]
    pub prefix: String,
    /// Extra host names or IP addresses to put in every node certificate.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Do nothing if `<dir>/ca.pem` exists (a container job run at every start).
    #[arg(long)]
    pub if_missing: bool,
}

impl Command {
    /// Whether the command only prints and exits (no sockets of its own that
    /// outlive a write to stdout): `check`, `rules`, `certs`, `doctor`.
    /// `node`, `cluster` and `load` hold connections, on which a write to a
    /// peer that is gone must be an error, not a signal.
    pub fn prints_and_exits(&self) -> bool {
        matches!(
            self,
            Command::Check(_) | Command::Rules { .. } | Command::Certs(_) | Command::Doctor(_)
        )
    }
}

/// Lets a closed stdout end the process quietly, as it ends any Unix filter
/// (`drl rules get | head -1`): restores the default action of `SIGPIPE`,
/// which the Rust runtime sets to ignore (a write to the closed pipe would
/// then fail, and `println!` panic). Only for commands that
/// [print and exit](Command::prints_and_exits).
pub fn end_quietly_on_broken_pipe() {
    #[cfg(unix)]
    // SAFETY: signal(2) with a valid signal number and the default handler,
    // called from `main` before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Runs one command to its end.
pub fn execute(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Node(args) => node::run_node(&args),
        Command::Cluster(args) => cluster::run_cluster(&args),
        Command::Check(args) => match (&args.node, &args.rules) {
            (Some(node), _) => remote::check(node, &args),
            (None, Some(rules)) => local::check(&CheckArgs {
                rules: rules.clone(),
                fields: args.fields.clone(),
                cost: args.cost,
                repeat: args.repeat,
            }),
            (None, None) => Err(CliError::Usage("give --node or --rules".into())),
        },
        Command::Rules { command } => match command {
            RulesCommand::Get { admin } => remote::rules_get(&admin),
            RulesCommand::Put {
                file,
                admin,
                force,
                allow_empty,
            } => remote::rules_put(&file, &admin, remote::PutOptions { force, allow_empty }),
            RulesCommand::Validate { file, node, token } => match node {
                None => validate_rules(&file),
                Some(node) => remote::rules_validate(&file, &node, token.as_deref()),
            },
        },
        Command::Members { forget, admin } => match forget.as_slice() {
            [] => remote::members_list(&admin),
            slots => remote::members_forget(&admin, slots),
        },
        Command::Certs(args) => certs(&args),
        Command::Load(args) => load::run_load(&args),
        Command::Doctor(args) => doctor::doctor(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (CliError::Denied { .. } | CliError::Attention { .. })) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_DENIED)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// `drl certs`: a cluster CA and one certificate per slot.
pub fn certs(args: &CertsArgs) -> Result<(), CliError> {
    if args.if_missing && args.dir.join("ca.pem").exists() {
        println!(
            "{}: certificates exist, nothing written",
            args.dir.display()
        );
        return Ok(());
    }
    let specs = node_cert_specs(&args.prefix, args.nodes, &args.hosts);
    crate::net::generate_dev_certs(&args.dir, &specs)?;
    println!(
        "wrote a cluster CA and {} node certificates to {}",
        args.nodes,
        args.dir.display()
    );
    for s in &specs {
        println!("  slot {}: {}.pem, {}-key.pem", s.slot, s.name, s.name);
    }
    Ok(())
}

/// The certificates of a development cluster: `<prefix>-<slot>` for slots
/// `0..nodes`, each also valid for `hosts`.
pub fn node_cert_specs(
    prefix: &str,
    nodes: u16,
    hosts: &[String],
) -> Vec<crate::net::NodeCertSpec> {
    (0..nodes)
        .map(|slot| crate::net::NodeCertSpec {
            name: format!("{prefix}-{slot}"),
            slot,
            hosts: hosts.to_vec(),
        })
        .collect()
}

/// SIGTERM and SIGINT (Ctrl-C), caught from the moment this is built (in a
/// runtime): a signal that arrives while a node or cluster is still
/// starting is not lost, and does not kill the process half-started.
pub struct ShutdownSignal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    /// Installs the handlers. Must be called inside a tokio runtime; fails
    /// only if the operating system refuses a handler.
    pub fn new() -> std::io::Result<ShutdownSignal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(ShutdownSignal {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(ShutdownSignal {})
    }

    /// Resolves at the next signal.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `name=value` pairs from `-f` flags.
pub fn parse_fields(fields: &[String]) -> Result<Vec<(String, String)>, CliError> {
    fields
        .iter()
        .map(|f| {
            f.split_once('=')
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .ok_or_else(|| CliError::Field(f.clone()))
        })
        .collect()
}

/// A multi-threaded runtime for commands that serve or talk to nodes.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
