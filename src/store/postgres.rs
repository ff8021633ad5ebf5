//! Postgres / Lakebase backend: the production store, shared by every replica.
//!
//! - `pool`: connections (hosts, `sslmode`, a fresh password per connection), the deadpool
//!   manager that replaces closed, old and unresponsive connections;
//! - `tls`: rustls with libpq `sslmode` semantics and readable TLS errors;
//! - passwords (static, the app's OAuth token, or minted Lakebase credentials cached until
//!   shortly before they expire) come from `auth::password`;
//! - `migrate`: versioned migrations under a session advisory lock;
//! - `links`, `votes`, `outbox`, `review`: the [`Store`] operations, each with its SQL next to
//!   it; `rows`: every row type they return, decoded by column name.
//!
//! Tables live in their own schema (`store.schema`, default `feedback_proxy`), which every
//! connection puts on its `search_path`. Timestamps come from the database clock (`now()`),
//! except due times chosen by the delivery worker (`Outcome::Retry { at }`).
//!
//! Concurrency: votes and deliveries are written under row locks in one transaction;
//! `claim_due` uses `FOR UPDATE SKIP LOCKED`; `record_links` and a waiting `upsert_vote` take a
//! transaction advisory lock per message (two-int4 key space, namespace `MESSAGE_LOCK`) so
//! that a delivery can never be parked after its wake-up already ran.

#[macro_use]
mod rows;
mod handle;
mod links;
mod migrate;
mod outbox;
mod pool;
mod review;
mod tls;
mod votes;

use std::sync::Arc;

use async_trait::async_trait;
use std::time::Duration;

use crate::config::PgConnect;
use crate::config::StoreConfig;
use crate::store::api::*;
use pool::query_error;

/// What the Postgres backend needs from the rest of the process (password sources).
pub use crate::auth::password::PasswordDeps as Deps;
pub use handle::PgStore;

/// Connects (and migrates, if configured; otherwise checks the schema version). Fails if the
/// database cannot be reached, so that a misconfigured proxy does not start.
pub async fn open(
    pg: &PgConnect,
    config: &StoreConfig,
    deps: Deps,
) -> Result<SharedStore, StoreError> {
    let store = PgStore::new(pg, config, deps)?;
    {
        let mut conn = store.pool.manager().connect().await?;
        if config.migrate {
            migrate::run(&mut conn.client, &config.schema).await?;
        } else {
            migrate::check(&conn.client, &config.schema).await?;
        }
    }
    tracing::info!(
        schema = %config.schema,
        version = migrate::latest(),
        pool_size = config.pool_size,
        password = %config.password,
        "Postgres store ready"
    );
    Ok(Arc::new(store))
}

/// `feedback-proxy migrate`: migrates on a dedicated connection and closes it.
pub async fn migrate(
    pg: &PgConnect,
    config: &StoreConfig,
    deps: Deps,
) -> Result<Migrated, StoreError> {
    let store = PgStore::new(pg, config, deps)?;
    let mut conn = store.pool.manager().connect().await?;
    migrate::run(&mut conn.client, &config.schema).await
}

