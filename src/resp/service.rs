//! What each command does: arguments in, reply bytes out.

use std::sync::Arc;

use super::cell::{self, Throttle, ThrottleError, KEY_FIELD};
use super::reply;
use crate::metrics::Protocol;
use crate::service::Service;
use drl_core::descriptor::{self, Descriptors, MAX_FIELDS};
use drl_core::limiter::{Check, CheckError, Decision, Outcome};
use drl_core::rules::request::{RequestLimit, RequestLimitError};

/// Most `CL.THROTTLE` triples whose checked limits a node keeps ready.
/// A miss only costs building the limit again; the node's bound on
/// distinct request-defined limits is what caps clients that invent them.
const THROTTLE_CACHE: usize = 4_096;

/// After a command: keep reading, or answer and close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading commands.
    Continue,
    /// Write the answers and close the connection.
    Close,
}

/// The commands of the RESP API over one node. Cheap to clone; shared by
/// every connection of every RESP thread.
#[derive(Clone)]
pub struct RespService {
    service: Service,
    /// The limits of triples seen recently, checked once.
    limits: Arc<dashmap::DashMap<(u32, u32, u32), Arc<RequestLimit>>>,
}

impl RespService {
    /// The RESP commands over the node's `service`.
    pub fn new(service: Service) -> RespService {
        RespService {
            service,
            limits: Arc::new(dashmap::DashMap::new()),
        }
    }

    /// The node's shared service.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// One check through the node's decision path, counted under the
    /// `resp` protocol label.
    async fn decide(&self, check: Check<'_>) -> Result<Decision, CheckError> {
        let decided = self
            .service
            .decide(Protocol::Resp, std::slice::from_ref(&check))
            .await?;
        let decision = decided.decision();
        self.service.count(Protocol::Resp, &decision);
        Ok(decision)
    }

