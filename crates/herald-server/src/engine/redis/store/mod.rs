//! The Redis store: room history, inboxes and conversations as Redis Streams, shared by every
//! node of a deployment.
//!
//! # Layout
//! Each stream (a room, a user's inbox, the conversation of two users) is a Redis Stream whose
//! entry ids are `OFFSET-0`, so `XRANGE` reads by offset, and a `stream:meta` hash beside it
//! (`epoch`, `last`; an inbox also `acked` and `uses`) under the same hash tag. An inbox has its
//! device marks (`stream:marks`, a sorted set device -> mark) and their order of use
//! (`stream:uses`); inboxes and conversations remember the ids of their recent messages
//! (`stream:seen`, id -> offset) so a retried append is not stored twice. A request that may
//! be retried leaves a record (`retry:FINGERPRINT:…`, a string expiring after the request's
//! window): under the room's hash tag, written by the room's append script; under the
//! sender's, claimed before a direct message's inbox writes.
//!
//! # Invariants
//! - Every write is one Lua script on one stream's keys (one Cluster shard): offsets come from
//!   `HINCRBY last`, so they grow by exactly 1 whichever node appends.
//! - A room append stores the message and publishes its frame in the same script, with the
//!   offset spliced in by the receiving node ([`wire`](crate::engine::wire)): a room's frames
//!   leave Redis in offset order. An inbox append publishes the recipient's frame the same way.
//! - A direct message touches several users, so it is one idempotent script per recipient's
//!   inbox, then one per conversation, each keyed by the message id: no transaction spans
//!   users, and a retry completes what a failed attempt left undone without duplicates.
//! - A request recorded within its window is answered with its first attempt's result on any
//!   node: a room append returns the recorded position and stores and publishes nothing; a
//!   direct message goes on under the first attempt's id and timestamp, so its per-recipient
//!   scripts store nothing twice and complete what the first attempt left undone.
//! - `append` sends its requests before it returns (see [`started`](requests::started)), so
//!   appends reach Redis in the order they were called; conversation writes start in that order
//!   too.
//! - Retention finds streams with `SCAN` on the Redis, or on every primary of a Cluster.
//! - Nothing is reported stored before Redis replied; a lost connection is
//!   [`StoreError::Unavailable`].

mod appends;
mod reads;
mod requests;
mod retention;
mod retries;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use redis::{Script, ScriptInvocation, Value};
use tokio::sync::Semaphore;

use super::replies::{fields, int, stored_messages, unexpected};
use super::{Connection, Keys};
use crate::config::RedisConfig;
use crate::delivery::ConnId;
use crate::engine::store::{
    Append, InboxRead, Offset, OnCommit, Page, PruneReport, Retention, Store, StoreError,
    StoreLimits, StreamBounds, StreamRead,
};
use requests::failed;

/// Appends in flight at once; `append` waits for room past it (backpressure on publishers).
/// A request counts against `redis.response_timeout` from the moment it is sent, so the
/// queue stays short enough to be answered well within it: with 16k in flight, a busy node
/// timed appends out.
const QUEUE: usize = 1024;

/// Most entries one read returns, whatever the caller asks: larger counts do not survive
/// the scripts' numbers (doubles) exactly.
const MAX_READ: usize = 1 << 30;

const STREAM: &str = "stream";
const META: &str = "stream:meta";
const MARKS: &str = "stream:marks";
const USES: &str = "stream:uses";
const SEEN: &str = "stream:seen";

struct Scripts {
    room_append: Script,
    direct_claim: Script,
    inbox_append: Script,
    conversation_append: Script,
    read_after: Script,
    read_before: Script,
    read_inbox: Script,
    ack_inbox: Script,
    prune_stream: Script,
}

