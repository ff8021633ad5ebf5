//! Message links in SQLite: claiming a client-supplied message id, recording links in one
//! transaction per batch (and waking the deliveries waiting for them), reading one back.

use rusqlite::{Connection, OptionalExtension};

use super::conn::{immediate, now_ms, sql_error};
use super::rows::link;
use crate::store::api::{Claim, LinkRecord, MessageLink, StoreError};

pub(super) fn claim_message(conn: &mut Connection, link: &LinkRecord) -> Result<Claim, StoreError> {
    let now = now_ms();
    let tx = immediate(conn)?;
    let inserted = tx
        .prepare_cached(
            "INSERT INTO message_links
                (message_id, chat_id, user_id, trace_id, client_request_id, open, route,
                created_at, updated_at)
            VALUES (?1, ?2, ?3, ?4, ?5, 1, ?7, ?6, ?6)
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
                link.route.as_deref(),
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
///
/// Committed with `synchronous = NORMAL` (the connection's default is FULL, restored after):
/// links are best-effort by design — the proxy already drops them when its queue is full — and
/// in WAL mode NORMAL still survives a crash of the process; only an OS crash or power loss
/// may lose the last batches. That saves an fsync per batch, which was most of the cost of
/// linking at high request rates. Votes keep FULL: a 200 promises they are durable.
pub(super) fn record_links(conn: &mut Connection, links: &[LinkRecord]) -> Result<(), StoreError> {
    if links.is_empty() {
        return Ok(());
    }
    pragma(conn, "PRAGMA synchronous = NORMAL")?;
    let result = record_links_tx(conn, links);
    let restored = pragma(conn, "PRAGMA synchronous = FULL");
    result.and(restored)
}

/// A pragma that sets and returns nothing, through the statement cache: `pragma_update`
/// parses its statement at every call, twice per batch on the linking hot path.
fn pragma(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(drop)
        .map_err(sql_error)
}

fn record_links_tx(conn: &mut Connection, links: &[LinkRecord]) -> Result<(), StoreError> {
    let now = now_ms();
    let tx = immediate(conn)?;
    {
        let mut upsert = tx
            .prepare_cached(
                "INSERT INTO message_links
                    (message_id, chat_id, user_id, trace_id, client_request_id, open, route,
                    created_at, updated_at)
                VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?8, ?7, ?7)
                ON CONFLICT (message_id) DO UPDATE SET
                    route = COALESCE(excluded.route, message_links.route),
                    trace_id = COALESCE(excluded.trace_id, message_links.trace_id),
                    client_request_id = COALESCE(excluded.client_request_id, message_links.client_request_id),
                    open = excluded.open,
                    updated_at = excluded.updated_at
                WHERE message_links.user_id = excluded.user_id",
            )
            .map_err(sql_error)?;
        // A link's chat (the latest one named wins), set apart from the upsert and only when it
        // changes: SQLite rewrites an index entry whenever an UPDATE's SET list names one of its
        // columns, changed or not, so a `chat_id = COALESCE(…)` in the upsert rewrote
        // `message_links_chat_user` at every link written.
        let mut set_chat = tx
            .prepare_cached(
                "UPDATE message_links SET chat_id = ?2
                WHERE message_id = ?1 AND user_id = ?3 AND chat_id IS NOT ?2",
            )
            .map_err(sql_error)?;
        for l in links {
            if let Some(chat) = &l.chat_id {
                set_chat
                    .execute((&l.message_id, chat, &l.user_id))
                    .map_err(sql_error)?;
            }
            upsert
                .execute((
                    &l.message_id,
                    &l.chat_id,
                    &l.user_id,
                    &l.trace_id,
                    &l.client_request_id,
                    l.open,
                    now,
                    l.route.as_deref(),
                ))
                .map_err(sql_error)?;
        }
        // Same reset as `requeue`: time spent parked does not count against the horizon.
        let mut waiting = tx.prepare_cached(WAITING).map_err(sql_error)?;
        // Whether any chat rating waits at all: one probe per batch (a range of the key), as
        // nearly always none does; only then is each link's chat probed.
        let chat_ratings_wait = tx
            .prepare_cached(ANY_CHAT_WAITING)
            .and_then(|mut s| s.exists([]))
            .map_err(sql_error)?;
        let mut seen = std::collections::HashSet::new();
        // Only a link that carries an id can wake anything: skip the (comparatively costly)
        // UPDATE for the rest, e.g. the "stream opened" records, and for a message nothing
        // waits on, which is nearly every one. The wakes are prepared only when they run: the
        // statement cache hashes a statement's whole text at every lookup.
        for l in links
            .iter()
            .filter(|l| l.trace_id.is_some() || l.client_request_id.is_some())
        {
            if !seen.insert(l.message_id.as_str()) {
                continue;
            }
            if waiting.exists([&l.message_id]).map_err(sql_error)? {
                // Same reset as `requeue`: time spent parked does not count against the horizon.
                tx.prepare_cached(WAKE)
                    .and_then(|mut s| s.execute((&l.message_id, now)))
                    .map_err(sql_error)?;
            }
            if chat_ratings_wait
                && tx
                    .prepare_cached(CHAT_WAITING)
                    .and_then(|mut s| s.exists([&l.message_id]))
                    .map_err(sql_error)?
            {
                tx.prepare_cached(WAKE_CHAT)
                    .and_then(|mut s| s.execute((&l.message_id, now)))
                    .map_err(sql_error)?;
            }
        }
    }
    tx.commit().map_err(sql_error)
}

/// Whether a delivery of the message waits for its trace id: read before [`WAKE`], which
/// SQLite runs in two passes (its subquery rules out a one-pass update), collecting the rows in
/// a temporary b-tree it creates, zeroes and drops at every execution — about 8,000
/// instructions per proxied request in `bench/callgrind.sh`, a tenth of a request, for a
/// message that almost never has a waiting vote. This read is an index probe.
///
/// `+state`, here and in [`WAKE`]: it keeps the planner off `deliveries_due (state, …)`, which
/// it otherwise picks (it has no statistics to prefer the key), visiting every waiting delivery
/// of every message, the more the longer MLflow is away; through the key it reads one
/// message's rows.
pub(super) const WAITING: &str =
    "SELECT 1 FROM deliveries WHERE message_id = ?1 AND +state = 'waiting'";

/// Whether a chat rating waits for the chat of the message's link: read before the chat's
/// wake, for the same reason as [`WAITING`].
pub(super) const CHAT_WAITING: &str = "SELECT 1 FROM deliveries
    WHERE message_id = (SELECT 'chat/' || l.chat_id FROM message_links AS l
        WHERE l.message_id = ?1)
    AND +state = 'waiting'";

/// Whether any chat rating (key `chat/<chatId>`) waits: a range of the deliveries' key.
pub(super) const ANY_CHAT_WAITING: &str = "SELECT 1 FROM deliveries
    WHERE message_id >= 'chat/' AND message_id < 'chat0' AND +state = 'waiting'";

/// A chat rating waits for the first trace of the rater's chat: any of the rater's links in
/// that chat that carries an id wakes it (the attempt then finds the first).
const WAKE_CHAT: &str = "UPDATE deliveries SET
        state = 'pending', next_attempt_at = ?2, enqueued_at = ?2, attempts = 0,
        last_error = NULL, updated_at = ?2
    WHERE state = 'waiting'
        AND last_error LIKE 'no_trace_id%' -- store::AWAITING_TRACE
        AND (message_id, user_id) = (SELECT 'chat/' || l.chat_id, l.user_id
            FROM message_links AS l WHERE l.message_id = ?1
            AND l.chat_id IS NOT NULL
            AND (l.trace_id IS NOT NULL OR l.client_request_id IS NOT NULL))";

/// Wakes the deliveries of one message that wait for its trace id, once its link has one.
pub(super) const WAKE: &str = "UPDATE deliveries SET
        state = 'pending', next_attempt_at = ?2, enqueued_at = ?2, attempts = 0,
        last_error = NULL, updated_at = ?2
    WHERE message_id = ?1 AND +state = 'waiting'
        AND last_error LIKE 'no_trace_id%' -- store::AWAITING_TRACE
        AND EXISTS (SELECT 1 FROM message_links AS l WHERE l.message_id = ?1
            AND l.user_id = deliveries.user_id
            AND (l.trace_id IS NOT NULL OR l.client_request_id IS NOT NULL))";

pub(super) fn get_link(
    conn: &mut Connection,
    message_id: &str,
) -> Result<Option<MessageLink>, StoreError> {
    conn.prepare_cached(
        "SELECT message_id, chat_id, user_id, trace_id, client_request_id, open,
            created_at, updated_at, route
        FROM message_links WHERE message_id = ?1",
    )
    .and_then(|mut s| s.query_row([message_id], link).optional())
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

pub(super) fn chat_links(
    conn: &mut Connection,
    chat_id: &str,
    user_id: &str,
    limit: u32,
) -> Result<Vec<MessageLink>, StoreError> {
    conn.prepare_cached(
        "SELECT message_id, chat_id, user_id, trace_id, client_request_id, open,
            created_at, updated_at, route
        FROM message_links WHERE chat_id = ?1 AND user_id = ?2
        ORDER BY created_at, message_id LIMIT ?3",
    )
    .and_then(|mut s| {
        s.query_map((chat_id, user_id, limit), link)?
            .collect::<rusqlite::Result<Vec<_>>>()
    })
    .map_err(sql_error)
}
