//! The [`Store`](crate::store::Store) operations on the SQLite connection, each with its SQL.
//! They run on the connection's own thread (see the parent module), so they are plain
//! blocking functions; writes that must be atomic use `BEGIN IMMEDIATE` transactions, which
//! take the write lock up front instead of failing half-way on a lock upgrade.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior};

use crate::store::codec::{self, DESIRED_DELETE};
use crate::store::{
    AssessmentFact, Claim, Delivery, DeliveryState, DeliveryStats, Enqueue, LinkRecord,
    MessageLink, NewVote, Outcome, StoreError, Vote, VoteKey,
};

/// The delivery columns every query returning deliveries selects, in the order [`delivery`]
/// decodes them.
macro_rules! delivery_columns {
    () => {
        "message_id, user_id, name, chat_id, desired, desired_value, desired_comment, version, \
         assessment_id, generation, trace_id, state, attempts, next_attempt_at, enqueued_at, \
         last_error, updated_at"
    };
}

pub(super) fn now_ms() -> i64 {
    to_ms(SystemTime::now())
}

fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_millis(ms.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

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

fn immediate(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>, StoreError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_error)
}

pub(super) fn health(conn: &mut Connection) -> Result<(), StoreError> {
    conn.query_row("SELECT 1", [], |_| Ok(()))
        .map_err(sql_error)
}

pub(super) fn claim_message(conn: &mut Connection, link: &LinkRecord) -> Result<Claim, StoreError> {
    let now = now_ms();
    let tx = immediate(conn)?;
    let inserted = tx
        .prepare_cached(
            "INSERT INTO message_links
                (message_id, chat_id, user_id, trace_id, client_request_id, open, created_at, updated_at)
            VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?6)
            ON CONFLICT (message_id) DO NOTHING",
        )
        .and_then(|mut s| {
            s.execute((
                &link.message_id,
                &link.chat_id,
                &link.user_id,
                &link.trace_id,
                &link.client_request_id,
                now,
            ))
        })
        .map_err(sql_error)?;
    let claim = if inserted == 1 {
        Claim::Created
    } else {
        let reopened = tx
            .prepare_cached(
                "UPDATE message_links SET open = 1, updated_at = ?3
                WHERE message_id = ?1 AND user_id = ?2",
            )
            .and_then(|mut s| s.execute((&link.message_id, &link.user_id, now)))
            .map_err(sql_error)?;
        if reopened == 1 {
            Claim::Owned
        } else {
            Claim::OtherUser
        }
    };
    tx.commit().map_err(sql_error)?;
    Ok(claim)
}

/// All links in one transaction, applied one by one; then wakes the waiting deliveries of the
/// batch's messages that now have a trace id or client request id.
pub(super) fn record_links(conn: &mut Connection, links: &[LinkRecord]) -> Result<(), StoreError> {
    if links.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let tx = immediate(conn)?;
    {
        let mut upsert = tx
            .prepare_cached(
                "INSERT INTO message_links
                    (message_id, chat_id, user_id, trace_id, client_request_id, open, created_at, updated_at)
                VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)
                ON CONFLICT (message_id) DO UPDATE SET
                    chat_id = COALESCE(excluded.chat_id, message_links.chat_id),
                    trace_id = COALESCE(excluded.trace_id, message_links.trace_id),
                    client_request_id = COALESCE(excluded.client_request_id, message_links.client_request_id),
                    open = excluded.open,
                    updated_at = excluded.updated_at
                WHERE message_links.user_id = excluded.user_id",
            )
            .map_err(sql_error)?;
        for l in links {
            upsert
                .execute((
                    &l.message_id,
                    &l.chat_id,
                    &l.user_id,
                    &l.trace_id,
                    &l.client_request_id,
                    l.open,
                    now,
                ))
                .map_err(sql_error)?;
        }
        // Same reset as `requeue`: time spent parked does not count against the horizon.
        let mut wake = tx
            .prepare_cached(
                "UPDATE deliveries SET
                    state = 'pending', next_attempt_at = ?2, enqueued_at = ?2, attempts = 0,
                    last_error = NULL, updated_at = ?2
                WHERE state = 'waiting' AND message_id = ?1
                    AND EXISTS (SELECT 1 FROM message_links AS l WHERE l.message_id = ?1
                        AND (l.trace_id IS NOT NULL OR l.client_request_id IS NOT NULL))",
            )
            .map_err(sql_error)?;
        let mut seen = std::collections::HashSet::new();
        for l in links {
            if seen.insert(l.message_id.as_str()) {
                wake.execute((&l.message_id, now)).map_err(sql_error)?;
            }
        }
    }
    tx.commit().map_err(sql_error)
}

