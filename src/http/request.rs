//! Parsing what a client sends: a flat JSON object of descriptor fields, an
//! optional cost and an optional limit of the request's own (`"limit"` as
//! an object: a request-defined limit), or fields and cost as a query
//! string. Parse, don't validate:
//! a [`CheckRequest`] holds well-formed text, and [`Pairs::descriptors`]
//! checks the descriptor rules (names, lengths, control characters).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

use drl_core::descriptor::{self, Descriptors, MAX_FIELDS};
use drl_core::rules::request::LimitSpec;

/// The reserved member that carries the request's weight.
pub const COST: &str = "cost";

/// The member that carries a request-defined limit when its value is an
/// object (a string value is the descriptor field `limit`).
pub const LIMIT: &str = "limit";

/// One check or refund request, before descriptor validation. Names and
/// values borrow from the body when they hold no escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRequest<'a> {
    /// Descriptor `(name, value)` pairs, as sent.
    pub fields: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// Hits to charge (default 1).
    pub cost: u32,
    /// A limit of the request's own (see `drl_core::rules::request`).
    pub limit: Option<LimitSpec>,
}

/// Why a request body or query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

impl<'a> CheckRequest<'a> {
    /// Parses a JSON body: an object whose members are descriptor fields
    /// (string values) and `cost` (an integer from 0 to 2^32 − 1, default 1).
    /// Duplicate members are refused rather than silently merged.
    pub fn from_json(body: &'a [u8]) -> Result<CheckRequest<'a>, RequestError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(RequestError(
                "the body is empty: send a JSON object of descriptor fields".into(),
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let request = de
            .deserialize_map(RequestVisitor)
            .and_then(|r| de.end().map(|()| r))
            .map_err(|e| RequestError(describe_json_error(&e)))?;
        Ok(request)
    }

    /// Parses a query string (`user=alice&endpoint=%2Fv1%2Fsearch&cost=2`).
    /// Values are percent-decoded (`+` is a space) and must be UTF-8.
    pub fn from_query(query: &str) -> Result<CheckRequest<'static>, RequestError> {
        let mut request = CheckRequest {
            fields: Vec::with_capacity(4),
            cost: 1,
            limit: None,
        };
        let mut cost_seen = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = percent_decode(name)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    RequestError(format!("query parameter name {name:?} is not valid"))
                })?;
            let value = percent_decode(value)
                .map_err(|_| RequestError(format!("query parameter `{name}` is badly escaped")))?;
            let value = descriptor::value_from_bytes(&name, &value)
                .map(str::to_owned)
                .or_else(|e| {
                    // An empty value is a descriptor error, reported later with
                    // the others; invalid UTF-8 must be refused here.
                    if value.is_empty() {
                        Ok(String::new())
                    } else {
                        Err(RequestError(e.to_string()))
                    }
                })?;
            if name == COST {
                if cost_seen {
                    return Err(RequestError("`cost` appears twice".into()));
                }
                cost_seen = true;
                request.cost = parse_cost_text(&value)?;
            } else {
                push_field(&mut request.fields, name.into(), value.into()).map_err(RequestError)?;
            }
        }
        Ok(request)
    }

    /// The fields as `(name, value)` pairs, on the stack: at most
    /// [`MAX_FIELDS`] (parsing refuses more).
    pub fn pairs(&self) -> Pairs<'_> {
        let mut pairs = Pairs {
            items: [("", ""); MAX_FIELDS],
            len: 0,
        };
        for (n, v) in self.fields.iter().take(MAX_FIELDS) {
            pairs.items[pairs.len] = (n.as_ref(), v.as_ref());
            pairs.len += 1;
        }
        pairs
    }
}

/// Most checks in one batch (the gRPC `CheckBatch` limit too).
pub const MAX_BATCH: usize = 1_000;

/// A batch of checks: `{"checks": [{...}, ...], "independent": false}`.
/// Each check is an object as `POST /v1/check` takes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest<'a> {
    /// The checks, in order.
    #[serde(borrow)]
    pub checks: Vec<CheckRequest<'a>>,
    /// Decide each check on its own rather than all together.
    #[serde(default)]
    pub independent: bool,
}

