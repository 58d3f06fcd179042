//! Messages: direct messages and room publishes (stored ones through the store, whose append
//! publishes them), history, inbox acks, broadcasts, the server API's disconnect, and frames
//! arriving from the broker for this node's connections.

use bytes::Bytes;

use crate::engine::store::OnCommit;

use super::*;

impl Node {
    /// Sends a direct message to every connection of each recipient and to the sender's other
    /// connections. `from_conn` (the sending connection) gets the ack instead of a copy.
    pub async fn send_direct(
        &self,
        from: &Arc<str>,
        from_conn: Option<ConnId>,
        to: Vec<String>,
        content: Payload,
    ) -> Result<DirectOutcome, EngineError> {
        let origin = Origin::once(from, from_conn);
        self.send_direct_queued(origin, to, content).await?.await
    }

    /// [`send_direct`](Self::send_direct) in two steps, as
    /// [`publish_queued`](Self::publish_queued).
    pub async fn send_direct_queued(
        &self,
        origin: Origin<'_>,
        to: Vec<String>,
        content: Payload,
    ) -> Result<
        impl Future<Output = Result<DirectOutcome, EngineError>> + Send + 'static,
        EngineError,
    > {
        let (mut online, mut offline) = (Vec::new(), Vec::new());
        let online_flags = self.presence.online(&to).await?;
        for (user, is_online) in to.iter().zip(online_flags) {
            let list = if is_online { &mut online } else { &mut offline };
            list.push(user.clone());
        }
        let except = origin.conn;
        let committing = self
            .store
            .append(direct_append(origin, to, content), except)
            .await;
        Ok(async move {
            let appended = committing.await?;
            let Appended::Direct { message, inbox, .. } = appended else {
                return Err(EngineError::new("store", "a direct append returned a room"));
            };
            accepted(&crate::metrics::HOT.accepted_direct);
            Ok(DirectOutcome {
                id: message.id,
                online,
                offline,
                offsets: inbox
                    .into_iter()
                    .map(|(user, offset)| (user, offset.0))
                    .collect(),
            })
        })
    }

    /// A direct message whose sender is not answered (a request without `id`, which gets no
    /// ack): `then` is told how it went once it has committed and been delivered, by the
    /// store, so that no task waits for it (and no presence read finds the ack's `online`).
    pub async fn send_direct_then(
        &self,
        origin: Origin<'_>,
        to: Vec<String>,
        content: Payload,
        then: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) {
        let except = origin.conn;
        let append = direct_append(origin, to, content);
        let accepted_direct = &crate::metrics::HOT.accepted_direct;
        self.store
            .append_then(append, except, told(accepted_direct, then))
            .await;
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
        let origin = Origin::once(from, from_conn);
        self.publish_queued(origin, room, content, echo, persist)
            .await?
            .await
    }

    /// [`publish`](Self::publish) in two steps: the message is queued (an ephemeral one is
    /// already relayed) when this returns, and the returned future resolves once it has
    /// committed. A connection pipelines its publishes this way, so that its rate is not one
    /// message per commit (an fsync with `synchronous = "full"`).
    pub async fn publish_queued(
        &self,
        origin: Origin<'_>,
        room: &Arc<str>,
        content: Payload,
        echo: bool,
        persist: bool,
    ) -> Result<impl Future<Output = Result<Published, EngineError>> + Send + 'static, EngineError>
    {
        let except = if echo { None } else { origin.conn };
        let message = new_message(origin, content);
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
        let append = Append::Room {
            room: room.clone(),
            message,
        };
        let committing = self.store.append(append, except).await;
        Ok(Either::Right(async move {
            let appended = committing.await?;
            let Appended::Room {
                message, position, ..
            } = appended
            else {
                return Err(EngineError::new("store", "a room append returned a direct"));
            };
            accepted(&crate::metrics::HOT.accepted_room);
            Ok(Published {
                id: message.id,
                position: Some(position),
            })
        }))
    }

    /// A stored room message whose publisher is not answered, as
    /// [`send_direct_then`](Self::send_direct_then).
    pub async fn publish_stored_then(
        &self,
        origin: Origin<'_>,
        room: &Arc<str>,
        content: Payload,
        echo: bool,
        then: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) {
        let except = if echo { None } else { origin.conn };
        let append = Append::Room {
            room: room.clone(),
            message: new_message(origin, content),
        };
        let accepted_room = &crate::metrics::HOT.accepted_room;
        self.store
            .append_then(append, except, told(accepted_room, then))
            .await;
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
}

impl DeliveryHandler for Node {
    fn deliver(&self, channel: &Channel, delivery: &Delivery) {
        let delivered = match channel {
            Channel::Room(room) => self.hub.deliver_to_room(room, delivery),
            Channel::User(user) => self.hub.deliver_to_user(user, delivery),
            Channel::All => self.hub.deliver_to_all(&delivery.frame, delivery.except),
        };
        crate::metrics::HOT
            .messages_queued
            .increment(delivered as u64);
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

    fn answer(&self, question: &[u8]) -> Option<Bytes> {
        self.answer_connections(question)
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

/// A new message from `origin`, with its id and time.
fn new_message(origin: Origin<'_>, content: Payload) -> NewMessage {
    NewMessage {
        id: uuid::Uuid::now_v7().to_string(),
        from: origin.user.clone(),
        ts: unix_millis(),
        content,
        idempotency: origin.idempotency,
    }
}

/// The append of a direct message to `to` (as given: `to` goes into the frames), storing it
/// once per distinct recipient.
fn direct_append(origin: Origin<'_>, to: Vec<String>, content: Payload) -> Append {
    let mut recipients: Vec<String> = Vec::with_capacity(to.len());
    for user in &to {
        if !recipients.contains(user) {
            recipients.push(user.clone());
        }
    }
    Append::Direct {
        to,
        recipients,
        message: new_message(origin, content),
    }
}

/// Counts a message stored and accepted.
fn accepted(kind: &metrics::Counter) {
    crate::metrics::HOT.messages_stored.increment(1);
    kind.increment(1);
}

/// The store's callback for an unanswered append: counts it, then tells `then`.
fn told(
    kind: &'static metrics::Counter,
    then: impl FnOnce(Result<(), EngineError>) + Send + 'static,
) -> OnCommit {
    OnCommit::new(move |outcome| {
        if outcome.is_ok() {
            accepted(kind);
        }
        then(outcome.map(drop).map_err(EngineError::from));
    })
}