pub(super) fn get_link(
    conn: &mut Connection,
    message_id: &str,
) -> Result<Option<MessageLink>, StoreError> {
    conn.prepare_cached(
        "SELECT message_id, chat_id, user_id, trace_id, client_request_id, open,
            created_at, updated_at
        FROM message_links WHERE message_id = ?1",
    )
    .and_then(|mut s| {
        s.query_row([message_id], |r| {
            Ok(MessageLink {
                message_id: r.get(0)?,
                chat_id: r.get(1)?,
                user_id: r.get(2)?,
                trace_id: r.get(3)?,
                client_request_id: r.get(4)?,
                open: r.get(5)?,
                created_at: from_ms(r.get(6)?),
                updated_at: from_ms(r.get(7)?),
            })
        })
        .optional()
    })
    .map_err(sql_error)
}

pub(super) fn set_link_trace_id(
    conn: &mut Connection,
    message_id: &str,
    trace_id: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE message_links SET trace_id = ?2, updated_at = ?3
        WHERE message_id = ?1 AND trace_id IS NULL",
    )
    .and_then(|mut s| s.execute((message_id, trace_id, now_ms())))
    .map_err(sql_error)?;
    Ok(())
}

/// The columns of a delivery row before decoding (decoding can fail with our own error type,
/// which rusqlite's row closures cannot return).
struct RawDelivery {
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
}

fn raw_delivery(r: &Row<'_>) -> rusqlite::Result<RawDelivery> {
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
    })
}

fn delivery(raw: RawDelivery) -> Result<Delivery, StoreError> {
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
    })
}

fn deliveries(raws: Vec<RawDelivery>) -> Result<Vec<Delivery>, StoreError> {
    raws.into_iter().map(delivery).collect()
}

pub(super) fn upsert_vote(
    conn: &mut Connection,
    vote: &NewVote,
    enqueue: &Enqueue,
) -> Result<Delivery, StoreError> {
    let value = codec::value_json(&vote.value)?.to_string();
    let k = &vote.key;
    let (mut state, mut reason) = codec::enqueue(enqueue);
    let now = now_ms();
    // IMMEDIATE: this transaction holds the write lock from its first statement, so the link
    // check below cannot interleave with a `record_links` wake-up.
    let tx = immediate(conn)?;
    if state == DeliveryState::Waiting {
        let linked: bool = tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM message_links WHERE message_id = ?1
                    AND (trace_id IS NOT NULL OR client_request_id IS NOT NULL))",
            )
            .and_then(|mut s| s.query_row([&k.message_id], |r| r.get(0)))
            .map_err(sql_error)?;
        if linked {
            state = DeliveryState::Pending;
            reason = None;
        }
    }
    tx.prepare_cached(
        "INSERT INTO votes (message_id, user_id, name, chat_id, value, comment, updated_at)
        VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
        ON CONFLICT (message_id, user_id, name) DO UPDATE SET
            chat_id = excluded.chat_id, value = excluded.value, comment = excluded.comment,
            updated_at = excluded.updated_at",
    )
    .and_then(|mut s| {
        s.execute((
            &k.message_id,
            &k.user_id,
            &k.name,
            &vote.chat_id,
            &value,
            &vote.comment,
            now,
        ))
    })
    .map_err(sql_error)?;
    let raw = tx
        .prepare_cached(concat!(
            "INSERT INTO deliveries (message_id, user_id, name, chat_id, desired, desired_value,
                desired_comment, version, generation, state, attempts, next_attempt_at,
                enqueued_at, last_error, updated_at)
            VALUES (?1, ?2, ?3, ?4, 'upsert', ?5, ?6, 1, 0, ?7, 0, ?8, ?8, ?9, ?8)
            ON CONFLICT (message_id, user_id, name) DO UPDATE SET
                chat_id = excluded.chat_id, desired = excluded.desired,
                desired_value = excluded.desired_value, desired_comment = excluded.desired_comment,
                version = deliveries.version + 1, state = excluded.state, attempts = 0,
                next_attempt_at = excluded.next_attempt_at, enqueued_at = excluded.enqueued_at,
                last_error = excluded.last_error, updated_at = excluded.updated_at
            RETURNING ",
            delivery_columns!()
        ))
        .and_then(|mut s| {
            s.query_row(
                (
                    &k.message_id,
                    &k.user_id,
                    &k.name,
                    &vote.chat_id,
                    &value,
                    &vote.comment,
                    state.as_str(),
                    now,
                    reason,
                ),
                raw_delivery,
            )
        })
        .map_err(sql_error)?;
    tx.commit().map_err(sql_error)?;
    delivery(raw)
}

