//! Requests about other users: direct messages (charged to the rate limit per recipient),
//! presence, the caller's inbox acks, and the admin's broadcast to everyone.

use std::num::NonZeroU32;

use herald_protocol::{Ack, ErrorCode, Payload, PresenceReply, ProtocolError, ServerEvent};

use super::answers::internal;
use super::{Outcome, Session};
use crate::engine::store::{Offset, StoreError};
use crate::idempotency::{Recorder, Target};
use crate::node::Origin;

impl Session {
    pub(super) async fn send(
        &mut self,
        id: Option<String>,
        to: Vec<String>,
        content: Payload,
    ) -> Outcome {
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
        if id.is_none() {
            let then = self.unanswered();
            let origin = Origin::once(&self.identity.user, Some(self.handle.id()));
            self.node.send_direct_then(origin, to, content, then).await;
            return Ok(None);
        }
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

    /// The client received its inbox up to `offset`.
    pub(super) async fn ack_inbox(&mut self, id: Option<String>, offset: u64) -> Outcome {
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

    pub(super) async fn presence(&mut self, id: Option<String>, users: Vec<String>) -> Outcome {
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

    pub(super) async fn broadcast(&mut self, id: Option<String>, content: Payload) -> Outcome {
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
}

fn message_ack(reference: String, message_id: String) -> ServerEvent {
    ServerEvent::Ack(Ack {
        reference: Some(reference),
        id: Some(message_id),
        ..Ack::default()
    })
}

/// A request naming other users, from a token with `"direct": false`.
pub(super) fn no_direct(kind: &str, id: Option<String>) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Forbidden,
        format!("the token does not allow {kind:?} with other users (\"direct\": false)"),
        id,
    )
}
