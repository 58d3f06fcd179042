//! The server API under `/api/`: what an application's backend calls to push to its users and
//! to inspect or manage connections. Reference with examples: `docs/api.md`; schema:
//! `docs/openapi.yaml`.
//!
//! Every request carries `Authorization: Bearer <key>` with one of `api.keys`, compared in
//! constant time. Bodies are JSON; every refusal is a JSON `{"error", "field"}` naming the
//! field at fault. Handlers only validate and call [`Node`] methods, one file per resource:
//! - [`messages`]: publish to a room, send to users, broadcast;
//! - [`rooms`]: rooms with their member counts, a room's members;
//! - [`users`]: a user's online status and connections, disconnecting a user;
//! - [`connections`]: per-connection traffic statistics on this node.

pub mod connections;
pub mod history;
pub mod messages;
pub mod rooms;
pub mod users;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::body::HttpBody as _;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use herald_protocol::names::check_name;
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::HttpError;
use crate::engine::EngineError;
use crate::node::Node;

/// Checks the API key, then runs the handler and counts the request by endpoint and status.
pub async fn authenticate(State(node): State<Arc<Node>>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_owned();
    let response = match check_key(&node.config().api.keys, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            // As for an oversized body: a caller still sending reads its 401 (`discard_rest`).
            discard_rest(request.into_body()).await;
            let mut response = refusal.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    };
    metrics::counter!(
        "herald_api_requests_total",
        "endpoint" => endpoint,
        "status" => response.status().as_str().to_owned()
    )
    .increment(1);
    response
}

fn check_key(keys: &[String], headers: &http::HeaderMap) -> Result<(), HttpError> {
    if keys.is_empty() {
        return Err(HttpError::new(
            StatusCode::UNAUTHORIZED,
            "the server API is off: no api.keys are configured",
        ));
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, key) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        })
        .ok_or_else(|| {
            HttpError::field(
                StatusCode::UNAUTHORIZED,
                "Authorization",
                "missing header Authorization: Bearer <api key>",
            )
        })?;
    if !key_matches(keys, presented) {
        return Err(HttpError::field(
            StatusCode::UNAUTHORIZED,
            "Authorization",
            "invalid API key",
        ));
    }
    Ok(())
}

/// Compares the presented key with every configured one in constant time: digests first, so
/// neither the keys' lengths nor the position of the first differing byte shows in the timing,
/// and no early exit, so neither does which key matched.
fn key_matches(keys: &[String], presented: &str) -> bool {
    let presented = Sha256::digest(presented.as_bytes());
    keys.iter()
        .map(|key| Sha256::digest(key.as_bytes()).ct_eq(&presented))
        .fold(subtle::Choice::from(0), |any, this| any | this)
        .into()
}

/// The most of an oversized body's remainder read and dropped before its 413 goes out, and the
/// longest that may take (see [`discard_rest`]).
const DISCARD_LIMIT: u64 = 16 * 1024 * 1024;
const DISCARD_TIME: Duration = Duration::from_secs(5);

/// Reads and drops what is left of a body that will not be used (one over the limit, or a
/// refused caller's), so that the client reads the 413 or the 401.
/// Replying while the client still sends, then closing with its bytes unread, makes the kernel
/// reset the connection: the client's write fails with a broken pipe and the reply is lost
/// (web servers' "lingering close" does the same). A body declared larger than
/// [`DISCARD_LIMIT`], or one still arriving after [`DISCARD_TIME`], is not waited for.
async fn discard_rest(mut body: Body) {
    if body.size_hint().lower() > DISCARD_LIMIT {
        return;
    }
    let mut left = DISCARD_LIMIT;
    let _ = tokio::time::timeout(DISCARD_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            let read = frame.data_ref().map_or(0, |data| data.len() as u64);
            left = left.saturating_sub(read);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// A JSON body, read up to `api.max_body_bytes`; a type error names the field (`to[2]`).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<Node>> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(request: Request, node: &Arc<Node>) -> Result<Self, Self::Rejection> {
        let limit = node.config().api.max_body_bytes;
        let mut body: Body = request.into_body();
        let bytes = match Limited::new(&mut body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
                discard_rest(body).await;
                return Err(HttpError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is larger than api.max_body_bytes ({limit} bytes)"),
                ));
            }
            Err(_) => {
                return Err(HttpError::new(
                    StatusCode::BAD_REQUEST,
                    "the body could not be read",
                ));
            }
        };
        // An empty body reads as `null`: endpoints whose body is optional accept it.
        let text: &[u8] = match bytes.trim_ascii_start().first() {
            None => b"null",
            Some(b'{') => &bytes,
            Some(_) => {
                return Err(HttpError::new(
                    StatusCode::BAD_REQUEST,
                    "the body must be a JSON object",
                ));
            }
        };
        if text == b"null" && serde_json::from_slice::<T>(text).is_err() {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "the body is empty: a JSON object is expected",
            ));
        }
        let mut deserializer = serde_json::Deserializer::from_slice(text);
        let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
            let path = error.path().to_string();
            let inner = error.into_inner();
            if path == "." || inner.is_syntax() || inner.is_eof() {
                let message = format!("the body is not a valid JSON object: {inner}");
                match unknown_field(&inner.to_string()) {
                    Some(field) => HttpError::field(StatusCode::BAD_REQUEST, field, message),
                    None => HttpError::new(StatusCode::BAD_REQUEST, message),
                }
            } else {
                HttpError::field(
                    StatusCode::BAD_REQUEST,
                    &path,
                    format!("\"{path}\": {inner}"),
                )
            }
        })?;
        deserializer.end().map_err(|error| {
            HttpError::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not a valid JSON object: {error}"),
            )
        })?;
        Ok(ApiJson(value))
    }
}

