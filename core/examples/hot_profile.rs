//! A hot-key loop for profiling the decision path:
//!
//! ```text
//! cargo build --release -p drl-core --example hot_profile
//! valgrind --tool=callgrind target/release/examples/hot_profile 200000 check
//! valgrind --tool=callgrind target/release/examples/hot_profile 0 check
//! ```
//!
//! Instructions per decision = (total at 200,000 − total at 0) / 200,000:
//! the difference removes start-up and rule loading. The first argument is
//! the number of decisions (default 200,000), the second the path:
//!
//! * `check`: `Descriptors::new` then `Limiter::check_at` per decision, as
//!   a server does per request;
//! * `handle`: one `Limiter::handle`, then `Handle::check_at` per decision.
//!
//! With `DRL_PROFILE_RULES=n` in the environment the rule is written `n`
//! times (rules `r0` … each matching every user): a decision then counts
//! `n` limits, the many-rules case (`hot_profile 2000 check` against
//! `hot_profile 0 check` with `DRL_PROFILE_RULES=3000`).
use drl_core::descriptor::Descriptors;
use drl_core::limiter::{Limiter, LimiterConfig};
use drl_core::rules::RuleSet;
use drl_core::time::Nanos;

fn main() {
    let mut args = std::env::args().skip(1);
    let iterations: u64 = args
        .next()
        .map(|a| a.parse().expect("iterations: a number"))
        .unwrap_or(200_000);
    let path = args.next().unwrap_or_else(|| "check".to_owned());
    // Optional third argument: the sliding window's precision (the rule's
    // default when absent), to weigh what the bucket count costs.
    let precision = args
        .next()
        .map(|p| {
            format!(
                ", precision = {}",
                p.parse::<u32>().expect("precision: a number")
            )
        })
        .unwrap_or_default();
    let copies: usize = std::env::var("DRL_PROFILE_RULES")
        .ok()
        .map(|n| n.parse().expect("DRL_PROFILE_RULES: a number"))
        .unwrap_or(1);
    let text: String = (0..copies)
        .map(|r| {
            format!(
                r#"
        [[rules]]
        name = "r{r}"
        match = {{ user = "*" }}
        key = ["user"]
        limits = [ {{ algorithm = "sliding_window", limit = 1000000000, window = "1s"{precision} }} ]
    "#
            )
        })
        .collect();
    let rules = RuleSet::from_toml(&text).expect("valid rules");
    let config = LimiterConfig {
        slots: 3,
        ..LimiterConfig::default()
    };
    let limiter = Limiter::new(rules, config).expect("valid config");
    let now = Nanos::from_secs(1_700_000_000);
    let fields = [("user", "user-000042")];
    let mut allowed = 0u64;
    match path.as_str() {
        "check" => {
            for _ in 0..iterations {
                let d = Descriptors::new(&fields).expect("valid descriptors");
                if limiter.check_at(now, &d, 1).is_ok_and(|d| d.is_allowed()) {
                    allowed += 1;
                }
            }
        }
        "handle" => {
            let d = Descriptors::new(&fields).expect("valid descriptors");
            let mut handle = limiter.handle(&d).expect("no endpoint list");
            for _ in 0..iterations {
                if handle.check_at(now, 1).is_ok_and(|d| d.is_allowed()) {
                    allowed += 1;
                }
            }
        }
        other => panic!("unknown path {other:?}: use check or handle"),
    }
    println!("{allowed}");
}