pub(super) fn retract_vote(
    conn: &mut Connection,
    key: &VoteKey,
) -> Result<Option<Delivery>, StoreError> {
    let now = now_ms();
    let tx = immediate(conn)?;
    let chat_id: Option<String> = tx
        .prepare_cached(
            "DELETE FROM votes WHERE message_id = ?1 AND user_id = ?2 AND name = ?3
            RETURNING chat_id",
        )
        .and_then(|mut s| {
            s.query_row((&key.message_id, &key.user_id, &key.name), |r| r.get(0))
                .optional()
        })
        .map_err(sql_error)?;
    let Some(chat_id) = chat_id else {
        return Ok(None);
    };
    // An upsert, so that a retraction reaches MLflow even if the delivery row was removed.
    let raw = tx
        .prepare_cached(concat!(
            "INSERT INTO deliveries (message_id, user_id, name, chat_id, desired, version,
                generation, state, attempts, next_attempt_at, enqueued_at, updated_at)
            VALUES (?1, ?2, ?3, ?4, ?5, 1, 0, 'pending', 0, ?6, ?6, ?6)
            ON CONFLICT (message_id, user_id, name) DO UPDATE SET
                desired = excluded.desired, desired_value = NULL, desired_comment = NULL,
                version = deliveries.version + 1, state = 'pending', attempts = 0,
                next_attempt_at = ?6, enqueued_at = ?6, last_error = NULL, updated_at = ?6
            RETURNING ",
            delivery_columns!()
        ))
        .and_then(|mut s| {
            s.query_row(
                (
                    &key.message_id,
                    &key.user_id,
                    &key.name,
                    &chat_id,
                    DESIRED_DELETE,
                    now,
                ),
                raw_delivery,
            )
        })
        .map_err(sql_error)?;
    tx.commit().map_err(sql_error)?;
    delivery(raw).map(Some)
}

