//! One limit entry of a rule file, turned into an [`Algorithm`].
//!
//! The entry is read as one flat table of optional fields rather than a
//! serde-tagged enum: serde buffers tagged enums before picking the variant,
//! which loses the source spans that errors need. Which fields belong to which
//! algorithm is checked here instead, so a `leak` on a token bucket is still
//! an error, with its line.

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use crate::algorithm::{
    Algorithm, FixedWindow, Gcra, LeakyBucket, ParamError, Rate, SlidingWindow, TokenBucket,
};
use crate::key::{stable_digest, LimitId};
use crate::time::{parse_duration, Nanos};

use super::error::RulesErrorKind;

/// A limit entry as written, before any checks beyond TOML types.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimit {
    pub(super) algorithm: Spanned<String>,
    pub(super) limit: Option<Spanned<u32>>,
    pub(super) window: Option<Spanned<String>>,
    pub(super) precision: Option<Spanned<u32>>,
    pub(super) capacity: Option<Spanned<u32>>,
    pub(super) refill: Option<Spanned<u32>>,
    pub(super) leak: Option<Spanned<u32>>,
    pub(super) per: Option<Spanned<String>>,
    pub(super) burst: Option<Spanned<u32>>,
    pub(super) granularity: Option<Spanned<String>>,
}

/// A limit entry that passed every check.
#[derive(Debug)]
pub(super) struct BuiltLimit {
    pub(super) algorithm: Algorithm,
    /// The parameters with defaults filled in and durations in nanoseconds,
    /// so that `window = "60s"` and `window = "1m"` give the same limit id.
    pub(super) normalized: String,
}

/// A failed limit entry: `key` is the field at fault (None: the entry as a
/// whole), `span` its place in the source.
#[derive(Debug)]
pub(super) struct LimitError {
    pub(super) key: Option<&'static str>,
    pub(super) span: Range<usize>,
    pub(super) kind: RulesErrorKind,
}

/// One algorithm's vocabulary: the fields it takes, and how to say so.
struct Vocabulary {
    name: &'static str,
    fields: &'static [&'static str],
    accepted: &'static str,
}

const SLIDING: Vocabulary = Vocabulary {
    name: "sliding_window",
    fields: &["limit", "window", "precision"],
    accepted: "limit, window and optionally precision",
};
const FIXED: Vocabulary = Vocabulary {
    name: "fixed_window",
    fields: &["limit", "window"],
    accepted: "limit and window",
};
const TOKEN: Vocabulary = Vocabulary {
    name: "token_bucket",
    fields: &["capacity", "refill", "per", "granularity"],
    accepted: "capacity, refill, per and optionally granularity",
};
const LEAKY: Vocabulary = Vocabulary {
    name: "leaky_bucket",
    fields: &["capacity", "leak", "per", "granularity"],
    accepted: "capacity, leak, per and optionally granularity",
};
const GCRA: Vocabulary = Vocabulary {
    name: "gcra",
    fields: &["limit", "per", "burst", "granularity"],
    accepted: "limit, per and optionally burst and granularity",
};

