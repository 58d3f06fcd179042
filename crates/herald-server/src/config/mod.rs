//! Configuration: defaults, then a TOML file, then `HERALD_*` environment variables, then flags.
//!
//! Every key is documented in `herald.example.toml`. Environment variables map to keys by
//! splitting at the first underscore after the prefix: `HERALD_AUTH_SECRET` is `auth.secret`,
//! `HERALD_LIMITS_MAX_MESSAGE_BYTES` is `limits.max_message_bytes`. Lists accept a TOML array
//! or a comma-separated string (`HERALD_LIMITS_ALLOWED_ORIGINS=https://a.example,https://b.example`).
//! Loading fails with a message naming the offending key.
//!
//! This file holds `Config`, the layering, the validation entry point and the value formats
//! the sections share (durations, lists, networks). Each section's keys, defaults and checks
//! live with the sections they belong with: `server.rs` (`[server]`, `[heartbeat]`, `[log]`),
//! `auth.rs` (`[auth]`), `limits.rs` (`[limits]`), `http.rs` (`[api]`, `[metrics]`, `[tls]`,
//! `[static]`, `[compression]`) and `engine.rs` (`[engine]`, `[store]`, `[redis]`,
//! `[presence]`).

mod auth;
mod engine;
mod http;
mod limits;
mod server;

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use self::auth::AuthConfig;
pub use self::engine::{EngineBackend, EngineConfig, PresenceConfig, RedisConfig, StoreConfig};
pub use self::http::{
    ApiConfig, CompressionConfig, MetricsConfig, StaticConfig, TlsConfig, WINDOW_BITS,
};
pub use self::limits::{LimitsConfig, MAX_IDEMPOTENCY_WINDOW};
pub use self::server::{HeartbeatConfig, LogConfig, LogFormat, ServerConfig};
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

    /// Checks each section's keys, failing on the first bad one; `[redis]` only when it is
    /// the engine in use.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.engine.backend == EngineBackend::Redis {
            self.redis.validate()?;
        }
        self.heartbeat.validate()?;
        self.limits.validate()?;
        self.store.validate()?;
        self.auth.validate(self.server.listen)?;
        self.api.validate()?;
        self.presence.validate()?;
        self.tls.validate()
    }
}

/// Refuses a zero count or size for `key`.
fn positive(key: &'static str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::Key {
            key,
            reason: "must be greater than zero".into(),
        });
    }
    Ok(())
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

    /// Loads `text` as the config file, with no flags.
    pub(super) fn load_file(text: &str) -> Result<Config, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "{text}").unwrap();
        Config::load(Some(file.path()), [])
    }

    /// The error that loading `text` as the config file gives, as its message.
    pub(super) fn load_error(text: &str) -> String {
        load_file(text).unwrap_err().to_string()
    }

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
        let error = load_error("[limits]\nmax_message_bytes = \"lots\"");
        assert!(error.contains("max_message_bytes"), "{error}");

        let error = load_error("[heartbeat]\ninterval = \"0s\"");
        assert!(error.contains("heartbeat.interval"), "{error}");

        let error = load_error("[limits]\nmax_mesage_bytes = 1");
        assert!(error.contains("max_mesage_bytes"), "{error}");

        let error = load_error("[limits]\nidempotency_window = \"25h\"");
        assert!(error.contains("limits.idempotency_window"), "{error}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = Config::load(Some(Path::new("/nonexistent/herald.toml")), [])
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/herald.toml"));
    }
}
