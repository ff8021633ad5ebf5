//! Chat ratings as MLflow session assessments.
//!
//! MLflow 3.17.2 has no session object on the server: a session is the traces whose metadata
//! `mlflow.trace.session` holds the same id, and a session-level assessment is an ordinary
//! assessment on the session's chronologically first trace whose own metadata carries
//! `mlflow.trace.session: <session id>` (`mlflow.genai.evaluation.session_utils`:
//! `get_first_trace_in_session`, `evaluate_session_level_scorers`; the UI tells session
//! assessments from trace assessments by that metadata key). docs/mlflow-notes.md says what was
//! verified.
//!
//! So a chat rating lands on the first trace of the rater's answers in that chat: the oldest of
//! the rater's links in the chat that has a trace id (or a client request id to find it by).
//! While the first answer is still streaming, or its trace is not searchable yet, the rating
//! waits like a vote on an unflushed trace; with no traced answer at all it parks until a link
//! wakes it (`Store::record_links` wakes chat ratings too), and the worker's lookup round
//! requeues any whose chat has gained a trace meanwhile.

use super::{Attempt, Deliverer};
use crate::mlflow::{MlflowClient, TraceInfo};
use crate::store::{Delivery, DeliveryState, MessageLink, SharedStore, VoteKey};

/// The metadata key of a trace's session, and of a session-level assessment.
pub const SESSION: &str = "mlflow.trace.session";

/// Most links of one chat read to find its first trace.
const CHAT_LINKS: u32 = 50;

/// The session id a chat rating names: the first trace's own session, else the chat id (the
/// proxy sends it as `context.conversation_id`, which agents built on the MLflow agent server
/// record as the session).
pub(super) fn session_of(info: &TraceInfo, chat_id: &str) -> String {
    info.metadata
        .get(SESSION)
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| chat_id.to_owned())
}

/// Where the first trace of a chat's links is to be found, oldest link first.
#[derive(Debug, PartialEq)]
enum First<'a> {
    Trace(&'a str),
    /// Its trace must be searched for by this client request id.
    Search(&'a MessageLink, &'a str),
    /// The oldest link that may still get a trace is streaming.
    Streaming,
    /// No answer in the chat has (or can get) a trace.
    None,
}

/// Closed links without any id made no trace: the next answer's trace is the first.
fn first(links: &[MessageLink]) -> First<'_> {
    for l in links {
        if let Some(t) = &l.trace_id {
            return First::Trace(t);
        }
        if let Some(c) = &l.client_request_id {
            return First::Search(l, c);
        }
        if l.open {
            return First::Streaming;
        }
    }
    First::None
}

/// Whether a chat rating's chat has an answer it could land on (a trace or a stream that may
/// yield one): votes on such a chat are attempted at once rather than parked.
pub fn chat_is_traced(links: &[MessageLink]) -> bool {
    first(links) != First::None
}

impl Deliverer {
    /// The first trace of `chat` among the rater's answers. `Ok(None)`: none yet (park).
    pub(super) async fn resolve_chat_trace(
        &self,
        mlflow: &MlflowClient,
        d: &Delivery,
        chat: &str,
    ) -> Result<Option<String>, Attempt> {
        let links = self
            .store
            .chat_links(chat, &d.key.user_id, CHAT_LINKS)
            .await
            .map_err(|e| self.store_failure(d, &e))?;
        match first(&links) {
            First::Trace(t) => Ok(Some(t.to_owned())),
            First::Search(link, crid) => {
                let Some(exp) = &self.experiment_id else {
                    return Ok(None);
                };
                match mlflow.find_trace_by_client_request_id(exp, crid).await {
                    Ok(Some(t)) => {
                        if let Err(e) = self.store.set_link_trace_id(&link.message_id, &t).await {
                            tracing::warn!(error = %e, "cannot remember the trace id found by search");
                        }
                        Ok(Some(t))
                    }
                    Ok(None) => Err(self.not_yet(
                        d,
                        None,
                        format!("no trace with client_request_id {crid} yet"),
                    )),
                    Err(e) => Err(self.failure(d, None, &e)),
                }
            }
            First::Streaming => {
                Err(self.not_yet(d, None, "the chat's first answer is still streaming".into()))
            }
            First::None => Ok(None),
        }
    }
}

/// For the worker's lookup round: makes a chat rating parked for a trace pending again if its
/// chat has gained one (the wake-up of `record_links` covers this too; this closes the window
/// where the rating was parked just as the link was written).
pub(super) async fn requeue_if_traced(store: &SharedStore, key: &VoteKey, chat: &str) {
    match store.chat_links(chat, &key.user_id, CHAT_LINKS).await {
        Ok(links) if chat_is_traced(&links) => {
            if let Err(e) = store.requeue(DeliveryState::Waiting, Some(key)).await {
                tracing::debug!(%key, error = %e, "cannot requeue a chat rating");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(%key, error = %e, "cannot read a chat's links"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn link(m: &str, trace: Option<&str>, crid: Option<&str>, open: bool) -> MessageLink {
        MessageLink {
            message_id: m.into(),
            chat_id: Some("c".into()),
            user_id: "u".into(),
            trace_id: trace.map(Into::into),
            client_request_id: crid.map(Into::into),
            open,
            route: None,
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_first_trace_is_the_oldest_answer_that_has_or_may_get_one() {
        assert_eq!(first(&[]), First::None);
        let untraced = link("m0", None, None, false);
        let traced = link("m1", Some("tr-1"), None, false);
        assert_eq!(
            first(&[untraced.clone(), traced.clone()]),
            First::Trace("tr-1")
        );
        let streaming = link("m0", None, None, true);
        assert_eq!(first(&[streaming, traced.clone()]), First::Streaming);
        let searched = link("m0", None, Some("req-1"), false);
        assert!(matches!(
            first(&[searched, traced]),
            First::Search(_, "req-1")
        ));
        assert!(!chat_is_traced(&[untraced]));
    }

    #[test]
    fn the_session_is_the_traces_own_else_the_chat() {
        let mut info = TraceInfo {
            trace_id: "tr-1".into(),
            client_request_id: None,
            state: None,
            request_time: None,
            metadata: Default::default(),
            tags: Default::default(),
            assessments: vec![],
        };
        assert_eq!(session_of(&info, "c1"), "c1");
        info.metadata.insert(SESSION.into(), "s-9".into());
        assert_eq!(session_of(&info, "c1"), "s-9");
    }
}
