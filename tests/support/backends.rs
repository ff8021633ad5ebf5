//! A store on each backend for the conformance suites (`tests/store.rs`, `tests/review.rs`):
//! SQLite in a temporary directory, Postgres in a fresh database of the shared cluster.
//! `on_both_backends!(a, b)` runs `suite::a` and `suite::b` once per backend.

use feedback_proxy::store::SharedStore;

use super::pg;

pub struct Fixture {
    pub store: SharedStore,
    _file: Option<tempfile::TempDir>,
    _db: Option<pg::TestDb>,
}

pub async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.db");
    let config = pg::store_config(&format!("sqlite://{}", path.display()), "");
    let store = feedback_proxy::store::open(&config, pg::deps())
        .await
        .expect("open SQLite store");
    Fixture {
        store,
        _file: Some(dir),
        _db: None,
    }
}

pub async fn postgres() -> Fixture {
    let db = pg::TestDb::create(&pg::shared_url()).await;
    let config = pg::store_config(&db.url, "pool_size = 8");
    let store = feedback_proxy::store::open(&config, pg::deps())
        .await
        .expect("open Postgres store");
    Fixture {
        store,
        _file: None,
        _db: Some(db),
    }
}

/// One test per backend for each named function of the file's `suite` module.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let f = $crate::support::backends::sqlite().await;
                    super::suite::$name(f.store.clone()).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let f = $crate::support::backends::postgres().await;
                    super::suite::$name(f.store.clone()).await;
                }
            )*
        }
    };
}
