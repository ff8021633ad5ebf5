//! The system under test as the clients see it: a loopback address and HTTP/1.1 connections.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http_body_util::Full;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `http://127.0.0.1:PORT` (loopback only, no path).
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url}: only http:// URLs"))?;
        let authority = rest.trim_end_matches('/').to_owned();
        let addr: SocketAddr = authority
            .parse()
            .map_err(|e| format!("{url}: want http://IP:PORT ({e})"))?;
        if !addr.ip().is_loopback() {
            return Err(format!("{url}: loopback addresses only"));
        }
        Ok(Self { addr, authority })
    }

    /// A new HTTP/1.1 connection (its driver runs on its own task).
    pub async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake {}: {e}", self.addr))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    /// A JSON POST with the given extra headers.
    pub fn post(
        &self,
        path_and_query: &str,
        body: &'static str,
        headers: &[(&str, &str)],
    ) -> Result<Request<Full<Bytes>>, String> {
        self.post_bytes(path_and_query, Bytes::from_static(body.as_bytes()), headers)
    }

    /// [`Target::post`] with a body built at run time.
    pub fn post_bytes(
        &self,
        path_and_query: &str,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Result<Request<Full<Bytes>>, String> {
        let mut b = Request::post(path_and_query)
            .header(HOST, &self.authority)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, body.len());
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Full::new(body))
            .map_err(|e| format!("cannot build a request: {e}"))
    }
}

/// A small chat request, as a chat UI sends it.
pub const CHAT_REQUEST: &str =
    r#"{"input":[{"role":"user","content":"Tell me about the weather."}],"stream":true}"#;
