//! Configuration: defaults, then a TOML file, then `HERALD_*` environment variables, then flags.
//!
//! Every key is documented in `herald.example.toml`. Environment variables map to keys by
//! splitting at the first underscore after the prefix: `HERALD_AUTH_SECRET` is `auth.secret`,
//! `HERALD_LIMITS_MAX_MESSAGE_BYTES` is `limits.max_message_bytes`. Lists accept a TOML array
//! or a comma-separated string (`HERALD_LIMITS_ALLOWED_ORIGINS=https://a.example,https://b.example`).
//! Loading fails with a message naming the offending key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::engine::sqlite::Synchronous;
pub use crate::http::client_addr::ForwardedHeader;

/// The sections of the configuration, also the only `HERALD_*` prefixes read as keys.
const SECTIONS: [&str; 14] = [
    "server",
    "auth",
    "heartbeat",
    "limits",
    "log",
    "api",
    "metrics",
    "tls",
    "static",
    "compression",
    "store",
    "presence",
    "engine",
    "redis",
];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub heartbeat: HeartbeatConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub api: ApiConfig,
    pub metrics: MetricsConfig,
    pub tls: TlsConfig,
    #[serde(rename = "static")]
    pub static_files: StaticConfig,
    pub compression: CompressionConfig,
    pub store: StoreConfig,
    pub presence: PresenceConfig,
    pub engine: EngineConfig,
    pub redis: RedisConfig,
}

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
pub struct AuthConfig {
    /// HS256 shared secret. When neither this nor `public_key` is set, `serve` generates one.
    pub secret: Option<String>,
    /// PEM public key file for RS256 or ES256 tokens.
    pub public_key: Option<PathBuf>,
    /// `HS256`, `RS256` or `ES256`; defaults to HS256 with a secret, RS256 with a public key.
    pub algorithm: Option<String>,
    /// When set, tokens must carry this `aud`; when unset, `aud` is not checked.
    pub audience: Option<String>,
    /// When set, tokens must carry this `iss`; when unset, `iss` is not checked.
    pub issuer: Option<String>,
    /// Development only: accept `?user=NAME` without a token.
    pub anonymous: bool,
    /// Development only: `POST /dev/token {"user": NAME}` hands out tokens to anyone, for the
    /// chat page's name sign-in. Needs `auth.secret`.
    pub dev_login: bool,
    /// Let `anonymous` or `dev_login` run on an address other than loopback. Anyone who can
    /// reach the port can then act as any user.
    pub allow_insecure_public: bool,
    /// Accept a handshake without a token in a pending state; the first message must be
    /// `{"type":"auth","token":…}`.
    pub message_auth: bool,
    /// How long a pending connection has to authenticate.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Invalid `auth` messages before a pending connection is closed (4102); as many frames
    /// of any other kind close it too (1008).
    pub max_attempts: u32,
    /// How long before the token's `exp` the server asks the client to refresh it.
    #[serde(with = "duration")]
    pub refresh_notice: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secret: None,
            public_key: None,
            algorithm: None,
            audience: None,
            issuer: None,
            anonymous: false,
            dev_login: false,
            allow_insecure_public: false,
            message_auth: true,
            timeout: Duration::from_secs(5),
            max_attempts: 3,
            refresh_notice: Duration::from_secs(30),
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

/// Room presence events (`presence_diff`): see docs/protocol.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// Joins and leaves in a room within this long after its first pending change go out
    /// together in one `presence_diff`.
    #[serde(with = "duration")]
    pub window: Duration,
    /// Above this many users a room's `presence_diff` carries only the count.
    pub max_members_listed: u64,
    /// Glob patterns (`live-*`) of rooms that send no `presence_diff` at all.
    #[serde(deserialize_with = "list")]
    pub off: Vec<String>,
}

/// Which engines (broker, presence, store) the node runs on: see docs/operations.md.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    pub backend: EngineBackend,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineBackend {
    /// One process: in-memory broker and presence, SQLite store under `store.path`.
    #[default]
    Embedded,
    /// Many nodes as one service: broker, presence and store in Redis (`[redis]`).
    Redis,
}

