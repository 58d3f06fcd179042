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
//!   offset spliced in by the receiving node ([`wire`]): a room's frames leave Redis in offset
//!   order. An inbox append publishes the recipient's frame the same way.
//! - A direct message touches several users, so it is one idempotent script per recipient's
//!   inbox, then one per conversation, each keyed by the message id: no transaction spans
//!   users, and a retry completes what a failed attempt left undone without duplicates.
//! - A request recorded within its window is answered with its first attempt's result on any
//!   node: a room append returns the recorded position and stores and publishes nothing; a
//!   direct message goes on under the first attempt's id and timestamp, so its per-recipient
//!   scripts store nothing twice and complete what the first attempt left undone.
//! - `append` sends its requests before it returns (see [`started`]), so appends reach Redis in
//!   the order they were called; conversation writes start in that order too.
//! - Retention finds streams with `SCAN` on the Redis, or on every primary of a Cluster.
//! - Nothing is reported stored before Redis replied; a lost connection is
//!   [`StoreError::Unavailable`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::Poll;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, join_all};
use herald_protocol::Payload;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Script, ScriptInvocation, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::replies::{
    FirstAttempt, claimed, fields, inbox_offset, int, room_appended, stored_messages, text,
    unexpected,
};
use super::{Connection, Keys};
use crate::config::RedisConfig;
use crate::delivery::{Channel, ConnId, Delivery};
use crate::engine::fanout;
use crate::engine::store::{
    Append, Appended, Committing, Epoch, IdempotencyKey, InboxRead, NewMessage, Offset, Page,
    PruneReport, Retention, Store, StoreError, StoreLimits, StreamBounds, StreamPosition,
    StreamRead,
};
use crate::engine::wire;

/// Appends in flight at once; `append` waits for room past it (backpressure on publishers).
/// A request counts against `redis.response_timeout` from the moment it is sent, so the
/// queue stays short enough to be answered well within it: with 16k in flight, a busy node
/// timed appends out.
const QUEUE: usize = 1024;

/// Message ids an inbox or conversation remembers for retries, and for how long after its
/// last write: a retry comes within seconds.
const IDS_REMEMBERED: u64 = 1024;
const IDS_LIFETIME_SECS: u64 = 24 * 3600;

/// Most entries one retention step removes from one stream (one script, during which Redis
/// serves nothing else).
const PRUNE_BUDGET: u64 = 1000;

/// Most entries one read returns, whatever the caller asks: larger counts do not survive
/// the scripts' numbers (doubles) exactly.
const MAX_READ: usize = 1 << 30;

/// Keys a `SCAN` step looks at while a retention pass looks for streams.
const SCAN_COUNT: u64 = 1000;

