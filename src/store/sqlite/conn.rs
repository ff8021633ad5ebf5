//! Helpers shared by the SQLite operations: time encoding (integer milliseconds since the Unix
//! epoch), error mapping and `BEGIN IMMEDIATE` transactions (rows are decoded in `rows`).
//!
//! The operations themselves (`links`, `votes`, `outbox`) run on the connection's own thread
//! (see the parent module), so they are plain blocking functions; writes that must be atomic
//! use `BEGIN IMMEDIATE` transactions, which take the write lock up front instead of failing
//! half-way on a lock upgrade.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, TransactionBehavior};

use crate::store::api::StoreError;

pub(super) fn now_ms() -> i64 {
    to_ms(SystemTime::now())
}

pub(super) fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

pub(super) fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_millis(ms.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    }
}

pub(super) use crate::store::codec::millis;

/// Maps a rusqlite error: lock contention and I/O are `Unavailable`, decoding is `Corrupt`.
pub(super) fn sql_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::DatabaseBusy | C::DatabaseLocked => StoreError::Unavailable(format!(
                "the SQLite database is locked by another process: {e}"
            )),
            C::CannotOpen
            | C::ReadOnly
            | C::DiskFull
            | C::SystemIoFailure
            | C::PermissionDenied
            | C::NotADatabase
            | C::DatabaseCorrupt => StoreError::Unavailable(format!("SQLite: {e}")),
            _ => StoreError::Query(format!("SQLite: {e}")),
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => {
            StoreError::Corrupt(format!("SQLite: {e}"))
        }
        _ => StoreError::Query(format!("SQLite: {e}")),
    }
}

pub(super) fn immediate(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>, StoreError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_error)
}

pub(super) fn health(conn: &mut Connection) -> Result<(), StoreError> {
    conn.query_row("SELECT 1", [], |_| Ok(()))
        .map_err(sql_error)
}
