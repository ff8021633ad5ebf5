//! The label schemas of `[feedback.names]` (`schema.rs`), read from TOML as a whole config.

use super::schema::*;
use crate::config::{Config, ConfigError, Env};

fn load(feedback: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(
        &format!("[agent]\nurl = \"http://127.0.0.1:1\"\n{feedback}"),
        &Env::default(),
    )
}

fn problems(feedback: &str) -> Vec<String> {
    load(feedback)
        .unwrap_err()
        .to_string()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn defaults_keep_the_list_form_and_add_reasons() {
    let c = load("").unwrap().feedback;
    assert_eq!(
        c.names.keys().collect::<Vec<_>>(),
        ["rating", "reason", "user_feedback"]
    );
    assert_eq!(
        c.names["user_feedback"].kind,
        Kind::Any {
            accepts: ValueKinds::ANY
        }
    );
    assert!(matches!(
        &c.names["reason"].kind,
        Kind::Categorical { values, multi: false } if values == &DEFAULT_REASONS
    ));
    assert_eq!(c.reason_name.as_deref(), Some("reason"));
    // Configured names without `reason`: no reasons, and no error.
    let c = load("[feedback.names]\nuser_feedback = [\"bool\"]\n")
        .unwrap()
        .feedback;
    assert_eq!(c.reason_name, None);
}

#[test]
fn each_kind_is_read_from_a_table() {
    let c = load(concat!(
        "[feedback]\nreason_name = \"why\"\n",
        "[feedback.names]\n",
        "user_feedback = { kind = \"bool\" }\n",
        "stars = { kind = \"numeric\", min = 1, max = 5, integer = true, title = \"Stars\" }\n",
        "score = { kind = \"numeric\", min = 0.5 }\n",
        "why = { kind = \"categorical\", values = [\"a\", \"b\"], multi = true, instruction = \"Pick all\" }\n",
        "note = { kind = \"text\", max_length = 200 }\n",
        "plain = { kind = \"text\" }\n",
    ))
    .unwrap()
    .feedback;
    assert_eq!(c.names["user_feedback"].kind, Kind::Bool);
    assert_eq!(
        c.names["stars"].kind,
        Kind::Numeric {
            min: Some(1.0),
            max: Some(5.0),
            integer: true
        }
    );
    assert_eq!(c.names["stars"].title.as_deref(), Some("Stars"));
    assert_eq!(
        c.names["score"].kind,
        Kind::Numeric {
            min: Some(0.5),
            max: None,
            integer: false
        }
    );
    assert_eq!(
        c.names["why"].kind,
        Kind::Categorical {
            values: vec!["a".into(), "b".into()],
            multi: true
        }
    );
    assert_eq!(c.names["note"].kind, Kind::Text { max_length: 200 });
    assert_eq!(
        c.names["plain"].kind,
        Kind::Text {
            max_length: DEFAULT_TEXT_LENGTH
        }
    );
    assert_eq!(c.reason_name.as_deref(), Some("why"));
}

#[test]
fn schema_problems_name_the_key() {
    let cases = [
        ("x = { min = 1 }", "feedback.names.x.kind: required"),
        (
            "x = { kind = \"stars\" }",
            "feedback.names.x.kind: unknown kind \"stars\"",
        ),
        ("x = 5", "feedback.names.x: expected a list of value kinds"),
        (
            "x = { kind = \"numeric\", min = 5, max = 1 }",
            "feedback.names.x.max: must not be below min",
        ),
        (
            "x = { kind = \"numeric\", min = 0.5, integer = true }",
            "feedback.names.x.min: must be a whole number",
        ),
        (
            "x = { kind = \"numeric\", min = \"1\" }",
            "feedback.names.x.min: expected a finite number",
        ),
        (
            "x = { kind = \"numeric\", values = [\"a\"] }",
            "feedback.names.x.values: does not apply to kind \"numeric\"",
        ),
        (
            "x = { kind = \"bool\", colour = 1 }",
            "feedback.names.x.colour: unknown key",
        ),
        (
            "x = { kind = \"categorical\" }",
            "feedback.names.x.values: required",
        ),
        (
            "x = { kind = \"categorical\", values = [] }",
            "feedback.names.x.values: required",
        ),
        (
            "x = { kind = \"categorical\", values = [\"a\", \"a\"] }",
            "feedback.names.x.values[1]: \"a\" is listed twice",
        ),
        (
            "x = { kind = \"categorical\", values = [\"a\", 3] }",
            "feedback.names.x.values[1]: expected a non-empty string",
        ),
        (
            "x = { kind = \"categorical\", values = [\"a\"], multi = \"yes\" }",
            "feedback.names.x.multi: expected true or false",
        ),
        (
            "x = { kind = \"text\", max_length = 0 }",
            "feedback.names.x.max_length: expected a whole number from 1 to 4096",
        ),
        (
            "x = { kind = \"bool\", title = \"\" }",
            "feedback.names.x.title: expected a non-empty string",
        ),
    ];
    for (name, want) in cases {
        let text = format!("[feedback]\ndefault_name = \"x\"\n[feedback.names]\n{name}\n");
        let got = problems(&text);
        assert!(got.iter().any(|p| p.starts_with(want)), "{name}: {got:?}");
    }
    let got = problems("[feedback]\nreason_name = \"user_feedback\"\n");
    assert!(
        got[0].starts_with("feedback.reason_name: \"user_feedback\" is not a categorical name"),
        "{got:?}"
    );
    let got = problems("[feedback]\nreason_name = \"nope\"\n");
    assert!(
        got[0].starts_with("feedback.reason_name: \"nope\" is not one of"),
        "{got:?}"
    );
    assert_eq!(
        load("[feedback]\nreason_name = \"\"\n")
            .unwrap()
            .feedback
            .reason_name,
        None
    );
}

#[test]
fn check_config_prints_schemas_as_they_are_written() {
    let c = load(
        "[feedback.names]\nuser_feedback = [\"bool\", \"string\"]\nstars = { kind = \"numeric\", min = 1, integer = true, title = \"Stars\" }\n",
    )
    .unwrap();
    let wrapped = serde_json::json!({"feedback": {"names": c.feedback.names}});
    let printed = toml::to_string(&wrapped).unwrap();
    let again = load(&printed).unwrap();
    assert_eq!(again.feedback.names, c.feedback.names, "{printed}");
    assert!(
        printed.contains("user_feedback = [\"bool\", \"string\"]"),
        "{printed}"
    );
}
