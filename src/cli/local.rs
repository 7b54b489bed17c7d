//! In-process commands: `drl rules validate FILE` and `drl check --rules FILE`.

use std::path::{Path, PathBuf};

use super::CliError;
use drl_core::algorithm::RateAlgorithm;
use drl_core::descriptor::Descriptors;
use drl_core::limiter::{Limiter, LimiterConfig, Outcome};
use drl_core::rules::RuleSet;

/// Reads and parses a rules file; the error names the file.
pub fn load_rules(path: &Path) -> Result<RuleSet, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.to_owned(),
        source,
    })?;
    RuleSet::from_toml(&text).map_err(|source| CliError::Rules {
        path: path.to_owned(),
        source,
    })
}

/// `drl rules validate FILE`: parses the file and lists its limits, one a
/// line, or fails saying what is wrong.
pub fn validate_rules(path: &Path) -> Result<(), CliError> {
    let rules = load_rules(path)?;
    println!("{}: ok, {} limits", path.display(), rules.limits().len());
    for l in rules.limits() {
        println!(
            "  {:<24} {:<14} {:<12} quota {} per {}",
            l.rule,
            l.scope.to_string(),
            l.algorithm.name(),
            l.algorithm.quota(),
            l.algorithm.quota_period(),
        );
    }
    Ok(())
}

/// `drl check --rules FILE`: the request to check and how often.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The rules file (TOML).
    #[arg(long)]
    pub rules: PathBuf,
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

/// `drl check --rules FILE`: checks the request `repeat` times against a
/// fresh in-process limiter and prints each decision with its quota.
pub fn check(args: &CheckArgs) -> Result<(), CliError> {
    let rules = load_rules(&args.rules)?;
    let pairs = args
        .fields
        .iter()
        .map(|f| f.split_once('=').ok_or_else(|| CliError::Field(f.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let d = Descriptors::new(&pairs).map_err(drl_core::limiter::CheckError::from)?;
    let limiter = Limiter::new(rules, LimiterConfig::default())?;
    let mut denied = 0;
    for i in 1..=args.repeat {
        let decision = limiter.check(&d, args.cost)?;
        if !decision.is_allowed() {
            denied += 1;
        }
        let verdict = match decision.outcome {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Never => "never (cost above capacity)",
        };
        match decision.quota {
            None => println!("{i}: {verdict} (no limit applies)"),
            Some(q) => println!(
                "{i}: {verdict}  limit {} per {}  remaining {}  reset {}ms  retry-after {}ms  ({})",
                q.limit,
                q.period,
                q.remaining,
                q.reset_after.as_millis_ceil(),
                if decision.is_allowed() {
                    0
                } else {
                    q.retry_after.as_millis_ceil()
                },
                q.rule.as_str(),
            ),
        }
    }
    match denied {
        0 => Ok(()),
        denied => Err(CliError::Denied {
            denied,
            sent: args.repeat,
        }),
    }
}
