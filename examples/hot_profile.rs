//! A hot-key loop for profiling the decision path:
//! `valgrind --tool=callgrind target/release/examples/hot_profile`.
use drl::core::descriptor::Descriptors;
use drl::core::rules::RuleSet;
use drl::core::time::Nanos;
use drl::limiter::{Limiter, LimiterConfig};

fn main() {
    let rules = RuleSet::from_toml(
        r#"
        [[rules]]
        name = "per-user"
        match = { user = "*" }
        key = ["user"]
        limits = [ { algorithm = "sliding_window", limit = 1000000000, window = "1s" } ]
    "#,
    )
    .expect("valid rules");
    let config = LimiterConfig {
        slots: 3,
        ..LimiterConfig::default()
    };
    let limiter = Limiter::new(rules, config).expect("valid config");
    let now = Nanos::from_secs(1_700_000_000);
    let fields = [("user", "user-000042")];
    let mut allowed = 0u64;
    for _ in 0..200_000 {
        let d = Descriptors::new(&fields).expect("valid descriptors");
        if limiter.check_at(now, &d, 1).is_ok_and(|d| d.is_allowed()) {
            allowed += 1;
        }
    }
    println!("{allowed}");
}