impl<'a> BatchRequest<'a> {
    /// Parses a batch body; refuses an empty batch and one of more than
    /// [`MAX_BATCH`] checks.
    pub fn from_json(body: &'a [u8]) -> Result<BatchRequest<'a>, RequestError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(RequestError(
                "the body is empty: send {\"checks\": [...]} with one object of descriptor fields per check".into(),
            ));
        }
        let batch: BatchRequest<'a> = serde_json::from_slice(body).map_err(|e| {
            RequestError(format!(
                "{} (a batch is {{\"checks\": [...], \"independent\": false}})",
                describe_json_error(&e)
            ))
        })?;
        if batch.checks.is_empty() {
            return Err(RequestError("the batch holds no check".into()));
        }
        if batch.checks.len() > MAX_BATCH {
            return Err(RequestError(format!(
                "at most {MAX_BATCH} checks fit in one batch, got {}",
                batch.checks.len()
            )));
        }
        Ok(batch)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for CheckRequest<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RequestVisitor)
    }
}

/// A refund request: `{"receipt": "..."}` and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest<'a> {
    /// The receipt of the check to refund, as sent.
    pub receipt: Cow<'a, str>,
}

impl<'a> RefundRequest<'a> {
    /// Parses a refund body. The receipt's own check (its MAC) is the
    /// limiter's; this only refuses what is not a JSON object with one
    /// string member `receipt` of at most the longest receipt's length.
    pub fn from_json(body: &'a [u8]) -> Result<RefundRequest<'a>, RequestError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body<'a> {
            #[serde(borrow)]
            receipt: Cow<'a, str>,
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(RequestError(
                "the body is empty: send {\"receipt\": \"...\"} as returned by an allowed check"
                    .into(),
            ));
        }
        let parsed: Body<'a> = serde_json::from_slice(body).map_err(|e| {
            RequestError(format!(
                "{} (a refund body is {{\"receipt\": \"...\"}} as returned by an allowed check)",
                describe_json_error(&e)
            ))
        })?;
        if parsed.receipt.len() > drl_core::receipt::MAX_TEXT {
            return Err(RequestError(
                "the receipt is longer than any receipt".into(),
            ));
        }
        Ok(RefundRequest {
            receipt: parsed.receipt,
        })
    }
}

/// Descriptor pairs of one request, without a heap allocation.
pub struct Pairs<'a> {
    items: [(&'a str, &'a str); MAX_FIELDS],
    len: usize,
}

impl<'a> Pairs<'a> {
    /// The pairs, in request order.
    pub fn as_slice(&self) -> &[(&'a str, &'a str)] {
        &self.items[..self.len]
    }

    /// Validates the pairs as descriptors (see [`Descriptors::new`]).
    pub fn descriptors(&self) -> Result<Descriptors<'_>, descriptor::DescriptorError> {
        Descriptors::new(self.as_slice())
    }
}

fn push_field<'a>(
    fields: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>,
    name: Cow<'a, str>,
    value: Cow<'a, str>,
) -> Result<(), String> {
    if fields.iter().any(|(n, _)| *n == name) {
        return Err(format!("field `{}` appears twice", truncate(&name)));
    }
    // Stop early: a body may hold thousands of members, and the descriptor
    // check would refuse them anyway.
    if fields.len() == MAX_FIELDS {
        return Err(format!(
            "at most {MAX_FIELDS} descriptor fields are allowed"
        ));
    }
    fields.push((name, value));
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn parse_cost_text(text: &str) -> Result<u32, RequestError> {
    text.parse::<u32>().map_err(|_| {
        RequestError(format!(
            "`cost` must be an integer from 0 to {}, got {:?}",
            u32::MAX,
            truncate(text)
        ))
    })
}

/// serde_json's message names the position; the wording for a non-object
/// body is made plain.
fn describe_json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if e.is_syntax() || e.is_eof() {
        format!("malformed JSON: {text}")
    } else {
        text
    }
}

