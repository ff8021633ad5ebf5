//! Message links in Postgres: claiming a client-supplied message id, recording links in
//! batches (and waking the deliveries waiting for them), reading one back.

use std::collections::HashMap;

use super::handle::{PgStore, lock_messages};
use super::pool::query_error;
use super::rows::link;
use crate::store::api::{Claim, LinkRecord, MessageLink, StoreError};

pub(super) async fn claim_message(store: &PgStore, link: &LinkRecord) -> Result<Claim, StoreError> {
    const INSERT: &str = "INSERT INTO message_links
            (message_id, chat_id, user_id, trace_id, client_request_id, open, route, created_at,
            updated_at)
        VALUES ($1, $2, $3, $4, $5, true, $6, now(), now())
        ON CONFLICT (message_id) DO NOTHING";
    const REOPEN: &str = "UPDATE message_links SET open = true, updated_at = now()
        WHERE message_id = $1 AND user_id = $2";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let insert = c.client.prepare_cached(INSERT).await.map_err(query_error)?;
    let inserted = c
        .client
        .execute(
            &insert,
            &[
                &link.message_id,
                &link.chat_id,
                &link.user_id,
                &link.trace_id,
                &link.client_request_id,
                &link.route.as_deref(),
            ],
        )
        .await
        .map_err(query_error)?;
    if inserted == 1 {
        return Ok(Claim::Created);
    }
    let reopen = c.client.prepare_cached(REOPEN).await.map_err(query_error)?;
    let reopened = c
        .client
        .execute(&reopen, &[&link.message_id, &link.user_id])
        .await
        .map_err(query_error)?;
    Ok(if reopened == 1 {
        Claim::Owned
    } else {
        Claim::OtherUser
    })
}

/// One user's writes to one message within a batch, merged in order.
#[derive(Debug, PartialEq)]
struct Folded<'a> {
    message_id: &'a str,
    user_id: &'a str,
    chat_id: Option<&'a str>,
    trace_id: Option<&'a str>,
    client_request_id: Option<&'a str>,
    route: Option<&'a str>,
    open: bool,
}

/// Groups a batch into rounds of at most one write per message, preserving the outcome of
/// applying the links one by one: a user's consecutive writes merge exactly as the merge rule
/// would merge them, and since only one user can own a message, writes of the other users
/// to it are either all ignored or (when the message is new) lose to whoever wrote first,
/// which is the first round. Almost every batch is a single round.
fn fold(links: &[LinkRecord]) -> Vec<Vec<Folded<'_>>> {
    let mut per_message: Vec<Vec<Folded<'_>>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for l in links {
        let i = *index.entry(l.message_id.as_str()).or_insert_with(|| {
            per_message.push(Vec::new());
            per_message.len() - 1
        });
        let groups = &mut per_message[i];
        match groups.iter_mut().find(|g| g.user_id == l.user_id) {
            Some(g) => {
                g.chat_id = l.chat_id.as_deref().or(g.chat_id);
                g.trace_id = l.trace_id.as_deref().or(g.trace_id);
                g.client_request_id = l.client_request_id.as_deref().or(g.client_request_id);
                g.route = l.route.as_deref().or(g.route);
                g.open = l.open;
            }
            None => groups.push(Folded {
                message_id: &l.message_id,
                user_id: &l.user_id,
                chat_id: l.chat_id.as_deref(),
                trace_id: l.trace_id.as_deref(),
                client_request_id: l.client_request_id.as_deref(),
                route: l.route.as_deref(),
                open: l.open,
            }),
        }
    }
    let mut rounds: Vec<Vec<Folded<'_>>> = Vec::new();
    for groups in per_message {
        for (k, g) in groups.into_iter().enumerate() {
            if rounds.len() <= k {
                rounds.push(Vec::new());
            }
            rounds[k].push(g);
        }
    }
    rounds
}

