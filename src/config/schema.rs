//! `[feedback.names]`: the label schema of each accepted assessment name, read from the TOML as
//! written (so that every problem names its key, down to `feedback.names.rating.min`).
//!
//! Two forms: a list of value kinds (`rating = ["number"]`, the original form: any value of
//! those JSON kinds) and a table declaring a kind (`rating = { kind = "numeric", min = 1, max =
//! 5, integer = true }`). Checking a vote against a schema is the feedback module's business;
//! this module only builds and validates the schemas.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Value as Json, json};
use toml::Value;

use super::validate::Validator;

/// Longest categorical value, in bytes.
pub const MAX_CATEGORY_BYTES: usize = 256;
/// Most values a categorical name may list.
pub const MAX_CATEGORIES: usize = 100;
/// Longest `max_length` of a `text` name, in characters (4 bytes each at most: under MLflow's
/// 16 KiB per value).
pub const MAX_TEXT_LENGTH: usize = 4096;
/// `max_length` of a `text` name that gives none (the list form's string limit).
pub const DEFAULT_TEXT_LENGTH: usize = 1024;
/// The reasons the default `reason` name offers.
pub const DEFAULT_REASONS: [&str; 4] = ["incorrect", "unhelpful", "unsafe", "other"];

/// Kinds of value an assessment name of the list form accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ValueKinds {
    pub bool: bool,
    pub number: bool,
    pub string: bool,
}

impl ValueKinds {
    pub const ANY: Self = Self {
        bool: true,
        number: true,
        string: true,
    };

    /// A human list such as `"bool or number"`.
    pub fn describe(&self) -> String {
        self.names().join(" or ")
    }

    fn names(&self) -> Vec<&'static str> {
        let mut parts = Vec::new();
        if self.bool {
            parts.push("bool");
        }
        if self.number {
            parts.push("number");
        }
        if self.string {
            parts.push("string");
        }
        parts
    }
}

/// What one assessment name accepts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Kind {
    /// The list form: any value of these JSON kinds.
    Any { accepts: ValueKinds },
    /// `true` or `false` (also `isUpvoted` and the template's `feedbackType`).
    Bool,
    /// A number, within `min..=max` when given; whole when `integer`.
    Numeric {
        min: Option<f64>,
        max: Option<f64>,
        integer: bool,
    },
    /// One of `values` (a string), or with `multi` a list of distinct ones.
    Categorical { values: Vec<String>, multi: bool },
    /// Free text of 1 to `max_length` characters.
    Text { max_length: usize },
}

/// A name's schema: its kind and what a UI shows for it. Prints (`check-config`) in the form it
/// is written in.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSchema {
    pub kind: Kind,
    /// The question a UI asks (MLflow's label schema `title`); defaults to the name.
    pub title: Option<String>,
    /// Guidance for whoever labels (MLflow's `instruction`).
    pub instruction: Option<String>,
}

impl LabelSchema {
    pub fn of(kind: Kind) -> Self {
        Self {
            kind,
            title: None,
            instruction: None,
        }
    }

    /// Whether a boolean vote (`isUpvoted`, `feedbackType`, `value: true`) fits.
    pub fn accepts_bool(&self) -> bool {
        match &self.kind {
            Kind::Any { accepts } => accepts.bool,
            Kind::Bool => true,
            _ => false,
        }
    }

    /// The TOML form of this schema (what `check-config` prints): the list of kinds, or the
    /// table with its set fields.
    fn config_form(&self) -> Json {
        let mut out = match &self.kind {
            Kind::Any { accepts } => return json!(accepts.names()),
            Kind::Bool => json!({"kind": "bool"}),
            Kind::Numeric { min, max, integer } => {
                let mut n = json!({"kind": "numeric", "integer": integer});
                if let Some(lo) = min {
                    n["min"] = json!(lo);
                }
                if let Some(hi) = max {
                    n["max"] = json!(hi);
                }
                n
            }
            Kind::Categorical { values, multi } => {
                json!({"kind": "categorical", "values": values, "multi": multi})
            }
            Kind::Text { max_length } => json!({"kind": "text", "max_length": max_length}),
        };
        if let Some(t) = &self.title {
            out["title"] = json!(t);
        }
        if let Some(i) = &self.instruction {
            out["instruction"] = json!(i);
        }
        out
    }