    /// Runs one command and appends its reply to `out`. A refused command
    /// (`-ERR`) changed nothing.
    pub async fn execute(&self, args: &[&[u8]], out: &mut Vec<u8>) -> Flow {
        let Some((name, rest)) = args.split_first() else {
            return Flow::Continue;
        };
        let mut upper = [0u8; 16];
        let name_upper = match upper.get_mut(..name.len()) {
            Some(slot) => {
                slot.copy_from_slice(name);
                slot.make_ascii_uppercase();
                &*slot
            }
            None => &name[..],
        };
        match name_upper {
            b"CL.THROTTLE" => self.throttle(rest, out).await,
            b"DRL.CHECK" => self.check(rest, out).await,
            b"PING" => match rest {
                [] => reply::simple(out, "PONG"),
                [msg] => reply::bulk(out, msg),
                _ => arity(out, "ping"),
            },
            b"ECHO" => match rest {
                [msg] => reply::bulk(out, msg),
                _ => arity(out, "echo"),
            },
            b"QUIT" => {
                reply::simple(out, "OK");
                return Flow::Close;
            }
            // Clients probe the command table; an empty one says "nothing
            // special", and every command here has a fixed shape.
            b"COMMAND" => reply::empty_array(out),
            // Sent by client libraries on connect; nothing to keep.
            b"CLIENT" if is_client_info(rest) => reply::simple(out, "OK"),
            b"SELECT" if rest == [b"0"] => reply::simple(out, "OK"),
            _ => reply::error(
                out,
                &format!(
                    "unknown command '{}', with args beginning with: {}",
                    printable(name),
                    rest.iter()
                        .take(3)
                        .map(|a| format!("'{}'", printable(a)))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            ),
        }
        Flow::Continue
    }

    async fn throttle(&self, args: &[&[u8]], out: &mut Vec<u8>) {
        let Some((key, params)) = args.split_first() else {
            return arity(out, "cl.throttle");
        };
        let t = match Throttle::from_args(params) {
            Ok(t) => t,
            Err(ThrottleError::Arity) => return arity(out, "cl.throttle"),
            Err(e) => return reply::error(out, &e.to_string()),
        };
        let key = match descriptor::value_from_bytes(KEY_FIELD, key) {
            Ok(k) => k,
            Err(e) => return reply::error(out, &format!("key: {e}")),
        };
        let limit = match self.limit_of(&t) {
            Ok(limit) => limit,
            Err(e) => return reply::error(out, &format!("CL.THROTTLE {}: {e}", t.params())),
        };
        let fields = [(KEY_FIELD, key)];
        let d = match Descriptors::new(&fields) {
            Ok(d) => d,
            Err(e) => return reply::error(out, &format!("key: {e}")),
        };
        match self.decide(Check::with_limit(d, t.quantity, limit)).await {
            Ok(decision) => match cell::reply(&decision) {
                Some(values) => reply::integers(out, &values),
                None => reply::error(out, "CL.THROTTLE: no limit decided"),
            },
            Err(e) => reply::error(out, &self.service.describe_check_error(&e)),
        }
    }

    /// The checked limit of a triple, from the cache or built now.
    fn limit_of(&self, t: &Throttle) -> Result<Arc<RequestLimit>, RequestLimitError> {
        let triple = (t.max_burst, t.count_per_period, t.period);
        if let Some(limit) = self.limits.get(&triple) {
            return Ok(limit.clone());
        }
        let policy = self.service.decider().limiter().request_limit_policy();
        let limit = Arc::new(RequestLimit::new(&t.spec(), policy)?);
        if self.limits.len() >= THROTTLE_CACHE {
            self.limits.clear();
        }
        self.limits.insert(triple, limit.clone());
        Ok(limit)
    }

    async fn check(&self, args: &[&[u8]], out: &mut Vec<u8>) {
        let (pairs, cost) = match args {
            [pairs @ .., kw, n] if kw.eq_ignore_ascii_case(b"COST") && pairs.len() % 2 == 0 => {
                match cell::integer("COST", n) {
                    Ok(cost) => (pairs, cost),
                    Err(e) => return reply::error(out, &e.to_string()),
                }
            }
            _ => (args, 1),
        };
        if pairs.is_empty() || pairs.len() % 2 != 0 {
            return arity(out, "drl.check");
        }
        if pairs.len() / 2 > MAX_FIELDS {
            return reply::error(
                out,
                &format!(
                    "at most {MAX_FIELDS} field value pairs, got {}",
                    pairs.len() / 2
                ),
            );
        }
        let mut fields: [(&str, &str); MAX_FIELDS] = [("", ""); MAX_FIELDS];
        for (slot, pair) in fields.iter_mut().zip(pairs.chunks_exact(2)) {
            let Ok(name) = std::str::from_utf8(pair[0]) else {
                return reply::error(out, "field names are a-z, 0-9 and _");
            };
            match descriptor::value_from_bytes(name, pair[1]) {
                Ok(value) => *slot = (name, value),
                Err(e) => return reply::error(out, &e.to_string()),
            }
        }
        let d = match Descriptors::new(&fields[..pairs.len() / 2]) {
            Ok(d) => d,
            Err(e) => return reply::error(out, &e.to_string()),
        };
        match self.decide(Check::new(d, cost)).await {
            Ok(decision) => reply::integers(out, &check_reply(&decision)),
            Err(e) => reply::error(out, &self.service.describe_check_error(&e)),
        }
    }
}

/// `DRL.CHECK`'s reply: allowed (1 or 0), limit, remaining, retry after
/// (milliseconds, -1 when allowed or when waiting cannot help), reset after
/// (milliseconds). With no limit applying: `[1, -1, -1, -1, -1]`.
pub fn check_reply(decision: &Decision) -> [i64; 5] {
    let Some(q) = decision.quota else {
        return [1, -1, -1, -1, -1];
    };
    let ms = |n: drl_core::time::Nanos| {
        i64::try_from(n.as_u64().div_ceil(1_000_000)).unwrap_or(i64::MAX)
    };
    let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
    let remaining = i64::try_from(q.remaining).unwrap_or(i64::MAX);
    match decision.outcome {
        Outcome::Allowed => [1, limit, remaining, -1, ms(q.reset_after)],
        Outcome::Denied => [
            0,
            limit,
            remaining,
            ms(q.retry_after).max(1),
            ms(q.reset_after),
        ],
        Outcome::Never => [0, limit, remaining, -1, ms(q.reset_after)],
    }
}

fn arity(out: &mut Vec<u8>, command: &str) {
    reply::error(
        out,
        &format!("wrong number of arguments for '{command}' command"),
    );
}

/// `CLIENT SETNAME x` and `CLIENT SETINFO k v`, which client libraries send.
fn is_client_info(args: &[&[u8]]) -> bool {
    match args.first() {
        Some(sub) => {
            (sub.eq_ignore_ascii_case(b"SETNAME") && args.len() == 2)
                || (sub.eq_ignore_ascii_case(b"SETINFO") && args.len() == 3)
        }
        None => false,
    }
}

/// Client bytes quoted in an error: at most 64, lossy UTF-8, no control
/// characters.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(64)])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
