//! The node: this process's hub joined to the engines. Every operation a client or the server
//! API can ask for is a method here, independent of the transport: in `membership` (who is
//! where), `messages` (what goes where), `connections` (traffic statistics, gathered from every
//! node) and `lifecycle` (retention, draining, shutdown); the broker's subscriptions follow local
//! membership through `subscriptions`.
//!
//! Outgoing messages are encoded here exactly once; the broker carries the encoded frame to
//! every node, and each node's hub queues the same bytes on each local recipient.
//!
//! Subscriptions follow local membership: the node subscribes a room's channel when its first
//! local connection joins and unsubscribes after the last one leaves (rolling the join back if
//! the subscription fails); likewise for each user's channel.
//!
//! Stored messages (room messages unless `persist: false`, and direct messages) go to the store,
//! which appends and publishes them in one step (see [`crate::engine::store`]): every stream's
//! messages reach the hub in offset order and only after they are stored, which is what lets
//! [`crate::hub::catch_up`] replay stored messages with no gap and no duplicate. The sender's
//! ack is sent after that too. Ephemeral messages, presence events and broadcasts skip the store and
//! go to the broker at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::Either;
use herald_protocol::{CloseCode, Message, Payload};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::delivery::{Channel, ConnId, ConnIds, Control, Delivery, OutFrame};
use crate::engine::EngineError;
use crate::engine::broker::{Broker, DeliveryHandler};
use crate::engine::fanout::{encode, room_header};
use crate::engine::presence::{Presence, RoomChange, RoomCount};
use crate::engine::store::{
    Append, Appended, Epoch, IdempotencyKey, NewMessage, Offset, PruneReport, Store, StoreError,
    StreamPosition,
};
use crate::engine::timed::TimedPresence;
use crate::hub::catch_up::{PAGE, Replay, Source, history_message};
use crate::hub::control::CloseReason;
use crate::hub::{ConnHandle, Hub, RegisterError, StreamKey};
use crate::idempotency::Idempotency;
use crate::presence_window::{self, PresenceWindow};

mod bounds_reads;
mod connections;
mod lifecycle;
mod membership;
mod messages;
mod subscriptions;

pub use connections::{ConnectionQuery, ConnectionStats, Connections};

use bounds_reads::BoundsReads;
use subscriptions::Subscriptions;

/// Messages in a `history` page when the request names no limit (capped by
/// `store.history_max_limit`), and in the page sent with `recovered: false`.
pub const DEFAULT_HISTORY_LIMIT: usize = 50;

/// Users in a `members` page when the request names no limit, and the most it may ask for.
pub const MAX_MEMBERS_PAGE: usize = 1000;

pub struct Node {
    id: Arc<str>,
    config: Arc<Config>,
    auth: Authenticator,
    hub: Hub,
    broker: Arc<dyn Broker>,
    /// Subscribes and unsubscribes the broker as local membership changes.
    subscriptions: Subscriptions,
    presence: Arc<dyn Presence>,
    /// Gathers rooms' joins and leaves into one `presence_diff` per window.
    presence_window: PresenceWindow,
    store: Arc<dyn Store>,
    /// Joins of one room share its bounds reads.
    bounds_reads: Arc<BoundsReads>,
    /// The last pruning pass's report.
    pruned: watch::Sender<PruneReport>,
    conn_ids: ConnIds,
    /// Cancelled when the node shuts down ([`Node::shut_down`]).
    shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for their close frames to go out.
    tasks: TaskTracker,
    /// Background tasks that use the store (retention), stopped before it closes.
    background: TaskTracker,
    /// Cancelled when shutdown begins, before connections close: `/ready` answers 503 from
    /// then on.
    draining: CancellationToken,
    /// Request ids of recent stored messages, so a client's retry is not stored twice.
    idempotency: Idempotency,
}

/// Who sends a stored message.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    pub user: &'a Arc<str>,
    /// The sending connection, which gets the ack instead of a copy.
    pub conn: Option<ConnId>,
    /// Set when the request may be retried (see [`crate::idempotency`]).
    pub idempotency: Option<IdempotencyKey>,
}

impl<'a> Origin<'a> {
    /// A sender whose request is not retried (the server API, a request without an `id`).
    pub fn once(user: &'a Arc<str>, conn: Option<ConnId>) -> Self {
        Origin {
            user,
            conn,
            idempotency: None,
        }
    }
}

