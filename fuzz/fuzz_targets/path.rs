//! Fuzz target for agent path normalisation (`src/route/path.rs`, security issue 12).
//!
//! Input layout: byte 0 picks a route (inbound prefix, upstream prefix) from `ROUTES`; the rest,
//! read as UTF-8 (lossily), is a path or the part after the prefix.
//!
//! Checked, beyond "no panic":
//! - `normalize` agrees with a plain segment-list reading of RFC 3986 §5.2.4 written below (with
//!   `%2e` as `.`), and refuses exactly the paths a separate byte scan finds `%2f`, `\`, `%5c`,
//!   NUL or a missing leading `/` in;
//! - its output starts with `/`, holds no dot segment (raw or encoded), and normalising it again
//!   borrows and changes nothing (idempotent); a path without dot segments is borrowed;
//! - a path `forward_path` accepts for a prefix is under that prefix, and once mapped onto the
//!   upstream prefix it stays under it even for an upstream that decodes every `%XX`, reads `\`
//!   as `/` and resolves dot segments itself.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;

// The proxy's own source file, compiled into this crate (see fuzz/Cargo.toml for why).
#[allow(dead_code)]
#[path = "../../src/route/path.rs"]
mod path;

use path::{PathError, forward_path, normalize, within};

/// (inbound prefix, upstream prefix), as `[[agent.routes]]` maps them.
const ROUTES: [(&str, &str); 6] = [
    ("/invocations", "/invocations"),
    ("/api/chat", "/invocations"),
    ("/api/root", "/"),
    ("/", "/base"),
    ("/a/b", "/x/y/z"),
    ("/%2e", "/dot"),
];

fuzz_target!(|input: &[u8]| {
    let (head, rest) = input.split_at(input.len().min(1));
    let (prefix, upstream) = ROUTES[usize::from(head.first().copied().unwrap_or(0)) % ROUTES.len()];
    let text = String::from_utf8_lossy(rest);

    check_normalize(&text);
    let full = format!("{prefix}{text}");
    check_normalize(&full);
    check_forward(&full, prefix, upstream);
});

fn check_normalize(p: &str) {
    let expected_error = refused(p);
    match normalize(p) {
        Err(e) => {
            assert_eq!(Some(e), expected_error, "{p:?} refused as {e:?}");
        }
        Ok(once) => {
            assert_eq!(expected_error, None, "{p:?} accepted");
            assert!(once.starts_with('/'), "{p:?} -> {once:?}");
            assert_eq!(once.as_ref(), reference(p), "{p:?}");
            assert!(
                once[1..].split('/').all(|s| !is_dot(s)),
                "{p:?} -> {once:?} keeps a dot segment"
            );
            let has_dots = p[1..].split('/').any(is_dot);
            assert_eq!(matches!(once, Cow::Owned(_)), has_dots, "{p:?} allocation");
            match normalize(&once) {
                Ok(Cow::Borrowed(twice)) => assert_eq!(twice, once.as_ref(), "{p:?}"),
                other => panic!("{p:?} -> {once:?} -> {other:?}: not idempotent"),
            }
        }
    }
}

fn check_forward(full: &str, prefix: &str, upstream: &str) {
    let Ok(fwd) = forward_path(full, prefix) else {
        return;
    };
    assert!(within(&fwd, prefix), "{full:?} -> {fwd:?} left {prefix}");
    // The mapping of `Proxy::upstream_uri`.
    let rest = if prefix == "/" { fwd.as_ref() } else { &fwd[prefix.len()..] };
    let mapped = if upstream == "/" && !rest.is_empty() { "" } else { upstream };
    let sent = format!("{mapped}{rest}");
    let sent = if sent.is_empty() { "/".to_owned() } else { sent };
    let seen = lenient_upstream(&sent);
    assert!(
        within(&seen, upstream),
        "{full:?} -> {sent:?}, read by a lenient upstream as {seen:?}, left {upstream}"
    );
}

/// A dot segment, each dot raw or `%2e` / `%2E`.
fn is_dot(seg: &str) -> bool {
    let decoded = seg.replace("%2e", ".").replace("%2E", ".");
    decoded == "." || decoded == ".."
}

/// Why `normalize` must refuse `p`, by a scan independent of the one it uses.
fn refused(p: &str) -> Option<PathError> {
    if !p.starts_with('/') {
        return Some(PathError::NotAbsolute);
    }
    let b = p.as_bytes();
    for i in 0..b.len() {
        let (byte, encoded) = match (b[i], hex_at(b, i + 1), hex_at(b, i + 2)) {
            (b'%', Some(h), Some(l)) => (h * 16 + l, true),
            (c, _, _) => (c, false),
        };
        match (byte, encoded) {
            (0, _) => return Some(PathError::Nul),
            (b'\\', _) => return Some(PathError::Backslash),
            (b'/', true) => return Some(PathError::EncodedSlash),
            _ => {}
        }
    }
    None
}

/// The value of the hex digit at `b[i]`.
fn hex_at(b: &[u8], i: usize) -> Option<u8> {
    b.get(i).and_then(|&c| char::from(c).to_digit(16)).map(|d| d as u8)
}

/// RFC 3986 §5.2.4 on a list of segments, `%2e` read as `.`.
fn reference(p: &str) -> String {
    resolve(p[1..].split('/').collect(), is_dot, |s| {
        s.replace("%2e", ".").replace("%2E", ".") == ".."
    })
}

fn resolve(segs: Vec<&str>, dot: impl Fn(&str) -> bool, dotdot: impl Fn(&str) -> bool) -> String {
    let mut out: Vec<&str> = Vec::new();
    let last = segs.len().saturating_sub(1);
    for (i, s) in segs.iter().enumerate() {
        if dot(s) {
            if dotdot(s) {
                out.pop();
            }
            if i == last {
                out.push("");
            }
        } else {
            out.push(s);
        }
    }
    format!("/{}", out.join("/"))
}

/// What an upstream that decodes every `%XX` (once), reads `\` as `/` and then resolves dot
/// segments would make of `sent`.
fn lenient_upstream(sent: &str) -> String {
    let mut bytes = Vec::with_capacity(sent.len());
    let b = sent.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if let (b'%', Some(h), Some(l)) = (b[i], hex_at(b, i + 1), hex_at(b, i + 2)) {
            bytes.push(h * 16 + l);
            i += 3;
            continue;
        }
        bytes.push(b[i]);
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&bytes).replace('\\', "/");
    resolve(
        decoded[1..].split('/').collect(),
        |s| s == "." || s == "..",
        |s| s == "..",
    )
}
