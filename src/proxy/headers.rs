//! Header rules of the forwarding path, in one place: what never reaches the agent (hop-by-hop,
//! credentials and identity a browser could spoof, what the proxy sets itself, underscore
//! names), what of the agent's answer never reaches the browser (cookies, CORS, HSTS, identity
//! and proxy-owned headers, unless `agent.pass_response_headers` allows them), what the
//! platform's headers become on the way out (the user's own token for on-behalf-of-user calls;
//! the identity headers for the chat app template's server), the proxy's own header names, and
//! media-type tests.
//!
//! The user's token (`x-forwarded-access-token`) is read only when forwarded headers are trusted
//! (it is the platform's, never a browser's), is marked sensitive so that no header dump shows
//! it, and goes to the agent hop alone: the MLflow client never sees request headers.

use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST,
    HeaderMap, HeaderName, ORIGIN, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, SET_COOKIE,
    STRICT_TRANSPORT_SECURITY, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

use http::HeaderValue;

use crate::identity::{APP_USER_EMAIL, FORWARDED_ACCESS_TOKEN, IDENTITY_HEADERS};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_MESSAGE_ID: HeaderName = HeaderName::from_static("x-message-id");
pub const X_CHAT_ID: HeaderName = HeaderName::from_static("x-chat-id");
pub const X_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-client-request-id");
pub(super) const X_MLFLOW_RETURN_TRACE_ID: HeaderName =
    HeaderName::from_static("x-mlflow-return-trace-id");
pub(super) const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");
pub(super) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub(super) const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the usual non-standard ones), never forwarded.
pub(super) static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Inbound headers that never reach the agent: credentials and identity a browser could spoof,
/// plus the ones the proxy sets itself (set once, never appended beside a client copy).
///
/// `static`, as the other name lists here: a `const` array of names is built and dropped at
/// every use, and these are tested against every header of every request.
pub(super) static DROPPED_INBOUND: [HeaderName; 10] = [
    HOST,
    AUTHORIZATION,
    COOKIE,
    ORIGIN,
    APP_USER_EMAIL,
    FORWARDED_ACCESS_TOKEN,
    X_MLFLOW_RETURN_TRACE_ID,
    X_CLIENT_REQUEST_ID,
    X_REQUEST_ID,
    ACCEPT_ENCODING,
];

/// The signed-in user's own token as the platform forwarded it: only when forwarded headers are
/// trusted, exactly one value of visible ASCII (a token never has spaces or controls), else
/// none. The copy is marked sensitive.
pub(super) fn platform_user_token(headers: &HeaderMap, trusted: bool) -> Option<HeaderValue> {
    if !trusted {
        return None;
    }
    let mut all = headers.get_all(FORWARDED_ACCESS_TOKEN).iter();
    let v = all.next()?;
    if all.next().is_some() || v.is_empty() || !v.as_bytes().iter().all(u8::is_ascii_graphic) {
        return None;
    }
    let mut v = v.clone();
    v.set_sensitive(true);
    Some(v)
}

/// `Bearer <token>` for the agent hop, marked sensitive.
pub(super) fn bearer(token: &HeaderValue) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_bytes(&[b"Bearer ", token.as_bytes()].concat()).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Towards the chat app template's server (an `ai-sdk-app` route, the same app's trusted
/// backend), who is calling, in the platform's own headers, which the template reads
/// (`X-Forwarded-User` / `-Email` / `-Preferred-Username`). When forwarded headers are trusted
/// and the platform sent them, they pass as sent (`identity::user` has already refused a
/// repeated one); otherwise (local runs, `identity.dev_user`) the proxy's resolved user stands
/// in all three, never a browser's copy. The user's token passes too when the platform sent one.
pub(super) fn set_app_identity(
    from: &HeaderMap,
    to: &mut HeaderMap,
    user: &HeaderValue,
    trusted: bool,
) {
    let platform = trusted && IDENTITY_HEADERS.iter().any(|n| from.contains_key(n));
    for name in &IDENTITY_HEADERS {
        match (platform, from.get(name)) {
            (true, Some(v)) => {
                to.insert(name.clone(), v.clone());
            }
            (true, None) => {}
            (false, _) => {
                to.insert(name.clone(), user.clone());
            }
        }
    }
    if let Some(token) = platform_user_token(from, trusted) {
        to.insert(FORWARDED_ACCESS_TOKEN, token);
    }
}

