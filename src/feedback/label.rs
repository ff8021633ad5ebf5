//! A vote's `value` checked against its name's label schema (`[feedback.names]`), with 400
//! `INVALID_VALUE` errors that say what the name accepts (the range, the allowed values, the
//! length). `GET /api/feedback/schema` is `schema.rs`. The list form of a name (`["bool", "number"]`) is
//! checked by `input.rs` as before; this module serves the declared kinds.

use serde_json::Value;

use crate::config::Kind;
use crate::error::Error;
use crate::store::FeedbackValue;

/// The values a categorical name lists, quoted, for an error (cut after 20).
fn listed(values: &[String]) -> String {
    let mut out: Vec<String> = values.iter().take(20).map(|v| format!("\"{v}\"")).collect();
    if values.len() > 20 {
        out.push(format!("… ({} in all)", values.len()));
    }
    out.join(", ")
}

fn fmt_bound(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{n:.0}")
    } else {
        n.to_string()
    }
}

/// What `kind` accepts, as a phrase: "an integer from 1 to 5", "one of \"a\", \"b\"".
pub fn describe(kind: &Kind) -> String {
    match kind {
        Kind::Any { accepts } => accepts.describe(),
        Kind::Bool => "true or false".to_owned(),
        Kind::Numeric { min, max, integer } => {
            let what = if *integer { "an integer" } else { "a number" };
            match (min, max) {
                (Some(lo), Some(hi)) => {
                    format!("{what} from {} to {}", fmt_bound(*lo), fmt_bound(*hi))
                }
                (Some(lo), None) => format!("{what} of at least {}", fmt_bound(*lo)),
                (None, Some(hi)) => format!("{what} of at most {}", fmt_bound(*hi)),
                (None, None) => what.to_owned(),
            }
        }
        Kind::Categorical {
            values,
            multi: false,
        } => format!("one of {}", listed(values)),
        Kind::Categorical {
            values,
            multi: true,
        } => format!("a list of distinct values, each one of {}", listed(values)),
        Kind::Text { max_length } => format!("text of 1 to {max_length} characters"),
    }
}

/// The error for a value `name` does not accept.
pub fn refused(name: &str, kind: &Kind) -> Error {
    Error::bad_request(
        "INVALID_VALUE",
        format!("value: \"{name}\" accepts {}", describe(kind)),
    )
}

