//! `GET /api/users/{user}`: whether a user is online and with which connections (all nodes).
//! `POST /api/users/{user}/disconnect`: close every connection of a user, on every node, with a
//! close code and reason.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use herald_protocol::CloseCode;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ApiJson, ApiPath, engine_failure, valid_name};
use crate::http::HttpError;
use crate::node::Node;

/// Close codes the API may send: the application range of RFC 6455, whose groups
/// `docs/protocol.md` assigns meanings (4000–4099 reconnect, 4100–4199 new token, 4400–4499
/// do not reconnect).
const APPLICATION_CODES: std::ops::RangeInclusive<u16> = 4000..=4999;

/// A Close frame's payload is at most 125 bytes, two of them the code.
const MAX_REASON_BYTES: usize = 123;

#[derive(Serialize)]
pub struct UserStatus {
    user: String,
    online: bool,
    /// Ids of the user's open connections, on every node.
    connections: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DisconnectBody {
    code: Option<u16>,
    reason: Option<String>,
}

#[derive(Serialize)]
pub struct Disconnected {
    user: String,
    /// Connections the user had when the request was made.
    connections: usize,
    code: u16,
    reason: String,
}

pub async fn status(
    State(node): State<Arc<Node>>,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<UserStatus>, HttpError> {
    valid_name("user", &user)?;
    let connections: Vec<String> = node
        .user_connections(&user)
        .await
        .map_err(engine_failure)?
        .into_iter()
        .map(|id| id.to_string())
        .collect();
    Ok(Json(UserStatus {
        user,
        online: !connections.is_empty(),
        connections,
    }))
}

pub async fn disconnect(
    State(node): State<Arc<Node>>,
    ApiPath(user): ApiPath<String>,
    ApiJson(body): ApiJson<Option<DisconnectBody>>,
) -> Result<Json<Disconnected>, HttpError> {
    valid_name("user", &user)?;
    let body = body.unwrap_or_default();
    let code = body.code.unwrap_or(CloseCode::KICKED.code);
    if !APPLICATION_CODES.contains(&code) {
        return Err(HttpError::field(
            StatusCode::BAD_REQUEST,
            "code",
            "\"code\" must be an application close code, 4000 to 4999",
        ));
    }
    let reason = body
        .reason
        .unwrap_or_else(|| CloseCode::KICKED.reason.to_owned());
    if reason.len() > MAX_REASON_BYTES {
        return Err(HttpError::field(
            StatusCode::BAD_REQUEST,
            "reason",
            format!("\"reason\" is longer than {MAX_REASON_BYTES} bytes (the Close frame limit)"),
        ));
    }
    let connections = node
        .disconnect_user(&user, code, &reason)
        .await
        .map_err(engine_failure)?;
    Ok(Json(Disconnected {
        user,
        connections,
        code,
        reason,
    }))
}