impl RawLimit {
    /// Builds the algorithm. `entry` is the span of the whole entry.
    pub(super) fn build(&self, entry: Range<usize>) -> Result<BuiltLimit, LimitError> {
        let vocabulary = match self.algorithm.get_ref().as_str() {
            "sliding_window" => &SLIDING,
            "fixed_window" => &FIXED,
            "token_bucket" => &TOKEN,
            "leaky_bucket" => &LEAKY,
            "gcra" => &GCRA,
            other => {
                return Err(LimitError {
                    key: Some("algorithm"),
                    span: self.algorithm.span(),
                    kind: RulesErrorKind::UnknownAlgorithm(other.to_owned()),
                })
            }
        };
        self.only(vocabulary)?;
        let need_u32 = |key: &'static str, v: &Option<Spanned<u32>>| {
            v.as_ref()
                .map(|s| *s.get_ref())
                .ok_or_else(|| missing(vocabulary, key, &entry))
        };
        let need_duration = |key: &'static str, v: &Option<Spanned<String>>| match v {
            Some(s) => duration(key, s),
            None => Err(missing(vocabulary, key, &entry)),
        };
        let granularity = self
            .granularity
            .as_ref()
            .map(|g| duration("granularity", g))
            .transpose()?;
        let g_text = granularity.map_or(0, Nanos::as_u64);

        let (built, normalized) = match vocabulary.name {
            "sliding_window" => {
                let limit = need_u32("limit", &self.limit)?;
                let window = need_duration("window", &self.window)?;
                let precision = self
                    .precision
                    .as_ref()
                    .map_or_else(|| default_precision(window), |p| *p.get_ref());
                (
                    SlidingWindow::new(limit, window, precision).map(Algorithm::SlidingWindow),
                    format!(
                        "limit={limit} window={} precision={precision}",
                        window.as_u64()
                    ),
                )
            }
            "fixed_window" => {
                let limit = need_u32("limit", &self.limit)?;
                let window = need_duration("window", &self.window)?;
                (
                    FixedWindow::new(limit, window).map(Algorithm::FixedWindow),
                    format!("limit={limit} window={}", window.as_u64()),
                )
            }
            "token_bucket" | "leaky_bucket" => {
                let capacity = need_u32("capacity", &self.capacity)?;
                let (rate_key, amount) = if vocabulary.name == "token_bucket" {
                    ("refill", need_u32("refill", &self.refill)?)
                } else {
                    ("leak", need_u32("leak", &self.leak)?)
                };
                let per = need_duration("per", &self.per)?;
                (
                    drain_bucket(vocabulary.name, capacity, amount, per, granularity),
                    format!(
                        "capacity={capacity} {rate_key}={amount} per={} granularity={g_text}",
                        per.as_u64()
                    ),
                )
            }
            _ => {
                let limit = need_u32("limit", &self.limit)?;
                let per = need_duration("per", &self.per)?;
                let burst = self.burst.as_ref().map_or(limit, |b| *b.get_ref());
                (
                    Gcra::new(limit, per, burst, granularity).map(Algorithm::Gcra),
                    format!(
                        "limit={limit} per={} burst={burst} granularity={g_text}",
                        per.as_u64()
                    ),
                )
            }
        };
        match built {
            Ok(algorithm) => Ok(BuiltLimit {
                algorithm,
                normalized: format!("{} {normalized}", vocabulary.name),
            }),
            Err(e) => {
                let key = param_key(vocabulary.name, &e, granularity.is_some());
                // A defaulted field has no place of its own: blame the entry.
                Err(match self.span_of(key) {
                    Some(span) => LimitError {
                        key: Some(key),
                        span,
                        kind: RulesErrorKind::Param(e),
                    },
                    None => LimitError {
                        key: None,
                        span: entry,
                        kind: RulesErrorKind::Param(e),
                    },
                })
            }
        }
    }

    /// Refuses any field the algorithm does not take.
    fn only(&self, vocabulary: &Vocabulary) -> Result<(), LimitError> {
        for (key, span) in self.present() {
            if !vocabulary.fields.contains(&key) {
                return Err(LimitError {
                    key: Some(key),
                    span,
                    kind: RulesErrorKind::ForeignParameter {
                        field: key,
                        algorithm: vocabulary.name,
                        accepted: vocabulary.accepted,
                    },
                });
            }
        }
        Ok(())
    }

    /// The parameter fields that were written, in source order.
    fn present(&self) -> Vec<(&'static str, Range<usize>)> {
        let numbers = [
            ("limit", &self.limit),
            ("precision", &self.precision),
            ("capacity", &self.capacity),
            ("refill", &self.refill),
            ("leak", &self.leak),
            ("burst", &self.burst),
        ];
        let texts = [
            ("window", &self.window),
            ("per", &self.per),
            ("granularity", &self.granularity),
        ];
        let mut present: Vec<_> = numbers
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|s| (k, s.span())))
            .chain(
                texts
                    .into_iter()
                    .filter_map(|(k, v)| v.as_ref().map(|s| (k, s.span()))),
            )
            .collect();
        present.sort_by_key(|(_, span)| span.start);
        present
    }

    fn span_of(&self, key: &str) -> Option<Range<usize>> {
        self.present()
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s)
    }
}

/// Builds a token bucket (`name == "token_bucket"`) or a leaky bucket.
fn drain_bucket(
    name: &'static str,
    capacity: u32,
    amount: u32,
    per: Nanos,
    granularity: Option<Nanos>,
) -> Result<Algorithm, ParamError> {
    let rate = Rate::new(amount, per)?;
    if name == "token_bucket" {
        TokenBucket::new(capacity, rate, granularity).map(Algorithm::TokenBucket)
    } else {
        LeakyBucket::new(capacity, rate, granularity).map(Algorithm::LeakyBucket)
    }
}

