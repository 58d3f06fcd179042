//! `GET /api/rooms`: rooms with users in them and their counts, across all nodes.
//! `GET /api/rooms/{room}/members`: the users in one room.
//! A room's history is `GET /api/rooms/{room}/history`, in `history.rs`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::{ApiPath, ApiQuery, engine_failure, valid_name};
use crate::http::HttpError;
use crate::node::Node;

#[derive(Serialize)]
pub struct RoomList {
    rooms: Vec<RoomEntry>,
    /// Whether more rooms matched than `limit`.
    truncated: bool,
}

#[derive(Serialize)]
pub struct RoomEntry {
    room: String,
    /// Users in the room (a user with several connections counts once).
    count: u64,
}

#[derive(Serialize)]
pub struct Members {
    room: String,
    count: u64,
    users: Vec<String>,
}

pub async fn list(
    State(node): State<Arc<Node>>,
    query: ApiQuery,
) -> Result<Json<RoomList>, HttpError> {
    query.only(&["prefix", "limit"])?;
    let limit = query.limit()?;
    // Only rooms whose name starts with this.
    let prefix = query.get("prefix").unwrap_or_default();
    let mut rooms: Vec<RoomEntry> = node
        .rooms()
        .await
        .map_err(engine_failure)?
        .into_iter()
        .filter(|room| room.room.starts_with(prefix))
        .map(|room| RoomEntry {
            room: room.room,
            count: room.users,
        })
        .collect();
    let truncated = rooms.len() > limit;
    rooms.truncate(limit);
    Ok(Json(RoomList { rooms, truncated }))
}

pub async fn members(
    State(node): State<Arc<Node>>,
    ApiPath(room): ApiPath<String>,
) -> Result<Json<Members>, HttpError> {
    valid_name("room", &room)?;
    let users = node.members(&room).await.map_err(engine_failure)?;
    Ok(Json(Members {
        room,
        count: users.len() as u64,
        users,
    }))
}
