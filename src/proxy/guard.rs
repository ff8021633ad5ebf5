//! The cross-site stance of agent routes (security issue 12): the same as the feedback API's.
//!
//! A chat request is forwarded with the app's own credential and the signed-in user's identity,
//! so a page on another site must not be able to make the victim's browser send one. Before
//! anything is forwarded:
//!
//! - `Sec-Fetch-Site: cross-site` is refused (403), unless the request's `Origin` is listed in
//!   `feedback.cors_origins` (a front end the operator runs elsewhere);
//! - an `Origin` that is present is refused (403) unless it is the app's own origin or listed in
//!   `feedback.cors_origins`. "Own" means the origin's host and port are those the request was
//!   sent to: the `Host` header (or the HTTP/2 `:authority`), and with
//!   `identity.trust_forwarded_headers` also the platform's `x-forwarded-host`. The scheme is
//!   not compared: TLS ends at the platform, so the proxy cannot know which scheme the browser
//!   used, and a page with the same host and port differing only in scheme is served by the
//!   same party (on Databricks Apps only `https` is served at all). A browser cannot forge
//!   either header: it sets `Host` to the site it sends to and `Origin` to the page's origin;
//!   `x-forwarded-host` is a non-safelisted header that a cross-site page cannot set without a
//!   CORS preflight;
//! - `POST` needs a JSON `content-type` (`application/json` or `application/*+json`), 415
//!   otherwise. A cross-site form or `text/plain` fetch cannot send one without a CORS preflight,
//!   which agent routes never grant (OPTIONS is not an agent method). Browsers without
//!   `Sec-Fetch-Site` and `Origin` are still stopped by this rule.
//!
//! The proxy still drops `Origin` towards the agent (CONTRACT §3): the decision is made here.

use http::header::{HOST, ORIGIN};
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use crate::error::Error;

const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What the check needs from the configuration.
#[derive(Clone, Copy)]
pub struct Stance<'a> {
    /// `feedback.cors_origins`.
    pub cors_origins: &'a [HeaderValue],
    /// `identity.trust_forwarded_headers`: read `x-forwarded-host` as an own host too.
    pub trust_forwarded_host: bool,
}

