use std::path::Path;
use std::time::Duration;

use url::Url;

use super::*;

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, &Env::from_pairs(env.iter().copied()))
}

const MINIMAL: &str = "[agent]\nurl = \"http://127.0.0.1:5056\"\n";

#[test]
fn minimal_config_has_sane_defaults() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c.listen, "127.0.0.1:8000".parse().unwrap());
    assert_eq!(c.shutdown_grace, Duration::from_secs(10));
    assert_eq!(c.agent.response_header_timeout, Duration::from_secs(120));
    assert_eq!(c.agent.claim_timeout, Duration::from_millis(250));
    let paths: Vec<_> = c.agent.routes.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/invocations", "/responses"]);
    assert!(!c.identity.trust_forwarded_headers);
    assert_eq!(
        c.store.kind,
        StoreKind::Sqlite {
            path: "feedback-proxy.db".into()
        }
    );
    assert!(!c.mlflow.enabled());
    assert_eq!(c.feedback.max_comment_bytes, 4096);
    assert!(c.feedback.rate_limit.is_some());
}

#[test]
fn unknown_key_is_named() {
    let err = load(
        "[agent]\nurl = \"http://127.0.0.1:5056\"\nurll = \"x\"\n",
        &[],
    )
    .unwrap_err();
    let line = err.to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(line.starts_with("agent.urll: unknown key"), "{line}");

    let err = load("listen = \"127.0.0.1:1\"\n[nope]\nx = 1\n", &[]).unwrap_err();
    assert!(err.to_string().starts_with("nope: unknown key"), "{err}");
}

#[test]
fn bad_url_is_named() {
    let err = load("[agent]\nurl = \"ftp//nope\"\n", &[]).unwrap_err();
    let line = err.to_string();
    assert!(line.starts_with("agent.url: invalid URL"), "{line}");
    assert!(!line.contains('\n'));
}

#[test]
fn bad_values_are_named() {
    let cases = [
        ("shutdown_grace = \"ten\"\n", "shutdown_grace"),
        ("listen = \"localhost\"\n", "listen"),
        ("[agent]\nauth = \"magic\"\n", "agent.auth"),
        (
            "[agent]\nmax_rewrite_bytes = \"lots\"\n",
            "agent.max_rewrite_bytes",
        ),
        ("[agent]\npaths = [\"invocations\"]\n", "agent.paths[0]"),
        ("[agent]\nclaim_timeout = \"0s\"\n", "agent.claim_timeout"),
        ("[agent]\npaths = [\"/api/feedback\"]\n", "agent.routes"),
        ("[store]\nurl = \"mysql://x\"\n", "store.url"),
        (
            "[store]\nurl = \"postgres://h/db?sslmode=sometimes\"\n",
            "store.url",
        ),
        (
            "[feedback.names]\nrating = [\"float\"]\n",
            "feedback.names.rating",
        ),
        (
            "[mlflow]\ntracking_uri = \"databricks\"\n",
            "mlflow.tracking_uri",
        ),
        ("[log]\nformat = \"xml\"\n", "log.format"),
    ];
    for (extra, key) in cases {
        let text = if extra.starts_with("[agent]") {
            format!("{}url = \"http://127.0.0.1:1\"\n", extra)
        } else if extra.starts_with('[') {
            format!("{MINIMAL}{extra}")
        } else {
            format!("{extra}{MINIMAL}")
        };
        let err = load(&text, &[]).unwrap_err();
        assert_eq!(err.keys().next(), Some(key), "{text}: {err}");
    }
}

#[test]
fn type_errors_name_the_key() {
    let err = load(
        "[agent]\nurl = \"http://x\"\n[identity]\ntrust_forwarded_headers = \"yes\"\n",
        &[],
    )
    .unwrap_err();
    assert_eq!(err.keys().next(), Some("identity.trust_forwarded_headers"));
}

#[test]
fn invalid_toml_is_one_line() {
    let err = load("[agent\nurl = 1\n", &[]).unwrap_err();
    let line = err.to_string();
    assert!(line.starts_with("invalid TOML at line 1"), "{line}");
    assert!(!line.contains('\n'));
}

