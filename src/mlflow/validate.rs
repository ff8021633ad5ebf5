//! Local validation of what we send to MLflow.
//!
//! The open-source server validates laxly: a wrongly typed field is silently dropped, a missing
//! source type silently becomes `SOURCE_TYPE_UNSPECIFIED`, an empty name is stored as empty
//! (sample 50 shows all three). So every field is checked here first and a bad one fails the
//! call with [`MlflowErrorKind::Invalid`](super::MlflowErrorKind::Invalid) before any byte is
//! sent. The bounds follow the server's columns (`assessment_id` 50, `source_id` 250) or, where
//! the server has none (rationale, metadata: `TEXT`), are sanity caps far above what the feedback
//! API lets through. This module does not decide which names or value kinds a deployment accepts
//! (that is `[feedback]` config).

use std::collections::BTreeMap;

use super::error::MlflowError;
use crate::config::valid_assessment_name;
use crate::domain::FeedbackValue;

/// The server's `assessment_id` column is 50 characters.
pub const MAX_ASSESSMENT_ID_CHARS: usize = 50;
/// The server's `source_id` column is 250 characters.
pub const MAX_SOURCE_ID_CHARS: usize = 250;
/// Trace ids are opaque, but `tr-` + 32 hex or `trace:/catalog.schema/hex` are far shorter.
pub const MAX_TRACE_ID_CHARS: usize = 256;
/// Client request ids and experiment ids: opaque, short in practice.
pub const MAX_ID_CHARS: usize = 256;
pub const MAX_RATIONALE_BYTES: usize = 64 * 1024;
pub const MAX_STRING_VALUE_BYTES: usize = 16 * 1024;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY_CHARS: usize = 250;
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// An assessment name: 1–64 characters of letters, digits, `_`, `-`, `.` or space (the same
/// rule as `[feedback] names` in config, so that config and wire never disagree).
pub fn name(name: &str) -> Result<(), MlflowError> {
    if valid_assessment_name(name) {
        Ok(())
    } else {
        Err(MlflowError::invalid(format!(
            "assessment name {:?} is not 1-64 characters of letters, digits, '_', '-', '.' or ' '",
            preview(name)
        )))
    }
}

/// The HUMAN source's id (the user): non-empty, at most 250 characters, no control characters.
pub fn source_id(id: &str) -> Result<(), MlflowError> {
    opaque("source id", id, MAX_SOURCE_ID_CHARS)
}

/// A client-chosen assessment id: 1–50 characters of letters, digits, `-`, `_`, `.`. The
/// narrow alphabet keeps it a plain path segment and a plain key in every store.
pub fn assessment_id(id: &str) -> Result<(), MlflowError> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if id.is_empty() || id.chars().count() > MAX_ASSESSMENT_ID_CHARS || !ok_chars {
        return Err(MlflowError::invalid(format!(
            "assessment id {:?} is not 1-{MAX_ASSESSMENT_ID_CHARS} characters of letters, digits, '-', '_' or '.'",
            preview(id)
        )));
    }
    Ok(())
}

/// An id that goes into a URL path (trace id, or an assessment id the server assigned):
/// non-empty, bounded, no control characters. Anything else is percent-encoded.
pub fn path_id(what: &str, id: &str) -> Result<(), MlflowError> {
    opaque(what, id, MAX_TRACE_ID_CHARS)
}

pub fn experiment_id(id: &str) -> Result<(), MlflowError> {
    opaque("experiment id", id, MAX_ID_CHARS)
}

