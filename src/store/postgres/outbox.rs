//! The delivery outbox in Postgres: claiming with leases (`FOR UPDATE SKIP LOCKED`), finishing
//! attempts, operator listing / requeueing, and the counts behind metrics.

use std::time::Duration;

use super::handle::PgStore;
use super::pool::query_error;
use super::rows::delivery;
use crate::store::api::{
    AssessmentFact, Delivery, DeliveryCursor, DeliveryState, DeliveryStats, Finished, Outcome,
    StoreError, Ticket, VoteKey,
};
use crate::store::codec::{self, millis};
pub(super) async fn claim_due(
    store: &PgStore,
    limit: u32,
    lease: Duration,
) -> Result<Vec<Delivery>, StoreError> {
    // SKIP LOCKED: rows another claimer is taking right now are skipped, not waited for, so
    // concurrent claimers (tasks or replicas) split the due work between them.
    const SQL: &str = concat!(
        "UPDATE deliveries SET
            lease_until = now() + $2::bigint * interval '1 millisecond',
            attempts = attempts + 1, claims = claims + 1, updated_at = now()
        WHERE (message_id, user_id, name) IN (
            SELECT message_id, user_id, name FROM deliveries
            WHERE state = 'pending' AND next_attempt_at <= now()
                AND (lease_until IS NULL OR lease_until <= now())
            ORDER BY next_attempt_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED)
        RETURNING ",
        delivery_columns!()
    );
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let rows = c
        .client
        .query(&stmt, &[&i64::from(limit), &millis(lease)])
        .await
        .map_err(query_error)?;
    let mut out = rows.iter().map(delivery).collect::<Result<Vec<_>, _>>()?;
    // RETURNING has no order.
    out.sort_by_key(|d| d.next_attempt_at);
    Ok(out)
}

pub(super) async fn claim(
    store: &PgStore,
    key: &VoteKey,
    version: i64,
    lease: Duration,
) -> Result<Option<Delivery>, StoreError> {
    // Two claims of the same row serialize on its row lock; the loser re-checks the WHERE
    // clause against the winner's committed lease and matches nothing.
    const SQL: &str = concat!(
        "UPDATE deliveries SET
            lease_until = now() + $5::bigint * interval '1 millisecond',
            attempts = attempts + 1, claims = claims + 1, updated_at = now()
        WHERE message_id = $1 AND user_id = $2 AND name = $3 AND version = $4
            AND state = 'pending' AND (lease_until IS NULL OR lease_until <= now())
        RETURNING ",
        delivery_columns!()
    );
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let row = c
        .client
        .query_opt(
            &stmt,
            &[
                &key.message_id,
                &key.user_id,
                &key.name,
                &version,
                &millis(lease),
            ],
        )
        .await
        .map_err(query_error)?;
    row.as_ref().map(delivery).transpose()
}

pub(super) async fn renew_lease(
    store: &PgStore,
    ticket: &Ticket,
    lease: Duration,
) -> Result<bool, StoreError> {
    const SQL: &str = "UPDATE deliveries
        SET lease_until = now() + $5::bigint * interval '1 millisecond'
        WHERE message_id = $1 AND user_id = $2 AND name = $3 AND claims = $4
            AND lease_until IS NOT NULL";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let n = c
        .client
        .execute(
            &stmt,
            &[
                &ticket.key.message_id,
                &ticket.key.user_id,
                &ticket.key.name,
                &ticket.claim,
                &millis(lease),
            ],
        )
        .await
        .map_err(query_error)?;
    Ok(n == 1)
}

pub(super) async fn finish(
    store: &PgStore,
    ticket: &Ticket,
    fact: &AssessmentFact,
    outcome: &Outcome,
) -> Result<Finished, StoreError> {
    // `owned`: the ticket's claim still holds the delivery. Then the lease is released, the
    // fact recorded, and the outcome applied if the version is still current. Otherwise only an
    // assessment id the row does not know yet is recorded (see `Finished::LeaseLost`).
    // SET expressions read the row as it was before the update, RETURNING as it is after.
    const SQL: &str = "UPDATE deliveries SET
            lease_until = CASE WHEN claims = $11 THEN NULL ELSE lease_until END,
            assessment_id = CASE
                WHEN $5::text = 'exists' AND (claims = $11 OR assessment_id IS NULL) THEN $6
                WHEN $5::text = 'gone' AND claims = $11 THEN NULL
                ELSE assessment_id END,
            trace_id = CASE
                WHEN $5::text = 'exists' AND (claims = $11 OR assessment_id IS NULL) THEN $7
                ELSE trace_id END,
            generation = generation
                + CASE WHEN $5::text = 'gone' AND claims = $11 THEN 1 ELSE 0 END,
            state = CASE WHEN claims = $11 AND version = $4 THEN $8 ELSE state END,
            next_attempt_at = CASE WHEN claims = $11 AND version = $4
                THEN COALESCE($9, next_attempt_at) ELSE next_attempt_at END,
            last_error = CASE WHEN claims = $11 AND version = $4 THEN $10 ELSE last_error END,
            updated_at = now()
        WHERE message_id = $1 AND user_id = $2 AND name = $3
        RETURNING CASE WHEN claims <> $11 THEN 'lease_lost'
            WHEN version = $4 THEN 'applied' ELSE 'superseded' END";
    let plan = codec::finish(fact, outcome);
    let key = &ticket.key;
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let row = c
        .client
        .query_opt(
            &stmt,
            &[
                &key.message_id,
                &key.user_id,
                &key.name,
                &ticket.version,
                &plan.fact,
                &plan.assessment_id,
                &plan.trace_id,
                &plan.state.as_str(),
                &plan.next_attempt_at,
                &plan.last_error,
                &ticket.claim,
            ],
        )
        .await
        .map_err(query_error)?;
    let result: Option<String> = row.map(|r| r.try_get(0)).transpose().map_err(query_error)?;
    codec::finished(result.as_deref())
}