pub(super) fn list_votes(
    conn: &mut Connection,
    chat_id: &str,
    user_id: &str,
) -> Result<Vec<Vote>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT message_id, user_id, name, chat_id, value, comment, updated_at
            FROM votes WHERE chat_id = ?1 AND user_id = ?2 ORDER BY message_id, name",
        )
        .and_then(|mut s| {
            s.query_map((chat_id, user_id), |r| {
                Ok((
                    VoteKey {
                        message_id: r.get(0)?,
                        user_id: r.get(1)?,
                        name: r.get(2)?,
                    },
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_error)?;
    rows.into_iter()
        .map(|(key, chat_id, value, comment, updated_at)| {
            Ok(Vote {
                key,
                chat_id,
                value: codec::value_from_text(&value)?,
                comment,
                updated_at: from_ms(updated_at),
            })
        })
        .collect()
}

pub(super) fn claim_due(
    conn: &mut Connection,
    limit: u32,
    lease: Duration,
) -> Result<Vec<Delivery>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let now = now_ms();
    let lease_until = now.saturating_add(millis(lease));
    // One connection serves every caller in turn, so two claims can never overlap.
    let raws = conn
        .prepare_cached(concat!(
            "UPDATE deliveries SET lease_until = ?3, attempts = attempts + 1, updated_at = ?2
            WHERE rowid IN (
                SELECT rowid FROM deliveries
                WHERE state = 'pending' AND next_attempt_at <= ?2
                    AND (lease_until IS NULL OR lease_until <= ?2)
                ORDER BY next_attempt_at
                LIMIT ?1)
            RETURNING ",
            delivery_columns!()
        ))
        .and_then(|mut s| {
            s.query_map((i64::from(limit), now, lease_until), raw_delivery)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_error)?;
    let mut out = deliveries(raws)?;
    // RETURNING has no order.
    out.sort_by_key(|d| d.next_attempt_at);
    Ok(out)
}

pub(super) fn claim(
    conn: &mut Connection,
    key: &VoteKey,
    version: i64,
    lease: Duration,
) -> Result<Option<Delivery>, StoreError> {
    let now = now_ms();
    let raw = conn
        .prepare_cached(concat!(
            "UPDATE deliveries SET lease_until = ?6, attempts = attempts + 1, updated_at = ?5
            WHERE message_id = ?1 AND user_id = ?2 AND name = ?3 AND version = ?4
                AND state = 'pending' AND (lease_until IS NULL OR lease_until <= ?5)
            RETURNING ",
            delivery_columns!()
        ))
        .and_then(|mut s| {
            s.query_row(
                (
                    &key.message_id,
                    &key.user_id,
                    &key.name,
                    version,
                    now,
                    now.saturating_add(millis(lease)),
                ),
                raw_delivery,
            )
            .optional()
        })
        .map_err(sql_error)?;
    raw.map(delivery).transpose()
}

pub(super) fn finish(
    conn: &mut Connection,
    key: &VoteKey,
    version: i64,
    fact: &AssessmentFact,
    outcome: &Outcome,
) -> Result<bool, StoreError> {
    let plan = codec::finish(fact, outcome);
    // Fact columns always; outcome columns only for the current version; lease released.
    let applied: Option<bool> = conn
        .prepare_cached(
            "UPDATE deliveries SET
                lease_until = NULL,
                assessment_id = CASE ?5 WHEN 'exists' THEN ?6 WHEN 'gone' THEN NULL
                    ELSE assessment_id END,
                trace_id = CASE WHEN ?5 = 'exists' THEN ?7 ELSE trace_id END,
                generation = generation + CASE WHEN ?5 = 'gone' THEN 1 ELSE 0 END,
                state = CASE WHEN version = ?4 THEN ?8 ELSE state END,
                next_attempt_at = CASE WHEN version = ?4 THEN COALESCE(?9, next_attempt_at)
                    ELSE next_attempt_at END,
                last_error = CASE WHEN version = ?4 THEN ?10 ELSE last_error END,
                updated_at = ?11
            WHERE message_id = ?1 AND user_id = ?2 AND name = ?3
            RETURNING version = ?4",
        )
        .and_then(|mut s| {
            s.query_row(
                rusqlite::params![
                    &key.message_id,
                    &key.user_id,
                    &key.name,
                    version,
                    plan.fact,
                    plan.assessment_id,
                    plan.trace_id,
                    plan.state.as_str(),
                    plan.next_attempt_at.map(to_ms),
                    plan.last_error,
                    now_ms(),
                ],
                |r| r.get(0),
            )
            .optional()
        })
        .map_err(sql_error)?;
    Ok(applied.unwrap_or(false))
}

pub(super) fn list_deliveries(
    conn: &mut Connection,
    state: Option<DeliveryState>,
    limit: u32,
) -> Result<Vec<Delivery>, StoreError> {
    let raws = conn
        .prepare_cached(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE (?1 IS NULL OR state = ?1)
            ORDER BY updated_at DESC, message_id, user_id, name LIMIT ?2"
        ))
        .and_then(|mut s| {
            s.query_map(
                (state.map(DeliveryState::as_str), i64::from(limit)),
                raw_delivery,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_error)?;
    deliveries(raws)
}

pub(super) fn requeue(
    conn: &mut Connection,
    state: DeliveryState,
    key: Option<&VoteKey>,
) -> Result<u64, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE deliveries SET
                state = 'pending', attempts = 0, next_attempt_at = ?5, enqueued_at = ?5,
                updated_at = ?5
            WHERE state = ?1
                AND (?2 IS NULL OR (message_id = ?2 AND user_id = ?3 AND name = ?4))",
        )
        .and_then(|mut s| {
            s.execute((
                state.as_str(),
                key.map(|k| k.message_id.as_str()),
                key.map(|k| k.user_id.as_str()),
                key.map(|k| k.name.as_str()),
                now_ms(),
            ))
        })
        .map_err(sql_error)?;
    Ok(changed as u64)
}

pub(super) fn delivery_stats(conn: &mut Connection) -> Result<DeliveryStats, StoreError> {
    let now = now_ms();
    let rows = conn
        .prepare_cached("SELECT state, count(*), min(enqueued_at) FROM deliveries GROUP BY state")
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_error)?;
    let mut stats = DeliveryStats::default();
    for (state, count, oldest) in rows {
        let count = u64::try_from(count).unwrap_or(0);
        match codec::state(&state)? {
            DeliveryState::Pending => {
                stats.pending = count;
                stats.oldest_pending = oldest
                    .map(|t| Duration::from_millis(now.saturating_sub(t).max(0).unsigned_abs()));
            }
            DeliveryState::Waiting => stats.waiting = count,
            DeliveryState::Done => stats.done = count,
            DeliveryState::Dead => stats.dead = count,
        }
    }
    Ok(stats)
}
