//! `drl cluster --nodes N`: a local cluster of child processes.
//!
//! Writes into `--dir` a cluster CA and node certificates, a sample rules
//! file (kept if it exists, so edits survive a restart) and one config file
//! per node (every other node as a seed, so any node can restart first, and
//! a snapshot in `<dir>/data/`, so a restart of the whole cluster keeps its
//! quotas); starts `drl node --config <dir>/node-<i>.toml` for each, as
//! children of this process; waits until every node answers `/readyz`;
//! prints the addresses and an example; and on Ctrl-C or SIGTERM stops every
//! child with SIGTERM (so each drains and ships its final delta), waiting
//! for them before it exits.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cluster_add::wait_ready;
use super::{node_cert_specs, runtime, CliError, ShutdownSignal};

/// The sample rules a new cluster starts with.
pub const EXAMPLE_RULES: &str = include_str!("../../deploy/rules.example.toml");

/// `drl cluster`: how many nodes, where their files go, which ports.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ClusterArgs {
    /// Something to do with a running local cluster instead of starting one.
    #[command(subcommand)]
    pub action: Option<ClusterAction>,
    /// How many nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Where certificates, configs, rules and snapshots go (default:
    /// `drl-cluster` in the system's temporary folder, so that private keys
    /// never land in a source tree).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// HTTP port of node 0; node i listens on base-port + i.
    #[arg(long, default_value_t = 8400)]
    pub base_port: u16,
    /// Peer (QUIC) port of node 0; default base-port − 1000.
    #[arg(long)]
    pub peer_base_port: Option<u16>,
    /// gRPC port of node 0 (Envoy's rate limit service and drl.v1); default
    /// base-port + 1000.
    #[arg(long)]
    pub grpc_base_port: Option<u16>,
    /// RESP (Redis protocol) port of node 0; node i listens on
    /// resp-base-port + i. Default: no RESP listener.
    #[arg(long)]
    pub resp_base_port: Option<u16>,
    /// Serve HTTP/2 (h2c) beside HTTP/1.1 on the HTTP ports.
    #[arg(long)]
    pub http2: bool,
    /// Admin token of every node (default: a random one, printed).
    #[arg(long, env = "DRL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// strict, available or bounded.
    #[arg(long, default_value = "strict")]
    pub share_policy: String,
    /// Silence after which a node stops waiting for a peer that a majority
    /// also cannot hear (a duration, or `off` to wait for the failure
    /// detector).
    #[arg(long, env = "DRL_FENCE_AFTER", default_value = "60ms")]
    pub fence_after: String,
    /// FOR TESTS ONLY: `SLOT=MS` plays node SLOT with a clock MS
    /// milliseconds off (negative: behind), to measure clock skew on real
    /// processes. Hidden from --help.
    #[arg(long = "test-clock-offset", hide = true, value_parser = slot_offset)]
    pub test_clock_offset: Vec<(u16, i64)>,
    /// FOR TESTS ONLY: every node leaves its clock uncorrected (the earlier
    /// design, to compare with). Hidden from --help.
    #[arg(long = "test-clock-uncorrected", hide = true)]
    pub test_clock_uncorrected: bool,
}

/// What `drl cluster` can do to a local cluster that runs.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ClusterAction {
    /// Add a node to the local cluster running in --dir, without restarting
    /// the others: issues its certificate with the cluster's CA, writes its
    /// config (every node a seed) and runs it here until Ctrl-C, when it
    /// leaves the cluster cleanly.
    Add(super::cluster_add::AddArgs),
}

/// `SLOT=MS`, e.g. `0=-250`.
fn slot_offset(text: &str) -> Result<(u16, i64), String> {
    let (slot, ms) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected SLOT=MS, e.g. 0=-250"))?;
    let slot = slot
        .trim()
        .parse()
        .map_err(|e| format!("slot {slot:?}: {e}"))?;
    let ms = ms
        .trim()
        .parse()
        .map_err(|e| format!("offset {ms:?}: {e}"))?;
    Ok((slot, ms))
}

/// Random hex from the OS (a dev token and key seed, not key material).
fn random_hex(bytes: usize) -> Result<String, CliError> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn cluster_dir(args: &ClusterArgs) -> PathBuf {
    cluster_dir_of(args.dir.as_ref())
}

/// `dir`, or `drl-cluster` in the system's temporary folder.
pub(super) fn cluster_dir_of(dir: Option<&PathBuf>) -> PathBuf {
    dir.cloned()
        .unwrap_or_else(|| std::env::temp_dir().join("drl-cluster"))
}