/// Hashed once per process; `EVALSHA` runs them, loading one into Redis when it answers that
/// it does not know it (a restarted or flushed Redis).
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    room_append: Script::new(include_str!("../scripts/room_append.lua")),
    direct_claim: Script::new(include_str!("../scripts/direct_claim.lua")),
    inbox_append: Script::new(include_str!("../scripts/inbox_append.lua")),
    conversation_append: Script::new(include_str!("../scripts/conversation_append.lua")),
    read_after: Script::new(include_str!("../scripts/read_after.lua")),
    read_before: Script::new(include_str!("../scripts/read_before.lua")),
    read_inbox: Script::new(include_str!("../scripts/read_inbox.lua")),
    ack_inbox: Script::new(include_str!("../scripts/ack_inbox.lua")),
    prune_stream: Script::new(include_str!("../scripts/prune_stream.lua")),
});

pub struct RedisStore {
    connection: Connection,
    keys: Keys,
    limits: StoreLimits,
    /// `SPUBLISH` on a Cluster (the frame stays on the channel's shard), `PUBLISH` otherwise.
    publish: &'static str,
    /// Permits for appends in flight; closed by `close`.
    queue: Arc<Semaphore>,
    /// Direct messages take turns, in the order `append` saw them, to start their
    /// conversation writes (which wait for the inbox writes): one sender's messages keep
    /// their order in a conversation. A fair lock, each message's task holding it from its
    /// turn until its inbox replies are in and its conversation requests sent.
    conversation_turn: Arc<tokio::sync::Mutex<()>>,
    closed: AtomicBool,
}

impl RedisStore {
    /// Connects to the configured Redis. Fails, naming the URL, when it cannot be reached
    /// within `redis.connect_timeout`.
    pub async fn open(config: &RedisConfig, limits: StoreLimits) -> Result<RedisStore, StoreError> {
        let connection = super::connect(config)
            .await
            .map_err(|error| StoreError::Open {
                path: config.urls.join(", "),
                reason: error.to_string(),
            })?;
        let store = RedisStore::with_connection(connection, Keys::new(&config.key_prefix), limits);
        store.load_scripts().await?;
        Ok(store)
    }

    /// Loads every script into Redis, so that appends do not meet an unknown script (whose
    /// reload and retry could let a later append overtake an earlier one) except after Redis
    /// lost its script cache (a restart).
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        let scripts = &*SCRIPTS;
        for script in [
            &scripts.room_append,
            &scripts.direct_claim,
            &scripts.inbox_append,
            &scripts.conversation_append,
            &scripts.read_after,
            &scripts.read_before,
            &scripts.read_inbox,
            &scripts.ack_inbox,
            &scripts.prune_stream,
        ] {
            script
                .load_async(&mut self.connection.clone())
                .await
                .map_err(failed("load scripts"))?;
        }
        Ok(())
    }

    /// A store over an open connection (shared with the other Redis engines of the node).
    pub fn with_connection(connection: Connection, keys: Keys, limits: StoreLimits) -> RedisStore {
        let publish = match connection {
            Connection::Cluster(_) => "SPUBLISH",
            Connection::Standalone(_) => "PUBLISH",
        };
        RedisStore {
            connection,
            keys,
            limits,
            publish,
            queue: Arc::new(Semaphore::new(QUEUE)),
            conversation_turn: Arc::default(),
            closed: AtomicBool::new(false),
        }
    }

    /// Runs a script and waits for its reply.
    async fn run(
        &self,
        operation: &'static str,
        invocation: ScriptInvocation<'static>,
    ) -> Result<Value, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(failed(operation))
    }
}

#[async_trait::async_trait]
impl Store for RedisStore {
    /// A PING: a command connection that lost Redis reconnects on its next command, so a
    /// readiness probe also brings it back before clients need it.
    async fn ready(&self) -> bool {
        redis::cmd("PING")
            .exec_async(&mut self.connection.clone())
            .await
            .is_ok()
    }

