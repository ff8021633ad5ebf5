//! Store migrations on both backends: concurrent `feedback-proxy migrate` processes (the real
//! binary), idempotence, `migrate = false`, refusing a schema newer than the binary, and
//! upgrading a store written at an older version with its data intact.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use std::time::Duration;

use feedback_proxy::config::StoreConfig;
use feedback_proxy::store::{
    AssessmentFact, DeliveryState, Desired, Enqueue, FeedbackValue, Finished, NewVote, Outcome,
    SharedStore, StoreError, VoteKey,
};
use support::pg::{self, TestDb};

fn write_config(dir: &Path, store_url: &str) -> std::path::PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!("[agent]\nurl = \"http://127.0.0.1:1\"\n\n[store]\nurl = \"{store_url}\"\n"),
    )
    .unwrap();
    path
}

/// The newest schema version (the number of migrations shipped).
const LATEST: i32 = 6;

/// Starts two `feedback-proxy migrate` processes at once and waits for both.
fn migrate_twice_at_once(config: &Path) -> [Output; 2] {
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_feedback-proxy"))
            .args(["migrate", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .env_remove("FEEDBACK_PROXY_CONFIG")
            .env_remove("PGHOST")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start feedback-proxy migrate")
    };
    let (a, b) = (spawn(), spawn());
    [
        a.wait_with_output().expect("wait"),
        b.wait_with_output().expect("wait"),
    ]
}

/// Both succeeded, and exactly one of them found the empty database.
fn assert_both_migrated(outputs: &[Output; 2]) {
    let mut from = Vec::new();
    for out in outputs {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "migrate failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find(|l| l.contains("schema at version"))
            .unwrap_or_else(|| panic!("no summary line in {stdout}"));
        assert!(
            line.contains(&format!("schema at version {LATEST}")),
            "{line}"
        );
        from.push(line.ends_with("(was 0)"));
    }
    from.sort();
    assert_eq!(
        from,
        [false, true],
        "exactly one process applied the migration"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_concurrent_migrations_leave_one_schema_version() {
    let db = TestDb::create(&pg::shared_url()).await;
    let dir = tempfile::tempdir().unwrap();
    let outputs = migrate_twice_at_once(&write_config(dir.path(), &db.url));
    assert_both_migrated(&outputs);

    let admin = db.admin().await;
    let rows = admin
        .query("SELECT version FROM feedback_proxy.schema_migrations", &[])
        .await
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
    let tables: i64 = admin
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'feedback_proxy'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        tables, 5,
        "message_links, votes, deliveries, vote_rollup, schema_migrations"
    );

    // Idempotent, and open() with migrate = true finds nothing to do.
    let store = feedback_proxy::store::open(&pg::store_config(&db.url, ""), pg::deps())
        .await
        .unwrap();
    store.health().await.unwrap();
    let again = feedback_proxy::store::migrate(&pg::store_config(&db.url, ""), pg::deps())
        .await
        .unwrap();
    assert_eq!((again.from, again.to), (LATEST, LATEST));
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_schema_checks() {
    let db = TestDb::create(&pg::shared_url()).await;
    // migrate = false on an empty database: a clear refusal.
    let no_migrate = pg::store_config(&db.url, "migrate = false");
    let err = feedback_proxy::store::open(&no_migrate, pg::deps())
        .await
        .err()
        .expect("opened an unmigrated database");
    assert!(
        matches!(&err, StoreError::Schema(m) if m.contains("feedback-proxy migrate")),
        "{err:?}"
    );
    feedback_proxy::store::migrate(&no_migrate, pg::deps())
        .await
        .unwrap();
    feedback_proxy::store::open(&no_migrate, pg::deps())
        .await
        .unwrap();

    // A schema from a newer binary is refused, migrating or not.
    db.admin()
        .await
        .batch_execute("INSERT INTO feedback_proxy.schema_migrations (version) VALUES (999)")
        .await
        .unwrap();
    for extra in ["", "migrate = false"] {
        let err = feedback_proxy::store::open(&pg::store_config(&db.url, extra), pg::deps())
            .await
            .err()
            .expect("opened a newer schema");
        assert!(
            matches!(&err, StoreError::Schema(m) if m.contains(&format!("version 999, newer than this binary supports (up to {LATEST})"))),
            "{err:?}"
        );
    }

    // Another schema name is independent.
    let other = pg::store_config(&db.url, "schema = \"other_proxy\"");
    feedback_proxy::store::open(&other, pg::deps())
        .await
        .unwrap()
        .health()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_concurrent_migrations_leave_one_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store.db");
    let url = format!("sqlite://{}", file.display());
    let outputs = migrate_twice_at_once(&write_config(dir.path(), &url));
    assert_both_migrated(&outputs);

    let conn = rusqlite::Connection::open(&file).unwrap();
    let versions: Vec<i32> = conn
        .prepare("SELECT version FROM schema_migrations")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(conn);

    let config = pg::store_config(&url, "migrate = false");
    feedback_proxy::store::open(&config, pg::deps())
        .await
        .unwrap()
        .health()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_schema_checks() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store.db");
    let url = format!("sqlite://{}", file.display());
    let err = feedback_proxy::store::open(&pg::store_config(&url, "migrate = false"), pg::deps())
        .await
        .err()
        .expect("opened an unmigrated file");
    assert!(
        matches!(&err, StoreError::Schema(m) if m.contains("feedback-proxy migrate")),
        "{err:?}"
    );
    let m = feedback_proxy::store::migrate(&pg::store_config(&url, ""), pg::deps())
        .await
        .unwrap();
    assert_eq!((m.from, m.to), (0, LATEST));
    let conn = rusqlite::Connection::open(&file).unwrap();
    conn.execute(
        "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)",
        [],
    )
    .unwrap();
    drop(conn);
    let err = feedback_proxy::store::open(&pg::store_config(&url, ""), pg::deps())
        .await
        .err()
        .expect("opened a newer schema");
    assert!(
        matches!(&err, StoreError::Schema(m) if m.contains(&format!("version 999, newer than this binary supports (up to {LATEST})"))),
        "{err:?}"
    );

    // The binary says so too, and exits non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_feedback-proxy"))
        .args(["migrate", "--config"])
        .arg(write_config(dir.path(), &url))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("newer than this binary"), "{stderr}");

    // A directory that does not exist is a clear error, not a panic.
    let missing = pg::store_config("sqlite:///nonexistent/dir/store.db", "");
    let err = feedback_proxy::store::open(&missing, pg::deps())
        .await
        .err()
        .expect("opened a file in a missing directory");
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("cannot open SQLite database /nonexistent/dir/store.db")),
        "{err:?}"
    );
}