/// serde reports an unexpected field as "unknown field `name`, expected …".
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// Path parameters, refused with a JSON error.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|rejection: PathRejection| {
                HttpError::new(StatusCode::BAD_REQUEST, rejection.body_text())
            })
    }
}

/// Query parameters, each checked by name so an error can name it.
pub struct ApiQuery(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for ApiQuery {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|Query(params)| ApiQuery(params))
            .map_err(|rejection: QueryRejection| {
                HttpError::new(StatusCode::BAD_REQUEST, rejection.body_text())
            })
    }
}

impl ApiQuery {
    /// Refuses parameters the endpoint does not know (a typo would otherwise be ignored).
    pub fn only(&self, known: &[&str]) -> Result<(), HttpError> {
        match self.0.keys().find(|name| !known.contains(&name.as_str())) {
            Some(name) => Err(HttpError::field(
                StatusCode::BAD_REQUEST,
                name.clone(),
                format!("unknown query parameter \"{name}\"; expected one of {known:?}"),
            )),
            None => Ok(()),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// The `limit` of a listing: 1 to [`MAX_LIST_LIMIT`], default [`DEFAULT_LIST_LIMIT`].
    pub fn limit(&self) -> Result<usize, HttpError> {
        let Some(text) = self.get("limit") else {
            return Ok(DEFAULT_LIST_LIMIT);
        };
        match text.parse::<usize>() {
            Ok(limit) if (1..=MAX_LIST_LIMIT).contains(&limit) => Ok(limit),
            _ => Err(HttpError::field(
                StatusCode::BAD_REQUEST,
                "limit",
                format!("\"limit\" must be a number from 1 to {MAX_LIST_LIMIT}"),
            )),
        }
    }
}

/// The field's value, or a 400 naming it.
pub fn required<T>(value: Option<T>, field: &str, expected: &str) -> Result<T, HttpError> {
    value.ok_or_else(|| {
        HttpError::field(
            StatusCode::BAD_REQUEST,
            field,
            format!("\"{field}\" is required ({expected})"),
        )
    })
}

/// A room name or user id that follows the protocol's rules, or a 400 naming the field.
pub fn valid_name(field: &str, name: &str) -> Result<(), HttpError> {
    check_name(name).map_err(|why| {
        HttpError::field(StatusCode::BAD_REQUEST, field, format!("\"{field}\" {why}"))
    })
}

/// An engine failure: logged in full, answered with a generic 503.
pub fn engine_failure(error: EngineError) -> HttpError {
    if error.limit_exceeded {
        return HttpError::new(StatusCode::TOO_MANY_REQUESTS, error.message);
    }
    tracing::error!(%error, "engine failure while serving an API request");
    HttpError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server could not complete the request; try again",
    )
}

/// The largest `limit` a listing accepts, and the default.
pub const MAX_LIST_LIMIT: usize = 10_000;
pub const DEFAULT_LIST_LIMIT: usize = 1000;

/// The answer for an `/api/` path that names no endpoint.
pub async fn no_such_endpoint() -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        "no such API endpoint (see docs/api.md)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_configured_key_matches() {
        let keys = vec![
            "first-key-0123456789".to_owned(),
            "second-key-0123456789".to_owned(),
        ];
        assert!(key_matches(&keys, "first-key-0123456789"));
        assert!(key_matches(&keys, "second-key-0123456789"));
        assert!(!key_matches(&keys, "second-key-012345678"));
        assert!(!key_matches(&keys, ""));
        assert!(!key_matches(&[], "first-key-0123456789"));
    }

    #[test]
    fn the_bearer_scheme_is_read_case_insensitively() {
        let keys = vec!["first-key-0123456789".to_owned()];
        let mut headers = http::HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer first-key-0123456789"),
        );
        assert!(check_key(&keys, &headers).is_ok());
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic first-key-0123456789"),
        );
        assert!(check_key(&keys, &headers).is_err());
    }
}
