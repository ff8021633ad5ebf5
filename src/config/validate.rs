//! The checks every section shares: [`ConfigError`] (every problem, each naming its key), the
//! [`Validator`] that collects them while typed values are built (durations, sizes, addresses,
//! URLs), and small predicates (identifiers, assessment names, path prefixes).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use url::Url;

use super::raw::RawSize;
use super::redact::redact_url_text;

/// A configuration problem, naming the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub(super) problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Problem {
    pub(super) key: String,
    pub(super) message: String,
}

impl ConfigError {
    pub(super) fn one(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                key: key.into(),
                message: message.into(),
            }],
        }
    }

    /// The keys that have problems, in the order found.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.problems.iter().map(|p| p.key.as_str())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if p.key.is_empty() {
                f.write_str(&p.message)?;
            } else {
                write!(f, "{}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Collects problems while building typed values, so that one run reports all of them.
#[derive(Default)]
pub(super) struct Validator {
    pub(super) problems: Vec<Problem>,
}

/// Segment-aware prefix test: `/a` is a prefix of `/a` and `/a/b`, not of `/ab`.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

pub(super) fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// Assessment names we accept in config (and therefore on the wire).
pub fn valid_assessment_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
}

/// serde's messages list every expected field in backticks; keep them but call it a key.
pub(super) fn clean_serde_message(msg: &str) -> String {
    // toml appends "\nin `table`"; the key path already says where.
    let msg = msg.lines().next().unwrap_or_default();
    let msg = msg.replace("unknown field", "unknown key");
    // The path is already printed as the key; drop serde's trailing position info if any.
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg,
    }
}

impl Validator {
    pub(super) fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn finish(self) -> Result<(), ConfigError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        }
    }

    pub(super) fn duration(&mut self, key: &str, text: Option<&str>, default: &str) -> Duration {
        let text = text.unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(d) => d,
            Err(e) => {
                self.problem(
                    key,
                    format!(
                        "invalid duration \"{text}\" ({e}; examples: \"500ms\", \"10s\", \"15m\")"
                    ),
                );
                humantime::parse_duration(default).unwrap_or_default()
            }
        }
    }

    pub(super) fn size(&mut self, key: &str, raw: Option<RawSize>, default: u64) -> usize {
        let bytes = match raw {
            None => default,
            Some(RawSize::Bytes(n)) => n,
            Some(RawSize::Text(t)) => match t.trim().parse::<bytesize::ByteSize>() {
                Ok(b) => b.as_u64(),
                Err(e) => {
                    self.problem(
                        key,
                        format!("invalid size \"{t}\" ({e}; examples: 4096, \"64KiB\", \"1MiB\")"),
                    );
                    default
                }
            },
        };
        if bytes == 0 {
            self.problem(key, "must be greater than zero");
        }
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    pub(super) fn addr(&mut self, key: &str, text: &str) -> SocketAddr {
        match text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.problem(
                    key,
                    format!(
                        "invalid address \"{text}\" (expected IP:PORT, e.g. \"127.0.0.1:8000\")"
                    ),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    /// An http(s) base URL. Without a path, or with one (kept as a base path).
    pub(super) fn http_url(&mut self, key: &str, text: &str) -> Option<Url> {
        match Url::parse(text) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                if u.query().is_some() || u.fragment().is_some() {
                    self.problem(
                        key,
                        format!(
                            "URL \"{}\" must not have a query or fragment",
                            redact_url_text(text)
                        ),
                    );
                    return None;
                }
                if !u.username().is_empty() || u.password().is_some() {
                    self.problem(
                        key,
                        "URL must not embed credentials (use the auth setting)".to_owned(),
                    );
                    return None;
                }
                Some(u)
            }
            Ok(_) => {
                self.problem(
                    key,
                    format!(
                        "invalid URL \"{}\" (expected http:// or https:// with a host)",
                        redact_url_text(text)
                    ),
                );
                None
            }
            Err(e) => {
                self.problem(
                    key,
                    format!("invalid URL \"{}\" ({e})", redact_url_text(text)),
                );
                None
            }
        }
    }

    /// A workspace host, as `DATABRICKS_HOST` gives it: with or without a scheme.
    pub(super) fn host_url(&mut self, key: &str, text: &str) -> Option<Url> {
        let trimmed = text.trim().trim_end_matches('/');
        let with_scheme = if trimmed.contains("://") {
            trimmed.to_owned()
        } else {
            format!("https://{trimmed}")
        };
        self.http_url(key, &with_scheme)
    }

    pub(super) fn positive_duration(
        &mut self,
        key: &str,
        text: Option<&str>,
        default: &str,
    ) -> Duration {
        let d = self.duration(key, text, default);
        if d.is_zero() {
            self.problem(key, "must be greater than zero");
        }
        d
    }
}
