//! One authenticated client's requests: rate limit, parse, check permissions, call the node,
//! answer with an `ack` or an `error`. The session is owned by the connection's reader task, so
//! its state (rooms joined, rate limiter) needs no lock.
//!
//! Here the session's state, the rate limit and the dispatch of each request; `answers.rs`
//! answers them (at once, or in order once their stored message commits), `rooms.rs` and
//! `users.rs` serve the requests about rooms and about other users.

mod answers;
mod rooms;
mod users;

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use governor::clock::DefaultClock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use herald_protocol::request::{parse_binary, parse_text};
use herald_protocol::{
    Ack, CloseCode, ErrorCode, Pong, ProtocolError, Request, RequestBody, ServerEvent,
};

use super::token_expiry;
use crate::auth::Identity;
use crate::engine::store::{Epoch, Offset};
use crate::hub::ConnHandle;
use crate::hub::control::ConnControl;
use crate::node::{Node, Recovery};
use answers::Unanswered;

/// Whether a frame was over the rate limit.
enum Limited {
    No,
    /// Over it: the frame is dropped.
    Yes,
    /// Over it `limits.abuse_threshold` times in a row: the connection is closed.
    TooOften,
}

/// What the reader does after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close(CloseCode),
}

pub struct Session {
    node: Arc<Node>,
    handle: ConnHandle,
    identity: Identity,
    /// The device named at the handshake (`?device=`): its acks move its own inbox mark.
    device: Option<Arc<str>>,
    rooms: HashSet<Arc<str>>,
    limiter: DefaultDirectRateLimiter,
    /// Frames refused by the rate limiter since the last accepted one.
    limited_in_row: u32,
    /// Stored messages (publishes, direct messages) queued on the store, oldest first, each
    /// answering its request once committed (see [`Session::next_commit`]).
    committing: VecDeque<Answer>,
    /// Stored messages without `id` still committing; made at the first one.
    unanswered: Option<Arc<Unanswered>>,
}

/// A request's answer still to come, sent by the future itself.
type Answer = Pin<Box<dyn Future<Output = ()> + Send>>;

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
        device: Option<Arc<str>>,
    ) -> Self {
        let limits = &node.config().limits;
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
            identity,
            device,
            rooms: HashSet::new(),
            limiter,
            limited_in_row: 0,
            committing: VecDeque::new(),
            unanswered: None,
        }
    }

    pub fn handle(&self) -> &ConnHandle {
        &self.handle
    }

    pub fn control(&self) -> &Arc<ConnControl> {
        self.handle.control()
    }

    pub async fn on_text(&mut self, frame: &[u8]) -> Flow {
        self.on_request(parse_text(frame)).await
    }

    pub async fn on_binary(&mut self, frame: &Bytes) -> Flow {
        self.on_request(parse_binary(frame)).await
    }

    async fn on_request(&mut self, parsed: Result<Request, ProtocolError>) -> Flow {
        let kind = parsed
            .as_ref()
            .map_or("invalid", |request| request.body.kind());
        crate::metrics::count_request(kind);
        match self.rate_limit() {
            Limited::No => {}
            Limited::TooOften => return Flow::Close(CloseCode::POLICY_VIOLATION),
            Limited::Yes => {
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
        }
        let outcome = match parsed {
            Ok(request) => self.dispatch(request).await,
            Err(error) => Err(error),
        };
        match outcome {
            Ok(Some(event)) => self.reply_within_budget(&event).await,
            Ok(None) => {}
            Err(error) => self.reply_error(error),
        }
        Flow::Continue
    }

    /// A Ping or Pong from the peer. It costs the rate limit like a request (every Ping makes a
    /// Pong) and counts toward `limits.abuse_threshold`, but is never answered with an error.
    pub fn on_control(&mut self) -> Flow {
        match self.rate_limit() {
            Limited::TooOften => Flow::Close(CloseCode::POLICY_VIOLATION),
            Limited::No | Limited::Yes => Flow::Continue,
        }
    }

    /// Charges one frame to the rate limit, counting refusals in a row toward
    /// `limits.abuse_threshold`.
    fn rate_limit(&mut self) -> Limited {
        if self.limiter.check().is_ok() {
            self.limited_in_row = 0;
            return Limited::No;
        }
        self.limited_in_row += 1;
        metrics::counter!("herald_rate_limited_total").increment(1);
        if self.limited_in_row >= self.node.config().limits.abuse_threshold {
            Limited::TooOften
        } else {
            Limited::Yes
        }
    }

    async fn dispatch(&mut self, request: Request) -> Outcome {
        // Consecutive stored messages (publishes, direct messages) are pipelined: the store
        // keeps their order. Anything else waits for them first, so that requests take effect
        // in the order they came (a leave after a publish, an ephemeral publish after a stored
        // one, ...).
        if !matches!(
            request.body,
            RequestBody::Publish { persist: true, .. } | RequestBody::Send { .. }
        ) {
            self.all_committed().await;
        }
        let id = request.id;
        match request.body {
            RequestBody::Send { to, content } => self.send(id, to, content).await,
            RequestBody::Join { room, since, epoch } => {
                let recovery = since.map(|since| Recovery {
                    since: Offset(since),
                    epoch: epoch.map(Epoch),
                });
                self.join(id, room, recovery).await
            }
            RequestBody::Leave { room } => self.leave(id, room).await,
            RequestBody::Publish {
                room,
                content,
                echo,
                persist,
            } => self.publish(id, room, content, echo, persist).await,
            RequestBody::Members { room, after, limit } => {
                self.members(id, room, after, limit).await
            }
            RequestBody::Presence { users } => self.presence(id, users).await,
            RequestBody::Broadcast { content } => self.broadcast(id, content).await,
            RequestBody::Ping => Ok(Some(ServerEvent::Pong(Pong { reference: id }))),
            RequestBody::History {
                target,
                before,
                limit,
            } => self.history(id, target, before, limit).await,
            RequestBody::Ack { inbox } => self.ack_inbox(id, inbox).await,
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
            if let Err(error) = self.join(None, room, None).await {
                self.reply_error(error);
            }
        }
    }

    /// Replaces the connection's token. The new claims apply at once: rooms the token no longer
    /// allows are left (the others see `left`), `admin` follows the new token, and the expiry
    /// moves to the new `exp`.
    async fn refresh(&mut self, id: Option<String>, token: String) -> Outcome {
        let identity = self.node.auth().verify(&token).map_err(|e| {
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
        self.control().set_expiry(token_expiry(&identity));
        self.identity = identity;
        Ok(id.map(|reference| {
            ServerEvent::Ack(Ack {
                reference: Some(reference),
                ..Ack::default()
            })
        }))
    }

    /// Leaves every room and detaches from the node. Runs once, when the connection ends.
    pub async fn finish(mut self) {
        // Messages still committing are stored whether or not their acks can go out; waiting
        // for them records their acks, so a retry from the client gets them.
        self.all_committed().await;
        for room in std::mem::take(&mut self.rooms) {
            if let Err(error) = self.node.leave(&self.handle, &room).await {
                tracing::warn!(conn = %self.handle.id(), %room, %error, "leave on disconnect failed");
            }
        }
        self.node.disconnect(&self.handle).await;
    }
}