#[test]
fn databricks_apps_overlay() {
    let env = [
        ("DATABRICKS_APP_PORT", "8080"),
        ("DATABRICKS_HOST", "adb-123.4.azuredatabricks.net/"),
        ("DATABRICKS_CLIENT_ID", "sp-id"),
        ("DATABRICKS_CLIENT_SECRET", "sp-secret"),
        ("MLFLOW_EXPERIMENT_ID", "42"),
        ("PGHOST", "instance.database.cloud.databricks.com"),
        ("PGPORT", "5432"),
        ("PGUSER", "sp-id"),
        ("PGDATABASE", "databricks_postgres"),
        ("PGSSLMODE", "require"),
        ("PGAPPNAME", "my-app"),
    ];
    let text = "listen = \"127.0.0.1:9\"\n[agent]\nurl = \"https://agent.example\"\nauth = \"databricks-oauth\"\n[mlflow]\ntracking_uri = \"databricks\"\nauth = \"databricks-oauth\"\n[store]\npassword = \"databricks-oauth\"\n";
    let c = load(text, &env).unwrap();
    assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(
        c.databricks.host.as_ref().map(Url::as_str),
        Some("https://adb-123.4.azuredatabricks.net/")
    );
    assert_eq!(c.mlflow.tracking_uri, c.databricks.host);
    assert_eq!(c.mlflow.experiment_id.as_deref(), Some("42"));
    let StoreKind::Postgres(pg) = &c.store.kind else {
        panic!("expected postgres, got {:?}", c.store.kind)
    };
    assert_eq!(pg.hosts, ["instance.database.cloud.databricks.com"]);
    assert_eq!(pg.user, "sp-id");
    assert_eq!(pg.dbname, "databricks_postgres");
    assert_eq!(pg.sslmode, SslMode::Require);
    assert_eq!(pg.application_name.as_deref(), Some("my-app"));

    let rendered = c.to_redacted_toml();
    assert!(!rendered.contains("sp-secret"), "{rendered}");
    assert!(rendered.contains("<redacted>"));
}

#[test]
fn host_with_scheme_is_kept() {
    let c = load(
        MINIMAL,
        &[("DATABRICKS_HOST", "https://dbc-1.cloud.databricks.com")],
    )
    .unwrap();
    assert_eq!(
        c.databricks.host.unwrap().as_str(),
        "https://dbc-1.cloud.databricks.com/"
    );
}

#[test]
fn databricks_oauth_without_credentials_names_what_is_missing() {
    let err = load(
        "[agent]\nurl = \"http://x\"\nauth = \"databricks-oauth\"\n",
        &[],
    )
    .unwrap_err();
    let line = err.to_string();
    assert!(
        line.starts_with("agent.auth: databricks-oauth needs"),
        "{line}"
    );
    assert!(line.contains("DATABRICKS_HOST") && line.contains("DATABRICKS_CLIENT_SECRET"));
}