struct Plan {
    configs: Vec<PathBuf>,
    http: Vec<String>,
    grpc: Vec<String>,
    /// Each node's RESP address for the banner ("" when RESP is off).
    resp: Vec<String>,
    token: String,
}

fn toml_string(s: &str) -> String {
    // TOML basic strings escape like JSON ones for what we write.
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Writes certificates, rules and configs; returns what to start.
fn prepare(args: &ClusterArgs) -> Result<Plan, CliError> {
    if args.nodes == 0 {
        return Err(CliError::Usage("--nodes must be at least 1".into()));
    }
    let peer_base = args
        .peer_base_port
        .unwrap_or_else(|| args.base_port.saturating_sub(1000));
    let grpc_base = args
        .grpc_base_port
        .unwrap_or_else(|| args.base_port.saturating_add(1000));
    if u32::from(args.base_port) + u32::from(args.nodes) > 65_535
        || u32::from(peer_base) + u32::from(args.nodes) > 65_535
        || u32::from(grpc_base) + u32::from(args.nodes) > 65_535
        || args
            .resp_base_port
            .is_some_and(|p| p == 0 || u32::from(p) + u32::from(args.nodes) > 65_535)
        || peer_base == 0
        || grpc_base == 0
    {
        return Err(CliError::Usage("ports out of range".into()));
    }
    let mut ports = Vec::new();
    for slot in 0..args.nodes {
        ports.push((Proto::Tcp, args.base_port + slot, "HTTP (--base-port)"));
        ports.push((Proto::Udp, peer_base + slot, "peer (--peer-base-port)"));
        ports.push((Proto::Tcp, grpc_base + slot, "gRPC (--grpc-base-port)"));
        if let Some(p) = args.resp_base_port {
            ports.push((Proto::Tcp, p + slot, "RESP (--resp-base-port)"));
        }
    }
    let taken = ports_taken(&ports);
    if !taken.is_empty() {
        return Err(CliError::Usage(format!(
            "ports already in use: {} (another `drl cluster` or program holds them; stop it, \
             or choose other ports with --base-port, --peer-base-port, --grpc-base-port)",
            taken.join(", ")
        )));
    }
    let dir = std::path::absolute(cluster_dir(args))?;
    std::fs::create_dir_all(dir.join("data"))?;
    crate::net::generate_dev_certs(
        &dir.join("certs"),
        &node_cert_specs("node", args.nodes, &[]),
    )?;
    let rules = dir.join("rules.toml");
    if !rules.exists() {
        std::fs::write(&rules, EXAMPLE_RULES)?;
    }
    let token = match &args.admin_token {
        Some(t) => t.clone(),
        None => random_hex(16)?,
    };
    let seed = random_hex(16)?;
    let mut configs = Vec::new();
    let mut http = Vec::new();
    let mut grpc = Vec::new();
    let mut resp = Vec::new();
    for slot in 0..args.nodes {
        let name = format!("node-{slot}");
        let http_addr = format!("127.0.0.1:{}", args.base_port + slot);
        let grpc_addr = format!("127.0.0.1:{}", grpc_base + slot);
        // Every other node is a seed, so whichever node restarts first finds
        // the rest at once (with node-0 as the only seed, a restarted node-0
        // found nobody until its peers redialled).
        let seeds = (0..args.nodes)
            .filter(|&other| other != slot)
            .map(|other| toml_string(&format!("127.0.0.1:{}", peer_base + other)))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "# Written by `drl cluster`; see deploy/node.example.toml for every field.\n\
             name = {name}\n\
             slot = {slot}\n\
             listen_peer = \"127.0.0.1:{peer}\"\n\
             listen_http = {http}\n\
             grpc_listen = {grpc}\n\
             seeds = [{seeds}]\n\
             rules = \"rules.toml\"\n\
             share_policy = {policy}\n\
             fence_after = {fence}\n\
             snapshot_path = \"data/{name_raw}.snapshot\"\n\
             tls_ca = \"certs/ca.pem\"\n\
             tls_cert = \"certs/{name_raw}.pem\"\n\
             tls_key = \"certs/{name_raw}-key.pem\"\n\
             key_seed = \"{seed}\"\n\
             admin_token = {token}\n\
             allow_dev_admin_token = true\n\
             http2 = {http2}\n{resp}{skew}",
            name = toml_string(&name),
            name_raw = name,
            peer = peer_base + slot,
            http = toml_string(&http_addr),
            grpc = toml_string(&grpc_addr),
            policy = toml_string(&args.share_policy),
            fence = toml_string(&args.fence_after),
            token = toml_string(&token),
            http2 = args.http2,
            resp = args.resp_base_port.map_or_else(String::new, |p| {
                format!("resp_listen = \"127.0.0.1:{}\"\n", p + slot)
            }),
            skew = args
                .test_clock_offset
                .iter()
                .filter(|(s, _)| *s == slot)
                .map(|(_, ms)| format!("test_clock_offset_ms = {ms}\n"))
                .chain(
                    args.test_clock_uncorrected
                        .then(|| "test_clock_uncorrected = true\n".to_owned()),
                )
                .collect::<String>(),
        );
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text)?;
        // Check the file now, not in a child that would die at once.
        crate::node::NodeFile::load(&path)?.settings(&dir)?;
        configs.push(path);
        http.push(format!("http://{http_addr}"));
        grpc.push(format!("grpc://{grpc_addr}"));
        resp.push(
            args.resp_base_port
                .map_or_else(String::new, |p| format!("  redis://127.0.0.1:{}", p + slot)),
        );
    }
    Ok(Plan {
        configs,
        http,
        grpc,
        resp,
        token,
    })
}

