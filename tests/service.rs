//! The service stack without a socket (issue 13): `app::service(state)` is a tower `Service`
//! generic over the request body, so these tests call it with `Full<Bytes>` bodies. What they
//! check is the stack's own job: request ids set, kept or replaced and on every response; the
//! one way out for errors (a JSON body with the request id, one log line in the request's
//! span); CORS for the feedback API on errors as on successes; and that a 5xx from the
//! feedback API (the store down) is logged once, with its request id. Socket tests stay for the
//! wire (tests/proxy.rs, tests/connections.rs, …).

mod support;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use feedback_proxy::App;
use feedback_proxy::config::{Config, Env};
use feedback_proxy::store::LinkRecord;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use support::proxy::{log_text, logs};
use tower::ServiceExt;

const ALICE: &str = "alice@example.com";

/// A built app on an SQLite file in `dir` (nothing listens anywhere).
async fn app(dir: &tempfile::TempDir, extra: &str) -> App {
    let text = format!(
        "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"http://127.0.0.1:9\"\n\
         [store]\nurl = \"sqlite://{}/fp.db\"\n{extra}",
        dir.path().display()
    );
    let config = Config::from_toml_str(&text, &Env::from_pairs(Vec::<(String, String)>::new()))
        .unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"));
    App::build(config).await.unwrap()
}

async fn call(app: &App, req: http::request::Builder, body: &str) -> Response<Bytes> {
    let svc = feedback_proxy::app::service::<Full<Bytes>>(app.state().clone());
    let res = svc
        .oneshot(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, bytes)
}

fn json(res: &Response<Bytes>) -> serde_json::Value {
    serde_json::from_slice(res.body())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", res.body()))
}

fn request_id(res: &Response<Bytes>) -> String {
    res.headers()["x-request-id"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn every_answer_carries_a_request_id_kept_from_a_sane_client_or_minted() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(&dir, "").await;

    let res = call(&app, Request::get("/healthz"), "").await;
    assert_eq!(res.status(), 200);
    let minted = request_id(&res);
    assert!(uuid::Uuid::parse_str(&minted).is_ok(), "{minted}");

    let res = call(
        &app,
        Request::get("/healthz").header("x-request-id", "client-chose-this-1"),
        "",
    )
    .await;
    assert_eq!(request_id(&res), "client-chose-this-1");

    // Too long, or not visible ASCII: replaced, never echoed.
    for insane in ["x".repeat(129), "has space".to_owned()] {
        let res = call(
            &app,
            Request::get("/healthz").header("x-request-id", insane.as_str()),
            "",
        )
        .await;
        let id = request_id(&res);
        assert_ne!(id, insane);
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    }

    // Errors too, and the body names the same id.
    let res = call(
        &app,
        Request::get("/no/such/thing").header("x-request-id", "err-1"),
        "",
    )
    .await;
    assert_eq!(res.status(), 404);
    assert_eq!(request_id(&res), "err-1");
    assert_eq!(json(&res)["requestId"], "err-1");
    assert_eq!(json(&res)["code"], "NOT_FOUND");
}

#[tokio::test]
async fn feedback_cors_applies_to_errors_and_successes_alike() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(
        &dir,
        "[feedback]\ncors_origins = [\"https://chat.example\"]\n",
    )
    .await;
    app.state()
        .store
        .record_links(&[LinkRecord {
            message_id: "m1".into(),
            chat_id: Some("c1".into()),
            user_id: ALICE.into(),
            trace_id: None,
            client_request_id: None,
            open: false,
            route: None,
        }])
        .await
        .unwrap();

    let vote = |who: Option<&str>, origin: &str| {
        let mut b = Request::post("/api/feedback")
            .header("content-type", "application/json")
            .header("origin", origin.to_owned());
        if let Some(w) = who {
            b = b.header("x-forwarded-email", w.to_owned());
        }
        b
    };
    let body = r#"{"chatId":"c1","messageId":"m1","isUpvoted":true}"#;

    // A success from an allowed origin.
    let res = call(&app, vote(Some(ALICE), "https://chat.example"), body).await;
    assert_eq!(res.status(), 200, "{:?}", res.body());
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://chat.example"
    );
    assert_eq!(res.headers()["access-control-allow-credentials"], "true");

    // An error (no identity) from the same origin: the browser can read it.
    let res = call(&app, vote(None, "https://chat.example"), body).await;
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://chat.example"
    );
    assert_eq!(json(&res)["requestId"], request_id(&res).as_str());

    // Another origin: neither.
    let res = call(&app, vote(Some(ALICE), "https://elsewhere.example"), body).await;
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    let res = call(&app, vote(None, "https://elsewhere.example"), body).await;
    assert!(!res.headers().contains_key("access-control-allow-origin"));

    // Preflights: 204 with the API's methods for a listed origin, 403 for any other.
    let res = call(
        &app,
        Request::options("/api/feedback")
            .header("origin", "https://chat.example")
            .header("access-control-request-method", "POST"),
        "",
    )
    .await;
    assert_eq!(res.status(), 204);
    let methods = res.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    for m in ["GET", "POST", "DELETE"] {
        assert!(methods.contains(m), "{methods}");
    }
    assert_eq!(res.headers()["access-control-max-age"], "600");
    let res = call(
        &app,
        Request::options("/api/feedback").header("origin", "https://elsewhere.example"),
        "",
    )
    .await;
    assert_eq!(res.status(), 403);
    assert_eq!(json(&res)["code"], "FORBIDDEN");
    assert!(res.headers().contains_key("x-request-id"));
}

