//! `simulations list | run <scenario> | all`: runs scenarios, writes their
//! JSON and plots into `results/`, and (for `all`) `results/summary.md`.
//! The seed is printed and taken from `--seed`; a run replays exactly.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use clap::{Parser, Subcommand};
use simulations::report::{self, BoundsFile};
use simulations::scenario::Scenario;

#[derive(Parser)]
#[command(about = "Deterministic cluster simulations of the distributed rate limiter")]
struct Cli {
    /// Folder of scenario files.
    #[arg(long, global = true)]
    scenarios: Option<PathBuf>,
    /// Where results go.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Bounds and targets file.
    #[arg(long, global = true)]
    bounds: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lists the scenarios.
    List,
    /// Runs one scenario.
    Run {
        scenario: String,
        #[arg(long, default_value_t = simulations::DEFAULT_SEED)]
        seed: u64,
        /// The shrunken version CI runs.
        #[arg(long)]
        quick: bool,
        /// Run on this many nodes instead (scenarios without faults and
        /// with an even split); the results are named `<scenario>-n<N>`.
        #[arg(long)]
        nodes: Option<usize>,
    },
    /// Runs a limit-size matrix (`matrices/<name>.toml`) and writes its
    /// table and JSON.
    Matrix {
        name: String,
        #[arg(long, default_value_t = simulations::DEFAULT_SEED)]
        seed: u64,
        #[arg(long)]
        quick: bool,
        /// Run the earlier design (refuse near the limit) instead.
        #[arg(long)]
        earlier: bool,
    },
    /// Runs every scenario and writes the summary.
    All {
        #[arg(long, default_value_t = simulations::DEFAULT_SEED)]
        seed: u64,
        #[arg(long)]
        quick: bool,
        /// Scenarios run at once (each is single-threaded).
        #[arg(long)]
        jobs: Option<usize>,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode, String> {
    let cli = Cli::parse();
    let dir = simulations::crate_dir();
    let scenarios = cli.scenarios.unwrap_or_else(|| dir.join("scenarios"));
    let out = cli.out.unwrap_or_else(|| dir.join("results"));
    let bounds = BoundsFile::load(&cli.bounds.unwrap_or_else(|| dir.join("bounds.toml")))?;
    match cli.command {
        Command::List => {
            for s in simulations::load_all(&scenarios)? {
                println!("{:<22} {}", s.name, s.description);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            scenario,
            seed,
            quick,
            nodes,
        } => {
            let s = simulations::find(&scenarios, &scenario)?;
            let s = if quick { s.quick()? } else { s };
            let s = match nodes {
                Some(n) => {
                    let mut s = s.with_nodes(n)?;
                    s.name = format!("{}-n{n}", s.name);
                    s
                }
                None => s,
            };
            println!(
                "scenario {} seed {seed}{}",
                s.name,
                if quick { " (quick)" } else { "" }
            );
            let started = Instant::now();
            let (result, run) = simulations::evaluate(&s, seed, &bounds)?;
            simulations::write_outputs(&out, &s, &result, &run)?;
            print!(
                "{}",
                report::summary(std::slice::from_ref(&result), seed, quick)
            );
            eprintln!("{} took {:.1}s", s.name, started.elapsed().as_secs_f64());
            Ok(if result.bounds_pass() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Matrix {
            name,
            seed,
            quick,
            earlier,
        } => {
            let m = simulations::matrix::Matrix::load(
                &dir.join("matrices").join(format!("{name}.toml")),
            )?;
            let m = if quick { m.quick() } else { m };
            let started = Instant::now();
            let cells = m.run(seed, !earlier)?;
            let design = if earlier {
                "the earlier design (refuse near the limit)"
            } else {
                "confirmation near the limit"
            };
            let table = simulations::matrix::table(&cells);
            let stem = format!(
                "matrix-{}{}{}",
                m.name,
                if earlier { "-earlier" } else { "" },
                if quick { "-quick" } else { "" }
            );
            let md = format!(
                "# {}

{}

Design: {design}. Seed {seed}{}. Reproduce: `cargo run --release -p simulations -- matrix {name}{}{} --seed {seed}`.

{table}",
                m.name,
                m.description,
                if quick { ", quick" } else { "" },
                if quick { " --quick" } else { "" },
                if earlier { " --earlier" } else { "" },
            );
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            let path = out.join(format!("{stem}.md"));
            std::fs::write(&path, &md).map_err(|e| format!("{}: {e}", path.display()))?;
            let json = serde_json::to_string_pretty(&cells).map_err(|e| e.to_string())?;
            let path = out.join(format!("{stem}.json"));
            std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("{md}");
            let held = bounds
                .matrix
                .get(&m.name)
                .ok_or_else(|| format!("bounds.toml has no [matrix.{}]", m.name))?;
            let broken = simulations::matrix::broken(&cells, held);
            for b in &broken {
                println!("BROKEN {b}");
            }
            eprintln!(
                "{} cells in {:.1}s",
                cells.len(),
                started.elapsed().as_secs_f64()
            );
            Ok(if broken.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::All { seed, quick, jobs } => {
            let all: Vec<Scenario> = simulations::load_all(&scenarios)?
                .into_iter()
                .map(|s| if quick { s.quick() } else { Ok(s) })
                .collect::<Result<_, _>>()?;
            println!(
                "running {} scenarios, seed {seed}{}",
                all.len(),
                if quick { " (quick)" } else { "" }
            );
            let jobs = jobs
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
                .max(1);
            let started = Instant::now();
            let next = AtomicUsize::new(0);
            let results = Mutex::new(vec![None; all.len()]);
            std::thread::scope(|scope| {
                for _ in 0..jobs.min(all.len()) {
                    scope.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(s) = all.get(i) else { break };
                        let t = Instant::now();
                        let r =
                            simulations::evaluate(s, seed, &bounds).and_then(|(result, run)| {
                                simulations::write_outputs(&out, s, &result, &run)?;
                                Ok(result)
                            });
                        eprintln!(
                            "{:<22} {:>7.1}s {}",
                            s.name,
                            t.elapsed().as_secs_f64(),
                            match &r {
                                Ok(r) if r.bounds_pass() => "bounds met".to_owned(),
                                Ok(_) => "BOUND BROKEN".to_owned(),
                                Err(e) => format!("error: {e}"),
                            }
                        );
                        results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                    });
                }
            });
            let mut done = Vec::new();
            for r in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
                done.push(r.ok_or("a scenario did not finish")??);
            }
            let summary = report::summary(&done, seed, quick);
            let path = out.join("summary.md");
            std::fs::write(&path, &summary).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("{summary}");
            println!(
                "all {} scenarios in {:.1}s; results in {}",
                done.len(),
                started.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(if done.iter().all(|r| r.bounds_pass()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}
