//! The chat UI at `/`: the embedded reference page (`ui/index.html`, compiled into the binary),
//! or, with `[ui] dir = "…"`, a built front end served from disk with SPA fallback.
//!
//! Serving from disk never leaves the directory: paths are percent-decoded and rejected if they
//! contain `..`, backslashes or NUL, and the resolved file must be a regular file still under
//! the canonical root (so a symlink cannot point outside). Dotfiles and dot-directories (`.env`,
//! `.git/config`: any segment starting with `.`, asked for or reached through a symlink) are
//! 404, never the SPA fallback: a build directory can hold secrets nobody meant to publish. A path without a file extension that matches no
//! file is a client-side route and gets `index.html`; a missing asset is a 404.
//!
//! Files are served by tower-http's `ServeDir` (streamed, with `ETag`, `Last-Modified`,
//! conditional requests and `Range`), through a [`Guarded`] backend that refuses anything
//! outside the canonical root or hidden; the embedded page carries a strong `ETag` of its own.

use std::future::Future;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, HeaderValue, IF_NONE_MATCH,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_http::services::fs::{Backend, ServeDir, TokioBackend, TokioFile};

use crate::body::{Body, ReqBody};
use crate::config::UiConfig;
use crate::error::Error;

/// The reference chat page.
const INDEX_HTML: &str = include_str!("../ui/index.html");

/// Everything inline, nothing external: the page talks only to this origin.
const PAGE_CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub struct Ui {
    /// A configured front end: `ServeDir` over its canonical root.
    dir: Option<ServeDir<tower_http::services::fs::DefaultServeDirFallback, Guarded>>,
    /// The embedded page's strong `ETag` (a digest of its bytes).
    etag: HeaderValue,
}

impl Ui {
    pub fn new(config: &UiConfig) -> Self {
        let dir = config.dir.as_ref().map(|d| {
            let root = match d.canonicalize() {
                Ok(c) => c,
                Err(e) => {
                    // Keep the configured path: every request then answers 404 and the
                    // start-up log says why.
                    tracing::error!(dir = %d.display(), error = %e, "ui.dir cannot be opened");
                    d.clone()
                }
            };
            ServeDir::with_backend(
                &root,
                Guarded {
                    root: root.clone().into(),
                },
            )
            // A directory without its slash is a client-side route (the SPA fallback), not a
            // redirect.
            .redirect_to_trailing_slash(false)
        });
        let digest = ring::digest::digest(&ring::digest::SHA256, INDEX_HTML.as_bytes());
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("\"index\""));
        Self { dir, etag }
    }

    pub async fn serve(&self, req: Request<ReqBody>) -> Result<Response<Body>, Error> {
        let head = *req.method() == Method::HEAD;
        let path = req.uri().path().to_owned();
        match &self.dir {
            None => match path.as_str() {
                "/" | "/index.html" => {
                    let fresh = req
                        .headers()
                        .get(IF_NONE_MATCH)
                        .is_some_and(|v| etag_matches(v.as_bytes(), self.etag.as_bytes()));
                    let mut res = if fresh {
                        let mut res = Response::new(Body::Empty);
                        *res.status_mut() = StatusCode::NOT_MODIFIED;
                        res
                    } else {
                        page(INDEX_HTML.as_bytes().to_vec(), head)
                    };
                    headers(&mut res, true);
                    res.headers_mut().insert(ETAG, self.etag.clone());
                    Ok(res)
                }
                _ => Err(not_found(&path)),
            },
            Some(dir) => serve_dir(dir, req, &path).await,
        }
    }
}

fn not_found(path: &str) -> Error {
    Error::NotFound(format!("no route for {}", crate::text::echo(path)))
}

/// Whether an `If-None-Match` list names `etag` (or is `*`).
fn etag_matches(list: &[u8], etag: &[u8]) -> bool {
    list.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        let t = t.strip_prefix(b"W/").unwrap_or(t);
        t == etag || t == b"*"
    })
}

async fn serve_dir(
    dir: &ServeDir<tower_http::services::fs::DefaultServeDirFallback, Guarded>,
    req: Request<ReqBody>,
    path: &str,
) -> Result<Response<Body>, Error> {
    let Some(rel) = safe_relative(path) else {
        return Err(not_found(path));
    };
    // A client-side route (no extension) falls back to the app's index, with the request's
    // method and conditional headers.
    let fallback = rel.extension().is_none().then(|| {
        let mut index = Request::new(());
        *index.method_mut() = req.method().clone();
        *index.headers_mut() = req.headers().clone();
        *index.uri_mut() = http::Uri::from_static("/index.html");
        index
    });
    let Ok(res) = dir.clone().oneshot(req).await;
    let res = match (res.status(), fallback) {
        (StatusCode::NOT_FOUND, Some(index)) => {
            let Ok(res) = dir.clone().oneshot(index).await;
            res
        }
        _ => res,
    };
    if res.status() == StatusCode::NOT_FOUND {
        return Err(not_found(path));
    }
    let is_html = res
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    let mut res = res.map(|b| Body::Boxed(b.map_err(Into::into).boxed_unsync()));
    if res.status().is_success() || res.status() == StatusCode::NOT_MODIFIED {
        headers(&mut res, is_html);
    }
    Ok(res)
}