/// A delivery as version 1 stored it: a thumbs-up on m1, already delivered as assessment a-1,
/// and the vote itself.
const V1_DELIVERY: &str = "INSERT INTO votes (message_id, user_id, name, chat_id, value, comment,
        updated_at)
    VALUES ('m1', 'alice@example.com', 'user_feedback', 'c1', 'true', NULL, NOW);
    INSERT INTO deliveries (message_id, user_id, name, chat_id, desired,
        desired_value, version, assessment_id, trace_id, state, attempts, next_attempt_at,
        enqueued_at, updated_at)
    VALUES ('m1', 'alice@example.com', 'user_feedback', 'c1', 'upsert', 'true', 1, 'a-1',
        'tr-1', 'done', 1, NOW, NOW, NOW)";

fn key() -> VoteKey {
    VoteKey {
        message_id: "m1".into(),
        user_id: "alice@example.com".into(),
        name: "user_feedback".into(),
    }
}

/// Current votes by value over all time, from the review summary.
async fn review_counts(store: &SharedStore) -> Vec<(String, i64)> {
    let cells = store
        .review_summary(&feedback_proxy::store::SummaryQuery {
            scope: feedback_proxy::store::ReviewScope {
                from: std::time::SystemTime::UNIX_EPOCH,
                to: std::time::SystemTime::now() + Duration::from_secs(3600),
                name: None,
                route: None,
            },
            bucket_hours: 24,
        })
        .await
        .unwrap();
    let mut out: Vec<(String, i64)> = Vec::new();
    for c in cells {
        let v = c.value.to_json().to_string();
        match out.iter_mut().find(|(x, _)| *x == v) {
            Some(e) => e.1 += c.votes,
            None => out.push((v, c.votes)),
        }
    }
    out.retain(|(_, n)| *n != 0);
    out
}

