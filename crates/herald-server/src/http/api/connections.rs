//! `GET /api/connections` and `GET /api/connections/{id}`: traffic statistics of the
//! connections on the node that answers (messages and bytes in and out, connected since,
//! rooms). Counters cover data frames only; bytes are payload bytes.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use serde::Serialize;

use super::{ApiPath, ApiQuery, valid_name};
use crate::delivery::ConnId;
use crate::http::HttpError;
use crate::hub::ConnHandle;
use crate::node::Node;

#[derive(Serialize)]
pub struct ConnectionList {
    node: String,
    connections: Vec<ConnectionStats>,
    /// Whether more connections matched than `limit`.
    truncated: bool,
}

#[derive(Serialize)]
pub struct ConnectionStats {
    id: String,
    user: String,
    node: String,
    /// The client's IP address (behind trusted proxies, the one they name).
    addr: String,
    /// Unix milliseconds.
    connected_at: u64,
    messages_in: u64,
    bytes_in: u64,
    messages_out: u64,
    bytes_out: u64,
    rooms: Vec<String>,
}

pub async fn list(
    State(node): State<Arc<Node>>,
    query: ApiQuery,
) -> Result<Json<ConnectionList>, HttpError> {
    query.only(&["user", "limit"])?;
    let limit = query.limit()?;
    // `user`: only this user's connections.
    let mut handles = match query.get("user") {
        Some(user) => {
            valid_name("user", user)?;
            node.hub().user_connections(user)
        }
        None => node.hub().snapshot(),
    };
    handles.sort_unstable_by_key(ConnHandle::id);
    let truncated = handles.len() > limit;
    handles.truncate(limit);
    let mut rooms = node.hub().rooms_by_connection();
    let connections = handles
        .iter()
        .map(|handle| {
            let rooms = rooms.remove(&handle.id()).unwrap_or_default();
            stats(&node, handle, rooms)
        })
        .collect();
    Ok(Json(ConnectionList {
        node: node.id().to_string(),
        connections,
        truncated,
    }))
}

pub async fn one(
    State(node): State<Arc<Node>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ConnectionStats>, HttpError> {
    let conn: ConnId = id.parse().map_err(|_| {
        HttpError::field(
            StatusCode::BAD_REQUEST,
            "id",
            "\"id\" must be a connection id (16 hex digits, as in the welcome frame)",
        )
    })?;
    let handle = node.hub().connection(conn).ok_or_else(|| {
        HttpError::new(
            StatusCode::NOT_FOUND,
            format!("no connection {id} on this node ({})", node.id()),
        )
    })?;
    let rooms = node.hub().rooms_of(conn);
    Ok(Json(stats(&node, &handle, rooms)))
}

fn stats(node: &Node, handle: &ConnHandle, rooms: Vec<Arc<str>>) -> ConnectionStats {
    let snapshot = handle.stats().snapshot();
    ConnectionStats {
        id: handle.id().to_string(),
        user: handle.user().to_string(),
        node: node.id().to_string(),
        addr: handle.addr().to_string(),
        connected_at: snapshot
            .connected_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64),
        messages_in: snapshot.messages_in,
        bytes_in: snapshot.bytes_in,
        messages_out: snapshot.messages_out,
        bytes_out: snapshot.bytes_out,
        rooms: rooms.iter().map(|room| room.to_string()).collect(),
    }
}
