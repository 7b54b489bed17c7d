//! Request-defined limits: a limit carried by the request itself (as
//! redis-cell's `CL.THROTTLE` and Gubernator's requests carry theirs), not
//! by the rules.
//!
//! A [`LimitSpec`] names an algorithm and its parameters in the words of a
//! rule file's limit entry; [`RequestLimit::new`] checks it against the
//! operator's [`RequestLimitPolicy`] once, at the edge. A check that carries
//! one is decided by it alone (the rules are not consulted for that check),
//! and counted under an identity made of every descriptor of the check and
//! the limit's parameters: two callers asking the same key with different
//! parameters count apart, and a data-plane request never touches the
//! rules.
//!
//! # Where the counts live
//!
//! Counts are kept on a bucket grid (bucket length and count), and a grid
//! is all a node needs to hold and merge counts: the numbers (a limit, a
//! capacity, a rate) only matter when deciding. Every request-defined limit
//! on one grid therefore shares one key table, whose id encodes the grid
//! (see [`grid_id`]): a peer that has never seen the parameters can still
//! hold and merge the counts it receives, with no registry to replicate.
//! Rule limits' ids never have the top bit that marks a grid id.

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::limit::RawLimit;
use super::{CompiledLimit, RuleName, Scope};
use crate::algorithm::RateAlgorithm;
use crate::key::{stable_digest, LimitId};
use crate::time::Nanos;
use crate::window::WindowSpec;

/// The bit that marks the id of a request-defined limits' grid. Rule limit
/// ids never have it.
pub const GRID_BIT: u64 = 1 << 63;

/// The name decisions under a request-defined limit report as their rule.
pub const REQUEST_RULE: &str = "request";

/// A request-defined limit as a caller writes it: the fields of a rule
/// file's limit entry (`algorithm` and its parameters; durations as text,
/// `"1m"`, `"250ms"`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// `sliding_window`, `fixed_window`, `token_bucket`, `leaky_bucket` or
    /// `gcra`.
    pub algorithm: String,
    /// Hits per window (windows, GCRA).
    pub limit: Option<u32>,
    /// The window's length (windows).
    pub window: Option<String>,
    /// Buckets per window (sliding window).
    pub precision: Option<u32>,
    /// Largest burst (buckets).
    pub capacity: Option<u32>,
    /// Tokens added per `per` (token bucket).
    pub refill: Option<u32>,
    /// Hits drained per `per` (leaky bucket).
    pub leak: Option<u32>,
    /// The period of a rate (buckets, GCRA).
    pub per: Option<String>,
    /// Hits admitted at once (GCRA).
    pub burst: Option<u32>,
    /// Bucket length (buckets, GCRA).
    pub granularity: Option<String>,
}

/// What operators allow of request-defined limits (node settings
/// `request_limits`, `request_limit_max`, `request_window_max`,
/// `request_parameter_sets_max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimitPolicy {
    /// Requests may carry their own limits at all.
    pub enabled: bool,
    /// Largest quota a request may ask for (a limit, a capacity, a burst).
    pub max_quota: u32,
    /// Longest window (or period of a rate) a request may ask for.
    pub max_window: Nanos,
    /// Most distinct parameter sets a node tracks at once; a new set beyond
    /// it is refused until older ones pass their windows.
    pub max_parameter_sets: usize,
    /// Most distinct bucket grids (key tables) request-defined limits may
    /// use on a node.
    pub max_grids: usize,
}

impl Default for RequestLimitPolicy {
    fn default() -> Self {
        RequestLimitPolicy {
            enabled: true,
            max_quota: 1_000_000,
            max_window: Nanos::from_secs(86_400),
            max_parameter_sets: 10_000,
            max_grids: 1_024,
        }
    }
}