pub(super) fn header_id(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| super::request::valid_id(s))
        .map(str::to_owned)
}

pub(super) fn is_json(headers: &HeaderMap) -> bool {
    media_type(headers).is_some_and(is_json_type)
}

/// `application/json` or any `+json` type, given a media type without parameters.
pub(super) fn is_json_type(m: &str) -> bool {
    m.eq_ignore_ascii_case("application/json")
        || (m.len() > 5
            && m.is_char_boundary(m.len() - 5)
            && m[m.len() - 5..].eq_ignore_ascii_case("+json"))
}

#[cfg(test)]
pub(super) fn is_event_stream(headers: &HeaderMap) -> bool {
    media_type(headers).is_some_and(is_event_stream_type)
}

pub(super) fn is_event_stream_type(m: &str) -> bool {
    m.eq_ignore_ascii_case("text/event-stream")
}

/// The media type of `content-type`, without parameters.
pub fn media_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(CONTENT_TYPE)?
        .to_str()
        .ok()?
        .split(';')
        .next()
        .map(str::trim)
}

/// Names listed in `connection` (they are hop-by-hop too).
pub(super) fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

pub(super) fn copy_request_headers(from: &HeaderMap, to: &mut HeaderMap) {
    let listed = if from.contains_key(CONNECTION) {
        connection_listed(from)
    } else {
        Vec::new()
    };
    for (name, value) in from {
        if HOP_BY_HOP.contains(name)
            || DROPPED_INBOUND.contains(name)
            || IDENTITY_HEADERS.contains(name)
            || name == CONTENT_LENGTH
            || listed.contains(name)
            // As nginx does by default (`underscores_in_headers off`): a CGI-style server maps
            // `x_app_user_email` and `x-app-user-email` to the same variable, so an underscore
            // name could smuggle an identity header past the rules above.
            || name.as_str().contains('_')
        {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
    // Without a rewrite the original length still describes the streamed body.
    if let Some(len) = from.get(CONTENT_LENGTH) {
        to.insert(CONTENT_LENGTH, len.clone());
    }
}

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One scan of the few headers a response has, instead of nine hashed lookups: most
    // responses carry none of these.
    if !headers.keys().any(|n| HOP_BY_HOP.contains(n)) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        for name in connection_listed(headers) {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Whether an agent response header must not reach the browser. The agent is another origin
/// behind the proxy's: a cookie, CORS grant or HSTS policy it sends would be taken by the
/// browser as the proxy's own, and identity and proxy-owned headers are stated by the proxy
/// alone.
pub(super) fn agent_must_not_set(name: &HeaderName) -> bool {
    let n = name.as_str();
    *name == SET_COOKIE
        || n == "set-cookie2"
        || *name == STRICT_TRANSPORT_SECURITY
        || n.starts_with("access-control-")
        || n.starts_with("x-forwarded-")
        || *name == APP_USER_EMAIL
        || *name == X_MESSAGE_ID
        || *name == X_REQUEST_ID
}

/// Removes what [`agent_must_not_set`] names, except the names in `allow`
/// (`agent.pass_response_headers`).
pub(super) fn strip_agent_only(headers: &mut HeaderMap, allow: &[HeaderName]) {
    // `HeaderMap` has no `retain` and cannot be changed while iterated, so one name is found
    // and removed at a time. An agent sends a handful of headers and usually none of these:
    // the common case is one scan, no clone, no allocation.
    while let Some(name) = headers
        .keys()
        .find(|n| agent_must_not_set(n) && !allow.contains(n))
        .cloned()
    {
        headers.remove(&name);
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn agent_only_response_headers_are_dropped_unless_allowed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("access-control-allow-origin", "*"),
            ("access-control-allow-credentials", "true"),
            ("strict-transport-security", "max-age=0"),
            ("x-app-user-email", "someone@else"),
            ("x-forwarded-email", "someone@else"),
            ("x-message-id", "agent-chosen"),
            ("x-request-id", "agent-chosen"),
            ("content-type", "text/event-stream"),
            ("x-mlflow-trace-id", "tr-1"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let mut allowed = h.clone();
        strip_agent_only(&mut h, &[]);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-mlflow-trace-id"]);
        strip_agent_only(&mut allowed, &[SET_COOKIE]);
        assert_eq!(allowed.get_all(SET_COOKIE).iter().count(), 2);
        assert!(!allowed.contains_key("access-control-allow-origin"));
    }

    #[test]
    fn request_header_rules() {
        let mut inbound = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer user-token"),
            ("cookie", "session=1"),
            ("x-app-user-email", "attacker@x"),
            ("origin", "https://evil.example"),
            ("x-forwarded-email", "spoof@x"),
            ("x-forwarded-access-token", "user-token"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("content-type", "application/json"),
            ("content-length", "12"),
            ("host", "proxy.example"),
            ("accept", "text/event-stream"),
        ] {
            inbound.append(k, HeaderValue::from_static(v));
        }
        let mut out = HeaderMap::new();
        copy_request_headers(&inbound, &mut out);
        for gone in [
            "authorization",
            "cookie",
            "x-app-user-email",
            "origin",
            "x-forwarded-email",
            "x-forwarded-access-token",
            "connection",
            "x-secret-hop",
            "keep-alive",
            "host",
        ] {
            assert!(!out.contains_key(gone), "{gone} was forwarded");
        }
        for kept in ["traceparent", "content-type", "content-length", "accept"] {
            assert!(out.contains_key(kept), "{kept} was dropped");
        }
    }

    #[test]
    fn the_users_token_only_when_trusted_and_unambiguous() {
        let mut h = HeaderMap::new();
        h.insert(
            FORWARDED_ACCESS_TOKEN,
            HeaderValue::from_static("eyJ.user.tok"),
        );
        assert_eq!(platform_user_token(&h, false), None);
        let tok = platform_user_token(&h, true).unwrap();
        assert!(tok.is_sensitive());
        assert_eq!(bearer(&tok).unwrap(), "Bearer eyJ.user.tok");
        h.append(FORWARDED_ACCESS_TOKEN, HeaderValue::from_static("other"));
        assert_eq!(platform_user_token(&h, true), None);
        h.insert(FORWARDED_ACCESS_TOKEN, HeaderValue::from_static("a b"));
        assert_eq!(platform_user_token(&h, true), None);
    }

    #[test]
    fn the_template_learns_the_platforms_identity_or_the_resolved_user() {
        let mut from = HeaderMap::new();
        from.insert(
            "x-forwarded-email",
            HeaderValue::from_static("ada@example.com"),
        );
        from.insert("x-forwarded-user", HeaderValue::from_static("ada-id"));
        from.insert(FORWARDED_ACCESS_TOKEN, HeaderValue::from_static("tok"));
        let user = HeaderValue::from_static("ada@example.com");
        let mut to = HeaderMap::new();
        set_app_identity(&from, &mut to, &user, true);
        assert_eq!(to["x-forwarded-user"], "ada-id");
        assert_eq!(to["x-forwarded-email"], "ada@example.com");
        assert!(!to.contains_key("x-forwarded-preferred-username"));
        assert_eq!(to[FORWARDED_ACCESS_TOKEN], "tok");
        // Untrusted: the browser's copies are ignored, the resolved user stands in.
        let mut to = HeaderMap::new();
        set_app_identity(
            &from,
            &mut to,
            &HeaderValue::from_static("dev@example.com"),
            false,
        );
        for name in &IDENTITY_HEADERS {
            assert_eq!(to[name], "dev@example.com");
        }
        assert!(!to.contains_key(FORWARDED_ACCESS_TOKEN));
    }

    #[test]
    fn media_types() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        assert!(is_event_stream(&h));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/vnd.api+json"),
        );
        assert!(is_json(&h));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_json(&h) && !is_event_stream(&h));
    }
}
