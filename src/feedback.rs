//! The feedback API (CONTRACT §4): `POST /api/feedback`, `GET /api/feedback/{chatId}`,
//! `DELETE /api/feedback/{chatId}/{messageId}`, `POST /api/feedback/batch` (`batch.rs`),
//! `GET /api/feedback/schema` (`schema.rs`); and the chat app template's contract on the same
//! store, so that its client works unchanged behind an `ai-sdk-app` route: `POST /api/feedback
//! {messageId, feedbackType}` answered `{success, mlflowAssessmentId}` (plus this API's fields),
//! and `GET /api/feedback/chat/{chatId}` answered `{<messageId>: {messageId, feedbackType,
//! assessmentId: null}}` (the template's own shape; its server never returns an id there). The
//! template has no retraction route; `DELETE /api/feedback/{chatId}/{messageId}` serves its votes
//! too.
//!
//! A vote is committed to the store together with its delivery before anything is sent to
//! MLflow; a 200 always means the vote is durable. Then one delivery attempt runs inline under a
//! short deadline and its outcome becomes `mlflowStatus`; whatever it does not finish, the
//! background worker (`delivery.rs`) does.
//!
//! Abuse: POST and DELETE need `content-type: application/json` (a cross-site form cannot send
//! it without a CORS preflight, so a user's platform session cannot be used to vote from another
//! site); there are no CORS headers unless `feedback.cors_origins` lists the origin; each user
//! has a token-bucket rate limit; a vote on a message streamed to another user is refused (403),
//! and one on a message that has no link at all is refused too (404 `UNKNOWN_MESSAGE`), so that
//! no vote can sit on an id before its owner streams it.

mod batch;
mod chat;
pub mod delivery;
pub mod input;
pub mod label;
pub mod label_sync;
mod list;
pub mod pace;
mod schema;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::body::ReqBody;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{HeaderMap, Request, Response, StatusCode};
use serde_json::{Map, Value, json};

use crate::body::{Body, CollectError, collect_limited, json_response};
use crate::config::{FeedbackConfig, IdentityConfig};
use crate::error::Error;
use crate::identity;
use crate::metrics::{Metrics, StatusLabel, VoteLabels};
use crate::proxy::link::LinkRecorder;
use crate::proxy::media_type;
use crate::route::Route;
use crate::store::{
    CorrectionChange, Enqueue, FeedbackValue, LinkedVote, NewVote, SharedStore, VoteKey, VoteWrite,
};
use delivery::{Deliverer, NO_EXPERIMENT_ID, NO_TRACE_ID, Status};

/// The feedback service: handlers plus the shared deliverer.
/// How long a vote that found no link waits for this replica's link writer to write what it
/// has queued or held (one store transaction when the store is up).
const LINK_FLUSH_WAIT: Duration = Duration::from_secs(1);

pub struct Feedback {
    config: FeedbackConfig,
    identity: IdentityConfig,
    store: SharedStore,
    deliverer: Arc<Deliverer>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    metrics: Arc<Metrics>,
    /// `server.request_body_timeout`, for the votes' bodies.
    body_timeout: Duration,
    /// This replica's link writer: a vote that finds no link has it write what it holds.
    links: LinkRecorder,
}

impl Feedback {
    pub fn new(
        config: FeedbackConfig,
        identity: IdentityConfig,
        store: SharedStore,
        deliverer: Arc<Deliverer>,
        metrics: Arc<Metrics>,
        body_timeout: Duration,
        links: LinkRecorder,
    ) -> Self {
        let limiter = config.rate_limit.and_then(|rl| {
            let burst = NonZeroU32::new(rl.burst)?;
            let period = Duration::from_secs_f64(1.0 / rl.per_second);
            let quota = Quota::with_period(period)?.allow_burst(burst);
            Some(RateLimiter::keyed(quota))
        });
        Self {
            config,
            identity,
            store,
            deliverer,
            limiter,
            metrics,
            body_timeout,
            links,
        }
    }

    pub fn deliverer(&self) -> &Arc<Deliverer> {
        &self.deliverer
    }

