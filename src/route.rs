//! Classifies a request once into a [`Route`]; handlers `match` on it instead of comparing
//! strings.
//!
//! Agent routes are configured path prefixes (segment-aware, longest first). The proxy's own
//! paths (`/healthz`, `/readyz`, `/metrics`, `/api/feedback…`) cannot be shadowed: config
//! validation rejects overlapping agent prefixes.

use http::Method;

use crate::config::{AgentRoute, Config, path_has_prefix};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// Forward to the agent.
    Agent(&'a AgentRoute),
    /// Liveness.
    Health,
    /// Readiness (dependencies reachable) with delivery counts.
    Ready,
    Metrics,
    /// `POST /api/feedback`
    FeedbackSubmit,
    /// `GET /api/feedback/{chatId}` (raw, still percent-encoded)
    FeedbackList {
        chat_id: &'a str,
    },
    /// `DELETE /api/feedback/{chatId}/{messageId}`
    FeedbackRetract {
        chat_id: &'a str,
        message_id: &'a str,
    },
    /// `OPTIONS /api/feedback…` (CORS preflight)
    FeedbackPreflight,
    /// A feedback path with a method it does not support.
    FeedbackMethodNotAllowed {
        allowed: &'static str,
    },
    /// The chat UI (embedded page or a configured directory).
    Ui,
    NotFound,
}

/// The routes' metric and log labels, by [`Route::index`].
pub const LABELS: [&str; 11] = [
    "agent",
    "healthz",
    "readyz",
    "metrics",
    "feedback_submit",
    "feedback_list",
    "feedback_retract",
    "feedback_preflight",
    "feedback",
    "ui",
    "not_found",
];

impl Route<'_> {
    /// A fixed label for metrics and logs.
    pub fn label(&self) -> &'static str {
        LABELS[self.index()]
    }

    /// The route's position in [`LABELS`] (what per-route metric handles are cached by).
    pub fn index(&self) -> usize {
        match self {
            Self::Agent(_) => 0,
            Self::Health => 1,
            Self::Ready => 2,
            Self::Metrics => 3,
            Self::FeedbackSubmit => 4,
            Self::FeedbackList { .. } => 5,
            Self::FeedbackRetract { .. } => 6,
            Self::FeedbackPreflight => 7,
            Self::FeedbackMethodNotAllowed { .. } => 8,
            Self::Ui => 9,
            Self::NotFound => 10,
        }
    }
}

/// Classifies `method path` against the configuration.
pub fn classify<'a>(method: &Method, path: &'a str, config: &'a Config) -> Route<'a> {
    if let Some(route) = config
        .agent
        .routes
        .iter()
        .find(|r| path_has_prefix(path, &r.path))
    {
        return Route::Agent(route);
    }
    match path {
        "/healthz" => return Route::Health,
        "/readyz" => return Route::Ready,
        "/metrics" if config.metrics.on_main_port => return Route::Metrics,
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/api/feedback") {
        return feedback(method, rest);
    }
    if config.ui.enabled && matches!(*method, Method::GET | Method::HEAD) {
        return Route::Ui;
    }
    Route::NotFound
}

fn feedback<'a>(method: &Method, rest: &'a str) -> Route<'a> {
    if *method == Method::OPTIONS {
        return Route::FeedbackPreflight;
    }
    let segments: Vec<&str> = rest
        .strip_prefix('/')
        .map(|r| r.trim_end_matches('/').split('/').collect())
        .unwrap_or_default();
    match (rest, segments.as_slice()) {
        ("" | "/", _) => {
            if *method == Method::POST {
                Route::FeedbackSubmit
            } else {
                Route::FeedbackMethodNotAllowed { allowed: "POST" }
            }
        }
        (_, [chat]) if !chat.is_empty() => {
            if *method == Method::GET || *method == Method::HEAD {
                Route::FeedbackList { chat_id: chat }
            } else {
                Route::FeedbackMethodNotAllowed { allowed: "GET" }
            }
        }
        (_, [chat, message]) if !chat.is_empty() && !message.is_empty() => {
            if *method == Method::DELETE {
                Route::FeedbackRetract {
                    chat_id: chat,
                    message_id: message,
                }
            } else {
                Route::FeedbackMethodNotAllowed { allowed: "DELETE" }
            }
        }
        _ if rest.starts_with('/') => Route::NotFound,
        // "/api/feedbackx" is not ours.
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    fn config() -> Config {
        Config::from_toml_str(
            "[agent]\nurl = \"http://127.0.0.1:1\"\npaths = [\"/invocations\", \"/responses\"]\n[[agent.routes]]\npath = \"/api/chat\"\nupstream_path = \"/invocations\"\n",
            &Env::default(),
        )
        .unwrap()
    }

    #[test]
    fn classifies_each_kind_once() {
        let c = config();
        let get = Method::GET;
        let post = Method::POST;
        assert!(
            matches!(classify(&post, "/invocations", &c), Route::Agent(r) if r.path == "/invocations")
        );
        assert!(
            matches!(classify(&post, "/api/chat/x", &c), Route::Agent(r) if r.path == "/api/chat")
        );
        assert_eq!(classify(&post, "/invocationsx", &c), Route::NotFound);
        assert_eq!(classify(&get, "/healthz", &c), Route::Health);
        assert_eq!(classify(&get, "/readyz", &c), Route::Ready);
        assert_eq!(classify(&get, "/metrics", &c), Route::Ui);
        assert_eq!(classify(&post, "/api/feedback", &c), Route::FeedbackSubmit);
        assert_eq!(
            classify(&get, "/api/feedback/chat-1", &c),
            Route::FeedbackList { chat_id: "chat-1" }
        );
        assert_eq!(
            classify(&Method::DELETE, "/api/feedback/c/m", &c),
            Route::FeedbackRetract {
                chat_id: "c",
                message_id: "m"
            }
        );
        assert_eq!(
            classify(&get, "/api/feedback", &c),
            Route::FeedbackMethodNotAllowed { allowed: "POST" }
        );
        assert_eq!(classify(&get, "/api/feedback/a/b/c", &c), Route::NotFound);
        assert_eq!(classify(&post, "/nothing", &c), Route::NotFound);
    }
}
