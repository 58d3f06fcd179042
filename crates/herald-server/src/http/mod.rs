//! The HTTP side of the single port: the router with the WebSocket upgrade, the health
//! endpoints, the JavaScript client at `/herald.js` and, in development, `/dev/token`. `app(node)` builds it without a socket, so tests can drive it directly.

mod dev;
mod error;
mod health;
mod upgrade;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

pub use error::HttpError;

use crate::node::Node;

pub fn app(node: Arc<Node>) -> Router {
    let mut router = Router::new()
        .route("/ws", get(upgrade::websocket))
        .route("/ws/{room}", get(upgrade::websocket_in_room))
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/herald.js", get(dev::client_library));
    // Absent, not refused, when off: nothing about it shows in production.
    if node.config.auth.dev_login {
        router = router.route("/dev/token", post(dev::token));
    }
    router.with_state(node)
}
