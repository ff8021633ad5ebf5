//! Postgres connections: how one is opened (hosts in order, `sslmode` fallbacks, a fresh
//! password per connection) and how the pool keeps them healthy.
//!
//! Each NEW connection asks [`Credentials`] for its password, because the password may change
//! between connections (Lakebase credentials are minted and rotate). Recycling replaces a
//! connection that is closed (the server restarted or dropped it), that has outlived
//! `max_lifetime` minus a per-connection jitter (so rotated credentials take over, and
//! connections opened together do not all reconnect at once), or that has been idle for 30 s
//! and does not answer a ping. The pool bounds waiting for a slot, connecting and checking by
//! `connect_timeout`, so a database that is down makes operations fail fast with
//! [`StoreError::Unavailable`] instead of hanging.
//!
//! deadpool-postgres supplies the pooled connection ([`ClientWrapper`]: the connection's task is
//! aborted when it is dropped) and its per-connection statement cache (`prepare_cached`, on
//! the client and on its transactions). The [`deadpool::managed::Manager`] is our own, not
//! `deadpool_postgres::Manager::from_connect`, which (read in deadpool-postgres 0.14.2 and
//! deadpool 0.13.1) lacks two things:
//! - a `deadpool_postgres::Connect` can mint a fresh password per connection (it gets the
//!   `tokio_postgres::Config` and may copy it with a password), but it must fail with a
//!   `tokio_postgres::Error`, which nothing outside tokio-postgres can construct. A failing
//!   credential endpoint ("HTTP 403: PERMISSION_DENIED …") has no such error at all, and the
//!   sentence naming each host and `sslmode` attempt ("127.0.0.1:5432 (with TLS): …") would
//!   be reduced to one of the underlying errors; both are checked by `tests/store_pg.rs`, and
//!   passing them around the pool through a side channel would be worse than this manager;
//! - its `recycle` checks for a closed connection and runs the `RecyclingMethod`'s query on
//!   EVERY checkout or never: there is no maximum lifetime and no ping only after idling (a
//!   round trip per operation would cost the vote path). `pre_recycle` hooks could add both,
//!   but deadpool runs hooks outside `recycle_timeout` and drops their errors unlogged, so a
//!   ping to a silently dead peer would wait for `TCP_USER_TIMEOUT` (≥ 30 s).
//!
//! This module knows nothing about the proxy's tables; see the parent module for queries.

use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use deadpool_postgres::ClientWrapper;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::tls::{self, Tls};
use crate::auth::password::Credentials;
use crate::config::{Secret, SslMode};
use crate::store::api::StoreError;
use crate::text::chain;

/// A connection idle for longer than this is pinged before it is handed out (a closed socket
/// is noticed without a ping; a silently dead peer is not).
const IDLE_PING_AFTER: Duration = Duration::from_secs(30);
/// TCP keepalive idle time, so that dead peers of long-lived connections are noticed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Lower bound of the connections' `TCP_USER_TIMEOUT` (see [`Manager::config`]).
const TCP_USER_TIMEOUT_MIN: Duration = Duration::from_secs(30);
/// Connections retire at `max_lifetime` minus up to this fraction of it, so that connections
/// opened together do not all reconnect at the same moment.
const LIFETIME_JITTER: f64 = 0.1;

/// Where and as whom to connect (everything but the password).
pub(super) struct Target {
    pub hosts: Vec<String>,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub application_name: String,
    pub connect_timeout: Duration,
    /// The connection's `statement_timeout` (server side: the statement is cancelled and the
    /// connection stays usable).
    pub statement_timeout: Duration,
    /// The proxy's schema, made the connection's `search_path`.
    pub schema: String,
}

/// A pooled connection (with its statement cache: `client.prepare_cached`, or
/// `prepare_cached` on a transaction from `client.transaction()`).
pub(super) struct PgConn {
    pub client: ClientWrapper,
    retire_at: Instant,
}

pub(super) struct Manager {
    pub target: Target,
    pub tls: Tls,
    pub credentials: Credentials,
    pub max_lifetime: Duration,
}

impl managed::Manager for Manager {
    type Type = PgConn;
    type Error = StoreError;

    async fn create(&self) -> Result<PgConn, StoreError> {
        self.connect().await
    }