/// A store at version 1 with data: `migrate = false` refuses it and names the command, the
/// upgrade keeps the data, and a delivery written at version 1 goes through a claim and a
/// fenced finish.
async fn upgrade_from_version_1(config: &StoreConfig, no_migrate: &StoreConfig) {
    let err = feedback_proxy::store::open(no_migrate, pg::deps())
        .await
        .err()
        .expect("opened a version-1 store without migrating");
    assert!(
        matches!(&err, StoreError::Schema(m) if m.contains(&format!("version 1 but this binary needs version {LATEST}")) && m.contains("feedback-proxy migrate")),
        "{err:?}"
    );
    let m = feedback_proxy::store::migrate(config, pg::deps())
        .await
        .unwrap();
    assert_eq!((m.from, m.to), (1, LATEST));
    let store: SharedStore = feedback_proxy::store::open(no_migrate, pg::deps())
        .await
        .unwrap();
    // The review rollup starts from the votes already stored (version 3's backfill).
    assert_eq!(review_counts(&store).await, [("true".to_owned(), 1)]);
    let old = store.list_deliveries(None, 10).await.unwrap();
    assert_eq!(old.len(), 1);
    let d = &old[0];
    assert_eq!(d.key, key());
    assert_eq!(
        d.desired,
        Desired::Upsert {
            value: FeedbackValue::Bool(true),
            comment: None
        }
    );
    assert_eq!(
        (d.assessment_id.as_deref(), d.state, d.claims),
        (Some("a-1"), DeliveryState::Done, 0)
    );

    // A new vote on the old delivery is claimed and finished like any other.
    let version_2 = NewVote {
        key: key(),
        chat_id: "c1".into(),
        value: FeedbackValue::Bool(false),
        comment: None,
    };
    let v = store
        .upsert_vote(&version_2, &Enqueue::Pending)
        .await
        .unwrap();
    assert_eq!((v.version, v.assessment_id.as_deref()), (2, Some("a-1")));
    // The changed vote moved in the rollup: its old value no longer counts.
    assert_eq!(review_counts(&store).await, [("false".to_owned(), 1)]);
    let claimed = store
        .claim(&key(), 2, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("claim the upgraded delivery");
    assert_eq!(claimed.claims, 1);
    let fact = AssessmentFact::Exists {
        assessment_id: "a-1".into(),
        trace_id: "tr-1".into(),
    };
    assert_eq!(
        store
            .finish(&claimed.ticket(), &fact, &Outcome::Done)
            .await
            .unwrap(),
        Finished::Applied
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_upgrades_a_version_1_schema_with_its_data() {
    let db = TestDb::create(&pg::shared_url()).await;
    let admin = db.admin().await;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA feedback_proxy;
            SET search_path TO feedback_proxy;
            {}
            CREATE TABLE schema_migrations (
                version    integer     PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            INSERT INTO schema_migrations (version) VALUES (1);
            {};",
            include_str!("../src/store/migrations/postgres/0001_initial.sql"),
            V1_DELIVERY.replace("NOW", "now()")
        ))
        .await
        .unwrap();
    upgrade_from_version_1(
        &pg::store_config(&db.url, ""),
        &pg::store_config(&db.url, "migrate = false"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_upgrades_a_version_1_file_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store.db");
    let conn = rusqlite::Connection::open(&file).unwrap();
    conn.execute_batch(&format!(
        "{}
        CREATE TABLE schema_migrations (
            version    INTEGER PRIMARY KEY,
            applied_at INTEGER NOT NULL
        );
        INSERT INTO schema_migrations (version, applied_at) VALUES (1, 0);
        {};",
        include_str!("../src/store/migrations/sqlite/0001_initial.sql"),
        V1_DELIVERY.replace("NOW", "1700000000000")
    ))
    .unwrap();
    drop(conn);
    let url = format!("sqlite://{}", file.display());
    upgrade_from_version_1(
        &pg::store_config(&url, ""),
        &pg::store_config(&url, "migrate = false"),
    )
    .await;
}

/// Current votes and commented votes by value over all time, from the review summary.
async fn review_cells(store: &SharedStore) -> Vec<(String, i64, i64)> {
    let cells = store
        .review_summary(&feedback_proxy::store::SummaryQuery {
            scope: feedback_proxy::store::ReviewScope {
                from: std::time::SystemTime::UNIX_EPOCH,
                to: std::time::SystemTime::now() + Duration::from_secs(3600),
                name: None,
                route: None,
            },
            bucket_hours: 24,
        })
        .await
        .unwrap();
    let mut out: Vec<(String, i64, i64)> = Vec::new();
    for c in cells {
        let v = c.value.to_json().to_string();
        match out.iter_mut().find(|(x, _, _)| *x == v) {
            Some(e) => (e.1, e.2) = (e.1 + c.votes, e.2 + c.commented),
            None => out.push((v, c.votes, c.commented)),
        }
    }
    out.retain(|(_, n, _)| *n != 0);
    out
}

/// The keys of every current vote, as the review listing returns them.
async fn listed_keys(store: &SharedStore) -> Vec<VoteKey> {
    let votes = store
        .review_votes(
            &feedback_proxy::store::ListQuery {
                scope: feedback_proxy::store::ReviewScope {
                    from: std::time::SystemTime::UNIX_EPOCH,
                    to: std::time::SystemTime::now() + Duration::from_secs(3600),
                    name: None,
                    route: None,
                },
                polarity: None,
                has_comment: None,
                thresholds: Default::default(),
                limit: 10,
            },
            None,
        )
        .await
        .unwrap();
    votes.into_iter().map(|v| v.key).collect()
}

fn thumb(up: bool, comment: Option<&str>) -> NewVote {
    NewVote {
        key: key(),
        chat_id: "c1".into(),
        value: FeedbackValue::Bool(up),
        comment: comment.map(str::to_owned),
    }
}

/// A store at version 3 with a vote counted in its rollup: the upgrade keeps the rollup right
/// (version 4 changes when the rollup is written, not what it holds), a re-vote that changes
/// nothing the rollup counts no longer writes it (`rollup_writes`, a count of rollup row writes
/// the caller installs after migrating), and every change it does count still moves it.
async fn upgrade_from_version_3(
    config: &StoreConfig,
    no_migrate: &StoreConfig,
    count_rollup_writes: impl AsyncFn() -> i64,
) {
    let m = feedback_proxy::store::migrate(config, pg::deps())
        .await
        .unwrap();
    assert_eq!((m.from, m.to), (3, LATEST));
    let store: SharedStore = feedback_proxy::store::open(no_migrate, pg::deps())
        .await
        .unwrap();
    assert_eq!(review_cells(&store).await, [("true".to_owned(), 1, 0)]);
    // The vote stored before the upgrade is listed (version 6 lists by `updated_minute`, which
    // the upgrade computes for the stored votes).
    assert_eq!(listed_keys(&store).await, [key()]);
    let writes = count_rollup_writes().await;

    // The first vote of this session moves the stored one to the current hour.
    let vote = |up, comment| thumb(up, comment);
    store
        .upsert_vote(&vote(true, None), &Enqueue::Pending)
        .await
        .unwrap();
    assert_eq!(review_cells(&store).await, [("true".to_owned(), 1, 0)]);
    let moved = count_rollup_writes().await;
    assert!(moved > writes, "the move to this hour wrote no rollup row");

    // The same vote again within the hour: nothing the rollup counts changed, nothing written.
    store
        .upsert_vote(&vote(true, None), &Enqueue::Pending)
        .await
        .unwrap();
    assert_eq!(
        count_rollup_writes().await,
        moved,
        "a no-op re-vote wrote the rollup"
    );
    assert_eq!(review_cells(&store).await, [("true".to_owned(), 1, 0)]);

    // A comment, a changed comment, a flip, and a retraction are all counted.
    store
        .upsert_vote(&vote(true, Some("good")), &Enqueue::Pending)
        .await
        .unwrap();
    assert_eq!(review_cells(&store).await, [("true".to_owned(), 1, 1)]);
    store
        .upsert_vote(&vote(true, Some("very good")), &Enqueue::Pending)
        .await
        .unwrap();
    assert_eq!(review_cells(&store).await, [("true".to_owned(), 1, 1)]);
    store
        .upsert_vote(&vote(false, Some("very good")), &Enqueue::Pending)
        .await
        .unwrap();
    assert_eq!(review_cells(&store).await, [("false".to_owned(), 1, 1)]);
    store
        .upsert_vote(&vote(false, None), &Enqueue::Pending)
        .await
        .unwrap();
    assert_eq!(review_cells(&store).await, [("false".to_owned(), 1, 0)]);
    store
        .retract_vote(&key(), Duration::ZERO)
        .await
        .unwrap()
        .expect("retracted the vote");
    assert_eq!(review_cells(&store).await, []);
}

/// Counts every insert or update of a `vote_rollup` row in `rollup_writes` (Postgres).
const PG_COUNT_ROLLUP_WRITES: &str = "CREATE TABLE rollup_writes (n bigint NOT NULL);
    INSERT INTO rollup_writes VALUES (0);
    CREATE FUNCTION count_rollup_write() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
        BEGIN UPDATE rollup_writes SET n = n + 1; RETURN NULL; END $$;
    CREATE TRIGGER count_rollup_writes AFTER INSERT OR UPDATE ON vote_rollup
        FOR EACH ROW EXECUTE FUNCTION count_rollup_write();";

#[tokio::test(flavor = "multi_thread")]
async fn postgres_upgrades_a_version_3_schema_with_its_rollup() {
    let db = TestDb::create(&pg::shared_url()).await;
    let admin = db.admin().await;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA feedback_proxy;
            SET search_path TO feedback_proxy;
            {}
            {}
            {}
            CREATE TABLE schema_migrations (
                version    integer     PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            INSERT INTO schema_migrations (version) VALUES (1), (2), (3);
            {};
            {PG_COUNT_ROLLUP_WRITES}",
            include_str!("../src/store/migrations/postgres/0001_initial.sql"),
            include_str!("../src/store/migrations/postgres/0002_delivery_claims.sql"),
            include_str!("../src/store/migrations/postgres/0003_review.sql"),
            V1_DELIVERY.replace("NOW", "now() - interval '2 days'")
        ))
        .await
        .unwrap();
    let count = async || {
        admin
            .query_one("SELECT n FROM feedback_proxy.rollup_writes", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    upgrade_from_version_3(
        &pg::store_config(&db.url, ""),
        &pg::store_config(&db.url, "migrate = false"),
        count,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_upgrades_a_version_3_file_with_its_rollup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store.db");
    let conn = rusqlite::Connection::open(&file).unwrap();
    conn.execute_batch(&format!(
        "{}
        {}
        {}
        CREATE TABLE schema_migrations (
            version    INTEGER PRIMARY KEY,
            applied_at INTEGER NOT NULL
        );
        INSERT INTO schema_migrations (version, applied_at) VALUES (1, 0), (2, 0), (3, 0);
        {};
        CREATE TABLE rollup_writes (n INTEGER NOT NULL);
        INSERT INTO rollup_writes VALUES (0);
        CREATE TRIGGER count_rollup_inserts AFTER INSERT ON vote_rollup BEGIN
            UPDATE rollup_writes SET n = n + 1;
        END;
        CREATE TRIGGER count_rollup_updates AFTER UPDATE ON vote_rollup BEGIN
            UPDATE rollup_writes SET n = n + 1;
        END;",
        include_str!("../src/store/migrations/sqlite/0001_initial.sql"),
        include_str!("../src/store/migrations/sqlite/0002_delivery_claims.sql"),
        include_str!("../src/store/migrations/sqlite/0003_review.sql"),
        V1_DELIVERY.replace("NOW", "1700000000000")
    ))
    .unwrap();
    drop(conn);
    let count = async || {
        rusqlite::Connection::open(&file)
            .unwrap()
            .query_row("SELECT n FROM rollup_writes", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    let url = format!("sqlite://{}", file.display());
    upgrade_from_version_3(
        &pg::store_config(&url, ""),
        &pg::store_config(&url, "migrate = false"),
        count,
    )
    .await;
}
