//! The node: this process's hub joined to the engines. Every operation a client (or, later, the
//! server API) can ask for is a method here, independent of the transport.
//!
//! Outgoing messages are encoded here exactly once; the broker carries the encoded frame to
//! every node, and each node's hub queues the same bytes on each local recipient.
//!
//! Subscriptions follow local membership: the node subscribes a room's channel when its first
//! local connection joins and unsubscribes after the last one leaves (rolling the join back if
//! the subscription fails); likewise for each user's channel.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use herald_protocol::{Message, Payload, PresenceChange, ServerEvent};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::connection::control::CloseReason;
use crate::connection::pending::PendingAuth;
use crate::delivery::{Channel, ConnId, ConnIds, Control, Delivery, OutFrame};
use crate::engine::EngineError;
use crate::engine::broker::{Broker, DeliveryHandler};
use crate::engine::presence::{Presence, RoomChange, RoomCount};
use crate::engine::timed::{TimedBroker, TimedPresence};
use crate::hub::{ConnHandle, Hub, RegisterError};

pub struct Node {
    pub id: Arc<str>,
    pub config: Arc<Config>,
    pub auth: Authenticator,
    pub hub: Hub,
    broker: Arc<dyn Broker>,
    presence: Arc<dyn Presence>,
    conn_ids: ConnIds,
    /// Cancelled when the node shuts down; every connection's token is a child of it.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for their close frames to go out.
    pub tasks: TaskTracker,
    /// Cancelled when shutdown begins, before connections close: `/ready` answers 503 from
    /// then on.
    draining: CancellationToken,
    /// Connections accepted without a token, still waiting for their `auth` message.
    pub pending: Arc<PendingAuth>,
}

/// What the sender of a direct message learns.
#[derive(Debug, Clone)]
pub struct DirectOutcome {
    pub id: String,
    pub online: Vec<String>,
    pub offline: Vec<String>,
}