fn missing(vocabulary: &Vocabulary, key: &'static str, entry: &Range<usize>) -> LimitError {
    LimitError {
        key: None,
        span: entry.clone(),
        kind: RulesErrorKind::MissingParameter {
            field: key,
            algorithm: vocabulary.name,
        },
    }
}

fn duration(key: &'static str, text: &Spanned<String>) -> Result<Nanos, LimitError> {
    parse_duration(text.get_ref()).map_err(|e| LimitError {
        key: Some(key),
        span: text.span(),
        kind: RulesErrorKind::Duration(e),
    })
}

/// The rule-file field behind a constructor's complaint. The constructors
/// name their own parameters, which are not always the file's words (a
/// token bucket's `rate` is the file's `refill`).
fn param_key(algorithm: &str, e: &ParamError, has_granularity: bool) -> &'static str {
    match e {
        ParamError::Zero { field } => match (algorithm, *field) {
            ("token_bucket", "rate") => "refill",
            ("leaky_bucket", "rate") => "leak",
            ("gcra", "rate") => "limit",
            ("gcra", "capacity") => "burst",
            (_, field) => field,
        },
        // The only range check on a rate is a refill time too long to keep.
        ParamError::Range { field: "rate", .. } => "per",
        ParamError::Range { field, .. } => field,
        ParamError::Precision { .. } => "precision",
        ParamError::Window(_) if has_granularity => "granularity",
        ParamError::Window(_) if algorithm == "fixed_window" => "window",
        ParamError::Window(_) => "per",
    }
}

/// What a limit's id depends on besides its own parameters.
pub(super) struct LimitOwner<'r> {
    pub(super) name: &'r str,
    pub(super) key_fields: &'r [String],
    /// The rule is in shadow mode: its limits never deny.
    pub(super) shadow: bool,
}

/// What a limit's counts mean: its algorithm kind and the bucket grid they
/// are kept on. Its numbers (a limit, a capacity, a rate) are not part of
/// it: counts of hits stay true when the number they are held against
/// changes, so a reload that lowers or raises a limit keeps what clients
/// spent. A new window, precision or granularity (a new grid), or a new
/// algorithm, gives counts that cannot be read the old way: a new identity.
pub(super) fn count_shape(algorithm: &Algorithm) -> String {
    let spec = crate::algorithm::RateAlgorithm::window(algorithm);
    format!(
        "{} {}ns x{}",
        algorithm.name(),
        spec.granularity().as_u64(),
        spec.buckets()
    )
}

/// The id is a digest of length-prefixed parts, so that no two different
/// tuples can be written as the same bytes. `shape` is [`count_shape`].
///
/// The list a limit belongs to (the rule's own, a tier's, an override's)
/// is not part of it: the limits at one position of a rule's lists that
/// count on the same grid share one counter, and a list only sets the
/// number the counts are held against. A key that moves to another tier,
/// or gets an override, keeps what it spent; and an override table of
/// thousands of customers costs one key table, not one per customer.
pub(super) fn limit_id(rule: &LimitOwner<'_>, position: usize, shape: &str) -> LimitId {
    let mut bytes = Vec::with_capacity(64 + shape.len());
    let mut part = |p: &[u8]| {
        bytes.extend_from_slice(&(p.len() as u64).to_le_bytes());
        bytes.extend_from_slice(p);
    };
    part(rule.name.as_bytes());
    part(&(position as u64).to_le_bytes());
    part(&(rule.key_fields.len() as u64).to_le_bytes());
    for field in rule.key_fields {
        part(field.as_bytes());
    }
    part(shape.as_bytes());
    // Never the bit that marks a request-defined limits' grid.
    LimitId(stable_digest(&bytes) & !super::request::GRID_BIT)
}

/// The sliding window's precision when a limit gives none: 10 sub-buckets
/// (the estimator's error is at most one sub-bucket's count, a tenth of the
/// limit under steady traffic), or fewer for windows too short to cut into
/// ten buckets of at least 1 ms.
pub(crate) const DEFAULT_PRECISION: u32 = 10;

