//! Who is calling, and which inbound headers about identity are trusted, dropped or added.
//!
//! On Databricks Apps the platform sets `x-forwarded-email`, `x-forwarded-preferred-username`
//! and `x-forwarded-user`; whether it strips client-supplied copies is not confirmed, so they
//! are read only when `identity.trust_forwarded_headers` is on. `x-forwarded-user-info` is not a
//! real platform header and is never read. Locally, `identity.dev_user` may stand in; otherwise
//! a request without identity is refused (401) before anything else happens.

use http::HeaderMap;
use http::header::HeaderName;

use crate::config::IdentityConfig;
use crate::error::Error;

/// The identity headers, in order of preference.
pub static IDENTITY_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-forwarded-email"),
    HeaderName::from_static("x-forwarded-preferred-username"),
    HeaderName::from_static("x-forwarded-user"),
];

/// The header carrying the user's own token (only with user-scoped apps).
pub const FORWARDED_ACCESS_TOKEN: HeaderName = HeaderName::from_static("x-forwarded-access-token");

/// The header the proxy sets towards the agent; a client-supplied copy is always dropped.
pub const APP_USER_EMAIL: HeaderName = HeaderName::from_static("x-app-user-email");

/// Longest user id accepted, in bytes (an e-mail address is at most 254 octets in practice,
/// RFC 5321 §4.5.3.1.3).
const MAX_USER_LEN: usize = 254;

/// The calling user's id, 401 without one, or 400 for an identity header that is not exactly
/// one clean value.
///
/// In trusted mode every identity header must appear at most once and hold one value: a
/// repeated header or a comma list is ambiguous (which copy did the platform set?), so it is
/// refused rather than resolved first- or last-wins. A present but unusable value (blank,
/// whitespace, control, bidi or zero-width characters, a comma, over `MAX_USER_LEN` bytes)
/// is refused too, never skipped in favour of the next header: falling through would let
/// whoever controls one header choose which header decides.
pub fn user(headers: &HeaderMap, config: &IdentityConfig) -> Result<String, Error> {
    if config.trust_forwarded_headers {
        for name in &IDENTITY_HEADERS {
            let mut values = headers.get_all(name).iter();
            if values.next().is_some() && values.next().is_some() {
                return Err(Error::bad_request(
                    "AMBIGUOUS_IDENTITY",
                    format!("{name}: sent more than once; exactly one identity value is accepted"),
                ));
            }
        }
        for name in &IDENTITY_HEADERS {
            if let Some(v) = headers.get(name) {
                return valid_user(v.as_bytes()).map_err(|why| {
                    Error::bad_request("INVALID_IDENTITY", format!("{name}: {why}"))
                });
            }
        }
    }
    config.dev_user.clone().ok_or(Error::Unauthenticated)
}

/// Characters that change how text is displayed without being visible: bidirectional
/// embeddings, overrides, isolates and marks, and zero-width characters. A user id containing
/// one can look like another user's id in a log or an MLflow UI.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{202A}'..='\u{202E}'
        | '\u{2066}'..='\u{2069}'
        | '\u{200E}' | '\u{200F}' | '\u{061C}'
        | '\u{200B}'..='\u{200D}'
        | '\u{2060}' | '\u{FEFF}')
}