#[async_trait]
impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.run("health", async {
            let conn = self.conn().await?;
            conn.client
                .simple_query("SELECT 1")
                .await
                .map_err(query_error)?;
            Ok(())
        })
        .await
    }

    async fn claim_message(&self, link: &LinkRecord) -> Result<Claim, StoreError> {
        self.run("claim_message", links::claim_message(self, link))
            .await
    }

    async fn record_links(&self, links: &[LinkRecord]) -> Result<(), StoreError> {
        self.run("record_links", links::record_links(self, links))
            .await
    }

    async fn get_link(&self, message_id: &str) -> Result<Option<MessageLink>, StoreError> {
        self.run("get_link", links::get_link(self, message_id))
            .await
    }

    async fn set_link_trace_id(&self, message_id: &str, trace_id: &str) -> Result<(), StoreError> {
        self.run(
            "set_link_trace_id",
            links::set_link_trace_id(self, message_id, trace_id),
        )
        .await
    }

    async fn vote_on_link(
        &self,
        vote: &LinkedVote,
        enqueue: &Enqueue,
        needs_trace: bool,
        claim: Option<Duration>,
    ) -> Result<LinkedVoteWrite, StoreError> {
        self.run(
            "vote_on_link",
            votes::vote_on_link(self, vote, enqueue, needs_trace, claim),
        )
        .await
    }

    async fn upsert_vote_corrected(
        &self,
        vote: &NewVote,
        correction: &CorrectionChange,
        enqueue: &Enqueue,
    ) -> Result<VoteWrite, StoreError> {
        self.run(
            "upsert_vote",
            votes::upsert_vote(self, vote, correction, enqueue),
        )
        .await
    }

    async fn retract_vote_corrected(
        &self,
        key: &VoteKey,
        hold: std::time::Duration,
    ) -> Result<Option<VoteWrite>, StoreError> {
        self.run("retract_vote", votes::retract_vote(self, key, hold))
            .await
    }

    async fn chat_links(
        &self,
        chat_id: &str,
        user_id: &str,
        limit: u32,
    ) -> Result<Vec<MessageLink>, StoreError> {
        self.run(
            "chat_links",
            links::chat_links(self, chat_id, user_id, limit),
        )
        .await
    }

    async fn list_votes(&self, chat_id: &str, user_id: &str) -> Result<Vec<Vote>, StoreError> {
        self.run("list_votes", votes::list_votes(self, chat_id, user_id))
            .await
    }

    async fn claim_due(&self, limit: u32, lease: Duration) -> Result<Vec<Delivery>, StoreError> {
        self.run("claim_due", outbox::claim_due(self, limit, lease))
            .await
    }

    async fn claim(
        &self,
        key: &VoteKey,
        version: i64,
        lease: Duration,
    ) -> Result<Option<Delivery>, StoreError> {
        self.run("claim", outbox::claim(self, key, version, lease))
            .await
    }

    async fn finish(
        &self,
        ticket: &Ticket,
        fact: &AssessmentFact,
        outcome: &Outcome,
    ) -> Result<Finished, StoreError> {
        self.run("finish", outbox::finish(self, ticket, fact, outcome))
            .await
    }

    async fn renew_lease(&self, ticket: &Ticket, lease: Duration) -> Result<bool, StoreError> {
        self.run("renew_lease", outbox::renew_lease(self, ticket, lease))
            .await
    }

    async fn list_deliveries_after(
        &self,
        state: Option<DeliveryState>,
        limit: u32,
        after: Option<&DeliveryCursor>,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.run(
            "list_deliveries",
            outbox::list_deliveries(self, state, limit, after),
        )
        .await
    }

    async fn dead_reasons(&self, limit: u32) -> Result<Vec<(String, u64)>, StoreError> {
        self.run("dead_reasons", outbox::dead_reasons(self, limit))
            .await
    }

    async fn requeue(
        &self,
        state: DeliveryState,
        key: Option<&VoteKey>,
    ) -> Result<u64, StoreError> {
        self.run("requeue", outbox::requeue(self, state, key)).await
    }

    async fn requeue_held(&self, reason: &str) -> Result<u64, StoreError> {
        self.run("requeue_held", outbox::requeue_held(self, reason))
            .await
    }

    async fn delivery_stats(&self) -> Result<DeliveryStats, StoreError> {
        self.run("delivery_stats", outbox::delivery_stats(self))
            .await
    }

    async fn review_summary(&self, q: &SummaryQuery) -> Result<Vec<SummaryCell>, StoreError> {
        self.run("review_summary", review::summary(self, q)).await
    }

    async fn review_backlog(&self) -> Result<Backlog, StoreError> {
        self.run("review_backlog", review::backlog(self)).await
    }

    async fn review_votes(
        &self,
        q: &ListQuery,
        after: Option<&ReviewCursor>,
    ) -> Result<Vec<ReviewedVote>, StoreError> {
        self.run("review_votes", review::votes(self, q, after))
            .await
    }

    fn pool_status(&self) -> PoolStatus {
        self.publish_pool_status();
        let s = self.pool.status();
        PoolStatus {
            size: s.size,
            available: s.available,
        }
    }
}
