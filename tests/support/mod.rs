//! Shared helpers for the integration tests. Each test file includes this with `mod support;`
//! and uses what it needs (hence `dead_code` is allowed here).
//!
//! Services come from the test setup (`scripts/test.sh`), which exports `FP_TEST_*` variables;
//! a test that needs a service the environment does not provide FAILS with a message saying
//! how to get it, never skips silently.
#![allow(dead_code)]

pub mod backends;
pub mod chat_app;
pub mod mlflow;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod upstream;

/// A required environment variable of the test setup.
pub fn env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: run the tests through `make test` (scripts/test.sh), which starts the services they need"
        ),
    }
}
