//! Engines: the parts of Herald that span nodes or outlive the process, each a trait with
//! swappable backends.
//!
//! - [`broker::Broker`]: fan-out of encoded frames to every node with interested connections.
//! - [`presence::Presence`]: who is in which room and who is online, across nodes.
//! - [`store::Store`]: room history, offline inboxes and conversations, with offsets.
//!
//! `memory/` holds the embedded single-process broker and presence, `sqlite/` the embedded
//! store; `herald serve` uses them by default. `timed` wraps any backend to measure its calls.
//! A Redis backend (another issue) implements the same traits; the hub never sees an engine, so
//! adding one changes no routing code.

pub mod broker;
pub mod memory;
pub mod presence;
pub mod sqlite;
pub mod store;
pub mod timed;

/// An engine that could not do its job (a backend unreachable, a command refused).
#[derive(Debug, thiserror::Error)]
#[error("{engine} engine: {message}")]
pub struct EngineError {
    pub engine: &'static str,
    pub message: String,
    /// The request hit a limit the client can act on (a full inbox): `message` is meant for
    /// the client, and retrying as is will not help.
    pub limit_exceeded: bool,
}

impl EngineError {
    pub fn new(engine: &'static str, message: impl Into<String>) -> Self {
        EngineError {
            engine,
            message: message.into(),
            limit_exceeded: false,
        }
    }
}

impl From<store::StoreError> for EngineError {
    fn from(error: store::StoreError) -> Self {
        let limit_exceeded = matches!(error, store::StoreError::InboxFull { .. });
        EngineError {
            limit_exceeded,
            ..EngineError::new("store", error.to_string())
        }
    }
}
