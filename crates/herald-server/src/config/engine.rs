//! The engines and what they keep: `[engine]` (embedded or Redis), `[store]` (history,
//! inboxes, retention), `[redis]`, and `[presence]` (how room presence changes go out).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, duration, list, positive};
use crate::engine::sqlite::Synchronous;

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

/// Message storage: history, offline inboxes, recovery. See `docs/delivery.md`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Data folder; the database is `herald.db` inside it. Created if missing.
    pub path: PathBuf,
    /// `full` (fsync each commit: survives power loss) or `normal` (survives a crash or
    /// `kill -9` of the process, not a power loss; faster).
    pub synchronous: Synchronous,
    /// Under load, the least time between the starts of two commits, so that each commit (and
    /// its fsync) carries more messages; an acknowledgement waits up to this much longer. `0s`:
    /// commit as soon as the previous commit is done. An idle server never waits.
    #[serde(with = "duration")]
    pub commit_spacing: Duration,
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
            commit_spacing: crate::engine::sqlite::DEFAULT_COMMIT_SPACING,
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

    pub fn durability(&self) -> crate::engine::sqlite::Durability {
        crate::engine::sqlite::Durability {
            synchronous: self.synchronous,
            commit_spacing: self.commit_spacing,
        }
    }

    pub fn limits(&self) -> crate::engine::store::StoreLimits {
        crate::engine::store::StoreLimits {
            max_devices_per_user: self.max_devices_per_user,
            max_inbox_messages: self.max_inbox_messages,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive("store.history_max_limit", self.history_max_limit)?;
        positive("store.max_recovery", self.max_recovery)?;
        positive("store.max_devices_per_user", self.max_devices_per_user)?;
        if self.prune_interval.is_zero() {
            return Err(ConfigError::Key {
                key: "store.prune_interval",
                reason: "must be greater than zero".into(),
            });
        }
        if self.commit_spacing > MAX_COMMIT_SPACING {
            return Err(ConfigError::Key {
                key: "store.commit_spacing",
                reason: format!(
                    "must be at most {}: every acknowledgement may wait that long",
                    humantime::format_duration(MAX_COMMIT_SPACING)
                ),
            });
        }
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::Key {
                key: "store.path",
                reason: "must name a folder".into(),
            });
        }
        Ok(())
    }
}

/// The longest `store.commit_spacing` accepted: past it, pacing only adds latency (a commit of
/// a few hundred messages already shares its fsync well).
const MAX_COMMIT_SPACING: Duration = Duration::from_millis(100);

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
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
    /// The window of a room whose last diff carried only the count: in a big room every diff
    /// is a frame to every member, so counts go out less often than lists.
    #[serde(with = "duration")]
    pub count_window: Duration,
    /// Glob patterns (`live-*`) of rooms that send no `presence_diff` at all.
    #[serde(deserialize_with = "list")]
    pub off: Vec<String>,
}

/// Longest `presence.window`: members would see a stale room for longer.
const MAX_PRESENCE_WINDOW: Duration = Duration::from_secs(10);

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            window: Duration::from_millis(200),
            max_members_listed: 1000,
            count_window: Duration::from_secs(1),
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

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.window.is_zero() || self.window > MAX_PRESENCE_WINDOW {
            return Err(ConfigError::Key {
                key: "presence.window",
                reason: format!(
                    "must be greater than zero and at most {}",
                    humantime::format_duration(MAX_PRESENCE_WINDOW)
                ),
            });
        }
        if self.count_window < self.window || self.count_window > MAX_PRESENCE_WINDOW {
            return Err(ConfigError::Key {
                key: "presence.count_window",
                reason: format!(
                    "must be at least presence.window ({}) and at most {}",
                    humantime::format_duration(self.window),
                    humantime::format_duration(MAX_PRESENCE_WINDOW)
                ),
            });
        }
        if let Err(error) = self.off_matcher() {
            return Err(ConfigError::Key {
                key: "presence.off",
                reason: error.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::{load_error, load_file};

    #[test]
    fn presence_keys_are_checked_and_named() {
        for (text, key) in [
            ("window = \"0s\"", "presence.window"),
            ("window = \"11s\"", "presence.window"),
            ("count_window = \"100ms\"", "presence.count_window"),
            ("count_window = \"11s\"", "presence.count_window"),
            ("off = [\"live-[\"]", "presence.off"),
        ] {
            let error = load_error(&format!("[presence]\n{text}"));
            assert!(error.contains(key), "{text}: {error}");
        }
        let config = load_file("[presence]\noff = \"live-*, stage-?\"").unwrap();
        let off = config.presence.off_matcher().unwrap();
        assert!(off.is_match("live-final") && off.is_match("stage-1"));
        assert!(!off.is_match("lobby") && !off.is_match("stage-10"));
    }

    #[test]
    fn store_keys_are_read_from_file_and_environment() {
        let config = load_file(
            "[store]\npath = \"/var/lib/herald\"\nsynchronous = \"normal\"\nroom_max_age = \"0s\"\nroom_max_messages = 50\ncommit_spacing = \"500us\"",
        )
        .unwrap();
        assert_eq!(config.store.commit_spacing, Duration::from_micros(500));
        assert_eq!(
            config.store.durability().commit_spacing,
            Duration::from_micros(500)
        );
        assert_eq!(config.store.path, PathBuf::from("/var/lib/herald"));
        assert_eq!(config.store.synchronous, Synchronous::Normal);
        assert_eq!(config.store.room_max_messages, 50);
        assert!(config.store.room_max_age.is_zero());
        assert_eq!(Config::default().store.path, PathBuf::from("./data"));

        let error = load_error("[store]\nsynchronous = \"sometimes\"");
        assert!(error.contains("synchronous"), "{error}");
    }

    #[test]
    fn commit_spacing_may_be_zero_and_not_past_its_bound() {
        let config = load_file("[store]\ncommit_spacing = \"0s\"").unwrap();
        assert!(config.store.durability().commit_spacing.is_zero());
        assert_eq!(
            Config::default().store.commit_spacing,
            Duration::from_millis(5)
        );
        let error = load_error("[store]\ncommit_spacing = \"1s\"");
        assert!(
            error.contains("store.commit_spacing") && error.contains("at most 100ms"),
            "{error}"
        );
    }
}
