//! Votes in Postgres: each vote change and its delivery in ONE transaction.

use super::handle::{PgStore, lock_messages};
use super::pool::query_error;
use super::rows::{delivery, prefixed_link, vote, written_delivery};
use crate::store::api::{
    AWAITING_TRACE, CorrectionChange, DeliveryState, Enqueue, LinkedVote, LinkedVoteWrite, NewVote,
    StoreError, Vote, VoteKey, VoteWrite,
};
use crate::store::codec::{self, DESIRED_DELETE};

/// What an upsert of a delivery does to an existing row: the new desired state, `version + 1`,
/// due anew (assessment id and generation are kept). The statement adds `attempts`, and what
/// it does to the lease and the trace id.
macro_rules! delivery_upsert_conflict {
    () => {
        "ON CONFLICT (message_id, user_id, name) DO UPDATE SET
        chat_id = excluded.chat_id, desired = excluded.desired,
        desired_value = excluded.desired_value, desired_comment = excluded.desired_comment,
        version = deliveries.version + 1, state = excluded.state,
        next_attempt_at = excluded.next_attempt_at, enqueued_at = excluded.enqueued_at,
        last_error = excluded.last_error, updated_at = excluded.updated_at, "
    };
}

/// Upserts the delivery of a vote or correction: `$1..$3` its key, `$4` chat, `$5` value, `$6`
/// comment, `$7` state, `$8` waiting reason, `$9` due delay (ms).
const UPSERT_DELIVERY: &str = concat!(
    "INSERT INTO deliveries (message_id, user_id, name, chat_id, desired, desired_value,
        desired_comment, version, generation, state, attempts, next_attempt_at, enqueued_at,
        last_error, updated_at)
    VALUES ($1, $2, $3, $4, 'upsert', $5, $6, 1, 0, $7, 0,
        now() + $9::bigint * interval '1 millisecond', now(), $8, now())
    ",
    delivery_upsert_conflict!(),
    "attempts = 0 RETURNING ",
    delivery_columns!()
);