/// A port's transport, for [`ports_taken`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proto {
    Tcp,
    Udp,
}

/// The ports of `ports` that cannot be bound on 127.0.0.1 now, as
/// `"8400/tcp (HTTP (--base-port))"`. Checked before any child starts: a
/// child that cannot bind would exit, while another program answering on
/// its port could pass for it being ready.
pub(super) fn ports_taken(ports: &[(Proto, u16, &'static str)]) -> Vec<String> {
    ports
        .iter()
        .filter(|(proto, port, _)| {
            let at = ("127.0.0.1", *port);
            match proto {
                Proto::Tcp => std::net::TcpListener::bind(at).is_err(),
                Proto::Udp => std::net::UdpSocket::bind(at).is_err(),
            }
        })
        .map(|(proto, port, what)| {
            let p = if *proto == Proto::Tcp { "tcp" } else { "udp" };
            format!("{port}/{p} ({what})")
        })
        .collect()
}

/// Copies each line a child writes to `from` onto this process's stderr,
/// prefixed with the child's node name, so the logs of several nodes can be
/// told apart. Lines are written whole; a closed stderr drops them.
fn relay_lines(name: String, from: impl Read + Send + 'static) {
    use std::io::{BufRead, BufReader, Write};
    let thread_name = format!("{name}-log");
    let spawned = std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            let mut lines = BufReader::new(from);
            let mut line = Vec::new();
            loop {
                line.clear();
                match lines.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let mut out = format!("{name} | ").into_bytes();
                        out.extend_from_slice(&line);
                        if !out.ends_with(b"\n") {
                            out.push(b'\n');
                        }
                        let _ = std::io::stderr().lock().write_all(&out);
                    }
                }
            }
        });
    if let Err(e) = spawned {
        errln!("{thread_name}: cannot relay the logs: {e}");
    }
}

pub(super) fn spawn(exe: &Path, config: &Path) -> Result<Child, CliError> {
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The child must read its config, not ours.
        .env_remove("DRL_CONFIG");
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of ours;
        // it asks the kernel to send SIGTERM to the child if we die, so no
        // node outlives a killed `drl cluster`.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn()?;
    let name = config
        .file_stem()
        .map_or_else(|| "node".to_owned(), |s| s.to_string_lossy().into_owned());
    if let Some(out) = child.stdout.take() {
        relay_lines(name.clone(), out);
    }
    if let Some(err) = child.stderr.take() {
        relay_lines(name, err);
    }
    Ok(child)
}

