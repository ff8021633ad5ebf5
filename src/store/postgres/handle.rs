//! The [`PgStore`] handle: the connection pool, how an operation gets a connection and is
//! counted, and the per-message advisory locks. The `Store` operations themselves live in
//! `links`, `votes` and `outbox`; `postgres` wires them to the trait.

use std::future::Future;
use std::sync::Arc;

use deadpool::Runtime;
use deadpool::managed::{Object, Pool, PoolError, TimeoutType};

use super::pool::{Manager, Target, query_error};
use super::tls;
use crate::auth::password::Credentials;
use crate::auth::password::PasswordDeps as Deps;
use crate::config::{PgConnect, StoreConfig};
use crate::metrics::{Metrics, OperationLabel};
use crate::store::api::StoreError;

/// First key of the per-message transaction advisory locks (`pg_advisory_xact_lock(int4,
/// int4)`); the second is `hashtext(message_id)`. Arbitrary, chosen to be unlikely to collide
/// with another application's locks in the same database.
const MESSAGE_LOCK: i32 = 0x0fb4_5e11;

/// The Postgres store: a connection pool (whose connections all work in the proxy's schema).
pub struct PgStore {
    pub(super) pool: Pool<Manager>,
    pub(super) metrics: Arc<Metrics>,
}

impl PgStore {
    pub(super) fn new(
        pg: &PgConnect,
        config: &StoreConfig,
        deps: Deps,
    ) -> Result<Self, StoreError> {
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
    pub(super) async fn conn(&self) -> Result<Object<Manager>, StoreError> {
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

    pub(super) fn publish_pool_status(&self) {
        let s = self.pool.status();
        self.metrics.store_pool_size.set(s.size as i64);
        self.metrics.store_pool_available.set(s.available as i64);
    }

    /// Runs one operation, counting its failure under `operation`.
    pub(super) async fn run<T>(
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
pub(super) async fn lock_messages(
    tx: &deadpool_postgres::Transaction<'_>,
    message_ids: &[&str],
) -> Result<(), StoreError> {
    const SQL: &str = "SELECT pg_advisory_xact_lock($1::int4, h)
        FROM (SELECT DISTINCT hashtext(m) AS h FROM unnest($2::text[]) AS m ORDER BY h) AS keys";
    let stmt = tx.prepare_cached(SQL).await.map_err(query_error)?;
    tx.execute(&stmt, &[&MESSAGE_LOCK, &message_ids])
        .await
        .map_err(query_error)?;
    Ok(())
}
