//! The small-limit matrix through every decision path: limits 1, 3, 5, 10,
//! 100 and 1000 on clusters of 3, 7, 20 and 50 nodes (in this process,
//! over real QUIC and real sockets), sequential traffic of twice the limit
//! sent to one node, round robin or at random, through HTTP, native gRPC,
//! Envoy's gRPC, RESP, the axum middleware and the SDK's embedded mode.
//! Every cell must admit exactly the limit, and its first answer must say
//! `L − 1` left.
//!
//! ```text
//! cargo run --release --example protocol_matrix [-- --nodes 3,7,20,50 --limits 1,3,5,10,100,1000]
//! ```
//!
//! Prints one line per node count and path with the cells that were exact,
//! and every cell that was not; exits 1 if any was not.

#[path = "../tests/paths_support/mod.rs"]
mod paths_support;

use std::time::Instant;

use paths_support::{matrix_rules, Nodes, Path, PATHS};

fn list(args: &[String], flag: &str, default: &[u64]) -> Vec<u64> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sizes = list(&args, "--nodes", &[3, 7, 20, 50]);
    let limits = list(&args, "--limits", &[1, 3, 5, 10, 100, 1000]);
    let spreads = ["one", "round-robin", "random"];
    let mut wrong = Vec::new();
    let mut cells = 0;
    for &n in &sizes {
        let dir =
            std::env::temp_dir().join(format!("drl-protocol-matrix-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let nodes = Nodes::start(dir.clone(), n as u16, &matrix_rules(&limits)).await;
        for kind in PATHS {
            let started = Instant::now();
            let mut path = Path::open(kind, &nodes).await;
            let mut exact = 0;
            for &limit in &limits {
                for spread in spreads {
                    let user = format!("{kind}-{n}-{limit}-{spread}");
                    let tier = format!("l{limit}");
                    let mut x = 0x9e37_79b9u64 ^ limit ^ n;
                    let mut admitted = 0;
                    let mut first = None;
                    for i in 0..limit * 2 {
                        let node = match spread {
                            "one" => 0,
                            "round-robin" => (i % n) as usize,
                            _ => {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                (x % n) as usize
                            }
                        };
                        let (ok, left) = path.ask(node, &[("tier", &tier), ("user", &user)]).await;
                        first.get_or_insert(left);
                        admitted += u64::from(ok);
                    }
                    cells += 1;
                    if admitted == limit && first == Some(limit - 1) {
                        exact += 1;
                    } else {
                        wrong.push(format!(
                            "{n} nodes, {kind}, limit {limit}, {spread}: admitted {admitted} of {}, first answer {first:?} left",
                            limit * 2
                        ));
                    }
                }
            }
            println!(
                "{n:>3} nodes  {kind:<13} {exact:>2}/{} cells exact  ({:.1} s)",
                limits.len() * spreads.len(),
                started.elapsed().as_secs_f64()
            );
        }
        nodes.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{} of {cells} cells exact", cells - wrong.len());
    for w in &wrong {
        println!("NOT EXACT: {w}");
    }
    if !wrong.is_empty() {
        std::process::exit(1);
    }
}