/// `raw` as a value of `kind` (not the list form), or the error naming what is allowed.
pub fn check(raw: &Value, name: &str, kind: &Kind) -> Result<FeedbackValue, Error> {
    let no = || refused(name, kind);
    match (kind, raw) {
        (Kind::Bool, Value::Bool(b)) => Ok(FeedbackValue::Bool(*b)),
        (Kind::Numeric { min, max, integer }, Value::Number(n)) => {
            let f = n.as_f64().filter(|f| f.is_finite()).ok_or_else(no)?;
            let fits = (!integer || f.fract() == 0.0)
                && min.is_none_or(|lo| f >= lo)
                && max.is_none_or(|hi| f <= hi);
            if fits {
                Ok(FeedbackValue::Number(f))
            } else {
                Err(no())
            }
        }
        (Kind::Categorical { values, multi }, Value::String(s)) if !multi => {
            if values.iter().any(|v| v == s) {
                Ok(FeedbackValue::String(s.clone()))
            } else {
                Err(no())
            }
        }
        (Kind::Categorical { values, multi }, Value::Array(items)) if *multi => {
            let mut out: Vec<String> = Vec::with_capacity(items.len());
            for item in items {
                match item.as_str() {
                    Some(s) if values.iter().any(|v| v == s) && !out.iter().any(|o| o == s) => {
                        out.push(s.to_owned());
                    }
                    _ => return Err(no()),
                }
            }
            if out.is_empty() {
                return Err(no());
            }
            Ok(FeedbackValue::List(out))
        }
        (Kind::Text { max_length }, Value::String(s)) => {
            let n = s.chars().count();
            let clean = !s
                .chars()
                .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'));
            if n == 0 || s.trim().is_empty() || n > *max_length || !clean {
                Err(no())
            } else {
                Ok(FeedbackValue::String(s.clone()))
            }
        }
        _ => Err(no()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn numeric(min: Option<f64>, max: Option<f64>, integer: bool) -> Kind {
        Kind::Numeric { min, max, integer }
    }

    fn categorical(multi: bool) -> Kind {
        Kind::Categorical {
            values: vec!["incorrect".into(), "unsafe".into()],
            multi,
        }
    }

    fn refusal(raw: Value, kind: &Kind) -> String {
        match check(&raw, "n", kind) {
            Err(e) => {
                assert_eq!(e.code(), "INVALID_VALUE");
                e.to_string()
            }
            Ok(v) => panic!("{raw} accepted as {v:?}"),
        }
    }

    #[test]
    fn each_kind_accepts_what_it_declares() {
        assert_eq!(
            check(&json!(false), "n", &Kind::Bool).unwrap(),
            FeedbackValue::Bool(false)
        );
        let stars = numeric(Some(1.0), Some(5.0), true);
        for ok in [1, 3, 5] {
            assert_eq!(
                check(&json!(ok), "n", &stars).unwrap(),
                FeedbackValue::Number(f64::from(ok))
            );
        }
        assert!(check(&json!(2.5), "n", &numeric(Some(0.0), Some(5.0), false)).is_ok());
        assert!(check(&json!(-1e9), "n", &numeric(None, None, false)).is_ok());
        assert_eq!(
            check(&json!("unsafe"), "n", &categorical(false)).unwrap(),
            FeedbackValue::String("unsafe".into())
        );
        assert_eq!(
            check(&json!(["unsafe", "incorrect"]), "n", &categorical(true)).unwrap(),
            FeedbackValue::List(vec!["unsafe".into(), "incorrect".into()])
        );
        let text = Kind::Text { max_length: 5 };
        assert!(check(&json!("héllo"), "n", &text).is_ok());
        assert!(check(&json!("a\nb"), "n", &text).is_ok());
    }

    #[test]
    fn each_kind_refuses_naming_what_is_allowed() {
        assert!(refusal(json!(1), &Kind::Bool).contains("accepts true or false"));
        assert!(refusal(json!("yes"), &Kind::Bool).contains("true or false"));
        let stars = numeric(Some(1.0), Some(5.0), true);
        for bad in [json!(0), json!(6), json!(2.5), json!("3"), json!(true)] {
            let e = refusal(bad, &stars);
            assert!(e.contains("\"n\" accepts an integer from 1 to 5"), "{e}");
        }
        let e = refusal(json!(11), &numeric(None, Some(10.5), false));
        assert!(e.contains("a number of at most 10.5"), "{e}");
        let e = refusal(json!(-1), &numeric(Some(0.0), None, false));
        assert!(e.contains("a number of at least 0"), "{e}");
        for bad in [json!("wrong"), json!(["unsafe"]), json!(1), json!("")] {
            let e = refusal(bad, &categorical(false));
            assert!(e.contains("one of \"incorrect\", \"unsafe\""), "{e}");
        }
        for bad in [
            json!("unsafe"),
            json!([]),
            json!(["unsafe", "unsafe"]),
            json!(["nope"]),
            json!([1]),
        ] {
            let e = refusal(bad, &categorical(true));
            assert!(
                e.contains("a list of distinct values, each one of \"incorrect\", \"unsafe\""),
                "{e}"
            );
        }
        let text = Kind::Text { max_length: 5 };
        for bad in [
            json!("toolong"),
            json!(""),
            json!("  "),
            json!("a\u{7}"),
            json!(5),
        ] {
            let e = refusal(bad, &text);
            assert!(e.contains("text of 1 to 5 characters"), "{e}");
        }
    }

    #[test]
    fn long_value_lists_are_cut_in_errors() {
        let many = Kind::Categorical {
            values: (0..30).map(|i| format!("v{i}")).collect(),
            multi: false,
        };
        let e = refusal(json!("x"), &many);
        assert!(
            e.contains("\"v19\", … (30 in all)") && !e.contains("v20"),
            "{e}"
        );
    }
}
