//! Versioned schema migrations for Postgres.
//!
//! Migrations are SQL files (`store/migrations/postgres/NNNN_*.sql`) compiled into the binary.
//! Each applies in its own transaction together with its `schema_migrations` row, so a version
//! is either fully there or not at all. Several replicas starting at once serialize on a
//! session advisory lock taken on a DEDICATED connection (never a pooled one, so the lock can
//! never be left behind in the pool; closing the connection releases it whatever happened).
//! A database whose schema is newer than this binary is refused with [`StoreError::Schema`].
//!
//! Not here: down-migrations (roll forward only) and data backfills.

use std::time::Duration;

use tokio_postgres::Client;

use super::pool::query_error;
use crate::store::api::{Migrated, StoreError};

struct Migration {
    version: i32,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../migrations/postgres/0002_delivery_claims.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../migrations/postgres/0003_review.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../migrations/postgres/0004_review_write_cost.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../migrations/postgres/0005_corrections.sql"),
    },
    Migration {
        version: 6,
        sql: include_str!("../migrations/postgres/0006_votes_hot.sql"),
    },
];

/// The newest schema version this binary knows.
pub(super) fn latest() -> i32 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

/// How long to wait for another process's migration before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// Brings `schema` up to date. `client` must be a dedicated connection (see the module doc).
pub(super) async fn run(client: &mut Client, schema: &str) -> Result<Migrated, StoreError> {
    // Waiting for another process's migration, and migrating, may take longer than the
    // statement timeout meant for requests; `LOCK_WAIT` bounds the wait instead.
    client
        .batch_execute("SET statement_timeout = 0")
        .await
        .map_err(|e| schema_error("cannot lift the statement timeout for migrating", e))?;
    // One lock per schema, in the single-bigint advisory key space (message locks use the
    // two-int4 space, which never overlaps).
    let key = format!("feedback-proxy migrations {schema}");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
    let lock = client.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &params);
    match tokio::time::timeout(LOCK_WAIT, lock).await {
        Ok(r) => {
            r.map_err(|e| schema_error("cannot take the migration lock", e))?;
        }
        Err(_) => {
            return Err(StoreError::Schema(format!(
                "another process has been migrating schema \"{schema}\" for over {}; giving up",
                humantime::format_duration(LOCK_WAIT)
            )));
        }
    }
    let result = migrate_locked(client, schema).await;
    // Released explicitly on success; on error the caller drops the connection, which
    // releases it too.
    if result.is_ok() {
        client
            .execute(
                "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
                &[&key],
            )
            .await
            .map_err(|e| schema_error("cannot release the migration lock", e))?;
    }
    result
}

async fn migrate_locked(client: &mut Client, schema: &str) -> Result<Migrated, StoreError> {
    // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists,
    // which a role given only its schema (common on managed Postgres) lacks: look first.
    let exists = client
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .map_err(|e| schema_error("cannot look up the schema", e))?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
            .await
            .map_err(|e| schema_error(&format!("cannot create schema \"{schema}\""), e))?;
    }
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".schema_migrations (
                version    integer     PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )"
        ))
        .await
        .map_err(|e| schema_error("cannot create the schema_migrations table", e))?;
    let from = current_version(client, schema).await?.unwrap_or(0);
    refuse_newer(from, schema)?;
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        let tx = client
            .transaction()
            .await
            .map_err(|e| schema_error("cannot start a migration transaction", e))?;
        tx.batch_execute(&format!("SET LOCAL search_path TO \"{schema}\""))
            .await
            .map_err(|e| schema_error("cannot set the search path", e))?;
        tx.batch_execute(m.sql)
            .await
            .map_err(|e| schema_error(&format!("migration {} failed", m.version), e))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&m.version],
        )
        .await
        .map_err(|e| schema_error(&format!("cannot record migration {}", m.version), e))?;
        tx.commit()
            .await
            .map_err(|e| schema_error(&format!("cannot commit migration {}", m.version), e))?;
        tracing::info!(schema, version = m.version, "applied store migration");
    }
    Ok(Migrated { from, to: latest() })
}

/// For `store.migrate = false`: the schema must be exactly at this binary's version.
pub(super) async fn check(client: &Client, schema: &str) -> Result<(), StoreError> {
    let version = current_version(client, schema).await?;
    let Some(version) = version else {
        return Err(StoreError::Schema(format!(
            "schema \"{schema}\" has no feedback-proxy tables yet: run `feedback-proxy migrate` or set store.migrate = true"
        )));
    };
    refuse_newer(version, schema)?;
    if version < latest() {
        return Err(StoreError::Schema(format!(
            "schema \"{schema}\" is at version {version} but this binary needs version {}: run `feedback-proxy migrate` or set store.migrate = true",
            latest()
        )));
    }
    Ok(())
}

/// The recorded version; `None` when there is no `schema_migrations` table.
async fn current_version(client: &Client, schema: &str) -> Result<Option<i32>, StoreError> {
    let table = format!("\"{schema}\".schema_migrations");
    let present: Option<String> = client
        .query_one("SELECT to_regclass($1)::text", &[&table])
        .await
        .map_err(|e| schema_error("cannot look up schema_migrations", e))?
        .get(0);
    if present.is_none() {
        return Ok(None);
    }
    let row = client
        .query_one(
            &format!("SELECT COALESCE(max(version), 0) FROM {table}"),
            &[],
        )
        .await
        .map_err(|e| schema_error("cannot read the schema version", e))?;
    Ok(Some(row.get(0)))
}

fn refuse_newer(version: i32, schema: &str) -> Result<(), StoreError> {
    if version > latest() {
        return Err(StoreError::Schema(format!(
            "schema \"{schema}\" is at version {version}, newer than this binary supports (up to {}): run a newer feedback-proxy, or use another schema",
            latest()
        )));
    }
    Ok(())
}

/// Connection trouble stays `Unavailable` (so start-up says the database is down, not that the
/// schema is broken); anything else while migrating is a schema problem.
fn schema_error(what: &str, e: tokio_postgres::Error) -> StoreError {
    match query_error(e) {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{what}: {m}")),
        StoreError::Query(m) | StoreError::Corrupt(m) | StoreError::Schema(m) => {
            StoreError::Schema(format!("{what}: {m}"))
        }
    }
}
