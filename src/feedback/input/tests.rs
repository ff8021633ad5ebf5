//! Unit tests of vote parsing and validation.

use super::*;
use crate::config::{Config, Env};

fn cfg() -> FeedbackConfig {
    Config::from_toml_str("[agent]\nurl = \"http://x\"\n", &Env::default())
        .unwrap()
        .feedback
}

fn code(body: &str) -> (&'static str, String) {
    match parse_vote(body.as_bytes(), &cfg()) {
        Err(e) => (e.code(), e.to_string()),
        Ok(v) => panic!("accepted {v:?}"),
    }
}

#[test]
fn accepts_the_seed_shape_and_the_extended_one() {
    let v = parse_vote(
        br#"{"chatId":"c1","messageId":"m1","isUpvoted":true}"#,
        &cfg(),
    )
    .unwrap();
    assert_eq!(v.name, "user_feedback");
    assert_eq!(v.value, FeedbackValue::Bool(true));
    let v = parse_vote(
        br#"{"chatId":"c1","messageId":"m1","value":4,"name":"rating","comment":"missing the 2024 numbers","extra":1}"#,
        &cfg(),
    )
    .unwrap();
    assert_eq!(v.name, "rating");
    assert_eq!(v.value, FeedbackValue::Number(4.0));
    assert_eq!(v.comment.as_deref(), Some("missing the 2024 numbers"));
}

#[test]
fn rejects_bad_input_naming_the_field() {
    let cases = [
        ("{", "INVALID_JSON", "not valid JSON"),
        ("[1]", "INVALID_JSON", "JSON object"),
        (
            r#"{"messageId":"m","isUpvoted":true}"#,
            "MISSING_FIELD",
            "chatId",
        ),
        (
            r#"{"chatId":"c","isUpvoted":true}"#,
            "MISSING_FIELD",
            "messageId",
        ),
        (
            r#"{"chatId":5,"messageId":"m","isUpvoted":true}"#,
            "INVALID_FIELD",
            "chatId",
        ),
        (
            r#"{"chatId":"c d","messageId":"m","isUpvoted":true}"#,
            "INVALID_FIELD",
            "chatId",
        ),
        (
            r#"{"chatId":"c","messageId":"m","isUpvoted":"yes"}"#,
            "INVALID_FIELD",
            "isUpvoted: expected a boolean",
        ),
        (
            r#"{"chatId":"c","messageId":"m"}"#,
            "MISSING_FIELD",
            "isUpvoted",
        ),
        (
            r#"{"chatId":"c","messageId":"m","isUpvoted":true,"value":1}"#,
            "INVALID_FIELD",
            "not both",
        ),
        (
            r#"{"chatId":"c","messageId":"m","value":true,"name":"nope"}"#,
            "UNKNOWN_NAME",
            "nope",
        ),
        (
            r#"{"chatId":"c","messageId":"m","value":"five","name":"rating"}"#,
            "INVALID_VALUE",
            "rating\" accepts number",
        ),
        (
            r#"{"chatId":"c","messageId":"m","isUpvoted":true,"name":"rating"}"#,
            "INVALID_VALUE",
            "accepts number",
        ),
        (
            r#"{"chatId":"c","messageId":"m","value":[1]}"#,
            "INVALID_FIELD",
            "value",
        ),
        (
            r#"{"chatId":"c","messageId":"m","isUpvoted":true,"comment":7}"#,
            "INVALID_FIELD",
            "comment",
        ),
        (
            r#"{"chatId":"c","messageId":"m","isUpvoted":true,"name":3}"#,
            "INVALID_FIELD",
            "name",
        ),
    ];
    for (body, want_code, want_text) in cases {
        let (got_code, text) = code(body);
        assert_eq!(got_code, want_code, "{body}: {text}");
        assert!(text.contains(want_text), "{body}: {text}");
    }
}

#[test]
fn duplicate_keys_are_refused_naming_the_key() {
    let (c, text) = code(r#"{"chatId":"c","messageId":"m","isUpvoted":true,"isUpvoted":false}"#);
    assert_eq!(c, "DUPLICATE_KEY");
    assert!(text.contains("\"isUpvoted\""), "{text}");
    let (c, text) = code(r#"{"chatId":"c","messageId":"m","isUpvoted":true,"x":{"a":1,"a":2}}"#);
    assert_eq!(c, "DUPLICATE_KEY");
    assert!(text.contains("\"a\""), "{text}");
    let long = "k".repeat(500);
    let (c, text) = code(&format!(r#"{{"{long}":1,"{long}":2}}"#));
    assert_eq!(c, "DUPLICATE_KEY");
    assert!(text.len() < 160, "{text}");
    // Equal values do not make a duplicate acceptable; distinct keys are fine.
    assert_eq!(
        code(r#"{"chatId":"c","chatId":"c","messageId":"m","isUpvoted":true}"#).0,
        "DUPLICATE_KEY"
    );
    let v = parse_vote(
        br#"{"chatId":"c","messageId":"m","isUpvoted":true,"extra":[{"a":1},{"a":2}],"n":1.5,"z":null}"#,
        &cfg(),
    )
    .unwrap();
    assert_eq!(v.value, FeedbackValue::Bool(true));
}

#[test]
fn corrections_set_clear_or_keep_and_chat_ratings_name_no_message() {
    let parse = |b: &str| parse_vote(b.as_bytes(), &cfg()).unwrap();
    let base = r#""chatId":"c","messageId":"m","isUpvoted":false"#;
    assert_eq!(
        parse(&format!("{{{base}}}")).correction,
        CorrectionChange::Keep
    );
    assert_eq!(
        parse(&format!(r#"{{{base},"expectedResponse":"12M"}}"#)).correction,
        CorrectionChange::Set("12M".into())
    );
    for clear in ["null", r#""  ""#] {
        assert_eq!(
            parse(&format!(r#"{{{base},"expectedResponse":{clear}}}"#)).correction,
            CorrectionChange::Clear
        );
    }
    let chat = parse(r#"{"chatId":"c","scope":"chat","isUpvoted":true}"#);
    assert_eq!(chat.message_id, None);
    assert_eq!(chat.chat_id.as_deref(), Some("c"));
    // The template's form can rate a chat too, but must name it.
    assert_eq!(
        code(r#"{"scope":"chat","feedbackType":"thumbs_up"}"#).0,
        "MISSING_FIELD"
    );
    let (c, text) = code(&format!(
        r#"{{{base},"expectedResponse":"{}"}}"#,
        "x".repeat(8193)
    ));
    assert_eq!(c, "EXPECTED_RESPONSE_TOO_LONG");
    assert!(text.contains("8192"), "{text}");
    let (c, text) = code(&format!(r#"{{{base},"expectedResponse":"a\u0000b"}}"#));
    assert_eq!(c, "INVALID_FIELD", "{text}");
}

#[test]
fn comment_limit() {
    let long = "x".repeat(5 * 1024);
    let (c, text) = code(&format!(
        r#"{{"chatId":"c","messageId":"m","isUpvoted":false,"comment":"{long}"}}"#
    ));
    assert_eq!(c, "COMMENT_TOO_LONG");
    assert!(text.contains("4096"));
    let ok = "y".repeat(4096);
    assert!(
        parse_vote(
            format!(r#"{{"chatId":"c","messageId":"m","isUpvoted":false,"comment":"{ok}"}}"#)
                .as_bytes(),
            &cfg()
        )
        .is_ok()
    );
}
