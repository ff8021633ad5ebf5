//! `POST /api/feedback/batch`: `{"votes": [vote, …]}`, 1 to 100 votes, each validated,
//! authorised and committed on its own by the same path as `POST /api/feedback`
//! ([`Feedback::commit`]); the answer lists one result per item, in order:
//! `{"results": [{"status": 200, "body": {…the single answer…}}, {"status": 400, "body":
//! {"error", "code"}}, …], "ok": N, "failed": M}`.
//!
//! What the batch as a whole can fail with is what a single vote's request can: identity (401),
//! content type (415), rate limit (429; a batch takes one token per vote, at most the whole
//! burst, at once), `feedback.max_batch_bytes` (413), a body that is no batch (400
//! `INVALID_JSON`) or has more than 100 votes (400 `TOO_MANY_VOTES`). Items run a few at a
//! time ([`CONCURRENCY`]), so a batch waits for MLflow at most about a dozen inline deadlines;
//! two items for the same (message, name) would race, so the later one is refused
//! (`DUPLICATE_VOTE`).

use std::collections::HashSet;

use futures_util::stream::{self, StreamExt};
use http::{Request, Response, StatusCode};
use serde_json::{Value, json};

use super::{Feedback, input, read_body, require_json};
use crate::body::{Body, ReqBody, json_response};
use crate::error::Error;

/// Items of one batch in flight at once (each one store transaction and one inline delivery
/// attempt).
const CONCURRENCY: usize = 8;

impl Feedback {
    pub(super) async fn batch(&self, req: Request<ReqBody>) -> Result<Response<Body>, Error> {
        require_json(req.headers())?;
        // Identity first (a 401 before reading anything); the rate limit once the size is known.
        crate::identity::user(req.headers(), &self.identity)?;
        let headers = req.headers().clone();
        let body = read_body(req, self.config.max_batch_bytes, self.body_timeout).await?;
        let mut items = input::parse_batch(&body, &self.config)?;
        let user = self.user_charged(&headers, u32::try_from(items.len()).unwrap_or(u32::MAX))?;

        let mut seen = HashSet::new();
        for item in &mut items {
            if let Ok(vote) = item {
                // A message's vote, or (`"scope": "chat"`) a chat's rating.
                let target = match &vote.message_id {
                    Some(m) => format!("message {m}"),
                    None => format!("chat {}", vote.chat_id.as_deref().unwrap_or_default()),
                };
                if !seen.insert((target.clone(), vote.name.clone())) {
                    *item = Err(Error::bad_request(
                        "DUPLICATE_VOTE",
                        format!(
                            "an earlier vote in this batch is on {target} with name \"{}\"",
                            vote.name
                        ),
                    ));
                }
            }
        }

        let results: Vec<Value> = stream::iter(items.into_iter().enumerate())
            .map(|(index, item)| {
                let user = user.clone();
                async move {
                    let outcome = match item {
                        Ok(vote) => self.commit(user, vote).await,
                        Err(e) => Err(e),
                    };
                    item_result(index, outcome)
                }
            })
            .buffered(CONCURRENCY)
            .collect()
            .await;
        let ok = results.iter().filter(|r| r["status"] == 200).count();
        let failed = results.len() - ok;
        Ok(json_response(
            StatusCode::OK,
            &json!({"results": results, "ok": ok, "failed": failed}),
        ))
    }
}

/// One item's entry: the status and body `POST /api/feedback` would have answered (an error's
/// body without the request id, which is the batch's).
fn item_result(index: usize, outcome: Result<Value, Error>) -> Value {
    match outcome {
        Ok(body) => json!({"status": 200, "body": body}),
        Err(e) => {
            if e.is_server_side() {
                tracing::error!(index, code = e.code(), error = %e, "batch vote failed");
            } else {
                tracing::debug!(index, code = e.code(), error = %e, "batch vote refused");
            }
            json!({
                "status": e.status().as_u16(),
                "body": {"error": e.public_message(), "code": e.code()},
            })
        }
    }
}