    async fn recycle(&self, conn: &mut PgConn, metrics: &Metrics) -> RecycleResult<StoreError> {
        if conn.client.is_closed() {
            return Err(RecycleError::message("the connection was closed"));
        }
        if Instant::now() >= conn.retire_at {
            return Err(RecycleError::message(
                "the connection reached its maximum lifetime",
            ));
        }
        if metrics.last_used() >= IDLE_PING_AFTER {
            conn.client
                .simple_query("")
                .await
                .map_err(|e| RecycleError::Backend(query_error(e)))?;
        }
        Ok(())
    }
}

impl Manager {
    /// Opens one connection: a fresh password, then each host in order until one accepts.
    /// Bounded by `connect_timeout` as a whole (credential call, TCP, TLS, authentication).
    pub async fn connect(&self) -> Result<PgConn, StoreError> {
        let t = &self.target;
        match tokio::time::timeout(t.connect_timeout, self.connect_unbounded()).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "cannot connect to Postgres at {}: no answer within {}",
                self.where_(),
                humantime::format_duration(t.connect_timeout)
            ))),
        }
    }

    fn where_(&self) -> String {
        let t = &self.target;
        let hosts: Vec<String> = t.hosts.iter().map(|h| format!("{h}:{}", t.port)).collect();
        format!(
            "{} (database \"{}\", user \"{}\")",
            hosts.join(","),
            t.dbname,
            t.user
        )
    }

    async fn connect_unbounded(&self) -> Result<PgConn, StoreError> {
        let password = self.credentials.password().await?;
        let mut problems = Vec::new();
        let mut auth_refused = false;
        for host in &self.target.hosts {
            match self.connect_host(host, password.as_ref()).await {
                Ok(connected) => return self.finish(connected).await,
                Err(failures) => {
                    // allow / prefer make two attempts; say which failed how.
                    let several = failures.len() > 1;
                    for (mode, e) in failures {
                        auth_refused |= matches!(
                            e.code(),
                            Some(c) if *c == SqlState::INVALID_PASSWORD
                                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                        );
                        let attempt = match (several, mode) {
                            (false, _) => "",
                            (true, SslMode::Disable) => " (without TLS)",
                            (true, _) => " (with TLS)",
                        };
                        problems.push(format!(
                            "{host}:{}{attempt}: {}",
                            self.target.port,
                            describe_connect_error(&e, mode, host)
                        ));
                    }
                }
            }
        }
        if auth_refused {
            self.credentials.invalidate().await;
        }
        Err(StoreError::Unavailable(format!(
            "cannot connect to Postgres as user \"{}\" (database \"{}\"): {}",
            self.target.user,
            self.target.dbname,
            problems.join("; ")
        )))
    }

    /// Tries one host with the `sslmode` fallbacks; on failure, every attempt's error with the
    /// TLS mode it was made in.
    async fn connect_host(
        &self,
        host: &str,
        password: Option<&Secret>,
    ) -> Result<Connected, Vec<(SslMode, tokio_postgres::Error)>> {
        let config = self.config(host, password);
        // libpq ignores sslmode for Unix sockets: there is nothing to encrypt.
        let connector = match &self.tls.connector {
            Some(c) if !host.starts_with('/') => c,
            _ => {
                return plain(config).await.map_err(|e| vec![(SslMode::Disable, e)]);
            }
        };
        match self.tls.mode {
            SslMode::Disable => plain(config).await.map_err(|e| vec![(SslMode::Disable, e)]),
            SslMode::Allow => match plain(config.clone()).await {
                Ok(c) => Ok(c),
                Err(e1) => encrypted(config, tokio_postgres::config::SslMode::Require, connector)
                    .await
                    .map_err(|e2| vec![(SslMode::Disable, e1), (SslMode::Allow, e2)]),
            },
            SslMode::Prefer => {
                match encrypted(
                    config.clone(),
                    tokio_postgres::config::SslMode::Prefer,
                    connector,
                )
                .await
                {
                    Ok(c) => Ok(c),
                    Err(e1) => plain(config)
                        .await
                        .map_err(|e2| vec![(SslMode::Prefer, e1), (SslMode::Disable, e2)]),
                }
            }
            mode @ (SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull) => {
                encrypted(config, tokio_postgres::config::SslMode::Require, connector)
                    .await
                    .map_err(|e| vec![(mode, e)])
            }
        }
    }

    fn config(&self, host: &str, password: Option<&Secret>) -> tokio_postgres::Config {
        let t = &self.target;
        let mut c = tokio_postgres::Config::new();
        c.host(host)
            .port(t.port)
            .user(&t.user)
            .dbname(&t.dbname)
            .application_name(&t.application_name)
            .connect_timeout(t.connect_timeout)
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            // A peer that stopped acknowledging (a dead network path) closes the connection
            // instead of leaving a query to wait for TCP's retransmissions (≈ 15 minutes).
            .tcp_user_timeout(t.statement_timeout.max(TCP_USER_TIMEOUT_MIN));
        if let Some(p) = password {
            c.password(p.expose());
        }
        c
    }

    async fn finish(&self, (client, task): Connected) -> Result<PgConn, StoreError> {
        // Unqualified table names in every query resolve to the proxy's schema. The schema
        // name is a validated plain identifier (config), quoted anyway. Both settings go in one
        // round trip; set per session (not as startup options) so that any Postgres-speaking
        // server takes them.
        client
            .batch_execute(&format!(
                "SET search_path TO \"{}\"; SET statement_timeout = {}",
                self.target.schema,
                self.target.statement_timeout.as_millis().max(1)
            ))
            .await
            .map_err(query_error)?;
        let jitter = self.max_lifetime.mul_f64(LIFETIME_JITTER * fastrand::f64());
        Ok(PgConn {
            client: ClientWrapper::new(client, task),
            retire_at: Instant::now() + self.max_lifetime.saturating_sub(jitter),
        })
    }
}

