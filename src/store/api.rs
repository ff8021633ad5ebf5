//! The [`Store`] contract: the trait every backend implements, its error and the types it
//! takes and returns (deliveries, outcomes, statistics). Re-exported from `store`, which adds
//! `open` / `migrate`; the backends import this module, never `store` itself.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;

pub use super::review::{
    Backlog, ListQuery, ReviewCursor, ReviewScope, ReviewedVote, SummaryCell, SummaryQuery,
};
pub use super::state::{DeliveryCursor, DeliveryState};
pub use crate::domain::{FeedbackValue, LinkRecord, MessageLink, VoteKey};

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the connection (includes authentication and
    /// TLS failures, with the reason).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A query failed for another reason (constraint, serialization, bug).
    #[error("store query failed: {0}")]
    Query(String),
    /// Stored data could not be decoded into domain types.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Migrations failed or the schema is newer than this binary.
    #[error("store schema problem: {0}")]
    Schema(String),
}

/// The answer to [`Store::claim_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The message was new and is now linked to the caller (open).
    Created,
    /// The message was already the caller's (it is marked open again).
    Owned,
    /// The message belongs to someone else; nothing was written.
    OtherUser,
}

/// A user's current vote on a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    pub key: VoteKey,
    pub chat_id: String,
    pub value: FeedbackValue,
    pub comment: Option<String>,
    /// The correction this vote carries (the user's expected response), if any.
    pub expected_response: Option<String>,
    pub updated_at: SystemTime,
}

/// A vote to store (the store sets `updated_at`).
#[derive(Debug, Clone, PartialEq)]
pub struct NewVote {
    pub key: VoteKey,
    pub chat_id: String,
    pub value: FeedbackValue,
    pub comment: Option<String>,
}

/// A vote offered to [`Store::vote_on_link`]: written only if its message's link allows it
/// outright. Unlike [`NewVote`], the chat may be left to the link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkedVote {
    pub key: VoteKey,
    /// The chat the voter named; `None`: the link's.
    pub chat_id: Option<String>,
    pub value: FeedbackValue,
    pub comment: Option<String>,
}

/// What [`Store::vote_on_link`] found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkedVoteWrite {
    /// The message's link as the write saw it (`None`: the message is unknown).
    pub link: Option<MessageLink>,
    /// The vote's delivery, when the vote was written; `None`: nothing was written, and the
    /// caller takes the general path ([`Store::upsert_vote_corrected`]) if it still may.
    pub written: Option<Delivery>,
    /// Whether `written` was also claimed for the caller (see [`Store::vote_on_link`]'s
    /// `claim`): it holds the lease, as if [`Store::claim`] had returned it.
    pub claimed: bool,
}

/// What a vote write does to the user's correction of the message (see
/// [`Store::upsert_vote_corrected`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorrectionChange {
    /// Leave it as it is (what [`Store::upsert_vote`] does).
    Keep,
    /// The vote carries this correction.
    Set(String),
    /// The vote carries none: an existing correction is deleted.
    Clear,
}

/// What a vote write enqueued: the vote's delivery, and the correction's when the correction
/// changed (its key is [`VoteKey::correction`]).
#[derive(Debug, Clone, PartialEq)]
pub struct VoteWrite {
    pub vote: Delivery,
    pub correction: Option<Delivery>,
}

/// What MLflow should end up holding for a (message, user, name).
#[derive(Debug, Clone, PartialEq)]
pub enum Desired {
    /// One assessment with this value and rationale.
    Upsert {
        value: FeedbackValue,
        comment: Option<String>,
    },
    /// No assessment.
    Delete,
}

/// The initial state of a delivery enqueued with a vote change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueue {
    /// Due now.
    Pending,
    /// Pending, but due to the background worker only after `hold`: the caller attempts it
    /// inline at once ([`Store::claim`] ignores the due time), so a worker polling meanwhile
    /// does not take the fresh vote from under it. Should the inline attempt never happen (a
    /// crash), the worker delivers it after `hold`.
    Inline { hold: Duration },
    /// Parked with this reason (e.g. `no_trace_id`, `no_experiment_id`). Only reasons starting
    /// with [`AWAITING_TRACE`] are woken by links.
    Waiting { reason: String },
}

