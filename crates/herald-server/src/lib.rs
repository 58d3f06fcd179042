//! Herald: a real-time WebSocket messaging server.
//!
//! # Layout
//! - [`config`]: defaults < TOML file < `HERALD_*` environment < flags.
//! - [`auth`]: JWT verification at the handshake, token minting for `herald token`.
//! - [`server`]: the accept loop (plain or TLS) and graceful shutdown.
//! - [`tls`]: rustls acceptor whose certificate reloads on SIGHUP and on file change.
//! - [`http`]: the router: WebSocket upgrade (`/ws`, `/ws/{room}`), the server API (`/api/`),
//!   `/metrics`, `/health`, `/ready`, static files at `/`.
//! - [`transport`]: how a request becomes a WebSocket, with which limits.
//! - [`connection`]: one client: reader, session (requests), writer (bounded outbox, batching,
//!   heartbeat deadline), and the control block they share.
//! - [`node`]: every operation (send, publish, join, …) joining the hub to the engines;
//!   messages are encoded once here.
//! - [`hub`]: this node's connections by id, user and room; fans out shared bytes.
//! - [`engine`]: `Broker` and `Presence` traits with their in-memory backends, and timing
//!   decorators for any backend.
//! - [`delivery`]: the types that travel between them (encoded frames, channels, ids).
//! - [`telemetry`]: logging setup.
//! - [`metrics`]: the process-wide Prometheus recorder and the catalogue of metrics.

pub mod auth;
pub mod config;
pub mod connection;
pub mod delivery;
pub mod engine;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod transport;

use std::sync::Arc;

use crate::auth::{AuthSetupError, Authenticator};
use crate::config::Config;
use crate::engine::memory::{MemoryBroker, MemoryPresence};
use crate::node::Node;

/// Builds a node on the embedded in-memory engines.
pub fn embedded_node(
    config: Config,
    generated_secret: Option<&str>,
) -> Result<Arc<Node>, AuthSetupError> {
    let auth = Authenticator::from_config(&config.auth, generated_secret)?;
    Ok(Node::new(
        Arc::new(config),
        auth,
        Arc::new(MemoryBroker::new()),
        Arc::new(MemoryPresence::new()),
    ))
}