    /// Stores the message and publishes its frames (one per stream, each with its offset)
    /// through Redis pub/sub. Waits only for room among the appends in flight and, for a
    /// direct message that may be retried, for its claim (whose message id the inbox writes
    /// need); `then` is called once Redis has stored and published it. The requests are sent
    /// before this returns, so appends are ordered as they were called. Each append completes
    /// in a task of its own.
    async fn append_then(&self, append: Append, except: Option<ConnId>, then: OnCommit) {
        match self.start_append(append, except).await {
            Ok((permit, work)) => requests::spawned(permit, work, then),
            Err(error) => then.call(Err(error)),
        }
    }

    async fn read_room(
        &self,
        room: &str,
        after: Offset,
        limit: usize,
    ) -> Result<StreamRead, StoreError> {
        let (meta, stream) = (self.keys.room(room, META), self.keys.room(room, STREAM));
        self.read_after("read room", meta, stream, after, limit, room)
            .await
    }

    async fn room_bounds(&self, room: &str) -> Result<StreamBounds, StoreError> {
        let (meta, stream) = (self.keys.room(room, META), self.keys.room(room, STREAM));
        let read = self
            .read_after("room bounds", meta, stream, Offset(0), 0, room)
            .await?;
        Ok(read.bounds)
    }

    async fn room_history(
        &self,
        room: &str,
        before: Option<Offset>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let (meta, stream) = (self.keys.room(room, META), self.keys.room(room, STREAM));
        self.read_before("room history", meta, stream, before, limit, Some(room))
            .await
    }

    async fn conversation_history(
        &self,
        user: &str,
        with: &str,
        before: Option<Offset>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let meta = self.keys.conversation(user, with, META);
        let stream = self.keys.conversation(user, with, STREAM);
        self.read_before("conversation history", meta, stream, before, limit, None)
            .await
    }

    async fn read_inbox(
        &self,
        user: &str,
        device: Option<&str>,
        after: Offset,
        limit: usize,
    ) -> Result<InboxRead, StoreError> {
        let mut invocation = SCRIPTS.read_inbox.prepare_invoke();
        invocation
            .key(self.keys.user(user, META))
            .key(self.keys.user(user, STREAM))
            .key(self.keys.user(user, MARKS))
            .arg(device.unwrap_or(""))
            .arg(after.0)
            .arg(limit.min(MAX_READ));
        let reply = self.run("read inbox", invocation).await?;
        let [mark, own, entries] = fields(reply).ok_or_else(|| unexpected("read inbox"))?;
        Ok(InboxRead {
            acked: Offset(int(&mark).ok_or_else(|| unexpected("read inbox"))?),
            device_has_mark: int(&own) == Some(1),
            messages: stored_messages(entries, None, "read inbox")?,
        })
    }

    async fn ack_inbox(
        &self,
        user: &str,
        device: Option<&str>,
        offset: Offset,
    ) -> Result<Offset, StoreError> {
        let mut invocation = SCRIPTS.ack_inbox.prepare_invoke();
        invocation
            .key(self.keys.user(user, META))
            .key(self.keys.user(user, MARKS))
            .key(self.keys.user(user, USES))
            .arg(device.unwrap_or(""))
            .arg(offset.0)
            .arg(self.limits.max_devices_per_user);
        let reply = self.run("ack inbox", invocation).await?;
        let [status, value] = fields(reply).ok_or_else(|| unexpected("ack inbox"))?;
        let value = int(&value).ok_or_else(|| unexpected("ack inbox"))?;
        match int(&status) {
            Some(0) => Ok(Offset(value)),
            _ => Err(StoreError::AckBeyondInbox {
                requested: offset.0,
                newest: value,
            }),
        }
    }

    async fn prune(&self, retention: Retention, now_ms: u64) -> Result<PruneReport, StoreError> {
        let mut report = PruneReport::default();
        for server in self.scanned_servers().await? {
            let mut cursor = 0;
            loop {
                let (next, metas) = self.scan_streams(server.as_ref(), cursor).await?;
                for meta in metas {
                    self.prune_stream(&meta, retention, now_ms, &mut report)
                        .await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(report)
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Every permit back means every append in flight has its reply.
        let _ = self.queue.acquire_many(QUEUE as u32).await;
        self.queue.close();
    }
}
