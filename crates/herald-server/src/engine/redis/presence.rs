//! Redis presence: entries per connection, owned by the node that holds the connection, kept
//! alive by that node's heartbeat and reaped by a surviving node once the heartbeat stops.
//!
//! Keys (each script touches one hash tag, so one Cluster shard):
//! - `{room:R}:conns` hash connection → user, and `{room:R}:users` hash user → number of their
//!   connections in the room. One script per join and per leave updates both, so "first
//!   connection in / last connection out" is decided atomically per room, once across nodes.
//! - `{user:U}:conns` hash connection → node: the user's open connections, anywhere.
//! - `{node:N}:rooms` hash (connection ‖ room) → user and `{node:N}:users` hash connection →
//!   user: the index of node N's entries (N is the node id and a random suffix per process), written before an entry and removed after it, so a
//!   reaper finds every entry a dead node left (at worst one that is already gone).
//! - `{global}:nodes` sorted set node → deadline (ms, Redis clock): each node's heartbeat, every
//!   `presence_ttl / 3`, pushes its deadline `presence_ttl` ahead.
//! - `{global}:reaping` sorted set node → lease deadline: a dead node being reaped. Claiming a
//!   dead node moves it there atomically, so one reaper works on it; if that reaper dies, its
//!   lease runs out and another takes over (removals that already happened are not repeated,
//!   so each leave is still reported once).
//! - `{global}:rooms` set of rooms with users, for `rooms()`.
//! - `{room:R}:count-claim` string, expiring after `presence.count_window`: the node that sends
//!   the big room's count for that window (see [`Presence::claim_count`]).
//!
//! Refreshing the node's liveness instead of each entry keeps the heartbeat one command
//! whatever the number of connections. A node reaps others only after it has itself been
//! heartbeating for `presence_ttl`, so after a Redis outage every live node has refreshed before
//! anyone judges who is dead.
//!
//! Re-asserting: a heartbeat that finds the node unregistered (Redis lost its data, or other
//! nodes reaped it while it could not refresh) or that succeeds after a failed one (the
//! connection came back, perhaps to an emptied or failed-over Redis) makes the node write back
//! every entry it owns, read from [`PresenceHandler::local_entries`] (the node's hub already
//! holds them, so the presence keeps no copy). In this order, so that a reaper cannot remove
//! what is re-asserted: the heartbeat registers the node first, and the entries are written
//! only once the node is no longer in `{global}:reaping` (a reaper that claimed it has
//! finished), each index entry before its entry. A re-assertion runs beside the heartbeat,
//! which keeps beating meanwhile. Writes are idempotent (`HSETNX` in the join script, `HSET`
//! of the same value), so re-asserting what Redis still holds changes nothing and announces
//! nobody. A re-assertion also runs after a leave or disconnect failed, and ends by removing
//! the entries of the node's index that its connections no longer hold: a join whose rollback
//! never reached Redis would otherwise keep its user in the room until the node dies. What
//! stays out of reach: a reaper stalled past its lease (`presence_ttl`) while another finished
//! the same node may still remove entries re-asserted after that; and a connection that leaves
//! and joins the same room again while the index is compared may lose its new entry.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use redis::Script;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Connection, Keys, connect};
use crate::config::RedisConfig;
use crate::delivery::ConnId;
use crate::engine::EngineError;
use crate::engine::presence::{
    CountClaim, LocalEntry, Presence, PresenceHandler, RoomChange, RoomCount,
};

/// A dead node's entries removed at once while reaping, and connections re-asserted at once.
const REAP_CHUNK: usize = 256;

/// KEYS: room conns, room users. ARGV: connection, user. Returns {entered, users}.
const JOIN: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return {0, redis.call('HLEN', KEYS[2])}
end
local n = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return {n == 1 and 1 or 0, redis.call('HLEN', KEYS[2])}
";

/// KEYS: room conns, room users. ARGV: connection. Returns {left, users}.
const LEAVE: &str = r"
local user = redis.call('HGET', KEYS[1], ARGV[1])
if not user then
  return {0, redis.call('HLEN', KEYS[2])}
