//! Request descriptors: the named values a key is built from.
//!
//! A descriptor set is parsed once at the edge: after [`Descriptors::new`]
//! succeeds every name and value is known to be well formed, so the rest of
//! the code never checks again.

/// Longest value accepted for any field, in bytes.
pub const MAX_VALUE_LEN: usize = 256;
/// Longest field name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Most fields one request may carry.
pub const MAX_FIELDS: usize = 16;

/// Well-known field names. Any other name made of `[a-z0-9_]` is a custom field.
pub const USER: &str = "user";
/// The client's API key.
pub const API_KEY: &str = "api_key";
/// The client's IP address.
pub const IP: &str = "ip";
/// The endpoint called, matched against rules' endpoints.
pub const ENDPOINT: &str = "endpoint";
/// The client's plan or tier.
pub const TIER: &str = "tier";
/// The rate limit domain of a request (Envoy's RLS `domain`); a rule's
/// `domain` matches on it.
pub const DOMAIN: &str = "domain";

/// Why a descriptor set was refused. Nothing was counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("a request needs at least one descriptor field")]
    /// No fields at all.
    NoFields,
    #[error("at most {MAX_FIELDS} descriptor fields are allowed, got {0}")]
    /// More than [`MAX_FIELDS`] fields.
    TooManyFields(usize),
    #[error("field name {0:?} is not valid: use 1 to {MAX_NAME_LEN} characters of a-z, 0-9 and _")]
    /// A name that is empty, too long, or has characters outside `[a-z0-9_]`.
    BadName(String),
    #[error("field `{0}` appears twice")]
    /// The same name twice.
    Duplicate(String),
    #[error("field `{0}` is empty")]
    /// A field with an empty value.
    Empty(String),
    #[error("field `{field}` is {len} bytes long; the limit is {MAX_VALUE_LEN}")]
    /// A value longer than [`MAX_VALUE_LEN`] bytes.
    TooLong {
        /// The field's name.
        field: String,
        /// The value's length in bytes.
        len: usize,
    },
    #[error("field `{0}` contains a control character")]
    /// A value with a control character.
    ControlCharacter(String),
    #[error("field `{0}` is not valid UTF-8")]
    /// A value that is not UTF-8 (from a byte-oriented protocol).
    InvalidUtf8(String),
}

/// A validated, borrowed set of `(name, value)` pairs. Never allocates.
#[derive(Clone, Copy, Debug)]
pub struct Descriptors<'a> {
    fields: &'a [(&'a str, &'a str)],
}

impl<'a> Descriptors<'a> {
    /// Checks every name and value; errors on the first field that is not
    /// valid.
    pub fn new(fields: &'a [(&'a str, &'a str)]) -> Result<Self, DescriptorError> {
        if fields.is_empty() {
            return Err(DescriptorError::NoFields);
        }
        if fields.len() > MAX_FIELDS {
            return Err(DescriptorError::TooManyFields(fields.len()));
        }
        for (i, (name, value)) in fields.iter().enumerate() {
            validate_name(name)?;
            validate_value(name, value)?;
            if fields[..i].iter().any(|(n, _)| short_eq(n, name)) {
                return Err(DescriptorError::Duplicate((*name).to_owned()));
            }
        }
        Ok(Descriptors { fields })
    }

    /// The value of field `name`, if present.
    #[inline]
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .find(|(n, _)| short_eq(n, name))
            .map(|(_, v)| *v)
    }

    /// The fields in the order given.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.fields.iter().copied()
    }
}

/// String equality without a call into `memcmp`: names are short.
#[inline]
fn short_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Bytes allowed in a field name: `a-z`, `0-9`, `_`.
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_';
        b += 1;
    }
    table
};

fn validate_name(name: &str) -> Result<(), DescriptorError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| NAME_BYTES[usize::from(b)]);
    if ok {
        Ok(())
    } else {
        Err(DescriptorError::BadName(truncate(name)))
    }
}

fn validate_value(name: &str, value: &str) -> Result<(), DescriptorError> {
    if value.is_empty() {
        return Err(DescriptorError::Empty(name.to_owned()));
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(DescriptorError::TooLong {
            field: name.to_owned(),
            len: value.len(),
        });
    }
    if has_control(value.as_bytes()) {
        return Err(DescriptorError::ControlCharacter(name.to_owned()));
    }
    Ok(())
}