/// A header value usable as a user id: UTF-8, non-empty, at most [`MAX_USER_LEN`] bytes, one
/// value (no comma), no whitespace, control, bidi or zero-width characters. The reason
/// otherwise (it never repeats the value).
fn valid_user(raw: &[u8]) -> Result<String, &'static str> {
    if raw.is_empty() {
        return Err("empty value");
    }
    if raw.len() > MAX_USER_LEN {
        return Err("longer than 254 bytes");
    }
    let s = std::str::from_utf8(raw).map_err(|_| "not valid UTF-8")?;
    for c in s.chars() {
        if c == ',' {
            return Err("a list of values; exactly one identity value is accepted");
        }
        if c.is_whitespace() || c.is_control() {
            return Err("contains whitespace or control characters");
        }
        if is_invisible(c) {
            return Err("contains bidirectional or zero-width characters");
        }
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cfg(trust: bool, dev: Option<&str>) -> IdentityConfig {
        IdentityConfig {
            trust_forwarded_headers: trust,
            dev_user: dev.map(str::to_owned),
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn prefers_email_then_username_then_user() {
        let h = headers(&[
            ("x-forwarded-user", "123@456"),
            ("x-forwarded-preferred-username", "alice"),
            ("x-forwarded-email", "alice@example.com"),
        ]);
        assert_eq!(user(&h, &cfg(true, None)).unwrap(), "alice@example.com");
        let h = headers(&[
            ("x-forwarded-user", "123@456"),
            ("x-forwarded-preferred-username", "alice"),
        ]);
        assert_eq!(user(&h, &cfg(true, None)).unwrap(), "alice");
        let h = headers(&[("x-forwarded-user", "123@456")]);
        assert_eq!(user(&h, &cfg(true, None)).unwrap(), "123@456");
    }

    #[test]
    fn untrusted_headers_are_ignored() {
        let h = headers(&[("x-forwarded-email", "mallory@example.com")]);
        assert_eq!(
            user(&h, &cfg(false, Some("dev@example.com"))).unwrap(),
            "dev@example.com"
        );
        assert!(matches!(
            user(&h, &cfg(false, None)),
            Err(Error::Unauthenticated)
        ));
    }

    #[test]
    fn user_info_header_is_never_read_and_blank_values_are_refused() {
        let h = headers(&[("x-forwarded-user-info", "eve@example.com")]);
        assert!(matches!(
            user(&h, &cfg(true, None)),
            Err(Error::Unauthenticated)
        ));
        // A blank top-preference header is refused, not skipped in favour of the next one.
        let h = headers(&[("x-forwarded-email", "  "), ("x-forwarded-user", "bob")]);
        assert_eq!(
            user(&h, &cfg(true, None)).unwrap_err().code(),
            "INVALID_IDENTITY"
        );
        let h = headers(&[("x-forwarded-email", ""), ("x-forwarded-user", "bob")]);
        assert_eq!(
            user(&h, &cfg(true, None)).unwrap_err().code(),
            "INVALID_IDENTITY"
        );
    }

    #[test]
    fn exactly_one_clean_value_is_accepted() {
        let code = |h: &HeaderMap| user(h, &cfg(true, None)).unwrap_err().code();
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-email",
            HeaderValue::from_static("alice@example.com"),
        );
        h.append(
            "x-forwarded-email",
            HeaderValue::from_static("mallory@example.com"),
        );
        assert_eq!(code(&h), "AMBIGUOUS_IDENTITY");
        // A repeat of a lower-preference header is just as ambiguous.
        let mut h = headers(&[("x-forwarded-email", "alice@example.com")]);
        h.append("x-forwarded-user", HeaderValue::from_static("1"));
        h.append("x-forwarded-user", HeaderValue::from_static("2"));
        assert_eq!(code(&h), "AMBIGUOUS_IDENTITY");
        for bad in [
            "alice@example.com,mallory@example.com",
            "alice @example.com",
            "alice\u{202E}moc.elpmaxe@",
            "alice\u{200B}@example.com",
            "alice\u{2066}@example.com",
            "alice\u{061C}@example.com",
            "alice\u{FEFF}@example.com",
            "alice\u{00A0}@example.com",
        ] {
            let h = {
                let mut h = HeaderMap::new();
                h.insert(
                    "x-forwarded-email",
                    HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
                );
                h
            };
            assert_eq!(code(&h), "INVALID_IDENTITY", "{bad:?}");
            let msg = user(&h, &cfg(true, None)).unwrap_err().to_string();
            assert!(!msg.contains("alice"), "the value is not echoed: {msg}");
        }
        let long = format!("{}@example.com", "a".repeat(254 - 12));
        assert_eq!(long.len(), 254);
        let h = {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-email", HeaderValue::from_str(&long).unwrap());
            h
        };
        assert_eq!(user(&h, &cfg(true, None)).unwrap(), long);
        let h = {
            let mut h = HeaderMap::new();
            h.insert(
                "x-forwarded-email",
                HeaderValue::from_str(&format!("a{long}")).unwrap(),
            );
            h
        };
        assert_eq!(code(&h), "INVALID_IDENTITY");
    }
}