/// [`Store::vote_on_link`](crate::store::Store::vote_on_link) in one statement (one round
/// trip, atomic without a transaction block): reads the link of message `$1`; when it is
/// user `$2`'s, the chat (`$4`, else the link's) is known and agrees with the link's, and
/// (unless `$10` is false) the link has a trace id, a client request id or is open, upserts
/// the vote (its correction kept) and its delivery like [`UPSERT_DELIVERY`] (`$5..$9` as
/// there). Returns the link's columns prefixed `link_`, and the delivery's (NULL when nothing
/// was written); no row when the message has no link.
///
/// Two more things a delivery attempt would otherwise ask for right after, each a round trip:
/// - a delivery that knows no trace yet takes the link's (what the attempt would resolve: the
///   link is the voter's);
/// - with a lease `$11` (ms), the delivery is claimed as `Outbox::claim` would, unless another
///   claim's lease is live (kept, as every vote keeps it): `lease_until`, `claims + 1`, and
///   `attempts = 1`, by which the caller tells that it holds the claim (a vote that was not
///   claimed is written with `attempts = 0`).
///
/// Lock order: the vote's row, then its delivery's (`d` reads `v`, so the vote is upserted
/// first), then (the rollup trigger, at the end of the statement) the review rollup's rows. The
/// general path and the retraction take the vote's row first too. Without that, the outer SELECT
/// pulled `d` first and `v` ran last, and a concurrent retraction or general-path write of the
/// same vote (vote row, then delivery) could deadlock with this statement (delivery, then vote
/// row): `tests/review.rs` `summary_stays_exact_under_concurrent_votes_on_the_same_keys`.
///
/// The data-modifying CTEs run to completion whether or not the outer SELECT reads them, and
/// all parts see the one snapshot the statement started with. Taking no advisory lock is
/// right: only a `waiting` enqueue parked for a trace must be serialized with
/// `record_links`, and the caller never sends one here.
const VOTE_ON_LINK: &str = concat!(
    "WITH lnk AS (
        SELECT message_id, chat_id, user_id, trace_id, client_request_id, open, created_at,
            updated_at, route
        FROM message_links WHERE message_id = $1::text
    ), ok AS (
        SELECT COALESCE($4::text, chat_id) AS chat_id, route, trace_id FROM lnk
        WHERE user_id = $2::text
            AND COALESCE($4::text, chat_id) IS NOT NULL
            AND ($4::text IS NULL OR chat_id IS NULL OR chat_id = $4::text)
            AND (NOT $10::boolean OR trace_id IS NOT NULL OR client_request_id IS NOT NULL
                OR open)
    ), v AS (
        INSERT INTO votes (message_id, user_id, name, chat_id, value, comment, updated_at, route)
        SELECT $1::text, $2::text, $3::text, ok.chat_id, $5::jsonb, $6::text, now(), ok.route
        FROM ok
        ON CONFLICT (message_id, user_id, name) DO UPDATE SET
            chat_id = excluded.chat_id, value = excluded.value, comment = excluded.comment,
            updated_at = excluded.updated_at, route = excluded.route
        RETURNING true AS written
    ), d AS (
        INSERT INTO deliveries (message_id, user_id, name, chat_id, desired, desired_value,
            desired_comment, version, generation, state, attempts, next_attempt_at,
            enqueued_at, last_error, updated_at, trace_id, lease_until, claims)
        SELECT $1::text, $2::text, $3::text, ok.chat_id, 'upsert', $5::jsonb, $6::text, 1, 0,
            $7::text, CASE WHEN $11::bigint IS NULL THEN 0 ELSE 1 END,
            now() + $9::bigint * interval '1 millisecond', now(), $8::text, now(), ok.trace_id,
            now() + $11::bigint * interval '1 millisecond',
            CASE WHEN $11::bigint IS NULL THEN 0 ELSE 1 END
        FROM ok, v
        ",
    delivery_upsert_conflict!(),
    "trace_id = COALESCE(deliveries.trace_id, excluded.trace_id),
        attempts = CASE WHEN excluded.lease_until IS NOT NULL AND (deliveries.lease_until IS NULL
            OR deliveries.lease_until <= now()) THEN 1 ELSE 0 END,
        claims = deliveries.claims + CASE WHEN excluded.lease_until IS NOT NULL
            AND (deliveries.lease_until IS NULL OR deliveries.lease_until <= now())
            THEN 1 ELSE 0 END,
        lease_until = CASE WHEN excluded.lease_until IS NOT NULL AND (deliveries.lease_until
            IS NULL OR deliveries.lease_until <= now()) THEN excluded.lease_until
            ELSE deliveries.lease_until END
    RETURNING ",
    delivery_columns!(),
    "
    )
    SELECT lnk.message_id AS link_message_id, lnk.chat_id AS link_chat_id,
        lnk.user_id AS link_user_id, lnk.trace_id AS link_trace_id,
        lnk.client_request_id AS link_client_request_id, lnk.open AS link_open,
        lnk.created_at AS link_created_at, lnk.updated_at AS link_updated_at,
        lnk.route AS link_route, d.*
    FROM lnk LEFT JOIN d ON true"
);

/// Sets a delivery to `desired = delete`, pending, due after `$6` ms: `$1..$3` its key, `$4`
/// chat, `$5` the word `delete`. An upsert rather than an update: a vote always has a delivery
/// row, but if one was ever removed by hand, the retraction must still reach MLflow.
const DELETE_DELIVERY: &str = concat!(
    "INSERT INTO deliveries (message_id, user_id, name, chat_id, desired, version, generation,
        state, attempts, next_attempt_at, enqueued_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, 1, 0, 'pending', 0,
        now() + $6::bigint * interval '1 millisecond', now(), now())
    ON CONFLICT (message_id, user_id, name) DO UPDATE SET
        desired = excluded.desired, desired_value = NULL, desired_comment = NULL,
        version = deliveries.version + 1, state = 'pending', attempts = 0,
        next_attempt_at = excluded.next_attempt_at, enqueued_at = now(), last_error = NULL,
        updated_at = now()
    RETURNING ",
    delivery_columns!()
);