/// `ServeDir`'s file system, refusing what the module documentation says: a path whose
/// canonical form is outside the root or passes through a hidden name is "not found".
#[derive(Clone)]
pub struct Guarded {
    root: Arc<Path>,
}

type IoFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

impl Backend for Guarded {
    type File = TokioFile;
    type Metadata = std::fs::Metadata;
    type OpenFuture = IoFuture<TokioFile>;
    type MetadataFuture = IoFuture<std::fs::Metadata>;

    fn open(&self, path: PathBuf) -> Self::OpenFuture {
        let root = self.root.clone();
        Box::pin(async move { TokioBackend.open(inside(&root, &path).await?).await })
    }

    fn metadata(&self, path: PathBuf) -> Self::MetadataFuture {
        let root = self.root.clone();
        Box::pin(async move { TokioBackend.metadata(inside(&root, &path).await?).await })
    }
}

/// The canonical path of `candidate` if it is inside `root` without passing through a
/// dot-directory or being a dotfile (a symlink to `.env` is refused too).
async fn inside(root: &Path, candidate: &Path) -> io::Result<PathBuf> {
    let real = tokio::fs::canonicalize(candidate).await?;
    let refused = match real.strip_prefix(root) {
        Ok(rel) => rel.components().any(|c| match c {
            Component::Normal(n) => hidden(n),
            _ => true,
        }),
        Err(_) => true,
    };
    if refused {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    Ok(real)
}

/// The path as a relative path with only normal components, or `None` if it tries anything
/// else.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .ok()?;
    if decoded.contains(['\0', '\\']) {
        return None;
    }
    let mut out = PathBuf::new();
    for comp in Path::new(decoded.trim_start_matches('/')).components() {
        match comp {
            Component::Normal(c) if hidden(c) => return None,
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// A dotfile or dot-directory name.
fn hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// The embedded page (its body omitted for HEAD, its length kept).
fn page(bytes: Vec<u8>, head: bool) -> Response<Body> {
    let len = bytes.len();
    let mut res = Response::new(if head { Body::Empty } else { Body::full(bytes) });
    if head {
        res.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    res
}

/// Caching and hardening headers: HTML names the assets, so it must be revalidated for a new
/// build to take effect, and it gets the page's CSP; assets may be cached for five minutes.
fn headers(res: &mut Response<Body>, is_html: bool) {
    let h = res.headers_mut();
    if is_html {
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_CSP));
        h.insert(
            http::header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
    } else {
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=300"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn relative_paths_cannot_escape() {
        assert_eq!(safe_relative("/"), Some(PathBuf::new()));
        assert_eq!(
            safe_relative("/assets/app.js"),
            Some(PathBuf::from("assets/app.js"))
        );
        assert_eq!(safe_relative("/a/./b"), Some(PathBuf::from("a/b")));
        for bad in [
            "/../etc/passwd",
            "/a/../../x",
            "/%2e%2e/etc/passwd",
            "/a%2f..%2f..%2fx",
            "/a\\..\\x",
            "/x%00y",
            "/.env",
            "/.git/config",
            "/sub/.hidden",
            "/%2eenv",
            "/a/..b",
        ] {
            assert_eq!(safe_relative(bad), None, "{bad}");
        }
    }

    async fn get(ui: &Ui, path: &str) -> (u16, String) {
        let req = Request::get(path)
            .body(ReqBody::from(http_body_util::Empty::<bytes::Bytes>::new()))
            .unwrap();
        match ui.serve(req).await {
            Ok(res) => {
                let status = res.status().as_u16();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
            Err(e) => (e.status().as_u16(), e.to_string()),
        }
    }

    #[tokio::test]
    async fn serves_a_directory_with_spa_fallback_and_no_traversal() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("dist");
        std::fs::create_dir_all(root.join("assets")).unwrap();
        std::fs::write(root.join("index.html"), "<html>app</html>").unwrap();
        std::fs::write(root.join("assets/app.js"), "console.log(1)").unwrap();
        std::fs::write(tmp.path().join("secret.txt"), "secret").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(tmp.path().join("secret.txt"), root.join("leak.txt")).unwrap();

        let ui = Ui::new(&UiConfig {
            dir: Some(root.clone()),
            enabled: true,
        });
        assert_eq!(get(&ui, "/").await, (200, "<html>app</html>".into()));
        assert_eq!(get(&ui, "/assets/app.js").await.1, "console.log(1)");
        assert_eq!(
            get(&ui, "/chat/123").await,
            (200, "<html>app</html>".into())
        );
        assert_eq!(get(&ui, "/assets/missing.js").await.0, 404);
        assert_eq!(get(&ui, "/../secret.txt").await.0, 404);
        assert_eq!(get(&ui, "/%2e%2e/secret.txt").await.0, 404);
        #[cfg(unix)]
        assert_eq!(get(&ui, "/leak.txt").await.0, 404);
    }

    #[tokio::test]
    async fn embedded_page_is_self_contained() {
        let ui = Ui::new(&UiConfig {
            dir: None,
            enabled: true,
        });
        let (status, body) = get(&ui, "/").await;
        assert_eq!(status, 200);
        assert!(body.contains("<title>"));
        // No external assets: nothing loaded from another origin.
        for needle in ["http://", "https://", "//cdn", "src=\"//"] {
            assert!(!body.contains(needle), "page references {needle}");
        }
        assert_eq!(get(&ui, "/other").await.0, 404);
    }
}