fn terminate(child: &Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Stops every child with SIGTERM; kills those still running after `grace`.
pub(super) fn stop_all(children: &mut [Child], grace: Duration) {
    for c in children.iter() {
        terminate(c);
    }
    let start = Instant::now();
    for c in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if start.elapsed() > grace => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// When to start again the nodes of `drl cluster` that exited on their own.
#[derive(Debug)]
struct Supervisor {
    nodes: Vec<Supervised>,
}

#[derive(Debug, Clone, Copy)]
struct Supervised {
    started: Option<Instant>,
    failures: u32,
    restart_at: Option<Instant>,
}

impl Supervisor {
    /// The first pause before a restart; it doubles with each exit within
    /// [`Supervisor::STABLE`] of the node's start, up to [`Supervisor::MAX`].
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);
    /// A node that ran this long before exiting starts its pauses over.
    const STABLE: Duration = Duration::from_secs(60);

    /// `nodes` nodes, all started at `now`.
    fn new(nodes: usize, now: Instant) -> Self {
        Supervisor {
            nodes: vec![
                Supervised {
                    started: Some(now),
                    failures: 0,
                    restart_at: None,
                };
                nodes
            ],
        }
    }

    /// Node `i` was seen exited at `now`: the pause before it starts again,
    /// or `None` when a restart is already planned.
    fn exited(&mut self, i: usize, now: Instant) -> Option<Duration> {
        let n = &mut self.nodes[i];
        if n.restart_at.is_some() {
            return None;
        }
        if n.started
            .is_some_and(|s| now.duration_since(s) >= Self::STABLE)
        {
            n.failures = 0;
        }
        let delay = Self::FIRST
            .saturating_mul(1 << n.failures.min(10))
            .min(Self::MAX);
        n.failures += 1;
        n.restart_at = Some(now + delay);
        Some(delay)
    }

    /// Node `i` could not be started again at `now`: the pause before the
    /// next try.
    fn retry(&mut self, i: usize, now: Instant) -> Duration {
        let n = &mut self.nodes[i];
        n.restart_at = None;
        n.started = None;
        self.exited(i, now).unwrap_or(Self::MAX)
    }

    /// The nodes whose restart is due at `now`.
    fn due(&self, now: Instant) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].restart_at.is_some_and(|t| t <= now))
            .collect()
    }

    /// Node `i` was started again at `now`.
    fn started(&mut self, i: usize, now: Instant) {
        let n = &mut self.nodes[i];
        n.started = Some(now);
        n.restart_at = None;
    }
}

/// `drl cluster`: writes certificates, configs and rules, starts one child
/// `drl node` per slot, waits until all are ready, then runs until a signal,
/// starting again any node that exits on its own, and stops them all.
pub fn run_cluster(args: &ClusterArgs) -> Result<(), CliError> {
    if let Some(ClusterAction::Add(add)) = &args.action {
        return super::cluster_add::run_add(add);
    }
    let plan = prepare(args)?;
    let exe = std::env::current_exe()?;
    let rt = runtime()?;
    // Catch Ctrl-C and SIGTERM before the first child exists, so that a
    // signal during start-up stops the children cleanly too.
    let mut signal = {
        let _entered = rt.enter();
        ShutdownSignal::new()?
    };
    let mut children = Vec::new();
    for config in &plan.configs {
        match spawn(&exe, config) {
            Ok(c) => children.push(c),
            Err(e) => {
                stop_all(&mut children, Duration::from_secs(10));
                return Err(e);
            }
        }
    }
    let outcome = rt.block_on(async {
        let ready = async {
            for url in &plan.http {
                wait_ready(url, &mut children, Duration::from_secs(60), Some(plan.http.len()))
                    .await?;
            }
            Ok::<_, CliError>(())
        };
        tokio::select! {
            r = ready => r?,
            () = signal.recv() => return Ok(()),
        }
        print_banner(args, &plan);
        // Until a signal. A node that exits on its own is started again
        // from its own config (it recovers its counts from its peers and its
        // snapshot, like any restarted node), after a pause that doubles
        // while it keeps failing within a minute of its start.
        let mut supervisor = Supervisor::new(children.len(), Instant::now());
        loop {
            tokio::select! {
                () = signal.recv() => break Ok::<_, CliError>(()),
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    let now = Instant::now();
                    for (i, c) in children.iter_mut().enumerate() {
                        if let Some(status) = c.try_wait()? {
                            if let Some(delay) = supervisor.exited(i, now) {
                                errln!(
                                    "node-{i} exited on its own ({status}); starting it again in {delay:?}"
                                );
                            }
                        }
                    }
                    for i in supervisor.due(now) {
                        match spawn(&exe, &plan.configs[i]) {
                            Ok(c) => {
                                children[i] = c;
                                supervisor.started(i, now);
                                errln!("node-{i} started again");
                            }
                            Err(e) => {
                                let delay = supervisor.retry(i, now);
                                errln!("node-{i} could not be started again ({e}); next try in {delay:?}");
                            }
                        }
                    }
                }
            }
        }
    });
    errln!("stopping {} nodes...", children.len());
    stop_all(&mut children, Duration::from_secs(15));
    errln!("all nodes stopped");
    outcome
}

