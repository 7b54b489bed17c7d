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
pub const API_KEY: &str = "api_key";
pub const IP: &str = "ip";
pub const ENDPOINT: &str = "endpoint";
pub const TIER: &str = "tier";
/// The rate limit domain of a request (Envoy's RLS `domain`); a rule's
/// `domain` matches on it.
pub const DOMAIN: &str = "domain";

/// Why a descriptor set was refused. Nothing was counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("a request needs at least one descriptor field")]
    NoFields,
    #[error("at most {MAX_FIELDS} descriptor fields are allowed, got {0}")]
    TooManyFields(usize),
    #[error("field name {0:?} is not valid: use 1 to {MAX_NAME_LEN} characters of a-z, 0-9 and _")]
    BadName(String),
    #[error("field `{0}` appears twice")]
    Duplicate(String),
    #[error("field `{0}` is empty")]
    Empty(String),
    #[error("field `{field}` is {len} bytes long; the limit is {MAX_VALUE_LEN}")]
    TooLong { field: String, len: usize },
    #[error("field `{0}` contains a control character")]
    ControlCharacter(String),
    #[error("field `{0}` is not valid UTF-8")]
    InvalidUtf8(String),
}

/// A validated, borrowed set of `(name, value)` pairs. Never allocates.
#[derive(Clone, Copy, Debug)]
pub struct Descriptors<'a> {
    fields: &'a [(&'a str, &'a str)],
}

impl<'a> Descriptors<'a> {
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
            if fields[..i].iter().any(|(n, _)| n == name) {
                return Err(DescriptorError::Duplicate((*name).to_owned()));
            }
        }
        Ok(Descriptors { fields })
    }

    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.fields.iter().copied()
    }
}

fn validate_name(name: &str) -> Result<(), DescriptorError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
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
    // Most ids are printable ASCII: one vectorisable pass settles them.
    if bytes.iter().all(|&b| (0x20..0x7f).contains(&b)) {
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
    fn refuses_invalid_utf8() {
        assert_eq!(value_from_bytes(USER, b"ok"), Ok("ok"));
        assert_eq!(
            value_from_bytes(USER, &[0xff, 0xfe]),
            Err(DescriptorError::InvalidUtf8(USER.into()))
        );
    }
}
