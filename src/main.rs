//! The `feedback-proxy` binary: parses the command line and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use feedback_proxy::body::Body;
use feedback_proxy::client::{ClientOptions, HttpClient};
use feedback_proxy::config::{Config, Env, LogFormat};

#[derive(Parser)]
#[command(
    name = "feedback-proxy",
    version,
    about = "Streaming reverse proxy for Databricks agent apps: forwards chat, links answers to MLflow traces, delivers user feedback as assessments."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short, env = "FEEDBACK_PROXY_CONFIG")]
        config: PathBuf,
        /// Log format (overrides `log.format`).
        #[arg(long, value_enum)]
        log_format: Option<CliLogFormat>,
    },
    /// Validate a configuration file and print the effective configuration (secrets redacted).
    CheckConfig {
        #[arg(long, short, env = "FEEDBACK_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Probe a running proxy's /healthz: exit 0 on a 2xx answer, 1 otherwise (for container
    /// health checks, so that an image needs no curl).
    Healthcheck {
        /// The URL to probe [default: http://127.0.0.1:$DATABRICKS_APP_PORT/healthz, port 8000
        /// when the variable is unset].
        #[arg(long)]
        url: Option<String>,
        /// How long the whole probe may take.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Bring the store's schema up to date and exit (safe to run from several processes).
    Migrate {
        #[arg(long, short, env = "FEEDBACK_PROXY_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CliLogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Env::from_process();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config, &env) {
            Ok(c) => {
                print!("{}", c.to_redacted_toml());
                for w in c.warnings(&env) {
                    eprintln!("warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Healthcheck { url, timeout } => {
            let url = url.unwrap_or_else(|| {
                let port = env.get("DATABRICKS_APP_PORT").unwrap_or("8000");
                format!("http://127.0.0.1:{port}/healthz")
            });
            match healthcheck(&url, timeout) {
                Ok(status) => {
                    println!("{url}: {status}");
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    eprintln!("{url}: {why}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate { config } => match Config::load(&config, &env) {
            Ok(c) => migrate(c),
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Serve { config, log_format } => {
            let mut cfg = match Config::load(&config, &env) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    return ExitCode::from(2);
                }
            };
            if let Some(f) = log_format {
                cfg.log.format = match f {
                    CliLogFormat::Text => LogFormat::Text,
                    CliLogFormat::Json => LogFormat::Json,
                };
            }
            serve(cfg, &env)
        }
    }
}

/// One GET of `url` within `timeout`; `Ok` carries the 2xx status, `Err` says what went wrong.
fn healthcheck(url: &str, timeout: Duration) -> Result<http::StatusCode, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a valid URL ({e})"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let client = HttpClient::new(&ClientOptions {
            connect_timeout: timeout,
            ..ClientOptions::default()
        });
        let req = http::Request::get(uri)
            .header(http::header::USER_AGENT, "feedback-proxy-healthcheck")
            .body(Body::full(""))
            .map_err(|e| format!("cannot build the request ({e})"))?;
        let (parts, _) = client
            .exchange(req, timeout, 64 << 10)
            .await
            .map_err(|e| e.to_string())?;
        if parts.status.is_success() {
            Ok(parts.status)
        } else {
            Err(format!("unhealthy: HTTP {}", parts.status))
        }
    })
}

fn serve(config: Config, env: &Env) -> ExitCode {
    let _log = feedback_proxy::telemetry::init(config.log.format, &config.log.level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        for w in config.warnings(env) {
            tracing::warn!("{w}");
        }
        let addr = config.listen;
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot bind the listen address");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            agent = %config.agent.url,
            store = config.store.kind.name(),
            mlflow = config.mlflow.tracking_uri.as_ref().map(|u| u.as_str()).unwrap_or("off"),
            "feedback-proxy starting"
        );
        match feedback_proxy::run(config, listener, shutdown_signal()).await {
            Ok(()) => {
                tracing::info!("feedback-proxy stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "feedback-proxy failed to start");
                ExitCode::FAILURE
            }
        }
    })
}

fn migrate(config: Config) -> ExitCode {
    use feedback_proxy::auth::TokenSources;
    use feedback_proxy::client::{ClientOptions, HttpClient};
    use feedback_proxy::metrics::Metrics;
    use std::sync::Arc;

    let _log = feedback_proxy::telemetry::init(config.log.format, &config.log.level);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let metrics = Arc::new(Metrics::new());
        let http = HttpClient::new(&ClientOptions::default());
        let tokens = TokenSources::new(config.databricks.clone(), http.clone(), metrics.clone());
        let deps = feedback_proxy::store::postgres::Deps {
            databricks: tokens.get(&feedback_proxy::config::AuthSpec::DatabricksOauth),
            databricks_host: config.databricks.host.clone(),
            http,
            metrics,
        };
        match feedback_proxy::store::migrate(&config.store, deps).await {
            Ok(m) => {
                println!(
                    "store ({}) schema at version {} (was {})",
                    config.store.kind.name(),
                    m.to,
                    m.from
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("migration failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on SIGTERM (the platform's stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT"),
        () = term => tracing::info!("received SIGTERM"),
    }
}