/// An open connection: its client and the task driving its I/O.
type Connected = (Client, JoinHandle<()>);

async fn plain(config: tokio_postgres::Config) -> Result<Connected, tokio_postgres::Error> {
    let mut config = config;
    config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, connection) = config.connect(NoTls).await?;
    Ok((client, tokio::spawn(drive(connection))))
}

async fn encrypted(
    config: tokio_postgres::Config,
    mode: tokio_postgres::config::SslMode,
    connector: &tokio_postgres_rustls::MakeRustlsConnect,
) -> Result<Connected, tokio_postgres::Error> {
    let mut config = config;
    config.ssl_mode(mode);
    let (client, connection) = config.connect(connector.clone()).await?;
    Ok((client, tokio::spawn(drive(connection))))
}

/// Runs a connection's I/O until it closes.
async fn drive<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(e) = connection.await {
        tracing::info!(error = %chain(&e), "a Postgres connection ended with an error; the pool replaces it");
    }
}

fn describe_connect_error(e: &tokio_postgres::Error, mode: SslMode, host: &str) -> String {
    if let Some(tls) = tls::describe_failure(e, mode, host) {
        return tls;
    }
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    chain(e)
}

/// Maps an error from a query on an open connection.
pub(super) fn query_error(e: tokio_postgres::Error) -> StoreError {
    if e.is_closed() {
        return StoreError::Unavailable("the connection to Postgres was lost".to_owned());
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let text = format!("{} (SQLSTATE {code})", db.message());
        return match &code[..2] {
            // connection exception, insufficient resources, operator intervention (shutdown,
            // crash, "the database system is starting up"), invalid authorization
            "08" | "53" | "57" | "28" => StoreError::Unavailable(text),
            // undefined table / schema: not migrated
            _ if code == "42P01" || code == "3F000" => StoreError::Schema(format!(
                "{text}; the schema is missing or incomplete: run `feedback-proxy migrate` or set store.migrate = true"
            )),
            _ => StoreError::Query(text),
        };
    }
    let text = chain(&e);
    if text.starts_with("error deserializing")
        || text.starts_with("invalid column")
        || text.starts_with("query returned an unexpected number of columns")
    {
        StoreError::Corrupt(text)
    } else if text.starts_with("error serializing") {
        StoreError::Query(text)
    } else {
        // I/O, protocol and timeout failures: the connection is no longer usable.
        StoreError::Unavailable(text)
    }
}
