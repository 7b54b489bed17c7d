//! The protobuf messages of `drl.v1.RateLimiter` (proto-spec/drl/v1) and of
//! `grpc.health.v1`, encoded and decoded by hand: a few fields, no code
//! generator, no build step. Unknown fields are skipped, as protobuf
//! requires.

use std::sync::Arc;
use std::time::Duration;

use drl_core::limiter::Outcome;

use crate::transport::{CheckAnswer, CheckRequest, LimitSpec, Quota};

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_u64(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, VARINT);
    put_varint(out, v);
}

/// `CheckRequest`: descriptors (map, field 1), cost (2), limit (3).
pub(crate) fn encode_check(out: &mut Vec<u8>, req: &CheckRequest) {
    for (name, value) in req.fields.iter() {
        let mut entry = Vec::with_capacity(name.len() + value.len() + 4);
        put_bytes(&mut entry, 1, name.as_bytes());
        put_bytes(&mut entry, 2, value.as_bytes());
        put_bytes(out, 1, &entry);
    }
    put_u64(out, 2, u64::from(req.cost));
    if let Some(limit) = &req.limit {
        let mut spec = Vec::new();
        encode_limit(&mut spec, limit);
        put_bytes(out, 3, &spec);
    }
}

fn encode_limit(out: &mut Vec<u8>, l: &LimitSpec) {
    put_bytes(out, 1, l.algorithm.as_bytes());
    let nums = [
        (2, l.limit),
        (4, l.precision),
        (5, l.capacity),
        (6, l.refill),
        (7, l.leak),
        (9, l.burst),
    ];
    for (field, v) in nums {
        if let Some(v) = v {
            put_u64(out, field, u64::from(v));
        }
    }
    let texts = [(3, &l.window), (8, &l.per), (10, &l.granularity)];
    for (field, v) in texts {
        if let Some(v) = v {
            put_bytes(out, field, v.as_bytes());
        }
    }
}

/// `CheckBatchRequest`: checks (1), independent (2).
pub(crate) fn encode_batch(checks: &[CheckRequest], independent: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * checks.len());
    let mut one = Vec::with_capacity(64);
    for c in checks {
        one.clear();
        encode_check(&mut one, c);
        put_bytes(&mut out, 1, &one);
    }
    if independent {
        put_u64(&mut out, 2, 1);
    }
    out
}

/// `RefundRequest`: receipt (3).
pub(crate) fn encode_refund(receipt: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(receipt.len() + 4);
    put_bytes(&mut out, 3, receipt.as_bytes());
    out
}

/// `grpc.health.v1.HealthCheckRequest`: service (1).
pub(crate) fn encode_health(service: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, 1, service.as_bytes());
    out
}

/// A field of a message being read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Value<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

/// The fields of one message, in order; `Err` on a malformed message.
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Fields { buf }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first().ok_or("truncated varint")?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint over 64 bits".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err("truncated field".into());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
}

impl<'a> Fields<'a> {
    /// One field; `None` for a fixed-width field (no field of ours).
    fn read(&mut self) -> Result<Option<(u32, Value<'a>)>, String> {
        let key = self.varint()?;
        let field = u32::try_from(key >> 3).map_err(|_| "field number too large")?;
        let value = match (key & 7) as u8 {
            VARINT => Value::Int(self.varint()?),
            FIXED64 => {
                self.take(8)?;
                return Ok(None);
            }
            LEN => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length too large")?;
                Value::Bytes(self.take(n)?)
            }
            FIXED32 => {
                self.take(4)?;
                return Ok(None);
            }
            w => return Err(format!("wire type {w}")),
        };
        Ok(Some((field, value)))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.buf.is_empty() {
            match self.read() {
                Ok(Some(f)) => return Some(Ok(f)),
                Ok(None) => continue,
                Err(e) => {
                    self.buf = &[];
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "a string that is not UTF-8".to_owned())
}

/// `CheckResponse`, as the client's answer.
pub(crate) fn decode_check(buf: &[u8]) -> Result<CheckAnswer, String> {
    let mut outcome = None;
    let mut rule = None;
    let (mut limit, mut window_ms, mut remaining, mut reset_ms, mut retry_ms) =
        (None, None, None, None, None);
    let mut receipt = None;
    for f in Fields::new(buf) {
        match f? {
            (2, Value::Int(o)) => {
                outcome = Some(match o {
                    1 => Outcome::Allowed,
                    2 => Outcome::Denied,
                    3 => Outcome::Never,
                    other => return Err(format!("outcome {other}")),
                })
            }
            (3, Value::Bytes(b)) => rule = Some(text(b)?),
            (4, Value::Int(v)) => limit = Some(v),
            (5, Value::Int(v)) => window_ms = Some(v),
            (6, Value::Int(v)) => remaining = Some(v),
            (7, Value::Int(v)) => reset_ms = Some(v),
            (8, Value::Int(v)) => retry_ms = Some(v),
            (10, Value::Bytes(b)) if !b.is_empty() => receipt = Some(Arc::from(text(b)?)),
            _ => {}
        }
    }
    let outcome = outcome.ok_or("no outcome")?;
    let quota = match rule {
        None => None,
        Some(rule) => Some(Quota {
            rule,
            limit: limit.ok_or("no limit")?,
            window: Duration::from_millis(window_ms.ok_or("no window_ms")?),
            remaining: remaining.unwrap_or(0),
            reset_after: Duration::from_millis(reset_ms.unwrap_or(0)),
            retry_after: retry_ms.map(Duration::from_millis),
        }),
    };
    Ok(CheckAnswer::Decided {
        outcome,
        quota,
        receipt,
    })
}

/// One result of a `CheckBatchResponse`: a decision, or a check's own
/// error (`code`, `message`).
pub(crate) type BatchItem = Result<CheckAnswer, (i32, String)>;

/// `CheckBatchResponse`: results (1), each a `CheckResult` (decision 1,
/// error 2 {code 1, message 2}).
pub(crate) fn decode_batch(buf: &[u8]) -> Result<Vec<BatchItem>, String> {
    let mut out = Vec::new();
    for f in Fields::new(buf) {
        let (1, Value::Bytes(result)) = f? else {
            continue;
        };
        let mut item = None;
        for g in Fields::new(result) {
            match g? {
                (1, Value::Bytes(d)) => item = Some(Ok(decode_check(d)?)),
                (2, Value::Bytes(e)) => {
                    let (mut code, mut message) = (0i32, String::new());
                    for h in Fields::new(e) {
                        match h? {
                            (1, Value::Int(c)) => code = c as i32,
                            (2, Value::Bytes(m)) => message = text(m)?,
                            _ => {}
                        }
                    }
                    item = Some(Err((code, message)));
                }
                _ => {}
            }
        }
        out.push(item.ok_or("a batch result with neither decision nor error")?);
    }
    Ok(out)
}

/// `RefundResponse`: (refunded, requested).
pub(crate) fn decode_refund(buf: &[u8]) -> Result<(u32, u32), String> {
    let (mut refunded, mut requested) = (0u32, 0u32);
    for f in Fields::new(buf) {
        match f? {
            (1, Value::Int(v)) => refunded = u32::try_from(v).map_err(|_| "refunded")?,
            (2, Value::Int(v)) => requested = u32::try_from(v).map_err(|_| "requested")?,
            _ => {}
        }
    }
    Ok((refunded, requested))
}

/// `HealthCheckResponse`: status (1); true for `SERVING`.
pub(crate) fn decode_health(buf: &[u8]) -> Result<bool, String> {
    let mut serving = false;
    for f in Fields::new(buf) {
        if let (1, Value::Int(s)) = f? {
            serving = s == 1;
        }
    }
    Ok(serving)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_u64(&mut out, 4, v);
            let got: Vec<_> = Fields::new(&out).collect::<Result<_, _>>().unwrap();
            assert_eq!(got, vec![(4, Value::Int(v))]);
        }
    }