/// The Redis shared by every node when `engine.backend = "redis"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS. One URL for a standalone
    /// Redis; with `cluster`, any number of seed nodes.
    #[serde(deserialize_with = "list")]
    pub urls: Vec<String>,
    /// A Redis Cluster: keys are hash-tagged per room and user, fan-out uses sharded pub/sub.
    pub cluster: bool,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    pub key_prefix: String,
    /// How long connecting to Redis may take, at start and on each reconnect.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// How long one command may wait for its reply before it fails as temporary.
    #[serde(with = "duration")]
    pub response_timeout: Duration,
    /// How long a node's presence entries outlive its last refresh: a node that dies without
    /// cleaning up disappears from presence after at most this long. Refreshed every third.
    #[serde(with = "duration")]
    pub presence_ttl: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            urls: vec!["redis://127.0.0.1:6379".into()],
            cluster: false,
            key_prefix: "herald".into(),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            presence_ttl: Duration::from_secs(30),
        }
    }
}

impl RedisConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let key = |key: &'static str, reason: String| Err(ConfigError::Key { key, reason });
        if self.urls.is_empty() {
            return key("redis.urls", "must name at least one Redis".into());
        }
        if !self.cluster && self.urls.len() > 1 {
            return key(
                "redis.urls",
                "names several servers: set redis.cluster = true for a Redis Cluster".into(),
            );
        }
        for url in &self.urls {
            if let Err(error) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                return key("redis.urls", format!("{url:?} is not a Redis URL: {error}"));
            }
        }
        if self.key_prefix.is_empty()
            || self
                .key_prefix
                .chars()
                .any(|c| matches!(c, '{' | '}') || c.is_whitespace() || c.is_control())
        {
            return key(
                "redis.key_prefix",
                "must be non-empty, without braces, whitespace or control characters".into(),
            );
        }
        for (name, value) in [
            ("redis.connect_timeout", self.connect_timeout),
            ("redis.response_timeout", self.response_timeout),
        ] {
            if value.is_zero() {
                return key(name, "must be greater than zero".into());
            }
        }
        if self.presence_ttl < Duration::from_secs(3) {
            return key("redis.presence_ttl", "must be at least 3s".into());
        }
        Ok(())
    }
}

/// Longest `presence.window`: members would see a stale room for longer.
const MAX_PRESENCE_WINDOW: Duration = Duration::from_secs(10);

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            window: Duration::from_millis(200),
            max_members_listed: 1000,
            off: Vec::new(),
        }
    }
}

impl PresenceConfig {
    /// The `off` patterns as one matcher.
    pub fn off_matcher(&self) -> Result<globset::GlobSet, globset::Error> {
        let mut set = globset::GlobSetBuilder::new();
        for pattern in &self.off {
            set.add(
                globset::GlobBuilder::new(pattern)
                    .literal_separator(false)
                    .build()?,
            );
        }
        set.build()
    }
}

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

/// Message storage: history, offline inboxes, recovery. See `docs/delivery.md`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Data folder; the database is `herald.db` inside it. Created if missing.
    pub path: PathBuf,
    /// `full` (fsync each commit: survives power loss) or `normal` (survives a crash or
    /// `kill -9` of the process, not a power loss; faster).
    pub synchronous: Synchronous,
    /// Messages kept per room; older ones are pruned. 0 keeps all.
    pub room_max_messages: u64,
    /// Age after which room messages are pruned. `0s` keeps them forever.
    #[serde(with = "duration")]
    pub room_max_age: Duration,
    /// Age after which direct messages (inbox entries and conversation history) are pruned.
    /// `0s` keeps them forever.
    #[serde(with = "duration")]
    pub inbox_max_age: Duration,
    /// How often the background pruning pass runs.
    #[serde(with = "duration")]
    pub prune_interval: Duration,
    /// Largest `limit` a `history` request may ask for; larger ones are capped to it.
    pub history_max_limit: usize,
    /// Most messages replayed to a `join` with `since`; a larger gap is answered with
    /// `recovered: false` and the newest page.
    pub max_recovery: usize,
    /// Device inbox marks kept per user (`?device=`); a new device beyond it evicts the mark
    /// acknowledged least recently.
    pub max_devices_per_user: usize,
    /// Unacknowledged direct messages one user's inbox holds; a `send` to a user at the bound
    /// is refused with `limit_exceeded`. 0: no bound.
    pub max_inbox_messages: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("./data"),
            synchronous: Synchronous::Full,
            room_max_messages: 10_000,
            room_max_age: Duration::from_secs(30 * 24 * 3600),
            inbox_max_age: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            history_max_limit: 100,
            max_recovery: 1000,
            max_devices_per_user: 16,
            max_inbox_messages: 100_000,
        }
    }
}

