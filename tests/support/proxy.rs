//! Test helpers: proxy (see mod.rs).
