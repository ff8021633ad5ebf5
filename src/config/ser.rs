//! How typed values print in `check-config`'s redacted TOML (durations in words, paths and
//! header names as text).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Serializer;

pub(super) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

pub(super) fn ser_display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

pub(super) fn ser_opt_display<T: fmt::Display, S: Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

pub(super) fn ser_path<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&p.display())
}

pub(super) fn ser_opt_path<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.collect_str(&p.display()),
        None => s.serialize_none(),
    }
}

pub(super) fn ser_headers<S: Serializer>(v: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(HeaderName::as_str))
}

pub(super) fn ser_methods<S: Serializer>(v: &[http::Method], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(http::Method::as_str))
}

pub(super) fn ser_header_values<S: Serializer>(v: &[HeaderValue], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|h| h.to_str().unwrap_or("<non-ascii>")))
}
