//! `[mlflow] sync_label_schemas = true`: at start-up, each declared name of `[feedback.names]`
//! gets an MLflow label schema of the same name in the configured experiment, so that MLflow's
//! labelling UI offers the options the proxy accepts. Missing: created. Present and
//! disagreeing: a warning that says what differs, then updated where MLflow allows it (options,
//! bounds, length, instruction); where it does not (another type, another input kind, single
//! vs multi select: immutable in MLflow) only the warning. Names MLflow cannot represent (the
//! list form, its reserved name `Feedback`, more than 10 options, options over 64 characters,
//! `min = max`) are skipped with a warning. Nothing here blocks start-up or a vote: it runs in
//! the background and logs each name's outcome once.
//!
//! Not representable, so not compared: `integer` (MLflow's numeric input has no such flag)
//! and `title` (MLflow shows the name itself as the question).

use serde_json::{Map, Value, json};

use crate::config::{Kind, LabelSchema};
use crate::mlflow::MlflowClient;

/// MLflow 3.17.2's limits (`mlflow/genai/label_schemas/validation.py`) [verified].
const MAX_OPTIONS: usize = 10;
const MAX_OPTION_CHARS: usize = 64;
const MAX_INSTRUCTION_CHARS: usize = 1000;
/// MLflow's default question, reserved (case-insensitive) [verified].
const RESERVED: &str = "feedback";

/// What happened to one name.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Created,
    Unchanged,
    /// It disagreed (the text says how) and was updated.
    Updated(String),
    /// It disagrees in a way MLflow cannot change (the text says how); left as it is.
    Conflict(String),
    /// Not sent: MLflow cannot represent it (the text says why).
    Skipped(String),
    /// The MLflow call failed.
    Failed(String),
}

/// Syncs every name, logging each outcome (a warning for all but created and unchanged).
pub async fn sync(
    client: &MlflowClient,
    experiment_id: &str,
    names: &std::collections::BTreeMap<String, LabelSchema>,
) -> Vec<(String, Outcome)> {
    let mut out = Vec::new();
    for (name, schema) in names {
        let outcome = sync_one(client, experiment_id, name, schema).await;
        match &outcome {
            Outcome::Created => {
                tracing::info!(name, experiment_id, "created the MLflow label schema")
            }
            Outcome::Unchanged => {
                tracing::debug!(name, "the MLflow label schema already agrees")
            }
            Outcome::Updated(diff) => tracing::warn!(
                name,
                experiment_id,
                "the MLflow label schema disagreed with feedback.names.{name} ({diff}); updated it"
            ),
            Outcome::Conflict(diff) => tracing::warn!(
                name,
                experiment_id,
                "the MLflow label schema disagrees with feedback.names.{name} ({diff}) and MLflow cannot change that: MLflow's labelling UI will offer other options than the proxy accepts; rename one or delete the MLflow schema"
            ),
            Outcome::Skipped(why) => tracing::warn!(
                name,
                "feedback.names.{name} is not synced to an MLflow label schema: {why}"
            ),
            Outcome::Failed(e) => tracing::warn!(
                name,
                error = %e,
                "syncing feedback.names.{name} to an MLflow label schema failed"
            ),
        }
        out.push((name.clone(), outcome));
    }
    out
}

