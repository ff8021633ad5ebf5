//! `[store]`: SQLite or Postgres (URL or libpq `PG*` environment, `sslmode`, password source),
//! pool and timeouts, with their validation; URLs are redacted before they are echoed.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Serialize, Serializer};
use url::Url;

use super::env::Env;
use super::raw;
use super::redact::redact_url;
use super::secret::Secret;
use super::ser::{ser_duration, ser_opt_path, ser_path};
use super::validate::{Validator, valid_identifier};

/// libpq `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(format!(
                    "unknown sslmode \"{other}\" (expected disable, allow, prefer, require, verify-ca or verify-full)"
                ));
            }
        })
    }
}

/// Where Postgres passwords come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// The password in the URL or `PGPASSWORD` (or none: trust / peer auth).
    Static,
    /// The app's Databricks OAuth token (Lakebase provisioned tier accepts it directly).
    DatabricksOauth,
    /// `POST /api/2.0/database/credentials` for a provisioned Lakebase instance.
    LakebaseProvisioned { instance: String },
    /// `POST /api/2.0/postgres/credentials` for an autoscaling Lakebase endpoint.
    LakebaseAutoscaling { endpoint: String },
}

impl PasswordSource {
    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "static" => Ok(Self::Static),
            "databricks-oauth" => Ok(Self::DatabricksOauth),
            other => {
                if let Some(instance) = other.strip_prefix("lakebase-provisioned:") {
                    if !instance.is_empty() {
                        return Ok(Self::LakebaseProvisioned {
                            instance: instance.to_owned(),
                        });
                    }
                }
                if let Some(endpoint) = other.strip_prefix("lakebase-autoscaling:") {
                    if !endpoint.is_empty() {
                        return Ok(Self::LakebaseAutoscaling {
                            endpoint: endpoint.to_owned(),
                        });
                    }
                }
                Err(format!(
                    "unknown password source \"{other}\" (expected \"static\", \"databricks-oauth\", \"lakebase-provisioned:INSTANCE\" or \"lakebase-autoscaling:projects/P/branches/B/endpoints/E\")"
                ))
            }
        }
    }

    /// Whether the password is minted through Databricks (needs `[databricks]` credentials).
    pub fn uses_databricks(&self) -> bool {
        !matches!(self, Self::Static)
    }
}

impl fmt::Display for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static => f.write_str("static"),
            Self::DatabricksOauth => f.write_str("databricks-oauth"),
            Self::LakebaseProvisioned { instance } => write!(f, "lakebase-provisioned:{instance}"),
            Self::LakebaseAutoscaling { endpoint } => write!(f, "lakebase-autoscaling:{endpoint}"),
        }
    }
}

impl Serialize for PasswordSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Postgres connection parameters (libpq semantics: URL parts win, `PG*` variables fill in).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PgConnect {
    /// Host names, IP addresses or Unix socket directories (tried in order).
    pub hosts: Vec<String>,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    /// CA bundle for `verify-ca` / `verify-full` (default: the system roots).
    #[serde(serialize_with = "ser_opt_path")]
    pub sslrootcert: Option<PathBuf>,
    pub application_name: Option<String>,
}

/// Which store backend, and where.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StoreKind {
    /// An embedded SQLite file (single instance only).
    Sqlite {
        #[serde(serialize_with = "ser_path")]
        path: PathBuf,
    },
    Postgres(PgConnect),
}

impl StoreKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite { .. } => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Schema holding the proxy's tables (Postgres).
    pub schema: String,
    pub pool_size: usize,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Postgres cancels a statement running (or waiting for a lock) longer than this, so a
    /// stuck database fails requests with a clear error instead of hanging them.
    #[serde(serialize_with = "ser_duration")]
    pub statement_timeout: Duration,
    /// Connections older than this are replaced, so rotated credentials take over.
    #[serde(serialize_with = "ser_duration")]
    pub max_lifetime: Duration,
    pub password: PasswordSource,
    /// Run migrations at start-up.
    pub migrate: bool,
}

/// libpq defaults from `PG*` variables (what a Databricks Lakebase resource injects).
pub(super) fn pg_from_env(env: &Env, v: &mut Validator) -> PgConnect {
    let user = env
        .get("PGUSER")
        .or_else(|| env.get("USER"))
        .unwrap_or("postgres")
        .to_owned();
    let sslmode = match env.get("PGSSLMODE") {
        None => SslMode::Prefer,
        Some(m) => m.parse().unwrap_or_else(|e: String| {
            v.problem("store.url", format!("PGSSLMODE: {e}"));
            SslMode::Prefer
        }),
    };
    let port = match env.get("PGPORT") {
        None => 5432,
        Some(p) => p.parse().unwrap_or_else(|_| {
            v.problem("store.url", format!("PGPORT is not a port number: \"{p}\""));
            5432
        }),
    };
    PgConnect {
        hosts: env
            .get("PGHOST")
            .unwrap_or("localhost")
            .split(',')
            .map(str::to_owned)
            .collect(),
        port,
        dbname: env.get("PGDATABASE").unwrap_or(&user).to_owned(),
        user,
        password: env.get("PGPASSWORD").map(Secret::new),
        sslmode,
        sslrootcert: env.get("PGSSLROOTCERT").map(PathBuf::from),
        application_name: env.get("PGAPPNAME").map(str::to_owned),
    }
}