pub(super) async fn vote_on_link(
    store: &PgStore,
    vote: &LinkedVote,
    enqueue: &Enqueue,
    needs_trace: bool,
    claim: Option<std::time::Duration>,
) -> Result<LinkedVoteWrite, StoreError> {
    let (state, reason, delay_ms) = codec::enqueue(enqueue);
    // Only a pending delivery can be claimed (as `claim` asks).
    let lease_ms = claim
        .filter(|_| state == DeliveryState::Pending)
        .map(codec::millis);
    if reason.is_some_and(|r| r.starts_with(AWAITING_TRACE)) {
        // Not this path's to write (see `VOTE_ON_LINK`): only read the link.
        return Ok(LinkedVoteWrite {
            link: super::links::get_link(store, &vote.key.message_id).await?,
            written: None,
            claimed: false,
        });
    }
    let value = codec::value_json(&vote.value)?;
    let k = &vote.key;
    let state_name = state.as_str();
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c
        .client
        .prepare_cached(VOTE_ON_LINK)
        .await
        .map_err(query_error)?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
        &k.message_id,
        &k.user_id,
        &k.name,
        &vote.chat_id,
        &value,
        &vote.comment,
        &state_name,
        &reason,
        &delay_ms,
        &needs_trace,
        &lease_ms,
    ];
    let Some(row) = c
        .client
        .query_opt(&stmt, &params)
        .await
        .map_err(query_error)?
    else {
        return Ok(LinkedVoteWrite {
            link: None,
            written: None,
            claimed: false,
        });
    };
    let link = prefixed_link(&row)?;
    let written = written_delivery(&row)?;
    let claimed = lease_ms.is_some() && written.as_ref().is_some_and(|d| d.attempts == 1);
    Ok(LinkedVoteWrite {
        link: Some(link),
        written,
        claimed,
    })
}

