//! Static files at `/` from `static.dir` (default `web/`, where the browser chat page lives),
//! with content types from the file extension and `Last-Modified`/`If-Modified-Since`.
//!
//! tower-http's `ServeDir` does the serving and refuses any path that is not a plain relative
//! one after percent-decoding (`..`, `%2e%2e`, absolute paths, drive prefixes). It does serve
//! dotfiles (`.env`, `.git/config`) and follows symbolic links wherever they point, so a guard
//! runs first: a path with a segment starting with `.` is a 404, and so is one whose real
//! location (links resolved) is outside the folder. Caching: HTML is always `no-cache` (a new page picks up new
//! assets at once); other files get `public, max-age=<static.max_age>`, or `no-cache` when it
//! is zero. A missing folder serves 404s, not an error: the server starts without it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode, header};
use tower_http::services::ServeDir;

use crate::config::StaticConfig;

/// The router serving the folder, or `None` when static files are off.
pub fn service<S: Clone + Send + Sync + 'static>(config: &StaticConfig) -> Option<Router<S>> {
    if !config.enabled {
        return None;
    }
    if !config.dir.is_dir() {
        tracing::info!(
            dir = %config.dir.display(),
            "static.dir is not a folder: no static files are served"
        );
    }
    let asset_policy = if config.max_age.is_zero() {
        HeaderValue::from_static("no-cache")
    } else {
        HeaderValue::try_from(format!("public, max-age={}", config.max_age.as_secs()))
            .unwrap_or(HeaderValue::from_static("no-cache"))
    };
    let files = ServeDir::new(&config.dir).append_index_html_on_directories(true);
    // Resolved once; a folder created after start is compared by the name it was given.
    let root = config
        .dir
        .canonicalize()
        .unwrap_or_else(|_| config.dir.clone());
    let served = Served {
        asset_policy,
        root: Arc::from(root),
    };
    Some(
        Router::new()
            .fallback_service(files)
            .layer(axum::middleware::from_fn_with_state(
                served,
                read_only_with_cache_policy,
            )),
    )
}

#[derive(Clone)]
struct Served {
    asset_policy: HeaderValue,
    /// The folder, with its own links resolved.
    root: Arc<Path>,
}

/// Whether the request path names a hidden file or folder (a segment starting with `.`, which
/// covers `.` and `..`), once percent-decoded, or resolves through a link to a place outside
/// the folder.
fn hidden_or_outside(root: &Path, request_path: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(request_path).decode_utf8_lossy();
    let mut path = PathBuf::from(root);
    for segment in decoded.split(['/', '\\']).filter(|s| !s.is_empty()) {
        if segment.starts_with('.') {
            return true;
        }
        path.push(segment);
    }
    // A path that does not exist is ServeDir's 404 to give.
    path.canonicalize()
        .is_ok_and(|real| !real.starts_with(root))
}

/// Files are only read: any other method is a plain 404, as on a path no route serves, rather
/// than ServeDir's 405; hidden files and links out of the folder are 404s too. Successful reads (and 304s) get their `Cache-Control`, decided from
/// the path rather than the response, so a 304 carries the same policy as the 200.
async fn read_only_with_cache_policy(
    State(served): State<Served>,
    request: Request,
    next: Next,
) -> Response {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let path = request.uri().path();
    if hidden_or_outside(&served.root, path) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let is_page = path.ends_with('/') || path.ends_with(".html") || path.ends_with(".htm");
    let policy = if is_page {
        HeaderValue::from_static("no-cache")
    } else {
        served.asset_policy
    };
    let mut response = next.run(request).await;
    let status = response.status();
    if status.is_success() || status == StatusCode::NOT_MODIFIED {
        response.headers_mut().insert(header::CACHE_CONTROL, policy);
    }
    response
}
