//! Prometheus metrics: one registry, built at start-up, shared through `AppState`.
//!
//! Label values are `&'static str` or small integers wherever possible so that recording a sample
//! never allocates. Nothing here is touched per streamed frame: a stream reports its totals once,
//! when it ends. Gauges that mirror store state (deliveries by state, oldest pending age) are
//! refreshed by the delivery worker, not computed at scrape time, so a scrape never waits on the
//! store.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceIdLabels {
    /// `found`, `not_found` or `rejected`.
    pub outcome: &'static str,
    /// The shape the id came from (`agent_event`, `databricks_output`, `response_metadata`,
    /// `client_request_id_event`, `header`), or `none`.
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

/// An accepted vote: its assessment name (one of `feedback.names`, so bounded) and a bounded
/// rendering of its value (see `feedback::vote_value_label`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VoteLabels {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationStatus {
    pub operation: &'static str,
    /// HTTP status, or 0 for a timeout / connection error.
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~33 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

fn duration_histogram() -> Histogram {
    // 10 ms … ~82 min
    Histogram::new(exponential_buckets(0.01, 2.0, 20))
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    handles: Handles,
    pub http_requests: Family<RouteStatus, Counter>,
    pub http_request_duration: Family<RouteStatus, Histogram, fn() -> Histogram>,
    pub upstream_errors: Family<KindLabel, Counter>,
    pub streams_open: Gauge,
    pub stream_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub stream_first_byte: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub stream_bytes: Counter,
    pub trace_ids: Family<TraceIdLabels, Counter>,
    pub inspector_overflows: Counter,
    pub links_recorded: Counter,
    pub links_dropped: Counter,
    pub link_errors: Counter,
    pub feedback_responses: Family<StatusLabel, Counter>,
    /// Votes stored (new or changed), by name and value; retractions are not counted.
    pub votes_accepted: Family<VoteLabels, Counter>,
    pub deliveries: Family<StateLabel, Gauge>,
    pub delivery_attempts: Family<OutcomeLabel, Counter>,
    pub delivery_oldest_pending_age: Gauge<f64, AtomicU64>,
    /// The delivery worker's adaptive in-flight limit (`feedback::pace`).
    pub delivery_concurrency_limit: Gauge<f64, AtomicU64>,
    pub mlflow_request_duration: Family<OperationLabel, Histogram, fn() -> Histogram>,
    pub mlflow_errors: Family<OperationStatus, Counter>,
    pub token_refreshes: Family<SourceLabel, Counter>,
    pub token_refresh_failures: Family<SourceLabel, Counter>,
    pub store_pool_size: Gauge,
    pub store_pool_available: Gauge,
    pub store_errors: Family<OperationLabel, Counter>,
    /// Message links held in memory while the store is unavailable.
    pub links_held: Gauge,
    /// Message links given up because the outage buffer (`agent.link_buffer`) was full.
    pub links_given_up: Counter,
}

/// Status codes 100..=599, the slots per route in [`Handles::requests`].
const STATUSES: usize = 500;

