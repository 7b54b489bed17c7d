//! A hot key on a limiter without peers is decided from its memo (the
//! window's summary that the last decision left in the key's entry) instead
//! of its window. Those decisions must be exactly the algorithms' own on the
//! whole window: a limiter is driven through random checks, handle checks
//! and refunds, and every answer is compared with each algorithm run on a
//! dense copy of its window that sees the same hits.

use drl_core::algorithm::{FixedWindow, RateAlgorithm, SlidingWindow, Summary, Verdict};
use drl_core::descriptor::Descriptors;
use drl_core::limiter::{Decision, Handle, Limiter, LimiterConfig, Outcome};
use drl_core::rules::RuleSet;
use drl_core::slot::NodeSlot;
use drl_core::time::{ManualClock, Nanos};
use drl_core::window::{BucketWindow, Ring, WindowCounts};
use proptest::prelude::*;

const SLIDING_WINDOW_MS: u64 = 600;
const FIXED_WINDOW_MS: u64 = 700;

/// One limit's algorithm and a dense window holding what the limiter
/// should hold for it.
struct Model {
    algorithm: Box<dyn RateAlgorithm>,
    window: BucketWindow,
}

impl Model {
    fn new(algorithm: Box<dyn RateAlgorithm>) -> Self {
        let window = BucketWindow::new(algorithm.window(), 1);
        Model { algorithm, window }
    }
    fn verdict(&self, now: Nanos, cost: u32) -> Verdict {
        let mut nets = vec![0; self.algorithm.window().buckets()];
        self.window.read(now, &mut nets);
        self.algorithm.decide(
            &WindowCounts {
                spec: self.algorithm.window(),
                now,
                nets: &nets,
            },
            cost,
        )
    }
}

/// What the limiter must answer, from each limit's verdict: the outcome of
/// the strictest, and the quota of the limit that decided (the tightest
/// admission, or the longest wait).
fn expected(verdicts: &[Verdict]) -> (Outcome, Option<(u64, Nanos, Nanos)>) {
    if verdicts.iter().any(|v| matches!(v, Verdict::Never { .. })) {
        return (Outcome::Never, None);
    }
    let mut best: Option<(Outcome, u64, Nanos, Nanos)> = None;
    for v in verdicts {
        let (outcome, remaining, reset_after, retry_after) = match *v {
            Verdict::Allow {
                remaining,
                reset_after,
            } => (Outcome::Allowed, remaining, reset_after, Nanos::ZERO),
            Verdict::Deny {
                remaining,
                retry_after,
                reset_after,
            } => (Outcome::Denied, remaining, reset_after, retry_after),
            Verdict::Never { .. } => unreachable!(),
        };
        let replace = match best {
            None => true,
            Some((cur, cur_remaining, _, cur_retry)) => {
                (outcome == Outcome::Denied && cur == Outcome::Allowed)
                    || (outcome == cur
                        && match outcome {
                            Outcome::Allowed => remaining < cur_remaining,
                            _ => retry_after > cur_retry,
                        })
            }
        };
        if replace {
            best = Some((outcome, remaining, reset_after, retry_after));
        }
    }
    let (outcome, remaining, reset_after, retry_after) = best.expect("every rule has a limit");
    (outcome, Some((remaining, reset_after, retry_after)))
}

fn answer(d: &Decision) -> (Outcome, Option<(u64, Nanos, Nanos)>) {
    if d.outcome == Outcome::Never {
        return (Outcome::Never, None);
    }
    let q = d.quota.expect("a decided limit reports its quota");
    (d.outcome, Some((q.remaining, q.reset_after, q.retry_after)))
}

fn rules(precision: u32, sliding: u32, fixed: u32) -> String {
    let sliding = format!(
        r#"{{ algorithm = "sliding_window", limit = {sliding}, window = "{SLIDING_WINDOW_MS}ms", precision = {precision} }}"#
    );
    let fixed = format!(
        r#"{{ algorithm = "fixed_window", limit = {fixed}, window = "{FIXED_WINDOW_MS}ms" }}"#
    );
    format!(
        r#"
[[rules]]
name = "solo"
match = {{ user = "solo" }}
key = ["user"]
limits = [ {sliding} ]

[[rules]]
name = "fixed"
match = {{ user = "fixed" }}
key = ["user"]
limits = [ {fixed} ]

[[rules]]
name = "duo"
match = {{ user = "duo" }}
key = ["user"]
limits = [ {sliding}, {fixed} ]
"#
    )
}

const USERS: [&str; 3] = ["solo", "fixed", "duo"];

