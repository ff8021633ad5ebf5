//! Test helpers: mlflow (see mod.rs).
