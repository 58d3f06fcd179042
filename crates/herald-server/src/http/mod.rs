//! The HTTP side of the single port: the router with the WebSocket upgrade and the health
//! endpoints. `app(node)` builds it without a socket, so tests can drive it directly.

mod error;
mod health;
mod upgrade;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

pub use error::HttpError;

use crate::node::Node;

pub fn app(node: Arc<Node>) -> Router {
    Router::new()
        .route("/ws", get(upgrade::websocket))
        .route("/ws/{room}", get(upgrade::websocket_in_room))
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .with_state(node)
}
