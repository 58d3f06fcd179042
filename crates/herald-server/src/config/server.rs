//! The process itself: `[server]` (the listener, shutdown, proxies and hosts it trusts),
//! `[heartbeat]` and `[log]`.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{ConfigError, duration, list, networks, networks_as_text};
use crate::http::client_addr::ForwardedHeader;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address for HTTP and WebSocket.
    pub listen: SocketAddr,
    /// Name of this node in `welcome` and logs; a random one when empty.
    pub node_id: String,
    /// Time allowed for the HTTP request head and the WebSocket upgrade.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// On shutdown, how long writers get to flush and send their close frames.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// On shutdown, how long the node keeps serving with `/ready` answering 503 before it
    /// closes the listener, so load balancers stop sending it new clients first.
    #[serde(with = "duration")]
    pub shutdown_delay: Duration,
    /// Reverse proxies (IP addresses or CIDR ranges) whose `client_address_header` names the
    /// client. Connections from anywhere else are keyed on their own address.
    #[serde(deserialize_with = "networks", serialize_with = "networks_as_text")]
    pub trusted_proxies: Vec<IpNet>,
    /// The header trusted proxies record the client's address in: `x-forwarded-for` or
    /// `forwarded` (RFC 7239). Only this one is read.
    pub client_address_header: ForwardedHeader,
    /// Host names (the `Host` header, port ignored) the server answers to; empty: any. In the
    /// development modes (`auth.anonymous`, `auth.dev_login`) an empty list means the loopback
    /// names and the listen address only, so a page whose name resolves to this server (DNS
    /// rebinding) cannot use them.
    #[serde(deserialize_with = "list")]
    pub allowed_hosts: Vec<String>,
    /// Open sockets (HTTP, TLS handshakes, WebSockets) before the server stops accepting until
    /// one closes; 0 takes the process's open-file limit less a reserve for other files.
    pub max_sockets: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            node_id: String::new(),
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            shutdown_delay: Duration::ZERO,
            trusted_proxies: Vec::new(),
            client_address_header: ForwardedHeader::XForwardedFor,
            allowed_hosts: Vec::new(),
            max_sockets: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Interval between server Ping frames; a connection silent for twice this is closed.
    #[serde(with = "duration")]
    pub interval: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval: Duration::from_secs(25),
        }
    }
}

impl HeartbeatConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.interval.is_zero() {
            return Err(ConfigError::Key {
                key: "heartbeat.interval",
                reason: "must be greater than zero".into(),
            });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human) or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `herald_server=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}