const STREAM: &str = "stream";
const META: &str = "stream:meta";
const MARKS: &str = "stream:marks";
const USES: &str = "stream:uses";
const SEEN: &str = "stream:seen";
/// Retry records: `retry:FINGERPRINT:…`, one hash per request (see `retry_suffix`).
const RETRY: &str = "retry";

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
    room_append: Script::new(include_str!("scripts/room_append.lua")),
    direct_claim: Script::new(include_str!("scripts/direct_claim.lua")),
    inbox_append: Script::new(include_str!("scripts/inbox_append.lua")),
    conversation_append: Script::new(include_str!("scripts/conversation_append.lua")),
    read_after: Script::new(include_str!("scripts/read_after.lua")),
    read_before: Script::new(include_str!("scripts/read_before.lua")),
    read_inbox: Script::new(include_str!("scripts/read_inbox.lua")),
    ack_inbox: Script::new(include_str!("scripts/ack_inbox.lua")),
    prune_stream: Script::new(include_str!("scripts/prune_stream.lua")),
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

    fn inbox_append(
        &self,
        user: &str,
        message: &NewMessage,
        to: &str,
        delivery: &Delivery,
    ) -> Result<ScriptInvocation<'static>, StoreError> {
        let mut invocation = SCRIPTS.inbox_append.prepare_invoke();
        invocation
            .key(self.keys.user(user, META))
            .key(self.keys.user(user, STREAM))
            .key(self.keys.user(user, MARKS))
            .key(self.keys.user(user, SEEN))
            .key(self.keys.channel(&Channel::User(user.into())))
            .arg(Epoch::random().0)
            .arg(self.publish)
            .arg(&awaiting_offset(delivery)?[..])
            .arg(self.limits.max_inbox_messages)
            .arg(IDS_REMEMBERED)
            .arg(IDS_LIFETIME_SECS)
            .arg(&message.id)
            .arg(&*message.from)
            .arg(to)
            .arg(message.ts);
        content_args(&mut invocation, &message.content);
        Ok(invocation)
    }

    fn conversation_append(
        &self,
        with: &str,
        message: &NewMessage,
        to: &str,
    ) -> ScriptInvocation<'static> {
        let key = |suffix| self.keys.conversation(&message.from, with, suffix);
        let mut invocation = SCRIPTS.conversation_append.prepare_invoke();
        invocation
            .key(key(META))
            .key(key(STREAM))
            .key(key(SEEN))
            .arg(Epoch::random().0)
            .arg(IDS_REMEMBERED)
            .arg(IDS_LIFETIME_SECS)
            .arg(&message.id)
            .arg(&*message.from)
            .arg(to)
            .arg(message.ts);
        content_args(&mut invocation, &message.content);
        invocation
    }

    /// Claims a direct message's request for its sender (see `direct_claim.lua`) and, when an
    /// earlier attempt claimed it, takes that attempt's message id and timestamp. Returns
    /// whether it was earlier.
    async fn claim_direct(&self, message: &mut NewMessage) -> Result<bool, StoreError> {
        let Some(key) = &message.idempotency else {
            return Ok(false);
        };
        let mut invocation = SCRIPTS.direct_claim.prepare_invoke();
        invocation
            .key(self.keys.user(&message.from, &retry_suffix(key, None)))
            .arg(&message.id)
            .arg(message.ts)
            .arg(window_millis(key));
        let first = claimed(self.run("append", invocation).await?)?;
        if first.id == message.id {
            return Ok(false);
        }
        let FirstAttempt { id, ts } = first;
        message.id = id;
        message.ts = ts;
        Ok(true)
    }

    async fn start(
        &self,
        invocation: ScriptInvocation<'static>,
    ) -> BoxFuture<'static, redis::RedisResult<Value>> {
        start(&self.connection, invocation).await
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

    async fn read_after(
        &self,
        operation: &'static str,
        meta: String,
        stream: String,
        after: Offset,
        limit: usize,
        room: &str,
    ) -> Result<StreamRead, StoreError> {
        let mut invocation = SCRIPTS.read_after.prepare_invoke();
        invocation
            .key(meta)
            .key(stream)
            .arg(after.0)
            .arg(limit.min(MAX_READ));
        let reply = self.run(operation, invocation).await?;
        let unexpected = || unexpected(operation);
        let [epoch, last, first, entries] = fields(reply).ok_or_else(unexpected)?;
        let last = Offset(int(&last).ok_or_else(unexpected)?);
        let first = match int(&first).ok_or_else(unexpected)? {
            0 => last.next(),
            first => Offset(first),
        };
        Ok(StreamRead {
            bounds: StreamBounds {
                top: StreamPosition {
                    offset: last,
                    epoch: Epoch(text(epoch).ok_or_else(unexpected)?),
                },
                first,
            },
            messages: stored_messages(entries, Some(room), operation)?,
        })
    }

    async fn read_before(
        &self,
        operation: &'static str,
        meta: String,
        stream: String,
        before: Option<Offset>,
        limit: usize,
        room: Option<&str>,
    ) -> Result<Page, StoreError> {
        // The script reads from the newest when told 0; an explicit 0 has nothing below it.
        let before = match before {
            None => 0,
            Some(Offset(0)) => 1,
            Some(offset) => offset.0,
        };
        let mut invocation = SCRIPTS.read_before.prepare_invoke();
        invocation
            .key(meta)
            .key(stream)
            .arg(before)
            .arg(limit.min(MAX_READ));
        let reply = self.run(operation, invocation).await?;
        let [epoch, entries] = fields(reply).ok_or_else(|| unexpected(operation))?;
        let mut messages = stored_messages(entries, room, operation)?;
        let more = messages.len() > limit;
        messages.truncate(limit);
        messages.reverse();
        Ok(Page {
            epoch: Epoch(text(epoch).ok_or_else(|| unexpected(operation))?),
            messages,
            more,
        })
    }

    /// The servers whose keys a retention pass scans: the one Redis, or every Cluster primary
    /// (`host`, `port`), since `SCAN` walks one server's keys.
    async fn scanned_servers(&self) -> Result<Vec<Option<(String, u16)>>, StoreError> {
        let Connection::Cluster(connection) = &self.connection else {
            return Ok(vec![None]);
        };
        let every_primary = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
        let replies = connection
            .clone()
            .route_command(redis::cmd("PING"), every_primary)
            .await
            .map_err(failed("prune"))?;
        let Value::Map(replies) = replies else {
            return Err(unexpected("prune"));
        };
        replies
            .into_iter()
            .map(|(address, _)| {
                let address = text(address).ok_or_else(|| unexpected("prune"))?;
                let (host, port) = address
                    .rsplit_once(':')
                    .ok_or_else(|| unexpected("prune"))?;
                let port = port.parse().map_err(|_| unexpected("prune"))?;
                Ok(Some((host.to_owned(), port)))
            })
            .collect()
    }

    /// One `SCAN` step over a server's stream meta keys.
    async fn scan_streams(
        &self,
        server: Option<&(String, u16)>,
        cursor: u64,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let pattern = format!("{}:{{*}}:{META}", glob_escape(self.keys.prefix()));
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let reply = match (&self.connection, server) {
            (Connection::Cluster(connection), Some((host, port))) => {
                let server = SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                };
                connection
                    .clone()
                    .route_command(scan, RoutingInfo::SingleNode(server))
                    .await
            }
            (connection, _) => scan.query_async(&mut connection.clone()).await,
        };
        redis::from_redis_value(reply.map_err(failed("prune"))?).map_err(|_| unexpected("prune"))
    }

    /// Prunes one stream, step by step, into `report`.
    async fn prune_stream(
        &self,
        meta: &str,
        retention: Retention,
        now_ms: u64,
        report: &mut PruneReport,
    ) -> Result<(), StoreError> {
        let Some(base) = meta.strip_suffix(META) else {
            return Ok(());
        };
        let Some(name) = meta
            .strip_prefix(self.keys.prefix())
            .and_then(|rest| rest.strip_prefix(":{"))
        else {
            return Ok(());
        };
        let older_than = |age: std::time::Duration| {
            if age.is_zero() {
                0
            } else {
                now_ms.saturating_sub(age.as_millis() as u64)
            }
        };
        let (kind, keep, old_before, others): (_, _, _, &[&str]) = if name.starts_with("room:") {
            (
                "room",
                retention.room_max_messages,
                older_than(retention.room_max_age),
                &[],
            )
        } else if name.starts_with("user:") {
            (
                "inbox",
                0,
                older_than(retention.inbox_max_age),
                &[MARKS, USES, SEEN],
            )
        } else if name.starts_with("conv:") {
            (
                "conversation",
                0,
                older_than(retention.inbox_max_age),
                &[SEEN],
            )
        } else {
            return Ok(());
        };
        loop {
            let mut invocation = SCRIPTS.prune_stream.prepare_invoke();
            invocation.key(meta).key(format!("{base}{STREAM}"));
            for suffix in others {
                invocation.key(format!("{base}{suffix}"));
            }
            invocation
                .arg(kind)
                .arg(keep)
                .arg(old_before)
                .arg(PRUNE_BUDGET);
            let reply = self.run("prune", invocation).await?;
            let [removed, gone, more] = fields(reply).ok_or_else(|| unexpected("prune"))?;
            let removed = int(&removed).ok_or_else(|| unexpected("prune"))?;
            match kind {
                "room" => report.room_messages += removed,
                "inbox" => report.inbox_entries += removed,
                _ => report.direct_messages += removed,
            }
            report.empty_streams += int(&gone).ok_or_else(|| unexpected("prune"))?;
            if int(&more) != Some(1) {
                return Ok(());
            }
        }
    }
}

