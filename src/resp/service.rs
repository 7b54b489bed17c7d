//! What each command does: arguments in, reply bytes out.

use std::sync::Arc;

use super::cell::{self, Throttle, ThrottleError, KEY_FIELD, PARAMS_FIELD};
use super::reply;
use crate::metrics::Protocol;
use crate::service::Service;
use drl_core::descriptor::{self, Descriptors, MAX_FIELDS};
use drl_core::limiter::{Check, CheckError, Decision, Outcome};

/// Most `CL.THROTTLE` parameter triples a cluster takes on by itself. Each
/// is a limit with its own key table (bounded by `max_keys`), so a client
/// that invents triples cannot grow the rule set or memory without end;
/// past this, a new triple is refused until an operator removes some.
pub const MAX_THROTTLE_RULES: usize = 64;

/// How many times a node tries to put a triple's rule in force when a
/// concurrent rule change (from a peer, the file or the admin API) keeps
/// replacing the text it extended.
const INSTALL_ATTEMPTS: usize = 4;

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
    /// Held while a triple's rule is put in force, so that the connections
    /// of one node extend the rules one at a time.
    installing: Arc<tokio::sync::Mutex<()>>,
}

impl RespService {
    /// The RESP commands over the node's `service`.
    pub fn new(service: Service) -> RespService {
        RespService {
            service,
            installing: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// One check through the node's decision path, counted under the
    /// `resp` protocol label.
    async fn decide(&self, d: &Descriptors<'_>, cost: u32) -> Result<Decision, CheckError> {
        let check = Check::new(*d, cost);
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
        let params = t.params();
        let fields = [(PARAMS_FIELD, params.as_str()), (KEY_FIELD, key)];
        let d = match Descriptors::new(&fields) {
            Ok(d) => d,
            Err(e) => return reply::error(out, &format!("key: {e}")),
        };
        for attempt in 0..2 {
            match self.decide(&d, t.quantity).await {
                Ok(decision) => match cell::reply(&decision) {
                    Some(values) => return reply::integers(out, &values),
                    None if attempt == 0 => {
                        if let Err(e) = self.install(&t).await {
                            return reply::error(out, &e);
                        }
                    }
                    None => break,
                },
                Err(e) => return check_error(out, &e),
            }
        }
        reply::error(
            out,
            &format!(
                "no limit applies to CL.THROTTLE {params}: the rules were changed meanwhile, retry"
            ),
        );
    }

    /// Puts the rule of `t` in force on the cluster, unless it already is.
    async fn install(&self, t: &Throttle) -> Result<(), String> {
        let _one_at_a_time = self.installing.lock().await;
        let name = format!("name = \"{}\"", t.rule_name());
        for _ in 0..INSTALL_ATTEMPTS {
            let source = self.service.decider().limiter().rules().source().to_owned();
            if source.contains(&name) {
                return Ok(());
            }
            if cell::installed(&source) >= MAX_THROTTLE_RULES {
                return Err(format!(
                    "CL.THROTTLE: this cluster already runs {MAX_THROTTLE_RULES} parameter \
                     triples; refused {}",
                    t.params()
                ));
            }
            let text = format!("{}\n{}", source.trim_end(), t.rule_text());
            let rules = drl_core::rules::RuleSet::from_toml(&text)
                .map_err(|e| format!("CL.THROTTLE {}: {e}", t.params()))?;
            match self.service.node().put_rules(rules).await {
                Ok(_) => tracing::info!(rule = %t.rule_name(), "CL.THROTTLE limit put in force"),
                Err(e) => return Err(format!("CL.THROTTLE {}: {e}", t.params())),
            }
        }
        Err(format!(
            "CL.THROTTLE {}: the rules keep changing; retry",
            t.params()
        ))
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
        match self.decide(&d, cost).await {
            Ok(decision) => reply::integers(out, &check_reply(&decision)),
            Err(e) => check_error(out, &e),
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

fn check_error(out: &mut Vec<u8>, e: &CheckError) {
    reply::error(out, &e.to_string());
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
