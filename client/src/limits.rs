//! Request-defined limits: a check that carries its own limit is decided
//! by it alone, not by the node's rules, and counted apart under its
//! descriptors and the limit's parameters (docs/http-api.md,
//! "Request-defined limits"). A node bounds what a request may ask
//! (`request_limit_max`, `request_window_max`); beyond them the check is
//! refused ([`crate::ClientError::Refused`]) and nothing is counted.
//!
//! ```
//! use drl_client::{limits, Check};
//!
//! let check = Check::new([("user", "alice")]).limit(limits::token_bucket(10, 1, "1s"));
//! # let _ = check;
//! ```

use crate::transport::LimitSpec;

fn spec(algorithm: &str) -> LimitSpec {
    LimitSpec {
        algorithm: algorithm.to_owned(),
        ..LimitSpec::default()
    }
}

/// `limit` hits per `window` (text: `"1m"`, `"250ms"`), sliding.
pub fn sliding_window(limit: u32, window: &str) -> LimitSpec {
    LimitSpec {
        limit: Some(limit),
        window: Some(window.to_owned()),
        ..spec("sliding_window")
    }
}

/// `limit` hits per `window`, in windows aligned to the Unix epoch.
pub fn fixed_window(limit: u32, window: &str) -> LimitSpec {
    LimitSpec {
        limit: Some(limit),
        window: Some(window.to_owned()),
        ..spec("fixed_window")
    }
}

/// A bucket of `capacity` tokens, `refill` more every `per`.
pub fn token_bucket(capacity: u32, refill: u32, per: &str) -> LimitSpec {
    LimitSpec {
        capacity: Some(capacity),
        refill: Some(refill),
        per: Some(per.to_owned()),
        ..spec("token_bucket")
    }
}

/// A bucket of `capacity` that leaks `leak` every `per`.
pub fn leaky_bucket(capacity: u32, leak: u32, per: &str) -> LimitSpec {
    LimitSpec {
        capacity: Some(capacity),
        leak: Some(leak),
        per: Some(per.to_owned()),
        ..spec("leaky_bucket")
    }
}

/// GCRA: `limit` hits per `per`, `burst` at once.
pub fn gcra(limit: u32, per: &str, burst: u32) -> LimitSpec {
    LimitSpec {
        limit: Some(limit),
        per: Some(per.to_owned()),
        burst: Some(burst),
        ..spec("gcra")
    }
}