pub fn value(v: &FeedbackValue) -> Result<(), MlflowError> {
    match v {
        FeedbackValue::Bool(_) => Ok(()),
        FeedbackValue::Number(n) if n.is_finite() => Ok(()),
        FeedbackValue::Number(n) => Err(MlflowError::invalid(format!(
            "feedback value {n} is not a finite number"
        ))),
        FeedbackValue::String(s) if s.len() > MAX_STRING_VALUE_BYTES => {
            Err(MlflowError::invalid(format!(
                "feedback value is {} bytes (at most {MAX_STRING_VALUE_BYTES})",
                s.len()
            )))
        }
        FeedbackValue::String(s) if s.contains('\0') => Err(MlflowError::invalid(
            "feedback value contains a NUL character",
        )),
        FeedbackValue::String(_) => Ok(()),
        FeedbackValue::List(items) => {
            let bytes: usize = items.iter().map(String::len).sum();
            if bytes > MAX_STRING_VALUE_BYTES {
                Err(MlflowError::invalid(format!(
                    "feedback value is {bytes} bytes (at most {MAX_STRING_VALUE_BYTES})"
                )))
            } else if items.iter().any(|s| s.contains('\0')) {
                Err(MlflowError::invalid(
                    "feedback value contains a NUL character",
                ))
            } else {
                Ok(())
            }
        }
    }
}

pub fn rationale(r: Option<&str>) -> Result<(), MlflowError> {
    match r {
        Some(r) if r.len() > MAX_RATIONALE_BYTES => Err(MlflowError::invalid(format!(
            "rationale is {} bytes (at most {MAX_RATIONALE_BYTES})",
            r.len()
        ))),
        Some(r) if r.contains('\0') => {
            Err(MlflowError::invalid("rationale contains a NUL character"))
        }
        _ => Ok(()),
    }
}

pub fn metadata(m: &BTreeMap<String, String>) -> Result<(), MlflowError> {
    if m.len() > MAX_METADATA_ENTRIES {
        return Err(MlflowError::invalid(format!(
            "{} metadata entries (at most {MAX_METADATA_ENTRIES})",
            m.len()
        )));
    }
    let mut total = 0;
    for (k, v) in m {
        opaque("metadata key", k, MAX_METADATA_KEY_CHARS)?;
        if v.contains('\0') {
            return Err(MlflowError::invalid(format!(
                "metadata value of {:?} contains a NUL character",
                preview(k)
            )));
        }
        total += k.len() + v.len();
    }
    if total > MAX_METADATA_BYTES {
        return Err(MlflowError::invalid(format!(
            "metadata is {total} bytes (at most {MAX_METADATA_BYTES})"
        )));
    }
    Ok(())
}

/// The string literal for `attributes.client_request_id = …` in a trace search filter.
///
/// MLflow's filter parser strips the outer quotes and does NOT unescape anything inside
/// (verified against 3.17.2: `'a''b'` and `'a\'b'` match nothing, while `"a'b"` matches `a'b`,
/// and backslashes pass through as they are). So a value is put in single quotes, or in double
/// quotes when it contains a single quote; one containing both cannot be expressed at all.
pub fn filter_literal(client_request_id: &str) -> Result<String, MlflowError> {
    opaque("client request id", client_request_id, MAX_ID_CHARS)?;
    if !client_request_id.contains('\'') {
        Ok(format!("'{client_request_id}'"))
    } else if !client_request_id.contains('"') {
        Ok(format!("\"{client_request_id}\""))
    } else {
        Err(MlflowError::invalid(format!(
            "client request id {:?} contains both ' and \": MLflow's search filter cannot express it",
            preview(client_request_id)
        )))
    }
}

/// A dataset or review queue name as a quoted literal for a search filter (`name = '…'`):
/// 1–256 characters, no control characters, not both kinds of quote.
pub fn dataset_name_literal(name: &str) -> Result<String, MlflowError> {
    opaque("name", name, MAX_ID_CHARS)?;
    if !name.contains('\'') {
        Ok(format!("'{name}'"))
    } else if !name.contains('"') {
        Ok(format!("\"{name}\""))
    } else {
        Err(MlflowError::invalid(format!(
            "name {:?} contains both ' and \": MLflow's search filter cannot express it",
            preview(name)
        )))
    }
}