/// Runs the rest of an append (waiting for Redis's replies) in a task of its own, which holds
/// the append's place in the queue until Redis has answered. Tied to the caller's polling
/// instead, a caller waiting for room in the queue while it holds unpolled appends (a
/// pipelining session) would never free it.
fn spawned(
    permit: OwnedSemaphorePermit,
    work: impl Future<Output = Result<Appended, StoreError>> + Send + 'static,
) -> Committing {
    let (done, outcome) = oneshot::channel();
    tokio::spawn(async move {
        let result = work.await;
        drop(permit);
        let _ = done.send(result);
    });
    async move {
        outcome.await.unwrap_or_else(|_| {
            Err(StoreError::Backend {
                operation: "append",
                reason: "the append's task ended without an outcome".into(),
            })
        })
    }
    .boxed()
}

/// Sends a script's request now: see [`started`].
async fn start(
    connection: &Connection,
    invocation: ScriptInvocation<'static>,
) -> BoxFuture<'static, redis::RedisResult<Value>> {
    let mut connection = connection.clone();
    started(async move { invocation.invoke_async(&mut connection).await }.boxed()).await
}

/// Polls `future` once, here, and hands it back to be awaited later. A Redis request enters
/// the connection's queue at its first poll (the queue never fills: see `PIPELINE_BUFFER` in
/// `engine/redis/mod.rs`), and a lock's waiter its fair queue, so what is started in call
/// order reaches Redis in call order, while the caller decides when to wait for the replies. That first poll runs outside tokio's cooperative
/// budget: once a task has spent it, channels and locks answer `Pending` without queueing,
/// and the request would be queued at a later poll, out of order.
async fn started<T: Send + 'static>(mut future: BoxFuture<'static, T>) -> BoxFuture<'static, T> {
    let first = tokio::task::unconstrained(futures::future::poll_fn(|cx| {
        Poll::Ready(future.as_mut().poll(cx))
    }))
    .await;
    match first {
        Poll::Ready(output) => futures::future::ready(output).boxed(),
        Poll::Pending => future,
    }
}