async fn sync_one(
    client: &MlflowClient,
    experiment_id: &str,
    name: &str,
    schema: &LabelSchema,
) -> Outcome {
    let want = match input_of(name, schema) {
        Ok(w) => w,
        Err(why) => return Outcome::Skipped(why),
    };
    let have = match client.get_label_schema(experiment_id, name).await {
        Ok(h) => h,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let Some(have) = have else {
        let mut body = json!({
            "experiment_id": experiment_id,
            "name": name,
            "type": "FEEDBACK",
            "input": want,
        });
        if let Some(i) = &schema.instruction {
            body["instruction"] = json!(i);
        }
        return match client.create_label_schema(&body).await {
            Ok(_) => Outcome::Created,
            Err(e) => Outcome::Failed(e.to_string()),
        };
    };
    let Some(schema_id) = have.get("schema_id").and_then(Value::as_str) else {
        return Outcome::Failed("MLflow's label schema has no schema_id".into());
    };
    let have_type = have.get("type").and_then(Value::as_str).unwrap_or("?");
    if have_type != "FEEDBACK" {
        return Outcome::Conflict(format!("MLflow's is of type {have_type}, not FEEDBACK"));
    }
    let have_input = normalize(have.get("input").unwrap_or(&Value::Null));
    let want_input = normalize(&want);
    let (have_kind, want_kind) = (variant(&have_input), variant(&want_input));
    if have_kind != want_kind {
        return Outcome::Conflict(format!(
            "MLflow's input is {have_kind}, the proxy's {want_kind}"
        ));
    }
    let multi = |v: &Value| v.pointer("/categorical/multi_select").cloned();
    if multi(&have_input) != multi(&want_input) {
        return Outcome::Conflict(format!(
            "MLflow's multi_select is {}, the proxy's {}",
            multi(&have_input).unwrap_or(Value::Null),
            multi(&want_input).unwrap_or(Value::Null)
        ));
    }
    let mut diffs = Vec::new();
    let mut update = json!({"schema_id": schema_id});
    if have_input != want_input {
        diffs.push(format!("MLflow has {have_input}, the proxy {want_input}"));
        update["input"] = want;
    }
    let have_instruction = have
        .get("instruction")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    if let Some(i) = &schema.instruction {
        if have_instruction != Some(i.as_str()) {
            diffs.push("the instruction differs".into());
            update["instruction"] = json!(i);
        }
    }
    if diffs.is_empty() {
        return Outcome::Unchanged;
    }
    match client.update_label_schema(&update).await {
        Ok(_) => Outcome::Updated(diffs.join("; ")),
        Err(e) => Outcome::Failed(format!("{} (updating it: {e})", diffs.join("; "))),
    }
}

/// MLflow's `input` for `schema`, or why there is none.
pub fn input_of(name: &str, schema: &LabelSchema) -> Result<Value, String> {
    if name.trim().eq_ignore_ascii_case(RESERVED) {
        return Err(format!(
            "MLflow reserves the name \"{name}\" for its default question"
        ));
    }
    if schema
        .instruction
        .as_ref()
        .is_some_and(|i| i.chars().count() > MAX_INSTRUCTION_CHARS)
    {
        return Err(format!(
            "MLflow takes an instruction of at most {MAX_INSTRUCTION_CHARS} characters"
        ));
    }
    Ok(match &schema.kind {
        Kind::Any { .. } => {
            return Err(
                "it lists value kinds; declare a kind (bool, numeric, categorical, text) to sync it"
                    .into(),
            );
        }
        Kind::Bool => json!({"pass_fail": {"positive_label": "Yes", "negative_label": "No"}}),
        Kind::Numeric { min, max, .. } => {
            if let (Some(lo), Some(hi)) = (min, max) {
                if lo >= hi {
                    return Err("MLflow needs min below max".into());
                }
            }
            let mut n = Map::new();
            if let Some(lo) = min {
                n.insert("min_value".into(), json!(lo));
            }
            if let Some(hi) = max {
                n.insert("max_value".into(), json!(hi));
            }
            json!({"numeric": n})
        }
        Kind::Categorical { values, multi } => {
            if values.len() > MAX_OPTIONS {
                return Err(format!("MLflow takes at most {MAX_OPTIONS} options"));
            }
            if values.iter().any(|v| v.chars().count() > MAX_OPTION_CHARS) {
                return Err(format!(
                    "MLflow takes options of at most {MAX_OPTION_CHARS} characters"
                ));
            }
            json!({"categorical": {"options": values, "multi_select": multi}})
        }
        Kind::Text { max_length } => json!({"text": {"max_length": max_length}}),
    })
}

/// An input with MLflow's defaults filled in and numbers as floats, so that two spellings of
/// the same input compare equal (MLflow omits false and unset fields and answers `1.0` for `1`).
/// Pass/fail labels are not compared: they do not change what a vote may say.
fn normalize(input: &Value) -> Value {
    let num = |v: Option<&Value>| v.and_then(Value::as_f64).map_or(Value::Null, Value::from);
    if let Some(c) = input.get("categorical") {
        json!({"categorical": {
            "options": c.get("options").cloned().unwrap_or_else(|| json!([])),
            "multi_select": c.get("multi_select").and_then(Value::as_bool).unwrap_or(false),
        }})
    } else if let Some(n) = input.get("numeric") {
        json!({"numeric": {"min_value": num(n.get("min_value")), "max_value": num(n.get("max_value"))}})
    } else if let Some(t) = input.get("text") {
        json!({"text": {"max_length": num(t.get("max_length"))}})
    } else if input.get("pass_fail").is_some() {
        json!({"pass_fail": {}})
    } else {
        json!({"unknown": input})
    }
}

fn variant(input: &Value) -> &str {
    input
        .as_object()
        .and_then(|o| o.keys().next())
        .map_or("none", String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_mlflow_cannot_represent_is_skipped() {
        let cat = |n: usize| {
            LabelSchema::of(Kind::Categorical {
                values: (0..n).map(|i| format!("v{i}")).collect(),
                multi: false,
            })
        };
        assert!(input_of("reason", &cat(10)).is_ok());
        assert!(
            input_of("reason", &cat(11))
                .unwrap_err()
                .contains("10 options")
        );
        assert!(
            input_of("Feedback", &cat(2))
                .unwrap_err()
                .contains("reserves")
        );
        let any = LabelSchema::of(Kind::Any {
            accepts: crate::config::ValueKinds::ANY,
        });
        assert!(input_of("user_feedback", &any).is_err());
        let same = LabelSchema::of(Kind::Numeric {
            min: Some(1.0),
            max: Some(1.0),
            integer: true,
        });
        assert!(input_of("x", &same).is_err());
    }

    #[test]
    fn spellings_of_one_input_compare_equal() {
        assert_eq!(
            normalize(&json!({"numeric": {"min_value": 1, "max_value": 5}})),
            normalize(&json!({"numeric": {"min_value": 1.0, "max_value": 5.0}}))
        );
        assert_eq!(
            normalize(&json!({"categorical": {"options": ["a"]}})),
            normalize(&json!({"categorical": {"options": ["a"], "multi_select": false}}))
        );
        assert_ne!(
            normalize(&json!({"text": {"max_length": 5}})),
            normalize(&json!({"text": {}}))
        );
    }
}