/// Metric handles of the per-request path, resolved once. `Family::get_or_create` hashes the
/// label set (SipHash) and takes a lock on every call; four such lookups per proxied request
/// were ≈ 3 % of its instructions (docs/BENCHMARKS.md). A handle shares its series with the
/// family (an `Arc` inside), so what is recorded through it is what `/metrics` shows.
struct Handles {
    /// `(requests, duration)` by `route index × STATUSES + (status − 100)`, filled on first use
    /// so that only series that happened are exported.
    requests: Box<[OnceLock<(Counter, Histogram)>]>,
    agent_stream_duration: Histogram,
    agent_stream_first_byte: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("feedback_proxy");
        let stream_duration: Family<RouteLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        let stream_first_byte: Family<RouteLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let agent = RouteLabel { route: "agent" };
        let handles = Handles {
            requests: (0..crate::route::LABELS.len() * STATUSES)
                .map(|_| OnceLock::new())
                .collect(),
            agent_stream_duration: stream_duration.get_or_create(&agent).clone(),
            agent_stream_first_byte: stream_first_byte.get_or_create(&agent).clone(),
        };
        let m = Self {
            http_requests: Family::default(),
            http_request_duration: Family::new_with_constructor(latency_histogram),
            upstream_errors: Family::default(),
            streams_open: Gauge::default(),
            stream_duration,
            stream_first_byte,
            stream_bytes: Counter::default(),
            trace_ids: Family::default(),
            inspector_overflows: Counter::default(),
            links_recorded: Counter::default(),
            links_dropped: Counter::default(),
            link_errors: Counter::default(),
            feedback_responses: Family::default(),
            votes_accepted: Family::default(),
            deliveries: Family::default(),
            delivery_attempts: Family::default(),
            delivery_oldest_pending_age: Gauge::default(),
            delivery_concurrency_limit: Gauge::default(),
            mlflow_request_duration: Family::new_with_constructor(latency_histogram),
            mlflow_errors: Family::default(),
            token_refreshes: Family::default(),
            token_refresh_failures: Family::default(),
            store_pool_size: Gauge::default(),
            store_pool_available: Gauge::default(),
            store_errors: Family::default(),
            links_held: Gauge::default(),
            links_given_up: Counter::default(),
            registry: Registry::default(),
            handles,
        };
        let r = &mut registry;
        r.register(
            "http_requests",
            "Requests answered, by route and status",
            m.http_requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time from request to response headers, by route and status",
            m.http_request_duration.clone(),
        );
        r.register(
            "upstream_errors",
            "Agent hop failures by kind (unreachable, timeout, auth, stream_error, idle_timeout)",
            m.upstream_errors.clone(),
        );
        r.register(
            "streams_open",
            "Agent response bodies currently streaming",
            m.streams_open.clone(),
        );
        r.register(
            "stream_duration_seconds",
            "Lifetime of agent response bodies",
            m.stream_duration.clone(),
        );
        r.register(
            "stream_first_byte_seconds",
            "Time from request to the first body byte from the agent",
            m.stream_first_byte.clone(),
        );
        r.register(
            "stream_bytes",
            "Bytes of agent responses forwarded to clients",
            m.stream_bytes.clone(),
        );
        r.register(
            "trace_ids",
            "Answers by trace-id outcome (found, not_found, rejected) and source shape",
            m.trace_ids.clone(),
        );
        r.register(
            "inspector_overflows",
            "Streams whose inspection stopped at an event larger than agent.max_inspect_bytes",
            m.inspector_overflows.clone(),
        );
        r.register(
            "links_recorded",
            "Message links written to the store",
            m.links_recorded.clone(),
        );
        r.register(
            "links_dropped",
            "Message links dropped because the link queue was full",
            m.links_dropped.clone(),
        );
        r.register(
            "link_errors",
            "Message links that failed to be written",
            m.link_errors.clone(),
        );
        r.register(
            "links_held",
            "Message links held in memory until the store answers again",
            m.links_held.clone(),
        );
        r.register(
            "links_given_up",
            "Message links given up because agent.link_buffer was full during a store outage",
            m.links_given_up.clone(),
        );
        r.register(
            "feedback_responses",
            "Feedback answers by mlflowStatus",
            m.feedback_responses.clone(),
        );
        r.register(
            "votes_accepted",
            "Votes stored (new or changed), by assessment name and value",
            m.votes_accepted.clone(),
        );
        r.register(
            "deliveries",
            "Deliveries by state (as of the last worker poll)",
            m.deliveries.clone(),
        );
        r.register(
            "delivery_attempts",
            "Delivery attempts by outcome: done, retry, park, dead; superseded (a newer vote came), lease_lost, missing (not applied)",
            m.delivery_attempts.clone(),
        );
        r.register(
            "delivery_oldest_pending_age_seconds",
            "Age of the oldest pending delivery",
            m.delivery_oldest_pending_age.clone(),
        );
        r.register(
            "delivery_concurrency_limit",
            "How many delivery attempts the worker keeps in flight now (adapts to MLflow's pace, at most delivery.concurrency)",
            m.delivery_concurrency_limit.clone(),
        );
        r.register(
            "mlflow_request_duration_seconds",
            "MLflow REST call latency by operation",
            m.mlflow_request_duration.clone(),
        );
        r.register(
            "mlflow_errors",
            "MLflow REST call failures by operation and status (0: timeout or connection error)",
            m.mlflow_errors.clone(),
        );
        r.register(
            "token_refreshes",
            "Successful token refreshes by source",
            m.token_refreshes.clone(),
        );
        r.register(
            "token_refresh_failures",
            "Failed token refreshes by source",
            m.token_refresh_failures.clone(),
        );
        r.register(
            "store_pool_size",
            "Store connections open",
            m.store_pool_size.clone(),
        );
        r.register(
            "store_pool_available",
            "Store connections idle in the pool",
            m.store_pool_available.clone(),
        );
        r.register(
            "store_errors",
            "Store operations that failed, by operation",
            m.store_errors.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts one answered request of route `route_index` (see `route::LABELS`) and its
    /// time to response headers.
    pub fn record_request(&self, route_index: usize, status: u16, seconds: f64) {
        let slot = usize::from(status)
            .checked_sub(100)
            .filter(|s| *s < STATUSES)
            .and_then(|s| self.handles.requests.get(route_index * STATUSES + s));
        let resolve = || {
            let labels = RouteStatus {
                route: crate::route::LABELS
                    .get(route_index)
                    .copied()
                    .unwrap_or("other"),
                status,
            };
            (
                self.http_requests.get_or_create(&labels).clone(),
                self.http_request_duration.get_or_create(&labels).clone(),
            )
        };
        match slot {
            Some(slot) => {
                let (count, duration) = slot.get_or_init(resolve);
                count.inc();
                duration.observe(seconds);
            }
            // A status outside 100..=599 (hyper would not send one): the slow path.
            None => {
                let (count, duration) = resolve();
                count.inc();
                duration.observe(seconds);
            }
        }
    }

    /// The agent streams' duration histogram (`stream_duration_seconds{route="agent"}`).
    pub fn agent_stream_duration(&self) -> &Histogram {
        &self.handles.agent_stream_duration
    }

    /// The agent streams' time-to-first-byte histogram.
    pub fn agent_stream_first_byte(&self) -> &Histogram {
        &self.handles.agent_stream_first_byte
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}