/// The message as it will be appended, with placeholder offsets in its frames: the scripts
/// splice the real ones in.
fn awaiting_offsets(append: Append) -> Appended {
    match append {
        Append::Room { room, message } => Appended::Room {
            room,
            message,
            position: StreamPosition {
                offset: Offset(wire::PLACEHOLDER),
                epoch: Epoch::default(),
            },
        },
        Append::Direct {
            to,
            recipients,
            message,
        } => Appended::Direct {
            to,
            message,
            inbox: recipients
                .into_iter()
                .map(|user| (user, Offset(wire::PLACEHOLDER)))
                .collect(),
        },
    }
}

/// The envelope of a frame encoded with the placeholder offset, ready for a script to append
/// the real offset's digits.
fn awaiting_offset(delivery: &Delivery) -> Result<Bytes, StoreError> {
    wire::encode_delivery_awaiting_offset(delivery).ok_or_else(|| StoreError::Backend {
        operation: "append",
        reason: "the encoded frame holds no offset placeholder".into(),
    })
}

fn no_frame(kind: &'static str) -> StoreError {
    StoreError::Backend {
        operation: "append",
        reason: format!("no frame was encoded for the {kind} message"),
    }
}

/// The two script arguments that carry a message's content: whether it is binary, and its
/// bytes.
fn content_args(invocation: &mut ScriptInvocation<'static>, content: &Payload) {
    match content {
        Payload::Json(raw) => invocation.arg(0).arg(raw.get().as_bytes()),
        Payload::Binary(bytes) => invocation.arg(1).arg(&bytes[..]),
    };
}

