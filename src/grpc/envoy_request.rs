//! From Envoy's `RateLimitRequest` to our descriptor sets: parse, don't
//! validate. A [`RlsRequest`] holds one field list per Envoy descriptor,
//! each already accepted by [`Descriptors::new`], and its cost.
//!
//! The mapping (docs/grpc-api.md):
//!
//! - `domain` becomes the field `domain` of every set, so rules can be scoped
//!   to it (a rule's `domain = "..."`); it must not be empty.
//! - each descriptor's entries become fields, `key` the name and `value` the
//!   value, under the usual descriptor rules; `domain` is reserved.
//! - the cost is the descriptor's own `hits_addend` if set, else the
//!   request's, where 0 means 1.
//! - a descriptor's own `limit` (Envoy's rate limit override:
//!   `requests_per_unit` per `unit`) is a request-defined limit: a fixed
//!   window of that many per second, minute, hour, day, month (30
//!   days) or year (365 days), decided alone for that descriptor and
//!   counted apart from the rules, as Envoy's own service does.
//! - negative hits are refused: hits come back through `Refund`.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use envoy_types::pb::envoy::r#type::v3::RateLimitUnit;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;

use drl_core::rules::request::LimitSpec;

use drl_core::descriptor::{self, DescriptorError, Descriptors, DOMAIN};

/// Most descriptors one request may carry.
pub const MAX_DESCRIPTORS: usize = 64;

/// Why a request was refused. Nothing was counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RlsRequestError {
    /// `domain` is empty.
    #[error("the rate limit domain must not be empty")]
    EmptyDomain,
    /// `domain` is not a valid value of the `domain` field.
    #[error("domain: {0}")]
    BadDomain(DescriptorError),
    /// `descriptors` is empty.
    #[error("the request has no descriptors")]
    NoDescriptors,
    /// More than [`MAX_DESCRIPTORS`] descriptors (how many).
    #[error("at most {MAX_DESCRIPTORS} descriptors are allowed, got {0}")]
    TooManyDescriptors(usize),
    /// A descriptor whose entries are not a valid descriptor set (no
    /// entries, a bad name or value, a repeated name).
    #[error("descriptor {index}: {source}")]
    Descriptor {
        /// 0-based position of the descriptor in the request.
        index: usize,
        /// What is wrong with it.
        source: DescriptorError,
    },
    /// A descriptor with an entry named `domain` (its position).
    #[error("descriptor {0}: the entry key `domain` is reserved for the request's domain")]
    ReservedKey(usize),
    /// A descriptor's `limit` override whose unit is unknown (its position).
    #[error("descriptor {0}: the limit override's unit is not known")]
    OverrideUnit(usize),
    /// A descriptor with `is_negative_hits` set (its position).
    #[error("descriptor {0}: negative hits are not supported; give hits back with Refund")]
    NegativeHits(usize),
    /// A descriptor whose own `hits_addend` does not fit a `u32`.
    #[error("descriptor {index}: hits_addend {hits} exceeds {max}", max = u32::MAX)]
    HitsTooLarge {
        /// 0-based position of the descriptor in the request.
        index: usize,
        /// The `hits_addend` given.
        hits: u64,
    },
}

/// One Envoy descriptor as a descriptor set and a cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsCheck {
    fields: Vec<(String, String)>,
    /// Hits to count: the descriptor's own `hits_addend` if set (0 checks
    /// without counting), else the request's, where 0 means 1.
    pub cost: u32,
    /// The descriptor's own limit (Envoy's override), as a request-defined
    /// limit.
    pub limit: Option<LimitSpec>,
}

impl RlsCheck {
    /// The pairs, borrowed in the shape [`Descriptors::new`] takes.
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        self.fields
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }
}

/// A whole request, every descriptor checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsRequest {
    /// One check per Envoy descriptor, in the request's order; 1 to
    /// [`MAX_DESCRIPTORS`].
    pub checks: Vec<RlsCheck>,
}