/// One transaction: lock the batch's messages, upsert the links (one statement per round,
/// arrays in, so a batch of hundreds costs a handful of round trips), wake waiting deliveries.
pub(super) async fn record_links(store: &PgStore, links: &[LinkRecord]) -> Result<(), StoreError> {
    const UPSERT: &str = "INSERT INTO message_links
            (message_id, chat_id, user_id, trace_id, client_request_id, open, route, created_at,
            updated_at)
        SELECT m, c, u, t, r, o, p, now(), now()
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[],
            $7::text[])
            AS l(m, c, u, t, r, o, p)
        ON CONFLICT (message_id) DO UPDATE SET
            chat_id = COALESCE(excluded.chat_id, message_links.chat_id),
            route = COALESCE(excluded.route, message_links.route),
            trace_id = COALESCE(excluded.trace_id, message_links.trace_id),
            client_request_id = COALESCE(excluded.client_request_id, message_links.client_request_id),
            open = excluded.open,
            updated_at = excluded.updated_at
        WHERE message_links.user_id = excluded.user_id";
    // Same reset as `requeue`: time spent parked does not count against the retry horizon.
    const WAKE: &str = "UPDATE deliveries AS d SET
            state = 'pending', next_attempt_at = now(), enqueued_at = now(), attempts = 0,
            last_error = NULL, updated_at = now()
        FROM message_links AS l
        WHERE d.state = 'waiting' AND d.message_id = ANY($1::text[])
            AND d.last_error LIKE 'no_trace_id%' -- store::AWAITING_TRACE
            AND l.message_id = d.message_id AND l.user_id = d.user_id
            AND (l.trace_id IS NOT NULL OR l.client_request_id IS NOT NULL)";
    // A chat rating waits for the first trace of the rater's chat: any of the rater's links in
    // that chat that carries an id wakes it (the attempt then finds the first).
    const WAKE_CHAT: &str = "UPDATE deliveries AS d SET
            state = 'pending', next_attempt_at = now(), enqueued_at = now(), attempts = 0,
            last_error = NULL, updated_at = now()
        FROM message_links AS l
        WHERE l.message_id = ANY($1::text[]) AND l.chat_id IS NOT NULL
            AND (l.trace_id IS NOT NULL OR l.client_request_id IS NOT NULL)
            AND d.message_id = 'chat/' || l.chat_id AND d.user_id = l.user_id
            AND d.state = 'waiting'
            AND d.last_error LIKE 'no_trace_id%' -- store::AWAITING_TRACE";
    if links.is_empty() {
        return Ok(());
    }
    let rounds = fold(links);
    let message_ids: Vec<&str> = rounds
        .first()
        .map(|r| r.iter().map(|f| f.message_id).collect())
        .unwrap_or_default();

    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let tx = c.client.transaction().await.map_err(query_error)?;
    lock_messages(&tx, &message_ids).await?;
    let upsert = tx.prepare_cached(UPSERT).await.map_err(query_error)?;
    for round in &rounds {
        let m: Vec<&str> = round.iter().map(|f| f.message_id).collect();
        let ch: Vec<Option<&str>> = round.iter().map(|f| f.chat_id).collect();
        let u: Vec<&str> = round.iter().map(|f| f.user_id).collect();
        let t: Vec<Option<&str>> = round.iter().map(|f| f.trace_id).collect();
        let r: Vec<Option<&str>> = round.iter().map(|f| f.client_request_id).collect();
        let o: Vec<bool> = round.iter().map(|f| f.open).collect();
        let p: Vec<Option<&str>> = round.iter().map(|f| f.route).collect();
        tx.execute(&upsert, &[&m, &ch, &u, &t, &r, &o, &p])
            .await
            .map_err(query_error)?;
    }
    let wake = tx.prepare_cached(WAKE).await.map_err(query_error)?;
    tx.execute(&wake, &[&message_ids])
        .await
        .map_err(query_error)?;
    let wake_chat = tx.prepare_cached(WAKE_CHAT).await.map_err(query_error)?;
    tx.execute(&wake_chat, &[&message_ids])
        .await
        .map_err(query_error)?;
    tx.commit().await.map_err(query_error)
}

pub(super) async fn chat_links(
    store: &PgStore,
    chat_id: &str,
    user_id: &str,
    limit: u32,
) -> Result<Vec<MessageLink>, StoreError> {
    const SQL: &str = "SELECT message_id, chat_id, user_id, trace_id, client_request_id, open,
            created_at, updated_at, route
        FROM message_links WHERE chat_id = $1 AND user_id = $2
        ORDER BY created_at, message_id LIMIT $3";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let rows = c
        .client
        .query(&stmt, &[&chat_id, &user_id, &i64::from(limit)])
        .await
        .map_err(query_error)?;
    rows.iter().map(link).collect()
}

pub(super) async fn get_link(
    store: &PgStore,
    message_id: &str,
) -> Result<Option<MessageLink>, StoreError> {
    const SQL: &str = "SELECT message_id, chat_id, user_id, trace_id, client_request_id, open,
            created_at, updated_at, route
        FROM message_links WHERE message_id = $1";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    let row = c
        .client
        .query_opt(&stmt, &[&message_id])
        .await
        .map_err(query_error)?;
    row.as_ref().map(link).transpose()
}

pub(super) async fn set_link_trace_id(
    store: &PgStore,
    message_id: &str,
    trace_id: &str,
) -> Result<(), StoreError> {
    const SQL: &str = "UPDATE message_links SET trace_id = $2, updated_at = now()
        WHERE message_id = $1 AND trace_id IS NULL";
    let mut conn = store.conn().await?;
    let c = &mut *conn;
    let stmt = c.client.prepare_cached(SQL).await.map_err(query_error)?;
    c.client
        .execute(&stmt, &[&message_id, &trace_id])
        .await
        .map_err(query_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(m: &str, u: &str, trace: Option<&str>, open: bool) -> LinkRecord {
        LinkRecord {
            message_id: m.into(),
            chat_id: None,
            user_id: u.into(),
            trace_id: trace.map(Into::into),
            client_request_id: None,
            open,
            route: None,
        }
    }

    #[test]
    fn fold_merges_per_user_and_splits_rounds() {
        let batch = [
            l("m1", "a", None, true),
            l("m2", "b", None, true),
            l("m1", "x", Some("tr-x"), false),
            l("m1", "a", Some("tr-1"), false),
            l("m1", "a", None, false),
        ];
        let rounds = fold(&batch);
        assert_eq!(rounds.len(), 2);
        assert_eq!(rounds[0].len(), 2);
        assert_eq!(rounds[0][0].user_id, "a");
        assert_eq!(rounds[0][0].trace_id, Some("tr-1"));
        assert!(!rounds[0][0].open);
        assert_eq!(rounds[0][1].message_id, "m2");
        assert_eq!(rounds[1].len(), 1);
        assert_eq!(rounds[1][0].user_id, "x");
    }
}
