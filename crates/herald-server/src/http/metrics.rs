//! `GET /metrics`: every Herald metric in the Prometheus text format (catalogue in
//! `docs/api.md#metrics`). 404 when `metrics.enabled` is off.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::HttpError;
use crate::node::Node;

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn metrics(State(node): State<Arc<Node>>) -> Response {
    if !node.config().metrics.enabled {
        return HttpError::new(
            StatusCode::NOT_FOUND,
            "metrics are off on this server (metrics.enabled)",
        )
        .into_response();
    }
    // Read at scrape time: the runtime counts its tasks anyway, so this costs nothing between
    // scrapes.
    metrics::gauge!("herald_runtime_alive_tasks").set(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks() as f64,
    );
    let mut response = crate::metrics::render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROMETHEUS_TEXT),
    );
    response
}
