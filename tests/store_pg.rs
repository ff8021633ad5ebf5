//! Postgres-only behaviour of the store: TLS with libpq `sslmode` semantics, password sources
//! and rotation, connection lifetime, pool limits, and healing after a database restart.
//!
//! These run against the PRIVATE clusters of the test setup (TLS on, password auth), never
//! against a shared Postgres when they change server state.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use feedback_proxy::store::postgres::Deps;
use feedback_proxy::store::{Enqueue, FeedbackValue, NewVote, SharedStore, StoreError, VoteKey};
use support::pg::{self, TestDb};
use tokio_postgres::Client;

async fn open(url: &str, extra_toml: &str, deps: Deps) -> Result<SharedStore, StoreError> {
    feedback_proxy::store::open(&pg::store_config(url, extra_toml), deps).await
}

fn unavailable(e: StoreError) -> String {
    match e {
        StoreError::Unavailable(m) => m,
        other => panic!("expected an Unavailable error, got {other:?}"),
    }
}

/// Whether every session of `app` is encrypted (and there is at least one).
async fn sessions_encrypted(admin: &Client, app: &str) -> bool {
    let rows = admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty(), "no session of {app}");
    let ssl: Vec<bool> = rows.iter().map(|r| r.get(0)).collect();
    assert!(
        ssl.iter().all(|s| *s == ssl[0]),
        "mixed sessions for {app}: {ssl:?}"
    );
    ssl[0]
}

