//! Helpers shared by the SQLite operations: time encoding (integer milliseconds since the Unix
//! epoch), error mapping, `BEGIN IMMEDIATE` transactions, and decoding delivery rows.
//!
//! The operations themselves (`links`, `votes`, `outbox`) run on the connection's own thread
//! (see the parent module), so they are plain blocking functions; writes that must be atomic
//! use `BEGIN IMMEDIATE` transactions, which take the write lock up front instead of failing
//! half-way on a lock upgrade.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, Row, TransactionBehavior};

use crate::store::api::{Delivery, StoreError, VoteKey};
use crate::store::codec;

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

/// The columns of a delivery row before decoding (decoding can fail with our own error type,
/// which rusqlite's row closures cannot return).
pub(super) struct RawDelivery {
    key: VoteKey,
    chat_id: String,
    desired: String,
    desired_value: Option<String>,
    desired_comment: Option<String>,
    version: i64,
    assessment_id: Option<String>,
    generation: i64,
    trace_id: Option<String>,
    state: String,
    attempts: i32,
    next_attempt_at: i64,
    enqueued_at: i64,
    last_error: Option<String>,
    updated_at: i64,
    claims: i64,
}

pub(super) fn raw_delivery(r: &Row<'_>) -> rusqlite::Result<RawDelivery> {
    Ok(RawDelivery {
        key: VoteKey {
            message_id: r.get(0)?,
            user_id: r.get(1)?,
            name: r.get(2)?,
        },
        chat_id: r.get(3)?,
        desired: r.get(4)?,
        desired_value: r.get(5)?,
        desired_comment: r.get(6)?,
        version: r.get(7)?,
        assessment_id: r.get(8)?,
        generation: r.get(9)?,
        trace_id: r.get(10)?,
        state: r.get(11)?,
        attempts: r.get(12)?,
        next_attempt_at: r.get(13)?,
        enqueued_at: r.get(14)?,
        last_error: r.get(15)?,
        updated_at: r.get(16)?,
        claims: r.get(17)?,
    })
}

pub(super) fn delivery(raw: RawDelivery) -> Result<Delivery, StoreError> {
    let value = raw
        .desired_value
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("delivery value is not JSON: {e}")))?;
    Ok(Delivery {
        key: raw.key,
        chat_id: raw.chat_id,
        desired: codec::desired(&raw.desired, value, raw.desired_comment)?,
        version: raw.version,
        assessment_id: raw.assessment_id,
        generation: raw.generation,
        trace_id: raw.trace_id,
        state: codec::state(&raw.state)?,
        attempts: raw.attempts,
        next_attempt_at: from_ms(raw.next_attempt_at),
        enqueued_at: from_ms(raw.enqueued_at),
        last_error: raw.last_error,
        updated_at: from_ms(raw.updated_at),
        claims: raw.claims,
    })
}

pub(super) fn deliveries(raws: Vec<RawDelivery>) -> Result<Vec<Delivery>, StoreError> {
    raws.into_iter().map(delivery).collect()
}