    /// What `GET /api/feedback/schema` shows for this name.
    pub fn to_json(&self, name: &str) -> Json {
        let mut out = match &self.kind {
            Kind::Any { accepts } => json!({"kind": "any", "accepts": accepts.names()}),
            Kind::Bool => json!({"kind": "bool"}),
            Kind::Numeric { min, max, integer } => {
                json!({"kind": "numeric", "min": min, "max": max, "integer": integer})
            }
            Kind::Categorical { values, multi } => {
                json!({"kind": "categorical", "values": values, "multi": multi})
            }
            Kind::Text { max_length } => json!({"kind": "text", "maxLength": max_length}),
        };
        out["name"] = json!(name);
        out["title"] = json!(self.title.as_deref().unwrap_or(name));
        if let Some(i) = &self.instruction {
            out["instruction"] = json!(i);
        }
        out
    }
}

impl Serialize for LabelSchema {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.config_form().serialize(s)
    }
}

/// The names accepted when `[feedback.names]` is not given: `user_feedback` (any value, the
/// thumbs), `rating` (any number) and `reason` (why an answer was bad).
pub fn default_names() -> BTreeMap<String, LabelSchema> {
    let mut names = BTreeMap::new();
    names.insert(
        "user_feedback".to_owned(),
        LabelSchema::of(Kind::Any {
            accepts: ValueKinds::ANY,
        }),
    );
    names.insert(
        "rating".to_owned(),
        LabelSchema::of(Kind::Any {
            accepts: ValueKinds {
                number: true,
                ..ValueKinds::default()
            },
        }),
    );
    names.insert(
        "reason".to_owned(),
        LabelSchema {
            kind: Kind::Categorical {
                values: DEFAULT_REASONS.iter().map(|s| (*s).to_owned()).collect(),
                multi: false,
            },
            title: Some("What was wrong with this answer?".to_owned()),
            instruction: None,
        },
    );
    names
}

const TABLE_KEYS: &str = "kind, title, instruction, min, max, integer, values, multi, max_length";

impl Validator {
    /// One name's schema from its TOML value (`key` is `feedback.names.NAME`).
    pub(super) fn label_schema(&mut self, key: &str, value: &Value) -> Option<LabelSchema> {
        match value {
            Value::Array(kinds) => self.kinds_form(key, kinds),
            Value::Table(t) => self.table_form(key, t),
            _ => {
                self.problem(
                    key,
                    "expected a list of value kinds ([\"bool\", \"number\"]) or a table with a kind ({ kind = \"categorical\", values = [...] })",
                );
                None
            }
        }
    }

    fn kinds_form(&mut self, key: &str, kinds: &[Value]) -> Option<LabelSchema> {
        let mut k = ValueKinds::default();
        for kind in kinds {
            match kind.as_str() {
                Some("bool") => k.bool = true,
                Some("number") => k.number = true,
                Some("string") => k.string = true,
                other => self.problem(
                    key,
                    format!(
                        "unknown value kind {} (expected \"bool\", \"number\" or \"string\")",
                        other.map_or_else(|| kind.to_string(), |s| format!("\"{s}\""))
                    ),
                ),
            }
        }
        if kinds.is_empty() {
            self.problem(key, "lists no value kinds");
        }
        Some(LabelSchema::of(Kind::Any { accepts: k }))
    }