/// Why a request-defined limit was refused. Nothing was counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestLimitError {
    /// The node does not take request-defined limits.
    #[error("this cluster does not take request-defined limits (`request_limits = false`)")]
    Disabled,
    /// The parameters are not a valid limit.
    #[error("request-defined limit: {0}")]
    Invalid(String),
    /// A quota above the operator's bound.
    #[error(
        "request-defined limit: {field} {value} exceeds the largest this cluster allows, {max}"
    )]
    QuotaTooLarge {
        /// The parameter at fault.
        field: &'static str,
        /// Its value.
        value: u32,
        /// The bound.
        max: u32,
    },
    /// A window or period longer than the operator's bound.
    #[error(
        "request-defined limit: {field} {value} exceeds the longest this cluster allows, {max}"
    )]
    WindowTooLong {
        /// The parameter at fault.
        field: &'static str,
        /// Its value.
        value: Nanos,
        /// The bound.
        max: Nanos,
    },
    /// A bucket length too long to name.
    #[error("request-defined limit: buckets of {0} are too long")]
    Granularity(Nanos),
    /// The node tracks as many distinct parameter sets (or grids) as it
    /// may; retry when older ones have passed their windows.
    #[error("request-defined limit: this node already tracks {0} distinct limits; retry later or reuse one")]
    TooMany(usize),
}

/// A request-defined limit that passed every check: its algorithm, the
/// grid its counts live on, and the digest of its parameters (part of the
/// identity of the keys it counts).
#[derive(Debug)]
pub struct RequestLimit {
    compiled: CompiledLimit,
    params: u64,
}

impl RequestLimit {
    /// Checks `spec` against `policy`.
    pub fn new(spec: &LimitSpec, policy: &RequestLimitPolicy) -> Result<Self, RequestLimitError> {
        if !policy.enabled {
            return Err(RequestLimitError::Disabled);
        }
        let quota = |field: &'static str, v: Option<u32>| match v {
            Some(value) if value > policy.max_quota => Err(RequestLimitError::QuotaTooLarge {
                field,
                value,
                max: policy.max_quota,
            }),
            _ => Ok(()),
        };
        quota("limit", spec.limit)?;
        quota("capacity", spec.capacity)?;
        quota("burst", spec.burst)?;
        quota("refill", spec.refill)?;
        quota("leak", spec.leak)?;
        let built = raw(spec).build(0..0).map_err(|e| {
            RequestLimitError::Invalid(match e.key {
                Some(key) => format!("`{key}`: {}", e.kind),
                None => e.kind.to_string(),
            })
        })?;
        let algorithm = built.algorithm;
        for (field, text) in [("window", &spec.window), ("per", &spec.per)] {
            let Some(text) = text else { continue };
            let value = crate::time::parse_duration(text)
                .map_err(|e| RequestLimitError::Invalid(e.to_string()))?;
            if value > policy.max_window {
                return Err(RequestLimitError::WindowTooLong {
                    field,
                    value,
                    max: policy.max_window,
                });
            }
        }
        let spec_grid = algorithm.window();
        let id = grid_id(&spec_grid)?;
        let params = stable_digest(built.normalized.as_bytes());
        Ok(RequestLimit {
            compiled: CompiledLimit {
                id,
                parameters: built.normalized,
                index: usize::MAX,
                rule: REQUEST_RULE.to_owned(),
                rule_name: RuleName::from_static(REQUEST_RULE),
                scope: Scope::Default,
                shadow: false,
                algorithm,
            },
            params,
        })
    }

    /// The limit as the decision path uses it: its id is its grid's.
    pub fn limit(&self) -> &CompiledLimit {
        &self.compiled
    }

    /// The digest of the normalized parameters.
    pub fn params(&self) -> u64 {
        self.params
    }

    /// The bucket grid its counts live on.
    pub fn grid(&self) -> WindowSpec {
        self.compiled.algorithm.window()
    }
}

/// A caller's spec as the rule file's raw limit entry, so that one builder
/// checks both (and says the same things about the same mistakes).
fn raw(spec: &LimitSpec) -> RawLimit {
    let at: Range<usize> = 0..0;
    let n = |v: Option<u32>| v.map(|v| Spanned::new(at.clone(), v));
    let t = |v: &Option<String>| v.clone().map(|v| Spanned::new(at.clone(), v));
    RawLimit {
        algorithm: Spanned::new(at.clone(), spec.algorithm.clone()),
        limit: n(spec.limit),
        window: t(&spec.window),
        precision: n(spec.precision),
        capacity: n(spec.capacity),
        refill: n(spec.refill),
        leak: n(spec.leak),
        per: t(&spec.per),
        burst: n(spec.burst),
        granularity: t(&spec.granularity),
    }
}