end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
  redis.call('HDEL', KEYS[2], user)
  return {1, redis.call('HLEN', KEYS[2])}
end
return {0, redis.call('HLEN', KEYS[2])}
";

/// KEYS: nodes, reaping. ARGV: node, ttl ms. Returns {registered, reaping}: registered is 1
/// when the node was not registered (new, reaped while it could not refresh, or Redis lost
/// it), reaping is 1 while a reaper holds the node's claim.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local added = redis.call('ZADD', KEYS[1], string.format('%d', now + tonumber(ARGV[2])), ARGV[1])
local reaping = redis.call('ZSCORE', KEYS[2], ARGV[1]) and 1 or 0
return {added, reaping}
";

/// KEYS: nodes, reaping. ARGV: lease ms. Claims one dead node (or one whose reaper's lease ran
/// out) and returns it, or nil.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = string.format('%d', now + tonumber(ARGV[1]))
now = string.format('%d', now)
local dead = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, 1)[1]
if dead then
  redis.call('ZREM', KEYS[1], dead)
  redis.call('ZADD', KEYS[2], lease, dead)
  return dead
end
local stale = redis.call('ZRANGE', KEYS[2], '-inf', now, 'BYSCORE', 'LIMIT', 0, 1)[1]
if stale then
  redis.call('ZADD', KEYS[2], lease, stale)
  return stale
end
return false
";

/// KEYS: the room's count claim. ARGV: node, window ms. Returns -1 when this node claimed the
/// window, else the milliseconds left to the claim another node holds.
const CLAIM_COUNT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return -1
end
return redis.call('PTTL', KEYS[1])
";

pub struct RedisPresence {
    inner: Arc<Inner>,
    /// Stops the heartbeat when the presence is dropped, as a crash would (entries stay).
    _stop: DropGuard,
}

struct Inner {
    /// This process's incarnation of the node: the owner of its entries.
    node: String,
    keys: Keys,
    ttl: Duration,
    connection: Connection,
    join: Script,
    leave: Script,
    heartbeat: Script,
    claim: Script,
    claim_count: Script,
    /// A leave or disconnect failed: Redis may keep an entry this node no longer holds. The
    /// next heartbeat that succeeds re-asserts, and a re-assertion removes such entries.
    removal_failed: AtomicBool,
    // Weak: the node owns its presence, so a strong reference back would leak both.
    handler: OnceLock<Weak<dyn PresenceHandler>>,
    stop: CancellationToken,
    /// The heartbeat task, awaited by `close` before it removes the entries, so that no
    /// re-assertion writes after the removal. std Mutex: only taken to store or take it.
    heartbeat_task: Mutex<Option<JoinHandle<()>>>,
}

/// What one heartbeat found.
struct Beat {
    /// The node had to be registered again: its entries may be gone.
    registered: bool,
    /// A reaper holds the node's claim and may still be removing its entries.
    reaping: bool,
}

impl RedisPresence {
    /// Connects and registers this process as an incarnation of node `node` (its first
    /// heartbeat), so entries it writes afterwards are covered. Fails, naming the URL, when
    /// Redis cannot be reached.
    ///
    /// Entries are owned by the incarnation (`NODE~RANDOM`), not by the configured node id: a
    /// node restarted under the same id before its old entries were reaped would otherwise
    /// keep them alive forever; this way the old incarnation is reaped like any dead node.
    pub async fn connect(node: &str, config: &RedisConfig) -> Result<RedisPresence, EngineError> {
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            node: format!("{node}~{:08x}", rand::random::<u32>()),
            keys: Keys::new(&config.key_prefix),
            ttl: config.presence_ttl,
            connection: connect(config).await?,
            join: Script::new(JOIN),
            leave: Script::new(LEAVE),
            heartbeat: Script::new(HEARTBEAT),
            claim: Script::new(CLAIM),
            claim_count: Script::new(CLAIM_COUNT),
            removal_failed: AtomicBool::new(false),
            handler: OnceLock::new(),
            stop: stop.clone(),
            heartbeat_task: Mutex::new(None),
        });
        inner.beat().await?;
        Ok(RedisPresence {
            inner,
            _stop: stop.drop_guard(),
        })
    }
}

