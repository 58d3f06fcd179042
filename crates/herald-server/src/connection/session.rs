//! One authenticated client's requests: rate limit, parse, check permissions, call the node,
//! answer with an `ack` or an `error`. The session is owned by the connection's reader task, so
//! its state (rooms joined, rate limiter) needs no lock.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use governor::clock::DefaultClock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use herald_protocol::request::{parse_binary, parse_text};
use herald_protocol::{
    Ack, CloseCode, ErrorCode, ErrorEvent, Members, Payload, Pong, ProtocolError, Request,
    RequestBody, ServerEvent,
};

use super::control::ConnControl;
use super::token_expiry;
use crate::auth::Identity;
use crate::delivery::OutFrame;
use crate::engine::EngineError;
use crate::hub::ConnHandle;
use crate::node::Node;

/// What the reader does after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close(CloseCode),
}

pub struct Session {
    node: Arc<Node>,
    handle: ConnHandle,
    control: Arc<ConnControl>,
    identity: Identity,
    rooms: HashSet<Arc<str>>,
    limiter: DefaultDirectRateLimiter,
    /// Frames refused by the rate limiter since the last accepted one.
    limited_in_row: u32,
}

type Outcome = Result<Option<ServerEvent>, ProtocolError>;

/// One clock for every connection's rate limiter. Building a clock probes the CPU (CPUID,
/// which traps to the hypervisor on a virtual machine); done per connection it was a fifth of
/// the server's CPU time per handshake in a profile of the connect benchmark.
fn shared_clock() -> DefaultClock {
    static CLOCK: OnceLock<DefaultClock> = OnceLock::new();
    CLOCK.get_or_init(DefaultClock::default).clone()
}

impl Session {
    pub fn new(
        node: Arc<Node>,
        handle: ConnHandle,
        identity: Identity,
        control: Arc<ConnControl>,
    ) -> Self {
        let limits = &node.config.limits;
        // Config validation guarantees both are positive.
        let rate = NonZeroU32::new(limits.messages_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN);
        let limiter = RateLimiter::direct_with_clock(
            Quota::per_second(rate).allow_burst(burst),
            shared_clock(),
        );
        Session {
            node,
            handle,
            control,
            identity,
            rooms: HashSet::new(),
            limiter,
            limited_in_row: 0,
        }
    }

    pub fn handle(&self) -> &ConnHandle {
        &self.handle
    }

    pub async fn on_text(&mut self, frame: &[u8]) -> Flow {
        self.on_request(parse_text(frame)).await
    }

    pub async fn on_binary(&mut self, frame: &Bytes) -> Flow {
        self.on_request(parse_binary(frame)).await
    }

    async fn on_request(&mut self, parsed: Result<Request, ProtocolError>) -> Flow {
        metrics::counter!("herald_frames_received_total").increment(1);
        if self.limiter.check().is_err() {
            self.limited_in_row += 1;
            metrics::counter!("herald_rate_limited_total").increment(1);
            if self.limited_in_row >= self.node.config.limits.abuse_threshold {
                return Flow::Close(CloseCode::POLICY_VIOLATION);
            }
            let id = match &parsed {
                Ok(request) => request.id.clone(),
                Err(error) => error.id.clone(),
            };
            self.reply_error(ProtocolError::new(
                ErrorCode::RateLimited,
                "message rate limit exceeded; the request was dropped",
                id,
            ));
            return Flow::Continue;
        }
        self.limited_in_row = 0;
        let outcome = match parsed {
            Ok(request) => self.dispatch(request).await,
            Err(error) => Err(error),
        };
        match outcome {
            Ok(Some(event)) => self.reply(&event),
            Ok(None) => {}
            Err(error) => self.reply_error(error),
        }
        Flow::Continue
    }