fn print_banner(args: &ClusterArgs, plan: &Plan) {
    outln!("\n{} nodes ready:", plan.http.len());
    for (i, ((url, grpc), resp)) in plan.http.iter().zip(&plan.grpc).zip(&plan.resp).enumerate() {
        outln!("  node-{i}  {url}  {grpc}{resp}");
    }
    let first = &plan.http[0];
    outln!("\nfiles: {}", cluster_dir(args).display());
    outln!("admin token: {}", plan.token);
    outln!("\ntry:");
    outln!(
        "  curl -si -X POST {first}/v1/check -d '{{\"user\":\"alice\",\"endpoint\":\"/v1/search\"}}'"
    );
    outln!("  curl -s '{first}/v1/allow?user=bob&endpoint=/v1/search'");
    outln!(
        "  curl -s -H 'Authorization: Bearer {}' {first}/v1/rules",
        plan.token
    );
    outln!("  curl -s {first}/metrics | grep drl_decisions");
    outln!(
        "\nmore nodes, while it runs: drl cluster add --dir {}",
        cluster_dir(args).display()
    );
    outln!("\nCtrl-C stops the cluster.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_that_keeps_failing_waits_longer_each_time_and_a_stable_one_starts_over() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(2, t0);
        assert_eq!(s.exited(1, t0), Some(Duration::from_millis(500)));
        // Seen again before its restart: nothing new is planned.
        assert_eq!(s.exited(1, t0 + Duration::from_millis(200)), None);
        assert!(s.due(t0 + Duration::from_millis(499)).is_empty());
        assert_eq!(s.due(t0 + Duration::from_millis(500)), vec![1]);
        let mut at = t0 + Duration::from_millis(500);
        s.started(1, at);
        let mut pauses = Vec::new();
        for _ in 0..8 {
            at += Duration::from_secs(1);
            let pause = s.exited(1, at).unwrap();
            pauses.push(pause.as_millis());
            at += pause;
            s.started(1, at);
        }
        assert_eq!(
            pauses,
            [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]
        );
        // A minute of running resets the pauses.
        at += Supervisor::STABLE;
        assert_eq!(s.exited(1, at), Some(Duration::from_millis(500)));
        // A failed start tries again later, not never.
        assert_eq!(s.retry(1, at), Duration::from_millis(1_000));
        assert!(s.due(at).is_empty() && s.nodes[0].restart_at.is_none());
    }

    fn args(dir: &Path, nodes: u16) -> ClusterArgs {
        ClusterArgs {
            action: None,
            nodes,
            dir: Some(dir.to_path_buf()),
            base_port: 18_400,
            peer_base_port: Some(17_400),
            grpc_base_port: Some(19_400),
            resp_base_port: None,
            http2: false,
            admin_token: Some("tok".into()),
            share_policy: "strict".into(),
            fence_after: "60ms".into(),
            test_clock_offset: Vec::new(),
            test_clock_uncorrected: false,
        }
    }

    #[test]
    fn every_node_is_seeded_with_every_other_and_keeps_a_snapshot() {
        let dir = std::env::temp_dir().join(format!("drl-cluster-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let plan = prepare(&args(&dir, 3)).unwrap();
        assert_eq!(plan.configs.len(), 3);
        for (slot, path) in plan.configs.iter().enumerate() {
            let file = crate::node::NodeFile::load(path).unwrap();
            let mut expected: Vec<String> = (0..3)
                .filter(|&o| o != slot)
                .map(|o| format!("127.0.0.1:{}", 17_400 + o))
                .collect();
            let mut seeds = file.seeds.clone();
            seeds.sort();
            expected.sort();
            assert_eq!(seeds, expected, "node-{slot}");
            let settings = file.settings(&dir).unwrap();
            assert_eq!(
                settings.snapshot_path,
                Some(dir.join(format!("data/node-{slot}.snapshot"))),
                "node-{slot}"
            );
        }
        assert!(dir.join("data").is_dir());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_arguments_write_nothing() {
        let dir = std::env::temp_dir().join(format!("drl-cluster-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(prepare(&args(&dir, 0)).is_err());
        let mut a = args(&dir, 3);
        a.base_port = 65_534;
        assert!(prepare(&a).is_err());
        assert!(!dir.exists());
    }
}
