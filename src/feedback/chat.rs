//! Chat ratings: `POST /api/feedback` with `"scope": "chat"` rates the whole conversation (one
//! vote per chat, user and name), `DELETE /api/feedback/{chatId}[?name=]` retracts it. The vote
//! is stored like a message vote, under the chat rating's key ([`VoteKey::chat_rating`]), and
//! delivered as a session assessment on the chat's first trace (`delivery::session`).
//!
//! Only a user who has had an answer in the chat may rate it (404 `UNKNOWN_CHAT` otherwise), so
//! that nobody rates, or squats, a chat id before its owner has used it. Chat ids are not owned
//! the way message ids are: each user's rating lands on the first trace of *their* answers in
//! the chat.

use http::{Request, Response};
use serde_json::{Map, Value};

use super::delivery::session::chat_is_traced;
use super::delivery::{NO_EXPERIMENT_ID, NO_TRACE_ID, Status};
use super::input::VoteRequest;
use super::{Feedback, query_param, require_json, vote_value_label};
use crate::body::{Body, ReqBody};
use crate::error::Error;
use crate::metrics::VoteLabels;
use crate::store::{Enqueue, FeedbackValue, NewVote, VoteKey};

/// Most of a chat's links read to decide whether it has an answer to land on.
const CHAT_LINKS: u32 = 50;

impl Feedback {
    /// Stores and attempts a chat rating (`vote.message_id` is `None`).
    pub(super) async fn submit_chat(
        &self,
        user: String,
        vote: VoteRequest,
    ) -> Result<Value, Error> {
        let Some(chat_id) = vote.chat_id.clone() else {
            return Err(Error::bad_request(
                "MISSING_FIELD",
                "chatId: required with \"scope\": \"chat\"",
            ));
        };
        let links = self.store.chat_links(&chat_id, &user, CHAT_LINKS).await?;
        if links.is_empty() {
            return Err(Error::UnknownChat(format!(
                "chat {chat_id} is not known: rate a chat in which you have received an answer"
            )));
        }
        let enqueue = if !self.deliverer.enabled() {
            Enqueue::Waiting {
                reason: NO_EXPERIMENT_ID.into(),
            }
        } else if chat_is_traced(&links) {
            Enqueue::Inline {
                hold: self.deliverer.inline_hold(),
            }
        } else {
            Enqueue::Waiting {
                reason: NO_TRACE_ID.into(),
            }
        };
        let key = VoteKey::chat_rating(&chat_id, &user, &vote.name);
        let delivery = self
            .store
            .upsert_vote(
                &NewVote {
                    key: key.clone(),
                    chat_id,
                    value: vote.value.clone(),
                    comment: vote.comment.clone(),
                },
                &enqueue,
            )
            .await?;
        self.metrics
            .votes_accepted
            .get_or_create(&VoteLabels {
                name: vote.name.clone(),
                value: vote_value_label(&vote.value),
            })
            .inc();
        let status = match enqueue {
            Enqueue::Inline { .. } | Enqueue::Pending => {
                self.deliverer.attempt_inline(&key, delivery.version).await
            }
            Enqueue::Waiting { reason } if reason == NO_EXPERIMENT_ID => Status::NoExperimentId,
            Enqueue::Waiting { .. } => Status::NoTraceId,
        };
        let trace_id = status.trace_id().map(str::to_owned).or(delivery.trace_id);
        let mut out = Map::new();
        out.insert("success".into(), Value::Bool(true));
        out.insert("scope".into(), Value::String("chat".into()));
        if let FeedbackValue::Bool(b) = vote.value {
            out.insert("isUpvoted".into(), Value::Bool(b));
        }
        out.insert("name".into(), Value::String(vote.name));
        out.insert("value".into(), vote.value.to_json());
        self.status_fields(&mut out, &status, trace_id);
        Ok(Value::Object(out))
    }

    /// `DELETE /api/feedback/{chatId}[?name=]`: retracts the caller's rating of the chat.
    pub(super) async fn retract_chat(
        &self,
        req: Request<ReqBody>,
        chat_id: &str,
    ) -> Result<Response<Body>, Error> {
        require_json(req.headers())?;
        let user = self.user(req.headers())?;
        let name = query_param(req.uri().query(), "name")
            .unwrap_or_else(|| self.config.default_name.clone());
        if !self.config.names.contains_key(&name) {
            return Err(Error::bad_request(
                "UNKNOWN_NAME",
                format!(
                    "name: \"{}\" is not an accepted assessment name",
                    crate::text::echo(&name)
                ),
            ));
        }
        let key = VoteKey::chat_rating(chat_id, &user, &name);
        self.retract_key(&key, &format!("chat {chat_id}")).await
    }
}
