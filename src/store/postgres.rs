//! Postgres / Lakebase backend: the production store, shared by every replica.
//!
//! - `pool`: connections (hosts, `sslmode`, a fresh password per connection), the deadpool
//!   manager that replaces closed, old and unresponsive connections;
//! - `tls`: rustls with libpq `sslmode` semantics and readable TLS errors;
//! - `credentials`: static passwords, the app's OAuth token, or minted Lakebase credentials
//!   (cached until shortly before they expire);
//! - `migrate`: versioned migrations under a session advisory lock;
//! - `links`, `votes`, `outbox`: the [`Store`] operations, each with its SQL next to it.
//!
//! Tables live in their own schema (`store.schema`, default `feedback_proxy`), which every
//! connection puts on its `search_path`. Timestamps come from the database clock (`now()`),
//! except due times chosen by the delivery worker (`Outcome::Retry { at }`).
//!
//! Concurrency: votes and deliveries are written under row locks in one transaction;
//! `claim_due` uses `FOR UPDATE SKIP LOCKED`; `record_links` and a waiting `upsert_vote` take a
//! transaction advisory lock per message (two-int4 key space, namespace `MESSAGE_LOCK`) so
//! that a delivery can never be parked after its wake-up already ran.

/// The delivery columns every query returning deliveries selects, in the order
/// `outbox::delivery` decodes them.
macro_rules! delivery_columns {
    () => {
        "message_id, user_id, name, chat_id, desired, desired_value, desired_comment, version, \
         assessment_id, generation, trace_id, state, attempts, next_attempt_at, enqueued_at, \
         last_error, updated_at, claims"
    };
}

mod credentials;
mod links;
mod migrate;
mod outbox;
mod pool;
mod tls;
mod votes;

use std::future::Future;
use std::sync::Arc;

use deadpool::Runtime;
use deadpool::managed::{Object, Pool, PoolError, TimeoutType};
use url::Url;

use async_trait::async_trait;
use std::time::Duration;

use crate::auth::TokenSource;
use crate::client::HttpClient;
use crate::config::PgConnect;
use crate::config::StoreConfig;
use crate::metrics::{Metrics, OperationLabel};
use crate::store::api::*;
use credentials::Credentials;
use pool::{Manager, Target, query_error};

/// First key of the per-message transaction advisory locks (`pg_advisory_xact_lock(int4,
/// int4)`); the second is `hashtext(message_id)`. Arbitrary, chosen to be unlikely to collide
/// with another application's locks in the same database.
const MESSAGE_LOCK: i32 = 0x0fb4_5e11;

/// What the Postgres backend needs from the rest of the process (password sources).
#[derive(Clone)]
pub struct Deps {
    /// The app's Databricks OAuth token source (used by Databricks password sources).
    pub databricks: TokenSource,
    pub databricks_host: Option<Url>,
    pub http: HttpClient,
    pub metrics: Arc<Metrics>,
}

/// The Postgres store: a connection pool (whose connections all work in the proxy's schema).
pub struct PgStore {
    pool: Pool<Manager>,
    metrics: Arc<Metrics>,
}

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

impl PgStore {
    fn new(pg: &PgConnect, config: &StoreConfig, deps: Deps) -> Result<Self, StoreError> {
        if pg.hosts.is_empty() {
            return Err(StoreError::Unavailable(
                "no Postgres host configured".to_owned(),
            ));
        }
        let timeout = config.connect_timeout;
        let manager = Manager {
            target: Target {
                hosts: pg.hosts.clone(),
                port: pg.port,
                user: pg.user.clone(),
                dbname: pg.dbname.clone(),
                application_name: pg
                    .application_name
                    .clone()
                    .unwrap_or_else(|| "feedback-proxy".to_owned()),
                connect_timeout: timeout,
                statement_timeout: config.statement_timeout,
                schema: config.schema.clone(),
            },
            tls: tls::Tls::new(pg.sslmode, pg.sslrootcert.as_deref())?,
            credentials: Credentials::new(pg, &config.password, deps.clone(), timeout),
            max_lifetime: config.max_lifetime,
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            // The manager bounds connecting by `timeout` itself, with a better message; this
            // is only a backstop.
            .create_timeout(Some(timeout + std::time::Duration::from_secs(1)))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the pool: {e}")))?;
        Ok(Self {
            pool,
            metrics: deps.metrics,
        })
    }

    /// A pooled connection, within `connect_timeout`.
    async fn conn(&self) -> Result<Object<Manager>, StoreError> {
        let got = self.pool.get().await;
        self.publish_pool_status();
        got.map_err(|e| match e {
            PoolError::Backend(e) => e,
            PoolError::Timeout(TimeoutType::Wait) => StoreError::Unavailable(format!(
                "all {} database connections are busy (waited {})",
                self.pool.status().max_size,
                humantime::format_duration(self.pool.manager().target.connect_timeout)
            )),
            PoolError::Timeout(TimeoutType::Create) => {
                StoreError::Unavailable("opening a database connection timed out".to_owned())
            }
            PoolError::Timeout(TimeoutType::Recycle) => StoreError::Unavailable(
                "checking a pooled database connection timed out".to_owned(),
            ),
            PoolError::Closed => StoreError::Unavailable("the store is closed".to_owned()),
            other => StoreError::Unavailable(format!("database pool: {other}")),
        })
    }

    fn publish_pool_status(&self) {
        let s = self.pool.status();
        self.metrics.store_pool_size.set(s.size as i64);
        self.metrics.store_pool_available.set(s.available as i64);
    }

    /// Runs one operation, counting its failure under `operation`.
    async fn run<T>(
        &self,
        operation: &'static str,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let r = op.await;
        if let Err(e) = &r {
            self.metrics
                .store_errors
                .get_or_create(&OperationLabel { operation })
                .inc();
            tracing::debug!(operation, error = %e, "store operation failed");
        }
        r
    }
}

/// Takes the per-message advisory locks for `message_ids` (deduplicated, in key order so that
/// two transactions locking several messages cannot deadlock), held until the transaction
/// ends.
async fn lock_messages(
    tx: &tokio_postgres::Transaction<'_>,
    statements: &mut pool::Statements,
    message_ids: &[&str],
) -> Result<(), StoreError> {
    const SQL: &str = "SELECT pg_advisory_xact_lock($1::int4, h)
        FROM (SELECT DISTINCT hashtext(m) AS h FROM unnest($2::text[]) AS m ORDER BY h) AS keys";
    let stmt = statements.get(tx, SQL).await?;
    tx.execute(&stmt, &[&MESSAGE_LOCK, &message_ids])
        .await
        .map_err(query_error)?;
    Ok(())
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

    async fn upsert_vote(&self, vote: &NewVote, enqueue: &Enqueue) -> Result<Delivery, StoreError> {
        self.run("upsert_vote", votes::upsert_vote(self, vote, enqueue))
            .await
    }

    async fn retract_vote(
        &self,
        key: &VoteKey,
        hold: std::time::Duration,
    ) -> Result<Option<Delivery>, StoreError> {
        self.run("retract_vote", votes::retract_vote(self, key, hold))
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

    fn pool_status(&self) -> PoolStatus {
        self.publish_pool_status();
        let s = self.pool.status();
        PoolStatus {
            size: s.size,
            available: s.available,
        }
    }
}
