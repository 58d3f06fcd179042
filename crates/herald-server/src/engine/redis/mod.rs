//! Redis engines: many nodes share one Redis (or a Redis Cluster) for fan-out, presence and
//! storage, and act as one service. Selected with `engine.backend = "redis"`.
//!
//! Every key and channel starts with `redis.key_prefix` and carries a hash tag (`{room:NAME}`,
//! `{user:NAME}`, `{conv:A|B}`): everything about one room, one user or one conversation lives
//! on one Cluster shard, so each script touches one shard and no operation needs a transaction
//! across users.

pub mod broker;
pub mod presence;
mod replies;
pub mod store;

use std::sync::Arc;

use redis::aio::{AsyncPushSender, ConnectionLike};
use redis::{Cmd, ProtocolVersion, RedisFuture, Value};

use crate::config::RedisConfig;
use crate::delivery::Channel;
use crate::engine::EngineError;

/// Builds the names of keys and channels for one deployment (one `key_prefix`).
///
/// A name ends its hash tag with `}` and suffixes never contain one, so two different (name,
/// suffix) pairs never make the same key, whatever characters names hold.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The deployment's prefix, which every key and channel starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A key about one room: `PREFIX:{room:ROOM}:SUFFIX`.
    pub fn room(&self, room: &str, suffix: &str) -> String {
        format!("{}:{{room:{room}}}:{suffix}", self.prefix)
    }

    /// A key about one user: `PREFIX:{user:USER}:SUFFIX`.
    pub fn user(&self, user: &str, suffix: &str) -> String {
        format!("{}:{{user:{user}}}:{suffix}", self.prefix)
    }

    /// A key about the direct conversation of two users, the same whichever writes.
    pub fn conversation(&self, a: &str, b: &str, suffix: &str) -> String {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        // `|` cannot be confused with a name's end: the pair's order is fixed and names are
        // compared whole, so (a, b|c) and (a|b, c) sort and print differently only when they
        // are different pairs; the length prefix removes the remaining ambiguity.
        format!(
            "{}:{{conv:{}:{low}|{high}}}:{suffix}",
            self.prefix,
            low.len()
        )
    }

    /// A key about one node: `PREFIX:{node:NODE}:SUFFIX`.
    pub fn node(&self, node: &str, suffix: &str) -> String {
        format!("{}:{{node:{node}}}:{suffix}", self.prefix)
    }

    /// A key of the whole deployment: `PREFIX:{global}:SUFFIX`.
    pub fn global(&self, suffix: &str) -> String {
        format!("{}:{{global}}:{suffix}", self.prefix)
    }

    /// The pub/sub channel of a fan-out destination; on a Cluster it hashes to the same shard
    /// as the room's or user's keys.
    pub fn channel(&self, channel: &Channel) -> String {
        match channel {
            Channel::Room(room) => self.room(room, "ch"),
            Channel::User(user) => self.user(user, "ch"),
            Channel::All => self.global("ch"),
        }
    }

    /// Reads a channel name back (what a pub/sub message arrived on); `None` for channels this
    /// deployment does not publish.
    pub fn parse_channel(&self, name: &str) -> Option<Channel> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let inner = rest.strip_suffix("}:ch")?;
        if inner == "global" {
            return Some(Channel::All);
        }
        if let Some(room) = inner.strip_prefix("room:") {
            return Some(Channel::Room(room.into()));
        }
        inner
            .strip_prefix("user:")
            .map(|user| Channel::User(user.into()))
    }
}

/// A command connection to the deployment's Redis, standalone or Cluster: commands and scripts
/// run through it alike (`cmd.query_async(&mut connection.clone())`). Cloning shares the
/// underlying multiplexed connection, which reconnects by itself.
#[derive(Clone)]
pub enum Connection {
    Standalone(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Standalone(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Standalone(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Standalone(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// Requests the multiplexed connection queues before a sender waits (its default is 50). A
/// request enters the queue at its first poll unless the queue is full; a request that had to
/// wait enters only at its next poll, after which requests started later may have entered
/// first. The store starts its appends in call order and relies on that order reaching Redis,
/// so the queue must not fill: its appends in flight are bounded far below this, and slots
/// are allocated only as they are used.
const PIPELINE_BUFFER: usize = 1 << 20;

/// Opens a command connection (RESP3) with the configured timeouts. Fails, naming the URL,
/// when Redis cannot be reached within `redis.connect_timeout`.
pub async fn connect(config: &RedisConfig) -> Result<Connection, EngineError> {
    open(config, None).await
}

/// Opens a connection like [`connect`] whose server pushes (pub/sub messages, and the
/// library's notice that the connection was lost) go to `pushes`. The library reconnects it by
/// itself; a Cluster connection also resubscribes by itself, a standalone one does not.
pub async fn connect_receiving(
    config: &RedisConfig,
    pushes: Arc<dyn AsyncPushSender>,
) -> Result<Connection, EngineError> {
    open(config, Some(pushes)).await
}

async fn open(
    config: &RedisConfig,
    pushes: Option<Arc<dyn AsyncPushSender>>,
) -> Result<Connection, EngineError> {
    let failed = |error: redis::RedisError| {
        EngineError::from_redis(
            "redis",
            format!("cannot connect to {} (redis.urls)", config.urls.join(", ")),
            error,
        )
    };
    if config.cluster {
        let mut builder =
            redis::cluster::ClusterClientBuilder::new(config.urls.iter().map(String::as_str))
                .use_protocol(ProtocolVersion::RESP3)
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.response_timeout);
        if let Some(pushes) = pushes.clone() {
            builder = builder.push_sender(pushes);
        }
        let client = builder.build().map_err(failed)?;
        let connection = client.get_async_connection().await.map_err(failed)?;
        return Ok(Connection::Cluster(connection));
    }
    let info =
        redis::IntoConnectionInfo::into_connection_info(config.urls[0].as_str()).map_err(failed)?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let info = info.set_redis_settings(settings);
    let client = redis::Client::open(info).map_err(failed)?;
    let mut manager_config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.response_timeout))
        .set_pipeline_buffer_size(PIPELINE_BUFFER);
    if let Some(pushes) = pushes {
        manager_config = manager_config.set_push_sender(pushes);
    }
    let connection = tokio::time::timeout(
        config.connect_timeout,
        client.get_connection_manager_with_config(manager_config),
    )
    .await
    .map_err(|_| {
        EngineError::new(
            "redis",
            format!(
                "cannot connect to {} (redis.urls) within redis.connect_timeout",
                config.urls.join(", ")
            ),
        )
        .temporary()
    })?
    .map_err(failed)?;
    Ok(Connection::Standalone(connection))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_read_back_as_the_channel_they_name() {
        let keys = Keys::new("herald");
        for channel in [
            Channel::Room("lobby".into()),
            Channel::Room("we}:ird{room".into()),
            Channel::User("alice".into()),
            Channel::All,
        ] {
            assert_eq!(keys.parse_channel(&keys.channel(&channel)), Some(channel));
        }
        assert_eq!(keys.parse_channel("other:{room:lobby}:ch"), None);
    }

    #[test]
    fn a_conversation_has_one_key_whichever_user_writes() {
        let keys = Keys::new("p");
        assert_eq!(
            keys.conversation("bob", "alice", "log"),
            keys.conversation("alice", "bob", "log")
        );
        assert_ne!(
            keys.conversation("a", "b|c", "log"),
            keys.conversation("a|b", "c", "log")
        );
    }
}