fn failed(operation: &str) -> impl FnOnce(redis::RedisError) -> EngineError + '_ {
    move |error| EngineError::from_redis("presence", operation, error)
}

impl Inner {
    fn conn(&self) -> Connection {
        self.connection.clone()
    }

    fn nodes_key(&self) -> String {
        self.keys.global("nodes")
    }

    fn rooms_key(&self) -> String {
        self.keys.global("rooms")
    }

    /// Pushes this node's deadline ahead (registering it if Redis had lost it).
    async fn beat(&self) -> Result<Beat, EngineError> {
        let (registered, reaping): (i64, i64) = self
            .heartbeat
            .key(self.nodes_key())
            .key(self.keys.global("reaping"))
            .arg(&self.node)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(failed("heartbeat"))?;
        Ok(Beat {
            registered: registered == 1,
            reaping: reaping == 1,
        })
    }

    /// Adds one connection's entry to a room, index first: (whether its user entered, users
    /// afterwards). A connection already in the room changes nothing.
    async fn join_room(
        &self,
        room: &str,
        user: &str,
        conn: &str,
    ) -> Result<(bool, u64), EngineError> {
        redis::cmd("HSET")
            .arg(self.keys.node(&self.node, "rooms"))
            .arg(room_field(conn, room))
            .arg(user)
            .exec_async(&mut self.conn())
            .await
            .map_err(failed("join"))?;
        let (entered, count): (i64, u64) = self
            .join
            .key(self.keys.room(room, "conns"))
            .key(self.keys.room(room, "users"))
            .arg(conn)
            .arg(user)
            .invoke_async(&mut self.conn())
            .await
            .map_err(failed("join"))?;
        if count == 1 && entered == 1 {
            redis::cmd("SADD")
                .arg(self.rooms_key())
                .arg(room)
                .exec_async(&mut self.conn())
                .await
                .map_err(failed("join"))?;
        }
        Ok((entered == 1, count))
    }

    /// Removes one connection's entry from a room, then its index entry.
    async fn leave_own_room(&self, room: &str, conn: &str) -> Result<(bool, u64), EngineError> {
        let left = self.leave_room(room, conn).await?;
        self.hdel(self.keys.node(&self.node, "rooms"), &room_field(conn, room))
            .await?;
        Ok(left)
    }

    /// Records an open connection, index first.
    async fn connect_user(&self, user: &str, conn: &str) -> Result<(), EngineError> {
        redis::cmd("HSET")
            .arg(self.keys.node(&self.node, "users"))
            .arg(conn)
            .arg(user)
            .exec_async(&mut self.conn())
            .await
            .map_err(failed("connect"))?;
        redis::cmd("HSET")
            .arg(self.keys.user(user, "conns"))
            .arg(conn)
            .arg(&self.node)
            .exec_async(&mut self.conn())
            .await
            .map_err(failed("connect"))
    }

    /// Removes an open connection, then its index entry.
    async fn disconnect_user(&self, user: &str, conn: &str) -> Result<(), EngineError> {
        self.hdel(self.keys.user(user, "conns"), conn).await?;
        self.hdel(self.keys.node(&self.node, "users"), conn).await
    }

