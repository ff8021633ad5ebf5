//! The delivery outbox in SQLite: claiming with leases, finishing attempts, operator listing /
//! requeueing, and the counts behind metrics. One connection serves every caller in turn, so
//! two claims can never overlap.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};

use super::conn::{millis, now_ms, sql_error, to_ms};
use super::rows::delivery;
use crate::store::api::{
    AssessmentFact, Delivery, DeliveryCursor, DeliveryState, DeliveryStats, Finished, Outcome,
    StoreError, Ticket, VoteKey,
};
use crate::store::codec;

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
            "UPDATE deliveries SET lease_until = ?3, attempts = attempts + 1, claims = claims + 1,
                updated_at = ?2
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
            s.query_map((i64::from(limit), now, lease_until), delivery)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_error)?;
    let mut out = raws.into_iter().collect::<Result<Vec<_>, _>>()?;
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
            "UPDATE deliveries SET lease_until = ?6, attempts = attempts + 1, claims = claims + 1,
                updated_at = ?5
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
                delivery,
            )
            .optional()
        })
        .map_err(sql_error)?;
    raw.transpose()
}

pub(super) fn renew_lease(
    conn: &mut Connection,
    ticket: &Ticket,
    lease: Duration,
) -> Result<bool, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE deliveries SET lease_until = ?5
            WHERE message_id = ?1 AND user_id = ?2 AND name = ?3 AND claims = ?4
                AND lease_until IS NOT NULL",
        )
        .and_then(|mut s| {
            s.execute((
                &ticket.key.message_id,
                &ticket.key.user_id,
                &ticket.key.name,
                ticket.claim,
                now_ms().saturating_add(millis(lease)),
            ))
        })
        .map_err(sql_error)?;
    Ok(changed == 1)
}

pub(super) fn finish(
    conn: &mut Connection,
    ticket: &Ticket,
    fact: &AssessmentFact,
    outcome: &Outcome,
) -> Result<Finished, StoreError> {
    let plan = codec::finish(fact, outcome);
    let key = &ticket.key;
    // As in Postgres: `claims = ?12` means the ticket's claim still holds the delivery. SET
    // expressions read the row as it was before the update, RETURNING as it is after.
    let result: Option<String> = conn
        .prepare_cached(
            "UPDATE deliveries SET
                lease_until = CASE WHEN claims = ?12 THEN NULL ELSE lease_until END,
                assessment_id = CASE
                    WHEN ?5 = 'exists' AND (claims = ?12 OR assessment_id IS NULL) THEN ?6
                    WHEN ?5 = 'gone' AND claims = ?12 THEN NULL
                    ELSE assessment_id END,
                trace_id = CASE
                    WHEN ?5 = 'exists' AND (claims = ?12 OR assessment_id IS NULL) THEN ?7
                    ELSE trace_id END,
                generation = generation
                    + CASE WHEN ?5 = 'gone' AND claims = ?12 THEN 1 ELSE 0 END,
                state = CASE WHEN claims = ?12 AND version = ?4 THEN ?8 ELSE state END,
                next_attempt_at = CASE WHEN claims = ?12 AND version = ?4
                    THEN COALESCE(?9, next_attempt_at) ELSE next_attempt_at END,
                last_error = CASE WHEN claims = ?12 AND version = ?4 THEN ?10
                    ELSE last_error END,
                updated_at = ?11
            WHERE message_id = ?1 AND user_id = ?2 AND name = ?3
            RETURNING CASE WHEN claims <> ?12 THEN 'lease_lost'
                WHEN version = ?4 THEN 'applied' ELSE 'superseded' END",
        )
        .and_then(|mut s| {
            s.query_row(
                rusqlite::params![
                    &key.message_id,
                    &key.user_id,
                    &key.name,
                    ticket.version,
                    plan.fact,
                    plan.assessment_id,
                    plan.trace_id,
                    plan.state.as_str(),
                    plan.next_attempt_at.map(to_ms),
                    plan.last_error,
                    now_ms(),
                    ticket.claim,
                ],
                |r| r.get(0),
            )
            .optional()
        })
        .map_err(sql_error)?;
    codec::finished(result.as_deref())
}

pub(super) fn list_deliveries(
    conn: &mut Connection,
    state: Option<DeliveryState>,
    limit: u32,
    after: Option<&DeliveryCursor>,
) -> Result<Vec<Delivery>, StoreError> {
    let raws = conn
        .prepare_cached(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE (?1 IS NULL OR state = ?1)
                AND (?3 IS NULL OR updated_at < ?3
                    OR (updated_at = ?3 AND (message_id, user_id, name) > (?4, ?5, ?6)))
            ORDER BY updated_at DESC, message_id, user_id, name LIMIT ?2"
        ))
        .and_then(|mut s| {
            s.query_map(
                (
                    state.map(DeliveryState::as_str),
                    i64::from(limit),
                    after.map(|a| to_ms(a.updated_at)),
                    after.map(|a| a.key.message_id.as_str()),
                    after.map(|a| a.key.user_id.as_str()),
                    after.map(|a| a.key.name.as_str()),
                ),
                delivery,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_error)?;
    raws.into_iter().collect()
}

pub(super) fn dead_reasons(
    conn: &mut Connection,
    limit: u32,
) -> Result<Vec<(String, u64)>, StoreError> {
    conn.prepare_cached(
        "SELECT coalesce(last_error, ''), count(*) AS n FROM deliveries WHERE state = 'dead'
        GROUP BY 1 ORDER BY n DESC, 1 LIMIT ?1",
    )
    .and_then(|mut s| {
        s.query_map([i64::from(limit)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()
    })
    .map_err(sql_error)
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

pub(super) fn requeue_held(conn: &mut Connection, reason: &str) -> Result<u64, StoreError> {
    let now = now_ms();
    let changed = conn
        .prepare_cached(
            "UPDATE deliveries SET
                state = 'pending', attempts = 0, next_attempt_at = ?2, enqueued_at = ?2,
                last_error = NULL, updated_at = ?2
            WHERE state = 'waiting' AND last_error = ?1",
        )
        .and_then(|mut s| s.execute((reason, now)))
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
