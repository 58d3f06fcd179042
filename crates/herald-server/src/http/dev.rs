//! Conveniences for browsers: the JavaScript client served by the server itself (so a page
//! always gets the client matching this server's protocol), and the development sign-in.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::IntoResponse;
use http::{StatusCode, header};
use serde::Deserialize;

use super::HttpError;
use crate::node::Node;
use herald_protocol::names::check_name;

/// The JavaScript client, compiled into the binary.
const CLIENT_LIBRARY: &str = include_str!("../../../../clients/js/herald.js");

/// Lifetime of a development token; the page asks for a new one on each refresh notice.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(3600);

pub async fn client_library() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            // Revalidate on every load: the file changes with the server.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT_LIBRARY,
    )
}

#[derive(Deserialize)]
pub struct DevTokenRequest {
    user: String,
}

/// `POST /dev/token {"user": NAME}` → `{"token": JWT}`; routed only with `auth.dev_login`.
pub async fn token(
    State(node): State<Arc<Node>>,
    body: Result<Json<DevTokenRequest>, JsonRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Json(request) = body.map_err(|rejection| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"user\": NAME}}: {}", rejection.body_text()),
        )
    })?;
    check_name(&request.user)
        .map_err(|why| HttpError::new(StatusCode::BAD_REQUEST, format!("\"user\" {why}")))?;
    let token = node
        .auth()
        .mint(&request.user, false, None, DEV_TOKEN_TTL)
        .map_err(|error| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    tracing::info!(user = %request.user, "development token issued");
    Ok(Json(serde_json::json!({ "token": token })))
}