    /// Removes one connection's entry from a room: (whether its user left, users afterwards).
    /// Keeps `{global}:rooms` true: a room emptied leaves the set, then is put back if someone
    /// joined meanwhile (a joiner adds it after its own script), so the set never misses a room
    /// with users.
    async fn leave_room(&self, room: &str, conn: &str) -> Result<(bool, u64), EngineError> {
        let (left, count): (i64, u64) = self
            .leave
            .key(self.keys.room(room, "conns"))
            .key(self.keys.room(room, "users"))
            .arg(conn)
            .invoke_async(&mut self.conn())
            .await
            .map_err(failed("leave"))?;
        if left == 1 && count == 0 {
            let mut connection = self.conn();
            redis::cmd("SREM")
                .arg(self.rooms_key())
                .arg(room)
                .exec_async(&mut connection)
                .await
                .map_err(failed("leave"))?;
            let users: u64 = redis::cmd("HLEN")
                .arg(self.keys.room(room, "users"))
                .query_async(&mut connection)
                .await
                .map_err(failed("leave"))?;
            if users > 0 {
                redis::cmd("SADD")
                    .arg(self.rooms_key())
                    .arg(room)
                    .exec_async(&mut connection)
                    .await
                    .map_err(failed("leave"))?;
            }
        }
        Ok((left == 1, count))
    }

    async fn hdel(&self, key: String, field: &str) -> Result<(), EngineError> {
        redis::cmd("HDEL")
            .arg(key)
            .arg(field)
            .exec_async(&mut self.conn())
            .await
            .map_err(failed("remove an index entry"))
    }

    /// Runs the heartbeat until the presence stops, then ends a re-assertion under way.
    async fn run(self: Arc<Self>) {
        let mut reasserting = None;
        self.clone().heartbeat(&mut reasserting).await;
        if let Some(task) = reasserting {
            task.abort();
            let _ = task.await;
        }
    }