    /// Forgets rate-limit state of users idle long enough to be back at a full bucket (called
    /// periodically so that the map does not grow without bound).
    pub fn prune_rate_limits(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Serves a feedback route. Errors leave as `Err`: the service stack turns them into the
    /// response and logs them, once, with the request's span (`app::respond`); CORS headers
    /// are added around this by tower-http's `CorsLayer` (`app::stack`), on errors too.
    pub async fn handle(
        &self,
        route: Route<'_>,
        req: Request<ReqBody>,
    ) -> Result<Response<Body>, Error> {
        match route {
            Route::FeedbackSubmit => self.submit(req).await,
            Route::FeedbackBatch => self.batch(req).await,
            Route::FeedbackSchema => self.schema(req.headers()),
            Route::FeedbackList { chat_id, template } => {
                let chat_id = decode_segment("chatId", chat_id)?;
                if template {
                    self.template_list(req.headers(), &chat_id).await
                } else {
                    self.list(req.headers(), &chat_id).await
                }
            }
            Route::FeedbackRetract {
                chat_id,
                message_id,
            } => {
                let chat_id = decode_segment("chatId", chat_id)?;
                let message_id = decode_segment("messageId", message_id)?;
                self.retract(req, &chat_id, &message_id).await
            }
            Route::FeedbackRetractChat { chat_id } => {
                let chat_id = decode_segment("chatId", chat_id)?;
                self.retract_chat(req, &chat_id).await
            }
            _ => Err(Error::NotFound("no such feedback route".into())),
        }
    }

    /// The user, after the rate limit.
    fn user(&self, headers: &HeaderMap) -> Result<String, Error> {
        self.user_charged(headers, 1)
    }

    /// The user, after taking `cost` tokens (at most the burst) from their rate limit at once.
    fn user_charged(&self, headers: &HeaderMap, cost: u32) -> Result<String, Error> {
        let user = identity::user(headers, &self.identity)?;
        if let (Some(limiter), Some(rl)) = (&self.limiter, self.config.rate_limit) {
            let n = NonZeroU32::new(cost.clamp(1, rl.burst.max(1))).unwrap_or(NonZeroU32::MIN);
            match limiter.check_key_n(&user, n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    return Err(Error::RateLimited { retry_after: wait });
                }
                // Cannot happen (the cost is capped at the burst); refuse like a full bucket.
                Err(_) => {
                    return Err(Error::RateLimited {
                        retry_after: Duration::from_secs(1),
                    });
                }
            }
        }
        Ok(user)
    }

    /// How a vote on a message the voter owns is enqueued when its trace is known or coming
    /// (its link has a trace id, a client request id or is still streaming), and whether it
    /// needs that: with MLflow configured it is attempted inline at once; without, it waits
    /// for MLflow whatever the link holds. A vote that needs a trace it does not have waits for
    /// it instead (`no_trace_id`).
    fn fast_enqueue(&self) -> (Enqueue, bool) {
        if self.deliverer.enabled() {
            let hold = self.deliverer.inline_hold();
            (Enqueue::Inline { hold }, true)
        } else {
            let reason = NO_EXPERIMENT_ID.into();
            (Enqueue::Waiting { reason }, false)
        }
    }

    async fn submit(&self, req: Request<ReqBody>) -> Result<Response<Body>, Error> {
        require_json(req.headers())?;
        let user = self.user(req.headers())?;
        let body = read_body(req, self.config.max_body_bytes, self.body_timeout).await?;
        let vote = input::parse_vote(&body, &self.config)?;
        let out = self.commit(user, vote).await?;
        Ok(json_response(StatusCode::OK, &out))
    }