    fn table_form(&mut self, key: &str, t: &toml::Table) -> Option<LabelSchema> {
        let before = self.problems.len();
        let kind_name = match t.get("kind") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                self.problem(&format!("{key}.kind"), "expected a string");
                return None;
            }
            None => {
                self.problem(
                    &format!("{key}.kind"),
                    "required: \"bool\", \"numeric\", \"categorical\" or \"text\"",
                );
                return None;
            }
        };
        let allowed: &[&str] = match kind_name {
            "bool" => &[],
            "numeric" => &["min", "max", "integer"],
            "categorical" => &["values", "multi"],
            "text" => &["max_length"],
            other => {
                self.problem(
                    &format!("{key}.kind"),
                    format!(
                        "unknown kind \"{}\" (expected \"bool\", \"numeric\", \"categorical\" or \"text\")",
                        crate::text::echo(other)
                    ),
                );
                return None;
            }
        };
        for k in t.keys() {
            let common = matches!(k.as_str(), "kind" | "title" | "instruction");
            if !common && !allowed.contains(&k.as_str()) {
                let known = TABLE_KEYS.split(", ").any(|x| x == k);
                let msg = if known {
                    format!("does not apply to kind \"{kind_name}\"")
                } else {
                    format!("unknown key (expected one of {TABLE_KEYS})")
                };
                self.problem(&format!("{key}.{k}"), msg);
            }
        }
        let title = self.schema_text(key, t, "title");
        let instruction = self.schema_text(key, t, "instruction");
        let kind = match kind_name {
            "bool" => Kind::Bool,
            "numeric" => self.numeric(key, t),
            "categorical" => self.categorical(key, t),
            _ => {
                let max_length = match t.get("max_length") {
                    None => DEFAULT_TEXT_LENGTH,
                    Some(Value::Integer(n)) if (1..=MAX_TEXT_LENGTH as i64).contains(n) => {
                        *n as usize
                    }
                    Some(_) => {
                        self.problem(
                            &format!("{key}.max_length"),
                            format!("expected a whole number from 1 to {MAX_TEXT_LENGTH}"),
                        );
                        DEFAULT_TEXT_LENGTH
                    }
                };
                Kind::Text { max_length }
            }
        };
        (self.problems.len() == before).then_some(LabelSchema {
            kind,
            title,
            instruction,
        })
    }

    fn schema_text(&mut self, key: &str, t: &toml::Table, field: &str) -> Option<String> {
        match t.get(field) {
            None => None,
            Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 1024 => Some(s.clone()),
            Some(_) => {
                self.problem(
                    &format!("{key}.{field}"),
                    "expected a non-empty string of at most 1024 bytes",
                );
                None
            }
        }
    }

    fn numeric(&mut self, key: &str, t: &toml::Table) -> Kind {
        let mut bound = |field: &str| match t.get(field) {
            None => None,
            Some(Value::Integer(n)) => Some(*n as f64),
            Some(Value::Float(f)) if f.is_finite() => Some(*f),
            Some(_) => {
                self.problem(&format!("{key}.{field}"), "expected a finite number");
                None
            }
        };
        let (min, max) = (bound("min"), bound("max"));
        let integer = match t.get("integer") {
            None => false,
            Some(Value::Boolean(b)) => *b,
            Some(_) => {
                self.problem(&format!("{key}.integer"), "expected true or false");
                false
            }
        };
        if let (Some(lo), Some(hi)) = (min, max) {
            if lo > hi {
                self.problem(
                    &format!("{key}.max"),
                    format!("must not be below min ({lo})"),
                );
            }
        }
        if integer {
            for (field, v) in [("min", min), ("max", max)] {
                if v.is_some_and(|v| v.fract() != 0.0) {
                    self.problem(
                        &format!("{key}.{field}"),
                        "must be a whole number when integer = true",
                    );
                }
            }
        }
        Kind::Numeric { min, max, integer }
    }

    fn categorical(&mut self, key: &str, t: &toml::Table) -> Kind {
        let vkey = format!("{key}.values");
        let mut values = Vec::new();
        match t.get("values") {
            Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_CATEGORIES => {
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(s)
                            if !s.trim().is_empty()
                                && s.len() <= MAX_CATEGORY_BYTES
                                && !s.chars().any(char::is_control) =>
                        {
                            if !seen.insert(s) {
                                self.problem(
                                    &format!("{vkey}[{i}]"),
                                    format!("\"{s}\" is listed twice"),
                                );
                            }
                            values.push(s.to_owned());
                        }
                        _ => self.problem(
                            &format!("{vkey}[{i}]"),
                            format!(
                                "expected a non-empty string of at most {MAX_CATEGORY_BYTES} bytes without control characters"
                            ),
                        ),
                    }
                }
            }
            _ => self.problem(
                &vkey,
                format!("required: a list of 1 to {MAX_CATEGORIES} strings"),
            ),
        }
        let multi = match t.get("multi") {
            None => false,
            Some(Value::Boolean(b)) => *b,
            Some(_) => {
                self.problem(&format!("{key}.multi"), "expected true or false");
                false
            }
        };
        Kind::Categorical { values, multi }
    }
}