impl RlsRequest {
    /// Checks every descriptor of `request` and maps it onto a descriptor
    /// set (module docs). Refuses the whole request at the first fault.
    pub fn parse(request: &RateLimitRequest) -> Result<RlsRequest, RlsRequestError> {
        if request.domain.is_empty() {
            return Err(RlsRequestError::EmptyDomain);
        }
        descriptor::value_from_bytes(DOMAIN, request.domain.as_bytes())
            .map_err(RlsRequestError::BadDomain)?;
        if request.descriptors.is_empty() {
            return Err(RlsRequestError::NoDescriptors);
        }
        if request.descriptors.len() > MAX_DESCRIPTORS {
            return Err(RlsRequestError::TooManyDescriptors(
                request.descriptors.len(),
            ));
        }
        // Envoy defines an unset (zero) hits_addend as one hit.
        let request_cost = request.hits_addend.max(1);
        let mut checks = Vec::with_capacity(request.descriptors.len());
        for (index, d) in request.descriptors.iter().enumerate() {
            let limit = d
                .limit
                .map(|o| override_spec(&o).ok_or(RlsRequestError::OverrideUnit(index)))
                .transpose()?;
            if d.is_negative_hits {
                return Err(RlsRequestError::NegativeHits(index));
            }
            let cost = match &d.hits_addend {
                None => request_cost,
                Some(h) => u32::try_from(h.value).map_err(|_| RlsRequestError::HitsTooLarge {
                    index,
                    hits: h.value,
                })?,
            };
            if d.entries.is_empty() {
                return Err(RlsRequestError::Descriptor {
                    index,
                    source: DescriptorError::NoFields,
                });
            }
            if d.entries.iter().any(|e| e.key == DOMAIN) {
                return Err(RlsRequestError::ReservedKey(index));
            }
            let mut fields = Vec::with_capacity(d.entries.len() + 1);
            fields.push((DOMAIN.to_owned(), request.domain.clone()));
            fields.extend(d.entries.iter().map(|e| (e.key.clone(), e.value.clone())));
            let check = RlsCheck {
                fields,
                cost,
                limit,
            };
            Descriptors::new(&check.pairs())
                .map_err(|source| RlsRequestError::Descriptor { index, source })?;
            checks.push(check);
        }
        Ok(RlsRequest { checks })
    }
}

