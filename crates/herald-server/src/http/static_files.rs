//! Static files at `/` from `static.dir` (default `web/`, where the browser chat page lives),
//! with content types from the file extension and `Last-Modified`/`If-Modified-Since`.
//!
//! tower-http's `ServeDir` does the serving and refuses any path that is not a plain relative
//! one after percent-decoding (`..`, `%2e%2e`, absolute paths, drive prefixes), so nothing
//! outside the folder is reachable. Caching: HTML is always `no-cache` (a new page picks up new
//! assets at once); other files get `public, max-age=<static.max_age>`, or `no-cache` when it
//! is zero. A missing folder serves 404s, not an error: the server starts without it.

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
    Some(
        Router::new()
            .fallback_service(files)
            .layer(axum::middleware::from_fn_with_state(
                asset_policy,
                read_only_with_cache_policy,
            )),
    )
}

/// Files are only read: any other method is a plain 404, as on a path no route serves, rather
/// than ServeDir's 405. Successful reads (and 304s) get their `Cache-Control`, decided from
/// the path rather than the response, so a 304 carries the same policy as the 200.
async fn read_only_with_cache_policy(
    State(asset_policy): State<HeaderValue>,
    request: Request,
    next: Next,
) -> Response {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let path = request.uri().path();
    let is_page = path.ends_with('/') || path.ends_with(".html") || path.ends_with(".htm");
    let policy = if is_page {
        HeaderValue::from_static("no-cache")
    } else {
        asset_policy
    };
    let mut response = next.run(request).await;
    let status = response.status();
    if status.is_success() || status == StatusCode::NOT_MODIFIED {
        response.headers_mut().insert(header::CACHE_CONTROL, policy);
    }
    response
}