pub(super) async fn list_deliveries(
    store: &PgStore,
    state: Option<DeliveryState>,
    limit: u32,
    after: Option<&DeliveryCursor>,
) -> Result<Vec<Delivery>, StoreError> {
    // `COLLATE "C"`: the key compares bytewise, as in SQLite, whatever the database's collation.
    const SQL: &str = concat!(
        "SELECT ",
        delivery_columns!(),
        " FROM deliveries WHERE ($1::text IS NULL OR state = $1)
            AND ($3::timestamptz IS NULL OR updated_at < $3
                OR (updated_at = $3 AND (message_id COLLATE \"C\", user_id COLLATE \"C\", name COLLATE \"C\")
                    > ($4::text COLLATE \"C\", $5::text COLLATE \"C\", $6::text COLLATE \"C\")))
        ORDER BY updated_at DESC, message_id COLLATE \"C\", user_id COLLATE \"C\", name COLLATE \"C\" LIMIT $2"
    );
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let rows = c
        .client
        .query(
            &stmt,
            &[
                &state.map(DeliveryState::as_str),
                &i64::from(limit),
                &after.map(|a| a.updated_at),
                &after.map(|a| a.key.message_id.as_str()),
                &after.map(|a| a.key.user_id.as_str()),
                &after.map(|a| a.key.name.as_str()),
            ],
        )
        .await
        .map_err(query_error)?;
    rows.iter().map(delivery).collect()
}

pub(super) async fn dead_reasons(
    store: &PgStore,
    limit: u32,
) -> Result<Vec<(String, u64)>, StoreError> {
    const SQL: &str = "SELECT coalesce(last_error, ''), count(*) AS n FROM deliveries
        WHERE state = 'dead' GROUP BY 1 ORDER BY n DESC, 1 LIMIT $1";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let rows = c
        .client
        .query(&stmt, &[&i64::from(limit)])
        .await
        .map_err(query_error)?;
    rows.iter()
        .map(|r| {
            let reason: String = r.try_get(0).map_err(query_error)?;
            let n: i64 = r.try_get(1).map_err(query_error)?;
            Ok((reason, u64::try_from(n).unwrap_or(0)))
        })
        .collect()
}

pub(super) async fn requeue(
    store: &PgStore,
    state: DeliveryState,
    key: Option<&VoteKey>,
) -> Result<u64, StoreError> {
    const SQL: &str = "UPDATE deliveries SET
            state = 'pending', attempts = 0, next_attempt_at = now(), enqueued_at = now(),
            updated_at = now()
        WHERE state = $1
            AND ($2::text IS NULL OR (message_id = $2 AND user_id = $3 AND name = $4))";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    c.client
        .execute(
            &stmt,
            &[
                &state.as_str(),
                &key.map(|k| k.message_id.as_str()),
                &key.map(|k| k.user_id.as_str()),
                &key.map(|k| k.name.as_str()),
            ],
        )
        .await
        .map_err(query_error)
}

pub(super) async fn requeue_held(store: &PgStore, reason: &str) -> Result<u64, StoreError> {
    const SQL: &str = "UPDATE deliveries SET
            state = 'pending', attempts = 0, next_attempt_at = now(), enqueued_at = now(),
            last_error = NULL, updated_at = now()
        WHERE state = 'waiting' AND last_error = $1";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    c.client
        .execute(&stmt, &[&reason])
        .await
        .map_err(query_error)
}

pub(super) async fn delivery_stats(store: &PgStore) -> Result<DeliveryStats, StoreError> {
    // The age is computed by the database, whose clock wrote `enqueued_at`.
    const SQL: &str = "SELECT state, count(*),
            EXTRACT(EPOCH FROM now() - min(enqueued_at))::float8
        FROM deliveries GROUP BY state";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let rows = c.client.query(&stmt, &[]).await.map_err(query_error)?;
    let mut stats = DeliveryStats::default();
    for row in rows {
        let state: String = row.try_get(0).map_err(query_error)?;
        let count: i64 = row.try_get(1).map_err(query_error)?;
        let count = u64::try_from(count).unwrap_or(0);
        match codec::state(&state)? {
            DeliveryState::Pending => {
                stats.pending = count;
                let age: Option<f64> = row.try_get(2).map_err(query_error)?;
                stats.oldest_pending =
                    age.and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok());
            }
            DeliveryState::Waiting => stats.waiting = count,
            DeliveryState::Done => stats.done = count,
            DeliveryState::Dead => stats.dead = count,
        }
    }
    Ok(stats)
}
