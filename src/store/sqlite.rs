//! SQLite backend: the embedded default, for a SINGLE instance of the proxy.
//!
//! One database file in WAL mode (readers never block the writer), `synchronous = FULL` (a
//! vote acknowledged with 200 survives a power cut, not just a crash; message-link batches,
//! best-effort by design, commit with NORMAL — see `links.rs`), and a busy timeout for
//! the rare other process touching the file (`feedback-proxy migrate`, an operator's `sqlite3`).
//! Several proxy replicas must NOT share one file: there is no cross-process lease protocol
//! beyond SQLite's own locking, and a file on a network share is not safe for WAL. Use
//! Postgres for more than one instance.
//!
//! Threading: ONE dedicated thread owns the ONE connection, and async callers send it jobs
//! over a channel and await the answer on a oneshot. Why not `spawn_blocking` with a pool of
//! connections: SQLite allows a single writer at a time anyway, so more connections would only
//! add `SQLITE_BUSY` retries between our own connections; a single owner also keeps the
//! prepared-statement cache warm and makes every operation trivially serializable (claims can
//! never overlap). Why not `spawn_blocking` around a mutex: waiting tasks would each pin a
//! blocking-pool thread. The async runtime's threads never block on SQLite.
//!
//! Timestamps are integer milliseconds since the Unix epoch from this process's clock; vote
//! values are JSON text. The SQL is in `links`, `votes`, `outbox` and `review`, next to the
//! function that runs it; `rows` decodes every row type by column name; `conn` has the shared
//! helpers.

#[macro_use]
mod rows;
mod conn;
mod links;
mod migrate;
mod outbox;
mod review;
mod votes;

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rusqlite::Connection;

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

use crate::config::StoreConfig;
use crate::metrics::{Metrics, OperationLabel};
use crate::store::api::*;

/// How long a statement waits for a lock held by another process before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The SQLite store: a handle to the thread owning the connection.
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