    /// Authorises, stores and (inline, briefly) delivers one validated vote of `user`: the
    /// whole of `POST /api/feedback` after parsing, shared with the batch endpoint. The answer
    /// is the 200 body.
    async fn commit(&self, user: String, vote: input::VoteRequest) -> Result<Value, Error> {
        let Some(message_id) = vote.message_id.clone() else {
            return self.submit_chat(user, vote).await;
        };
        // Ownership: a vote is stored only on a message whose link names the voter. Links never
        // change owner once written (the store's invariant), so this check cannot be raced by
        // another request on this replica or any other. A message with no link is unknown: a
        // vote on it would squat an id somebody else may stream later, so nothing is stored.
        //
        // One exception keeps a vote from being stranded when its link was lost (given up during
        // a long store outage): the proxy sent the answer with a client request id derived from
        // the message id and this voter, so MLflow can be asked for it. Only a trace made for
        // this voter is taken, and the link it yields is owned by the voter.
        //
        // The usual vote (a known message of the voter's, its trace known or coming, no
        // correction) is checked and written in ONE store call: `vote_on_link` writes only when
        // every check below would pass and the enqueue below would be `fast`'s. Anything else
        // comes back unwritten, with the link, and takes the general path.
        // With MLflow, that call also claims the delivery for the inline attempt below, and a
        // new delivery takes the link's trace id: the attempt then needs neither round trip.
        // (Should the request be dropped before its attempt starts, the worker delivers the vote
        // once that lease, `delivery.lease`, runs out, rather than after the inline hold.)
        let fast = (vote.correction == CorrectionChange::Keep).then(|| self.fast_enqueue());
        let claimed_at = std::time::Instant::now();
        let (mut link, fast_write) = match &fast {
            Some((enqueue, needs_trace)) => {
                let offered = LinkedVote {
                    key: VoteKey {
                        message_id: message_id.clone(),
                        user_id: user.clone(),
                        name: vote.name.clone(),
                    },
                    chat_id: vote.chat_id.clone(),
                    value: vote.value.clone(),
                    comment: vote.comment.clone(),
                };
                let r = self
                    .store
                    .vote_on_link(
                        &offered,
                        enqueue,
                        *needs_trace,
                        self.deliverer.inline_lease(),
                    )
                    .await?;
                (r.link, r.written.map(|d| (d, r.claimed)))
            }
            None => (self.store.get_link(&message_id).await?, None),
        };
        if link.is_none() && self.links.flush(LINK_FLUSH_WAIT).await {
            // The answer may have ended a moment ago on this replica, its link still queued,
            // or held through a store outage that has just ended.
            link = self.store.get_link(&message_id).await?;
        }
        if link.is_none() {
            let key = VoteKey {
                message_id: message_id.clone(),
                user_id: user.clone(),
                name: vote.name.clone(),
            };
            let chat = vote.chat_id.as_deref().unwrap_or_default();
            if self.deliverer.recover_link(&key, chat).await {
                link = self.store.get_link(&message_id).await?;
            }
        }
        let Some(link) = link else {
            return Err(Error::UnknownMessage(format!(
                "message {} is not known: vote with the x-message-id of an answer you received \
                 (if it has just ended, its link may not be recorded yet: retry shortly)",
                message_id
            )));
        };
        if link.user_id != user {
            return Err(Error::Forbidden(format!(
                "message {} belongs to another user",
                message_id
            )));
        }
        let chat_id = match (&link.chat_id, vote.chat_id) {
            (Some(chat), Some(voted)) if *chat != voted => {
                return Err(Error::bad_request(
                    "CHAT_MISMATCH",
                    format!("chatId: message {} belongs to chat {chat}", message_id),
                ));
            }
            (_, Some(voted)) => voted,
            // The template's form names no chat: the message's own.
            (Some(chat), None) => chat.clone(),
            (None, None) => {
                return Err(Error::bad_request(
                    "MISSING_FIELD",
                    format!(
                        "chatId: required (the chat of message {} is not known)",
                        message_id
                    ),
                ));
            }
        };
        let traced = link.trace_id.is_some() || link.client_request_id.is_some() || link.open;
        let enqueue = match self.fast_enqueue() {
            (e, needs_trace) if traced || !needs_trace => e,
            _ => Enqueue::Waiting {
                reason: NO_TRACE_ID.into(),
            },
        };
        let key = VoteKey {
            message_id: message_id.clone(),
            user_id: user,
            name: vote.name.clone(),
        };
        let mut claimed = None;
        let written = match fast_write {
            Some((vote, was_claimed)) => {
                debug_assert_eq!(fast.map(|(e, _)| e).as_ref(), Some(&enqueue));
                if was_claimed {
                    claimed = Some(vote.clone());
                }
                VoteWrite {
                    vote,
                    correction: None,
                }
            }
            None => {
                self.store
                    .upsert_vote_corrected(
                        &NewVote {
                            key: key.clone(),
                            chat_id,
                            value: vote.value.clone(),
                            comment: vote.comment.clone(),
                        },
                        &vote.correction,
                        &enqueue,
                    )
                    .await?
            }
        };
        let delivery = written.vote;
        self.metrics
            .votes_accepted
            .get_or_create(&VoteLabels {
                name: vote.name.clone(),
                value: vote_value_label(&vote.value),
            })
            .inc();
        let (status, correction) = match enqueue {
            Enqueue::Inline { .. } | Enqueue::Pending => {
                let vote_attempt = async {
                    match claimed {
                        Some(d) => self.deliverer.attempt_claimed(d, claimed_at).await,
                        None => self.deliverer.attempt_inline(&key, delivery.version).await,
                    }
                };
                let correction_attempt = async {
                    match &written.correction {
                        Some(c) => Some(self.deliverer.attempt_inline(&c.key, c.version).await),
                        None => None,
                    }
                };
                tokio::join!(vote_attempt, correction_attempt)
            }
            Enqueue::Waiting { reason } if reason == NO_EXPERIMENT_ID => (
                Status::NoExperimentId,
                written.correction.as_ref().map(|_| Status::NoExperimentId),
            ),
            Enqueue::Waiting { .. } => (
                Status::NoTraceId,
                written.correction.as_ref().map(|_| Status::NoTraceId),
            ),
        };
        let trace_id = status
            .trace_id()
            .map(str::to_owned)
            .or(delivery.trace_id)
            .or(link.trace_id);
        let mut out = Map::new();
        out.insert("success".into(), Value::Bool(true));
        if vote.template {
            if let Some(a) = status.assessment_id() {
                out.insert("mlflowAssessmentId".into(), Value::String(a.to_owned()));
            }
        }
        if let FeedbackValue::Bool(b) = vote.value {
            out.insert("isUpvoted".into(), Value::Bool(b));
        }
        out.insert("name".into(), Value::String(vote.name));
        out.insert("value".into(), vote.value.to_json());
        if let Some(c) = correction {
            out.insert("correction".into(), correction_fields(&vote.correction, &c));
        }
        self.status_fields(&mut out, &status, trace_id);
        Ok(Value::Object(out))
    }