/// Why a connection could not be attached to the node.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Limit(#[from] RegisterError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl Node {
    pub fn new(
        config: Arc<Config>,
        auth: Authenticator,
        broker: Arc<dyn Broker>,
        presence: Arc<dyn Presence>,
    ) -> Arc<Node> {
        let id: Arc<str> = if config.server.node_id.is_empty() {
            format!("node-{:08x}", rand::random::<u32>()).into()
        } else {
            config.server.node_id.as_str().into()
        };
        let node = Arc::new(Node {
            id,
            config,
            auth,
            hub: Hub::new(),
            broker: Arc::new(TimedBroker(broker)),
            presence: Arc::new(TimedPresence(presence)),
            conn_ids: ConnIds::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            draining: CancellationToken::new(),
            pending: Arc::default(),
        });
        node.broker.start(node.clone());
        node
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.conn_ids.next()
    }

    /// Registers an open connection: hub (with limits), user channel, presence.
    pub async fn connect(&self, handle: &ConnHandle) -> Result<(), ConnectError> {
        let limits = &self.config.limits;
        let first_local = self.hub.register(
            handle.clone(),
            limits.max_connections,
            limits.max_connections_per_user,
        )?;
        let channel = Channel::User(handle.user().clone());
        let attached = async {
            if first_local {
                self.broker.subscribe(&channel).await?;
            }
            self.presence.connect(handle.user(), handle.id()).await
        }
        .await;
        if let Err(error) = attached {
            self.release(handle).await;
            return Err(error.into());
        }
        metrics::gauge!("herald_connections").increment(1.0);
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
            if let Err(error) = self.broker.unsubscribe(&channel).await {
                tracing::warn!(%channel, %error, "unsubscribe failed");
            }
        }
    }

    /// Adds a connection to a room and tells the other members if the user is new to it.
    pub async fn join(
        &self,
        handle: &ConnHandle,
        room: &Arc<str>,
    ) -> Result<RoomChange, EngineError> {
        let channel = Channel::Room(room.clone());
        if self.hub.join(room, handle) {
            if let Err(error) = self.broker.subscribe(&channel).await {
                self.hub.leave(room, handle.id());
                return Err(error);
            }
        }
        let change = match self.presence.join(room, handle.user(), handle.id()).await {
            Ok(change) => change,
            Err(error) => {
                self.leave_hub(handle, room).await;
                return Err(error);
            }
        };
        if change.user_changed {
            let event = ServerEvent::Joined(PresenceChange {
                room: room.to_string(),
                user: handle.user().to_string(),
                count: change.count,
            });
            self.publish_frame(channel, OutFrame::Text(event.encode()), Some(handle.id()))
                .await?;
        }
        Ok(change)
    }

    /// Removes a connection from a room and tells the others if the user left it.
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
            let event = ServerEvent::Left(PresenceChange {
                room: room.to_string(),
                user: handle.user().to_string(),
                count: change.count,
            });
            self.publish_frame(
                Channel::Room(room.clone()),
                OutFrame::Text(event.encode()),
                None,
            )
            .await?;
        }
        Ok(change)
    }

    async fn leave_hub(&self, handle: &ConnHandle, room: &Arc<str>) {
        if self.hub.leave(room, handle.id()) {
            let channel = Channel::Room(room.clone());
            if let Err(error) = self.broker.unsubscribe(&channel).await {
                tracing::warn!(%channel, %error, "unsubscribe failed");
            }
        }
    }

    pub async fn members(&self, room: &str) -> Result<Vec<String>, EngineError> {
        self.presence.members(room).await
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
        let online_flags = self.presence.online(&to).await?;
        let (online, offline): (Vec<_>, Vec<_>) =
            to.iter().zip(online_flags).partition(|(_, online)| *online);
        let online: Vec<String> = online.into_iter().map(|(user, _)| user.clone()).collect();
        let offline: Vec<String> = offline.into_iter().map(|(user, _)| user.clone()).collect();

        let mut recipients: Vec<&str> = to.iter().map(String::as_str).collect();
        recipients.push(from);
        recipients.sort_unstable();
        recipients.dedup();

        let (id, frame) = encode_message(from, Some(to.clone()), None, content);
        for user in recipients {
            let delivery = Delivery {
                frame: frame.clone(),
                except: from_conn,
            };
            self.broker
                .publish(&Channel::User(user.into()), delivery)
                .await?;
        }
        metrics::counter!("herald_messages_accepted_total", "kind" => "direct").increment(1);
        Ok(DirectOutcome {
            id,
            online,
            offline,
        })
    }

    /// Publishes to a room. With `echo` false the publishing connection is skipped.
    pub async fn publish(
        &self,
        from: &Arc<str>,
        from_conn: Option<ConnId>,
        room: &Arc<str>,
        content: Payload,
        echo: bool,
    ) -> Result<String, EngineError> {
        let (id, frame) = encode_message(from, None, Some(room.to_string()), content);
        let except = if echo { None } else { from_conn };
        self.publish_frame(Channel::Room(room.clone()), frame, except)
            .await?;
        metrics::counter!("herald_messages_accepted_total", "kind" => "room").increment(1);
        Ok(id)
    }

    /// Sends a message to every connection on every node (the sender's included).
    pub async fn broadcast(
        &self,
        from: &Arc<str>,
        content: Payload,
    ) -> Result<String, EngineError> {
        let (id, frame) = encode_message(from, None, None, content);
        self.publish_frame(Channel::All, frame, None).await?;
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
            .publish(&channel, Delivery { frame, except })
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
        !self.is_draining() && self.broker.ready().await
    }
}

impl DeliveryHandler for Node {
    fn deliver(&self, channel: &Channel, delivery: &Delivery) {
        let delivered = match channel {
            Channel::Room(room) => self
                .hub
                .deliver_to_room(room, &delivery.frame, delivery.except),
            Channel::User(user) => self
                .hub
                .deliver_to_user(user, &delivery.frame, delivery.except),
            Channel::All => self.hub.deliver_to_all(&delivery.frame, delivery.except),
        };
        metrics::counter!("herald_messages_queued_total").increment(delivered as u64);
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

/// Encodes a message once, in its wire form: a text frame for JSON content, a binary frame for
/// bytes. Returns the message id with the frame.
fn encode_message(
    from: &str,
    to: Option<Vec<String>>,
    room: Option<String>,
    content: Payload,
) -> (String, OutFrame) {
    let mut message = Message {
        id: uuid::Uuid::now_v7().to_string(),
        from: from.to_owned(),
        to,
        room,
        content: None,
        ts: unix_millis(),
    };
    let id = message.id.clone();
    let frame = match content {
        Payload::Json(raw) => {
            message.content = Some(raw);
            OutFrame::Text(ServerEvent::Message(message).encode())
        }
        Payload::Binary(bytes) => OutFrame::Binary(ServerEvent::encode_binary(&message, &bytes)),
    };
    (id, frame)
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
