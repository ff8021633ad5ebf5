//! Test helpers: pg (see mod.rs).
