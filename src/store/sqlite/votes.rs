//! Votes in SQLite: each vote change and its delivery in ONE `BEGIN IMMEDIATE` transaction.

use rusqlite::{Connection, OptionalExtension, Transaction};

use super::conn::{immediate, now_ms, sql_error};
use super::rows::{delivery, vote};
use crate::store::api::{
    AWAITING_TRACE, CorrectionChange, Delivery, DeliveryState, Enqueue, NewVote, StoreError, Vote,
    VoteKey, VoteWrite,
};
use crate::store::codec::{self, DESIRED_DELETE};

pub(super) fn upsert_vote(
    conn: &mut Connection,
    vote: &NewVote,
    correction: &CorrectionChange,
    enqueue: &Enqueue,
) -> Result<VoteWrite, StoreError> {
    let value = codec::value_json(&vote.value)?.to_string();
    let k = &vote.key;
    let (mut state, mut reason, delay_ms) = codec::enqueue(enqueue);
    let now = now_ms();
    // IMMEDIATE: this transaction holds the write lock from its first statement, so the link
    // check below cannot interleave with a `record_links` wake-up.
    let tx = immediate(conn)?;
    if state == DeliveryState::Waiting && reason.is_some_and(|r| r.starts_with(AWAITING_TRACE)) {
        let linked: bool = tx
            .prepare_cached(
                // A chat rating's key (`chat/<chatId>`) is woken by any of the rater's links
                // in that chat.
                "SELECT EXISTS (SELECT 1 FROM message_links
                    WHERE (message_id = ?1
                        OR (substr(?1, 1, 5) = 'chat/' AND chat_id = substr(?1, 6)))
                    AND user_id = ?2 AND (trace_id IS NOT NULL OR client_request_id IS NOT NULL))",
            )
            .and_then(|mut s| s.query_row([&k.message_id, &k.user_id], |r| r.get(0)))
            .map_err(sql_error)?;
        if linked {
            state = DeliveryState::Pending;
            reason = None;
        }
    }
    let (set_correction, new_text) = match correction {
        CorrectionChange::Keep => (false, None),
        CorrectionChange::Set(t) => (true, Some(t.as_str())),
        CorrectionChange::Clear => (true, None),
    };
    let old_text: Option<String> = if set_correction {
        tx.prepare_cached(
            "SELECT expected_response FROM votes
            WHERE message_id = ?1 AND user_id = ?2 AND name = ?3",
        )
        .and_then(|mut s| {
            s.query_row((&k.message_id, &k.user_id, &k.name), |r| r.get(0))
                .optional()
        })
        .map_err(sql_error)?
        .flatten()
    } else {
        None
    };
    tx.prepare_cached(
        "INSERT INTO votes (message_id, user_id, name, chat_id, value, comment, updated_at, route,
            expected_response)
        VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7,
            (SELECT route FROM message_links WHERE message_id = ?1), ?8)
        ON CONFLICT (message_id, user_id, name) DO UPDATE SET
            chat_id = excluded.chat_id, value = excluded.value, comment = excluded.comment,
            updated_at = excluded.updated_at, route = excluded.route,
            expected_response = CASE WHEN ?9 THEN excluded.expected_response
                ELSE votes.expected_response END",
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
            new_text,
            set_correction,
        ))
    })
    .map_err(sql_error)?;
    let due = now.saturating_add(delay_ms);
    let d = upsert_delivery(
        &tx,
        k,
        &vote.chat_id,
        &value,
        vote.comment.as_deref(),
        state.as_str(),
        reason,
        now,
        due,
    )?;
    let correction = if set_correction && old_text.as_deref() != new_text {
        let key = VoteKey::correction(&k.message_id, &k.user_id);
        Some(match new_text {
            Some(t) => {
                let text = serde_json::Value::String(t.to_owned()).to_string();
                upsert_delivery(
                    &tx,
                    &key,
                    &vote.chat_id,
                    &text,
                    None,
                    state.as_str(),
                    reason,
                    now,
                    due,
                )?
            }
            None => delete_delivery(&tx, &key, &vote.chat_id, now, due)?,
        })
    } else {
        None
    };
    tx.commit().map_err(sql_error)?;
    Ok(VoteWrite {
        vote: d,
        correction,
    })
}