    /// Heartbeats every `presence_ttl / 3`, re-asserts this node's entries when they may be
    /// lost and, once healthy for `presence_ttl`, reaps dead nodes.
    async fn heartbeat(
        self: Arc<Self>,
        reasserting: &mut Option<JoinHandle<Result<(), EngineError>>>,
    ) {
        let mut ticker = tokio::time::interval(self.ttl / 3);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut healthy_since = Some(Instant::now());
        let mut reassert_wanted = false;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let beat = match self.beat().await {
                Ok(beat) => beat,
                Err(error) => {
                    tracing::warn!(%error, "presence heartbeat failed");
                    healthy_since = None;
                    continue;
                }
            };
            if beat.registered {
                tracing::warn!(
                    node = %self.node,
                    "presence: this node was missing from Redis (its data was lost, or the node \
                     missed its heartbeats for redis.presence_ttl and was reaped); re-asserting \
                     its entries"
                );
            }
            reassert_wanted |= beat.registered
                || healthy_since.is_none()
                || self.removal_failed.swap(false, Ordering::Relaxed);
            healthy_since.get_or_insert_with(Instant::now);
            if let Some(task) = reasserting.take_if(|task| task.is_finished()) {
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "presence: re-asserting entries failed; retrying");
                        reassert_wanted = true;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "presence: re-asserting entries ended; retrying");
                        reassert_wanted = true;
                    }
                }
            }
            // While a reaper holds this node, what it has not removed yet could be removed
            // after being written again: wait for it to finish.
            if reassert_wanted && reasserting.is_none() && !beat.reaping {
                reassert_wanted = false;
                *reasserting = Some(tokio::spawn(self.clone().reassert()));
            }
            if healthy_since.is_some_and(|since| since.elapsed() >= self.ttl) {
                let reaping = self.reap_dead_nodes();
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    result = reaping => if let Err(error) = result {
                        tracing::warn!(%error, "presence: reaping dead nodes failed");
                    }
                }
            }
        }
    }

    /// Writes back every entry this node owns, then removes those whose connection left the
    /// node's records meanwhile (the contract in [`crate::engine::presence`]).
    async fn reassert(self: Arc<Self>) -> Result<(), EngineError> {
        let Some(handler) = self.handler.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        let entries = handler.local_entries();
        tracing::info!(
            node = %self.node,
            connections = entries.len(),
            "presence: re-asserting this node's entries"
        );
        for chunk in entries.chunks(REAP_CHUNK) {
            let writes = chunk
                .iter()
                .map(|entry| self.reassert_entry(entry, handler.as_ref()));
            join_all(writes)
                .await
                .into_iter()
                .collect::<Result<(), _>>()?;
        }
        let current: HashMap<ConnId, LocalEntry> = handler
            .local_entries()
            .into_iter()
            .map(|entry| (entry.conn, entry))
            .collect();
        for entry in &entries {
            let conn = entry.conn.to_string();
            let still = current.get(&entry.conn);
            for room in &entry.rooms {
                if still.is_some_and(|now| now.rooms.contains(room)) {
                    continue;
                }
                let (left, count) = self.leave_own_room(room, &conn).await?;
                if left {
                    handler.expired(room, &entry.user, count).await;
                }
            }
            if still.is_none() {
                self.disconnect_user(&entry.user, &conn).await?;
            }
        }
        self.remove_unheld(handler.as_ref()).await
    }

    /// Removes the entries of this node's index that its records no longer hold: a leave or
    /// disconnect that never reached Redis (a join whose rollback failed as the connection to
    /// Redis dropped) would otherwise keep a user in a room, or online, until the node dies.
    /// The index is read before the records, so an entry written since is in them (the node
    /// adds a connection to its records before it writes the entry).
    async fn remove_unheld(&self, handler: &dyn PresenceHandler) -> Result<(), EngineError> {
        let (rooms, connections) = self.index(&self.node).await?;
        let held = handler.local_entries();
        let held_connections: HashSet<String> =
            held.iter().map(|entry| entry.conn.to_string()).collect();
        let held_rooms: HashSet<String> = held
            .iter()
            .flat_map(|entry| {
                let conn = entry.conn.to_string();
                entry.rooms.iter().map(move |room| room_field(&conn, room))
            })
            .collect();
        let rooms: Vec<_> = rooms
            .into_iter()
            .filter(|(field, _)| !held_rooms.contains(field))
            .collect();
        let connections: Vec<_> = connections
            .into_iter()
            .filter(|(conn, _)| !held_connections.contains(conn))
            .collect();
        if !rooms.is_empty() || !connections.is_empty() {
            tracing::warn!(
                node = %self.node,
                rooms = rooms.len(),
                connections = connections.len(),
                "presence: removing entries this node no longer holds (a removal had failed)"
            );
        }
        self.remove_room_entries(&self.node, &rooms).await?;
        self.remove_connections(&self.node, &connections).await
    }

    async fn reassert_entry(
        &self,
        entry: &LocalEntry,
        handler: &dyn PresenceHandler,
    ) -> Result<(), EngineError> {
        let conn = entry.conn.to_string();
        self.connect_user(&entry.user, &conn).await?;
        for room in &entry.rooms {
            let (entered, count) = self.join_room(room, &entry.user, &conn).await?;
            if entered {
                handler.reappeared(room, &entry.user, count).await;
            }
        }
        Ok(())
    }

    async fn reap_dead_nodes(&self) -> Result<(), EngineError> {
        let reaping_key = self.keys.global("reaping");
        loop {
            let dead: Option<String> = self
                .claim
                .key(self.nodes_key())
                .key(&reaping_key)
                .arg(self.ttl.as_millis() as u64)
                .invoke_async(&mut self.conn())
                .await
                .map_err(failed("claim a dead node"))?;
            let Some(dead) = dead else { return Ok(()) };
            if dead != self.node {
                tracing::info!(node = %dead, "presence: reaping the entries of a dead node");
                self.remove_entries(&dead).await?;
            }
            redis::cmd("ZREM")
                .arg(&reaping_key)
                .arg(&dead)
                .exec_async(&mut self.conn())
                .await
                .map_err(failed("release a reaped node"))?;
        }
    }

    /// Removes every entry `node` owns, telling the handler about each user who left a room.
    async fn remove_entries(&self, node: &str) -> Result<(), EngineError> {
        let (rooms, connections) = self.index(node).await?;
        self.remove_room_entries(node, &rooms).await?;
        self.remove_connections(node, &connections).await
    }

    /// `node`'s index: its room entries (connection ‖ room → user), then its connections
    /// (connection → user).
    async fn index(&self, node: &str) -> Result<(IndexEntries, IndexEntries), EngineError> {
        let mut connection = self.conn();
        let mut read = async |suffix| -> Result<IndexEntries, EngineError> {
            redis::cmd("HGETALL")
                .arg(self.keys.node(node, suffix))
                .query_async(&mut connection)
                .await
                .map_err(failed("read a node's entries"))
        };
        let rooms = read("rooms").await?;
        Ok((rooms, read("users").await?))
    }

    /// Removes room entries of `node`'s index, telling the handler about each user who left.
    async fn remove_room_entries(
        &self,
        node: &str,
        entries: &[(String, String)],
    ) -> Result<(), EngineError> {
        let rooms_index = self.keys.node(node, "rooms");
        let handler = self.handler.get().and_then(Weak::upgrade);
        for chunk in entries.chunks(REAP_CHUNK) {
            let removals = chunk.iter().map(|(field, user)| async {
                let Some((conn, room)) = split_room_field(field) else {
                    return self.hdel(rooms_index.clone(), field).await;
                };
                let (left, count) = self.leave_room(room, conn).await?;
                if left && let Some(handler) = &handler {
                    handler.expired(room, user, count).await;
                }
                self.hdel(rooms_index.clone(), field).await
            });
            join_all(removals)
                .await
                .into_iter()
                .collect::<Result<(), _>>()?;
        }
        Ok(())
    }

    /// Removes connections of `node`'s index, and their users' entries.
    async fn remove_connections(
        &self,
        node: &str,
        entries: &[(String, String)],
    ) -> Result<(), EngineError> {
        let users_index = self.keys.node(node, "users");
        for chunk in entries.chunks(REAP_CHUNK) {
            let removals = chunk.iter().map(|(conn, user)| async {
                self.hdel(self.keys.user(user, "conns"), conn).await?;
                self.hdel(users_index.clone(), conn).await
            });
            join_all(removals)
                .await
                .into_iter()
                .collect::<Result<(), _>>()?;
        }
        Ok(())
    }
}