/// Issue 13: "a feedback 5xx is logged once, with the request id". The store is taken down as
/// tests/link_outage.rs does for SQLite (another connection holds the write lock), so the vote
/// fails with 503 after the store's busy timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feedback_5xx_is_logged_once_with_its_request_id() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let app = app(&dir, "").await;
    app.state()
        .store
        .record_links(&[LinkRecord {
            message_id: "m-5xx".into(),
            chat_id: Some("c-5xx".into()),
            user_id: ALICE.into(),
            trace_id: None,
            client_request_id: None,
            open: false,
            route: None,
        }])
        .await
        .unwrap();
    let lock = rusqlite::Connection::open(dir.path().join("fp.db")).unwrap();
    lock.busy_timeout(Duration::from_secs(30)).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let res = call(
        &app,
        Request::post("/api/feedback")
            .header("content-type", "application/json")
            .header("x-forwarded-email", ALICE)
            .header("x-request-id", "vote-5xx-1"),
        r#"{"chatId":"c-5xx","messageId":"m-5xx","isUpvoted":true}"#,
    )
    .await;
    lock.execute_batch("ROLLBACK").unwrap();
    assert_eq!(res.status(), 503, "{:?}", res.body());
    assert_eq!(json(&res)["code"], "STORE_UNAVAILABLE");
    assert_eq!(json(&res)["requestId"], "vote-5xx-1");

    let logs = log_text();
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("vote-5xx-1"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "one error line for the request: {errors:#?}"
    );
    assert!(errors[0].contains("request failed"), "{}", errors[0]);
    assert!(errors[0].contains("STORE_UNAVAILABLE"), "{}", errors[0]);
    // In the request's span: its fields prefix the line.
    assert!(
        errors[0].contains("request{request_id=vote-5xx-1"),
        "{}",
        errors[0]
    );
    // The access line is in the span too.
    assert!(
        logs.lines()
            .any(|l| l.contains("request{request_id=vote-5xx-1")
                && l.contains("status=503")
                && l.contains("feedback_submit")),
        "no access line in the span:\n{logs}"
    );
}

/// A request body that never sends anything (a client that stalls mid-vote).
struct Stalled;

