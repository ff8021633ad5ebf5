//! Durable state: message → trace links, votes, and the delivery outbox.
//!
//! [`Store`] is the whole contract; handlers and the delivery worker see only the domain types
//! below, never rows. Two backends implement it and pass the same conformance suite
//! (`tests/store.rs`): Postgres (`store/postgres.rs`, production, shared by every replica) and
//! SQLite (`store/sqlite.rs`, the embedded single-instance default).
//!
//! ## Delivery semantics
//!
//! Every vote change (upsert or retraction) bumps the delivery row's `version` in the SAME
//! transaction as the vote itself, so a committed vote always has a delivery that will carry it
//! to MLflow. Deliveries are claimed with a lease; only one holder at a time can work on a
//! (message, user, name). Every claim bumps the delivery's `claims` count, and finishing names
//! the count its claim returned (a fencing token, [`Ticket`]): an attempt that outlived its
//! lease cannot release or overrule the claim that took over. Finishing also names the
//! version it worked on: the outcome
//! marks the delivery `done` only if no newer vote arrived meanwhile, but what was learnt about
//! the MLflow assessment (its id, or that it is gone) is recorded regardless, so the next attempt
//! PATCHes or re-creates instead of duplicating.
//!
//! ## Ownership
//!
//! A message link's `user_id` never changes once written: [`Store::claim_message`] and
//! [`Store::record_links`] never overwrite another user's link (the first writer of a new
//! message owns it, however many replicas race), and links are never deleted. The feedback API
//! stores a vote only on a message whose link names the voter, so its read-then-write check
//! cannot be raced; links wake only their owner's waiting deliveries (a vote stored by another
//! user before this rule, or by any path that skipped the check, is never woken by them).
//!
//! States: `pending` (due at `next_attempt_at`), `waiting` (parked until something changes:
//! the message has no trace id yet, or MLflow is not configured; recording a link with a trace
//! id or client request id wakes the message's waiting deliveries), `done`, `dead` (gave up;
//! an operator can requeue).

mod api;
mod codec;
pub mod postgres;
pub mod review;
pub mod sqlite;
mod state;
use crate::config::{StoreConfig, StoreKind};

pub use api::*;

/// Opens the configured store (running migrations if configured to; otherwise checking that
/// the schema is at the version this binary expects).
pub async fn open(config: &StoreConfig, deps: postgres::Deps) -> Result<SharedStore, StoreError> {
    match &config.kind {
        StoreKind::Sqlite { path } => sqlite::open(path, config, deps.metrics).await,
        StoreKind::Postgres(pg) => postgres::open(pg, config, deps).await,
    }
}

/// Brings the configured store's schema up to date (what `feedback-proxy migrate` runs),
/// whatever `config.migrate` says. Safe to run from several processes at once.
pub async fn migrate(config: &StoreConfig, deps: postgres::Deps) -> Result<Migrated, StoreError> {
    match &config.kind {
        StoreKind::Sqlite { path } => sqlite::migrate_file(path).await,
        StoreKind::Postgres(pg) => postgres::migrate(pg, config, deps).await,
    }
}