impl StoreConfig {
    pub fn retention(&self) -> crate::engine::store::Retention {
        crate::engine::store::Retention {
            room_max_messages: self.room_max_messages,
            room_max_age: self.room_max_age,
            inbox_max_age: self.inbox_max_age,
        }
    }

    pub fn limits(&self) -> crate::engine::store::StoreLimits {
        crate::engine::store::StoreLimits {
            max_devices_per_user: self.max_devices_per_user,
            max_inbox_messages: self.max_inbox_messages,
        }
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

/// The server API under `/api/` and the CLI commands that call it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Keys accepted in `Authorization: Bearer <key>`; the API refuses every call while empty.
    #[serde(deserialize_with = "list")]
    pub keys: Vec<String>,
    /// The key `herald publish`/`send`/`broadcast` send; the first of `keys` when unset.
    pub key: Option<String>,
    /// Where those commands find the server; derived from `server.listen` (and `tls`) when unset.
    pub url: Option<String>,
    /// Recipients of one `POST /api/send`.
    pub max_recipients: usize,
    /// Largest request body the API reads.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            keys: Vec::new(),
            key: None,
            url: None,
            max_recipients: 1000,
            max_body_bytes: 1024 * 1024,
        }
    }
}

impl ApiConfig {
    /// The key the CLI sends.
    pub fn client_key(&self) -> Option<&str> {
        self.key
            .as_deref()
            .or(self.keys.first().map(String::as_str))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics at `/metrics`.
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true }
    }
}

/// HTTPS and WSS on the one port. Both files are PEM; set both or neither.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: Option<PathBuf>,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// How often the files are checked for changes (they are also reloaded on SIGHUP);
    /// `0s` turns the check off.
    #[serde(with = "duration")]
    pub watch_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            watch_interval: Duration::from_secs(10),
        }
    }
}

/// The LZ77 window sizes, in bits, that permessage-deflate can be configured with. RFC 7692
/// allows 8, which zlib cannot produce for a raw deflate stream.
pub const WINDOW_BITS: std::ops::RangeInclusive<u8> = 9..=15;

/// permessage-deflate (RFC 7692), agreed per connection with clients that offer it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    /// Accept clients' permessage-deflate offers; off, every connection is uncompressed.
    pub enabled: bool,
    /// Messages shorter than this many bytes go uncompressed: they rarely shrink.
    pub threshold: usize,
    /// Deflate level, 0 (store only) to 9 (smallest, slowest).
    #[serde(deserialize_with = "deflate_level")]
    pub level: u32,
    /// Reset the server's compressor after every message, so an idle connection keeps no
    /// deflate state and a fanned-out message is compressed once for every connection sharing
    /// its window size. Imposed on every client.
    pub server_no_context_takeover: bool,
    /// Ask clients to reset their compressor after every message, so the server inflates with
    /// pooled state too. Imposed on every client; RFC 7692 lets the server require it.
    pub client_no_context_takeover: bool,
    /// Largest LZ77 window (bits) the server compresses with; a client may ask for less.
    #[serde(deserialize_with = "window_bits")]
    pub server_max_window_bits: u8,
    /// Largest LZ77 window (bits) a client may compress with, when it offers to be limited.
    #[serde(deserialize_with = "window_bits")]
    pub client_max_window_bits: u8,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: false,
            threshold: 64,
            level: 1,
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        }
    }
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() && self.key.is_some()
    }
}

/// Static files served at `/` (the browser chat page lives in `web/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticConfig {
    pub enabled: bool,
    /// The folder served; a missing folder serves nothing (404) and is not an error.
    pub dir: PathBuf,
    /// `Cache-Control: max-age` for files other than HTML; `0s` makes every file `no-cache`
    /// (the browser revalidates with `If-Modified-Since`). HTML is always `no-cache`, so a new
    /// page picks up new assets.
    #[serde(with = "duration")]
    pub max_age: Duration,
}