    fn status_fields(
        &self,
        out: &mut Map<String, Value>,
        status: &Status,
        trace_id: Option<String>,
    ) {
        self.metrics
            .feedback_responses
            .get_or_create(&StatusLabel {
                status: status.as_str(),
            })
            .inc();
        out.insert("mlflowStatus".into(), Value::String(status.as_str().into()));
        if let Some(t) = trace_id {
            out.insert("traceId".into(), Value::String(t));
        }
        if let Some(a) = status.assessment_id() {
            out.insert("assessmentId".into(), Value::String(a.to_owned()));
        }
        if let Status::Error { reason, detail, .. } = status {
            // The client sees the short public reason; MLflow's own words (principal ids,
            // experiment paths) go to the log, in the request's span (its request id).
            tracing::warn!(
                error = %detail,
                "feedback delivery to MLflow failed permanently"
            );
            out.insert("mlflowError".into(), Value::String(reason.clone()));
        }
    }

    async fn retract(
        &self,
        req: Request<ReqBody>,
        chat_id: &str,
        message_id: &str,
    ) -> Result<Response<Body>, Error> {
        require_json(req.headers())?;
        let user = self.user(req.headers())?;
        let name = match query_param(req.uri().query(), "name") {
            Some(n) => n,
            None => self.config.default_name.clone(),
        };
        if !self.config.names.contains_key(&name) {
            return Err(Error::bad_request(
                "UNKNOWN_NAME",
                format!(
                    "name: \"{}\" is not an accepted assessment name",
                    crate::text::echo(&name)
                ),
            ));
        }
        let key = VoteKey {
            message_id: message_id.to_owned(),
            user_id: user,
            name,
        };
        // Only the caller's own vote in this chat can be retracted.
        let votes = self.store.list_votes(chat_id, &key.user_id).await?;
        if !votes.iter().any(|v| v.key == key) {
            return Err(Error::NotFound(format!(
                "you have no {} vote on message {message_id} in chat {chat_id}",
                key.name
            )));
        }
        self.retract_key(&key, &format!("message {message_id} in chat {chat_id}"))
            .await
    }

