//! Test helpers: upstream (see mod.rs).