struct RequestVisitor;

impl<'de> Visitor<'de> for RequestVisitor {
    type Value = CheckRequest<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(
            "a JSON object of descriptor fields with string values and an optional integer `cost`",
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CheckRequest<'de>, A::Error> {
        let mut request = CheckRequest {
            fields: Vec::with_capacity(4),
            cost: 1,
            limit: None,
        };
        let mut cost_seen = false;
        while let Some(name) = map.next_key_seed(TextSeed(None))? {
            if name == COST {
                if cost_seen {
                    return Err(de::Error::custom("`cost` appears twice"));
                }
                cost_seen = true;
                request.cost = map.next_value_seed(CostSeed)?;
            } else if name == LIMIT {
                match map.next_value::<LimitOrText>()? {
                    LimitOrText::Limit(spec) => {
                        if request.limit.is_some() {
                            return Err(de::Error::custom("`limit` appears twice"));
                        }
                        request.limit = Some(spec);
                    }
                    LimitOrText::Text(value) => {
                        push_field(&mut request.fields, name, value.into())
                            .map_err(de::Error::custom)?;
                    }
                }
            } else {
                let value = map.next_value_seed(TextSeed(Some(&name)))?;
                push_field(&mut request.fields, name, value).map_err(de::Error::custom)?;
            }
        }
        Ok(request)
    }
}

/// The value of `limit`: an object is a request-defined limit, a string
/// the descriptor field `limit`.
enum LimitOrText {
    Limit(LimitSpec),
    Text(String),
}

impl<'de> de::Deserialize<'de> for LimitOrText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LimitOrTextVisitor)
    }
}

struct LimitOrTextVisitor;

impl<'de> Visitor<'de> for LimitOrTextVisitor {
    type Value = LimitOrText;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(
            "`limit` as an object (a limit of the request's own, such as \
             {\"algorithm\": \"sliding_window\", \"limit\": 5, \"window\": \"1m\"}) \
             or a string (the descriptor field `limit`)",
        )
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<LimitOrText, E> {
        Ok(LimitOrText::Text(v.to_owned()))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<LimitOrText, A::Error> {
        let spec = LimitSpec::deserialize(de::value::MapAccessDeserializer::new(map))
            .map_err(|e| de::Error::custom(format!("`limit`: {e}")))?;
        Ok(LimitOrText::Limit(spec))
    }
}

/// A member name (`None`) or a descriptor value (the field's name): a JSON
/// string, nothing else, borrowed from the body when it has no escapes.
struct TextSeed<'n>(Option<&'n str>);

impl<'de> de::DeserializeSeed<'de> for TextSeed<'_> {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TextSeed<'_> {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            Some(name) => write!(f, "a string value for field `{}`", truncate(name)),
            None => f.write_str("a member name"),
        }
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

/// The cost: a JSON integer in `0..2^32`. Floats, strings, negatives and
/// larger numbers are refused.
struct CostSeed;

impl<'de> de::DeserializeSeed<'de> for CostSeed {
    type Value = u32;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u32, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CostSeed {
    type Value = u32;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "`cost` as an integer from 0 to {}", u32::MAX)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| {
            E::custom(format!(
                "`cost` must be an integer from 0 to {}, got {v}",
                u32::MAX
            ))
        })
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| {
            E::custom(format!(
                "`cost` must be an integer from 0 to {}, got {v}",
                u32::MAX
            ))
        })
    }
}

/// A `%` not followed by two hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a `%` not followed by two hex digits")]
pub struct BadEscape;