/// A failed command: `Unavailable` when the connection or a timeout caused it (the write may
/// or may not have happened; a retry of a direct message is safe), `Backend` otherwise.
fn failed(operation: &'static str) -> impl Fn(redis::RedisError) -> StoreError {
    move |error| {
        let temporary = error.is_io_error()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_cluster_error();
        if temporary {
            StoreError::Unavailable {
                operation,
                reason: error.to_string(),
            }
        } else {
            StoreError::Backend {
                operation,
                reason: error.to_string(),
            }
        }
    }
}

/// The key suffix of a request's retry record: the fingerprint (fixed length) first, then for
/// a room the sender (a name holds no space) and a space, then the request id. Kept whole
/// rather than hashed, so one user's records can never collide with another's.
fn retry_suffix(key: &IdempotencyKey, user: Option<&str>) -> String {
    let fingerprint = key.fingerprint;
    match user {
        Some(user) => format!("{RETRY}:{fingerprint:032x}:{user} {}", key.request),
        None => format!("{RETRY}:{fingerprint:032x}:{}", key.request),
    }
}

/// A retry record's lifetime: the key's window, at least a millisecond (`PEXPIRE` 0 deletes).
fn window_millis(key: &IdempotencyKey) -> u64 {
    u64::try_from(key.window.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// `text` matched literally by a `SCAN` pattern.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
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
    /// need); the returned future resolves once Redis has stored and published it. The
    /// requests are sent before this returns, so appends are ordered as they were called. Each
    /// append completes in a task of its own, even if the future is dropped or polled late.
    async fn append(
        &self,
        mut append: Append,
        except: Option<ConnId>,
    ) -> Result<Committing, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let permit = self
            .queue
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let retried = match &mut append {
            Append::Direct { message, .. } => self.claim_direct(message).await?,
            Append::Room { .. } => false,
        };
        let mut appended = awaiting_offsets(append);
        let frames = fanout::frames(&appended, except);
        match &appended {
            Appended::Room { room, message, .. } => {
                let (channel, delivery) = frames.first().ok_or_else(|| no_frame("room"))?;
                let (meta, stream) = (self.keys.room(room, META), self.keys.room(room, STREAM));
                let mut invocation = SCRIPTS.room_append.prepare_invoke();
                invocation
                    .key(meta)
                    .key(stream)
                    .key(self.keys.channel(channel))
                    .arg(Epoch::random().0)
                    .arg(self.publish)
                    .arg(&awaiting_offset(delivery)?[..])
                    .arg(&message.id)
                    .arg(&*message.from)
                    .arg(message.ts);
                content_args(&mut invocation, &message.content);
                if let Some(key) = &message.idempotency {
                    let suffix = retry_suffix(key, Some(&message.from));
                    invocation
                        .key(self.keys.room(room, &suffix))
                        .arg(window_millis(key));
                }
                let request = self.start(invocation).await;
                Ok(spawned(permit, async move {
                    let reply = request.await.map_err(failed("append"))?;
                    let (stored_at, first) = room_appended(reply)?;
                    if let Appended::Room {
                        position, message, ..
                    } = &mut appended
                    {
                        *position = stored_at;
                        if let Some(FirstAttempt { id, ts }) = first {
                            message.id = id;
                            message.ts = ts;
                        }
                    }
                    Ok(appended)
                }))
            }
            Appended::Direct { inbox, .. } if inbox.is_empty() => {
                Ok(futures::future::ready(Ok(appended)).boxed())
            }
            Appended::Direct { to, message, inbox } => {
                let to = serde_json::to_string(to).map_err(|error| StoreError::Backend {
                    operation: "append",
                    reason: error.to_string(),
                })?;
                let mut inbox_requests = Vec::with_capacity(inbox.len());
                let mut conversations = Vec::with_capacity(inbox.len());
                for (user, _) in inbox {
                    let delivery = frames
                        .iter()
                        .find(|(channel, delivery)| {
                            delivery.offset.is_some()
                                && matches!(channel, Channel::User(name) if **name == **user)
                        })
                        .map(|(_, delivery)| delivery)
                        .ok_or_else(|| no_frame("direct"))?;
                    let invocation = self.inbox_append(user, message, &to, delivery)?;
                    inbox_requests.push(self.start(invocation).await);
                    conversations.push(self.conversation_append(user, message, &to));
                }
                let sender_copy = frames
                    .iter()
                    .find(|(_, delivery)| delivery.offset.is_none())
                    .map(|(channel, delivery)| {
                        let mut publish = redis::cmd(self.publish);
                        publish
                            .arg(self.keys.channel(channel))
                            .arg(&wire::encode_delivery(delivery)[..]);
                        publish
                    });
                let turn = started(self.conversation_turn.clone().lock_owned().boxed()).await;
                let connection = self.connection.clone();
                let limit = self.limits.max_inbox_messages;
                // The turn is passed on as soon as the inbox replies are in: the message's
                // own task (see `spawned`) waits for them, however late the caller polls.
                Ok(spawned(permit, async move {
                    let replies = join_all(inbox_requests).await;
                    let mut stored = Vec::with_capacity(replies.len());
                    let mut full = Vec::new();
                    let mut failure = None;
                    if let Appended::Direct { inbox, .. } = &mut appended {
                        for ((user, offset), reply) in inbox.iter_mut().zip(replies) {
                            let outcome = reply.map_err(failed("append")).and_then(inbox_offset);
                            stored.push(matches!(outcome, Ok(Some(_))));
                            match outcome {
                                Ok(Some(at)) => *offset = at,
                                Ok(None) => full.push(user.clone()),
                                Err(error) => {
                                    failure.get_or_insert(error);
                                }
                            }
                        }
                    }
                    let turn = turn.await;
                    let mut requests = Vec::with_capacity(conversations.len());
                    for (invocation, stored) in conversations.into_iter().zip(stored) {
                        if stored {
                            requests.push(start(&connection, invocation).await);
                        }
                    }
                    // A retried request's first attempt published the sender's copy (or failed
                    // before its inbox writes: pub/sub is at-most-once, and the sender's other
                    // connections find the message in history).
                    let sender_copy = match sender_copy {
                        Some(publish) if !retried && full.is_empty() && failure.is_none() => {
                            let mut connection = connection.clone();
                            Some(
                                started(
                                    async move {
                                        publish.query_async::<Value>(&mut connection).await
                                    }
                                    .boxed(),
                                )
                                .await,
                            )
                        }
                        _ => None,
                    };
                    drop(turn);
                    let written = join_all(requests).await;
                    if let Some(published) = sender_copy
                        && let Err(error) = published.await
                    {
                        // Pub/sub is at-most-once: the message is stored, which is what the
                        // sender is told; their other connections find it in history.
                        tracing::warn!(%error, "the sender's copy of a direct message was not published");
                    }
                    if let Some(error) = failure {
                        return Err(error);
                    }
                    for reply in written {
                        reply.map_err(failed("append"))?;
                    }
                    if !full.is_empty() {
                        return Err(StoreError::InboxFull { users: full, limit });
                    }
                    Ok(appended)
                }))
            }
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