    async fn dispatch(&mut self, request: Request) -> Outcome {
        let id = request.id;
        match request.body {
            RequestBody::Send { to, content } => self.send(id, to, content).await,
            RequestBody::Join { room, since: _ } => self.join(id, room).await,
            RequestBody::Leave { room } => self.leave(id, room).await,
            RequestBody::Publish {
                room,
                content,
                echo,
                persist: _,
            } => self.publish(id, room, content, echo).await,
            RequestBody::Members { room } => self.members(id, room).await,
            RequestBody::Broadcast { content } => self.broadcast(id, content).await,
            RequestBody::Ping => Ok(Some(ServerEvent::Pong(Pong { reference: id }))),
            RequestBody::Auth { .. } => Err(ProtocolError::new(
                ErrorCode::Forbidden,
                "this connection is already authenticated",
                id,
            )),
            RequestBody::Refresh { token } => self.refresh(id, token).await,
        }
    }

    /// Joins the rooms named at connect (`?rooms=` and `/ws/ROOM`), with no acks.
    pub async fn join_initial(&mut self, rooms: Vec<String>) {
        for room in rooms {
            if let Err(error) = self.join(None, room).await {
                self.reply_error(error);
            }
        }
    }

    /// Replaces the connection's token. The new claims apply at once: rooms the token no longer
    /// allows are left (the others see `left`), `admin` follows the new token, and the expiry
    /// moves to the new `exp`.
    async fn refresh(&mut self, id: Option<String>, token: String) -> Outcome {
        let identity = self.node.auth.verify(&token).map_err(|e| {
            ProtocolError::new(ErrorCode::Unauthenticated, e.to_string(), id.clone())
        })?;
        if identity.user != self.identity.user {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!(
                    "the new token is for user {:?}, this connection is {:?}",
                    identity.user, self.identity.user
                ),
                id,
            ));
        }
        let revoked: Vec<Arc<str>> = self
            .rooms
            .iter()
            .filter(|room| !identity.may_use_room(room))
            .cloned()
            .collect();
        for room in revoked {
            self.rooms.remove(&room);
            if let Err(error) = self.node.leave(&self.handle, &room).await {
                tracing::warn!(conn = %self.handle.id(), %room, %error, "leave on refresh failed");
            }
        }
        self.control.set_expiry(token_expiry(&identity));
        self.identity = identity;
        Ok(id.map(|reference| {
            ServerEvent::Ack(Ack {
                reference: Some(reference),
                ..Ack::default()
            })
        }))
    }

    async fn send(&mut self, id: Option<String>, to: Vec<String>, content: Payload) -> Outcome {
        let max = self.node.config.limits.max_recipients;
        if to.len() > max {
            return Err(ProtocolError::new(
                ErrorCode::LimitExceeded,
                format!("\"to\" names {} users; the limit is {max}", to.len()),
                id,
            ));
        }
        let outcome = self
            .node
            .send_direct(&self.identity.user, Some(self.handle.id()), to, content)
            .await
            .map_err(|e| internal(e, &id))?;
        Ok(id.map(|reference| {
            ServerEvent::Ack(Ack {
                reference: Some(reference),
                id: Some(outcome.id),
                online: Some(outcome.online),
                offline: Some(outcome.offline),
                ..Ack::default()
            })
        }))
    }

    async fn join(&mut self, id: Option<String>, room: String) -> Outcome {
        if !self.identity.may_use_room(&room) {
            return Err(forbidden_room(&room, id));
        }
        let room: Arc<str> = room.into();
        let count = if self.rooms.contains(&room) {
            // Joining twice is harmless: answer with the current count.
            self.node
                .members(&room)
                .await
                .map_err(|e| internal(e, &id))?
                .len() as u64
        } else {
            let max = self.node.config.limits.max_rooms_per_connection;
            if self.rooms.len() >= max {
                return Err(ProtocolError::new(
                    ErrorCode::LimitExceeded,
                    format!("this connection is already in {max} rooms, the limit"),
                    id,
                ));
            }
            let change = self
                .node
                .join(&self.handle, &room)
                .await
                .map_err(|e| internal(e, &id))?;
            self.rooms.insert(room.clone());
            change.count
        };
        Ok(id.map(|reference| room_ack(reference, &room, count)))
    }

    async fn leave(&mut self, id: Option<String>, room: String) -> Outcome {
        let Some(room) = self.rooms.take(room.as_str()) else {
            return Err(not_member(&room, id));
        };
        let change = self
            .node
            .leave(&self.handle, &room)
            .await
            .map_err(|e| internal(e, &id))?;
        Ok(id.map(|reference| room_ack(reference, &room, change.count)))
    }

    async fn publish(
        &mut self,
        id: Option<String>,
        room: String,
        content: Payload,
        echo: bool,
    ) -> Outcome {
        let Some(room) = self.rooms.get(room.as_str()).cloned() else {
            return Err(not_member(&room, id));
        };
        // A refreshed token may have narrowed the rooms claim since the join.
        if !self.identity.may_use_room(&room) {
            return Err(forbidden_room(&room, id));
        }
        let message_id = self
            .node
            .publish(
                &self.identity.user,
                Some(self.handle.id()),
                &room,
                content,
                echo,
            )
            .await
            .map_err(|e| internal(e, &id))?;
        Ok(id.map(|reference| message_ack(reference, message_id)))
    }

    async fn members(&mut self, id: Option<String>, room: String) -> Outcome {
        if !self.identity.may_use_room(&room) {
            return Err(forbidden_room(&room, id));
        }
        let users = self
            .node
            .members(&room)
            .await
            .map_err(|e| internal(e, &id))?;
        Ok(Some(ServerEvent::Members(Members {
            reference: id,
            room,
            count: users.len() as u64,
            users,
        })))
    }

    async fn broadcast(&mut self, id: Option<String>, content: Payload) -> Outcome {
        if !self.identity.admin {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                "broadcast needs a token with \"admin\": true",
                id,
            ));
        }
        let message_id = self
            .node
            .broadcast(&self.identity.user, content)
            .await
            .map_err(|e| internal(e, &id))?;
        Ok(id.map(|reference| message_ack(reference, message_id)))
    }

    fn reply(&self, event: &ServerEvent) {
        self.handle.offer(OutFrame::Text(event.encode()));
    }

    fn reply_error(&self, error: ProtocolError) {
        metrics::counter!("herald_request_errors_total", "code" => error.code.as_str())
            .increment(1);
        self.reply(&ServerEvent::Error(ErrorEvent {
            code: error.code,
            message: error.message,
            reference: error.id,
        }));
    }

    /// Leaves every room and detaches from the node. Runs once, when the connection ends.
    pub async fn finish(mut self) {
        for room in std::mem::take(&mut self.rooms) {
            if let Err(error) = self.node.leave(&self.handle, &room).await {
                tracing::warn!(conn = %self.handle.id(), %room, %error, "leave on disconnect failed");
            }
        }
        self.node.disconnect(&self.handle).await;
    }
}

fn room_ack(reference: String, room: &str, count: u64) -> ServerEvent {
    ServerEvent::Ack(Ack {
        reference: Some(reference),
        room: Some(room.to_owned()),
        count: Some(count),
        ..Ack::default()
    })
}

fn message_ack(reference: String, message_id: String) -> ServerEvent {
    ServerEvent::Ack(Ack {
        reference: Some(reference),
        id: Some(message_id),
        ..Ack::default()
    })
}

fn forbidden_room(room: &str, id: Option<String>) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Forbidden,
        format!("the token does not allow room {room:?}"),
        id,
    )
}

fn not_member(room: &str, id: Option<String>) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::NotMember,
        format!("this connection has not joined room {room:?}"),
        id,
    )
}

fn internal(error: EngineError, id: &Option<String>) -> ProtocolError {
    tracing::error!(%error, "engine failure while serving a request");
    ProtocolError::new(
        ErrorCode::Internal,
        "the server could not complete the request",
        id.clone(),
    )
}
