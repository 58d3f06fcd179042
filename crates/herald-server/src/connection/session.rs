//! One authenticated client's requests: rate limit, parse, check permissions, call the node,
//! answer with an `ack` or an `error`. The session is owned by the connection's reader task, so
//! its state (rooms joined, rate limiter) needs no lock.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use governor::clock::DefaultClock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use herald_protocol::request::{parse_binary, parse_text};
use herald_protocol::{
    Ack, CloseCode, ErrorCode, ErrorEvent, History, HistoryTarget, Members, Payload, Pong,
    PresenceReply, ProtocolError, Request, RequestBody, ServerEvent,
};

use super::token_expiry;
use crate::auth::Identity;
use crate::delivery::{OutFrame, Outgoing};
use crate::engine::EngineError;
use crate::engine::store::{Epoch, Offset, StoreError};
use crate::hub::ConnHandle;
use crate::hub::control::ConnControl;
use crate::idempotency::{Claim, Recorder, Target};
use crate::node::{Node, Origin, Published, Recovery};

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
    control: Arc<ConnControl>,
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
}

/// A request's answer still to come, sent by the future itself.
type Answer = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Most stored messages one connection may have waiting for their commit; past this the
/// reader stops reading until one commits.
const MAX_PIPELINED: usize = 256;

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
        control: Arc<ConnControl>,
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
            control,
            identity,
            device,
            rooms: HashSet::new(),
            limiter,
            limited_in_row: 0,
            committing: VecDeque::new(),
        }
    }

    pub fn handle(&self) -> &ConnHandle {
        &self.handle
    }

    pub fn control(&self) -> &Arc<ConnControl> {
        &self.control
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
        metrics::counter!("herald_messages_in_total", "type" => kind).increment(1);
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

    /// True while stored messages wait for their commit.
    pub fn is_committing(&self) -> bool {
        !self.committing.is_empty()
    }

    /// Whether the reader may take another request: not while [`MAX_PIPELINED`] messages wait.
    pub fn may_read(&self) -> bool {
        self.committing.len() < MAX_PIPELINED
    }

    /// Waits for the oldest queued message to commit and answers it. Messages commit in the
    /// order they were queued, so waiting on the oldest is waiting on the next.
    pub async fn next_commit(&mut self) {
        if let Some(answer) = self.committing.front_mut() {
            answer.await;
            self.committing.pop_front();
        }
    }

    /// Queues the answer to a stored message's request: `ack` once it has committed (when the
    /// request has an `id`, also remembered for retries), or the error. Answered in order by
    /// [`next_commit`](Self::next_commit).
    fn answer_when_committed<T>(
        &mut self,
        committing: impl Future<Output = Result<T, EngineError>> + Send + 'static,
        id: Option<String>,
        recorder: Option<Recorder>,
        ack: impl FnOnce(T) -> Ack + Send + 'static,
    ) {
        let handle = self.handle.clone();
        self.committing.push_back(Box::pin(async move {
            match committing.await {
                Ok(done) => {
                    if let Some(reference) = id {
                        let mut ack = ack(done);
                        if let Some(recorder) = recorder {
                            recorder.record(&ack);
                        }
                        ack.reference = Some(reference);
                        answer(&handle, &ServerEvent::Ack(ack));
                    }
                }
                Err(error) if error.limit_exceeded => answer_error(
                    &handle,
                    ProtocolError::new(ErrorCode::LimitExceeded, error.message, id),
                ),
                Err(error) => answer_error(&handle, internal(error, &id)),
            }
        }));
    }

    /// Looks a stored message's request up among the recent ones. A retry is answered (in
    /// order, like the others) with the first attempt's ack and yields `Err`; a new request
    /// yields what records its ack.
    fn claim(
        &mut self,
        id: &Option<String>,
        kind: &str,
        target: Target<'_>,
        content: &Payload,
    ) -> Result<Option<Recorder>, ()> {
        let Some(reference) = id else {
            return Ok(None);
        };
        let claim =
            self.node
                .idempotency()
                .claim(&self.identity.user, reference, kind, target, content);
        match claim {
            None => Ok(None),
            Some(Claim::New(recorder)) => Ok(Some(recorder)),
            Some(Claim::Retry(mut first)) => {
                let handle = self.handle.clone();
                let reference = reference.clone();
                self.committing.push_back(Box::pin(async move {
                    let ack = first
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|a| a.clone());
                    match ack {
                        Some(mut ack) => {
                            ack.reference = Some(reference);
                            answer(&handle, &ServerEvent::Ack(ack));
                        }
                        None => answer_error(
                            &handle,
                            ProtocolError::new(
                                ErrorCode::Internal,
                                "the first attempt with this id failed: send it again",
                                Some(reference),
                            ),
                        ),
                    }
                }));
                Err(())
            }
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
            while self.is_committing() {
                self.next_commit().await;
            }
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
        if !self.identity.direct {
            return Err(no_direct("send", id));
        }
        let max = self.node.config().limits.max_recipients;
        if to.len() > max {
            return Err(ProtocolError::new(
                ErrorCode::LimitExceeded,
                format!("\"to\" names {} users; the limit is {max}", to.len()),
                id,
            ));
        }
        self.charge_recipients(&to, &id)?;
        let Ok(recorder) = self.claim(&id, "send", Target::Users(&to), &content) else {
            return Ok(None);
        };
        let origin = Origin {
            user: &self.identity.user,
            conn: Some(self.handle.id()),
            idempotency: recorder.as_ref().map(Recorder::key),
        };
        let committing = self
            .node
            .send_direct_queued(origin, to, content)
            .await
            .map_err(|e| internal(e, &id))?;
        self.answer_when_committed(committing, id, recorder, |outcome| Ack {
            id: Some(outcome.id),
            online: Some(outcome.online),
            offline: Some(outcome.offline),
            offsets: Some(outcome.offsets),
            ..Ack::default()
        });
        Ok(None)
    }

    /// Charges a direct message's other recipients to the rate limit (the frame itself paid for
    /// the first): what a message costs the node (stored inbox entries, frames encoded and
    /// queued) grows with its recipients, so one connection's share of the store and the
    /// fan-out is bounded by the deliveries it causes, not by its frames. Otherwise one client
    /// sending to 100 recipients at the frame rate would cost the node as much as 100 clients.
    fn charge_recipients(
        &mut self,
        to: &[String],
        id: &Option<String>,
    ) -> Result<(), ProtocolError> {
        let mut distinct: Vec<&str> = to.iter().map(String::as_str).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let Some(extra) = NonZeroU32::new(distinct.len().saturating_sub(1) as u32) else {
            return Ok(());
        };
        match self.limiter.check_n(extra) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => {
                metrics::counter!("herald_rate_limited_total").increment(1);
                Err(ProtocolError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "a direct message costs one unit of the message rate limit per \
                         recipient; {} recipients exceed what is left now",
                        distinct.len()
                    ),
                    id.clone(),
                ))
            }
            Err(_) => Err(ProtocolError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "a direct message costs one unit of the message rate limit per recipient; \
                     {} recipients exceed limits.burst",
                    distinct.len()
                ),
                id.clone(),
            )),
        }
    }

    /// Joins a room. With a recovery the ack goes out first, then the missed messages, then
    /// the live ones.
    async fn join(
        &mut self,
        id: Option<String>,
        room: String,
        recovery: Option<Recovery>,
    ) -> Outcome {
        if !self.identity.may_use_room(&room) {
            return Err(forbidden_room(&room, id));
        }
        let room: Arc<str> = room.into();
        if self.rooms.contains(&room) && recovery.is_some() {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                format!(
                    "\"since\" applies to a new join; this connection is already in room {room:?}"
                ),
                id,
            ));
        }
        let count = if self.rooms.contains(&room) {
            // Joining twice is harmless: answer with the current count.
            self.node
                .members(&room)
                .await
                .map_err(|e| internal(e, &id))?
                .len() as u64
        } else {
            let max = self.node.config().limits.max_rooms_per_connection;
            if self.rooms.len() >= max {
                return Err(ProtocolError::new(
                    ErrorCode::LimitExceeded,
                    format!("this connection is already in {max} rooms, the limit"),
                    id,
                ));
            }
            let joined = self
                .node
                .join(&self.handle, &room, recovery)
                .await
                .map_err(|e| internal(e, &id))?;
            self.rooms.insert(room.clone());
            if let Some(reference) = id {
                self.reply(&ServerEvent::Ack(Ack {
                    offset: Some(joined.position.offset.0),
                    epoch: (!joined.position.epoch.is_unset()).then_some(joined.position.epoch.0),
                    recovered: joined.recovered,
                    ..room_ack_fields(reference, &room, joined.change.count)
                }));
            }
            if let Some(replay) = joined.replay {
                replay.run().await;
            }
            return Ok(None);
        };
        Ok(id.map(|reference| ServerEvent::Ack(room_ack_fields(reference, &room, count))))
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
        Ok(id.map(|reference| ServerEvent::Ack(room_ack_fields(reference, &room, change.count))))
    }

    async fn publish(
        &mut self,
        id: Option<String>,
        room: String,
        content: Payload,
        echo: bool,
        persist: bool,
    ) -> Outcome {
        let Some(room) = self.rooms.get(room.as_str()).cloned() else {
            return Err(not_member(&room, id));
        };
        // A refreshed token may have narrowed the rooms claim since the join.
        if !self.identity.may_use_room(&room) {
            return Err(forbidden_room(&room, id));
        }
        // Only stored messages are remembered: an ephemeral one is not worth a retry.
        let recorder = if persist {
            let Ok(recorder) = self.claim(&id, "publish", Target::Room(&room), &content) else {
                return Ok(None);
            };
            recorder
        } else {
            None
        };
        let origin = Origin {
            user: &self.identity.user,
            conn: Some(self.handle.id()),
            idempotency: recorder.as_ref().map(Recorder::key),
        };
        let committing = self
            .node
            .publish_queued(origin, &room, content, echo, persist)
            .await
            .map_err(|e| internal(e, &id))?;
        if !persist {
            // Already relayed (and nothing is in flight: see `dispatch`): answer now.
            let published = committing.await.map_err(|e| internal(e, &id))?;
            return Ok(id.map(|reference| {
                ServerEvent::Ack(Ack {
                    reference: Some(reference),
                    ..publish_ack(published)
                })
            }));
        }
        self.answer_when_committed(committing, id, recorder, publish_ack);
        Ok(None)
    }

    /// A page of a room's history (the token must allow the room; membership is not needed)
    /// or of the caller's conversation with another user.
    async fn history(
        &mut self,
        id: Option<String>,
        target: HistoryTarget,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Outcome {
        let before = before.map(Offset);
        let limit = limit.map(|limit| limit as usize);
        let (room, with, page) = match target {
            HistoryTarget::Room(room) => {
                if !self.identity.may_use_room(&room) {
                    return Err(forbidden_room(&room, id));
                }
                let page = self.node.room_history(&room, before, limit).await;
                (Some(room), None, page)
            }
            HistoryTarget::With(user) => {
                if !self.identity.direct {
                    return Err(no_direct("history", id));
                }
                let page = self
                    .node
                    .conversation_history(&self.identity.user, &user, before, limit)
                    .await;
                (None, Some(user), page)
            }
        };
        let page = page.map_err(|e| internal(e, &id))?;
        Ok(Some(ServerEvent::History(History {
            reference: id,
            room,
            with,
            epoch: (!page.epoch.is_unset()).then_some(page.epoch.0),
            messages: page.messages,
            more: page.more,
        })))
    }

    /// The client received its inbox up to `offset`.
    async fn ack_inbox(&mut self, id: Option<String>, offset: u64) -> Outcome {
        match self
            .node
            .ack_inbox(&self.identity.user, self.device.as_deref(), Offset(offset))
            .await
        {
            Ok(acked) => Ok(id.map(|reference| {
                ServerEvent::Ack(Ack {
                    reference: Some(reference),
                    inbox: Some(acked.0),
                    ..Ack::default()
                })
            })),
            Err(StoreError::AckBeyondInbox { requested, newest }) => Err(ProtocolError::new(
                ErrorCode::InvalidField,
                format!("\"inbox\" {requested} is beyond the newest inbox offset {newest}"),
                id,
            )),
            Err(error) => Err(internal(error.into(), &id)),
        }
    }

    async fn members(
        &mut self,
        id: Option<String>,
        room: String,
        after: Option<String>,
        limit: Option<u32>,
    ) -> Outcome {
        if !self.identity.may_use_room(&room) {
            return Err(forbidden_room(&room, id));
        }
        let page = self
            .node
            .members_page(&room, after.as_deref(), limit.map(|l| l as usize))
            .await
            .map_err(|e| internal(e, &id))?;
        Ok(Some(ServerEvent::Members(Members {
            reference: id,
            room,
            count: page.count,
            users: page.users,
            next: page.next,
        })))
    }

    async fn presence(&mut self, id: Option<String>, users: Vec<String>) -> Outcome {
        if !self.identity.direct {
            return Err(no_direct("presence", id));
        }
        let max = self.node.config().limits.max_recipients;
        if users.len() > max {
            return Err(ProtocolError::new(
                ErrorCode::LimitExceeded,
                format!("\"users\" names {} users; the limit is {max}", users.len()),
                id,
            ));
        }
        let flags = self
            .node
            .online(&users)
            .await
            .map_err(|e| internal(e, &id))?;
        Ok(Some(ServerEvent::Presence(PresenceReply {
            reference: id,
            online: users.into_iter().zip(flags).collect(),
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
        answer(&self.handle, event);
    }

    /// Answers a request whose reply may be large (a page of `history`, the `members` of a big
    /// room). One larger than the connection's whole byte budget (`limits.send_queue_bytes`)
    /// is refused with `limit_exceeded`; one larger than what is left waits for the writer to
    /// make room, up to `limits.write_timeout`, then the connection is cut off as a slow
    /// consumer, as a full outbox is.
    async fn reply_within_budget(&mut self, event: &ServerEvent) {
        let frame = event.encode();
        let budget = self.handle.byte_budget();
        if frame.len() > budget {
            let reference = match event {
                ServerEvent::History(history) => history.reference.clone(),
                ServerEvent::Members(members) => members.reference.clone(),
                _ => None,
            };
            self.reply_error(ProtocolError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the reply would be {} bytes, over limits.send_queue_bytes ({budget}); \
                     ask for less (a smaller \"limit\")",
                    frame.len()
                ),
                reference,
            ));
            return;
        }
        let outgoing = Outgoing::single(OutFrame::Text(frame), Instant::now());
        self.handle
            .send(outgoing, self.node.config().limits.write_timeout)
            .await;
    }

    fn reply_error(&self, error: ProtocolError) {
        answer_error(&self.handle, error);
    }

    /// Leaves every room and detaches from the node. Runs once, when the connection ends.
    pub async fn finish(mut self) {
        // Messages still committing are stored whether or not their acks can go out; waiting
        // for them records their acks, so a retry from the client gets them.
        while let Some(answer) = self.committing.pop_front() {
            answer.await;
        }
        for room in std::mem::take(&mut self.rooms) {
            if let Err(error) = self.node.leave(&self.handle, &room).await {
                tracing::warn!(conn = %self.handle.id(), %room, %error, "leave on disconnect failed");
            }
        }
        self.node.disconnect(&self.handle).await;
    }
}

fn room_ack_fields(reference: String, room: &str, count: u64) -> Ack {
    Ack {
        reference: Some(reference),
        room: Some(room.to_owned()),
        count: Some(count),
        ..Ack::default()
    }
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

/// A request naming other users, from a token with `"direct": false`.
fn no_direct(kind: &str, id: Option<String>) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Forbidden,
        format!("the token does not allow {kind:?} with other users (\"direct\": false)"),
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

/// The ack of a publish, without its `ref`.
fn publish_ack(published: Published) -> Ack {
    let (offset, epoch) = match published.position {
        Some(position) => (Some(position.offset.0), Some(position.epoch.0)),
        None => (None, None),
    };
    Ack {
        id: Some(published.id),
        offset,
        epoch,
        ..Ack::default()
    }
}

fn answer(handle: &ConnHandle, event: &ServerEvent) {
    handle.offer(OutFrame::Text(event.encode()));
}

fn answer_error(handle: &ConnHandle, error: ProtocolError) {
    metrics::counter!("herald_request_errors_total", "code" => error.code.as_str()).increment(1);
    answer(
        handle,
        &ServerEvent::Error(ErrorEvent {
            code: error.code,
            message: error.message,
            reference: error.id,
        }),
    );
}

fn internal(error: EngineError, id: &Option<String>) -> ProtocolError {
    tracing::error!(%error, "engine failure while serving a request");
    ProtocolError::new(
        ErrorCode::Internal,
        "the server could not complete the request",
        id.clone(),
    )
}