/// What the sender of a direct message learns.
#[derive(Debug, Clone)]
pub struct DirectOutcome {
    pub id: String,
    pub online: Vec<String>,
    pub offline: Vec<String>,
    /// Each recipient's inbox offset of the message.
    pub offsets: BTreeMap<String, u64>,
}

/// What the publisher of a room message learns.
#[derive(Debug, Clone)]
pub struct Published {
    pub id: String,
    /// Where it was stored; `None` for an ephemeral message.
    pub position: Option<StreamPosition>,
}

/// A join's request to replay what the client missed.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The last offset the client saw.
    pub since: Offset,
    /// The epoch that offset belongs to, when the client kept it.
    pub epoch: Option<Epoch>,
}

/// The result of a join.
pub struct Joined {
    pub change: RoomChange,
    /// The room's newest offset at the join: every later message reaches the connection live.
    pub position: StreamPosition,
    /// With a recovery: whether every message after `since` is replayed.
    pub recovered: Option<bool>,
    /// With a recovery: what to send after the join's ack ([`Replay::run`]); dropping it
    /// instead releases the held live frames.
    pub replay: Option<Replay>,
}

/// One page of a room's users.
#[derive(Debug, Clone)]
pub struct MembersPage {
    /// Users in the whole room.
    pub count: u64,
    pub users: Vec<String>,
    /// The last user of the page when more follow: the next page's `after`.
    pub next: Option<String>,
}

/// One page of a room's or a conversation's history, oldest first.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// Empty while the stream has no message.
    pub epoch: Epoch,
    pub messages: Vec<Message>,
    /// Older messages exist: ask again with `before` = the first message's offset.
    pub more: bool,
}

/// Why a connection could not be attached to the node.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Limit(#[from] RegisterError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the node is shutting down")]
    ShuttingDown,
}

impl Node {
    /// Builds the node on its engines. `broker` should be the one the store publishes to,
    /// wrapped in [`TimedBroker`](crate::engine::timed::TimedBroker) by the caller so that
    /// both measure their calls.
    pub fn new(
        config: Arc<Config>,
        auth: Authenticator,
        broker: Arc<dyn Broker>,
        presence: Arc<dyn Presence>,
        store: Arc<dyn Store>,
    ) -> Arc<Node> {
        let id: Arc<str> = if config.server.node_id.is_empty() {
            random_id().into()
        } else {
            config.server.node_id.as_str().into()
        };
        let idempotency = Idempotency::new(
            config.limits.idempotency_window,
            config.limits.idempotency_keys_per_user,
        );
        let presence: Arc<dyn Presence> = Arc::new(TimedPresence(presence));
        let presence_window =
            PresenceWindow::start(&config.presence, broker.clone(), presence.clone());
        let hub = if config.compression.enabled {
            Hub::with_shared_deflate(config.compression.threshold)
        } else {
            Hub::new()
        };
        let node = Arc::new(Node {
            id,
            config,
            auth,
            hub,
            subscriptions: Subscriptions::new(broker.clone()),
            broker,
            presence,
            presence_window,
            store,
            bounds_reads: Arc::default(),
            pruned: watch::Sender::new(PruneReport::default()),
            conn_ids: ConnIds::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            background: TaskTracker::new(),
            draining: CancellationToken::new(),
            idempotency,
        });
        node.broker.start(node.clone());
        node.presence.start(node.clone());
        node.background.spawn(lifecycle::prune_periodically(
            Arc::downgrade(&node),
            node.config.store.prune_interval,
            node.shutdown.clone(),
        ));
        node
    }

    /// This node's name (`server.node_id`, or a random one).
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn auth(&self) -> &Authenticator {
        &self.auth
    }

    /// This node's connections.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Cancelled when the node shuts down ([`Node::shut_down`]).
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Every connection task, so shutdown can wait for their close frames to go out.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Request ids of recent stored messages.
    pub fn idempotency(&self) -> &Idempotency {
        &self.idempotency
    }

    /// How long one replayed frame may wait for room in a connection's outbox.
    fn replay_wait(&self) -> Duration {
        self.config.heartbeat.interval * 2
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.conn_ids.next()
    }
}

/// A name for a node configured without `server.node_id`.
pub fn random_id() -> String {
    format!("node-{:08x}", rand::random::<u32>())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
