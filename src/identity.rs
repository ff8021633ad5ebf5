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
pub const IDENTITY_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-forwarded-email"),
    HeaderName::from_static("x-forwarded-preferred-username"),
    HeaderName::from_static("x-forwarded-user"),
];

/// The header carrying the user's own token (only with user-scoped apps).
pub const FORWARDED_ACCESS_TOKEN: HeaderName = HeaderName::from_static("x-forwarded-access-token");

/// The header the proxy sets towards the agent; a client-supplied copy is always dropped.
pub const APP_USER_EMAIL: HeaderName = HeaderName::from_static("x-app-user-email");

/// Longest user id accepted (an e-mail address is at most 320 characters).
const MAX_USER_LEN: usize = 320;

/// The calling user's id, or 401.
pub fn user(headers: &HeaderMap, config: &IdentityConfig) -> Result<String, Error> {
    if config.trust_forwarded_headers {
        for name in &IDENTITY_HEADERS {
            if let Some(user) = headers.get(name).and_then(|v| valid_user(v.as_bytes())) {
                return Ok(user);
            }
        }
    }
    config.dev_user.clone().ok_or(Error::Unauthenticated)
}

/// A header value usable as a user id: visible ASCII or UTF-8 without control characters,
/// trimmed, non-empty, bounded.
fn valid_user(raw: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    if s.is_empty() || s.len() > MAX_USER_LEN || s.chars().any(char::is_control) {
        return None;
    }
    Some(s.to_owned())
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
    fn user_info_header_is_never_read_and_blank_values_do_not_count() {
        let h = headers(&[
            ("x-forwarded-user-info", "eve@example.com"),
            ("x-forwarded-email", "  "),
        ]);
        assert!(matches!(
            user(&h, &cfg(true, None)),
            Err(Error::Unauthenticated)
        ));
    }
}
