//! The application: one shared [`AppState`] and the service stack that serves it
//! ([`service`], built in `stack.rs`: tower-http and tower layers around our `router.rs`, which
//! classifies, dispatches and is the one way out for errors); readiness and the metrics scrape.
//!
//! Agent responses stream: their access log line is written by the response body when the
//! stream ends (it knows the bytes and the duration). Everything else is logged by the router.

mod router;
mod stack;
mod state;

pub use router::{new_request_id, respond};
pub use stack::{ResponseBody, service};
pub use state::{AppState, ready_detailed, scrape};