/// Deliveries parked (`waiting`) with a reason starting with this wait for their message's
/// trace: recording a link that carries a trace id or client request id wakes them (the link
/// owner's only), and [`Store::upsert_vote`] enqueues them as `pending` at once if the voter's
/// link already has one. A
/// delivery held for any other reason (e.g. `no_experiment_id`: MLflow is not configured)
/// stays `waiting` until it is released with [`Store::requeue_held`] (the delivery worker does
/// so for `no_experiment_id` when it starts with MLflow configured) or an operator requeues it
/// (`feedback-proxy deliveries retry --state waiting`). The SQL of both backends matches it as `last_error LIKE 'no_trace_id%'`.
pub const AWAITING_TRACE: &str = "no_trace_id";

/// One outbox row: the desired MLflow state for a (message, user, name) and how far delivery
/// got.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub key: VoteKey,
    pub chat_id: String,
    pub desired: Desired,
    /// Bumped by every vote change; attempts report the version they worked on.
    pub version: i64,
    /// The MLflow assessment currently holding this vote, if one is known to exist.
    pub assessment_id: Option<String>,
    /// Bumped each time the assessment is deleted, so that a deterministic assessment id
    /// derived from (key, generation) is fresh for a re-created assessment.
    pub generation: i64,
    /// The trace the assessment lives on (resolved at delivery time, then remembered).
    pub trace_id: Option<String>,
    pub state: DeliveryState,
    /// Attempts since the current version was enqueued.
    pub attempts: i32,
    pub next_attempt_at: SystemTime,
    /// When the current version was enqueued (the retry horizons count from here).
    pub enqueued_at: SystemTime,
    pub last_error: Option<String>,
    pub updated_at: SystemTime,
    /// How many times this delivery has been claimed (never reset): the fencing token of the
    /// current lease. An attempt finishes with the value its claim returned (see
    /// [`Delivery::ticket`]).
    pub claims: i64,
}

impl Delivery {
    /// What [`Store::finish`] needs to end an attempt on this claimed delivery.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            key: self.key.clone(),
            version: self.version,
            claim: self.claims,
        }
    }
}

impl DeliveryCursor {
    /// The cursor of `d` (the last row of a page).
    pub fn of(d: &Delivery) -> Self {
        Self {
            updated_at: d.updated_at,
            key: d.key.clone(),
        }
    }
}

/// Names one attempt: the delivery, the version it worked on and the claim it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub key: VoteKey,
    pub version: i64,
    /// [`Delivery::claims`] as the claim returned it.
    pub claim: i64,
}

/// How [`Store::finish`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// The outcome was applied and the lease released.
    Applied,
    /// A newer vote arrived meanwhile: the fact was recorded and the lease released, the
    /// outcome dropped (the newer version is pending, due now).
    Superseded,
    /// The lease had expired and the delivery was claimed again since: the other claim's
    /// lease and outcome are left alone; of the fact, only an assessment id the delivery does
    /// not know yet is recorded (so the assessment is not created twice).
    LeaseLost,
    /// The delivery no longer exists.
    Missing,
}

/// What an attempt learnt about the assessment, recorded whatever the version.
#[derive(Debug, Clone, PartialEq)]
pub enum AssessmentFact {
    /// Nothing new.
    Unchanged,
    /// An assessment with this id exists on `trace_id` and holds the user's vote.
    Exists {
        assessment_id: String,
        trace_id: String,
    },
    /// The assessment is gone (deleted by us or found missing); `generation` is bumped.
    Gone,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// MLflow holds the desired state: `done` if the version is still current.
    Done,
    /// Try again at `at` (state stays `pending`), recording `error`.
    Retry { at: SystemTime, error: String },
    /// Park as `waiting` with `reason` (until a link wakes it or an operator requeues it).
    Park { reason: String },
    /// Give up: `dead` with `error`.
    Dead { error: String },
}

