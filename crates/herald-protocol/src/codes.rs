//! Stable, documented codes: the `code` of an `error` frame and the WebSocket close codes.
//!
//! Close codes are grouped so that a client knows what to do without parsing the reason:
//! - 1000–1011 are RFC 6455's own;
//! - 4000–4099: transient, reconnect with backoff (same token);
//! - 4100–4199: authentication, fetch a fresh token before reconnecting;
//! - 4400–4499: final, do not reconnect automatically.

use serde::{Deserialize, Serialize};

/// Machine-readable reason in an `error` frame. The connection stays open after every one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON (or not a JSON object).
    InvalidJson,
    /// `type` is missing or names no request the server knows.
    UnknownType,
    /// A field is missing, has the wrong type, or an invalid value; the message names it.
    InvalidField,
    /// The request needs membership of a room the connection has not joined.
    NotMember,
    /// The token does not allow this (room outside the `rooms` claim, broadcast without admin).
    Forbidden,
    /// The per-connection message rate was exceeded; the request was dropped.
    RateLimited,
    /// A configured limit was reached (rooms per connection, recipients per message).
    LimitExceeded,
    /// A request other than `auth` arrived before the connection authenticated.
    Unauthenticated,
    /// The server failed to carry out a valid request (an engine was unreachable).
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::NotMember => "not_member",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A WebSocket close code with the reason text Herald sends with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode {
    pub code: u16,
    pub reason: &'static str,
}

impl CloseCode {
    /// Server shutting down or restarting: reconnect, possibly to another node.
    pub const GOING_AWAY: CloseCode = CloseCode::new(1001, "server shutting down, reconnect");
    /// Sustained abuse (floods past the rate limit).
    pub const POLICY_VIOLATION: CloseCode = CloseCode::new(1008, "policy violation");
    /// A frame or message over `limits.max_message_bytes`.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode::new(1009, "message too big");
    /// An unexpected server error.
    pub const INTERNAL_ERROR: CloseCode = CloseCode::new(1011, "internal error");
    /// The node lost its connection to the broker for a while (a networked engine), so live
    /// messages may have been missed: reconnect, and recover them with `since` and the inbox.
    pub const SERVICE_RESTART: CloseCode =
        CloseCode::new(1012, "fan-out was interrupted, reconnect to recover");
    /// A connection limit was reached after the upgrade (a race with another connection of the
    /// same user, or a full node): reconnect later.
    pub const TRY_AGAIN_LATER: CloseCode =
        CloseCode::new(1013, "connection limit reached, try again later");
    /// No frame (not even a Pong) within two heartbeat intervals.
    pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode::new(4000, "heartbeat timeout");
    /// The connection did not drain its bounded send queue fast enough.
    pub const SLOW_CONSUMER: CloseCode = CloseCode::new(4001, "slow consumer");
    /// The token expired and was not refreshed in time.
    pub const TOKEN_EXPIRED: CloseCode = CloseCode::new(4100, "token expired");
    /// No valid `auth` message arrived within `auth.timeout`.
    pub const AUTH_TIMEOUT: CloseCode = CloseCode::new(4101, "authentication timeout");
    /// Too many invalid `auth` messages.
    pub const AUTH_FAILED: CloseCode = CloseCode::new(4102, "authentication failed");
    /// Disconnected on purpose by the application (server API).
    pub const KICKED: CloseCode = CloseCode::new(4400, "disconnected by the server");

    pub const fn new(code: u16, reason: &'static str) -> Self {
        CloseCode { code, reason }
    }

    /// Whether a client should reconnect automatically after this close. A policy violation
    /// (1008) is not retried: the same client would be closed again.
    pub fn should_reconnect(self) -> bool {
        !(4400..4500).contains(&self.code) && self.code != 1008
    }

    /// Whether a client needs a fresh token before reconnecting.
    pub fn needs_new_token(self) -> bool {
        (4100..4200).contains(&self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_serialize_as_their_documented_names() {
        for code in [
            ErrorCode::InvalidJson,
            ErrorCode::UnknownType,
            ErrorCode::InvalidField,
            ErrorCode::NotMember,
            ErrorCode::Forbidden,
            ErrorCode::RateLimited,
            ErrorCode::LimitExceeded,
            ErrorCode::Unauthenticated,
            ErrorCode::Internal,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn close_code_groups_tell_the_client_what_to_do() {
        assert!(CloseCode::SLOW_CONSUMER.should_reconnect());
        assert!(!CloseCode::SLOW_CONSUMER.needs_new_token());
        assert!(CloseCode::TOKEN_EXPIRED.needs_new_token());
        assert!(!CloseCode::KICKED.should_reconnect());
        assert!(!CloseCode::POLICY_VIOLATION.should_reconnect());
    }
}
