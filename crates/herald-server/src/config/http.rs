//! What the HTTP side serves and how: `[api]` (the server API and the CLI commands that call
//! it), `[metrics]`, `[tls]`, `[static]` and `[compression]` (permessage-deflate).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::{ConfigError, duration, list, positive};

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

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.keys.iter().any(|key| key.len() < 16) {
            return Err(ConfigError::Key {
                key: "api.keys",
                reason: "every key must be at least 16 bytes long".into(),
            });
        }
        positive("api.max_recipients", self.max_recipients)?;
        positive("api.max_body_bytes", self.max_body_bytes)?;
        Ok(())
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

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() && self.key.is_some()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        match (&self.cert, &self.key) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{load_error, load_file};

    #[test]
    fn api_tls_and_static_sections_are_read() {
        let config = load_file(
            "[api]\nkeys = \"first-key-0123456789, second-key-0123456789\"\n\
             [tls]\ncert = \"/etc/herald/cert.pem\"\nkey = \"/etc/herald/key.pem\"\n\
             [static]\ndir = \"public\"\nmax_age = \"1h\"\n\
             [server]\nshutdown_delay = \"5s\"",
        )
        .unwrap();
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
        let error = load_error("[api]\nkeys = [\"short\"]");
        assert!(error.contains("api.keys"), "{error}");

        let error = load_error("[tls]\ncert = \"/etc/herald/cert.pem\"");
        assert!(error.contains("tls.key"), "{error}");
    }
}