/// Fields and values of a node's index hash.
type IndexEntries = Vec<(String, String)>;

/// Takes a lock no holder can leave poisoned (it only stores or takes a handle).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A room index field is the connection id (16 hex digits) followed by the room name.
fn room_field(conn: &str, room: &str) -> String {
    format!("{conn}{room}")
}

fn split_room_field(field: &str) -> Option<(&str, &str)> {
    let conn = field.get(..16)?;
    Some((conn, &field[16..]))
}

#[async_trait]
impl Presence for RedisPresence {
    /// A PING: a command connection that lost Redis reconnects on its next command, so a
    /// readiness probe also brings it back before clients need it.
    async fn ready(&self) -> bool {
        redis::cmd("PING")
            .exec_async(&mut self.inner.conn())
            .await
            .is_ok()
    }

    fn start(&self, handler: Arc<dyn PresenceHandler>) {
        if self.inner.handler.set(Arc::downgrade(&handler)).is_ok() {
            let task = tokio::spawn(self.inner.clone().run());
            *lock(&self.inner.heartbeat_task) = Some(task);
        }
    }

    async fn join(&self, room: &str, user: &str, conn: ConnId) -> Result<RoomChange, EngineError> {
        let (user_changed, count) = self.inner.join_room(room, user, &conn.to_string()).await?;
        Ok(RoomChange {
            user_changed,
            count,
        })
    }

    async fn leave(
        &self,
        room: &str,
        _user: &str,
        conn: ConnId,
    ) -> Result<RoomChange, EngineError> {
        let (user_changed, count) = self
            .inner
            .leave_own_room(room, &conn.to_string())
            .await
            .inspect_err(|_| self.inner.removal_failed.store(true, Ordering::Relaxed))?;
        Ok(RoomChange {
            user_changed,
            count,
        })
    }

