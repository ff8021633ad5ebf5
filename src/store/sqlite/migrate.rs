//! Versioned schema migrations for SQLite.
//!
//! All pending migrations and their `schema_migrations` rows apply in ONE `BEGIN IMMEDIATE`
//! transaction (SQLite DDL is transactional): a second process migrating the same file at the
//! same time waits for the write lock (busy timeout), then finds nothing left to do. A file
//! whose schema is newer than this binary is refused with [`StoreError::Schema`].

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::conn::{now_ms, sql_error};
use crate::store::api::{Migrated, StoreError};

struct Migration {
    version: i32,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../migrations/sqlite/0001_initial.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../migrations/sqlite/0002_delivery_claims.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../migrations/sqlite/0003_review.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../migrations/sqlite/0004_review_write_cost.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../migrations/sqlite/0005_corrections.sql"),
    },
    Migration {
        version: 6,
        sql: include_str!("../migrations/sqlite/0006_votes_hot.sql"),
    },
];

/// The newest schema version this binary knows.
pub(super) fn latest() -> i32 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

pub(super) fn run(conn: &mut Connection) -> Result<Migrated, StoreError> {
    let schema = |what: &str, e: rusqlite::Error| match sql_error(e) {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{what}: {m}")),
        StoreError::Query(m) | StoreError::Corrupt(m) | StoreError::Schema(m) => {
            StoreError::Schema(format!("{what}: {m}"))
        }
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| schema("cannot lock the database for migration", e))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            applied_at INTEGER NOT NULL
        )",
    )
    .map_err(|e| schema("cannot create the schema_migrations table", e))?;
    let from: i32 = tx
        .query_row(
            "SELECT COALESCE(max(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(|e| schema("cannot read the schema version", e))?;
    refuse_newer(from)?;
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        tx.execute_batch(m.sql)
            .map_err(|e| schema(&format!("migration {} failed", m.version), e))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            (m.version, now_ms()),
        )
        .map_err(|e| schema(&format!("cannot record migration {}", m.version), e))?;
        tracing::info!(version = m.version, "applied store migration");
    }
    tx.commit()
        .map_err(|e| schema("cannot commit the migrations", e))?;
    Ok(Migrated { from, to: latest() })
}

/// For `store.migrate = false`: the schema must be exactly at this binary's version.
pub(super) fn check(conn: &Connection) -> Result<(), StoreError> {
    let has_table = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
            [],
            |_| Ok(()),
        )
        .optional()
        .map_err(sql_error)?
        .is_some();
    if !has_table {
        return Err(StoreError::Schema(
            "the database has no feedback-proxy tables yet: run `feedback-proxy migrate` or set store.migrate = true".to_owned(),
        ));
    }
    let version: i32 = conn
        .query_row(
            "SELECT COALESCE(max(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(sql_error)?;
    refuse_newer(version)?;
    if version < latest() {
        return Err(StoreError::Schema(format!(
            "the database is at schema version {version} but this binary needs version {}: run `feedback-proxy migrate` or set store.migrate = true",
            latest()
        )));
    }
    Ok(())
}

fn refuse_newer(version: i32) -> Result<(), StoreError> {
    if version > latest() {
        return Err(StoreError::Schema(format!(
            "the database is at schema version {version}, newer than this binary supports (up to {}): run a newer feedback-proxy",
            latest()
        )));
    }
    Ok(())
}