    #[test]
    fn a_check_encodes_as_protoc_would() {
        let req = CheckRequest {
            fields: vec![("user".to_owned(), "al".to_owned())].into(),
            cost: 3,
            limit: None,
        };
        let mut out = Vec::new();
        encode_check(&mut out, &req);
        // descriptors { key: "user" value: "al" } cost: 3
        assert_eq!(
            out,
            [0x0a, 0x0a, 0x0a, 0x04, b'u', b's', b'e', b'r', 0x12, 0x02, b'a', b'l', 0x10, 0x03]
        );
    }

    #[test]
    fn answers_decode_and_unknown_fields_are_skipped() {
        let mut m = Vec::new();
        put_u64(&mut m, 1, 1);
        put_u64(&mut m, 2, 1);
        put_bytes(&mut m, 3, b"per-user");
        put_u64(&mut m, 4, 5);
        put_u64(&mut m, 5, 1000);
        put_u64(&mut m, 6, 4);
        put_u64(&mut m, 7, 200);
        put_u64(&mut m, 8, 0);
        put_key(&mut m, 99, FIXED32);
        m.extend_from_slice(&[1, 2, 3, 4]);
        put_bytes(&mut m, 10, b"r1");
        let CheckAnswer::Decided {
            outcome,
            quota,
            receipt,
        } = decode_check(&m).unwrap()
        else {
            panic!()
        };
        assert_eq!(outcome, Outcome::Allowed);
        let q = quota.unwrap();
        assert_eq!((q.rule.as_str(), q.limit, q.remaining), ("per-user", 5, 4));
        assert_eq!(q.retry_after, Some(Duration::ZERO));
        assert_eq!(receipt.as_deref(), Some("r1"));
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(decode_check(&[0x10]).is_err(), "truncated varint");
        assert!(
            decode_check(&[0x1a, 0x05, b'a']).is_err(),
            "truncated bytes"
        );
        assert!(decode_check(&[]).is_err(), "no outcome");
        assert!(decode_check(&[0x10, 0x09]).is_err(), "unknown outcome");
        assert!(decode_batch(&[0x0a, 0x00]).is_err(), "an empty result");
    }

    #[test]
    fn batch_results_keep_their_order_and_errors() {
        let mut decision = Vec::new();
        put_u64(&mut decision, 2, 2);
        let mut error = Vec::new();
        put_u64(&mut error, 1, 14);
        put_bytes(&mut error, 2, b"recovering");
        let mut r1 = Vec::new();
        put_bytes(&mut r1, 1, &decision);
        let mut r2 = Vec::new();
        put_bytes(&mut r2, 2, &error);
        let mut m = Vec::new();
        put_bytes(&mut m, 1, &r1);
        put_bytes(&mut m, 1, &r2);
        let items = decode_batch(&m).unwrap();
        assert!(matches!(
            items[0],
            Ok(CheckAnswer::Decided {
                outcome: Outcome::Denied,
                quota: None,
                ..
            })
        ));
        assert_eq!(items[1], Err((14, "recovering".to_owned())));
    }
}