/// Opens (creating if needed) and migrates the database file (or, with `migrate = false`,
/// checks its schema version), then starts the connection's thread.
pub async fn open(
    path: &Path,
    config: &StoreConfig,
    metrics: Arc<Metrics>,
) -> Result<SharedStore, StoreError> {
    let path = path.to_owned();
    let migrate = config.migrate;
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("feedback-proxy-sqlite".to_owned())
        .spawn(move || {
            let setup = connect(&path).and_then(|mut conn| {
                if migrate {
                    migrate::run(&mut conn)?;
                } else {
                    migrate::check(&conn)?;
                }
                Ok(conn)
            });
            let mut conn = match setup {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            // Ends when the store (every sender) is dropped; the connection closes with it.
            while let Ok(job) = queue.recv() {
                job(&mut conn);
            }
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot start the SQLite thread: {e}")))?;
    ready_rx.await.map_err(|_| {
        StoreError::Unavailable("the SQLite thread exited during start-up".into())
    })??;
    tracing::info!(version = migrate::latest(), "SQLite store ready");
    Ok(Arc::new(SqliteStore { jobs, metrics }))
}

/// `feedback-proxy migrate` for a SQLite file.
pub async fn migrate_file(path: &Path) -> Result<Migrated, StoreError> {
    let path: PathBuf = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = connect(&path)?;
        migrate::run(&mut conn)
    })
    .await
    .map_err(|e| StoreError::Unavailable(format!("the migration task failed: {e}")))?
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let unavailable = |e: rusqlite::Error| {
        StoreError::Unavailable(format!(
            "cannot open SQLite database {}: {e}",
            path.display()
        ))
    };
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(unavailable)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "SQLite did not switch to WAL mode");
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(unavailable)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl SqliteStore {
    /// Runs `f` on the connection's thread, counting a failure under `operation`.
    async fn call<T, F>(&self, operation: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        let stopped = || StoreError::Unavailable("the SQLite thread has stopped".to_owned());
        let r = match self.jobs.send(job) {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(stopped())),
            Err(_) => Err(stopped()),
        };
        if let Err(e) = &r {
            self.metrics
                .store_errors
                .get_or_create(&OperationLabel { operation })
                .inc();
            tracing::debug!(operation, error = %e, "store operation failed");
        }
        r
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.call("health", conn::health).await
    }

    async fn claim_message(&self, link: &LinkRecord) -> Result<Claim, StoreError> {
        let link = link.clone();
        self.call("claim_message", move |c| links::claim_message(c, &link))
            .await
    }

    async fn record_links(&self, links: &[LinkRecord]) -> Result<(), StoreError> {
        let links = links.to_vec();
        self.call("record_links", move |c| links::record_links(c, &links))
            .await
    }

    async fn get_link(&self, message_id: &str) -> Result<Option<MessageLink>, StoreError> {
        let id = message_id.to_owned();
        self.call("get_link", move |c| links::get_link(c, &id))
            .await
    }

    async fn set_link_trace_id(&self, message_id: &str, trace_id: &str) -> Result<(), StoreError> {
        let (id, trace) = (message_id.to_owned(), trace_id.to_owned());
        self.call("set_link_trace_id", move |c| {
            links::set_link_trace_id(c, &id, &trace)
        })
        .await
    }

    async fn upsert_vote_corrected(
        &self,
        vote: &NewVote,
        correction: &CorrectionChange,
        enqueue: &Enqueue,
    ) -> Result<VoteWrite, StoreError> {
        let (vote, correction, enqueue) = (vote.clone(), correction.clone(), enqueue.clone());
        self.call("upsert_vote", move |c| {
            votes::upsert_vote(c, &vote, &correction, &enqueue)
        })
        .await
    }

    async fn retract_vote_corrected(
        &self,
        key: &VoteKey,
        hold: std::time::Duration,
    ) -> Result<Option<VoteWrite>, StoreError> {
        let key = key.clone();
        self.call("retract_vote", move |c| votes::retract_vote(c, &key, hold))
            .await
    }

    async fn chat_links(
        &self,
        chat_id: &str,
        user_id: &str,
        limit: u32,
    ) -> Result<Vec<MessageLink>, StoreError> {
        let (chat, user) = (chat_id.to_owned(), user_id.to_owned());
        self.call("chat_links", move |c| {
            links::chat_links(c, &chat, &user, limit)
        })
        .await
    }

    async fn list_votes(&self, chat_id: &str, user_id: &str) -> Result<Vec<Vote>, StoreError> {
        let (chat, user) = (chat_id.to_owned(), user_id.to_owned());
        self.call("list_votes", move |c| votes::list_votes(c, &chat, &user))
            .await
    }

    async fn claim_due(&self, limit: u32, lease: Duration) -> Result<Vec<Delivery>, StoreError> {
        self.call("claim_due", move |c| outbox::claim_due(c, limit, lease))
            .await
    }

    async fn claim(
        &self,
        key: &VoteKey,
        version: i64,
        lease: Duration,
    ) -> Result<Option<Delivery>, StoreError> {
        let key = key.clone();
        self.call("claim", move |c| outbox::claim(c, &key, version, lease))
            .await
    }

    async fn finish(
        &self,
        ticket: &Ticket,
        fact: &AssessmentFact,
        outcome: &Outcome,
    ) -> Result<Finished, StoreError> {
        let (ticket, fact, outcome) = (ticket.clone(), fact.clone(), outcome.clone());
        self.call("finish", move |c| {
            outbox::finish(c, &ticket, &fact, &outcome)
        })
        .await
    }

    async fn renew_lease(&self, ticket: &Ticket, lease: Duration) -> Result<bool, StoreError> {
        let ticket = ticket.clone();
        self.call("renew_lease", move |c| {
            outbox::renew_lease(c, &ticket, lease)
        })
        .await
    }

    async fn list_deliveries_after(
        &self,
        state: Option<DeliveryState>,
        limit: u32,
        after: Option<&DeliveryCursor>,
    ) -> Result<Vec<Delivery>, StoreError> {
        let after = after.cloned();
        self.call("list_deliveries", move |c| {
            outbox::list_deliveries(c, state, limit, after.as_ref())
        })
        .await
    }

    async fn dead_reasons(&self, limit: u32) -> Result<Vec<(String, u64)>, StoreError> {
        self.call("dead_reasons", move |c| outbox::dead_reasons(c, limit))
            .await
    }

    async fn requeue(
        &self,
        state: DeliveryState,
        key: Option<&VoteKey>,
    ) -> Result<u64, StoreError> {
        let key = key.cloned();
        self.call("requeue", move |c| outbox::requeue(c, state, key.as_ref()))
            .await
    }

    async fn requeue_held(&self, reason: &str) -> Result<u64, StoreError> {
        let reason = reason.to_owned();
        self.call("requeue_held", move |c| outbox::requeue_held(c, &reason))
            .await
    }

    async fn delivery_stats(&self) -> Result<DeliveryStats, StoreError> {
        self.call("delivery_stats", outbox::delivery_stats).await
    }

    async fn review_summary(&self, q: &SummaryQuery) -> Result<Vec<SummaryCell>, StoreError> {
        let q = q.clone();
        self.call("review_summary", move |c| review::summary(c, &q))
            .await
    }

    async fn review_backlog(&self) -> Result<Backlog, StoreError> {
        self.call("review_backlog", review::backlog).await
    }

    async fn review_votes(
        &self,
        q: &ListQuery,
        after: Option<&ReviewCursor>,
    ) -> Result<Vec<ReviewedVote>, StoreError> {
        let (q, after) = (q.clone(), after.cloned());
        self.call("review_votes", move |c| {
            review::votes(c, &q, after.as_ref())
        })
        .await
    }

    fn pool_status(&self) -> PoolStatus {
        PoolStatus {
            size: 1,
            available: 1,
        }
    }
}

#[cfg(test)]
mod wake_plan {
    use super::links::{ANY_CHAT_WAITING, CHAT_WAITING, WAITING, WAKE};

    /// Both statements read one message's deliveries through their key, not every waiting
    /// delivery through `deliveries_due` (see `links::WAITING`); on the old statement this fails.
    #[test]
    fn waking_reads_one_message_through_the_key() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut conn = super::connect(&dir.path().join("plan.db")).expect("open");
        super::migrate::run(&mut conn).expect("migrate");
        for (sql, bound) in [
            (WAITING, "message_id=?"),
            (CHAT_WAITING, "message_id=?"),
            (WAKE, "message_id=?"),
            (ANY_CHAT_WAITING, "message_id>?"),
        ] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .and_then(|mut s| {
                    if s.parameter_count() > 0 {
                        s.raw_bind_parameter(1, "m")?;
                    }
                    s.raw_query()
                        .mapped(|r| r.get::<_, String>(3))
                        .collect::<Result<_, _>>()
                })
                .expect("the plan");
            assert!(
                plan.first().is_some_and(|p| p.starts_with(&format!(
                    "SEARCH deliveries USING INDEX sqlite_autoindex_deliveries_1 ({bound}"
                ))),
                "{sql}: {plan:#?}"
            );
        }
    }
}