impl Default for StaticConfig {
    fn default() -> Self {
        StaticConfig {
            enabled: true,
            dir: PathBuf::from("web"),
            max_age: Duration::ZERO,
        }
    }
}

fn deflate_level<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let level = u32::deserialize(deserializer)?;
    if level > 9 {
        return Err(serde::de::Error::custom(format!(
            "{level} is not a deflate level from 0 to 9"
        )));
    }
    Ok(level)
}

fn window_bits<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u8, D::Error> {
    let bits = u8::deserialize(deserializer)?;
    if !WINDOW_BITS.contains(&bits) {
        return Err(serde::de::Error::custom(format!(
            "{bits} is not a window size from {} to {} bits",
            WINDOW_BITS.start(),
            WINDOW_BITS.end()
        )));
    }
    Ok(bits)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration that could not be loaded; the message names the key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} does not exist")]
    MissingFile { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    #[error("invalid configuration: {key}: {reason}")]
    Key { key: &'static str, reason: String },
}

impl Config {
    /// Loads defaults < `file` < environment < `overrides` (flags, as `section.key` pairs).
    pub fn load(
        file: Option<&Path>,
        overrides: impl IntoIterator<Item = (&'static str, figment::value::Value)>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile {
                    path: path.to_owned(),
                });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(
            Env::prefixed("HERALD_")
                .filter(|key| {
                    let key = key.as_str().to_ascii_lowercase();
                    SECTIONS
                        .iter()
                        .any(|section| key.starts_with(&format!("{section}_")))
                })
                .map(|key| {
                    key.as_str()
                        .to_ascii_lowercase()
                        .replacen('_', ".", 1)
                        .into()
                }),
        );
        for (key, value) in overrides {
            figment = figment.merge(Serialized::default(key, value));
        }
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Loads defaults < the TOML `text`, without the environment or flags: what `load` makes of
    /// a file holding `text` (the configuration fuzz target feeds it any text).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        fn positive(key: &'static str, value: usize) -> Result<(), ConfigError> {
            if value == 0 {
                return Err(ConfigError::Key {
                    key,
                    reason: "must be greater than zero".into(),
                });
            }
            Ok(())
        }
        if self.engine.backend == EngineBackend::Redis {
            self.redis.validate()?;
        }
        if self.heartbeat.interval.is_zero() {
            return Err(ConfigError::Key {
                key: "heartbeat.interval",
                reason: "must be greater than zero".into(),
            });
        }
        let limits = &self.limits;
        positive("limits.max_message_bytes", limits.max_message_bytes)?;
        positive(
            "limits.messages_per_second",
            limits.messages_per_second as usize,
        )?;
        positive("limits.burst", limits.burst as usize)?;
        positive("limits.abuse_threshold", limits.abuse_threshold as usize)?;
        positive(
            "limits.max_rooms_per_connection",
            limits.max_rooms_per_connection,
        )?;
        positive(
            "limits.max_connections_per_user",
            limits.max_connections_per_user,
        )?;
        positive("limits.max_connections", limits.max_connections)?;
        positive("limits.max_recipients", limits.max_recipients)?;
        positive("limits.send_queue", limits.send_queue)?;
        if limits.send_queue_bytes < limits.max_message_bytes {
            return Err(ConfigError::Key {
                key: "limits.send_queue_bytes",
                reason: "must be at least limits.max_message_bytes".into(),
            });
        }
        if limits.write_timeout.is_zero() {
            return Err(ConfigError::Key {
                key: "limits.write_timeout",
                reason: "must be greater than zero".into(),
            });
        }
        positive("limits.max_pending_auth", limits.max_pending_auth)?;
        positive(
            "limits.max_pending_auth_per_ip",
            limits.max_pending_auth_per_ip,
        )?;
        positive(
            "limits.idempotency_keys_per_user",
            limits.idempotency_keys_per_user,
        )?;
        if limits.idempotency_window > MAX_IDEMPOTENCY_WINDOW {
            return Err(ConfigError::Key {
                key: "limits.idempotency_window",
                reason: "must be at most 24h".into(),
            });
        }
        positive("auth.max_attempts", self.auth.max_attempts as usize)?;
        positive("store.history_max_limit", self.store.history_max_limit)?;
        positive("store.max_recovery", self.store.max_recovery)?;
        positive(
            "store.max_devices_per_user",
            self.store.max_devices_per_user,
        )?;
        if self.store.prune_interval.is_zero() {
            return Err(ConfigError::Key {
                key: "store.prune_interval",
                reason: "must be greater than zero".into(),
            });
        }
        if self.store.path.as_os_str().is_empty() {
            return Err(ConfigError::Key {
                key: "store.path",
                reason: "must name a folder".into(),
            });
        }
        if self.auth.timeout.is_zero() {
            return Err(ConfigError::Key {
                key: "auth.timeout",
                reason: "must be greater than zero".into(),
            });
        }
        if let Some(algorithm) = &self.auth.algorithm {
            let with_key = self.auth.public_key.is_some();
            let reason = match (algorithm.as_str(), with_key) {
                ("HS256", false) | ("RS256" | "ES256", true) => None,
                ("HS256", true) => Some("HS256 needs auth.secret, not auth.public_key".to_owned()),
                ("RS256" | "ES256", false) => Some(format!("{algorithm} needs auth.public_key")),
                _ => Some(format!("{algorithm:?} is not one of HS256, RS256, ES256")),
            };
            if let Some(reason) = reason {
                return Err(ConfigError::Key {
                    key: "auth.algorithm",
                    reason,
                });
            }
        }
        let development = [
            ("auth.anonymous", self.auth.anonymous),
            ("auth.dev_login", self.auth.dev_login),
        ];
        if let Some((key, _)) = development.iter().find(|(_, on)| *on)
            && !self.server.listen.ip().is_loopback()
            && !self.auth.allow_insecure_public
        {
            return Err(ConfigError::Key {
                key,
                reason: format!(
                    "lets anyone act as any user, so it only runs on a loopback server.listen \
                     (not {}) unless auth.allow_insecure_public is set",
                    self.server.listen
                ),
            });
        }
        if self.auth.dev_login && self.auth.public_key.is_some() {
            return Err(ConfigError::Key {
                key: "auth.dev_login",
                reason: "mints HS256 tokens, so it needs auth.secret rather than auth.public_key"
                    .into(),
            });
        }
        if let Some(secret) = &self.auth.secret
            && secret.len() < 16
        {
            return Err(ConfigError::Key {
                key: "auth.secret",
                reason: "must be at least 16 bytes long".into(),
            });
        }
        if self.api.keys.iter().any(|key| key.len() < 16) {
            return Err(ConfigError::Key {
                key: "api.keys",
                reason: "every key must be at least 16 bytes long".into(),
            });
        }
        positive("api.max_recipients", self.api.max_recipients)?;
        positive("api.max_body_bytes", self.api.max_body_bytes)?;
        if self.presence.window.is_zero() || self.presence.window > MAX_PRESENCE_WINDOW {
            return Err(ConfigError::Key {
                key: "presence.window",
                reason: format!(
                    "must be greater than zero and at most {}",
                    humantime::format_duration(MAX_PRESENCE_WINDOW)
                ),
            });
        }
        if let Err(error) = self.presence.off_matcher() {
            return Err(ConfigError::Key {
                key: "presence.off",
                reason: error.to_string(),
            });
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => {
                return Err(ConfigError::Key {
                    key: "tls.key",
                    reason: "is required when tls.cert is set".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Key {
                    key: "tls.cert",
                    reason: "is required when tls.key is set".into(),
                });
            }
            _ => {}
        }
        Ok(())
    }
}

