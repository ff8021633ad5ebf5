//! An HTTPS agent, as on Databricks (`https://…databricksapps.com`): the proxy verifies its
//! certificate against the system roots (here `SSL_CERT_FILE`, the test setup's CA), speaks
//! HTTP/2 when configured to and ALPN agrees (HTTP/1.1 by default), and passes the event stream
//! through as it comes.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use support::process::ProxyProcess;
use support::proxy::{body_json, h1, send};
use support::upstream::{TLS_MAX_CONCURRENT_STREAMS, Upstream, sse_agent};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

const GAP: Duration = Duration::from_millis(300);
const EVENTS: usize = 4;

/// The test setup's server certificate (localhost, 127.0.0.1), offering h2 and http/1.1.
fn acceptor() -> tokio_rustls::TlsAcceptor {
    let cert = support::env("FP_TEST_TLS_CERT");
    let key = support::env("FP_TEST_TLS_KEY");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// An HTTPS agent streaming `EVENTS` events `GAP` apart.
async fn https_agent() -> Upstream {
    sse_agent(Some(acceptor()), EVENTS, GAP).await
}

/// The proxy in front of `agent` with HTTP/2 offered.
fn proxy_for(agent: &Upstream, ca_file: &str) -> ProxyProcess {
    proxy_with(agent, ca_file, "http2 = true")
}

fn proxy_with(agent: &Upstream, ca_file: &str, agent_toml: &str) -> ProxyProcess {
    ProxyProcess::spawn(
        &format!(
            "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"{}\"\n{agent_toml}",
            agent.url()
        ),
        &[("SSL_CERT_FILE", ca_file), ("SSL_CERT_DIR", "/nonexistent")],
    )
}

/// Opens `n` chats at once through `proxy`; returns when each one's first event arrived.
async fn first_events(proxy: &ProxyProcess, n: usize) -> Vec<Duration> {
    let started = Instant::now();
    let chats: Vec<_> = (0..n)
        .map(|_| {
            let url = proxy.url("/invocations");
            tokio::spawn(async move {
                let res = send(
                    &h1(),
                    Request::post(url)
                        .header("content-type", "application/json")
                        .header("x-forwarded-email", "alice@example.com"),
                    "{}",
                )
                .await;
                if res.status() != 200 {
                    let status = res.status();
                    panic!("{status}: {}", body_json(res).await);
                }
                let mut body = res.into_body();
                let first = loop {
                    let frame = body
                        .frame()
                        .await
                        .expect("no event")
                        .expect("the stream broke");
                    if frame.data_ref().is_some_and(|d| !d.is_empty()) {
                        break started.elapsed();
                    }
                };
                while body.frame().await.is_some() {}
                first
            })
        })
        .collect();
    let mut firsts = Vec::new();
    for chat in chats {
        firsts.push(chat.await.unwrap());
    }
    firsts.sort();
    firsts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_agent_is_spoken_to_over_h2_and_its_stream_passes_as_it_comes() {
    let agent = https_agent().await;
    let proxy = proxy_for(&agent, &support::env("FP_TEST_PG_TLS_CA"));
    proxy.wait_healthy().await;

    let started = Instant::now();
    let res = send(
        &h1(),
        Request::post(proxy.url("/invocations"))
            .header("content-type", "application/json")
            .header("x-forwarded-email", "alice@example.com")
            .header("cookie", "session=browser-only")
            .header("authorization", "Bearer browser-token"),
        r#"{"input":[{"role":"user","content":"hi"}],"stream":true}"#,
    )
    .await;
    assert_eq!(res.status(), 200, "{}", proxy.log());
    let mut body = res.into_body();
    let mut text = String::new();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the stream broke");
        if let Some(data) = frame.data_ref() {
            text.push_str(std::str::from_utf8(data).unwrap());
            while arrivals.len() < text.matches("\n\n").count() {
                arrivals.push(started.elapsed());
            }
        }
    }
    let expected: String = (0..EVENTS)
        .map(|i| format!("data: {{\"i\": {i}}}\n\n"))
        .collect();
    assert_eq!(text, expected, "every event, in order");
    // Each event arrives while the agent is still waiting to send the next one: nothing is
    // held back (TLS and HTTP/2 on the agent side included).
    for (i, at) in arrivals.iter().enumerate() {
        assert!(
            *at < GAP * i as u32 + GAP * 2 / 3,
            "event {i} arrived after {at:?} (sent at ≈ {:?}): {arrivals:?}",
            GAP * i as u32
        );
    }

    let seen = &agent.received()[0];
    assert_eq!(seen.version, http::Version::HTTP_2, "ALPN chose h2");
    assert_eq!(seen.headers["x-app-user-email"], "alice@example.com");
    assert!(seen.headers.get("cookie").is_none());
    assert!(
        seen.headers.get("authorization").is_none(),
        "the browser's credential is not passed on (agent.auth = none)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_from_an_unknown_ca_is_a_502_that_says_so() {
    let agent = https_agent().await;
    let proxy = proxy_for(&agent, &support::env("FP_TEST_PG_OTHER_CA"));
    proxy.wait_healthy().await;
    let res = send(
        &h1(),
        Request::post(proxy.url("/invocations"))
            .header("content-type", "application/json")
            .header("x-forwarded-email", "alice@example.com"),
        "{}",
    )
    .await;
    assert_eq!(res.status(), 502);
    let v = body_json(res).await;
    let error = v["error"].as_str().unwrap();
    // The body says what failed; where and why (the certificate) are in the log (issue 12).
    assert!(!error.contains("localhost"), "{v}");
    let request_id = v["requestId"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = proxy.log();
        if log.lines().any(|l| {
            l.contains(&request_id)
                && l.contains("localhost")
                && l.to_lowercase().contains("certificate")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(agent.count(), 0, "no request reached the agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_h2_chats_beyond_the_agents_stream_limit_wait_and_the_http1_default_has_no_limit() {
    let n = TLS_MAX_CONCURRENT_STREAMS as usize + 1;
    let ca = support::env("FP_TEST_PG_TLS_CA");
    let stream_time = GAP * (EVENTS as u32 - 1);

    // agent.http2 = true: one connection, and the agent's server takes two streams at a time;
    // the third chat starts only when one of the first two has ended.
    let agent = https_agent().await;
    let proxy = proxy_for(&agent, &ca);
    proxy.wait_healthy().await;
    // One chat first, so that the pooled HTTP/2 connection exists and knows the limit (chats
    // racing to open the first connection can each open their own).
    first_events(&proxy, 1).await;
    let firsts = first_events(&proxy, n).await;
    assert!(firsts[n - 2] < GAP, "{firsts:?}");
    assert!(firsts[n - 1] >= stream_time, "{firsts:?}");

    // The default (agent.http2 = false): a connection per chat, every chat starts at once.
    let agent = https_agent().await;
    let proxy = proxy_with(&agent, &ca, "");
    proxy.wait_healthy().await;
    first_events(&proxy, 1).await;
    let firsts = first_events(&proxy, n).await;
    assert!(firsts[n - 1] < GAP, "{firsts:?}");
    assert!(
        agent
            .received()
            .iter()
            .all(|r| r.version == http::Version::HTTP_11)
    );
}
