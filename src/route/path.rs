//! Normalisation of an inbound request path before it is routed and forwarded (security issue 12).
//!
//! [`normalize`] removes dot segments as RFC 3986 §5.2.4 does, with a percent-encoded dot
//! (`%2e` / `%2E`) taken for a dot, so that `/a/%2e%2E/b` is `/b` here just as it is for an
//! upstream that decodes before it resolves. It refuses what has no safe meaning in a path the
//! proxy forwards: an encoded slash (`%2f`), a backslash (raw or `%5c`, a separator for some
//! servers), NUL (raw or `%00`), and a path that does not start with `/`. Empty segments (`//`)
//! are kept, as RFC 3986 keeps them; no other percent-encoding is touched.
//!
//! [`within`] is the segment-aware prefix test and [`forward_path`] the two together: the path the
//! proxy may forward for a route, or why not.
//!
//! This file is self-contained (no crate imports) because the fuzz target compiles it by `#[path]`
//! (see fuzz/Cargo.toml). It is written by hand: the `url` crate normalises dot segments only
//! while parsing a whole URL, allocates for every path and does not treat `%2e` as `.`.

use std::borrow::Cow;
use std::fmt;

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Does not start with `/` (e.g. the `*` of `OPTIONS *`).
    NotAbsolute,
    /// `%2f`: a slash that some servers decode into a separator.
    EncodedSlash,
    /// `\` or `%5c`.
    Backslash,
    /// NUL, raw or `%00`.
    Nul,
    /// The normalised path is no longer under the route's prefix.
    LeavesPrefix,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAbsolute => "the path does not start with '/'",
            Self::EncodedSlash => "the path contains an encoded '/' (%2f)",
            Self::Backslash => "the path contains a backslash ('\\' or %5c)",
            Self::Nul => "the path contains NUL (%00)",
            Self::LeavesPrefix => "the path leaves its route once dot segments are resolved",
        })
    }
}

impl std::error::Error for PathError {}

/// A dot segment: `.` or `..`, each dot raw or percent-encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dot {
    One,
    Two,
}