    /// Retracts the caller's vote `key` (and the correction it carried) and answers.
    async fn retract_key(&self, key: &VoteKey, what: &str) -> Result<Response<Body>, Error> {
        let hold = self.deliverer.inline_hold();
        let Some(written) = self.store.retract_vote_corrected(key, hold).await? else {
            return Err(Error::NotFound(format!(
                "you have no {} vote on {what}",
                key.name
            )));
        };
        let delivery = written.vote;
        let (status, correction) = if self.deliverer.enabled() {
            let correction_attempt = async {
                match &written.correction {
                    Some(c) => Some(self.deliverer.attempt_inline(&c.key, c.version).await),
                    None => None,
                }
            };
            tokio::join!(
                self.deliverer.attempt_inline(key, delivery.version),
                correction_attempt
            )
        } else {
            (
                Status::NoExperimentId,
                written.correction.as_ref().map(|_| Status::NoExperimentId),
            )
        };
        let mut out = Map::new();
        out.insert("success".into(), Value::Bool(true));
        if let Some(c) = correction {
            out.insert(
                "correction".into(),
                correction_fields(&CorrectionChange::Clear, &c),
            );
        }
        let trace_id = status.trace_id().map(str::to_owned).or(delivery.trace_id);
        self.status_fields(&mut out, &status, trace_id);
        Ok(json_response(StatusCode::OK, &Value::Object(out)))
    }
}

fn require_json(headers: &HeaderMap) -> Result<(), Error> {
    match media_type(headers) {
        Some(m) if m.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(Error::UnsupportedMediaType),
    }
}

/// The body of `req` (under `server.request_body_timeout`), at most `limit` bytes.
async fn read_body(
    req: Request<ReqBody>,
    limit: usize,
    timeout: Duration,
) -> Result<bytes::Bytes, Error> {
    let mut body = crate::body::timed(req.into_body(), Some(timeout));
    let collected = collect_limited(&mut body, limit).await;
    if let Err(CollectError::TooLarge { .. }) = &collected {
        crate::body::drain(&mut body).await;
    }
    collected.map_err(|e| match e {
        CollectError::TooLarge { limit } => Error::PayloadTooLarge { limit },
        CollectError::Read(e) => match crate::body::body_timeout_in(e.as_ref()) {
            Some(after) => Error::RequestBodyTimeout { after },
            None => Error::bad_request(
                "BODY_READ_FAILED",
                format!("reading the request body failed: {e}"),
            ),
        },
    })
}

/// A percent-decoded, validated path segment.
fn decode_segment(field: &str, raw: &str) -> Result<String, Error> {
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| Error::bad_request("INVALID_FIELD", format!("{field}: not valid UTF-8")))?;
    input::id(field, &decoded)
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The `value` label of `feedback_proxy_votes_accepted_total`, bounded whatever users send:
/// `true` / `false`, an integer rating from -100 to 100 as written (`4`), the polarity words
/// (`thumbs_up`, ...), else `other_number` or `other`.
pub fn vote_value_label(v: &FeedbackValue) -> String {
    use crate::domain::{NEGATIVE_WORDS, POSITIVE_WORDS};
    match v {
        FeedbackValue::Bool(b) => b.to_string(),
        FeedbackValue::Number(n) if n.fract() == 0.0 && n.abs() <= 100.0 => format!("{n:.0}"),
        FeedbackValue::Number(_) => "other_number".to_owned(),
        FeedbackValue::String(s)
            if POSITIVE_WORDS.contains(&s.as_str()) || NEGATIVE_WORDS.contains(&s.as_str()) =>
        {
            s.clone()
        }
        FeedbackValue::String(_) | FeedbackValue::List(_) => "other".to_owned(),
    }
}

/// The `correction` object of an answer: the correction the vote now carries and how its
/// delivery went (`mlflowStatus` and `assessmentId` as for the vote).
fn correction_fields(change: &CorrectionChange, status: &Status) -> Value {
    let text = match change {
        CorrectionChange::Set(t) => Value::String(t.clone()),
        CorrectionChange::Clear | CorrectionChange::Keep => Value::Null,
    };
    let mut out = json!({ "expectedResponse": text, "mlflowStatus": status.as_str() });
    if let Some(a) = status.assessment_id() {
        out["assessmentId"] = Value::String(a.to_owned());
    }
    out
}
