//! `[limits]`: what one connection, one user and this node may use, and how long a retried
//! message is recognised.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, duration, list, positive};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest message a client may send (after reassembly of fragments); larger closes 1009.
    pub max_message_bytes: usize,
    /// Sustained messages per second per connection (token bucket refill rate).
    pub messages_per_second: u32,
    /// Messages a connection may send in a burst above the sustained rate.
    pub burst: u32,
    /// Rate-limited frames in a row after which the connection is closed with 1008.
    pub abuse_threshold: u32,
    /// Rooms one connection may be in at once.
    pub max_rooms_per_connection: usize,
    /// Open connections one user may hold.
    pub max_connections_per_user: usize,
    /// Open WebSocket connections on this node.
    pub max_connections: usize,
    /// Recipients of one direct message.
    pub max_recipients: usize,
    /// Messages queued for one connection before it is cut off as a slow consumer.
    pub send_queue: usize,
    /// Bytes queued or being written for one connection before it is cut off as a slow
    /// consumer; a reply larger than this (a page of history) is refused with
    /// `limit_exceeded`.
    pub send_queue_bytes: usize,
    /// How long a write to a connection may go without the socket taking a byte before the
    /// connection is cut off as a slow consumer.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// Origins allowed to open WebSockets besides the server's own; `*` allows any.
    #[serde(deserialize_with = "list")]
    pub allowed_origins: Vec<String>,
    /// Connections still waiting for their `auth` message, on this node.
    pub max_pending_auth: usize,
    /// Connections waiting for their `auth` message from one client address (an IPv6 /64).
    pub max_pending_auth_per_ip: usize,
    /// How long the `id` of a stored `publish` or `send` is remembered, so that a retry with
    /// the same `id` and request gets the first one's ack instead of storing it again. `0s`
    /// turns this off.
    #[serde(with = "duration")]
    pub idempotency_window: Duration,
    /// Most ids remembered per user within the window; the oldest is forgotten first.
    pub idempotency_keys_per_user: usize,
}

/// The longest `limits.idempotency_window`: a retry comes within minutes, and the Redis
/// store's per-stream memory of message ids (which completes a retried direct message) lasts a
/// day.
pub const MAX_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: 64 * 1024,
            messages_per_second: 50,
            burst: 100,
            abuse_threshold: 100,
            max_rooms_per_connection: 100,
            max_connections_per_user: 32,
            max_connections: 100_000,
            max_recipients: 100,
            send_queue: 1024,
            send_queue_bytes: 8 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            allowed_origins: Vec::new(),
            max_pending_auth: 10_000,
            max_pending_auth_per_ip: 100,
            idempotency_window: Duration::from_secs(120),
            idempotency_keys_per_user: 256,
        }
    }
}

impl LimitsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive("limits.max_message_bytes", self.max_message_bytes)?;
        positive(
            "limits.messages_per_second",
            self.messages_per_second as usize,
        )?;
        positive("limits.burst", self.burst as usize)?;
        positive("limits.abuse_threshold", self.abuse_threshold as usize)?;
        positive(
            "limits.max_rooms_per_connection",
            self.max_rooms_per_connection,
        )?;
        positive(
            "limits.max_connections_per_user",
            self.max_connections_per_user,
        )?;
        positive("limits.max_connections", self.max_connections)?;
        positive("limits.max_recipients", self.max_recipients)?;
        positive("limits.send_queue", self.send_queue)?;
        if self.send_queue_bytes < self.max_message_bytes {
            return Err(ConfigError::Key {
                key: "limits.send_queue_bytes",
                reason: "must be at least limits.max_message_bytes".into(),
            });
        }
        if self.write_timeout.is_zero() {
            return Err(ConfigError::Key {
                key: "limits.write_timeout",
                reason: "must be greater than zero".into(),
            });
        }
        positive("limits.max_pending_auth", self.max_pending_auth)?;
        positive(
            "limits.max_pending_auth_per_ip",
            self.max_pending_auth_per_ip,
        )?;
        positive(
            "limits.idempotency_keys_per_user",
            self.idempotency_keys_per_user,
        )?;
        if self.idempotency_window > MAX_IDEMPOTENCY_WINDOW {
            return Err(ConfigError::Key {
                key: "limits.idempotency_window",
                reason: "must be at most 24h".into(),
            });
        }
        Ok(())
    }
}
