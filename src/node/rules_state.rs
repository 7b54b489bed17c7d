//! The rules in force, kept on local disk so that a restarted node runs the
//! cluster's current rules and not its configuration file's older ones.
//!
//! The file keeps a version's counter and origin; its digest is the
//! text's, computed again at load.
//!
//! Every time a node puts rules in force (through the admin API, from a
//! peer, or from its rules file) it writes them here, with their version,
//! durably (temporary file, fsync, rename, directory fsync). At start it
//! runs the newer of this file and its configured rules file; its peers'
//! rules, if newer still, are adopted before it reports ready (the recovery
//! gate waits for them).
//!
//! # Format (version 1)
//!
//! ```text
//! drl-rules-state 1
//! version <counter> <origin slot>
//! length <bytes of text>
//! checksum <SipHash-1-3 of "<counter> <origin>\n" and the text, 16 hex digits>
//!
//! <the rules text, exactly>
//! ```

use std::path::{Path, PathBuf};

use drl_core::key::stable_digest;

use super::RulesVersion;

fn checksum(version: RulesVersion, text: &str) -> u64 {
    let mut bytes = format!("{} {}\n", version.counter, version.origin).into_bytes();
    bytes.extend_from_slice(text.as_bytes());
    stable_digest(&bytes)
}

const HEADER: &str = "drl-rules-state 1";

/// Rules as kept on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistedRules {
    /// The rules' place in the cluster's order (its digest is the text's).
    pub version: RulesVersion,
    /// The rules file, as TOML, exactly as put in force.
    pub text: String,
}

/// Why a rules state file was refused. It is moved aside; nothing else
/// changes.
#[derive(Debug, thiserror::Error)]
pub enum RulesStateError {
    /// The file exists but could not be read (a missing file is no error:
    /// there is nothing to resume).
    #[error("reading {path}: {source}")]
    Read {
        /// The state file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// Not UTF-8, no blank line after the header, or a first line other
    /// than `drl-rules-state 1`.
    #[error("{path}: not a rules state file of version 1")]
    Header {
        /// The state file.
        path: PathBuf,
    },
    /// A header line missing or malformed.
    #[error("{path}: malformed {field} line")]
    Field {
        /// The state file.
        path: PathBuf,
        /// Which line: `version`, `length`, `checksum` or `header end`.
        field: &'static str,
    },
    /// The text is not `length` bytes long: a torn or appended write.
    #[error("{path}: truncated or extended (length does not match)")]
    Length {
        /// The state file.
        path: PathBuf,
    },
    /// The text or version does not match the checksum.
    #[error("{path}: checksum does not match the rules text")]
    Checksum {
        /// The state file.
        path: PathBuf,
    },
}

impl PersistedRules {
    /// The state file's bytes (format above).
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{HEADER}\nversion {} {}\nlength {}\nchecksum {:016x}\n\n{}",
            self.version.counter,
            self.version.origin,
            self.text.len(),
            checksum(self.version, &self.text),
            self.text
        )
        .into_bytes()
    }

    /// Parses and verifies a state file's bytes.
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<PersistedRules, RulesStateError> {
        let field = |field| RulesStateError::Field {
            path: path.to_owned(),
            field,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| RulesStateError::Header {
            path: path.to_owned(),
        })?;
        let (head, body) = text.split_once("\n\n").ok_or(RulesStateError::Header {
            path: path.to_owned(),
        })?;
        let mut lines = head.lines();
        if lines.next() != Some(HEADER) {
            return Err(RulesStateError::Header {
                path: path.to_owned(),
            });
        }
        let version = lines
            .next()
            .and_then(|l| l.strip_prefix("version "))
            .and_then(|v| v.split_once(' '))
            .and_then(|(c, o)| Some((c.parse::<u64>().ok()?, o.parse::<u16>().ok()?)))
            .ok_or_else(|| field("version"))?;
        let length: usize = lines
            .next()
            .and_then(|l| l.strip_prefix("length "))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| field("length"))?;
        let sum = lines
            .next()
            .and_then(|l| l.strip_prefix("checksum "))
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(|| field("checksum"))?;
        if lines.next().is_some() {
            return Err(field("header end"));
        }
        if body.len() != length {
            return Err(RulesStateError::Length {
                path: path.to_owned(),
            });
        }
        // The digest is the text's: the file need not carry it.
        let version = RulesVersion::of_text(version.0, version.1, body);
        if checksum(version, body) != sum {
            return Err(RulesStateError::Checksum {
                path: path.to_owned(),
            });
        }
        Ok(PersistedRules {
            version,
            text: body.to_owned(),
        })
    }

    /// The state at `path`: `Ok(None)` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<PersistedRules>, RulesStateError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::decode(path, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RulesStateError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the state durably: after a crash at any moment the file holds
    /// either the previous rules or these, whole.
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        super::files::write_durably(path, &self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PersistedRules {
        let text = "[[rules]]\nname = \"a\"\n\n# two blank lines above\n";
        PersistedRules {
            version: RulesVersion::of_text(7, 2, text),
            text: text.into(),
        }
    }

    #[test]
    fn round_trips_exactly() {
        let p = sample();
        assert_eq!(
            PersistedRules::decode(Path::new("x"), &p.encode()).unwrap(),
            p
        );
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let bytes = sample().encode();
        for at in 0..bytes.len() {
            let mut b = bytes.clone();
            b[at] ^= 0x01;
            // A flip may still parse only if it leaves every field and the
            // checksum consistent, which one flip cannot.
            assert!(
                PersistedRules::decode(Path::new("x"), &b).is_err(),
                "byte {at}"
            );
        }
        assert!(PersistedRules::decode(Path::new("x"), &bytes[..bytes.len() - 1]).is_err());
    }
}
