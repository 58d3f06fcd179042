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
//! - [`deflate`]: outgoing permessage-deflate without context takeover, compressed once per
//!   message and window size and shared by its recipients.
//! - [`connection`]: one client: reader, session (requests), writer (batching, heartbeat
//!   deadline).
//! - [`node`]: every operation (send, publish, join, history, …) joining the hub to the
//!   engines; messages are encoded once here, stored ones after their commit.
//! - [`presence_window`]: room joins and leaves gathered per window into one
//!   `presence_diff` per room.
//! - [`hub`]: this node's connections by id, user and room; fans out shared bytes into each
//!   connection's bounded outbox; the control block a connection's reader, writer and the hub
//!   share; catch-up (replaying stored messages to one connection, inbox at connect and `join`
//!   with `since`, with no gap and no duplicate at the seam with live ones).
//! - [`idempotency`]: request ids of recent stored messages, so a retry is answered, not
//!   stored twice.
//! - [`engine`]: `Broker`, `Presence` and `Store` traits with their embedded backends
//!   (in-memory broker and presence, SQLite store), and timing decorators for any backend.
//! - [`delivery`]: the types that travel between them (encoded frames, channels, ids).
//! - [`telemetry`]: logging setup.
//! - [`metrics`]: the process-wide Prometheus recorder and the catalogue of metrics.

pub mod auth;
pub mod config;
pub mod connection;
pub mod deflate;
pub mod delivery;
pub mod engine;
pub mod http;
pub mod hub;
pub mod idempotency;
pub mod metrics;
pub mod node;
pub mod presence_window;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod transport;

use std::sync::Arc;

use crate::auth::{AuthSetupError, Authenticator};
use crate::config::{Config, EngineBackend};
use crate::engine::EngineError;
use crate::engine::broker::Broker;
use crate::engine::memory::{MemoryBroker, MemoryPresence};
use crate::engine::redis::broker::RedisBroker;
use crate::engine::redis::presence::RedisPresence;
use crate::engine::redis::store::RedisStore;
use crate::engine::sqlite::SqliteStore;
use crate::engine::store::StoreError;
use crate::engine::timed::TimedBroker;
use crate::node::Node;

/// Why a node could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Builds a node on the engines `engine.backend` names. Must run inside a tokio runtime.
pub async fn build_node(
    mut config: Config,
    generated_secret: Option<&str>,
) -> Result<Arc<Node>, SetupError> {
    match config.engine.backend {
        EngineBackend::Embedded => embedded_node(config, generated_secret),
        EngineBackend::Redis => {
            let auth = Authenticator::from_config(&config.auth, generated_secret)?;
            // Presence entries are owned by the node: its id must be known before the node is.
            if config.server.node_id.is_empty() {
                config.server.node_id = node::random_id();
            }
            let broker: Arc<dyn Broker> = Arc::new(TimedBroker(Arc::new(
                RedisBroker::connect(&config.redis).await?,
            )));
            let presence = RedisPresence::connect(&config.server.node_id, &config.redis).await?;
            let store = RedisStore::open(&config.redis, config.store.limits()).await?;
            Ok(Node::new(
                Arc::new(config),
                auth,
                broker,
                Arc::new(presence),
                Arc::new(store),
            ))
        }
    }
}

/// Builds a node on the embedded engines: in-memory broker and presence, and the SQLite store
/// in `store.path`. Must run inside a tokio runtime (the node starts its background tasks).
pub fn embedded_node(
    config: Config,
    generated_secret: Option<&str>,
) -> Result<Arc<Node>, SetupError> {
    let auth = Authenticator::from_config(&config.auth, generated_secret)?;
    let broker: Arc<dyn Broker> = Arc::new(TimedBroker(Arc::new(MemoryBroker::new())));
    let store = SqliteStore::open(
        &config.store.path,
        config.store.durability(),
        config.store.limits(),
        broker.clone(),
    )?;
    Ok(Node::new(
        Arc::new(config),
        auth,
        broker,
        Arc::new(MemoryPresence::new()),
        Arc::new(store),
    ))
}