#[test]
fn bearer_env_reads_the_variable_once() {
    let c = load(
        "[agent]\nurl = \"http://x\"\nauth = \"bearer-env:AGENT_TOKEN\"\n",
        &[("AGENT_TOKEN", "s3cr3t")],
    )
    .unwrap();
    match &c.agent.auth {
        AuthSpec::BearerEnv { var, token } => {
            assert_eq!(var, "AGENT_TOKEN");
            assert_eq!(token.expose(), "s3cr3t");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!format!("{c:?}").contains("s3cr3t"));
    assert!(!c.to_redacted_toml().contains("s3cr3t"));

    let err = load(
        "[agent]\nurl = \"http://x\"\nauth = \"bearer-env:AGENT_TOKEN\"\n",
        &[],
    )
    .unwrap_err();
    assert!(err.to_string().contains("AGENT_TOKEN is not set"));
}

#[test]
fn interpolation_names_each_missing_variable() {
    let err = load(
        "[agent]\nurl = \"${AGENT_URL}\"\n[mlflow]\nexperiment_id = \"${MLFLOW_EXPERIMENT_ID}\"\n",
        &[],
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("agent.url: environment variable AGENT_URL is not set"),
        "{text}"
    );
    assert!(text.contains("MLFLOW_EXPERIMENT_ID"), "{text}");
}

#[test]
fn postgres_url_wins_over_env_and_password_is_redacted() {
    let c = load(
        &format!(
            "{MINIMAL}[store]\nurl = \"postgres://alice:p%40ss@db.example:6543/votes?sslmode=verify-full&application_name=fp\"\n"
        ),
        &[("PGHOST", "ignored"), ("PGUSER", "bob")],
    )
    .unwrap();
    let StoreKind::Postgres(pg) = &c.store.kind else {
        panic!()
    };
    assert_eq!(pg.hosts, ["db.example"]);
    assert_eq!(pg.port, 6543);
    assert_eq!(pg.user, "alice");
    assert_eq!(pg.password.as_ref().map(Secret::expose), Some("p@ss"));
    assert_eq!(pg.dbname, "votes");
    assert_eq!(pg.sslmode, SslMode::VerifyFull);
    assert!(!c.to_redacted_toml().contains("p@ss"));
}

#[test]
fn routes_sort_longest_first_and_keep_options() {
    let c = load(
        "[agent]\nurl = \"http://x\"\npaths = [\"/invocations\"]\n[[agent.routes]]\npath = \"/invocations/chat/\"\nupstream_path = \"/invocations\"\nevents = true\nclient_request_id = true\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.agent.routes[0].path, "/invocations/chat");
    assert!(c.agent.routes[0].events && c.agent.routes[0].client_request_id);
    assert_eq!(
        c.agent.routes[0].upstream_path.as_deref(),
        Some("/invocations")
    );
    assert_eq!(c.agent.routes[1].path, "/invocations");
}

#[test]
fn path_prefix_is_segment_aware() {
    assert!(path_has_prefix("/invocations", "/invocations"));
    assert!(path_has_prefix("/invocations/x", "/invocations"));
    assert!(!path_has_prefix("/invocationsx", "/invocations"));
    assert!(path_has_prefix("/anything", "/"));
}

#[test]
fn warnings_flag_dev_user_on_databricks() {
    let c = load(
        &format!("{MINIMAL}[identity]\ndev_user = \"dev@example.com\"\n"),
        &[],
    )
    .unwrap();
    let env = Env::from_pairs([("DATABRICKS_APP_NAME", "my-app")]);
    assert!(c.warnings(&env).iter().any(|w| w.contains("dev_user")));
    assert!(
        c.warnings(&Env::default())
            .iter()
            .all(|w| !w.contains("dev_user"))
    );
}

#[test]
fn review_queue_and_dataset_names_are_checked() {
    let c = load(
        "[agent]\nurl = \"http://x\"\n[review]\nmlflow_queue = \" neg \"\n[datasets]\nauto = \"evals\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.review.mlflow_queue.as_deref(), Some("neg"));
    assert_eq!(c.datasets.auto.as_deref(), Some("evals"));
    let c = load(
        "[agent]\nurl = \"http://x\"\n[datasets]\nauto = \"\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.datasets.auto, None, "empty is none");
    let err = load(
        "[agent]\nurl = \"http://x\"\n[review]\nmlflow_queue = \"a'b\\\"c\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("review.mlflow_queue"), "{err}");
    let err = load("[agent]\nurl = \"http://x\"\n[datasets]\nwhat = 1\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("what"), "{err}");
}

#[test]
fn shipped_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["config/example.toml", "config/local.toml"] {
        let env = Env::from_pairs([("AGENT_TOKEN", "t")]);
        if let Err(e) = Config::load(&root.join(name), &env) {
            panic!("{name}: {e}");
        }
    }
}

#[test]
fn route_methods_default_to_post_and_are_validated() {
    let c = load(
        "[agent]\nurl = \"http://x\"\npaths = [\"/invocations\"]\n[[agent.routes]]\npath = \"/api/chat\"\nmethods = [\"POST\", \"GET\", \"POST\"]\n",
        &[],
    )
    .unwrap();
    let methods = |p: &str| {
        c.agent
            .routes
            .iter()
            .find(|r| r.path == p)
            .map(|r| r.methods.clone())
            .unwrap()
    };
    assert_eq!(methods("/invocations"), [http::Method::POST]);
    assert_eq!(
        methods("/api/chat"),
        [http::Method::POST, http::Method::GET]
    );
    for bad in ["[]", "[\"post\"]", "[\"CONNECT\"]", "[\"OPTIONS\"]"] {
        let err = load(
            &format!(
                "[agent]\nurl = \"http://x\"\n[[agent.routes]]\npath = \"/a\"\nmethods = {bad}\n"
            ),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            err.keys().next(),
            Some("agent.routes[0].methods"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn server_limits_have_defaults_and_are_validated() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c.server.max_connections, 2048);
    assert_eq!(c.server.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(30));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.server.request_body_timeout, Duration::from_secs(30));
    let rr = c.server.reset_rate.unwrap();
    assert_eq!((rr.per_second, rr.burst), (10.0, 100));
    assert_eq!(c.agent.max_concurrent_per_user, 32);

    let off = load(
        &format!("{MINIMAL}max_concurrent_per_user = 0\n[server.reset_rate]\nper_second = 0\n"),
        &[],
    )
    .unwrap();
    assert!(off.server.reset_rate.is_none());
    assert_eq!(off.agent.max_concurrent_per_user, 0);

    for (text, key) in [
        ("[server]\nmax_connections = 0\n", "server.max_connections"),
        ("[server]\nidle_timeout = \"0s\"\n", "server.idle_timeout"),
        (
            "[server]\nhandshake_timeout = \"soon\"\n",
            "server.handshake_timeout",
        ),
        (
            "[server]\nrequest_body_timeout = \"0ms\"\n",
            "server.request_body_timeout",
        ),
        (
            "[server.reset_rate]\nburst = 0\n",
            "server.reset_rate.burst",
        ),
        (
            "[server.reset_rate]\nper_second = -1\n",
            "server.reset_rate.per_second",
        ),
        ("[server]\nidle = \"1s\"\n", "server.idle"),
    ] {
        let err = load(&format!("{MINIMAL}{text}"), &[]).unwrap_err();
        assert!(err.keys().any(|k| k == key), "{text}: {err}");
    }
}

#[test]
fn credentials_in_urls_never_appear_in_config_errors() {
    for (url, secret) in [
        ("http://svc:hunter2@agent:notaport", "hunter2"),
        ("http://svc:hun/ter@2@agent", "ter@2"),
        ("http://agent.internal/x?token=abc123&mode=1", "abc123"),
        ("http://agent.internal/x?api_key=abc123", "abc123"),
        ("ftp://svc:hunter2@agent", "hunter2"),
    ] {
        let err = Config::from_toml_str(&format!("[agent]\nurl = \"{url}\"\n"), &Env::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent.url"), "{err}");
        assert!(!err.contains(secret), "{url}: {err}");
    }
    assert_eq!(
        super::redact_url_text("http://u:p@h/x?Password=1&a=2#f"),
        "http://u:<redacted>@h/x?Password=<redacted>&a=2#f"
    );
}
