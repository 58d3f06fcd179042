//! `POST /api/publish`, `POST /api/send`, `POST /api/broadcast`: messages from the
//! application's backend. They go through the same node operations as a client's requests, so
//! recipients get the same `message` event, encoded once.
//!
//! `from` names the sender shown to recipients (default [`DEFAULT_SENDER`]); the backend holds
//! an API key, so it may speak for any user. As with any direct message, a copy of a `send`
//! also goes to the sender's own connections.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use herald_protocol::Payload;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{ApiJson, engine_failure, required, valid_name};
use crate::http::HttpError;
use crate::node::Node;

/// The sender of API messages that name none.
pub const DEFAULT_SENDER: &str = "server";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    room: Option<String>,
    content: Option<Box<RawValue>>,
    from: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    to: Option<Vec<String>>,
    content: Option<Box<RawValue>>,
    from: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastBody {
    content: Option<Box<RawValue>>,
    from: Option<String>,
}

#[derive(Serialize)]
pub struct Accepted {
    /// The message id recipients see.
    id: String,
}

#[derive(Serialize)]
pub struct Sent {
    id: String,
    /// Recipients with an open connection when the message was sent.
    online: Vec<String>,
    offline: Vec<String>,
}

pub async fn publish(
    State(node): State<Arc<Node>>,
    ApiJson(body): ApiJson<PublishBody>,
) -> Result<Json<Accepted>, HttpError> {
    let room = required(body.room, "room", "a room name")?;
    valid_name("room", &room)?;
    let content = content(&node, body.content)?;
    let from = sender(body.from)?;
    let published = node
        .publish(&from, None, &room.into(), content, true, true)
        .await
        .map_err(engine_failure)?;
    Ok(Json(Accepted { id: published.id }))
}

pub async fn send(
    State(node): State<Arc<Node>>,
    ApiJson(body): ApiJson<SendBody>,
) -> Result<Json<Sent>, HttpError> {
    let to = required(body.to, "to", "an array of user ids")?;
    if to.is_empty() {
        return Err(HttpError::field(
            StatusCode::BAD_REQUEST,
            "to",
            "\"to\" must name at least one user",
        ));
    }
    let max = node.config().api.max_recipients;
    if to.len() > max {
        return Err(HttpError::field(
            StatusCode::BAD_REQUEST,
            "to",
            format!(
                "\"to\" names {} users; the limit is {max} (api.max_recipients)",
                to.len()
            ),
        ));
    }
    for (index, user) in to.iter().enumerate() {
        valid_name(&format!("to[{index}]"), user)?;
    }
    let content = content(&node, body.content)?;
    let from = sender(body.from)?;
    let outcome = node
        .send_direct(&from, None, to, content)
        .await
        .map_err(engine_failure)?;
    Ok(Json(Sent {
        id: outcome.id,
        online: outcome.online,
        offline: outcome.offline,
    }))
}

pub async fn broadcast(
    State(node): State<Arc<Node>>,
    ApiJson(body): ApiJson<BroadcastBody>,
) -> Result<Json<Accepted>, HttpError> {
    let content = content(&node, body.content)?;
    let from = sender(body.from)?;
    let id = node
        .broadcast(&from, content)
        .await
        .map_err(engine_failure)?;
    Ok(Json(Accepted { id }))
}

/// The message content: any JSON value but `null`, within `limits.max_message_bytes` like a
/// client's message.
fn content(node: &Node, content: Option<Box<RawValue>>) -> Result<Payload, HttpError> {
    let content = required(content, "content", "any JSON value but null")?;
    let max = node.config().limits.max_message_bytes;
    if content.get().len() > max {
        return Err(HttpError::field(
            StatusCode::PAYLOAD_TOO_LARGE,
            "content",
            format!(
                "\"content\" is {} bytes; the limit is {max} (limits.max_message_bytes)",
                content.get().len()
            ),
        ));
    }
    Ok(Payload::Json(content))
}

fn sender(from: Option<String>) -> Result<Arc<str>, HttpError> {
    match from {
        Some(from) => {
            valid_name("from", &from)?;
            Ok(from.into())
        }
        None => Ok(DEFAULT_SENDER.into()),
    }
}