pub(super) async fn upsert_vote(
    store: &PgStore,
    vote: &NewVote,
    correction: &CorrectionChange,
    enqueue: &Enqueue,
) -> Result<VoteWrite, StoreError> {
    // The link check for a waiting enqueue. It must be its own statement AFTER the lock: a
    // statement's snapshot is taken when it starts, so one that also took the lock would not
    // see a `record_links` committed while it waited.
    // A chat rating's key (`chat/<chatId>`) is woken by any of the rater's links in that chat
    // (not serialized by the lock, which names messages: the worker's lookup round requeues a
    // rating parked in that window).
    const LINKED: &str = "SELECT EXISTS (SELECT 1 FROM message_links
            WHERE (message_id = $1
                OR (starts_with($1, 'chat/') AND chat_id = substr($1, 6)))
            AND user_id = $2 AND (trace_id IS NOT NULL OR client_request_id IS NOT NULL))";
    // The correction the vote carried before (locks the row, so that two writes of one
    // vote agree on whether the correction changed).
    const OLD_CORRECTION: &str = "SELECT expected_response FROM votes
        WHERE message_id = $1 AND user_id = $2 AND name = $3 FOR UPDATE";
    const VOTE: &str = "INSERT INTO votes (message_id, user_id, name, chat_id, value, comment,
            updated_at, route, expected_response)
        VALUES ($1, $2, $3, $4, $5, $6, now(),
            (SELECT route FROM message_links WHERE message_id = $1), $7)
        ON CONFLICT (message_id, user_id, name) DO UPDATE SET
            chat_id = excluded.chat_id, value = excluded.value, comment = excluded.comment,
            updated_at = excluded.updated_at, route = excluded.route,
            expected_response = CASE WHEN $8 THEN excluded.expected_response
                ELSE votes.expected_response END";
    let value = codec::value_json(&vote.value)?;
    let k = &vote.key;
    let (mut state, mut reason, delay_ms) = codec::enqueue(enqueue);
    let (set_correction, new_text) = match correction {
        CorrectionChange::Keep => (false, None),
        CorrectionChange::Set(t) => (true, Some(t.as_str())),
        CorrectionChange::Clear => (true, None),
    };

    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let tx = c.client.transaction().await.map_err(query_error)?;
    let awaits_trace = reason.is_some_and(|r| r.starts_with(AWAITING_TRACE));
    if state == DeliveryState::Waiting && awaits_trace {
        // Serialized with `record_links` for this message: either its wake-up runs after we
        // commit (and finds our waiting delivery), or it committed before this check.
        lock_messages(&tx, &[k.message_id.as_str()]).await?;
        let linked = tx.prepare_cached(LINKED).await.map_err(query_error)?;
        let row = tx
            .query_one(&linked, &[&k.message_id, &k.user_id])
            .await
            .map_err(query_error)?;
        if row.try_get::<_, bool>(0).map_err(query_error)? {
            state = DeliveryState::Pending;
            reason = None;
        }
    }
    let old_text: Option<String> = if set_correction {
        let stmt = tx
            .prepare_cached(OLD_CORRECTION)
            .await
            .map_err(query_error)?;
        match tx
            .query_opt(&stmt, &[&k.message_id, &k.user_id, &k.name])
            .await
            .map_err(query_error)?
        {
            Some(row) => row.try_get(0).map_err(query_error)?,
            None => None,
        }
    } else {
        None
    };
    // The two upserts are independent: sent together, they cost one round trip (tokio-postgres
    // pipelines queries polled concurrently on one connection, in order).
    let vote_stmt = tx.prepare_cached(VOTE).await.map_err(query_error)?;
    let delivery_stmt = tx
        .prepare_cached(UPSERT_DELIVERY)
        .await
        .map_err(query_error)?;
    let state_name = state.as_str();
    let vote_params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
        &k.message_id,
        &k.user_id,
        &k.name,
        &vote.chat_id,
        &value,
        &vote.comment,
        &new_text,
        &set_correction,
    ];
    let delivery_params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
        &k.message_id,
        &k.user_id,
        &k.name,
        &vote.chat_id,
        &value,
        &vote.comment,
        &state_name,
        &reason,
        &delay_ms,
    ];
    let (_, row) = tokio::try_join!(
        tx.execute(&vote_stmt, &vote_params),
        tx.query_one(&delivery_stmt, &delivery_params),
    )
    .map_err(query_error)?;
    let d = delivery(&row)?;
    let correction = if set_correction && old_text.as_deref() != new_text {
        let ck = VoteKey::correction(&k.message_id, &k.user_id);
        let row = match new_text {
            Some(t) => {
                let text = serde_json::Value::String(t.to_owned());
                let no_comment: Option<&str> = None;
                tx.query_one(
                    &delivery_stmt,
                    &[
                        &ck.message_id,
                        &ck.user_id,
                        &ck.name,
                        &vote.chat_id,
                        &text,
                        &no_comment,
                        &state_name,
                        &reason,
                        &delay_ms,
                    ],
                )
                .await
            }
            None => {
                let stmt = tx
                    .prepare_cached(DELETE_DELIVERY)
                    .await
                    .map_err(query_error)?;
                tx.query_one(
                    &stmt,
                    &[
                        &ck.message_id,
                        &ck.user_id,
                        &ck.name,
                        &vote.chat_id,
                        &DESIRED_DELETE,
                        &delay_ms,
                    ],
                )
                .await
            }
        }
        .map_err(query_error)?;
        Some(delivery(&row)?)
    } else {
        None
    };
    tx.commit().await.map_err(query_error)?;
    Ok(VoteWrite {
        vote: d,
        correction,
    })
}