/// Envoy's override as a fixed window of `requests_per_unit` per unit;
/// `None` for an unknown unit.
fn override_spec(o: &RateLimitOverride) -> Option<LimitSpec> {
    let window = match RateLimitUnit::try_from(o.unit).ok()? {
        RateLimitUnit::Second => "1s",
        RateLimitUnit::Minute => "1m",
        RateLimitUnit::Hour => "1h",
        RateLimitUnit::Day => "1d",
        RateLimitUnit::Month => "30d",
        RateLimitUnit::Year => "365d",
        RateLimitUnit::Unknown => return None,
    };
    Some(LimitSpec {
        algorithm: "fixed_window".into(),
        limit: Some(o.requests_per_unit),
        window: Some(window.into()),
        ..LimitSpec::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor::{Entry, RateLimitOverride},
        RateLimitDescriptor,
    };
    use envoy_types::pb::google::protobuf::UInt64Value;

    fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
        RateLimitRequest {
            domain: domain.into(),
            descriptors,
            hits_addend: hits,
        }
    }

    #[test]
    fn domain_and_entries_become_fields() {
        let r = RlsRequest::parse(&request(
            "edge",
            vec![
                descriptor(&[("remote_address", "10.0.0.1")]),
                descriptor(&[("path", "/a"), ("user", "bob")]),
            ],
            0,
        ))
        .unwrap();
        assert_eq!(r.checks.len(), 2);
        assert_eq!(
            r.checks[0].pairs(),
            [("domain", "edge"), ("remote_address", "10.0.0.1")]
        );
        assert_eq!(
            r.checks[1].pairs(),
            [("domain", "edge"), ("path", "/a"), ("user", "bob")]
        );
        assert_eq!(r.checks[0].cost, 1, "hits_addend 0 means 1");
    }

    #[test]
    fn hits_addend_sets_the_cost_and_a_descriptor_may_override_it() {
        let mut own = descriptor(&[("ip", "x")]);
        own.hits_addend = Some(UInt64Value { value: 7 });
        let r = RlsRequest::parse(&request("d", vec![descriptor(&[("ip", "x")]), own], 3)).unwrap();
        assert_eq!(r.checks[0].cost, 3);
        assert_eq!(r.checks[1].cost, 7);
        let mut zero = descriptor(&[("ip", "x")]);
        zero.hits_addend = Some(UInt64Value { value: 0 });
        let r = RlsRequest::parse(&request("d", vec![zero], 3)).unwrap();
        assert_eq!(r.checks[0].cost, 0, "an explicit 0 only reports");
    }

    #[test]
    fn malformed_requests_are_refused() {
        use RlsRequestError as E;
        /// A request and the test its refusal must pass.
        type Case = (RateLimitRequest, fn(&E) -> bool);
        let ok = || descriptor(&[("ip", "x")]);
        let cases: Vec<Case> = vec![
            (request("", vec![ok()], 1), |e| *e == E::EmptyDomain),
            (request("a\u{1}b", vec![ok()], 1), |e| {
                matches!(e, E::BadDomain(_))
            }),
            (request("d", vec![], 1), |e| *e == E::NoDescriptors),
            (request("d", vec![ok(); MAX_DESCRIPTORS + 1], 1), |e| {
                matches!(e, E::TooManyDescriptors(_))
            }),
            (request("d", vec![ok(), descriptor(&[])], 1), |e| {
                matches!(e, E::Descriptor { index: 1, .. })
            }),
            (
                request("d", vec![descriptor(&[("Bad-Key", "v")])], 1),
                |e| {
                    matches!(
                        e,
                        E::Descriptor {
                            index: 0,
                            source: DescriptorError::BadName(_)
                        }
                    )
                },
            ),
            (request("d", vec![descriptor(&[("k", "")])], 1), |e| {
                matches!(
                    e,
                    E::Descriptor {
                        source: DescriptorError::Empty(_),
                        ..
                    }
                )
            }),
            (
                request("d", vec![descriptor(&[("k", "a"), ("k", "b")])], 1),
                |e| {
                    matches!(
                        e,
                        E::Descriptor {
                            source: DescriptorError::Duplicate(_),
                            ..
                        }
                    )
                },
            ),
            (request("d", vec![descriptor(&[("domain", "x")])], 1), |e| {
                *e == E::ReservedKey(0)
            }),
        ];
        for (req, expected) in cases {
            let e = RlsRequest::parse(&req).unwrap_err();
            assert!(expected(&e), "{req:?} gave {e:?}");
        }
        let mut over = ok();
        over.limit = Some(RateLimitOverride::default());
        assert_eq!(
            RlsRequest::parse(&request("d", vec![over], 1)),
            Err(E::OverrideUnit(0))
        );
        let mut per_minute = ok();
        per_minute.limit = Some(RateLimitOverride {
            requests_per_unit: 7,
            unit: RateLimitUnit::Minute as i32,
        });
        let parsed = RlsRequest::parse(&request("d", vec![per_minute], 1)).unwrap();
        let spec = parsed.checks[0].limit.as_ref().unwrap();
        assert_eq!((spec.limit, spec.window.as_deref()), (Some(7), Some("1m")));
        let mut negative = ok();
        negative.is_negative_hits = true;
        assert_eq!(
            RlsRequest::parse(&request("d", vec![negative], 1)),
            Err(E::NegativeHits(0))
        );
        let mut huge = ok();
        huge.hits_addend = Some(UInt64Value {
            value: u64::from(u32::MAX) + 1,
        });
        assert!(matches!(
            RlsRequest::parse(&request("d", vec![huge], 1)),
            Err(E::HitsTooLarge { .. })
        ));
    }
}
