//! `GET /api/connections` and `GET /api/connections/{id}`: traffic statistics of the
//! connections on every node (messages and bytes in and out, connected since, rooms), gathered
//! by asking each node (see [`crate::node::Connections`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use serde::Serialize;

use super::{ApiPath, ApiQuery, engine_failure, valid_name};
use crate::delivery::ConnId;
use crate::http::HttpError;
use crate::node::{ConnectionQuery, ConnectionStats, Node};

#[derive(Serialize)]
pub struct ConnectionList {
    /// The node that answered this request.
    node: String,
    /// Every node whose connections are listed.
    nodes: Vec<String>,
    /// Nodes that did not answer in time: their connections are missing from the list.
    unanswered: usize,
    connections: Vec<ConnectionStats>,
    /// Whether more connections matched than `limit`.
    truncated: bool,
}

pub async fn list(
    State(node): State<Arc<Node>>,
    query: ApiQuery,
) -> Result<Json<ConnectionList>, HttpError> {
    query.only(&["user", "limit"])?;
    let limit = query.limit()?;
    let user = query.get("user");
    if let Some(user) = user {
        valid_name("user", user)?;
    }
    let found = node
        .connections(&ConnectionQuery {
            user: user.map(str::to_string),
            id: None,
            limit,
        })
        .await
        .map_err(engine_failure)?;
    Ok(Json(ConnectionList {
        node: node.id().to_string(),
        nodes: found.nodes,
        unanswered: found.unanswered,
        connections: found.connections,
        truncated: found.truncated,
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
    let found = node
        .connections(&ConnectionQuery {
            user: None,
            id: Some(conn),
            limit: 1,
        })
        .await
        .map_err(engine_failure)?;
    if let Some(stats) = found.connections.into_iter().next() {
        return Ok(Json(stats));
    }
    if found.unanswered > 0 {
        return Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no connection {id} on the nodes that answered; {} did not answer in time: try again",
                found.unanswered
            ),
        ));
    }
    Err(HttpError::new(
        StatusCode::NOT_FOUND,
        format!("no connection {id} on any node"),
    ))
}
