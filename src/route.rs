//! Classifies a request once into a [`Route`]; handlers `match` on it instead of comparing
//! strings.
//!
//! Agent routes are configured path prefixes (segment-aware, longest first). The proxy's own
//! paths (`/healthz`, `/readyz`, `/metrics`, `/api/feedback…`) cannot be shadowed: config
//! validation rejects agent prefixes that overlap them, and an `ai-sdk-app` route (the chat app
//! template's whole site, usually at `/`) is passed over for them, so that the template's
//! feedback calls reach the proxy.
//!
//! Agent paths are normalised first ([`path::normalize`]: dot segments removed, `%2e` read as
//! `.`); the route is chosen by the normalised path, which is also what the agent receives. A
//! path that matches an agent prefix as sent but leaves it once normalised
//! (`/invocations/../api/…`), or that carries `%2f`, `\`, `%5c` or `%00`, is
//! [`Route::AgentBadPath`] and is never forwarded. A method the route does not list
//! (`agent.routes[].methods`, default POST) is [`Route::AgentMethodNotAllowed`].

pub mod path;

use std::borrow::Cow;

use http::Method;

use crate::config::{AgentRoute, Config, RouteKind, path_has_prefix};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// Forward to the agent, under `path` (the normalised request path).
    Agent {
        route: &'a AgentRoute,
        path: Cow<'a, str>,
    },
    /// Liveness.
    Health,
    /// Readiness (dependencies reachable) with delivery counts.
    Ready,
    Metrics,
    /// `POST /api/feedback`
    FeedbackSubmit,
    /// `GET /api/feedback/{chatId}` (raw, still percent-encoded), or with `template` the chat
    /// app template's `GET /api/feedback/chat/{chatId}`
    FeedbackList {
        chat_id: &'a str,
        template: bool,
    },
    /// `DELETE /api/feedback/{chatId}/{messageId}`
    FeedbackRetract {
        chat_id: &'a str,
        message_id: &'a str,
    },
    /// `GET /api/feedback/schema`: the label schemas of the accepted names.
    FeedbackSchema,
    /// `POST /api/feedback/batch`: up to 100 votes, each as `POST /api/feedback` would take it.
    FeedbackBatch,
    /// `DELETE /api/feedback/{chatId}`: retracts the caller's rating of the whole chat.
    FeedbackRetractChat {
        chat_id: &'a str,
    },
    /// `OPTIONS /api/feedback…` (CORS preflight)
    FeedbackPreflight,
    /// A feedback path with a method it does not support.
    FeedbackMethodNotAllowed {
        allowed: &'static str,
    },
    /// `GET /api/review/summary`
    ReviewSummary,
    /// `GET /api/review/feedback`
    ReviewFeedback,
    /// `GET /review`: the review page.
    ReviewPage,
    /// The chat UI (embedded page or a configured directory).
    Ui,
    NotFound,
    /// A path under an agent prefix that is refused (400) before anything is forwarded.
    AgentBadPath {
        reason: path::PathError,
    },
    /// A method the agent route does not accept (405 with `Allow`).
    AgentMethodNotAllowed {
        route: &'a AgentRoute,
    },
}

/// The routes' metric and log labels, by [`Route::index`].
pub const LABELS: [&str; 16] = [
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
    "review_summary",
    "review_feedback",
    "review_page",
    "feedback_schema",
    "feedback_batch",
];

impl Route<'_> {
    /// A fixed label for metrics and logs.
    pub fn label(&self) -> &'static str {
        LABELS[self.index()]
    }

    /// The route's position in [`LABELS`] (what per-route metric handles are cached by).
    pub fn index(&self) -> usize {
        match self {
            Self::Agent { .. } | Self::AgentBadPath { .. } | Self::AgentMethodNotAllowed { .. } => {
                0
            }
            Self::Health => 1,
            Self::Ready => 2,
            Self::Metrics => 3,
            Self::FeedbackSubmit => 4,
            Self::FeedbackList { .. } => 5,
            Self::FeedbackRetract { .. } | Self::FeedbackRetractChat { .. } => 6,
            Self::FeedbackPreflight => 7,
            Self::FeedbackMethodNotAllowed { .. } => 8,
            Self::Ui => 9,
            Self::NotFound => 10,
            Self::ReviewSummary => 11,
            Self::ReviewFeedback => 12,
            Self::ReviewPage => 13,
            Self::FeedbackSchema => 14,
            Self::FeedbackBatch => 15,
        }
    }
}

