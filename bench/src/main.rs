//! `fpbench`: the Rust half of the feedback-proxy benchmark harness (`bench/run.sh` is the other).
//!
//! - `upstream`: the fast agent stand-in (a fixed 1 KiB JSON answer, or an SSE answer of N
//!   events M ms apart), so that the agent never is the bottleneck.
//! - `mlflow`: a fast, stateless stand-in for the MLflow assessment API (scenario 5b).
//! - `sse`: the SSE timing client (time to first event, inter-event gaps, lost/reordered).
//! - `idle`: holds thousands of open streams and reads the resident memory of given processes.
//! - `feedback-seed`: writes message links for the feedback scenario (chats through the proxy).
//! - `pglog`: latency percentiles from pgbench's per-transaction logs.
//! - `relay`: a TCP relay that delays each direction (the store "milliseconds away") and counts
//!   the round trips that cross it.
//! - `startup`: time from exec of the proxy to its first `/readyz` 200, and its idle memory.
//! - `report`: turns the raw JSON lines of a run into the markdown table.
//!
//! What it deliberately does not do: generate plain HTTP load (wrk does that, a well-known
//! generator) or start and stop processes (the shell script owns their lifetimes and traps).

mod feedback;
mod idle;
mod latency;
mod mlflow;
mod procfs;
mod relay;
mod report;
mod serve;
mod sse;
mod startup;
mod stats;
mod target;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fpbench", about = "feedback-proxy benchmark harness tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The fast agent stand-in. Prints `listening ADDR` once bound.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Runtime worker threads (the same for every system under test).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Exits by itself after this many seconds (a safety net if the harness is killed).
        #[arg(long, default_value_t = 1800)]
        exit_after: u64,
    },
    /// The MLflow stand-in. Prints `listening ADDR` once bound.
    Mlflow {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 1800)]
        exit_after: u64,
    },
    /// SSE timing: `streams` concurrent streams of `events` events `interval_ms` apart.
    Sse {
        /// Base URL of the system under test, e.g. http://127.0.0.1:8080
        #[arg(long)]
        url: String,
        #[arg(long)]
        streams: usize,
        #[arg(long, default_value_t = 64)]
        events: u32,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// Runs the whole set this many times in a row, pooling the samples (more TTFB samples
        /// at low concurrency).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Hard limit for one run of the set, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Send a client-chosen message id, `x-message-id: PREFIX-REPEAT-STREAM`.
        #[arg(long)]
        message_id_prefix: Option<String>,
    },
    /// A TCP relay holding every chunk `delay_ms` in each direction. Prints `listening ADDR`
    /// and `stats ADDR` (connect to the latter for one JSON line of counters).
    Relay {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5)]
        delay_ms: u64,
        #[arg(long, default_value = "127.0.0.1:0")]
        stats: SocketAddr,
        #[arg(long, default_value_t = 1800)]
        exit_after: u64,
    },
    /// Start-up time to the first `/readyz` 200 and idle memory of the proxy binary.
    Startup {
        /// The proxy binary.
        #[arg(long)]
        proxy: PathBuf,
        /// A config with `@LISTEN@` and `@STORE_URL@` left to fill in.
        #[arg(long)]
        template: PathBuf,
        /// Scratch directory (one fresh data directory per start).
        #[arg(long)]
        work: PathBuf,
        #[arg(long, default_value_t = 20)]
        starts: u32,
        /// The last this many starts also serve requests, idle, and have their memory read.
        #[arg(long, default_value_t = 3)]
        idle_starts: u32,
        /// Chat requests served before idling.
        #[arg(long, default_value_t = 10)]
        requests: u32,
        #[arg(long, default_value_t = 2000)]
        idle_ms: u64,
        #[arg(long, default_value_t = 1000)]
        poll_us: u64,
        /// Limit for one start, in seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Latency at concurrency 1, the systems interleaved request by request.
    Latency {
        /// `NAME=http://127.0.0.1:PORT` (repeatable), e.g. direct=…, proxy=…, nginx=….
        #[arg(long = "target")]
        targets: Vec<String>,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// At most this many requests in all.
        #[arg(long, default_value_t = 1_000_000)]
        max_requests: u64,
        #[arg(long, default_value_t = 1)]
        round: u32,
    },
    /// Prints N free loopback ports (bound and released; for the servers the script configures).
    Ports { n: usize },
    /// Idle streams at scale: opens `streams` streams, holds them, reads the memory of `pid`s.
    Idle {
        #[arg(long)]
        url: String,
        #[arg(long)]
        streams: usize,
        /// Seconds between two events of a stream (the upstream's pace).
        #[arg(long, default_value_t = 10)]
        interval_s: u64,
        /// Seconds to hold every stream open once all are open.
        #[arg(long, default_value_t = 12)]
        hold: u64,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 200)]
        connect_concurrency: usize,
        /// Processes whose memory is read (repeatable; summed).
        #[arg(long)]
        pid: Vec<u32>,
        /// Hard limit for the whole run, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Chats through the proxy so that `users` × `messages` message links exist (with trace
    /// ids), for the feedback scenario.
    FeedbackSeed {
        #[arg(long)]
        url: String,
        #[arg(long)]
        users: u32,
        #[arg(long)]
        messages: u32,
        /// Distinguishes the ids of one proxy instance from another's.
        #[arg(long, default_value = "b")]
        tag: String,
        /// After seeding, vote once and require `mlflowStatus` to be one of these (comma
        /// separated).
        #[arg(long, value_delimiter = ',')]
        check_status: Vec<String>,
    },
    /// Latency percentiles (µs) from pgbench `--log` files.
    Pglog { files: Vec<PathBuf> },
    /// The markdown report of a run's raw results.
    Report {
        /// The raw results (JSON lines).
        #[arg(long)]
        raw: PathBuf,
        /// A markdown file to write besides printing.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Free text (machine, load) placed under the title.
        #[arg(long, default_value = "")]
        note: String,
        /// Print the targets without a verdict: the figures of a smoke run (debug build,
        /// seconds-long, tiny counts) say nothing about them.
        #[arg(long)]
        no_verdict: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Upstream {
            listen,
            threads,
            exit_after,
        } => serve::run_server(
            listen,
            threads,
            Duration::from_secs(exit_after),
            upstream::handle,
        ),
        Command::Mlflow {
            listen,
            threads,
            exit_after,
        } => serve::run_server(
            listen,
            threads,
            Duration::from_secs(exit_after),
            mlflow::handle,
        ),
        Command::Sse {
            url,
            streams,
            events,
            interval_ms,
            repeat,
            timeout,
            message_id_prefix,
        } => client_runtime().and_then(|rt| {
            rt.block_on(sse::run(sse::Options {
                url,
                streams,
                events,
                interval: Duration::from_millis(interval_ms),
                repeat,
                timeout: Duration::from_secs(timeout),
                message_id_prefix,
            }))
        }),
        Command::Relay {
            listen,
            to,
            delay_ms,
            stats,
            exit_after,
        } => client_runtime().and_then(|rt| {
            rt.block_on(relay::run(relay::Options {
                listen,
                to,
                delay: Duration::from_millis(delay_ms),
                stats,
                exit_after: Duration::from_secs(exit_after),
            }))
        }),
        Command::Startup {
            proxy,
            template,
            work,
            starts,
            idle_starts,
            requests,
            idle_ms,
            poll_us,
            timeout,
        } => startup::run(startup::Options {
            proxy,
            template,
            work,
            starts,
            idle_starts,
            requests,
            idle: Duration::from_millis(idle_ms),
            poll: Duration::from_micros(poll_us),
            timeout: Duration::from_secs(timeout),
        }),
        Command::Ports { n } => ports(n),
        Command::Latency {
            targets,
            seconds,
            max_requests,
            round,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))
            .and_then(|rt| {
                // One thread: one request in flight, no cross-thread wake-ups in the client.
                rt.block_on(latency::run(latency::Options {
                    targets,
                    duration: Duration::from_secs(seconds),
                    max_requests,
                    round,
                }))
            }),
        Command::Idle {
            url,
            streams,
            interval_s,
            hold,
            connect_concurrency,
            pid,
            timeout,
        } => client_runtime().and_then(|rt| {
            rt.block_on(idle::run(idle::Options {
                url,
                streams,
                interval: Duration::from_secs(interval_s),
                hold: Duration::from_secs(hold),
                connect_concurrency,
                pids: pid,
                timeout: Duration::from_secs(timeout),
            }))
        }),
        Command::FeedbackSeed {
            url,
            users,
            messages,
            tag,
            check_status,
        } => client_runtime()
            .and_then(|rt| rt.block_on(feedback::seed(&url, users, messages, &tag, &check_status))),
        Command::Pglog { files } => stats::pglog(&files),
        Command::Report {
            raw,
            out,
            note,
            no_verdict,
        } => report::run(&raw, out.as_deref(), &note, !no_verdict),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fpbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ports(n: usize) -> Result<(), String> {
    // Hold all of them until every one is chosen, so that the N ports differ.
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot bind a loopback port: {e}"))?;
    for l in &listeners {
        let port = l
            .local_addr()
            .map_err(|e| format!("no local address: {e}"))?
            .port();
        println!("{port}");
    }
    Ok(())
}

/// The clients' runtime: two worker threads, like every other process in the run.
fn client_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}
