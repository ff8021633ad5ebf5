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
//! Files are read whole: front-end bundles are small, and this is not a general file server.

use std::path::{Component, Path, PathBuf};

use http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::body::Body;
use crate::config::UiConfig;
use crate::error::Error;

/// The reference chat page.
const INDEX_HTML: &str = include_str!("../ui/index.html");

/// Everything inline, nothing external: the page talks only to this origin.
const PAGE_CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub struct Ui {
    /// Canonical root of a configured front end.
    dir: Option<PathBuf>,
}

impl Ui {
    pub fn new(config: &UiConfig) -> Self {
        let dir = config.dir.as_ref().map(|d| match d.canonicalize() {
            Ok(c) => c,
            Err(e) => {
                // Keep the configured path: every request then answers 404 and the start-up
                // log says why.
                tracing::error!(dir = %d.display(), error = %e, "ui.dir cannot be opened");
                d.clone()
            }
        });
        Self { dir }
    }

    pub async fn serve(&self, method: &Method, path: &str) -> Result<Response<Body>, Error> {
        let head = *method == Method::HEAD;
        match &self.dir {
            None => match path {
                "/" | "/index.html" => Ok(page(
                    INDEX_HTML.as_bytes().to_vec(),
                    "text/html; charset=utf-8",
                    head,
                    true,
                )),
                _ => Err(not_found(path)),
            },
            Some(root) => serve_dir(root, path, head).await,
        }
    }
}

fn not_found(path: &str) -> Error {
    Error::NotFound(format!("no route for {}", crate::text::echo(path)))
}

async fn serve_dir(root: &Path, path: &str, head: bool) -> Result<Response<Body>, Error> {
    let Some(rel) = safe_relative(path) else {
        return Err(not_found(path));
    };
    let candidate = if rel.as_os_str().is_empty() {
        root.join("index.html")
    } else {
        root.join(&rel)
    };
    if let Some(file) = resolve(root, &candidate).await {
        return read(&file, head).await;
    }
    // A client-side route (no extension) falls back to the app's index.
    if rel.extension().is_none() {
        if let Some(index) = resolve(root, &root.join("index.html")).await {
            return read(&index, head).await;
        }
    }
    Err(not_found(path))
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

/// The canonical file if it exists, is a regular file, and is inside `root` without passing
/// through a dot-directory or being a dotfile (a symlink to `.env` is refused too).
async fn resolve(root: &Path, candidate: &Path) -> Option<PathBuf> {
    let real = tokio::fs::canonicalize(candidate).await.ok()?;
    let inside = real.strip_prefix(root).ok()?;
    if inside.components().any(|c| match c {
        Component::Normal(n) => hidden(n),
        _ => true,
    }) {
        return None;
    }
    let meta = tokio::fs::metadata(&real).await.ok()?;
    meta.is_file().then_some(real)
}

async fn read(file: &Path, head: bool) -> Result<Response<Body>, Error> {
    let bytes = tokio::fs::read(file)
        .await
        .map_err(|e| Error::Internal(format!("cannot read {}: {e}", file.display())))?;
    let mime = mime_guess::from_path(file).first_or_octet_stream();
    let is_html = mime.essence_str() == "text/html";
    Ok(page(bytes, mime.as_ref(), head, is_html))
}

fn page(bytes: Vec<u8>, content_type: &str, head: bool, is_html: bool) -> Response<Body> {
    let len = bytes.len();
    let mut res = Response::new(if head { Body::Empty } else { Body::full(bytes) });
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(CONTENT_TYPE, v);
    }
    if head {
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if is_html {
        // HTML names the assets; it must be revalidated so that a new build takes effect.
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
    res
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
        match ui.serve(&Method::GET, path).await {
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