fn opaque(what: &str, s: &str, max_chars: usize) -> Result<(), MlflowError> {
    if s.is_empty() {
        return Err(MlflowError::invalid(format!("{what} is empty")));
    }
    if s.chars().count() > max_chars {
        return Err(MlflowError::invalid(format!(
            "{what} is longer than {max_chars} characters"
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(MlflowError::invalid(format!(
            "{what} {:?} contains control characters",
            preview(s)
        )));
    }
    Ok(())
}

/// The start of a rejected value, for the error message (never the whole of a large one).
fn preview(s: &str) -> String {
    let mut p: String = s.chars().take(40).collect();
    if p.len() < s.len() {
        p.push('…');
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlflow::error::MlflowErrorKind;

    fn invalid<T: std::fmt::Debug>(r: Result<T, MlflowError>) -> String {
        let e = r.expect_err("should be rejected");
        assert_eq!(e.kind, MlflowErrorKind::Invalid);
        e.message
    }

    #[test]
    fn names() {
        assert!(name("user_feedback").is_ok());
        assert!(name("rating 1-5.v2").is_ok());
        assert!(name(&"a".repeat(64)).is_ok());
        invalid(name(""));
        invalid(name(&"a".repeat(65)));
        invalid(name("bad/name"));
        invalid(name("naïve"));
    }

    #[test]
    fn assessment_ids() {
        assert!(assessment_id("a-proxy-req-abc123-1").is_ok());
        assert!(assessment_id(&"a".repeat(50)).is_ok());
        invalid(assessment_id(&"a".repeat(51)));
        invalid(assessment_id(""));
        invalid(assessment_id("a/b"));
        invalid(assessment_id("a b"));
    }

    #[test]
    fn source_ids() {
        assert!(source_id("alice@example.com").is_ok());
        invalid(source_id(""));
        invalid(source_id("a\nb"));
        invalid(source_id(&"a".repeat(251)));
    }

    #[test]
    fn values() {
        assert!(value(&FeedbackValue::Bool(true)).is_ok());
        assert!(value(&FeedbackValue::Number(4.5)).is_ok());
        assert!(value(&FeedbackValue::String("thumbs_up".into())).is_ok());
        invalid(value(&FeedbackValue::Number(f64::NAN)));
        invalid(value(&FeedbackValue::Number(f64::INFINITY)));
        invalid(value(&FeedbackValue::String(
            "x".repeat(MAX_STRING_VALUE_BYTES + 1),
        )));
    }

    #[test]
    fn rationales_and_metadata() {
        assert!(rationale(None).is_ok());
        assert!(rationale(Some("multi\nline is fine")).is_ok());
        invalid(rationale(Some(&"x".repeat(MAX_RATIONALE_BYTES + 1))));
        invalid(rationale(Some("nul\0")));
        let mut m = BTreeMap::new();
        m.insert("proxy.message_id".to_owned(), "m-1".to_owned());
        assert!(metadata(&m).is_ok());
        m.insert(String::new(), "x".to_owned());
        invalid(metadata(&m));
        let big: BTreeMap<_, _> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        invalid(metadata(&big));
        let huge: BTreeMap<_, _> = [("k".to_owned(), "v".repeat(MAX_METADATA_BYTES))].into();
        invalid(metadata(&huge));
    }

    #[test]
    fn filter_literals_pick_a_quote_that_works() {
        assert_eq!(filter_literal("req-abc").unwrap(), "'req-abc'");
        assert_eq!(filter_literal("req\"dq").unwrap(), "'req\"dq'");
        assert_eq!(filter_literal("req'q").unwrap(), "\"req'q\"");
        assert_eq!(filter_literal("req\\").unwrap(), "'req\\'");
        let msg = invalid(filter_literal("a'b\"c"));
        assert!(msg.contains("cannot express"), "{msg}");
        invalid(filter_literal(""));
        invalid(filter_literal("a\nb"));
    }

    #[test]
    fn previews_are_bounded() {
        let msg = invalid(source_id(&format!("{}\n", "y".repeat(500))));
        assert!(msg.len() < 120, "{msg}");
    }
}