/// Whether `seg` is a dot segment (`.`, `%2e`, `..`, `.%2E`, `%2e%2e`, …).
fn dot_segment(seg: &[u8]) -> Option<Dot> {
    let mut dots = 0usize;
    let mut i = 0;
    while i < seg.len() {
        if seg[i] == b'.' {
            i += 1;
        } else if seg[i] == b'%'
            && seg.get(i + 1) == Some(&b'2')
            && matches!(seg.get(i + 2), Some(b'e' | b'E'))
        {
            i += 3;
        } else {
            return None;
        }
        dots += 1;
        if dots > 2 {
            return None;
        }
    }
    match dots {
        1 => Some(Dot::One),
        2 => Some(Dot::Two),
        _ => None,
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Refuses the bytes (raw or percent-encoded) that [`normalize`] never lets through.
fn check_bytes(path: &[u8]) -> Result<(), PathError> {
    for (i, &b) in path.iter().enumerate() {
        let decoded = match b {
            b'%' => match (
                path.get(i + 1).and_then(|&h| hex(h)),
                path.get(i + 2).and_then(|&l| hex(l)),
            ) {
                (Some(h), Some(l)) => h << 4 | l,
                _ => continue,
            },
            other => other,
        };
        match decoded {
            0 => return Err(PathError::Nul),
            b'\\' => return Err(PathError::Backslash),
            b'/' if b == b'%' => return Err(PathError::EncodedSlash),
            _ => {}
        }
    }
    Ok(())
}

/// `path` with its dot segments removed (RFC 3986 §5.2.4, `%2e` counted as `.`), or why it is
/// refused. Borrows when there is nothing to remove: a path without dot segments costs one scan
/// and no allocation.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    check_bytes(path.as_bytes())?;
    // The segments after the leading '/'.
    let segments = || path[1..].split('/');
    if !segments().any(|s| dot_segment(s.as_bytes()).is_some()) {
        return Ok(Cow::Borrowed(path));
    }
    // The output is always "" or ("/" segment)+: removing the last segment is truncating at
    // the last '/'.
    let mut out = String::with_capacity(path.len());
    let mut trailing_slash = false;
    for seg in segments() {
        trailing_slash = false;
        match dot_segment(seg.as_bytes()) {
            Some(Dot::One) => trailing_slash = true,
            Some(Dot::Two) => {
                let cut = out.rfind('/').unwrap_or(0);
                out.truncate(cut);
                trailing_slash = true;
            }
            None => {
                out.push('/');
                out.push_str(seg);
            }
        }
    }
    // "/a/." and "/a/.." name a directory: RFC 3986 keeps the slash ("/a/", "/").
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// Segment-aware prefix test: `/a` is a prefix of `/a` and `/a/b`, not of `/ab`; `/` of every
/// absolute path.
pub fn within(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The normalised `path`, if it is acceptable and still under `prefix`.
pub fn forward_path<'p>(path: &'p str, prefix: &str) -> Result<Cow<'p, str>, PathError> {
    let normal = normalize(path)?;
    if within(&normal, prefix) {
        Ok(normal)
    } else {
        Err(PathError::LeavesPrefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn rfc3986_examples_and_encoded_dots() {
        for (input, want) in [
            ("/", "/"),
            ("/invocations", "/invocations"),
            ("/a/b/c/./../../g", "/a/g"),
            ("/mid/content=5/../6", "/mid/6"),
            ("/a/./b", "/a/b"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
            ("/.", "/"),
            ("/../../x", "/x"),
            ("/a//b", "/a//b"),
            ("/a//../b", "/a/b"),
            ("/a/%2e%2e/b", "/b"),
            ("/a/%2E%2e/b", "/b"),
            ("/a/.%2e/b", "/b"),
            ("/a/%2e./b", "/b"),
            ("/a/%2e/b", "/a/b"),
            ("/a/.../b", "/a/.../b"),
            ("/a/%2e%2e%2e/b", "/a/%2e%2e%2e/b"),
            ("/a/..x/b", "/a/..x/b"),
            ("/a/b%2e/c", "/a/b%2e/c"),
            (
                "/invocations/../../../api/2.0/secrets/list",
                "/api/2.0/secrets/list",
            ),
        ] {
            assert_eq!(n(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refusals() {
        for (input, want) in [
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("a/b", PathError::NotAbsolute),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%2F..%2Fb", PathError::EncodedSlash),
            ("/a\\b", PathError::Backslash),
            ("/a%5cb", PathError::Backslash),
            ("/a%5C..", PathError::Backslash),
            ("/a%00", PathError::Nul),
            ("/a\0", PathError::Nul),
        ] {
            assert_eq!(n(input), Err(want), "{input:?}");
        }
        // A bad byte in a segment that would be removed is still refused.
        assert_eq!(n("/a%2fb/../c"), Err(PathError::EncodedSlash));
        // Stray '%' that encode nothing are left alone.
        assert_eq!(n("/a%/b%2").as_deref(), Ok("/a%/b%2"));
    }

    #[test]
    fn plain_paths_are_borrowed() {
        for p in [
            "/",
            "/invocations",
            "/api/chat/x.y/z",
            "/a//b",
            "/a%20b",
            "/a/..b",
        ] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(b)) if b == p),
                "{p}"
            );
        }
    }

    #[test]
    fn forwarding_stays_under_the_prefix() {
        assert_eq!(
            forward_path("/invocations/a/../b", "/invocations").as_deref(),
            Ok("/invocations/b")
        );
        assert_eq!(
            forward_path("/invocations/..", "/invocations"),
            Err(PathError::LeavesPrefix)
        );
        assert_eq!(
            forward_path("/invocations/%2e%2e/invocationsx", "/invocations"),
            Err(PathError::LeavesPrefix)
        );
        assert_eq!(forward_path("/x/../..", "/").as_deref(), Ok("/"));
        assert!(within("/a/b", "/a") && within("/a", "/a") && !within("/ab", "/a"));
    }

    /// Reference: the segment-list reading of RFC 3986 §5.2.4, with `%2e` decoded first.
    fn reference(path: &str) -> String {
        let segs: Vec<&str> = path[1..].split('/').collect();
        let mut out: Vec<&str> = Vec::new();
        let last = segs.len() - 1;
        for (i, s) in segs.iter().enumerate() {
            let decoded = s.replace("%2e", ".").replace("%2E", ".");
            match decoded.as_str() {
                "." | ".." => {
                    if decoded == ".." {
                        out.pop();
                    }
                    if i == last {
                        out.push("");
                    }
                }
                _ => out.push(s),
            }
        }
        format!("/{}", out.join("/"))
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        let seg = prop_oneof![
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%2e".to_owned()),
            Just("%2E%2e".to_owned()),
            Just(".%2e".to_owned()),
            Just("".to_owned()),
            Just("...".to_owned()),
            "[a-z%.0-9]{1,4}",
        ];
        prop::collection::vec(seg, 0..8).prop_map(|segs| format!("/{}", segs.join("/")))
    }

    proptest! {
        #[test]
        fn matches_the_reference_and_is_idempotent(p in path_strategy()) {
            match normalize(&p) {
                Ok(once) => {
                    prop_assert_eq!(once.as_ref(), reference(&p));
                    prop_assert!(once.starts_with('/'));
                    let twice = normalize(&once);
                    prop_assert!(matches!(twice, Ok(Cow::Borrowed(_))));
                    let twice = twice.map(Cow::into_owned);
                    prop_assert_eq!(twice.as_deref(), Ok(once.as_ref()));
                    prop_assert!(once[1..].split('/').all(|s| dot_segment(s.as_bytes()).is_none()));
                }
                Err(e) => prop_assert!(matches!(e, PathError::EncodedSlash | PathError::Backslash | PathError::Nul)),
            }
        }

        #[test]
        fn a_forwarded_path_never_leaves_its_prefix(
            prefix in prop::collection::vec("[a-z]{1,3}", 1..3),
            rest in path_strategy(),
        ) {
            let prefix = format!("/{}", prefix.join("/"));
            let path = format!("{prefix}{rest}");
            if let Ok(fwd) = forward_path(&path, &prefix) {
                prop_assert!(within(&fwd, &prefix));
                let again = normalize(&fwd).map(Cow::into_owned);
                prop_assert_eq!(again.as_deref(), Ok(fwd.as_ref()));
            }
        }

        #[test]
        fn arbitrary_strings_never_panic(p in "\\PC{0,40}") {
            if let Ok(once) = normalize(&p) {
                let again = normalize(&once).map(Cow::into_owned);
                prop_assert_eq!(again.as_deref(), Ok(once.as_ref()));
            }
        }
    }
}