/// Counts for metrics and `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeliveryStats {
    pub pending: u64,
    pub waiting: u64,
    pub done: u64,
    pub dead: u64,
    /// Age of the oldest pending delivery (by `enqueued_at`).
    #[serde(serialize_with = "ser_opt_secs")]
    pub oldest_pending: Option<Duration>,
}

fn ser_opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// Pool figures for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStatus {
    pub size: usize,
    pub available: usize,
}

/// The store contract. All methods are safe to call concurrently from many tasks and (for
/// Postgres) many processes.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"postgres"` or `"sqlite"`.
    fn kind(&self) -> &'static str;

    /// Cheap round trip proving the store answers (for `/readyz`).
    async fn health(&self) -> Result<(), StoreError>;

    /// Inserts an open link for `link.message_id` owned by `link.user_id` unless the message
    /// exists; reports who owns it. Used when a client supplies its own message id.
    async fn claim_message(&self, link: &LinkRecord) -> Result<Claim, StoreError>;

    /// Applies link writes in order, in as few transactions as the backend likes (see
    /// [`LinkRecord`] for the merge rules). For every link that ends up with a trace id or a
    /// client request id, the `waiting` deliveries of the message's OWNER (the link's user;
    /// other users' deliveries on it are left alone) become `pending`, due now, with
    /// `attempts = 0`, `enqueued_at = now` and `last_error = NULL` (like [`Store::requeue`]:
    /// time spent parked does not count against the retry horizon).
    async fn record_links(&self, links: &[LinkRecord]) -> Result<(), StoreError>;

    async fn get_link(&self, message_id: &str) -> Result<Option<MessageLink>, StoreError>;

    /// Remembers a trace id found by client-request-id search (only if none is set yet).
    async fn set_link_trace_id(&self, message_id: &str, trace_id: &str) -> Result<(), StoreError>;

    /// In ONE transaction: upserts the vote, and upserts its delivery with
    /// `desired = Upsert{value, comment}`, `version + 1` (1 for a new row), `attempts = 0`,
    /// `enqueued_at = next_attempt_at = now`, state from `enqueue`, `last_error = NULL` (or the
    /// waiting reason). An existing lease is KEPT (the holder finishes, then the new version is
    /// due at once). `assessment_id`, `generation` and `trace_id` are kept. Returns the delivery
    /// as stored.
    ///
    /// `Enqueue::Waiting` is a decision the caller made from a link it read BEFORE this call;
    /// if by the time the vote commits the message's link is the voter's and has a trace id or
    /// a client request id (a concurrent [`Store::record_links`] already ran its wake-up), the
    /// delivery is stored `pending` instead, so that it can never stay parked past its wake-up.
    /// Backends
    /// serialize this check with `record_links` per message.
    async fn upsert_vote(&self, vote: &NewVote, enqueue: &Enqueue) -> Result<Delivery, StoreError> {
        let w = self
            .upsert_vote_corrected(vote, &CorrectionChange::Keep, enqueue)
            .await?;
        Ok(w.vote)
    }

    /// The vote path's first store call, in ONE statement where the backend can (Postgres: one
    /// round trip instead of a link read and a transaction). Reads the message's link and, when
    ///
    /// - the link is the voter's (`vote.key.user_id`),
    /// - the chat is known and agrees: `vote.chat_id` if given, which the link's (if it has
    ///   one) must equal, else the link's, which must be set, and
    /// - unless `needs_trace` is false, the link has a trace id or a client request id or is
    ///   still open,
    ///
    /// writes what [`Store::upsert_vote`] writes with `enqueue`, atomically with that read.
    /// Otherwise it writes nothing and returns the link, for the caller's own checks and
    /// errors.
    ///
    /// What the caller's delivery attempt would ask for next comes with the write: a delivery
    /// that knows no trace takes the link's trace id, and with `claim = Some(lease)` a pending
    /// delivery is claimed as [`Store::claim`] would claim its new version, unless another
    /// claim's lease is live (kept, as every vote keeps it). `claimed` says which. `enqueue` must not wait for a trace ([`AWAITING_TRACE`]): that path needs the
    /// per-message serialization with [`Store::record_links`] that only
    /// [`Store::upsert_vote_corrected`] does; such an enqueue writes nothing.
    ///
    /// The default reads the link and writes nothing (right for an embedded store, where a
    /// second call costs no round trip).
    async fn vote_on_link(
        &self,
        vote: &LinkedVote,
        enqueue: &Enqueue,
        needs_trace: bool,
        claim: Option<Duration>,
    ) -> Result<LinkedVoteWrite, StoreError> {
        let _ = (enqueue, needs_trace, claim);
        Ok(LinkedVoteWrite {
            link: self.get_link(&vote.key.message_id).await?,
            written: None,
            claimed: false,
        })
    }

    /// [`Store::upsert_vote`], and in the same transaction the user's correction of the
    /// message: the vote row keeps the text (`expected_response`), and when it differs from what
    /// the vote carried before, the correction's delivery ([`VoteKey::correction`]) is upserted
    /// like a vote's (`desired = Upsert{value: the text as a string}` or `Delete` for
    /// [`CorrectionChange::Clear`], `version + 1`, state from `enqueue`, the same link check).
    /// An unchanged correction enqueues nothing (`VoteWrite::correction` is `None`).
    async fn upsert_vote_corrected(
        &self,
        vote: &NewVote,
        correction: &CorrectionChange,
        enqueue: &Enqueue,
    ) -> Result<VoteWrite, StoreError>;

    /// In ONE transaction: deletes the vote and sets its delivery to `desired = Delete`,
    /// `version + 1`, pending and due after `hold` (see [`Enqueue::Inline`]; zero: now),
    /// keeping lease, assessment id, generation, trace id. `None` (and nothing written) if the
    /// user has no such vote.
    async fn retract_vote(
        &self,
        key: &VoteKey,
        hold: Duration,
    ) -> Result<Option<Delivery>, StoreError> {
        Ok(self
            .retract_vote_corrected(key, hold)
            .await?
            .map(|w| w.vote))
    }

    /// [`Store::retract_vote`]; when the vote carried a correction, its delivery is set to
    /// `Delete` in the same transaction (pending, due after `hold`) and returned too.
    async fn retract_vote_corrected(
        &self,
        key: &VoteKey,
        hold: Duration,
    ) -> Result<Option<VoteWrite>, StoreError>;

    /// The links of `user_id`'s messages in chat `chat_id`, oldest first, at most `limit`:
    /// where a chat rating finds the chat's first trace.
    async fn chat_links(
        &self,
        chat_id: &str,
        user_id: &str,
        limit: u32,
    ) -> Result<Vec<MessageLink>, StoreError>;

    /// The user's votes in a chat, ordered by message id then name.
    async fn list_votes(&self, chat_id: &str, user_id: &str) -> Result<Vec<Vote>, StoreError>;

    /// Claims up to `limit` deliveries that are `pending`, due (`next_attempt_at <= now`) and not
    /// leased (or whose lease expired), oldest due first; each gets a lease until `now + lease`
    /// and `attempts + 1`, `claims + 1`. Two concurrent callers never receive the same delivery (Postgres:
    /// `FOR UPDATE SKIP LOCKED`).
    async fn claim_due(&self, limit: u32, lease: Duration) -> Result<Vec<Delivery>, StoreError>;

    /// Claims one specific delivery if it is `pending`, at `version`, and not leased (due time
    /// is ignored: this is the inline attempt right after a vote). Same lease/attempts effect
    /// as [`Store::claim_due`].
    async fn claim(
        &self,
        key: &VoteKey,
        version: i64,
        lease: Duration,
    ) -> Result<Option<Delivery>, StoreError>;

    /// Ends the attempt `ticket` names. If its claim still holds the delivery: releases the
    /// lease, records `fact`, and applies `outcome` only if the version is still current (a
    /// newer vote stays pending, due now). If the delivery has been claimed again since (the
    /// lease expired): see [`Finished::LeaseLost`].
    async fn finish(
        &self,
        ticket: &Ticket,
        fact: &AssessmentFact,
        outcome: &Outcome,
    ) -> Result<Finished, StoreError>;

    /// Extends the lease of the attempt `ticket` names to `lease` from now, if its claim still
    /// holds the delivery (not finished, not claimed again since). `false`: the claim is gone
    /// and the attempt must stop. Attempts renew every third of the lease, so a crashed
    /// replica's claims are free again within one (short) lease.
    async fn renew_lease(&self, ticket: &Ticket, lease: Duration) -> Result<bool, StoreError>;

    /// Deliveries for operators, newest first, optionally only in `state`.
    async fn list_deliveries(
        &self,
        state: Option<DeliveryState>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.list_deliveries_after(state, limit, None).await
    }

    /// One page of [`Store::list_deliveries`]: the rows that sort after `after` (the cursor of
    /// the last row of the previous page). Keyset order: `updated_at` descending, then the key
    /// ascending, so pages neither repeat nor skip a row that did not change meanwhile; a row
    /// updated while paging moves to the front and is not seen again by that walk.
    async fn list_deliveries_after(
        &self,
        state: Option<DeliveryState>,
        limit: u32,
        after: Option<&DeliveryCursor>,
    ) -> Result<Vec<Delivery>, StoreError>;

    /// The most common `last_error`s of dead deliveries, most frequent first, at most `limit`.
    async fn dead_reasons(&self, limit: u32) -> Result<Vec<(String, u64)>, StoreError>;

    /// Makes deliveries in `state` (`dead` or `waiting`) pending and due now, resetting
    /// `attempts` and `enqueued_at` (`last_error` is kept for the record); only `key` if given.
    /// Returns how many changed.
    async fn requeue(&self, state: DeliveryState, key: Option<&VoteKey>)
    -> Result<u64, StoreError>;

    /// Makes `waiting` deliveries parked with exactly `reason` pending and due now, resetting
    /// `attempts`, `enqueued_at` and `last_error`. Returns how many changed.
    async fn requeue_held(&self, reason: &str) -> Result<u64, StoreError>;

    async fn delivery_stats(&self) -> Result<DeliveryStats, StoreError>;

    /// Current votes in `q.scope` counted per bucket, assessment name and value, from the
    /// hourly rollup (cells whose count is zero are left out). See `store::review`.
    async fn review_summary(&self, q: &SummaryQuery) -> Result<Vec<SummaryCell>, StoreError>;

    /// The pending, waiting and dead deliveries (see [`Backlog`]).
    async fn review_backlog(&self) -> Result<Backlog, StoreError>;

    /// One page of current votes in `q.scope` matching its filters, newest first (keyset:
    /// `updated_at` descending, then the key descending), after `after`. A vote cast while a
    /// walk pages is newer than its cursor and is not seen by it; pages neither repeat nor skip
    /// a vote that did not change meanwhile.
    async fn review_votes(
        &self,
        q: &ListQuery,
        after: Option<&ReviewCursor>,
    ) -> Result<Vec<ReviewedVote>, StoreError>;

    /// Connection pool figures (SQLite: 1/1).
    fn pool_status(&self) -> PoolStatus;
}

/// A shared store handle.
pub type SharedStore = Arc<dyn Store>;

/// What [`migrate`](super::migrate) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// Schema version found.
    pub from: i32,
    /// Schema version now (the newest this binary knows).
    pub to: i32,
}

impl From<crate::auth::password::PasswordError> for StoreError {
    fn from(e: crate::auth::password::PasswordError) -> Self {
        Self::Unavailable(e.0)
    }
}
