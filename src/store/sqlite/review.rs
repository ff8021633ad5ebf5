//! The review queries in SQLite: summaries from the hourly `vote_rollup` (kept by the vote
//! triggers of `0003_review.sql` and `0004_review_write_cost.sql`), listings from `votes`
//! through the `votes_recent` index. Rows are decoded by column name (`rows`).

use std::sync::OnceLock;

use rusqlite::{Connection, named_params};

use super::conn::{sql_error, to_ms};
use super::rows::reviewed;
use crate::domain::Polarity;
use crate::store::api::{
    Backlog, ListQuery, ReviewCursor, ReviewedVote, StoreError, SummaryCell, SummaryQuery,
};
use crate::store::codec;
use crate::store::review::{json_word_list, words};

pub(super) fn summary(
    conn: &mut Connection,
    q: &SummaryQuery,
) -> Result<Vec<SummaryCell>, StoreError> {
    let (from, to) = q.hours();
    let mut stmt = conn
        .prepare_cached(
            "SELECT hour / :per AS bucket, name, value, sum(votes) AS votes,
                sum(commented) AS commented
            FROM vote_rollup
            WHERE hour >= :from AND hour < :to
                AND (:name IS NULL OR name = :name) AND (:route IS NULL OR route = :route)
            GROUP BY 1, 2, 3 HAVING sum(votes) <> 0
            ORDER BY 1, 2, 3",
        )
        .map_err(sql_error)?;
    let rows = stmt
        .query_map(
            named_params! {
                ":per": i64::from(q.bucket_hours.max(1)),
                ":from": from,
                ":to": to,
                ":name": q.scope.name,
                ":route": q.scope.route,
            },
            |r| {
                Ok((
                    r.get::<_, i64>("bucket")?,
                    r.get::<_, String>("name")?,
                    r.get::<_, String>("value")?,
                    r.get::<_, i64>("votes")?,
                    r.get::<_, i64>("commented")?,
                ))
            },
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(sql_error)?;
    rows.into_iter()
        .map(|(bucket, name, value, votes, commented)| {
            Ok(SummaryCell {
                bucket: q.bucket_start(bucket),
                name,
                value: codec::value_from_text(&value)?,
                votes,
                commented,
            })
        })
        .collect()
}

pub(super) fn backlog(conn: &mut Connection) -> Result<Backlog, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT state, count(*) AS n FROM deliveries
            WHERE state IN ('pending', 'waiting', 'dead') GROUP BY state",
        )
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok((r.get::<_, String>("state")?, r.get::<_, i64>("n")?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_error)?;
    let mut b = Backlog::default();
    for (state, n) in rows {
        b.add(codec::state(&state)?, n);
    }
    Ok(b)
}

/// `1`, `-1` or `0` for `v.value` (JSON text), by `domain::FeedbackValue::polarity`'s rules.
fn polarity_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "CASE WHEN v.value IN ('true', {}) THEN 1
                WHEN v.value IN ('false', {}) THEN -1
                WHEN json_type(v.value) IN ('integer', 'real') THEN
                    CASE WHEN CAST(v.value AS REAL) >= :positive_from THEN 1
                        WHEN CAST(v.value AS REAL) <= :negative_to THEN -1 ELSE 0 END
                ELSE 0 END",
            json_word_list(words(Polarity::Positive), ""),
            json_word_list(words(Polarity::Negative), ""),
        )
    })
}

fn list_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "SELECT v.message_id AS message_id, v.user_id AS user_id, v.name AS name,
                v.chat_id AS chat_id, v.value AS value, v.comment AS comment,
                v.expected_response AS expected_response,
                v.updated_at AS updated_at, v.route AS route, d.state AS state,
                d.last_error AS last_error, COALESCE(d.trace_id, l.trace_id) AS trace_id
            FROM votes AS v
            LEFT JOIN deliveries AS d ON d.message_id = v.message_id AND d.user_id = v.user_id
                AND d.name = v.name
            LEFT JOIN message_links AS l ON l.message_id = v.message_id
            WHERE v.updated_at >= :from AND v.updated_at < :to AND v.updated_at <= :after_at
                AND (:after_message IS NULL
                    OR (v.updated_at, v.message_id, v.user_id, v.name)
                        < (:after_at, :after_message, :after_user, :after_name))
                AND (:name IS NULL OR v.name = :name)
                AND (:route IS NULL OR v.route = :route)
                AND (:has_comment IS NULL OR (v.comment IS NOT NULL) = :has_comment)
                AND (:polarity IS NULL OR ({}) = :polarity)
            ORDER BY v.updated_at DESC, v.message_id DESC, v.user_id DESC, v.name DESC
            LIMIT :limit",
            polarity_sql()
        )
    })
}

pub(super) fn votes(
    conn: &mut Connection,
    q: &ListQuery,
    after: Option<&ReviewCursor>,
) -> Result<Vec<ReviewedVote>, StoreError> {
    let mut stmt = conn.prepare_cached(list_sql()).map_err(sql_error)?;
    let rows = stmt
        .query_map(
            named_params! {
                ":from": to_ms(q.scope.from),
                ":to": to_ms(q.scope.to),
                ":after_at": after.map_or(i64::MAX, |c| to_ms(c.updated_at)),
                ":after_message": after.map(|c| &c.key.message_id),
                ":after_user": after.map(|c| &c.key.user_id),
                ":after_name": after.map(|c| &c.key.name),
                ":name": q.scope.name,
                ":route": q.scope.route,
                ":has_comment": q.has_comment,
                ":polarity": q.polarity.map(Polarity::sign),
                ":positive_from": q.thresholds.positive_from,
                ":negative_to": q.thresholds.negative_to,
                ":limit": i64::from(q.limit),
            },
            reviewed,
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(sql_error)?;
    rows.into_iter().collect()
}