/// Makes `n` store operations hold one pooled connection each at the same time: they block
/// on a table lock that `admin` holds until all `n` are seen waiting. Returns the backend
/// pids they ran on.
async fn hold_connections(
    store: &SharedStore,
    admin: &Client,
    app: &str,
    n: usize,
) -> BTreeSet<i32> {
    admin
        .batch_execute("BEGIN; LOCK TABLE feedback_proxy.message_links IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.get_link("held").await })
        })
        .collect();
    let waiting = "SELECT pid FROM pg_stat_activity
        WHERE application_name = $1 AND wait_event_type = 'Lock'";
    let mut pids = BTreeSet::new();
    let start = Instant::now();
    while pids.len() < n {
        if start.elapsed() > Duration::from_secs(15) {
            let mut early = Vec::new();
            for t in tasks.into_iter().filter(|t| t.is_finished()) {
                early.push(format!("{:?}", t.await));
            }
            panic!(
                "only {} of {n} operations got a connection; finished early: {early:?}",
                pids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Activity statistics are a snapshot per transaction, and `admin` is inside one.
        admin
            .execute("SELECT pg_stat_clear_snapshot()", &[])
            .await
            .unwrap();
        pids = admin
            .query(waiting, &[&app])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    }
    admin.batch_execute("COMMIT").await.unwrap();
    for t in tasks {
        t.await
            .unwrap()
            .expect("an operation on a held connection failed");
    }
    pids
}

#[tokio::test(flavor = "multi_thread")]
async fn sslmodes_encrypt_as_libpq_does() {
    let db = TestDb::create(&pg::tls_url()).await;
    let admin = db.admin().await;
    // allow tries plaintext first (the cluster accepts it); prefer tries TLS first.
    for (mode, encrypted) in [
        ("require", true),
        ("prefer", true),
        ("allow", false),
        ("disable", false),
    ] {
        let app = pg::unique("fp_tls");
        let url = pg::with_params(&db.url, &[("sslmode", mode), ("application_name", &app)]);
        let store = open(&url, "", pg::deps())
            .await
            .unwrap_or_else(|e| panic!("sslmode={mode}: {e}"));
        store.health().await.unwrap();
        assert_eq!(
            sessions_encrypted(&admin, &app).await,
            encrypted,
            "sslmode={mode}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_rejects_an_untrusted_certificate_clearly() {
    let db = TestDb::create(&pg::tls_url()).await;
    let password = url::Url::parse(&db.url)
        .unwrap()
        .password()
        .unwrap()
        .to_owned();
    let other_ca = pg::other_ca();
    let cases: [(&str, Option<&str>); 4] = [
        ("verify-full", None),            // the system roots do not know the test CA
        ("verify-full", Some(&other_ca)), // nor does an unrelated CA
        ("verify-ca", Some(&other_ca)),
        ("require", Some(&other_ca)), // libpq: require + sslrootcert checks the chain
    ];
    for (mode, root) in cases {
        let mut params = vec![("sslmode", mode)];
        if let Some(r) = root {
            params.push(("sslrootcert", r));
        }
        let started = Instant::now();
        let err = open(&pg::with_params(&db.url, &params), "", pg::deps())
            .await
            .err()
            .unwrap_or_else(|| panic!("sslmode={mode} root={root:?} connected"));
        let msg = unavailable(err);
        let expected = format!("TLS: server certificate not trusted (sslmode={mode})");
        assert!(msg.contains(&expected), "{msg}");
        assert!(
            !msg.contains(&password),
            "the error leaks the password: {msg}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "slow failure");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_ca_and_verify_full_accept_the_right_ca() {
    let db = TestDb::create(&pg::tls_url()).await;
    let admin = db.admin().await;
    let ca = pg::tls_ca();
    // The certificate names DNS:localhost and IP:127.0.0.1; the cluster also listens on
    // 127.0.0.2, a name the certificate does not carry.
    for (mode, host) in [
        ("verify-full", "127.0.0.1"),
        ("verify-full", "localhost"),
        ("verify-ca", "127.0.0.1"),
        ("verify-ca", "127.0.0.2"),
        ("require", "127.0.0.2"),
    ] {
        let app = pg::unique("fp_verify");
        let url = pg::with_params(
            &pg::with_host(&db.url, host),
            &[
                ("sslmode", mode),
                ("sslrootcert", &ca),
                ("application_name", &app),
            ],
        );
        let store = open(&url, "", pg::deps())
            .await
            .unwrap_or_else(|e| panic!("sslmode={mode} host={host}: {e}"));
        store.health().await.unwrap();
        assert!(sessions_encrypted(&admin, &app).await, "{mode} {host}");
    }
    let url = pg::with_params(
        &pg::with_host(&db.url, "127.0.0.2"),
        &[("sslmode", "verify-full"), ("sslrootcert", &ca)],
    );
    let msg = unavailable(open(&url, "", pg::deps()).await.err().expect("connected"));
    assert!(
        msg.contains(
            "TLS: server certificate does not match host name \"127.0.0.2\" (sslmode=verify-full)"
        ),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_sslrootcert_is_reported() {
    let db = TestDb::create(&pg::tls_url()).await;
    let url = pg::with_params(
        &db.url,
        &[
            ("sslmode", "verify-full"),
            ("sslrootcert", "/nonexistent/ca.pem"),
        ],
    );
    let msg = unavailable(open(&url, "", pg::deps()).await.err().expect("connected"));
    assert!(
        msg.contains("cannot use sslrootcert /nonexistent/ca.pem"),
        "{msg}"
    );
}

/// A login role with `password` and a database it owns, on the private TLS cluster.
async fn role_with_db(password: &str) -> (String, TestDb) {
    let admin = pg::connect(&pg::tls_url()).await;
    let role = pg::unique("fp_role");
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'"
        ))
        .await
        .unwrap();
    let db = TestDb::create_owned(&pg::tls_url(), Some(&role)).await;
    (role, db)
}

async fn drop_role(role: &str) {
    let admin = pg::connect(&pg::tls_url()).await;
    let _ = admin
        .batch_execute(&format!("DROP ROLE IF EXISTS \"{role}\""))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn minted_passwords_rotate_once_per_cache_period() {
    // Credentials live 128 s, so they are reused for 8 s (until 2 minutes before expiry).
    let cache_period = Duration::from_secs(8);
    let lifetime = Duration::from_secs(120) + cache_period;
    let (role, db) = role_with_db("first-password").await;
    let fake = pg::FakeCredentials::start("first-password", lifetime).await;
    let app = pg::unique("fp_rot");
    let url = pg::with_params(
        &pg::with_user(&db.url, &role, None),
        &[("sslmode", "require"), ("application_name", &app)],
    );
    let store = open(
        &url,
        "password = \"lakebase-provisioned:instance-1\"\npool_size = 10",
        pg::deps_with(Some(fake.url.clone()), Some("app-oauth-token")),
    )
    .await
    .unwrap();
    let admin = db.admin().await;
    assert_eq!(fake.state.calls(), 1);
    let fetched_at = fake.state.answered_at.lock().unwrap()[0];
    {
        let requests = fake.state.requests.lock().unwrap();
        let (path, auth, body) = &requests[0];
        assert_eq!(path, "/api/2.0/database/credentials");
        assert_eq!(auth, "Bearer app-oauth-token");
        assert_eq!(body["instance_names"], serde_json::json!(["instance-1"]));
        let request_id = body["request_id"].as_str().unwrap();
        assert!(uuid::Uuid::parse_str(request_id).is_ok(), "{request_id}");
    }

    // Four connections at once: one credential call, not four.
    let first = hold_connections(&store, &admin, &app, 4).await;
    assert_eq!(first.len(), 4);
    assert_eq!(
        fake.state.calls(),
        1,
        "one call per cache period, not per connection"
    );
    assert!(
        fetched_at.elapsed() < cache_period,
        "the machine is too slow for this test's cache period"
    );

    // Rotate: the old password no longer logs in; the endpoint hands out the new one.
    admin
        .batch_execute(&format!("ALTER ROLE \"{role}\" PASSWORD 'second-password'"))
        .await
        .unwrap();
    *fake.state.password.lock().unwrap() = "second-password".to_owned();
    *fake.state.lifetime.lock().unwrap() = Duration::from_secs(3600);

    // Existing connections keep working (Postgres checks passwords only at login).
    let again = hold_connections(&store, &admin, &app, 4).await;
    assert_eq!(again, first, "the same sessions served the operations");
    assert_eq!(fake.state.calls(), 1);

    // Once the cached credential is due for renewal, new connections mint the new one.
    let renew_at = fetched_at + cache_period + Duration::from_millis(200);
    tokio::time::sleep_until(renew_at.into()).await;
    let grown = hold_connections(&store, &admin, &app, 6).await;
    assert!(grown.is_superset(&first), "{grown:?} ⊉ {first:?}");
    assert_eq!(grown.len(), 6, "two new connections");
    assert_eq!(
        fake.state.calls(),
        2,
        "both new connections share one new credential"
    );
    let more = hold_connections(&store, &admin, &app, 8).await;
    assert_eq!(more.len(), 8);
    assert_eq!(fake.state.calls(), 2, "the new credential is cached too");
    store
        .upsert_vote(
            &NewVote {
                key: VoteKey {
                    message_id: "m1".into(),
                    user_id: "alice".into(),
                    name: "user_feedback".into(),
                },
                chat_id: "c1".into(),
                value: FeedbackValue::Bool(true),
                comment: None,
            },
            &Enqueue::Pending,
        )
        .await
        .unwrap();
    drop(store);
    drop(admin);
    drop(db);
    drop_role(&role).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn autoscaling_credentials_and_the_app_token_work_as_passwords() {
    let (role, db) = role_with_db("minted-secret").await;
    let fake = pg::FakeCredentials::start("minted-secret", Duration::from_secs(3600)).await;
    let url = pg::with_params(
        &pg::with_user(&db.url, &role, None),
        &[("sslmode", "require")],
    );
    let endpoint = "projects/p1/branches/b1/endpoints/e1";
    let store = open(
        &url,
        &format!("password = \"lakebase-autoscaling:{endpoint}\""),
        pg::deps_with(Some(fake.url.clone()), Some("app-oauth-token")),
    )
    .await
    .unwrap();
    store.health().await.unwrap();
    {
        let requests = fake.state.requests.lock().unwrap();
        let (path, auth, body) = &requests[0];
        assert_eq!(path, "/api/2.0/postgres/credentials");
        assert_eq!(auth, "Bearer app-oauth-token");
        assert_eq!(body, &serde_json::json!({ "endpoint": endpoint }));
    }
    drop(store);

    // databricks-oauth: the app's own token is the password.
    let store = open(
        &url,
        "password = \"databricks-oauth\"",
        pg::deps_with(None, Some("minted-secret")),
    )
    .await
    .unwrap();
    store.health().await.unwrap();
    drop(store);
    drop(db);
    drop_role(&role).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn credential_failures_are_clear_and_secret_free() {
    let (role, db) = role_with_db("minted-secret").await;
    let url = pg::with_params(
        &pg::with_user(&db.url, &role, None),
        &[("sslmode", "require")],
    );
    let fake = pg::FakeCredentials::start("minted-secret", Duration::from_secs(3600)).await;
    *fake.state.fail.lock().unwrap() = Some((
        403,
        r#"{"error_code":"PERMISSION_DENIED","message":"no access to instance-1"}"#.to_owned(),
    ));
    let msg = unavailable(
        open(
            &url,
            "password = \"lakebase-provisioned:instance-1\"",
            pg::deps_with(Some(fake.url.clone()), Some("app-oauth-token")),
        )
        .await
        .err()
        .expect("connected"),
    );
    assert!(
        msg.contains("HTTP 403: PERMISSION_DENIED: no access to instance-1"),
        "{msg}"
    );
    assert!(!msg.contains("app-oauth-token"), "{msg}");

    let msg = unavailable(
        open(
            &url,
            "password = \"lakebase-provisioned:instance-1\"",
            pg::deps_with(None, Some("app-oauth-token")),
        )
        .await
        .err()
        .expect("connected"),
    );
    assert!(msg.contains("needs the Databricks host"), "{msg}");

    // A wrong static password: the server's reason, not the password.
    let wrong = pg::with_user(&db.url, &role, Some("not-the-password"));
    let wrong = pg::with_params(&wrong, &[("sslmode", "require")]);
    let msg = unavailable(open(&wrong, "", pg::deps()).await.err().expect("connected"));
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(!msg.contains("not-the-password"), "{msg}");
    // prefer tries TLS, then plaintext, and reports both.
    let wrong = pg::with_user(&db.url, &role, Some("not-the-password"));
    let wrong = pg::with_params(&wrong, &[("sslmode", "prefer")]);
    let msg = unavailable(open(&wrong, "", pg::deps()).await.err().expect("connected"));
    assert!(
        msg.contains("(with TLS): password authentication failed")
            && msg.contains("(without TLS): password authentication failed"),
        "{msg}"
    );
    drop(db);
    drop_role(&role).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_credential_endpoint_falls_back_to_a_still_valid_credential() {
    // Reused for 1 s, but valid for a login for almost two more minutes.
    let (role, db) = role_with_db("minted-secret").await;
    let fake = pg::FakeCredentials::start("minted-secret", Duration::from_secs(121)).await;
    let url = pg::with_params(
        &pg::with_user(&db.url, &role, None),
        &[("sslmode", "require")],
    );
    let store = open(
        &url,
        "password = \"lakebase-provisioned:instance-1\"",
        pg::deps_with(Some(fake.url.clone()), Some("app-oauth-token")),
    )
    .await
    .unwrap();
    let fetched_at = fake.state.answered_at.lock().unwrap()[0];
    *fake.state.fail.lock().unwrap() = Some((
        503,
        r#"{"error_code":"TEMPORARILY_UNAVAILABLE"}"#.to_owned(),
    ));
    tokio::time::sleep_until((fetched_at + Duration::from_millis(1200)).into()).await;
    // The pool is empty (migrations used their own connection): this opens one, which tries
    // to mint a credential, fails, and logs in with the current one.
    store.health().await.unwrap();
    assert_eq!(fake.state.calls(), 2, "a new credential was attempted");
    drop(store);
    drop(db);
    drop_role(&role).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_are_replaced_after_max_lifetime() {
    let db = TestDb::create(&pg::shared_url()).await;
    let admin = db.admin().await;
    let app = pg::unique("fp_life");
    let url = pg::with_params(&db.url, &[("application_name", &app)]);
    let store = open(&url, "max_lifetime = \"1s\"\npool_size = 1", pg::deps())
        .await
        .unwrap();
    store.health().await.unwrap();
    // On a busy machine the first connection may already be past its lifetime (and its
    // replacement open beside it, until it closes) by the time it is read: every connection
    // seen now must be gone later, replaced.
    let first = pg::backend_pids(&admin, &app).await;
    assert!(!first.is_empty() && first.len() <= 2, "{first:?}");
    pg::wait_until(
        "a replacement connection",
        Duration::from_secs(10),
        || async {
            store.health().await.unwrap();
            let now = pg::backend_pids(&admin, &app).await;
            !now.is_empty() && !now.iter().any(|p| first.contains(p))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_pool_and_a_dead_server_fail_fast() {
    let db = TestDb::create(&pg::shared_url()).await;
    let admin = db.admin().await;
    let app = pg::unique("fp_busy");
    let url = pg::with_params(&db.url, &[("application_name", &app)]);
    let store = open(&url, "pool_size = 1\nconnect_timeout = \"1s\"", pg::deps())
        .await
        .unwrap();
    // Hold the only connection, then ask for another.
    admin
        .batch_execute("BEGIN; LOCK TABLE feedback_proxy.message_links IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let held = {
        let store = store.clone();
        tokio::spawn(async move { store.get_link("x").await })
    };
    pg::wait_until("the held operation", Duration::from_secs(10), || async {
        store.pool_status().available == 0 && store.pool_status().size == 1
    })
    .await;
    let started = Instant::now();
    let msg = unavailable(store.health().await.unwrap_err());
    assert!(msg.contains("all 1 database connections are busy"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    admin.batch_execute("COMMIT").await.unwrap();
    held.await.unwrap().unwrap();

    // Nothing listening: refused at once, with the address in the message.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let msg = unavailable(
        open(
            &format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable"),
            "connect_timeout = \"2s\"",
            pg::deps(),
        )
        .await
        .err()
        .expect("connected to nothing"),
    );
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_database_heals_without_reopening_the_store() {
    let cluster = pg::RestartCluster::get();
    let _ensure = pg::EnsureRunning(&cluster);
    let db = TestDb::create(&cluster.url).await;
    let admin = db.admin().await;
    let app = pg::unique("fp_restart");
    let url = pg::with_params(
        &db.url,
        &[("sslmode", "require"), ("application_name", &app)],
    );
    let store = open(&url, "pool_size = 4\nconnect_timeout = \"2s\"", pg::deps())
        .await
        .unwrap();
    let vote = |m: &str| NewVote {
        key: VoteKey {
            message_id: m.into(),
            user_id: "alice".into(),
            name: "user_feedback".into(),
        },
        chat_id: "c1".into(),
        value: FeedbackValue::Bool(true),
        comment: None,
    };
    // Warm pool: three connections open.
    let warm = hold_connections(&store, &admin, &app, 3).await;
    assert_eq!(warm.len(), 3);
    store
        .upsert_vote(&vote("before"), &Enqueue::Pending)
        .await
        .unwrap();
    drop(admin);

    cluster.stop();
    for attempt in 0..3 {
        let started = Instant::now();
        let err = store
            .upsert_vote(&vote("down"), &Enqueue::Pending)
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        let msg = unavailable(err);
        assert!(
            msg.contains("cannot connect to Postgres") || msg.contains("lost"),
            "{msg}"
        );
        assert!(
            elapsed < Duration::from_secs(2),
            "attempt {attempt} took {elapsed:?}"
        );
        eprintln!("while down: failed in {elapsed:?}: {msg}");
    }
    assert!(store.health().await.is_err());

    cluster.start();
    let back = Instant::now();
    pg::wait_until("the store to heal", Duration::from_secs(5), || async {
        store.health().await.is_ok()
    })
    .await;
    let healed = back.elapsed();
    eprintln!("healed {healed:?} after the server accepted connections again");
    store
        .upsert_vote(&vote("after"), &Enqueue::Pending)
        .await
        .unwrap();
    let stats = store.delivery_stats().await.unwrap();
    assert_eq!(stats.pending, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_statement_is_cancelled_nothing_is_stored_and_the_connection_stays_usable() {
    let db = TestDb::create(&pg::shared_url()).await;
    let admin = db.admin().await;
    let app = pg::unique("fp_stuck");
    let url = pg::with_params(&db.url, &[("application_name", &app)]);
    let store = open(
        &url,
        "pool_size = 1\nstatement_timeout = \"500ms\"",
        pg::deps(),
    )
    .await
    .unwrap();
    store.health().await.unwrap();
    let pids = pg::backend_pids(&admin, &app).await;
    let key = VoteKey {
        message_id: "m1".into(),
        user_id: "alice@example.com".into(),
        name: "user_feedback".into(),
    };
    let vote = |up: bool| NewVote {
        key: key.clone(),
        chat_id: "c1".into(),
        value: FeedbackValue::Bool(up),
        comment: None,
    };

    // Another session holds the votes table: the vote waits for the lock, and Postgres
    // cancels it after the statement timeout instead of letting the request hang.
    admin
        .batch_execute("BEGIN; LOCK TABLE feedback_proxy.votes IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = Instant::now();
    let msg = unavailable(
        store
            .upsert_vote(&vote(true), &Enqueue::Pending)
            .await
            .unwrap_err(),
    );
    let took = started.elapsed();
    assert!(msg.contains("statement timeout"), "{msg}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    admin.batch_execute("COMMIT").await.unwrap();

    // Nothing of the cancelled transaction was kept, and the same connection serves on.
    assert!(
        store
            .list_votes("c1", &key.user_id)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.list_deliveries(None, 10).await.unwrap().is_empty());
    let d = store
        .upsert_vote(&vote(false), &Enqueue::Pending)
        .await
        .unwrap();
    assert_eq!(d.version, 1);
    assert_eq!(pg::backend_pids(&admin, &app).await, pids);
}
