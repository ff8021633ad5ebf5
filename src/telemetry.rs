//! Logging: `tracing` with a human format by default or JSON lines on request.
//!
//! `RUST_LOG` overrides the configured level. Output goes through a non-blocking writer so that
//! a slow terminal or log collector never stalls a request.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Lines the non-blocking writer holds while stdout is slow; past that, lines are dropped
/// rather than stalling a request (tracing-appender's lossy mode, its default). Its buffer is
/// allocated, and every page of it touched, at start-up: tracing-appender's default of 128,000
/// lines was 4 MB of the idle proxy's resident memory; 8,192 lines are 256 KiB, about half a
/// second of access lines at 20,000 requests/s.
const LOG_BUFFER_LINES: usize = 8_192;

/// Installs the global subscriber. Keep the guard alive until exit (it flushes on drop).
pub fn init(format: LogFormat, level: &str) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .finish(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            // The request's span (request id, route, message id) on every line it logs.
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging was already initialised: {e}");
    }
    guard
}