/// Refuses a cross-site or non-JSON agent request; `Ok` means it may be forwarded.
pub fn check(
    stance: Stance<'_>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), Error> {
    let origin = headers.get(ORIGIN);
    let listed = origin.is_some_and(|o| {
        stance
            .cors_origins
            .iter()
            .any(|c| c.as_bytes().eq_ignore_ascii_case(o.as_bytes()))
    });
    if !listed {
        let cross_site = headers
            .get(SEC_FETCH_SITE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
        if cross_site {
            return Err(Error::Forbidden(
                "cross-site requests to the agent are not allowed (Sec-Fetch-Site: cross-site; see feedback.cors_origins)".into(),
            ));
        }
        if let Some(origin) = origin {
            if !own_origin(origin, uri, headers, stance.trust_forwarded_host) {
                return Err(Error::Forbidden(format!(
                    "requests to the agent from origin {} are not allowed (see feedback.cors_origins)",
                    String::from_utf8_lossy(origin.as_bytes())
                )));
            }
        }
    }
    if *method == Method::POST && !super::is_json(headers) {
        return Err(Error::UnsupportedMediaType);
    }
    Ok(())
}

/// Whether `origin` (`scheme://host[:port]`) names the host and port this request was sent to.
fn own_origin(origin: &HeaderValue, uri: &Uri, headers: &HeaderMap, trust_forwarded: bool) -> bool {
    let Some((host, port)) = origin.to_str().ok().and_then(parse_origin) else {
        // "null" (sandboxed frames, some redirects) and anything unparsable.
        return false;
    };
    let matches = |authority: &str| {
        authority.parse::<Authority>().is_ok_and(|a| {
            a.host().eq_ignore_ascii_case(host) && a.port_u16().is_none_or(|p| p == port)
                // Without a port the Host names the scheme's default one.
                && (a.port_u16().is_some() || port == 80 || port == 443)
        })
    };
    let host_header = headers.get(HOST).and_then(|h| h.to_str().ok());
    if host_header.is_some_and(matches) || uri.authority().is_some_and(|a| matches(a.as_str())) {
        return true;
    }
    trust_forwarded
        && headers
            .get(X_FORWARDED_HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.split(',').next())
            .is_some_and(|h| matches(h.trim()))
}

/// The host and effective port of a serialised origin.
fn parse_origin(origin: &str) -> Option<(&str, u16)> {
    let (scheme, rest) = origin.split_once("://")?;
    let default = if scheme.eq_ignore_ascii_case("https") {
        443
    } else if scheme.eq_ignore_ascii_case("http") {
        80
    } else {
        return None;
    };
    if rest.contains(['/', '@', '?', '#']) {
        return None;
    }
    let authority: Authority = rest.parse().ok()?;
    let port = authority.port_u16().unwrap_or(default);
    // Borrow the host from `origin` itself (the parsed authority is a copy).
    let host_len = authority.host().len();
    Some((&rest[..host_len], port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn run(pairs: &[(&str, &str)], trust: bool) -> u16 {
        let listed = [HeaderValue::from_static("https://ui.example")];
        let stance = Stance {
            cors_origins: &listed,
            trust_forwarded_host: trust,
        };
        let uri: Uri = "/invocations".parse().unwrap();
        match check(stance, &Method::POST, &uri, &headers(pairs)) {
            Ok(()) => 200,
            Err(e) => e.status().as_u16(),
        }
    }

    const JSON: (&str, &str) = ("content-type", "application/json");

    #[test]
    fn origins() {
        let host = ("host", "app.example");
        assert_eq!(run(&[JSON, host], false), 200);
        assert_eq!(
            run(&[JSON, host, ("origin", "https://app.example")], false),
            200
        );
        assert_eq!(
            run(&[JSON, host, ("origin", "http://APP.example")], false),
            200
        );
        assert_eq!(
            run(&[JSON, host, ("origin", "https://app.example:443")], false),
            200
        );
        assert_eq!(
            run(&[JSON, host, ("origin", "https://app.example:8443")], false),
            403
        );
        assert_eq!(
            run(&[JSON, host, ("origin", "https://evil.example")], false),
            403
        );
        assert_eq!(run(&[JSON, host, ("origin", "null")], false), 403);
        assert_eq!(
            run(&[JSON, host, ("origin", "https://app.example.evil")], false),
            403
        );
        assert_eq!(
            run(&[JSON, host, ("origin", "https://ui.example")], false),
            200
        );
        let local = ("host", "127.0.0.1:8000");
        assert_eq!(
            run(&[JSON, local, ("origin", "http://127.0.0.1:8000")], false),
            200
        );
        assert_eq!(
            run(&[JSON, local, ("origin", "http://127.0.0.1:8001")], false),
            403
        );
        assert_eq!(
            run(&[JSON, local, ("origin", "http://127.0.0.1")], false),
            403
        );
        // The platform's forwarded host counts only when forwarded headers are trusted.
        let fwd = ("x-forwarded-host", "app.example");
        let o = ("origin", "https://app.example");
        assert_eq!(run(&[JSON, local, fwd, o], false), 403);
        assert_eq!(run(&[JSON, local, fwd, o], true), 200);
    }

    #[test]
    fn fetch_metadata_and_content_type() {
        let host = ("host", "app.example");
        let xs = ("sec-fetch-site", "cross-site");
        assert_eq!(run(&[JSON, host, xs], false), 403);
        assert_eq!(
            run(&[JSON, host, ("sec-fetch-site", "same-origin")], false),
            200
        );
        assert_eq!(
            run(&[JSON, host, xs, ("origin", "https://ui.example")], false),
            200
        );
        assert_eq!(run(&[host, ("content-type", "text/plain")], false), 415);
        assert_eq!(
            run(
                &[host, ("content-type", "application/x-www-form-urlencoded")],
                false
            ),
            415
        );
        assert_eq!(
            run(
                &[host, ("content-type", "multipart/form-data; boundary=x")],
                false
            ),
            415
        );
        assert_eq!(run(&[host], false), 415);
        assert_eq!(
            run(
                &[host, ("content-type", "application/json; charset=utf-8")],
                false
            ),
            200
        );
        assert_eq!(
            run(&[host, ("content-type", "application/vnd.x+json")], false),
            200
        );
    }
}
