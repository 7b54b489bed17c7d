//! What a call answers: decisions, receipts, refunds, checks and errors.

use super::*;

/// Who decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The node at that address.
    Node(SocketAddr),
    /// The node running in this process.
    Embedded,
    /// No node answered; the degraded mode decided.
    Degraded(Degraded),
}

/// Which degraded rule decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Degraded {
    /// Admitted by fail open (or `Local` with `otherwise: Allow`, no lease).
    FailOpen,
    /// Refused by fail closed (or `Local` with `otherwise: Deny`, no lease).
    FailClosed,
    /// From (or, when spent, against) the descriptor set's lease.
    Lease,
}

impl Degraded {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Degraded::FailOpen => "fail_open",
            Degraded::FailClosed => "fail_closed",
            Degraded::Lease => "lease",
        }
    }
}

/// A decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Allowed, denied, or never (the cost exceeds what the limit can ever
    /// admit: retrying cannot help).
    pub outcome: Outcome,
    /// The deciding limit; `None` when no rule limits the request, or when
    /// the degraded mode decided.
    pub quota: Option<Quota>,
    /// Who decided.
    pub source: Source,
    /// What [`Client::refund`] needs to give this check's cost back: set
    /// when a node allowed it at a cost above 0 and a rule counted it.
    pub receipt: Option<Receipt>,
}

impl Decision {
    /// True when the request may proceed.
    pub fn is_allowed(&self) -> bool {
        self.outcome == Outcome::Allowed
    }
}

/// The proof of an allowed check that [`Client::refund`] presents, and the
/// node that issued it (only that node can refund it). Opaque; it can be
/// kept as text ([`Receipt::token`]) and rebuilt with [`Receipt::new`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Receipt {
    token: Arc<str>,
    node: Option<SocketAddr>,
}

impl Receipt {
    /// A receipt from its token and, if known, the address of the node
    /// that issued it (the client's address for that node).
    pub fn new(token: impl Into<Arc<str>>, node: Option<SocketAddr>) -> Self {
        Receipt {
            token: token.into(),
            node,
        }
    }

    /// The sealed token, as the node issued it.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The node that issued it, if known.
    pub fn node(&self) -> Option<SocketAddr> {
        self.node
    }
}

/// What a refund gave back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refunded {
    /// The smallest amount given back across the receipt's limits (less
    /// than `requested` when part of a window has passed).
    pub refunded: u32,
    /// The receipt's cost.
    pub requested: u32,
}

/// One check of [`Client::check_batch`] or [`Client::check_request`]:
/// descriptor fields, a cost (default 1), and optionally a limit of its
/// own (a request-defined limit, see [`crate::limits`]).
///
/// ```
/// use drl_client::{limits, Check};
///
/// let check = Check::new([("user", "alice"), ("endpoint", "/v1/search")]).cost(2);
/// let own = Check::new([("user", "alice")]).limit(limits::sliding_window(5, "1m"));
/// # let _ = (check, own);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub(super) fields: Vec<(String, String)>,
    pub(super) cost: u32,
    pub(super) limit: Option<Arc<LimitSpec>>,
}

impl Check {
    /// A check of cost 1 on these descriptor fields.
    pub fn new<I, N, V>(fields: I) -> Self
    where
        I: IntoIterator<Item = (N, V)>,
        N: Into<String>,
        V: Into<String>,
    {
        Check {
            fields: fields
                .into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect(),
            cost: 1,
            limit: None,
        }
    }

    /// Hits this check weighs (0 reports the state and counts nothing).
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// Decides the check by this limit alone, not by the node's rules.
    pub fn limit(mut self, limit: LimitSpec) -> Self {
        self.limit = Some(Arc::new(limit));
        self
    }

    pub(crate) fn into_parts(self) -> (Vec<(String, String)>, u32, Option<Arc<LimitSpec>>) {
        (self.fields, self.cost, self.limit)
    }

    /// Validates the fields as a node would, and makes the wire request.
    pub(super) fn request(self) -> Result<CheckRequest, ClientError> {
        validate_fields(&self.fields)?;
        Ok(CheckRequest {
            fields: self.fields.into(),
            cost: self.cost,
            limit: self.limit,
        })
    }
}

/// The node's own checks of descriptors, before anything is sent or noted:
/// bad input is an error even while cut off, and changes nothing.
fn validate_fields(fields: &[(String, String)]) -> Result<(), ClientError> {
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    Descriptors::new(&pairs)
        .map(|_| ())
        .map_err(|e| ClientError::Refused(e.to_string()))
}

/// The decision of an atomic batch: every check allowed and counted, or
/// none counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchDecision {
    /// Each check's decision, in order. When the batch was refused, every
    /// one says not allowed (a check whose own limits had room is
    /// `Denied`), and none has a receipt.
    pub decisions: Vec<Decision>,
}

impl BatchDecision {
    /// True when every check was allowed (and counted).
    pub fn is_allowed(&self) -> bool {
        !self.decisions.is_empty() && self.decisions.iter().all(Decision::is_allowed)
    }
}

/// Why a client could not be built, or a call gave no decision.
/// [`ClientError::decision_known`] says whether the application knows what
/// was counted: for every variant but [`ClientError::Indeterminate`],
/// nothing was.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The builder was given no node address.
    #[error("no node address given")]
    NoNodes,
    /// A node name did not resolve.
    #[error("cannot resolve {0:?}: {1}")]
    Resolve(String, String),
    /// A setting out of range (the message says which).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The request itself is invalid (descriptors, endpoint, cost, a
    /// request-defined limit beyond the cluster's bounds): no node would
    /// take it, and nothing was counted.
    #[error("refused: {0}")]
    Refused(String),
    /// No decision can be made now (an in-process limiter recovering its
    /// counts; no node reachable for a refund). Nothing was counted.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A node got the request and no answer came back (a timeout, a reset
    /// connection): it may have counted it or not. With
    /// [`RetryPolicy::Safe`] the client does not send it to another node,
    /// so it is counted at most once. [`Client::allow`] and the layer
    /// decide such a request by the degraded mode.
    #[error(
        "no answer from {node} after the request was sent ({reason}): it may have been counted"
    )]
    Indeterminate {
        /// The node that may have counted it.
        node: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// A refund was refused for good; nothing was given back.
    #[error("refund refused ({0:?}): {1}")]
    Refund(RefundRefusal, String),
    /// The call needs what this client cannot do (an embedded client asked
    /// for a request-defined limit, a transport without refunds).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The embedded node could not start (feature `node`).
    #[cfg(feature = "node")]
    #[error("embedded node: {0}")]
    Node(#[from] NodeError),
}

impl ClientError {
    /// False only when a node may have counted the request without the
    /// client learning its decision ([`ClientError::Indeterminate`]).
    pub fn decision_known(&self) -> bool {
        !matches!(self, ClientError::Indeterminate { .. })
    }
}