pub(super) fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Whether every Postgres host is this machine (a Unix socket directory or a loopback name).
pub(super) fn pg_hosts_local(hosts: &[String]) -> bool {
    hosts
        .iter()
        .all(|h| h.starts_with('/') || h == "localhost" || h.starts_with("127."))
}

impl Validator {
    pub(super) fn store(&mut self, raw: raw::RawStore, env: &Env) -> StoreConfig {
        let connect_timeout = self.duration(
            "store.connect_timeout",
            raw.connect_timeout.as_deref(),
            "5s",
        );
        let kind = match raw.url.as_deref() {
            Some(u) if u.starts_with("sqlite:") => self.sqlite_path(u),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                self.pg_url(u, env)
            }
            Some(u) => {
                self.problem(
                    "store.url",
                    format!(
                        "unsupported store \"{}\" (expected sqlite://PATH or postgres://…)",
                        redact_url(u)
                    ),
                );
                StoreKind::Sqlite {
                    path: PathBuf::from("feedback-proxy.db"),
                }
            }
            None if env.get("PGHOST").is_some() => StoreKind::Postgres(pg_from_env(env, self)),
            None => StoreKind::Sqlite {
                path: PathBuf::from("feedback-proxy.db"),
            },
        };
        let schema = raw.schema.unwrap_or_else(|| "feedback_proxy".to_owned());
        if !valid_identifier(&schema) {
            self.problem(
                "store.schema",
                format!(
                    "\"{schema}\" is not a plain SQL identifier (lowercase letters, digits, '_')"
                ),
            );
        }
        let password = match raw.password.as_deref() {
            None => PasswordSource::Static,
            Some(p) => match PasswordSource::parse(p) {
                Ok(s) => s,
                Err(e) => {
                    self.problem("store.password", e);
                    PasswordSource::Static
                }
            },
        };
        if password.uses_databricks() && matches!(kind, StoreKind::Sqlite { .. }) {
            self.problem(
                "store.password",
                "a Databricks password source needs a Postgres store",
            );
        }
        let pool_size = raw.pool_size.unwrap_or(16);
        if pool_size == 0 {
            self.problem("store.pool_size", "must be greater than zero");
        }
        let statement_timeout = self.duration(
            "store.statement_timeout",
            raw.statement_timeout.as_deref(),
            "10s",
        );
        if statement_timeout < Duration::from_millis(1) {
            // Postgres reads 0 as "no limit"; a stuck database would hang requests again.
            self.problem("store.statement_timeout", "must be at least 1ms");
        }
        StoreConfig {
            kind,
            schema,
            pool_size,
            connect_timeout,
            statement_timeout,
            max_lifetime: self.duration("store.max_lifetime", raw.max_lifetime.as_deref(), "45m"),
            password,
            migrate: raw.migrate.unwrap_or(true),
        }
    }

    pub(super) fn sqlite_path(&mut self, u: &str) -> StoreKind {
        // sqlite://relative/path, sqlite:///absolute/path, sqlite:relative
        let rest = u
            .strip_prefix("sqlite://")
            .or_else(|| u.strip_prefix("sqlite:"))
            .unwrap_or_default();
        let rest = rest.split('?').next().unwrap_or_default();
        if rest.is_empty() {
            self.problem(
                "store.url",
                "sqlite URL has no file path (e.g. \"sqlite://feedback-proxy.db\")",
            );
        }
        StoreKind::Sqlite {
            path: PathBuf::from(rest),
        }
    }

    pub(super) fn pg_url(&mut self, u: &str, env: &Env) -> StoreKind {
        let mut pg = pg_from_env(env, self);
        let url = match Url::parse(u) {
            Ok(url) => url,
            Err(e) => {
                self.problem(
                    "store.url",
                    format!("invalid Postgres URL \"{}\" ({e})", redact_url(u)),
                );
                return StoreKind::Postgres(pg);
            }
        };
        if let Some(host) = url.host_str().filter(|h| !h.is_empty()) {
            pg.hosts = host
                .split(',')
                .map(|h| h.trim_matches(['[', ']']).to_owned())
                .collect();
        }
        if let Some(port) = url.port() {
            pg.port = port;
        }
        if !url.username().is_empty() {
            pg.user = percent_decode(url.username());
        }
        if let Some(pw) = url.password() {
            pg.password = Some(Secret::new(percent_decode(pw)));
        }
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() {
            pg.dbname = percent_decode(db);
        }
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "sslmode" => match v.parse() {
                    Ok(m) => pg.sslmode = m,
                    Err(e) => self.problem("store.url", e),
                },
                "sslrootcert" => pg.sslrootcert = Some(PathBuf::from(v.as_ref())),
                "application_name" => pg.application_name = Some(v.into_owned()),
                "host" => pg.hosts = v.split(',').map(str::to_owned).collect(),
                "port" => match v.parse() {
                    Ok(p) => pg.port = p,
                    Err(_) => self.problem("store.url", format!("invalid port \"{v}\"")),
                },
                "user" => pg.user = v.into_owned(),
                "dbname" => pg.dbname = v.into_owned(),
                "password" => pg.password = Some(Secret::new(v.into_owned())),
                other => self.problem(
                    "store.url",
                    format!(
                        "unsupported parameter \"{other}\" (supported: sslmode, sslrootcert, application_name, host, port, user, dbname, password)"
                    ),
                ),
            }
        }
        StoreKind::Postgres(pg)
    }
}
