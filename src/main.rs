//! The `feedback-proxy` binary: parses the command line and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use feedback_proxy::admin;
use feedback_proxy::body::Body;
use feedback_proxy::client::{ClientOptions, HttpClient};
use feedback_proxy::config::{Config, Env, LogFormat};
use feedback_proxy::review::{dataset, export};
use feedback_proxy::store::{DeliveryState, VoteKey};

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
    /// See the MLflow delivery outbox, or requeue dead letters.
    Deliveries {
        #[command(subcommand)]
        action: DeliveriesAction,
    },
    /// Write the stored votes (newest first, the fields of GET /api/review/feedback) as JSON
    /// lines or CSV, streaming from the store.
    Export {
        #[arg(long, short, env = "FEEDBACK_PROXY_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        filters: export::Filters,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: CliExportFormat,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Keep an MLflow evaluation dataset of the rated traces.
    Dataset {
        #[command(subcommand)]
        action: DatasetAction,
    },
}

#[derive(Subcommand)]
enum DatasetAction {
    /// Create the dataset if missing and upsert one record per rated trace (idempotent;
    /// progress on stderr, the summary on stdout).
    Sync {
        #[arg(long, short, env = "FEEDBACK_PROXY_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        args: dataset::SyncArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CliExportFormat {
    Jsonl,
    Csv,
}

#[derive(Subcommand)]
enum DeliveriesAction {
    /// List deliveries, newest first, with counts by state.
    List {
        #[arg(long, short, env = "FEEDBACK_PROXY_CONFIG")]
        config: PathBuf,
        /// Only this state.
        #[arg(long, value_enum)]
        state: Option<CliState>,
        /// Rows per page.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Start after this cursor (printed at the end of the previous page: `more: --after …`
        /// in the table, `next: …` on stderr with --json).
        #[arg(long)]
        after: Option<String>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Counts by state, the oldest pending delivery's age, and dead letters by reason.
    Stats {
        #[arg(long, short, env = "FEEDBACK_PROXY_CONFIG")]
        config: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make dead (or waiting) deliveries due again.
    Retry {
        #[arg(long, short, env = "FEEDBACK_PROXY_CONFIG")]
        config: PathBuf,
        /// Which deliveries to requeue.
        #[arg(long, value_enum, default_value = "dead")]
        state: RetryState,
        /// Only this vote (with --user and optionally --name).
        #[arg(long)]
        message_id: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
}

impl DeliveriesAction {
    fn config(&self) -> &PathBuf {
        match self {
            Self::List { config, .. } | Self::Stats { config, .. } | Self::Retry { config, .. } => {
                config
            }
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum CliState {
    Pending,
    Waiting,
    Done,
    Dead,
}

impl From<CliState> for DeliveryState {
    fn from(s: CliState) -> Self {
        match s {
            CliState::Pending => Self::Pending,
            CliState::Waiting => Self::Waiting,
            CliState::Done => Self::Done,
            CliState::Dead => Self::Dead,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum RetryState {
    Dead,
    Waiting,
}

impl From<RetryState> for DeliveryState {
    fn from(s: RetryState) -> Self {
        match s {
            RetryState::Dead => Self::Dead,
            RetryState::Waiting => Self::Waiting,
        }
    }
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
        Command::Export {
            config,
            filters,
            format,
            output,
        } => match Config::load(&config, &env) {
            Ok(c) => {
                let format = match format {
                    CliExportFormat::Jsonl => export::Format::Jsonl,
                    CliExportFormat::Csv => export::Format::Csv,
                };
                run_export(c, filters, format, output)
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Dataset {
            action: DatasetAction::Sync { config, args },
        } => match Config::load(&config, &env) {
            Ok(c) => dataset_sync(c, args),
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Deliveries { action } => match Config::load(action.config(), &env) {
            Ok(c) => deliveries(c, action),
            Err(e) => {
                eprintln!("{}: {e}", action.config().display());
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

/// A small runtime for the one-shot commands.
fn oneshot<F: std::future::Future<Output = ExitCode>>(config: &Config, f: F) -> ExitCode {
    let _log = feedback_proxy::telemetry::init(config.log.format, "warn");
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn migrate(config: Config) -> ExitCode {
    oneshot(&config, async {
        match admin::migrate(&config).await {
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

fn run_export(
    config: Config,
    filters: export::Filters,
    format: export::Format,
    output: Option<PathBuf>,
) -> ExitCode {
    let query = match filters.query(config.review.thresholds) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    oneshot(&config, async {
        let store = match admin::open_store(&config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot open the store: {e}");
                return ExitCode::FAILURE;
            }
        };
        let review = feedback_proxy::review::Review::new(&config, store.clone());
        let progress = |n: u64| eprintln!("exported {n} votes…");
        let result = match &output {
            Some(path) => match std::fs::File::create(path) {
                Ok(f) => export::run(&review, &store, query, format, f, progress).await,
                Err(e) => {
                    eprintln!("cannot create {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            },
            None => {
                export::run(
                    &review,
                    &store,
                    query,
                    format,
                    std::io::stdout().lock(),
                    progress,
                )
                .await
            }
        };
        match result {
            Ok(n) => {
                match &output {
                    Some(p) => eprintln!("exported {n} votes to {}", p.display()),
                    None => eprintln!("exported {n} votes"),
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("export failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn dataset_sync(config: Config, args: dataset::SyncArgs) -> ExitCode {
    oneshot(&config, async {
        let progress = |line: &str| eprintln!("{line}");
        match admin::dataset_sync(&config, &args, progress).await {
            Ok(report) => {
                println!("dataset {}: {report}", args.name);
                ExitCode::SUCCESS
            }
            Err(e @ dataset::SyncError::Usage(_)) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("dataset sync failed (run it again to resume): {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn deliveries(config: Config, action: DeliveriesAction) -> ExitCode {
    oneshot(&config, async {
        let store = match admin::open_store(&config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot open the store: {e}");
                return ExitCode::FAILURE;
            }
        };
        let result = match action {
            DeliveriesAction::List {
                state,
                limit,
                after,
                json,
                ..
            } => {
                match admin::list_deliveries(
                    &store,
                    state.map(Into::into),
                    limit,
                    after.as_deref(),
                    json,
                )
                .await
                {
                    Ok(page) => {
                        print!("{}", page.out);
                        if let (true, Some(next)) = (json, page.next) {
                            eprintln!("next: {next}");
                        }
                        Ok(())
                    }
                    Err(admin::AdminError::Store(e)) => Err(e),
                    Err(e @ admin::AdminError::BadCursor(_)) => {
                        eprintln!("{e}");
                        return ExitCode::from(2);
                    }
                }
            }
            DeliveriesAction::Stats { json, .. } => admin::delivery_stats(&store, json)
                .await
                .map(|out| print!("{out}")),
            DeliveriesAction::Retry {
                state,
                message_id,
                user,
                name,
                ..
            } => {
                let key = match (message_id, user, name) {
                    (Some(message_id), Some(user_id), name) => Some(VoteKey {
                        message_id,
                        user_id,
                        name: name.unwrap_or_else(|| config.feedback.default_name.clone()),
                    }),
                    (None, None, None) => None,
                    _ => {
                        eprintln!("--message-id and --user go together (with an optional --name)");
                        return ExitCode::from(2);
                    }
                };
                admin::retry_deliveries(&store, state.into(), key.as_ref())
                    .await
                    .map(|n| println!("requeued {n} deliveries"))
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
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