/// Bits of a grid id that hold the bucket length in nanoseconds: up to
/// about four and a half years.
const GRANULARITY_BITS: u32 = 57;

/// The id of the key table of every request-defined limit on `grid`:
/// [`GRID_BIT`], the bucket count less one (bits 57..63) and the bucket
/// length in nanoseconds (bits 0..57). [`grid_of`] reads it back.
pub fn grid_id(grid: &WindowSpec) -> Result<LimitId, RequestLimitError> {
    let ns = grid.granularity().as_u64();
    if ns >> GRANULARITY_BITS != 0 {
        return Err(RequestLimitError::Granularity(grid.granularity()));
    }
    let buckets = grid.buckets() as u64 - 1;
    Ok(LimitId(GRID_BIT | (buckets << GRANULARITY_BITS) | ns))
}

/// The grid a request-defined limits' table id names; `None` for a rule
/// limit's id (no [`GRID_BIT`]) or an id that names no valid grid.
pub fn grid_of(id: LimitId) -> Option<WindowSpec> {
    if id.0 & GRID_BIT == 0 {
        return None;
    }
    let buckets = ((id.0 >> GRANULARITY_BITS) & 0x3f) as usize + 1;
    let ns = id.0 & ((1 << GRANULARITY_BITS) - 1);
    WindowSpec::new(Nanos::new(ns), buckets).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(algorithm: &str) -> LimitSpec {
        LimitSpec {
            algorithm: algorithm.into(),
            ..LimitSpec::default()
        }
    }

    #[test]
    fn a_grid_id_names_its_grid_and_never_a_rule_limit() {
        let limit = RequestLimit::new(
            &LimitSpec {
                limit: Some(5),
                window: Some("1m".into()),
                ..spec("sliding_window")
            },
            &RequestLimitPolicy::default(),
        )
        .unwrap();
        let id = limit.limit().id;
        assert_ne!(id.0 & GRID_BIT, 0);
        assert_eq!(grid_of(id), Some(limit.grid()));
        assert_eq!(grid_of(LimitId(42)), None);
    }

    #[test]
    fn parameters_count_apart_and_grids_are_shared() {
        let p = RequestLimitPolicy::default();
        let five = |n| {
            RequestLimit::new(
                &LimitSpec {
                    limit: Some(n),
                    window: Some("1m".into()),
                    ..spec("fixed_window")
                },
                &p,
            )
            .unwrap()
        };
        let (a, b) = (five(5), five(6));
        assert_eq!(a.limit().id, b.limit().id, "one grid, one table");
        assert_ne!(a.params(), b.params(), "different keys");
    }

    #[test]
    fn the_operators_bounds_and_bad_parameters_are_refused() {
        let p = RequestLimitPolicy {
            max_quota: 100,
            max_window: Nanos::from_secs(3600),
            ..RequestLimitPolicy::default()
        };
        let too_many = LimitSpec {
            limit: Some(101),
            window: Some("1m".into()),
            ..spec("fixed_window")
        };
        assert!(matches!(
            RequestLimit::new(&too_many, &p),
            Err(RequestLimitError::QuotaTooLarge { field: "limit", .. })
        ));
        let too_long = LimitSpec {
            limit: Some(1),
            window: Some("2h".into()),
            ..spec("fixed_window")
        };
        assert!(matches!(
            RequestLimit::new(&too_long, &p),
            Err(RequestLimitError::WindowTooLong {
                field: "window",
                ..
            })
        ));
        let foreign = LimitSpec {
            capacity: Some(3),
            ..spec("fixed_window")
        };
        let e = RequestLimit::new(&foreign, &p).unwrap_err().to_string();
        assert!(e.contains("capacity"), "{e}");
        let off = RequestLimitPolicy {
            enabled: false,
            ..p
        };
        assert_eq!(
            RequestLimit::new(&too_many, &off).unwrap_err(),
            RequestLimitError::Disabled
        );
        // Any bucket length names its grid, to the nanosecond.
        let odd = LimitSpec {
            capacity: Some(5),
            refill: Some(7),
            per: Some("1m".into()),
            ..spec("token_bucket")
        };
        let limit = RequestLimit::new(&odd, &RequestLimitPolicy::default()).unwrap();
        assert_eq!(grid_of(limit.limit().id), Some(limit.grid()));
    }
}