/// Upserts the delivery of `k` with `desired = upsert` (see `Store::upsert_vote`).
#[allow(clippy::too_many_arguments)]
fn upsert_delivery(
    tx: &Transaction<'_>,
    k: &VoteKey,
    chat_id: &str,
    value: &str,
    comment: Option<&str>,
    state: &str,
    reason: Option<&str>,
    now: i64,
    due: i64,
) -> Result<Delivery, StoreError> {
    tx.prepare_cached(concat!(
        "INSERT INTO deliveries (message_id, user_id, name, chat_id, desired, desired_value,
            desired_comment, version, generation, state, attempts, next_attempt_at,
            enqueued_at, last_error, updated_at)
        VALUES (?1, ?2, ?3, ?4, 'upsert', ?5, ?6, 1, 0, ?7, 0, ?10, ?8, ?9, ?8)
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
                chat_id,
                value,
                comment,
                state,
                now,
                reason,
                due,
            ),
            delivery,
        )
    })
    .map_err(sql_error)?
}

/// Sets the delivery of `k` to `desired = delete`, pending and due at `due`. An upsert, so
/// that a retraction reaches MLflow even if the delivery row was removed.
fn delete_delivery(
    tx: &Transaction<'_>,
    k: &VoteKey,
    chat_id: &str,
    now: i64,
    due: i64,
) -> Result<Delivery, StoreError> {
    tx.prepare_cached(concat!(
        "INSERT INTO deliveries (message_id, user_id, name, chat_id, desired, version,
            generation, state, attempts, next_attempt_at, enqueued_at, updated_at)
        VALUES (?1, ?2, ?3, ?4, ?5, 1, 0, 'pending', 0, ?7, ?6, ?6)
        ON CONFLICT (message_id, user_id, name) DO UPDATE SET
            desired = excluded.desired, desired_value = NULL, desired_comment = NULL,
            version = deliveries.version + 1, state = 'pending', attempts = 0,
            next_attempt_at = ?7, enqueued_at = ?6, last_error = NULL, updated_at = ?6
        RETURNING ",
        delivery_columns!()
    ))
    .and_then(|mut s| {
        s.query_row(
            (
                &k.message_id,
                &k.user_id,
                &k.name,
                chat_id,
                DESIRED_DELETE,
                now,
                due,
            ),
            delivery,
        )
    })
    .map_err(sql_error)?
}

pub(super) fn retract_vote(
    conn: &mut Connection,
    key: &VoteKey,
    hold: std::time::Duration,
) -> Result<Option<VoteWrite>, StoreError> {
    let now = now_ms();
    let tx = immediate(conn)?;
    let gone: Option<(String, Option<String>)> = tx
        .prepare_cached(
            "DELETE FROM votes WHERE message_id = ?1 AND user_id = ?2 AND name = ?3
            RETURNING chat_id, expected_response",
        )
        .and_then(|mut s| {
            s.query_row((&key.message_id, &key.user_id, &key.name), |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
        })
        .map_err(sql_error)?;
    let Some((chat_id, correction)) = gone else {
        return Ok(None);
    };
    let due = now.saturating_add(codec::millis(hold));
    let d = delete_delivery(&tx, key, &chat_id, now, due)?;
    let correction = match correction {
        Some(_) => {
            let ck = VoteKey::correction(&key.message_id, &key.user_id);
            Some(delete_delivery(&tx, &ck, &chat_id, now, due)?)
        }
        None => None,
    };
    tx.commit().map_err(sql_error)?;
    Ok(Some(VoteWrite {
        vote: d,
        correction,
    }))
}

pub(super) fn list_votes(
    conn: &mut Connection,
    chat_id: &str,
    user_id: &str,
) -> Result<Vec<Vote>, StoreError> {
    conn.prepare_cached(
        "SELECT message_id, user_id, name, chat_id, value, comment, updated_at, expected_response
        FROM votes WHERE chat_id = ?1 AND user_id = ?2 ORDER BY message_id, name",
    )
    .and_then(|mut s| {
        s.query_map((chat_id, user_id), vote)?
            .collect::<rusqlite::Result<Vec<_>>>()
    })
    .map_err(sql_error)?
    .into_iter()
    .collect()
}