/// True if the UTF-8 text holds a control character (Unicode `Cc`): C0
/// (`0x00`–`0x1F`), DEL (`0x7F`) or C1 (`U+0080`–`U+009F`, encoded
/// `0xC2 0x80`–`0xC2 0x9F`). A byte scan: no decoding on the request path.
fn has_control(bytes: &[u8]) -> bool {
    // Most ids are printable ASCII: eight bytes at a time settle them.
    if printable_ascii(bytes) {
        return false;
    }
    bytes.iter().enumerate().any(|(i, &b)| {
        b < 0x20
            || b == 0x7f
            || (b == 0xc2
                && bytes
                    .get(i + 1)
                    .is_some_and(|&n| (0x80..=0x9f).contains(&n)))
    })
}

/// True if every byte is in `0x20..0x7f`. Word at a time: a byte `b` is
/// below `0x20` or above `0x7e` exactly when `b - 0x20` or `b + 1` wraps
/// past the high bit, or the byte already had it.
#[inline]
fn printable_ascii(bytes: &[u8]) -> bool {
    const LOW: u64 = 0x2020_2020_2020_2020;
    const ONE: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let word_ok = |w: u64| {
        // Per byte, with no carry between bytes: every byte of `w` is below
        // 0x80 here, so `w | HIGH` minus 0x20 borrows only inside a byte.
        let below_space = !(w | HIGH).wrapping_sub(LOW) & HIGH;
        let del_or_more = (w & !HIGH).wrapping_add(ONE) & HIGH;
        w & HIGH == 0 && below_space == 0 && del_or_more == 0
    };
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        if !word_ok(u64::from_le_bytes(w)) {
            return false;
        }
    }
    chunks
        .remainder()
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b))
}

/// Checks that raw bytes are a valid descriptor value and borrows them as text.
pub fn value_from_bytes<'b>(name: &str, bytes: &'b [u8]) -> Result<&'b str, DescriptorError> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| DescriptorError::InvalidUtf8(name.to_owned()))?;
    validate_value(name, text)?;
    Ok(text)
}

fn truncate(s: &str) -> String {
    s.chars().take(MAX_NAME_LEN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_fields() {
        let f = [(USER, "alice"), (ENDPOINT, "/v1/search"), ("region", "eu")];
        let d = Descriptors::new(&f).unwrap();
        assert_eq!(d.get(USER), Some("alice"));
        assert_eq!(d.get("region"), Some("eu"));
        assert_eq!(d.get(IP), None);
    }

    #[test]
    fn refuses_bad_fields_with_a_reason() {
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        let cases: Vec<(Vec<(&str, &str)>, DescriptorError)> = vec![
            (vec![], DescriptorError::NoFields),
            (vec![(USER, "")], DescriptorError::Empty(USER.into())),
            (
                vec![(USER, &long)],
                DescriptorError::TooLong {
                    field: USER.into(),
                    len: long.len(),
                },
            ),
            (vec![("User", "a")], DescriptorError::BadName("User".into())),
            (
                vec![(USER, "a"), (USER, "b")],
                DescriptorError::Duplicate(USER.into()),
            ),
            (
                vec![(USER, "a\nb")],
                DescriptorError::ControlCharacter(USER.into()),
            ),
        ];
        for (fields, want) in cases {
            assert_eq!(Descriptors::new(&fields).unwrap_err(), want, "{fields:?}");
        }
    }

    #[test]
    fn control_characters_are_found_by_bytes_as_by_chars() {
        for c in (0u32..0x3000).filter_map(char::from_u32) {
            let s = format!("a{c}b");
            assert_eq!(
                has_control(s.as_bytes()),
                s.chars().any(char::is_control),
                "{c:?}"
            );
        }
    }

    #[test]
    fn printable_ascii_words_agree_with_bytes() {
        for b in 0u8..=255 {
            for at in 0..9 {
                let mut s = vec![b'a'; 9];
                s[at] = b;
                let want = s.iter().all(|&b| (0x20..0x7f).contains(&b));
                assert_eq!(printable_ascii(&s), want, "byte {b:#x} at {at}");
            }
        }
    }

    #[test]
    fn refuses_invalid_utf8() {
        assert_eq!(value_from_bytes(USER, b"ok"), Ok("ok"));
        assert_eq!(
            value_from_bytes(USER, &[0xff, 0xfe]),
            Err(DescriptorError::InvalidUtf8(USER.into()))
        );
    }
}
