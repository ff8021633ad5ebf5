//! Redaction of URLs and URL-like text before a configuration error echoes them: passwords in
//! the userinfo and credential-like query parameters become `<redacted>`.

use url::Url;

/// A URL with any password replaced, for error messages.
pub(super) fn redact_url(u: &str) -> String {
    match Url::parse(u) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("<redacted>"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

/// `text` fit to quote in an error message: a userinfo password and the values of query
/// parameters named like credentials become `<redacted>`. Written by hand rather than with
/// `url`: the text is quoted back precisely when it does not parse (a password with a raw `/`,
/// `@` or `?` is a common reason), so it is read leniently and redacts too much rather than too
/// little: everything between the first `:` after the scheme and the last `@` counts as the
/// password.
pub(super) fn redact_url_text(text: &str) -> String {
    const REDACTED: &str = "<redacted>";
    let (scheme, rest) = match text.find("://") {
        Some(i) => text.split_at(i + 3),
        None => ("", text),
    };
    let mut out = String::with_capacity(text.len() + REDACTED.len());
    out.push_str(scheme);
    let rest = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(REDACTED);
                }
                None => out.push_str(userinfo),
            }
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    let Some(q) = rest.find('?') else {
        out.push_str(rest);
        return out;
    };
    out.push_str(&rest[..=q]);
    let (query, fragment) = match rest[q + 1..].find('#') {
        Some(h) => rest[q + 1..].split_at(h),
        None => (&rest[q + 1..], ""),
    };
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((k, _)) if credential_name(k) => {
                out.push_str(k);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
    }
    out.push_str(fragment);
    out
}

/// Whether a query parameter name looks like it carries a credential.
pub(super) fn credential_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "token",
        "secret",
        "pass",
        "pwd",
        "key",
        "auth",
        "credential",
        "sig",
    ]
    .iter()
    .any(|w| n.contains(w))
}