fn default_precision(window: Nanos) -> u32 {
    let w = window.as_u64();
    (1..=DEFAULT_PRECISION)
        .rev()
        .find(|&k| {
            w.is_multiple_of(u64::from(k)) && w / u64::from(k) >= Nanos::from_millis(1).as_u64()
        })
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::RateAlgorithm;

    fn build(text: &str) -> Result<BuiltLimit, LimitError> {
        let raw: RawLimit = toml::from_str(text).unwrap();
        raw.build(0..text.len())
    }

    #[test]
    fn the_default_precision_is_ten_or_what_a_short_window_allows() {
        let ms = Nanos::from_millis;
        assert_eq!(default_precision(Nanos::from_secs(1)), 10);
        assert_eq!(default_precision(Nanos::from_secs(3600)), 10);
        assert_eq!(default_precision(ms(10)), 10);
        assert_eq!(default_precision(ms(7)), 7);
        assert_eq!(default_precision(ms(1)), 1);
        assert_eq!(default_precision(Nanos::new(1_500_001)), 1);
        let b = build("algorithm = 'sliding_window'\nlimit = 5\nwindow = '4ms'").unwrap();
        assert!(b.normalized.ends_with("precision=4"), "{}", b.normalized);
    }

    #[test]
    fn builds_every_algorithm_with_defaults_filled_in() {
        let cases = [
            (
                "algorithm = 'sliding_window'\nlimit = 10\nwindow = '1s'",
                "sliding_window limit=10 window=1000000000 precision=10",
            ),
            (
                "algorithm = 'fixed_window'\nlimit = 5\nwindow = '1m'",
                "fixed_window limit=5 window=60000000000",
            ),
            (
                "algorithm = 'token_bucket'\ncapacity = 50\nrefill = 5\nper = '1s'",
                "token_bucket capacity=50 refill=5 per=1000000000 granularity=0",
            ),
            (
                "algorithm = 'leaky_bucket'\ncapacity = 20\nleak = 2\nper = '1s'\ngranularity = '500ms'",
                "leaky_bucket capacity=20 leak=2 per=1000000000 granularity=500000000",
            ),
            (
                "algorithm = 'gcra'\nlimit = 100\nper = '1m'",
                "gcra limit=100 per=60000000000 burst=100 granularity=0",
            ),
        ];
        for (text, normalized) in cases {
            let built = build(text).unwrap();
            assert_eq!(built.normalized, normalized);
            assert!(built.algorithm.quota() > 0);
        }
    }

    #[test]
    fn refuses_fields_of_another_algorithm() {
        let e =
            build("algorithm = 'token_bucket'\ncapacity = 5\nleak = 1\nper = '1s'").unwrap_err();
        assert_eq!(e.key, Some("leak"));
        assert!(matches!(
            e.kind,
            RulesErrorKind::ForeignParameter { field: "leak", .. }
        ));
        let e = build("algorithm = 'fixed_window'\nlimit = 5\nwindow = '1s'\nprecision = 2")
            .unwrap_err();
        assert_eq!(e.key, Some("precision"));
    }

    #[test]
    fn maps_constructor_errors_to_the_file_field() {
        let e =
            build("algorithm = 'token_bucket'\ncapacity = 5\nrefill = 0\nper = '1s'").unwrap_err();
        assert_eq!(e.key, Some("refill"));
        let e = build("algorithm = 'gcra'\nlimit = 5\nper = '1s'\nburst = 0").unwrap_err();
        assert_eq!(e.key, Some("burst"));
        let e = build("algorithm = 'sliding_window'\nlimit = 5\nwindow = '1s'\nprecision = 7")
            .unwrap_err();
        assert_eq!(e.key, Some("precision"));
        let e = build("algorithm = 'gcra'\nlimit = 5\nper = '0s'").unwrap_err();
        assert_eq!(e.key, Some("per"));
        let e = build(
            "algorithm = 'leaky_bucket'\ncapacity = 5\nleak = 1\nper = '1s'\ngranularity = '1us'",
        )
        .unwrap_err();
        assert_eq!(e.key, Some("granularity"));
    }

    #[test]
    fn reports_missing_fields_and_unknown_algorithms() {
        let e = build("algorithm = 'fixed_window'\nlimit = 5").unwrap_err();
        assert_eq!(e.key, None);
        assert!(matches!(
            e.kind,
            RulesErrorKind::MissingParameter {
                field: "window",
                ..
            }
        ));
        let e = build("algorithm = 'sliding'\nlimit = 5").unwrap_err();
        assert_eq!(e.key, Some("algorithm"));
        assert!(matches!(e.kind, RulesErrorKind::UnknownAlgorithm(_)));
    }
}