fn models(user: &str, precision: u32, sliding: u32, fixed: u32) -> Vec<Model> {
    let sliding = || {
        Model::new(Box::new(
            SlidingWindow::new(sliding, Nanos::from_millis(SLIDING_WINDOW_MS), precision).unwrap(),
        ))
    };
    let fixed = || {
        Model::new(Box::new(
            FixedWindow::new(fixed, Nanos::from_millis(FIXED_WINDOW_MS)).unwrap(),
        ))
    };
    match user {
        "solo" => vec![sliding()],
        "fixed" => vec![fixed()],
        _ => vec![sliding(), fixed()],
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Check,
    Handle,
    Refund,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![6 => Just(Op::Check), 3 => Just(Op::Handle), 1 => Just(Op::Refund)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn memo_decisions_are_the_algorithms_on_the_whole_window(
        precision in 1u32..=6,
        sliding in 1u32..30,
        fixed in 1u32..40,
        steps in prop::collection::vec((0u64..500, 0u32..4, 0usize..3, op()), 1..250),
    ) {
        let rules = RuleSet::from_toml(&rules(precision, sliding, fixed)).unwrap();
        let limiter = Limiter::with_clock(
            rules,
            LimiterConfig::default(),
            ManualClock::new(Nanos::ZERO),
        )
        .unwrap();
        let own = limiter.config().own_slot;
        prop_assert_eq!(own, NodeSlot::new(0));
        let mut models: Vec<Vec<Model>> =
            USERS.iter().map(|u| models(u, precision, sliding, fixed)).collect();
        let fields: Vec<[(&str, &str); 1]> = USERS.iter().map(|u| [("user", *u)]).collect();
        let descriptors: Vec<Descriptors<'_>> =
            fields.iter().map(|f| Descriptors::new(f).unwrap()).collect();
        let mut handles: Vec<Option<Handle<'_, ManualClock>>> = USERS.iter().map(|_| None).collect();
        // Time starts well away from zero and only moves forward: often not
        // at all (a burst on the memo), often within a bucket, sometimes
        // past a whole window.
        let mut now = Nanos::from_secs(1_000);
        for (i, &(step, cost, user, op)) in steps.iter().enumerate() {
            if step >= 200 {
                now = now + Nanos::from_millis((step - 200) * 3 + 1);
            }
            let d = &descriptors[user];
            let model = &mut models[user];
            match op {
                Op::Refund => {
                    let given = limiter.refund_at(now, d, cost).unwrap();
                    let want = model
                        .iter_mut()
                        .map(|m| {
                            let spec = m.algorithm.window();
                            Ring::refund(&mut m.window, &spec, now, own, cost)
                        })
                        .min()
                        .unwrap_or(0);
                    prop_assert_eq!(given, want, "refund at step {}", i);
                }
                Op::Check | Op::Handle => {
                    let verdicts: Vec<Verdict> = model.iter().map(|m| m.verdict(now, cost)).collect();
                    let want = expected(&verdicts);
                    let got = match op {
                        Op::Check => limiter.check_at(now, d, cost).unwrap(),
                        _ => handles[user]
                            .get_or_insert_with(|| limiter.handle(d).unwrap())
                            .check_at(now, cost)
                            .unwrap(),
                    };
                    prop_assert_eq!(answer(&got), want, "{:?} of {} at step {}", op, USERS[user], i);
                    if got.outcome == Outcome::Allowed && cost > 0 {
                        for m in model.iter_mut() {
                            m.window.add(now, own, cost);
                        }
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The window algorithms admit from a summary exactly what they admit
    /// from the window it summarises, and refuse to answer otherwise.
    #[test]
    fn a_summary_admits_what_its_window_admits(
        precision in 1u32..=12,
        limit in 1u32..200,
        granularity_ms in 1u64..2_000,
        nets in prop::collection::vec(0u64..120, 13),
        into_bucket in 0u64..1_000_000,
        epoch in 1u64..1_000_000,
        cost in 0u32..210,
        fixed in any::<bool>(),
    ) {
        let g = Nanos::from_millis(granularity_ms);
        let algorithm: Box<dyn RateAlgorithm> = if fixed {
            Box::new(FixedWindow::new(limit, g).unwrap())
        } else {
            let window = Nanos::new(g.as_u64() * u64::from(precision));
            Box::new(SlidingWindow::new(limit, window, precision).unwrap())
        };
        let spec = algorithm.window();
        let nets = &nets[..spec.buckets()];
        let start = spec.epoch_start(epoch);
        let now = Nanos::new(start.as_u64() + into_bucket % spec.granularity().as_u64());
        prop_assert_eq!(spec.epoch(now), epoch);
        let full = algorithm.decide(&WindowCounts { spec, now, nets }, cost);
        let summary = algorithm.admit_summary(now, epoch, Summary::of(nets), cost);
        match full {
            Verdict::Allow { .. } if cost > 0 || fixed => prop_assert_eq!(summary, Some(full)),
            // A status query on a sliding window reports when the window
            // is whole again, which takes every bucket: not answered.
            Verdict::Allow { .. } => prop_assert_eq!(summary, None),
            _ => prop_assert_eq!(summary, None),
        }
    }
}