    async fn members(&self, room: &str) -> Result<Vec<String>, EngineError> {
        let mut users: Vec<String> = redis::cmd("HKEYS")
            .arg(self.inner.keys.room(room, "users"))
            .query_async(&mut self.inner.conn())
            .await
            .map_err(failed("members"))?;
        users.sort_unstable();
        Ok(users)
    }

    async fn count(&self, room: &str) -> Result<u64, EngineError> {
        redis::cmd("HLEN")
            .arg(self.inner.keys.room(room, "users"))
            .query_async(&mut self.inner.conn())
            .await
            .map_err(failed("count"))
    }

    async fn claim_count(&self, room: &str, window: Duration) -> Result<CountClaim, EngineError> {
        let left: i64 = self
            .inner
            .claim_count
            .key(self.inner.keys.room(room, "count-claim"))
            .arg(&self.inner.node)
            .arg(window.as_millis().max(1) as u64)
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(failed("claim_count"))?;
        Ok(match u64::try_from(left) {
            Ok(left) => CountClaim::HeldFor(Duration::from_millis(left)),
            // -1: claimed. (-2, the claim gone between the two commands, cannot happen in a
            // script; a claim without expiry is never written.)
            Err(_) => CountClaim::Won,
        })
    }

    async fn connect(&self, user: &str, conn: ConnId) -> Result<(), EngineError> {
        self.inner.connect_user(user, &conn.to_string()).await
    }

    async fn disconnect(&self, user: &str, conn: ConnId) -> Result<(), EngineError> {
        self.inner
            .disconnect_user(user, &conn.to_string())
            .await
            .inspect_err(|_| self.inner.removal_failed.store(true, Ordering::Relaxed))
    }

    async fn online(&self, users: &[String]) -> Result<Vec<bool>, EngineError> {
        let checks = users.iter().map(|user| async {
            redis::cmd("EXISTS")
                .arg(self.inner.keys.user(user, "conns"))
                .query_async::<bool>(&mut self.inner.conn())
                .await
                .map_err(failed("online"))
        });
        join_all(checks).await.into_iter().collect()
    }

    async fn connections(&self, user: &str) -> Result<Vec<ConnId>, EngineError> {
        let conns: Vec<String> = redis::cmd("HKEYS")
            .arg(self.inner.keys.user(user, "conns"))
            .query_async(&mut self.inner.conn())
            .await
            .map_err(failed("connections"))?;
        Ok(conns.iter().filter_map(|conn| conn.parse().ok()).collect())
    }

    async fn rooms(&self) -> Result<Vec<RoomCount>, EngineError> {
        let inner = &self.inner;
        let names: HashSet<String> = redis::cmd("SMEMBERS")
            .arg(inner.rooms_key())
            .query_async(&mut inner.conn())
            .await
            .map_err(failed("rooms"))?;
        let counts = names.into_iter().map(|room| async move {
            let users = self.count(&room).await?;
            Ok::<_, EngineError>(RoomCount { room, users })
        });
        let mut rooms: Vec<RoomCount> = join_all(counts)
            .await
            .into_iter()
            .filter(|room| !matches!(room, Ok(RoomCount { users: 0, .. })))
            .collect::<Result<_, _>>()?;
        rooms.sort_unstable_by(|a, b| a.room.cmp(&b.room));
        Ok(rooms)
    }

    async fn close(&self) {
        let inner = &self.inner;
        inner.stop.cancel();
        let heartbeat = lock(&inner.heartbeat_task).take();
        if let Some(task) = heartbeat {
            let _ = task.await;
        }
        if let Err(error) = inner.remove_entries(&inner.node).await {
            tracing::warn!(%error, "presence: removing this node's entries failed; they expire");
            return;
        }
        if let Err(error) = redis::cmd("ZREM")
            .arg(inner.nodes_key())
            .arg(&inner.node)
            .exec_async(&mut inner.conn())
            .await
        {
            tracing::warn!(%error, "presence: unregistering this node failed; it expires");
        }
    }
}