/// Durations as human strings (`25s`, `500ms`, `1h`) in files and the environment.
mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not a duration like \"25s\": {e}"))
        })
    }
}

/// Networks given as addresses (`10.0.0.1`, a single host) or CIDR ranges (`10.0.0.0/8`), in
/// a list or one comma-separated string.
fn networks<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    list(deserializer)?
        .iter()
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{item:?} is not an IP address or a CIDR range like 10.0.0.0/8"
                    ))
                })
        })
        .collect()
}

fn networks_as_text<S: Serializer>(networks: &[IpNet], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(networks.iter().map(ToString::to_string))
}

/// A list given as an array or as one comma-separated string.
fn list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Text(String),
        Items(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::Items(items) => items,
        OneOrMany::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn file_values_are_read_and_flags_override_them() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "[heartbeat]\ninterval = \"3s\"\n[limits]\nallowed_origins = \"https://a.example, https://b.example\"\n[server]\nlisten = \"127.0.0.1:9000\""
        )
        .unwrap();
        let config = Config::load(
            Some(file.path()),
            [("server.listen", "127.0.0.1:9100".into())],
        )
        .unwrap();
        assert_eq!(config.heartbeat.interval, Duration::from_secs(3));
        assert_eq!(
            config.limits.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(config.server.listen.port(), 9100);
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[limits]\nmax_message_bytes = \"lots\"").unwrap();
        let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
        assert!(error.contains("max_message_bytes"), "{error}");

        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[heartbeat]\ninterval = \"0s\"").unwrap();
        let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
        assert!(error.contains("heartbeat.interval"), "{error}");

        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[limits]\nmax_mesage_bytes = 1").unwrap();
        let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
        assert!(error.contains("max_mesage_bytes"), "{error}");

        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[limits]\nidempotency_window = \"25h\"").unwrap();
        let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
        assert!(error.contains("limits.idempotency_window"), "{error}");
    }

    #[test]
    fn presence_keys_are_checked_and_named() {
        for (text, key) in [
            ("window = \"0s\"", "presence.window"),
            ("window = \"11s\"", "presence.window"),
            ("off = [\"live-[\"]", "presence.off"),
        ] {
            let mut file = tempfile::NamedTempFile::new().unwrap();
            writeln!(file, "[presence]\n{text}").unwrap();
            let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
            assert!(error.contains(key), "{text}: {error}");
        }
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[presence]\noff = \"live-*, stage-?\"").unwrap();
        let config = Config::load(Some(file.path()), []).unwrap();
        let off = config.presence.off_matcher().unwrap();
        assert!(off.is_match("live-final") && off.is_match("stage-1"));
        assert!(!off.is_match("lobby") && !off.is_match("stage-10"));
    }

    #[test]
    fn store_keys_are_read_from_file_and_environment() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "[store]\npath = \"/var/lib/herald\"\nsynchronous = \"normal\"\nroom_max_age = \"0s\"\nroom_max_messages = 50"
        )
        .unwrap();
        let config = Config::load(Some(file.path()), []).unwrap();
        assert_eq!(config.store.path, PathBuf::from("/var/lib/herald"));
        assert_eq!(config.store.synchronous, Synchronous::Normal);
        assert_eq!(config.store.room_max_messages, 50);
        assert!(config.store.room_max_age.is_zero());
        assert_eq!(Config::default().store.path, PathBuf::from("./data"));

        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[store]\nsynchronous = \"sometimes\"").unwrap();
        let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
        assert!(error.contains("synchronous"), "{error}");
    }

    #[test]
    fn api_tls_and_static_sections_are_read() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "[api]\nkeys = \"first-key-0123456789, second-key-0123456789\"\n\
             [tls]\ncert = \"/etc/herald/cert.pem\"\nkey = \"/etc/herald/key.pem\"\n\
             [static]\ndir = \"public\"\nmax_age = \"1h\"\n\
             [server]\nshutdown_delay = \"5s\""
        )
        .unwrap();
        let config = Config::load(Some(file.path()), []).unwrap();
        assert_eq!(
            config.api.keys,
            ["first-key-0123456789", "second-key-0123456789"]
        );
        assert_eq!(config.api.client_key(), Some("first-key-0123456789"));
        assert!(config.tls.enabled());
        assert_eq!(config.static_files.dir, PathBuf::from("public"));
        assert_eq!(config.static_files.max_age, Duration::from_secs(3600));
        assert_eq!(config.server.shutdown_delay, Duration::from_secs(5));
    }

    #[test]
    fn short_api_keys_and_half_tls_settings_are_refused() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[api]\nkeys = [\"short\"]").unwrap();
        let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
        assert!(error.contains("api.keys"), "{error}");

        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[tls]\ncert = \"/etc/herald/cert.pem\"").unwrap();
        let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
        assert!(error.contains("tls.key"), "{error}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = Config::load(Some(Path::new("/nonexistent/herald.toml")), [])
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/herald.toml"));
    }
}