/// Classifies `method path` against the configuration.
pub fn classify<'a>(method: &Method, path: &'a str, config: &'a Config) -> Route<'a> {
    let as_sent = agent_route(path, config);
    match path::normalize(path) {
        Ok(normal) => {
            let route = match &normal {
                Cow::Borrowed(_) => as_sent,
                Cow::Owned(p) => agent_route(p, config),
            };
            let own =
                route.is_some_and(|r| r.kind == RouteKind::AiSdkApp) && own_path(&normal, config);
            match (as_sent, route) {
                // The proxy's own path under an ai-sdk-app route: served here, never forwarded
                // (and only as sent: a dot-segment spelling of it is nobody's).
                _ if own && matches!(normal, Cow::Owned(_)) => return Route::NotFound,
                _ if own => {}
                // Normalised, the path must stay under the prefix it was sent to.
                (Some(sent), _) if !path_has_prefix(&normal, &sent.path) => {
                    return Route::AgentBadPath {
                        reason: path::PathError::LeavesPrefix,
                    };
                }
                (_, Some(route)) => {
                    if !route.methods.contains(method) {
                        return Route::AgentMethodNotAllowed { route };
                    }
                    return Route::Agent {
                        route,
                        path: normal,
                    };
                }
                _ => {}
            }
        }
        Err(reason) if as_sent.is_some() => return Route::AgentBadPath { reason },
        // Not an agent path: the proxy's own routes check their input themselves.
        Err(_) => {}
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
    // The review surface answers every method itself (405 for all but GET and HEAD, 404 when
    // it is off), so that it never falls through to the UI.
    match path.trim_end_matches('/') {
        "/api/review/summary" => return Route::ReviewSummary,
        "/api/review/feedback" => return Route::ReviewFeedback,
        "/review" => return Route::ReviewPage,
        _ => {}
    }
    if config.ui.enabled && matches!(*method, Method::GET | Method::HEAD) {
        return Route::Ui;
    }
    Route::NotFound
}

/// Whether the proxy serves `path` itself.
fn own_path(path: &str, config: &Config) -> bool {
    matches!(path, "/healthz" | "/readyz")
        || (path == "/metrics" && config.metrics.on_main_port)
        || path_has_prefix(path, "/api/feedback")
        || path_has_prefix(path, "/api/review")
        || path_has_prefix(path, "/review")
}

/// The agent route of `path` as it is (longest prefix first, see config validation).
fn agent_route<'a>(path: &str, config: &'a Config) -> Option<&'a AgentRoute> {
    config
        .agent
        .routes
        .iter()
        .find(|r| path_has_prefix(path, &r.path))
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
        // Shadows a chat named "schema" (GET) and the retraction of nothing; a chat named
        // "batch" is still listed by GET.
        (_, ["schema"]) => {
            if *method == Method::GET || *method == Method::HEAD {
                Route::FeedbackSchema
            } else {
                Route::FeedbackMethodNotAllowed { allowed: "GET" }
            }
        }
        (_, ["batch"]) if *method == Method::POST => Route::FeedbackBatch,
        (_, [chat]) if !chat.is_empty() => {
            if *method == Method::GET || *method == Method::HEAD {
                Route::FeedbackList {
                    chat_id: chat,
                    template: false,
                }
            } else if *method == Method::DELETE {
                Route::FeedbackRetractChat { chat_id: chat }
            } else {
                Route::FeedbackMethodNotAllowed {
                    allowed: "GET, DELETE",
                }
            }
        }
        // The chat app template's read of a chat's votes.
        (_, ["chat", chat])
            if !chat.is_empty() && (*method == Method::GET || *method == Method::HEAD) =>
        {
            Route::FeedbackList {
                chat_id: chat,
                template: true,
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
            matches!(classify(&post, "/invocations", &c), Route::Agent { route, .. } if route.path == "/invocations")
        );
        assert!(
            matches!(classify(&post, "/api/chat/x", &c), Route::Agent { route, .. } if route.path == "/api/chat")
        );
        assert_eq!(classify(&post, "/invocationsx", &c), Route::NotFound);
        assert_eq!(classify(&get, "/healthz", &c), Route::Health);
        assert_eq!(classify(&get, "/readyz", &c), Route::Ready);
        assert_eq!(classify(&get, "/metrics", &c), Route::Ui);
        assert_eq!(classify(&post, "/api/feedback", &c), Route::FeedbackSubmit);
        assert_eq!(
            classify(&get, "/api/feedback/chat-1", &c),
            Route::FeedbackList {
                chat_id: "chat-1",
                template: false
            }
        );
        assert_eq!(
            classify(&get, "/api/feedback/chat/c-9", &c),
            Route::FeedbackList {
                chat_id: "c-9",
                template: true
            }
        );
        assert_eq!(
            classify(&Method::DELETE, "/api/feedback/c/m", &c),
            Route::FeedbackRetract {
                chat_id: "c",
                message_id: "m"
            }
        );
        assert_eq!(
            classify(&Method::DELETE, "/api/feedback/c", &c),
            Route::FeedbackRetractChat { chat_id: "c" }
        );
        assert_eq!(
            classify(&post, "/api/feedback/c", &c),
            Route::FeedbackMethodNotAllowed {
                allowed: "GET, DELETE"
            }
        );
        assert_eq!(
            classify(&get, "/api/feedback", &c),
            Route::FeedbackMethodNotAllowed { allowed: "POST" }
        );
        assert_eq!(classify(&get, "/api/feedback/a/b/c", &c), Route::NotFound);
        assert_eq!(
            classify(&get, "/api/feedback/schema", &c),
            Route::FeedbackSchema
        );
        assert_eq!(
            classify(&post, "/api/feedback/schema", &c),
            Route::FeedbackMethodNotAllowed { allowed: "GET" }
        );
        assert_eq!(
            classify(&post, "/api/feedback/batch/", &c),
            Route::FeedbackBatch
        );
        assert_eq!(
            classify(&get, "/api/feedback/batch", &c),
            Route::FeedbackList {
                chat_id: "batch",
                template: false
            }
        );
        assert_eq!(classify(&post, "/nothing", &c), Route::NotFound);
        assert_eq!(
            classify(&get, "/api/review/summary", &c),
            Route::ReviewSummary
        );
        assert_eq!(
            classify(&get, "/api/review/feedback/", &c),
            Route::ReviewFeedback
        );
        assert_eq!(classify(&post, "/review", &c), Route::ReviewPage);
    }

    #[test]
    fn an_ai_sdk_app_route_takes_everything_but_the_proxys_own_paths() {
        let c = Config::from_toml_str(
            "[agent]\nurl = \"http://127.0.0.1:1\"\n[[agent.routes]]\npath = \"/\"\nkind = \"ai-sdk-app\"\n",
            &Env::default(),
        )
        .unwrap();
        let app = |m: &Method, p: &str| matches!(classify(m, p, &c), Route::Agent { route, .. } if route.kind == RouteKind::AiSdkApp);
        for (m, p) in [
            (Method::GET, "/"),
            (Method::GET, "/assets/index.js"),
            (Method::POST, "/api/chat"),
            (Method::DELETE, "/api/chat/c-1"),
            (Method::PATCH, "/api/chat/c-1/visibility"),
            (Method::GET, "/api/feedbackx"),
            (Method::GET, "/metrics"),
            (Method::GET, "/ping"),
        ] {
            assert!(app(&m, p), "{m} {p}");
        }
        assert_eq!(
            classify(&Method::POST, "/api/feedback", &c),
            Route::FeedbackSubmit
        );
        assert_eq!(
            classify(&Method::GET, "/api/feedback/chat/c-1", &c),
            Route::FeedbackList {
                chat_id: "c-1",
                template: true
            }
        );
        assert_eq!(classify(&Method::GET, "/healthz", &c), Route::Health);
        assert_eq!(classify(&Method::GET, "/readyz", &c), Route::Ready);
        // Not even spelt with dot segments does an own path reach the template.
        assert_eq!(
            classify(&Method::POST, "/x/../api/feedback", &c),
            Route::NotFound
        );
        assert_eq!(
            classify(&Method::POST, "/api/%2e/feedback", &c),
            Route::NotFound
        );
    }

    #[test]
    fn agent_paths_are_normalised_before_routing() {
        let c = config();
        let post = Method::POST;
        let agent = |p: &str| match classify(&post, p, &c) {
            Route::Agent { route, path } => Some((route.path.clone(), path.into_owned())),
            _ => None,
        };
        assert_eq!(
            agent("/api/chat/a/../b"),
            Some(("/api/chat".into(), "/api/chat/b".into()))
        );
        // As sent it is no agent path; normalised it is, and that is what is routed.
        assert_eq!(
            agent("/x/%2e%2e/invocations"),
            Some(("/invocations".into(), "/invocations".into()))
        );
        assert!(matches!(
            classify(&post, "/api/chat/", &c),
            Route::Agent {
                path: Cow::Borrowed(_),
                ..
            }
        ));
        for bad in [
            "/invocations/../../../api/2.0/secrets/list",
            "/invocations/%2e%2e/responses",
            "/api/chat/%2E%2e",
            "/invocations/a%2fb",
            "/invocations/a\\b",
            "/invocations/a%5Cb",
            "/invocations/a%00",
        ] {
            assert!(
                matches!(classify(&post, bad, &c), Route::AgentBadPath { .. }),
                "{bad}"
            );
        }
        // Not under an agent prefix: left to the proxy's own routes.
        assert_eq!(classify(&post, "/nothing%2fx", &c), Route::NotFound);
        for m in [Method::GET, Method::PUT, Method::DELETE, Method::OPTIONS] {
            assert!(matches!(
                classify(&m, "/invocations", &c),
                Route::AgentMethodNotAllowed { route } if route.path == "/invocations"
            ));
        }
    }
}
