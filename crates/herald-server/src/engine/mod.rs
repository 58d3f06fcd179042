//! Engines: the parts of Herald that span nodes, each a trait with swappable backends.
//!
//! - [`broker::Broker`]: fan-out of encoded frames to every node with interested connections.
//! - [`presence::Presence`]: who is in which room and who is online, across nodes.
//!
//! `memory/` holds the embedded single-process backends that `herald serve` uses by default;
//! `timed` wraps any backend to measure its calls.
//! A Redis backend (another issue) implements the same traits; the hub never sees an engine, so
//! adding one changes no routing code. A `Store` (history, offline inbox) joins them later.

pub mod broker;
pub mod memory;
pub mod presence;
pub mod timed;

/// An engine that could not do its job (a backend unreachable, a command refused).
#[derive(Debug, thiserror::Error)]
#[error("{engine} engine: {message}")]
pub struct EngineError {
    pub engine: &'static str,
    pub message: String,
}

impl EngineError {
    pub fn new(engine: &'static str, message: impl Into<String>) -> Self {
        EngineError {
            engine,
            message: message.into(),
        }
    }
}
