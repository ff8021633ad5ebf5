//! What `check-config` and start-up say about a valid but risky configuration
//! ([`Config::warnings`]), and the redacted TOML it prints ([`Config::to_redacted_toml`]).

use url::Url;

use super::auth::AuthSpec;
use super::env::Env;
use super::load::{Config, is_local_host};
use super::store::{PasswordSource, SslMode, StoreKind, pg_hosts_local};

impl Config {
    /// The effective configuration as TOML, secrets redacted (for `check-config`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Risky settings worth a warning at start-up.
    pub fn warnings(&self, env: &Env) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(user) = &self.identity.dev_user {
            if env.get("DATABRICKS_APP_NAME").is_some() {
                out.push(format!(
                    "identity.dev_user = \"{user}\" is set while running as a Databricks App: requests without identity headers will act as that user"
                ));
            }
        }
        if !self.identity.trust_forwarded_headers && env.get("DATABRICKS_APP_NAME").is_some() {
            out.push("identity.trust_forwarded_headers is false on Databricks Apps: the platform's user headers are ignored".to_owned());
        }
        if self.identity.trust_forwarded_headers && env.get("DATABRICKS_APP_NAME").is_none() {
            out.push("identity.trust_forwarded_headers is true outside Databricks Apps: any client can claim any identity unless a trusted proxy strips x-forwarded-* headers".to_owned());
        }
        if self.metrics.on_main_port && !self.listen.ip().is_loopback() {
            out.push(
                "metrics.on_main_port = true on a non-loopback listener: /metrics is public"
                    .to_owned(),
            );
        }
        if matches!(self.store.kind, StoreKind::Sqlite { .. })
            && env.get("DATABRICKS_APP_NAME").is_some()
        {
            out.push("the SQLite store is single-instance and lives on the app's ephemeral disk: configure Postgres (Lakebase) for production".to_owned());
        }
        if let StoreKind::Postgres(pg) = &self.store.kind {
            if matches!(
                pg.sslmode,
                SslMode::Disable | SslMode::Allow | SslMode::Prefer
            ) && !pg_hosts_local(&pg.hosts)
            {
                out.push(format!(
                    "store sslmode={} for a remote Postgres host: the connection may be unencrypted",
                    pg.sslmode.as_str()
                ));
            }
        }
        if self.mlflow.tracking_uri.is_some() && self.mlflow.experiment_id.is_none() {
            out.push("mlflow.tracking_uri is set but mlflow.experiment_id is not: feedback will answer no_experiment_id".to_owned());
        }
        for (key, set) in [
            ("review.mlflow_queue", self.review.mlflow_queue.is_some()),
            ("datasets.auto", self.datasets.auto.is_some()),
        ] {
            if set && !self.mlflow.enabled() {
                out.push(format!(
                    "{key} is set but MLflow delivery is not configured (mlflow.tracking_uri and mlflow.experiment_id): nothing will be added"
                ));
            }
        }
        let hops = [
            ("agent.url", Some(&self.agent.url), &self.agent.auth),
            (
                "mlflow.tracking_uri",
                self.mlflow.tracking_uri.as_ref(),
                &self.mlflow.auth,
            ),
        ];
        for (key, url, auth) in hops {
            let Some(url) = url else { continue };
            // A token sent in the clear to another machine.
            if url.scheme() == "http" && *auth != AuthSpec::None && !is_local_host(url) {
                out.push(format!(
                    "{key} is plain http:// to {} with auth \"{auth}\": the token crosses the network unencrypted",
                    url.host_str().unwrap_or_default()
                ));
            }
            // Databricks answers every unauthenticated call with 401 (or a login redirect).
            if *auth == AuthSpec::None && self.is_databricks_url(url) {
                out.push(format!(
                    "{key} is a Databricks URL but its auth is \"none\": every call will be rejected (use \"databricks-oauth\")"
                ));
            }
        }
        if let StoreKind::Postgres(pg) = &self.store.kind {
            if self.store.password == PasswordSource::Static
                && pg.password.is_none()
                && !pg_hosts_local(&pg.hosts)
            {
                out.push(format!(
                    "store: Postgres at {} with no password (store.password = \"static\", none in the URL or PGPASSWORD): login fails unless the server trusts this client; Lakebase needs store.password = \"databricks-oauth\"",
                    pg.hosts.join(",")
                ));
            }
        }
        out
    }

    /// Whether `url` is served by Databricks: the workspace host or a Databricks App.
    pub(super) fn is_databricks_url(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        self.databricks
            .host
            .as_ref()
            .and_then(|h| h.host_str())
            .is_some_and(|h| h.eq_ignore_ascii_case(host))
            || host.to_ascii_lowercase().ends_with(".databricksapps.com")
    }
}