/// Decodes `%XX` escapes and `+`; refuses a `%` not followed by two hex
/// digits. Kept over `percent-encoding`, which passes bad escapes through
/// and was slower by measurement (`benches/replaced.rs`).
pub fn percent_decode(s: &str) -> Result<Vec<u8>, BadEscape> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(BadEscape)?;
                let hex = std::str::from_utf8(hex).map_err(|_| BadEscape)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| BadEscape)?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(r: &'a CheckRequest<'_>) -> Vec<(&'a str, &'a str)> {
        r.fields
            .iter()
            .map(|(n, v)| (n.as_ref(), v.as_ref()))
            .collect()
    }

    #[test]
    fn json_objects_become_fields_and_cost() {
        let r = CheckRequest::from_json(br#"{"user":"alice","endpoint":"/v1/search","cost":3}"#)
            .unwrap();
        assert_eq!(fields(&r), [("user", "alice"), ("endpoint", "/v1/search")]);
        assert_eq!(r.cost, 3);
        let r = CheckRequest::from_json(br#"{"user":"a\u00e9"}"#).unwrap();
        assert_eq!(r.cost, 1);
        assert_eq!(fields(&r), [("user", "aé")]);
    }

    #[test]
    fn json_refusals_say_why() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"{", "malformed"),
            (b"[1]", "a JSON object"),
            (b"\"x\"", "a JSON object"),
            (br#"{"user":1}"#, "a string value for field `user`"),
            (br#"{"user":null}"#, "a string value"),
            (br#"{"user":"a","user":"b"}"#, "appears twice"),
            (br#"{"user":"a","cost":-1}"#, "got -1"),
            (br#"{"user":"a","cost":1.5}"#, "integer"),
            (br#"{"user":"a","cost":"2"}"#, "integer"),
            (br#"{"user":"a","cost":4294967296}"#, "got 4294967296"),
            (br#"{"user":"a","cost":1,"cost":2}"#, "`cost` appears twice"),
            (br#"{"user":"a"} x"#, "trailing"),
            (b"{\"user\":\"\xff\"}", "malformed"),
        ];
        for (body, want) in cases {
            let e = CheckRequest::from_json(body).unwrap_err();
            assert!(
                e.0.contains(want),
                "{:?}: {e} lacks {want:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            CheckRequest::from_json(br#"{"cost":4294967295,"u":"x"}"#)
                .unwrap()
                .cost,
            u32::MAX
        );
    }

    #[test]
    fn queries_are_percent_decoded() {
        let r = CheckRequest::from_query("user=al+ice&endpoint=%2Fv1%2Fsearch&cost=0").unwrap();
        assert_eq!(fields(&r), [("user", "al ice"), ("endpoint", "/v1/search")]);
        assert_eq!(r.cost, 0);
        for (q, want) in [
            ("user=%FF", "not valid UTF-8"),
            ("user=%G1", "badly escaped"),
            ("user=a&user=b", "appears twice"),
            ("user=a&cost=-1", "`cost` must be"),
        ] {
            let e = CheckRequest::from_query(q).unwrap_err();
            assert!(e.0.contains(want), "{q}: {e}");
        }
    }

    #[test]
    fn refund_bodies_hold_a_receipt_and_nothing_else() {
        let r = RefundRequest::from_json(br#"{"receipt":"00ff"}"#).unwrap();
        assert_eq!(r.receipt, "00ff");
        for (body, want) in [
            (&b""[..], "empty"),
            (br#"{"user":"a","cost":100}"#, "unknown field"),
            (br#"{"receipt":"a","cost":1}"#, "unknown field"),
            (br#"{"receipt":1}"#, "string"),
            (br#"{}"#, "missing field"),
            (b"[", "malformed"),
        ] {
            let e = RefundRequest::from_json(body).unwrap_err();
            assert!(
                e.0.contains(want),
                "{:?}: {e}",
                String::from_utf8_lossy(body)
            );
        }
        let long = format!(
            "{{\"receipt\":\"{}\"}}",
            "0".repeat(drl_core::receipt::MAX_TEXT + 2)
        );
        assert!(RefundRequest::from_json(long.as_bytes()).is_err());
    }

    #[test]
    fn too_many_members_stop_early() {
        let body: String = (0..100)
            .map(|i| format!("\"f{i}\":\"v\""))
            .collect::<Vec<_>>()
            .join(",");
        let e = CheckRequest::from_json(format!("{{{body}}}").as_bytes()).unwrap_err();
        assert!(e.0.contains("at most 16"), "{e}");
    }
}
