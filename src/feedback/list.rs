//! The caller's votes in a chat: `GET /api/feedback/{chatId}` (votes, their details and
//! corrections, the chat's own ratings) and the chat app template's `GET
//! /api/feedback/chat/{chatId}`.

use http::{HeaderMap, Response, StatusCode};
use serde_json::{Map, Value, json};

use super::Feedback;
use crate::body::{Body, json_response};
use crate::error::Error;
use crate::store::FeedbackValue;

impl Feedback {
    pub(super) async fn list(
        &self,
        headers: &HeaderMap,
        chat_id: &str,
    ) -> Result<Response<Body>, Error> {
        let user = self.user(headers)?;
        let votes = self.store.list_votes(chat_id, &user).await?;
        let mut simple = Map::new();
        let mut feedback = Map::new();
        let mut assessments: Map<String, Value> = Map::new();
        let mut chat: Map<String, Value> = Map::new();
        for v in votes {
            let mut detail = json!({
                "name": v.key.name,
                "value": v.value.to_json(),
                "comment": v.comment,
                "updatedAt": humantime::format_rfc3339_millis(v.updated_at).to_string(),
            });
            if let Some(text) = &v.expected_response {
                detail["expectedResponse"] = Value::String(text.clone());
            }
            if v.key.rated_chat().is_some() {
                chat.insert(v.key.name.clone(), detail);
                continue;
            }
            if v.key.name == self.config.default_name {
                if let FeedbackValue::Bool(b) = v.value {
                    simple.insert(v.key.message_id.clone(), Value::Bool(b));
                }
                feedback.insert(v.key.message_id.clone(), detail.clone());
            }
            if let Value::Object(per_message) = assessments
                .entry(v.key.message_id.clone())
                .or_insert_with(|| Value::Object(Map::new()))
            {
                per_message.insert(v.key.name.clone(), detail);
            }
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({ "votes": simple, "feedback": feedback, "assessments": assessments, "chat": chat }),
        ))
    }

    /// The template's `GET /api/feedback/chat/{chatId}`: the caller's thumbs in that chat.
    pub(super) async fn template_list(
        &self,
        headers: &HeaderMap,
        chat_id: &str,
    ) -> Result<Response<Body>, Error> {
        let user = self.user(headers)?;
        let votes = self.store.list_votes(chat_id, &user).await?;
        let mut map = Map::new();
        for v in votes.iter().filter(|v| v.key.rated_chat().is_none()) {
            if let (true, FeedbackValue::Bool(up)) =
                (v.key.name == self.config.default_name, &v.value)
            {
                let kind = if *up { "thumbs_up" } else { "thumbs_down" };
                map.insert(
                    v.key.message_id.clone(),
                    json!({"messageId": v.key.message_id, "feedbackType": kind, "assessmentId": null}),
                );
            }
        }
        Ok(json_response(StatusCode::OK, &Value::Object(map)))
    }
}