pub(super) async fn retract_vote(
    store: &PgStore,
    key: &VoteKey,
    hold: std::time::Duration,
) -> Result<Option<VoteWrite>, StoreError> {
    const VOTE: &str = "DELETE FROM votes WHERE message_id = $1 AND user_id = $2 AND name = $3
        RETURNING chat_id, expected_response";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let tx = c.client.transaction().await.map_err(query_error)?;
    let stmt = tx.prepare_cached(VOTE).await.map_err(query_error)?;
    let Some(row) = tx
        .query_opt(&stmt, &[&key.message_id, &key.user_id, &key.name])
        .await
        .map_err(query_error)?
    else {
        // Nothing to retract; the transaction rolls back when dropped (it wrote nothing).
        return Ok(None);
    };
    let chat_id: String = row.try_get(0).map_err(query_error)?;
    let correction: Option<String> = row.try_get(1).map_err(query_error)?;
    let stmt = tx
        .prepare_cached(DELETE_DELIVERY)
        .await
        .map_err(query_error)?;
    let hold_ms = codec::millis(hold);
    let row = tx
        .query_one(
            &stmt,
            &[
                &key.message_id,
                &key.user_id,
                &key.name,
                &chat_id,
                &DESIRED_DELETE,
                &hold_ms,
            ],
        )
        .await
        .map_err(query_error)?;
    let d = delivery(&row)?;
    let correction = match correction {
        Some(_) => {
            let ck = VoteKey::correction(&key.message_id, &key.user_id);
            let row = tx
                .query_one(
                    &stmt,
                    &[
                        &ck.message_id,
                        &ck.user_id,
                        &ck.name,
                        &chat_id,
                        &DESIRED_DELETE,
                        &hold_ms,
                    ],
                )
                .await
                .map_err(query_error)?;
            Some(delivery(&row)?)
        }
        None => None,
    };
    tx.commit().await.map_err(query_error)?;
    Ok(Some(VoteWrite {
        vote: d,
        correction,
    }))
}

pub(super) async fn list_votes(
    store: &PgStore,
    chat_id: &str,
    user_id: &str,
) -> Result<Vec<Vote>, StoreError> {
    const SQL: &str = "SELECT message_id, user_id, name, chat_id, value, comment, updated_at,
            expected_response
        FROM votes WHERE chat_id = $1 AND user_id = $2 ORDER BY message_id, name";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let rows = c
        .client
        .query(&stmt, &[&chat_id, &user_id])
        .await
        .map_err(query_error)?;
    rows.iter().map(vote).collect()
}

#[cfg(test)]
mod tests {
    use super::VOTE_ON_LINK;

    /// What `bench/pgbench/upsert_vote.sql` sends for each parameter of [`VOTE_ON_LINK`]:
    /// a vote of `bench/wrk/feedback.lua`'s (chat named, a thumb, no comment, held `waiting`
    /// for `no_experiment_id` as the bench proxy's config makes it, no trace needed, no claim).
    /// pgbench's `\set` makes numbers only; the strings are built in SQL.
    const PGBENCH_PARAMS: [(&str, &str); 11] = [
        ("$11", "NULL"),
        ("$10", "false"),
        ("$9", "0"),
        ("$8", "'no_experiment_id'"),
        ("$7", "'waiting'"),
        ("$6", "NULL"),
        (
            "$5",
            "(CASE WHEN :up::int = 1 THEN 'true' ELSE 'false' END)",
        ),
        ("$4", "(:tag::text || '-c' || :u::text)"),
        ("$3", "'user_feedback'"),
        ("$2", "(:tag::text || '-u' || :u::text || '@bench.example')"),
        ("$1", "(:tag::text || '-m' || :u::text || '-' || :m::text)"),
    ];

    fn words(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// The pgbench baseline of the vote benchmarks ("votes/s vs pgbench") must be the proxy's
    /// own statement run bare: the script is this statement with the parameters above (in
    /// descending order, so that `$1` does not match inside `$10`). On a mismatch the message
    /// holds the statement to paste into the script.
    #[test]
    fn the_pgbench_baseline_runs_this_statement() {
        let mut expected = VOTE_ON_LINK.to_owned();
        for (param, value) in PGBENCH_PARAMS {
            expected = expected.replace(param, value);
        }
        let script = include_str!("../../../bench/pgbench/upsert_vote.sql");
        let sql: String = script
            .lines()
            .filter(|l| !l.starts_with("--") && !l.starts_with('\\'))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            words(sql.trim_end().trim_end_matches(';')),
            words(&expected),
            "bench/pgbench/upsert_vote.sql is not VOTE_ON_LINK; its statement should be:\n{expected};"
        );
    }
}
