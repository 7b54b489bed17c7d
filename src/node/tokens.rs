//! Admin tokens: who may change the rules, by name, and the development
//! defaults a node refuses to run with unless told it is a development
//! node.
//!
//! A node takes the single `admin_token` (named `admin`) and any number of
//! named tokens:
//!
//! ```toml
//! [[admin.tokens]]
//! name = "deploy-bot"
//! token = "…"
//! ```
//!
//! The name is what the audit log records for every change made with the
//! token.

use serde::Deserialize;

use super::config::ConfigError;

/// The admin token the examples and the container setup ship with. A node
/// refuses to start with it unless `allow_dev_admin_token` is set (as `drl
/// cluster` does for its local development cluster).
pub const DEV_ADMIN_TOKEN: &str = "change-me";

/// The `[admin]` table of the configuration file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminFile {
    /// Named admin tokens, beside `admin_token`.
    pub tokens: Vec<NamedToken>,
}

/// One named admin token as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamedToken {
    /// Who holds it, for the audit log: 1 to 64 of `A-Z a-z 0-9 _ . -`.
    pub name: String,
    /// The bearer token.
    pub token: String,
}

/// The checked admin tokens: unique names, unique non-empty tokens. Empty:
/// the admin API is disabled.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AdminTokens(Vec<NamedToken>);

impl std::fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: settings are logged, tokens must not be.
        f.debug_list()
            .entries(self.0.iter().map(|t| &t.name))
            .finish()
    }
}

fn invalid(reason: String) -> ConfigError {
    ConfigError::Invalid {
        field: "admin.tokens",
        reason,
    }
}

impl AdminTokens {
    /// Checks `single` (named `admin`; ignored when empty) and `named`.
    pub fn new(single: Option<&str>, named: &[NamedToken]) -> Result<AdminTokens, ConfigError> {
        let mut tokens: Vec<NamedToken> = single
            .filter(|t| !t.is_empty())
            .map(|token| NamedToken {
                name: "admin".into(),
                token: token.to_owned(),
            })
            .into_iter()
            .collect();
        for t in named {
            let name_ok = (1..=64).contains(&t.name.len())
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !name_ok {
                return Err(invalid(format!(
                    "token name {:?}: 1 to 64 letters, digits, `_`, `.` or `-`",
                    t.name
                )));
            }
            if t.token.is_empty() {
                return Err(invalid(format!("token {:?} is empty", t.name)));
            }
            if tokens.iter().any(|k| k.name == t.name) {
                return Err(invalid(format!(
                    "two tokens are named {:?} (`admin_token` is named \"admin\")",
                    t.name
                )));
            }
            if tokens.iter().any(|k| k.token == t.token) {
                return Err(invalid(format!(
                    "token {:?} is the same as another token: each holder needs its own",
                    t.name
                )));
            }
            tokens.push(t.clone());
        }
        Ok(AdminTokens(tokens))
    }

    /// No token: the admin API is disabled.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name of the token equal to `presented`, comparing every token
    /// whole without an early exit.
    pub fn holder(&self, presented: &str) -> Option<&str> {
        let mut found = None;
        for t in &self.0 {
            if constant_time_eq(presented.as_bytes(), t.token.as_bytes()) {
                found = Some(t.name.as_str());
            }
        }
        found
    }

    /// The names of tokens equal to [`DEV_ADMIN_TOKEN`].
    pub fn development(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter(|t| t.token == DEV_ADMIN_TOKEN)
            .map(|t| t.name.as_str())
            .collect()
    }

    /// Refuses the development token unless `allowed`.
    pub fn check_development(&self, allowed: bool) -> Result<(), ConfigError> {
        match self.development().first() {
            Some(name) if !allowed => Err(ConfigError::Invalid {
                field: "admin_token",
                reason: format!(
                    "the token named {name:?} is the development token {DEV_ADMIN_TOKEN:?}, \
                     which anyone who read the examples knows: choose another (for example \
                     `openssl rand -hex 16`), or set allow_dev_admin_token = true \
                     (DRL_ALLOW_DEV_ADMIN_TOKEN=true) on a development node"
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// Insecure development defaults a node runs with, one line each: logged
/// loudly at start and counted in `drl_insecure_defaults`.
pub fn insecure_defaults(tokens: &AdminTokens) -> Vec<String> {
    tokens
        .development()
        .into_iter()
        .map(|name| {
            format!(
                "admin token {name:?} is the development token {DEV_ADMIN_TOKEN:?}: \
                 anyone can change this cluster's rules"
            )
        })
        .collect()
}

/// Compares without an early exit, so response time says nothing about
/// how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, &x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str, token: &str) -> NamedToken {
        NamedToken {
            name: name.into(),
            token: token.into(),
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(b"x", b""));
    }

    #[test]
    fn the_single_token_is_named_admin_and_named_tokens_find_their_holder() {
        let t = AdminTokens::new(Some("s1"), &[named("ci", "s2")]).unwrap();
        assert_eq!(t.holder("s1"), Some("admin"));
        assert_eq!(t.holder("s2"), Some("ci"));
        assert_eq!(t.holder("s3"), None);
        assert!(AdminTokens::new(Some(""), &[]).unwrap().is_empty());
        assert_eq!(format!("{t:?}"), "[\"admin\", \"ci\"]", "no token in logs");
    }

    #[test]
    fn bad_token_lists_are_refused_with_the_reason() {
        for (single, list, says) in [
            (Some("a"), vec![named("admin", "b")], "two tokens are named"),
            (
                None,
                vec![named("x", "t"), named("y", "t")],
                "the same as another",
            ),
            (None, vec![named("", "t")], "token name"),
            (None, vec![named("a b", "t")], "token name"),
            (None, vec![named("x", "")], "is empty"),
        ] {
            let e = AdminTokens::new(single, &list).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn the_development_token_needs_an_explicit_allowance() {
        let t = AdminTokens::new(None, &[named("ops", DEV_ADMIN_TOKEN)]).unwrap();
        let e = t.check_development(false).unwrap_err().to_string();
        assert!(e.contains("allow_dev_admin_token"), "{e}");
        assert!(t.check_development(true).is_ok());
        assert_eq!(insecure_defaults(&t).len(), 1);
        let fine = AdminTokens::new(Some("0123456789abcdef"), &[]).unwrap();
        assert!(fine.check_development(false).is_ok());
        assert!(insecure_defaults(&fine).is_empty());
    }
}