impl http_body::Body for Stalled {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

/// tower's load shedding on the feedback API: with `feedback.max_in_flight = 1` and one vote
/// in flight (its body stalled), the next is refused at once with 503 `OVERLOADED`, CORS and
/// request id included; once the first is gone, votes are taken again.
#[tokio::test]
async fn votes_past_max_in_flight_are_shed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(
        &dir,
        "[feedback]\nmax_in_flight = 1\ncors_origins = [\"https://chat.example\"]\n",
    )
    .await;
    let svc = feedback_proxy::app::service::<feedback_proxy::body::ReqBody>(app.state().clone());
    let vote = |body: feedback_proxy::body::ReqBody| {
        Request::post("/api/feedback")
            .header("content-type", "application/json")
            .header("x-forwarded-email", ALICE)
            .header("origin", "https://chat.example")
            .body(body)
            .unwrap()
    };

    // One poll takes the only slot: the handler is then waiting for the stalled body.
    let mut first = Box::pin(
        svc.clone()
            .oneshot(vote(feedback_proxy::body::ReqBody::boxed(Stalled))),
    );
    std::future::poll_fn(|cx| {
        assert!(first.as_mut().poll(cx).is_pending());
        std::task::Poll::Ready(())
    })
    .await;

    let res = svc
        .clone()
        .oneshot(vote(Full::new(Bytes::from_static(b"{}")).into()))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://chat.example"
    );
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "OVERLOADED");
    assert_eq!(v["requestId"], id.as_str());

    // The stalled vote's client goes away: its slot is free again.
    drop(first);
    let res = svc
        .oneshot(vote(Full::new(Bytes::from_static(b"{}")).into()))
        .await
        .unwrap();
    assert_eq!(res.status(), 400, "a malformed vote is read, not shed");
}

/// Static files through tower-http's `ServeDir` (a configured `[ui] dir`): validators,
/// conditional requests and ranges; the embedded page's own ETag.
#[tokio::test]
async fn static_files_have_etags_conditional_requests_and_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("dist");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), "<html>app</html>").unwrap();
    std::fs::write(root.join("app.js"), "console.log('0123456789')").unwrap();
    let app_dir = app(&dir, &format!("[ui]\ndir = \"{}\"\n", root.display())).await;

    let res = call(&app_dir, Request::get("/app.js"), "").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.body().as_ref(), b"console.log('0123456789')");
    assert_eq!(res.headers()["cache-control"], "public, max-age=300");
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();
    assert!(res.headers().contains_key("last-modified"));

    let res = call(
        &app_dir,
        Request::get("/app.js").header("if-none-match", etag.as_str()),
        "",
    )
    .await;
    assert_eq!(res.status(), 304);
    assert!(res.body().is_empty());

    let res = call(
        &app_dir,
        Request::get("/app.js").header("range", "bytes=0-6"),
        "",
    )
    .await;
    assert_eq!(res.status(), 206);
    assert_eq!(res.body().as_ref(), b"console");
    assert_eq!(res.headers()["content-range"], "bytes 0-6/25");

    // A client-side route gets the app's index, with the page's headers.
    let res = call(&app_dir, Request::get("/chat/42"), "").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.body().as_ref(), b"<html>app</html>");
    assert_eq!(res.headers()["cache-control"], "no-cache");
    assert!(res.headers().contains_key("content-security-policy"));
    // A missing asset is a JSON 404, never the index.
    let res = call(&app_dir, Request::get("/missing.js"), "").await;
    assert_eq!(res.status(), 404);
    assert_eq!(json(&res)["code"], "NOT_FOUND");

    // The embedded page.
    let other = tempfile::tempdir().unwrap();
    let app_embedded = app(&other, "").await;
    let res = call(&app_embedded, Request::get("/"), "").await;
    assert_eq!(res.status(), 200);
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let res = call(
        &app_embedded,
        Request::get("/").header("if-none-match", format!("W/{etag}")),
        "",
    )
    .await;
    assert_eq!(res.status(), 304);
    assert!(res.body().is_empty());
    let res = call(
        &app_embedded,
        Request::get("/").header("if-none-match", "\"other\""),
        "",
    )
    .await;
    assert_eq!(res.status(), 200);
}
