//! Engines: the parts of Herald that span nodes or outlive the process, each a trait with
//! swappable backends.
//!
//! - [`broker::Broker`]: fan-out of encoded frames to every node with interested connections.
//! - [`presence::Presence`]: who is in which room and who is online, across nodes.
//! - [`store::Store`]: room history, offline inboxes and conversations, with offsets.
//!
//! `memory/` holds the embedded single-process broker and presence, `sqlite/` the embedded
//! store; `herald serve` uses them by default. `timed` wraps any backend to measure its calls.
//! `redis/` holds the engines that let many nodes act as one service; `wire` is the broker's
//! format between nodes. The hub never sees an engine, so adding one changes no routing code.

pub mod broker;
pub mod fanout;
pub mod memory;
pub mod presence;
pub mod redis;
pub mod sqlite;
pub mod store;
pub mod timed;
pub mod wire;

/// An engine that could not do its job (a backend unreachable, a command refused). Shown with
/// the backend's own words after the message (`presence engine: join: timed out`), so that a
/// log line says why.
#[derive(Debug, thiserror::Error)]
#[error("{engine} engine: {message}{}", because(.cause))]
pub struct EngineError {
    pub engine: &'static str,
    pub message: String,
    /// The request hit a limit the client can act on (a full inbox): `message` is meant for
    /// the client, and retrying as is will not help.
    pub limit_exceeded: bool,
    /// The backend may succeed if asked again later (a connection lost, a timeout): the client
    /// is told to retry rather than that its request is wrong.
    pub temporary: bool,
    /// What the backend said. Part of the text rather than a `source`, so that a chain
    /// printed whole (`{:#}` at startup) names it once.
    pub cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

fn because(cause: &Option<Box<dyn std::error::Error + Send + Sync>>) -> String {
    cause
        .as_ref()
        .map_or_else(String::new, |cause| format!(": {cause}"))
}

impl EngineError {
    pub fn new(engine: &'static str, message: impl Into<String>) -> Self {
        EngineError {
            engine,
            message: message.into(),
            limit_exceeded: false,
            temporary: false,
            cause: None,
        }
    }

    pub fn temporary(mut self) -> Self {
        self.temporary = true;
        self
    }

    /// A failed Redis command, temporary when the connection or a timeout caused it.
    pub fn from_redis(
        engine: &'static str,
        message: impl Into<String>,
        error: ::redis::RedisError,
    ) -> Self {
        let temporary = error.is_io_error()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_cluster_error();
        EngineError {
            temporary,
            cause: Some(Box::new(error)),
            ..EngineError::new(engine, message)
        }
    }
}

impl From<store::StoreError> for EngineError {
    fn from(error: store::StoreError) -> Self {
        let limit_exceeded = matches!(error, store::StoreError::InboxFull { .. });
        let temporary = matches!(error, store::StoreError::Unavailable { .. });
        EngineError {
            limit_exceeded,
            temporary,
            ..EngineError::new("store", error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_failure_is_shown_with_what_redis_said() {
        let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
        let error = EngineError::from_redis("presence", "join", ::redis::RedisError::from(timeout));
        assert!(error.temporary);
        assert!(
            error.to_string().starts_with("presence engine: join: ")
                && error.to_string().ends_with("timed out"),
            "{error}"
        );
        assert_eq!(
            EngineError::new("store", "closed").to_string(),
            "store engine: closed"
        );
    }
}
