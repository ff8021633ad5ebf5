//! Security at the edges (issue 12): agent paths are normalised and kept under their route,
//! agent routes take only their methods and no cross-site requests, and the UI directory serves
//! no dotfiles. Real proxy, real sockets; every refused case asserts that the agent saw nothing.

mod support;

use std::time::Duration;

use http::Request;
use support::proxy::{TestProxy, body_bytes, body_json, h1, send};
use support::upstream::{Upstream, full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(upstream: &str, extra: &str) -> String {
    format!(
        "[identity]\ndev_user = \"dev@example.com\"\n[agent]\nurl = \"{upstream}/base\"\nauth = \"bearer-env:AGENT_TOKEN\"\npaths = [\"/invocations\", \"/responses\"]\n\
         [[agent.routes]]\npath = \"/api/chat\"\nupstream_path = \"/invocations\"\n{extra}"
    )
}

async fn agent() -> Upstream {
    Upstream::start(|_r| async { full(200, "application/json", "{}") }).await
}

async fn start(agent: &Upstream, extra: &str) -> TestProxy {
    TestProxy::start_with_env(
        &config(&agent.url(), extra),
        &[("AGENT_TOKEN", "app-token")],
    )
    .await
}

/// Sends one HTTP/1.1 request with exactly this request target (no client-side parsing or
/// normalisation) and returns the status code and the raw response.
async fn raw(proxy: &TestProxy, method: &str, target: &str) -> (u16, String) {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let req = format!(
        "{method} {target} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}",
        proxy.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("no answer within 10s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_and_encoded_separators_never_reach_the_agent() {
    let agent = agent().await;
    let proxy = start(&agent, "").await;
    for target in [
        "/invocations/../../../api/2.0/secrets/list",
        "/invocations/%2e%2e/%2e%2e/api/2.0/secrets/list",
        "/invocations/%2E%2e/%2e%2E/api/2.0/secrets/list",
        "/invocations/.%2e/%2e./api/2.0/secrets/list",
        "/invocations/..",
        "/invocations/%2e%2e/responses",
        "/api/chat/../invocations",
        "/invocations/a%2f..%2f..%2fapi",
        "/invocations/a%2Fb",
        "/invocations/a\\..\\..\\api",
        "/invocations/a%5c..%5c..%5capi",
        "/invocations/a%5Cb",
        "/invocations/a%00b",
    ] {
        let (status, text) = raw(&proxy, "POST", target).await;
        assert_eq!(status, 400, "{target}: {text}");
        if text.contains("application/json") {
            assert!(text.contains("INVALID_PATH"), "{target}: {text}");
        }
    }
    // Any method: the path is judged first.
    for method in ["GET", "PUT", "DELETE"] {
        let (status, text) = raw(&proxy, method, "/invocations/../api/2.0/secrets/list").await;
        assert_eq!(status, 400, "{method}: {text}");
    }
    assert_eq!(agent.count(), 0, "{:?}", agent.received());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_receives_the_normalised_path() {
    let agent = agent().await;
    let proxy = start(&agent, "").await;
    let cases = [
        (
            "/invocations/a/./b/../c?q=%2e%2e",
            "/base/invocations/a/c?q=%2e%2e",
        ),
        ("/invocations/x/%2e%2E/y", "/base/invocations/y"),
        ("/api/chat/x/../y", "/base/invocations/y"),
        ("/invocations/.", "/base/invocations/"),
        ("/invocations/plain", "/base/invocations/plain"),
    ];
    for (target, _) in cases {
        let (status, text) = raw(&proxy, "POST", target).await;
        assert_eq!(status, 200, "{target}: {text}");
    }
    let seen: Vec<String> = agent
        .received()
        .iter()
        .map(|r| r.uri.path_and_query().unwrap().to_string())
        .collect();
    let want: Vec<&str> = cases.iter().map(|(_, w)| *w).collect();
    assert_eq!(seen, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_routes_take_only_their_methods() {
    let agent = agent().await;
    let proxy = start(
        &agent,
        "[[agent.routes]]\npath = \"/api/state\"\nmethods = [\"GET\", \"POST\"]\n",
    )
    .await;
    for (method, path) in [
        ("GET", "/invocations"),
        ("PUT", "/invocations"),
        ("DELETE", "/responses/x"),
        ("PATCH", "/api/chat"),
        ("OPTIONS", "/invocations"),
    ] {
        let (status, text) = raw(&proxy, method, path).await;
        assert_eq!(status, 405, "{method} {path}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("\r\nallow: post\r\n"),
            "{text}"
        );
        assert!(text.contains("METHOD_NOT_ALLOWED"), "{text}");
    }
    let (status, text) = raw(&proxy, "DELETE", "/api/state").await;
    assert_eq!(status, 405, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nallow: get, post\r\n"),
        "{text}"
    );
    assert_eq!(agent.count(), 0);

    // A route that lists GET forwards it.
    let res = send(&h1(), Request::get(proxy.url("/api/state/1")), "").await;
    assert_eq!(res.status(), 200);
    body_bytes(res).await;
    let got = agent.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, http::Method::GET);
    assert_eq!(got[0].uri.path(), "/base/api/state/1");
}

fn post(proxy: &TestProxy, path: &str) -> http::request::Builder {
    Request::post(proxy.url(path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_and_non_json_chat_requests_are_refused_before_the_agent() {
    let agent = agent().await;
    let proxy = start(
        &agent,
        "[feedback]\ncors_origins = [\"https://ui.example\"]\n",
    )
    .await;
    let json = "application/json";
    let refused = [
        // A cross-site form or text/plain fetch: the "simple" requests a page elsewhere can send.
        (
            post(&proxy, "/invocations").header("content-type", "text/plain"),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            post(&proxy, "/invocations")
                .header("content-type", "text/plain;charset=UTF-8")
                .header("origin", format!("http://{}", proxy.addr)),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            post(&proxy, "/api/chat").header("content-type", "application/x-www-form-urlencoded"),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            post(&proxy, "/api/chat").header("content-type", "multipart/form-data; boundary=x"),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (post(&proxy, "/invocations"), 415, "UNSUPPORTED_MEDIA_TYPE"),
        (
            post(&proxy, "/invocations")
                .header("content-type", json)
                .header("sec-fetch-site", "cross-site"),
            403,
            "FORBIDDEN",
        ),
        (
            post(&proxy, "/invocations")
                .header("content-type", json)
                .header("origin", "https://evil.example"),
            403,
            "FORBIDDEN",
        ),
        (
            post(&proxy, "/invocations")
                .header("content-type", "text/plain")
                .header("origin", "https://evil.example")
                .header("sec-fetch-site", "cross-site"),
            403,
            "FORBIDDEN",
        ),
        (
            // Same host, another port: another origin.
            post(&proxy, "/invocations")
                .header("content-type", json)
                .header(
                    "origin",
                    format!("http://127.0.0.1:{}", proxy.addr.port() ^ 1),
                ),
            403,
            "FORBIDDEN",
        ),
        (
            post(&proxy, "/invocations")
                .header("content-type", json)
                .header("origin", "null"),
            403,
            "FORBIDDEN",
        ),
    ];
    for (i, (req, status, code)) in refused.into_iter().enumerate() {
        let res = send(&h1(), req, "{\"input\": []}").await;
        assert_eq!(res.status(), status, "case {i}");
        assert_eq!(body_json(res).await["code"], code, "case {i}");
    }
    assert_eq!(agent.count(), 0, "{:?}", agent.received());

    let allowed = [
        // No fetch metadata at all (curl, a server-side client).
        post(&proxy, "/invocations").header("content-type", json),
        // The app's own page (Host = the proxy's address; the scheme is not compared).
        post(&proxy, "/invocations")
            .header("content-type", json)
            .header("origin", format!("http://{}", proxy.addr))
            .header("sec-fetch-site", "same-origin"),
        post(&proxy, "/api/chat")
            .header("content-type", "application/json; charset=utf-8")
            .header("origin", format!("https://{}", proxy.addr)),
        // A configured front end elsewhere.
        post(&proxy, "/responses")
            .header("content-type", json)
            .header("origin", "https://ui.example")
            .header("sec-fetch-site", "cross-site"),
    ];
    let n = allowed.len();
    for (i, req) in allowed.into_iter().enumerate() {
        let res = send(&h1(), req, "{\"input\": []}").await;
        assert_eq!(res.status(), 200, "case {i}");
        body_bytes(res).await;
    }
    assert_eq!(agent.count(), n);
    assert!(
        agent
            .received()
            .iter()
            .all(|r| r.headers["authorization"] == "Bearer app-token"
                && !r.headers.contains_key("origin"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_directory_serves_no_dotfiles_and_nothing_outside() {
    let agent = agent().await;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("dist");
    std::fs::create_dir_all(root.join(".git")).unwrap();
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("index.html"), "<html>app</html>").unwrap();
    std::fs::write(root.join("app.js"), "console.log(1)").unwrap();
    std::fs::write(root.join("sub/page.txt"), "page").unwrap();
    std::fs::write(root.join(".env"), "SECRET=1").unwrap();
    std::fs::write(root.join(".git/config"), "[core]").unwrap();
    std::fs::write(root.join("sub/.hidden"), "hidden-content").unwrap();
    std::fs::write(tmp.path().join("outside.txt"), "outside-content").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("outside.txt"), root.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink(tmp.path(), root.join("up")).unwrap();
    std::os::unix::fs::symlink(root.join(".env"), root.join("env.txt")).unwrap();
    std::os::unix::fs::symlink(root.join("app.js"), root.join("alias.js")).unwrap();
    let proxy = start(&agent, &format!("[ui]\ndir = \"{}\"\n", root.display())).await;

    let get = |path: &'static str| {
        let url = proxy.url(path);
        async move {
            let res = send(&h1(), Request::get(url), "").await;
            let status = res.status().as_u16();
            (
                status,
                String::from_utf8_lossy(&body_bytes(res).await).into_owned(),
            )
        }
    };
    for path in [
        "/.env",
        "/%2eenv",
        "/.git/config",
        "/.git",
        "/sub/.hidden",
        "/leak.txt",
        "/up/outside.txt",
        "/env.txt",
    ] {
        let (status, body) = get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
        for secret in ["SECRET", "[core]", "hidden-content", "outside-content"] {
            assert!(!body.contains(secret), "{path}: {body}");
        }
    }
    assert_eq!(get("/").await, (200, "<html>app</html>".into()));
    assert_eq!(get("/app.js").await, (200, "console.log(1)".into()));
    assert_eq!(get("/alias.js").await, (200, "console.log(1)".into()));
    assert_eq!(get("/sub/page.txt").await, (200, "page".into()));
    // A client-side route still gets the app.
    assert_eq!(get("/chat/42").await, (200, "<html>app</html>".into()));
    assert_eq!(agent.count(), 0);
}
