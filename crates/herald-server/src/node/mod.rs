//! The node: this process's hub joined to the engines. Every operation a client (or, later, the
//! server API) can ask for is a method here, independent of the transport.
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
//! [`crate::hub::catch_up`] replay stored messages with no gap and no duplicate. The sender's ack is
//! sent after that too. Ephemeral messages, presence events and broadcasts skip the store and
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
    Append, Appended, Epoch, NewMessage, Offset, PruneReport, Store, StoreError, StreamPosition,
};
use crate::engine::timed::TimedPresence;
use crate::hub::catch_up::{PAGE, Replay, Source, history_message};
use crate::hub::control::CloseReason;
use crate::hub::{ConnHandle, Hub, RegisterError, StreamKey};
use crate::idempotency::Idempotency;
use crate::presence_window::{self, PresenceWindow};

mod subscriptions;

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

/// What the sender of a stored message learns once it is committed.
enum Receipt {
    Room {
        id: String,
        position: StreamPosition,
    },
    Direct {
        id: String,
        inbox: Vec<(String, Offset)>,
    },
}

impl Receipt {
    fn of(appended: &Appended) -> Receipt {
        match appended {
            Appended::Room {
                message, position, ..
            } => Receipt::Room {
                id: message.id.clone(),
                position: position.clone(),
            },
            Appended::Direct { message, inbox, .. } => Receipt::Direct {
                id: message.id.clone(),
                inbox: inbox.clone(),
            },
        }
    }
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
        let node = Arc::new(Node {
            id,
            config,
            auth,
            hub: Hub::new(),
            subscriptions: Subscriptions::new(broker.clone()),
            broker,
            presence,
            presence_window,
            store,
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
        node.background.spawn(prune_periodically(
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

    /// Registers an open connection (hub with limits, user channel, presence) and starts
    /// replaying the inbox entries its user has not acknowledged, before any live direct
    /// message. The replay runs in its own task, beside the connection's request loop, once
    /// the first page is read: it waits for the writer to drain each page (the welcome, queued
    /// before, goes first), and the client may `ack` meanwhile. With a `device`, the replay
    /// starts at that device's mark.
    pub async fn connect(
        &self,
        handle: &ConnHandle,
        device: Option<Arc<str>>,
    ) -> Result<(), ConnectError> {
        handle.begin_catch_up(StreamKey::Inbox);
        if let Err(error) = self.attach(handle).await {
            handle.end_catch_up(&StreamKey::Inbox);
            return Err(error);
        }
        metrics::gauge!("herald_connections").increment(1.0);
        match self.start_inbox_replay(handle, device).await {
            Ok(Some(replay)) => {
                self.tasks.spawn(async move {
                    replay.run().await;
                });
            }
            Ok(None) => {}
            Err(error) => {
                handle.end_catch_up(&StreamKey::Inbox);
                self.disconnect(handle).await;
                return Err(error.into());
            }
        }
        Ok(())
    }

    /// Reads the first page of the inbox replay; `None` when there is nothing to replay (the
    /// handle is live then).
    async fn start_inbox_replay(
        &self,
        handle: &ConnHandle,
        device: Option<Arc<str>>,
    ) -> Result<Option<Replay>, EngineError> {
        // Checked after the connection is registered: an entry committed after this check is
        // fanned out to it live (and was held until now), one committed before is in the set.
        // A device is read every time: it may be new and need its mark.
        if device.is_none() && !self.store.inbox_may_hold_unacked(handle.user()) {
            handle.end_catch_up(&StreamKey::Inbox);
            return Ok(None);
        }
        let read = self
            .store
            .read_inbox(handle.user(), device.as_deref(), Offset(0), PAGE)
            .await?;
        if let Some(device) = device.as_deref()
            && !read.device_has_mark
        {
            // A new device gets its mark where it starts reading: from now on, acks of the
            // user's other devices do not hide entries from it.
            self.store
                .ack_inbox(handle.user(), Some(device), read.acked)
                .await?;
        }
        Ok(Some(Replay::paged(
            handle.clone(),
            StreamKey::Inbox,
            read.acked,
            self.replay_wait(),
            read.messages,
            self.store.clone(),
            Source::Inbox {
                user: handle.user().clone(),
                device,
            },
        )))
    }

    async fn attach(&self, handle: &ConnHandle) -> Result<(), ConnectError> {
        let limits = &self.config.limits;
        let first_local = self.hub.register(
            handle.clone(),
            limits.max_connections,
            limits.max_connections_per_user,
        )?;
        // Checked after registering: `shut_down` closes every connection it finds registered
        // after it cancels, so a connection either is found there or sees the cancel here.
        // Nothing was subscribed yet, so only the hub has anything to undo.
        if self.shutdown.is_cancelled() {
            self.hub.unregister(handle.id(), handle.user());
            return Err(ConnectError::ShuttingDown);
        }
        let channel = Channel::User(handle.user().clone());
        let attached = async {
            if first_local {
                self.subscriptions
                    .follow(&channel, || self.hub.has_user(handle.user()))
                    .await?;
            }
            self.presence.connect(handle.user(), handle.id()).await
        }
        .await;
        if let Err(error) = attached {
            self.release(handle).await;
            return Err(error.into());
        }
        Ok(())
    }

    /// Detaches a connection that has already left its rooms.
    pub async fn disconnect(&self, handle: &ConnHandle) {
        if let Err(error) = self.presence.disconnect(handle.user(), handle.id()).await {
            tracing::warn!(conn = %handle.id(), %error, "presence disconnect failed");
        }
        self.release(handle).await;
        metrics::gauge!("herald_connections").decrement(1.0);
    }

    async fn release(&self, handle: &ConnHandle) {
        if self.hub.unregister(handle.id(), handle.user()) {
            let channel = Channel::User(handle.user().clone());
            let wanted = || self.hub.has_user(handle.user());
            if let Err(error) = self.subscriptions.follow(&channel, wanted).await {
                tracing::warn!(%channel, %error, "unsubscribe failed");
            }
        }
    }

    /// Adds a connection to a room and, if the user is new to it, queues the change for the
    /// room's next `presence_diff`. With
    /// a `recovery`, also reads what the client missed; the caller runs the returned replay
    /// after answering the join.
    pub async fn join(
        &self,
        handle: &ConnHandle,
        room: &Arc<str>,
        recovery: Option<Recovery>,
    ) -> Result<Joined, EngineError> {
        let key = StreamKey::Room(room.clone());
        if recovery.is_some() {
            handle.begin_catch_up(key.clone());
        }
        let change = match self.join_room(handle, room).await {
            Ok(change) => change,
            Err(error) => {
                handle.end_catch_up(&key);
                return Err(error);
            }
        };
        match self.read_missed(handle, room, recovery).await {
            Ok((position, recovered, replay)) => Ok(Joined {
                change,
                position,
                recovered,
                replay,
            }),
            Err(error) => {
                handle.end_catch_up(&key);
                if let Err(leave_error) = self.leave(handle, room).await {
                    tracing::warn!(%room, error = %leave_error, "rolling back a join failed");
                }
                Err(error)
            }
        }
    }

    /// The room's position and, with a recovery, the messages to replay. Runs after the
    /// connection is in the room, so every message after the read reaches it live (held).
    async fn read_missed(
        &self,
        handle: &ConnHandle,
        room: &Arc<str>,
        recovery: Option<Recovery>,
    ) -> Result<(StreamPosition, Option<bool>, Option<Replay>), EngineError> {
        let Some(recovery) = recovery else {
            let bounds = self.store.room_bounds(room).await?;
            return Ok((bounds.top, None, None));
        };
        let max = self.config.store.max_recovery;
        // One page now; the replay reads the rest page by page as the writer drains them.
        let read = self.store.read_room(room, recovery.since, PAGE).await?;
        let mut top = read.bounds.top;
        // A client's epoch against a room that has none (recreated and still empty) differs too.
        // Without an epoch the client's offset is taken as one of the room's current stream.
        let epoch_matches = match &recovery.epoch {
            Some(epoch) if !epoch.is_unset() => *epoch == top.epoch,
            _ => true,
        };
        let covered = recovery.since <= top.offset && recovery.since.next() >= read.bounds.first;
        let missed = top.offset.0.saturating_sub(recovery.since.0);
        let recovered = epoch_matches && covered && missed <= max as u64;
        let key = StreamKey::Room(room.clone());
        let replay;
        if recovered {
            replay = Replay::paged(
                handle.clone(),
                key,
                recovery.since,
                self.replay_wait(),
                read.messages,
                self.store.clone(),
                Source::Room(room.clone()),
            );
            metrics::counter!("herald_recoveries_total", "outcome" => "recovered").increment(1);
        } else {
            let limit = DEFAULT_HISTORY_LIMIT.min(self.config.store.history_max_limit);
            let page = self.store.room_history(room, None, limit).await?;
            if let Some(last) = page.messages.last() {
                top.offset = top.offset.max(last.offset);
                top.epoch = page.epoch.clone();
            }
            replay = Replay::new(
                handle.clone(),
                key,
                Offset(0),
                self.replay_wait(),
                page.messages,
            );
            metrics::counter!("herald_recoveries_total", "outcome" => "not_recovered").increment(1);
        }
        Ok((top, Some(recovered), Some(replay)))
    }

    async fn join_room(
        &self,
        handle: &ConnHandle,
        room: &Arc<str>,
    ) -> Result<RoomChange, EngineError> {
        let channel = Channel::Room(room.clone());
        if self.hub.join(room, handle)
            && let Err(error) = self
                .subscriptions
                .follow(&channel, || self.hub.has_room(room))
                .await
        {
            self.hub.leave(room, handle.id());
            return Err(error);
        }
        let change = match self.presence.join(room, handle.user(), handle.id()).await {
            Ok(change) => change,
            Err(error) => {
                self.leave_hub(handle, room).await;
                return Err(error);
            }
        };
        if change.user_changed {
            self.presence_window
                .record(presence_window::RoomChange {
                    room: room.clone(),
                    user: handle.user().clone(),
                    present: true,
                })
                .await;
        }
        Ok(change)
    }

    /// Removes a connection from a room and, if the user left it, queues the change for the
    /// room's next `presence_diff`.
    pub async fn leave(
        &self,
        handle: &ConnHandle,
        room: &Arc<str>,
    ) -> Result<RoomChange, EngineError> {
        self.leave_hub(handle, room).await;
        let change = self
            .presence
            .leave(room, handle.user(), handle.id())
            .await?;
        if change.user_changed {
            self.presence_window
                .record(presence_window::RoomChange {
                    room: room.clone(),
                    user: handle.user().clone(),
                    present: false,
                })
                .await;
        }
        Ok(change)
    }

    async fn leave_hub(&self, handle: &ConnHandle, room: &Arc<str>) {
        // Forget any replay state: a later join starts afresh.
        handle.end_catch_up(&StreamKey::Room(room.clone()));
        if self.hub.leave(room, handle.id()) {
            let channel = Channel::Room(room.clone());
            let wanted = || self.hub.has_room(room);
            if let Err(error) = self.subscriptions.follow(&channel, wanted).await {
                tracing::warn!(%channel, %error, "unsubscribe failed");
            }
        }
    }

    pub async fn members(&self, room: &str) -> Result<Vec<String>, EngineError> {
        self.presence.members(room).await
    }

    /// One page of a room's users, sorted: those after `after`, at most `limit` (default and
    /// cap [`MAX_MEMBERS_PAGE`]).
    pub async fn members_page(
        &self,
        room: &str,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<MembersPage, EngineError> {
        let users = self.presence.members(room).await?;
        let limit = limit.unwrap_or(MAX_MEMBERS_PAGE).clamp(1, MAX_MEMBERS_PAGE);
        let start = after.map_or(0, |after| {
            users.partition_point(|user| user.as_str() <= after)
        });
        let end = (start + limit).min(users.len());
        let next = (end < users.len()).then(|| users[end - 1].clone());
        Ok(MembersPage {
            count: users.len() as u64,
            users: users[start..end].to_vec(),
            next,
        })
    }

    /// For each user, whether they have an open connection on any node.
    pub async fn online(&self, users: &[String]) -> Result<Vec<bool>, EngineError> {
        self.presence.online(users).await
    }

    /// Sends a direct message to every connection of each recipient and to the sender's other
    /// connections. `from_conn` (the sending connection) gets the ack instead of a copy.
    pub async fn send_direct(
        &self,
        from: &Arc<str>,
        from_conn: Option<ConnId>,
        to: Vec<String>,
        content: Payload,
    ) -> Result<DirectOutcome, EngineError> {
        self.send_direct_queued(from, from_conn, to, content)
            .await?
            .await
    }

    /// [`send_direct`](Self::send_direct) in two steps, as
    /// [`publish_queued`](Self::publish_queued).
    pub async fn send_direct_queued(
        &self,
        from: &Arc<str>,
        from_conn: Option<ConnId>,
        to: Vec<String>,
        content: Payload,
    ) -> Result<
        impl Future<Output = Result<DirectOutcome, EngineError>> + Send + 'static,
        EngineError,
    > {
        let online_flags = self.presence.online(&to).await?;
        let (online, offline): (Vec<_>, Vec<_>) =
            to.iter().zip(online_flags).partition(|(_, online)| *online);
        let online: Vec<String> = online.into_iter().map(|(user, _)| user.clone()).collect();
        let offline: Vec<String> = offline.into_iter().map(|(user, _)| user.clone()).collect();

        let mut recipients: Vec<String> = Vec::with_capacity(to.len());
        for user in &to {
            if !recipients.contains(user) {
                recipients.push(user.clone());
            }
        }
        let message = NewMessage {
            id: uuid::Uuid::now_v7().to_string(),
            from: from.clone(),
            ts: unix_millis(),
            content,
        };
        let committed = self
            .append_queued(
                Append::Direct {
                    to,
                    recipients,
                    message,
                },
                from_conn,
            )
            .await?;
        Ok(async move {
            let Receipt::Direct { id, inbox } = committed.await? else {
                return Err(EngineError::new("store", "a direct append returned a room"));
            };
            metrics::counter!("herald_messages_accepted_total", "kind" => "direct").increment(1);
            Ok(DirectOutcome {
                id,
                online,
                offline,
                offsets: inbox
                    .into_iter()
                    .map(|(user, offset)| (user, offset.0))
                    .collect(),
            })
        })
    }

    /// Queues an append on the store (waiting only for room in its queue) and returns what
    /// resolves once it has committed and been handed to the broker: appends queued one after
    /// another commit, and fan out, in that order.
    async fn append_queued(
        &self,
        append: Append,
        except: Option<ConnId>,
    ) -> Result<impl Future<Output = Result<Receipt, EngineError>> + Send + 'static, EngineError>
    {
        let committing = self.store.append(append, except).await?;
        Ok(async move {
            let appended = committing.await?;
            metrics::counter!("herald_messages_stored_total").increment(1);
            Ok(Receipt::of(&appended))
        })
    }

    /// Publishes to a room. With `echo` false the publishing connection is skipped. With
    /// `persist` the message is stored first and gets an offset; without, it is only relayed.
    pub async fn publish(
        &self,
        from: &Arc<str>,
        from_conn: Option<ConnId>,
        room: &Arc<str>,
        content: Payload,
        echo: bool,
        persist: bool,
    ) -> Result<Published, EngineError> {
        self.publish_queued(from, from_conn, room, content, echo, persist)
            .await?
            .await
    }

    /// [`publish`](Self::publish) in two steps: the message is queued (an ephemeral one is
    /// already relayed) when this returns, and the returned future resolves once it has
    /// committed. A connection pipelines its publishes this way, so that its rate is not one
    /// message per commit (an fsync with `synchronous = "full"`).
    pub async fn publish_queued(
        &self,
        from: &Arc<str>,
        from_conn: Option<ConnId>,
        room: &Arc<str>,
        content: Payload,
        echo: bool,
        persist: bool,
    ) -> Result<impl Future<Output = Result<Published, EngineError>> + Send + 'static, EngineError>
    {
        let except = if echo { None } else { from_conn };
        let message = NewMessage {
            id: uuid::Uuid::now_v7().to_string(),
            from: from.clone(),
            ts: unix_millis(),
            content,
        };
        if !persist {
            let frame = encode(room_header(&message, room, None), message.content);
            self.publish_frame(Channel::Room(room.clone()), frame, except)
                .await?;
            metrics::counter!("herald_messages_accepted_total", "kind" => "ephemeral").increment(1);
            let published = Published {
                id: message.id,
                position: None,
            };
            return Ok(Either::Left(std::future::ready(Ok(published))));
        }
        let committed = self
            .append_queued(
                Append::Room {
                    room: room.clone(),
                    message,
                },
                except,
            )
            .await?;
        Ok(Either::Right(async move {
            let Receipt::Room { id, position } = committed.await? else {
                return Err(EngineError::new("store", "a room append returned a direct"));
            };
            metrics::counter!("herald_messages_accepted_total", "kind" => "room").increment(1);
            Ok(Published {
                id,
                position: Some(position),
            })
        }))
    }

    /// A page of a room's history: the newest `limit` messages older than `before`. The limit
    /// defaults to [`DEFAULT_HISTORY_LIMIT`] and is capped at `store.history_max_limit`.
    pub async fn room_history(
        &self,
        room: &str,
        before: Option<Offset>,
        limit: Option<usize>,
    ) -> Result<HistoryPage, EngineError> {
        let page = self
            .store
            .room_history(room, before, self.history_limit(limit))
            .await?;
        Ok(history_page(page))
    }

    /// A page of the direct conversation between `user` and `with`, both directions, with the
    /// conversation's own offsets.
    pub async fn conversation_history(
        &self,
        user: &str,
        with: &str,
        before: Option<Offset>,
        limit: Option<usize>,
    ) -> Result<HistoryPage, EngineError> {
        let page = self
            .store
            .conversation_history(user, with, before, self.history_limit(limit))
            .await?;
        Ok(history_page(page))
    }

    fn history_limit(&self, asked: Option<usize>) -> usize {
        asked
            .unwrap_or(DEFAULT_HISTORY_LIMIT)
            .clamp(1, self.config.store.history_max_limit)
    }

    /// Records that `user` (on `device`, when given) received their inbox up to `offset`;
    /// returns the mark after (the device's, when given).
    pub async fn ack_inbox(
        &self,
        user: &str,
        device: Option<&str>,
        offset: Offset,
    ) -> Result<Offset, StoreError> {
        self.store.ack_inbox(user, device, offset).await
    }

    /// Runs one retention pass now (the background task runs one every
    /// `store.prune_interval`).
    pub async fn prune(&self) -> Result<PruneReport, EngineError> {
        let report = self
            .store
            .prune(self.config.store.retention(), unix_millis())
            .await?;
        metrics::counter!("herald_store_pruned_total").increment(report.total());
        if report.total() > 0 {
            tracing::debug!(?report, "retention pass");
        }
        self.pruned.send_replace(report);
        Ok(report)
    }

    /// The last retention pass's report, updated after every pass.
    pub fn pruned(&self) -> watch::Receiver<PruneReport> {
        self.pruned.subscribe()
    }

    /// Stops the background tasks, then flushes and closes the store, removes this node's
    /// presence entries and closes the broker. Called once the connections are gone. In that
    /// order, a retention pass never meets a closed store.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.background.close();
        self.background.wait().await;
        self.store.close().await;
        self.presence.close().await;
        self.broker.close().await;
    }

    /// Sends a message to every connection on every node (the sender's included).
    pub async fn broadcast(
        &self,
        from: &Arc<str>,
        content: Payload,
    ) -> Result<String, EngineError> {
        let id = uuid::Uuid::now_v7().to_string();
        let header = Message {
            id: id.clone(),
            from: from.to_string(),
            to: None,
            room: None,
            content: None,
            ts: unix_millis(),
            offset: None,
            encoding: None,
        };
        self.publish_frame(Channel::All, encode(header, content), None)
            .await?;
        metrics::counter!("herald_messages_accepted_total", "kind" => "broadcast").increment(1);
        Ok(id)
    }

    async fn publish_frame(
        &self,
        channel: Channel,
        frame: OutFrame,
        except: Option<ConnId>,
    ) -> Result<(), EngineError> {
        self.broker
            .publish(
                &channel,
                Delivery {
                    frame,
                    except,
                    offset: None,
                },
            )
            .await
    }

    /// Closes every connection of a user, on every node, with a close code and reason. The
    /// request travels on the user's channel through the broker, so it reaches the nodes that
    /// hold the user's connections. Returns how many connections the user had.
    pub async fn disconnect_user(
        &self,
        user: &str,
        code: u16,
        reason: &str,
    ) -> Result<usize, EngineError> {
        let connections = self.presence.connections(user).await?.len();
        let control = Control::Disconnect {
            code,
            reason: reason.into(),
        };
        self.broker
            .publish_control(&Channel::User(user.into()), control)
            .await?;
        Ok(connections)
    }

    /// Whether a user is connected anywhere, and with which connections.
    pub async fn user_connections(&self, user: &str) -> Result<Vec<ConnId>, EngineError> {
        self.presence.connections(user).await
    }

    /// Every room with users in it, on every node, sorted by name.
    pub async fn rooms(&self) -> Result<Vec<RoomCount>, EngineError> {
        self.presence.rooms().await
    }

    /// Begins shutdown: every connection is asked to close with 1001 (reconnect elsewhere).
    /// Connections registering meanwhile are refused with the same code (see `attach`), and
    /// those still authenticating watch [`Node::shutdown`] themselves.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
        for handle in self.hub.snapshot() {
            handle.close(CloseReason::Send(CloseCode::GOING_AWAY));
        }
    }

    /// Marks the node as shutting down: it stays up, but `/ready` fails.
    pub fn start_draining(&self) {
        self.draining.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled() || self.shutdown.is_cancelled()
    }

    /// Resolves once shutdown has begun.
    pub async fn draining(&self) {
        self.draining.cancelled().await;
    }

    /// Whether every engine answers and the node is not shutting down.
    pub async fn ready(&self) -> bool {
        !self.is_draining()
            && self.broker.ready().await
            && self.presence.ready().await
            && self.store.ready().await
    }
}

impl DeliveryHandler for Node {
    fn deliver(&self, channel: &Channel, delivery: &Delivery) {
        let delivered = match channel {
            Channel::Room(room) => self.hub.deliver_to_room(room, delivery),
            Channel::User(user) => self.hub.deliver_to_user(user, delivery),
            Channel::All => self.hub.deliver_to_all(&delivery.frame, delivery.except),
        };
        metrics::counter!("herald_messages_queued_total").increment(delivered as u64);
    }

    /// The broker lost its connection and has it back, every channel subscribed again: frames
    /// published meanwhile never reached this node. Each connection is closed with 1012, so its
    /// client reconnects (to any node) and recovers them: rooms by `since`, direct messages
    /// from the inbox. Clients spread their reconnects with jittered backoff.
    fn broker_restored(&self) {
        let connections = self.hub.snapshot();
        tracing::warn!(
            connections = connections.len(),
            "the broker reconnected: closing connections so that clients recover what they missed"
        );
        for handle in connections {
            handle.close(CloseReason::Send(CloseCode::SERVICE_RESTART));
        }
    }

    fn control(&self, channel: &Channel, control: &Control) {
        match control {
            Control::Disconnect { code, reason } => {
                let reason = CloseReason::Kicked {
                    code: *code,
                    reason: reason.clone(),
                };
                let closed = match channel {
                    Channel::User(user) => self.hub.close_user(user, &reason),
                    Channel::Room(room) => self.hub.close_room(room, &reason),
                    Channel::All => {
                        let all = self.hub.snapshot();
                        all.iter().for_each(|handle| handle.close(reason.clone()));
                        all.len()
                    }
                };
                tracing::info!(%channel, code, closed, "disconnected by the server API");
            }
        }
    }
}

fn history_page(page: crate::engine::store::Page) -> HistoryPage {
    HistoryPage {
        epoch: page.epoch,
        messages: page.messages.into_iter().map(history_message).collect(),
        more: page.more,
    }
}

/// Runs a retention pass every `interval` until shutdown; a pass under way when shutdown
/// begins is abandoned (the next start prunes what it left).
async fn prune_periodically(
    node: std::sync::Weak<Node>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: let the server start first.
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(node) = node.upgrade() else { return };
        let pass = tokio::select! {
            _ = shutdown.cancelled() => return,
            pass = node.prune() => pass,
        };
        if let Err(error) = pass {
            tracing::warn!(%error, "retention pass failed");
        }
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

/// Users whose node died leave their rooms like any leave: through the room's next
/// `presence_diff` (the window reads the count itself).
#[async_trait::async_trait]
impl crate::engine::presence::PresenceHandler for Node {
    async fn expired(&self, room: &str, user: &str, _count: u64) {
        self.presence_window
            .record(presence_window::RoomChange {
                room: room.into(),
                user: user.into(),
                present: false,
            })
            .await;
    }
}
