//! The review queries in Postgres: summaries from the hourly, sharded `vote_rollup` (kept by
//! the vote trigger, since `0006_votes_hot.sql` one PL/pgSQL function), listings from
//! `votes` through the `votes_recent_minute` index. Rows are decoded by column name (`rows`).

use std::sync::OnceLock;
use std::time::SystemTime;

use super::handle::PgStore;
use super::pool::query_error;
use super::rows::reviewed;
use crate::domain::Polarity;
use crate::store::api::{
    Backlog, ListQuery, ReviewCursor, ReviewedVote, StoreError, SummaryCell, SummaryQuery, VoteKey,
};
use crate::store::codec;
use crate::store::review::{json_word_list, words};

pub(super) async fn summary(
    store: &PgStore,
    q: &SummaryQuery,
) -> Result<Vec<SummaryCell>, StoreError> {
    const SQL: &str = "SELECT hour / $1 AS bucket, name, value, sum(votes)::bigint AS votes,
            sum(commented)::bigint AS commented
        FROM vote_rollup
        WHERE hour >= $2 AND hour < $3
            AND ($4::text IS NULL OR name = $4) AND ($5::text IS NULL OR route = $5)
        GROUP BY 1, 2, 3 HAVING sum(votes) <> 0
        ORDER BY 1, 2, 3";
    let (from, to) = q.hours();
    let per = i64::from(q.bucket_hours.max(1));
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let rows = c
        .client
        .query(&stmt, &[&per, &from, &to, &q.scope.name, &q.scope.route])
        .await
        .map_err(query_error)?;
    rows.iter()
        .map(|row| {
            let corrupt = |e: tokio_postgres::Error| StoreError::Corrupt(format!("rollup: {e}"));
            let value: serde_json::Value = row.try_get("value").map_err(corrupt)?;
            Ok(SummaryCell {
                bucket: q.bucket_start(row.try_get("bucket").map_err(corrupt)?),
                name: row.try_get("name").map_err(corrupt)?,
                value: codec::value_from_json(&value)?,
                votes: row.try_get("votes").map_err(corrupt)?,
                commented: row.try_get("commented").map_err(corrupt)?,
            })
        })
        .collect()
}

pub(super) async fn backlog(store: &PgStore) -> Result<Backlog, StoreError> {
    const SQL: &str = "SELECT state, count(*) AS n FROM deliveries
        WHERE state IN ('pending', 'waiting', 'dead') GROUP BY state";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let rows = c.client.query(&stmt, &[]).await.map_err(query_error)?;
    let mut b = Backlog::default();
    for row in rows {
        let state: String = row.try_get("state").map_err(query_error)?;
        b.add(
            codec::state(&state)?,
            row.try_get("n").map_err(query_error)?,
        );
    }
    Ok(b)
}

/// The origin of `votes.updated_minute`'s bins (`0006_votes_hot.sql`): the listing's bounds on
/// that column must bin the same way.
const MINUTE_ORIGIN: &str = "timestamptz '1970-01-01 00:00:00+00'";

/// The listing: newest first by `updated_at`, then the key, descending. It reads
/// `votes_recent_minute` (`updated_minute`, the minute of `updated_at`): the order by
/// `updated_minute` first is the same order, since a later `updated_at` never has an earlier
/// minute, and the index hands rows over minute by minute, newest first, for an incremental sort
/// within each minute. The bounds on `updated_minute` are implied by those on `updated_at`; they
/// are what the index scan starts and stops at (`LEAST` skips a NULL cursor).
///
/// `1`, `-1` or `0` for `v.value` (jsonb), by `domain::FeedbackValue::polarity`'s rules; `$9`
/// and `$10` are the numeric thresholds.
fn list_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "SELECT v.message_id, v.user_id, v.name, v.chat_id, v.value, v.comment,
                v.expected_response, v.updated_at,
                v.route, d.state, d.last_error, COALESCE(d.trace_id, l.trace_id) AS trace_id
            FROM votes AS v
            LEFT JOIN deliveries AS d ON d.message_id = v.message_id AND d.user_id = v.user_id
                AND d.name = v.name
            LEFT JOIN message_links AS l ON l.message_id = v.message_id
            WHERE v.updated_at >= $1 AND v.updated_at < $2
                AND v.updated_minute >= date_bin('1 minute', $1, {origin})
                AND v.updated_minute <= date_bin('1 minute', LEAST($2, $3::timestamptz), {origin})
                AND ($3::timestamptz IS NULL OR v.updated_at <= $3)
                AND ($4::text IS NULL
                    OR (v.updated_at, v.message_id, v.user_id, v.name) < ($3, $4, $5, $6))
                AND ($7::text IS NULL OR v.name = $7)
                AND ($8::text IS NULL OR v.route = $8)
                AND ($11::boolean IS NULL OR (v.comment IS NOT NULL) = $11)
                AND ($12::int IS NULL OR (CASE
                    WHEN v.value IN ('true'::jsonb, {}) THEN 1
                    WHEN v.value IN ('false'::jsonb, {}) THEN -1
                    WHEN jsonb_typeof(v.value) = 'number' THEN
                        CASE WHEN (v.value #>> '{{}}')::float8 >= $9 THEN 1
                            WHEN (v.value #>> '{{}}')::float8 <= $10 THEN -1 ELSE 0 END
                    ELSE 0 END) = $12)
            ORDER BY v.updated_minute DESC, v.updated_at DESC, v.message_id DESC, v.user_id DESC,
                v.name DESC
            LIMIT $13",
            json_word_list(words(Polarity::Positive), "::jsonb"),
            json_word_list(words(Polarity::Negative), "::jsonb"),
            origin = MINUTE_ORIGIN,
        )
    })
}

pub(super) async fn votes(
    store: &PgStore,
    q: &ListQuery,
    after: Option<&ReviewCursor>,
) -> Result<Vec<ReviewedVote>, StoreError> {
    let after_at: Option<SystemTime> = after.map(|c| c.updated_at);
    let after_key = |f: fn(&VoteKey) -> &String| after.map(|c| f(&c.key).as_str());
    let polarity = q.polarity.map(Polarity::sign);
    let limit = i64::from(q.limit);
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    // Prepared afresh for every page, so that it is always planned for its parameters: a generic
    // plan (what a cached statement gets after five executions) cannot see how many votes the
    // range holds, and was seen to pick a bitmap scan of the whole range and a full sort (seconds
    // at 1,000,000 votes) over the index scan in minute order.
    let stmt = c.client.prepare(list_sql()).await.map_err(query_error)?;
    let rows = c
        .client
        .query(
            &stmt,
            &[
                &q.scope.from,
                &q.scope.to,
                &after_at,
                &after_key(|k| &k.message_id),
                &after_key(|k| &k.user_id),
                &after_key(|k| &k.name),
                &q.scope.name,
                &q.scope.route,
                &q.thresholds.positive_from,
                &q.thresholds.negative_to,
                &q.has_comment,
                &polarity,
                &limit,
            ],
        )
        .await
        .map_err(query_error)?;
    rows.iter().map(reviewed).collect()
}
