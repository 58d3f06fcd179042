//! Requests about rooms: join, leave, publish, members, and history (a room's or, through the
//! same request, a conversation's).

use std::sync::Arc;

use herald_protocol::{
    Ack, ErrorCode, History, HistoryTarget, Members, Payload, ProtocolError, ServerEvent,
};

use super::answers::internal;
use super::users::no_direct;
use super::{Outcome, Session};
use crate::engine::store::Offset;
use crate::idempotency::{Recorder, Target};
use crate::node::{Origin, Published, Recovery};

impl Session {
    /// Joins a room. With a recovery the ack goes out first, then the missed messages, then
    /// the live ones.
    pub(super) async fn join(
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

    pub(super) async fn leave(&mut self, id: Option<String>, room: String) -> Outcome {
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

    pub(super) async fn publish(
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
        if persist && id.is_none() {
            let then = self.unanswered();
            let origin = Origin::once(&self.identity.user, Some(self.handle.id()));
            self.node
                .publish_stored_then(origin, &room, content, echo, then)
                .await;
            return Ok(None);
        }
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
    pub(super) async fn history(
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

    pub(super) async fn members(
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
}

fn room_ack_fields(reference: String, room: &str, count: u64) -> Ack {
    Ack {
        reference: Some(reference),
        room: Some(room.to_owned()),
        count: Some(count),
        ..Ack::default()
    }
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
