//! Appends: a room message is one script that stores and publishes it; a direct message is
//! one script per recipient's inbox, then one per conversation. Here too the scripts'
//! arguments (the frame awaiting its offset, the content) and the frames' placeholders.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::join_all;
use herald_protocol::Payload;
use redis::{ScriptInvocation, Value};

use tokio::sync::OwnedSemaphorePermit;

use super::requests::{failed, start, started};
use super::retries::{retry_suffix, window_millis};
use super::{MARKS, META, RedisStore, SCRIPTS, SEEN, STREAM};
use crate::delivery::{Channel, ConnId, Delivery};
use crate::engine::fanout;
use crate::engine::redis::replies::{FirstAttempt, inbox_offset, room_appended};
use crate::engine::store::{
    Append, Appended, Committing, Epoch, NewMessage, Offset, StoreError, StreamPosition,
};
use crate::engine::wire;

/// Message ids an inbox or conversation remembers for retries, and for how long after its
/// last write: a retry comes within seconds.
const IDS_REMEMBERED: u64 = 1024;
const IDS_LIFETIME_SECS: u64 = 24 * 3600;

impl RedisStore {
    /// Stores and publishes a message:
    /// [`Store::append_then`](crate::engine::store::Store::append_then) of this store, whose doc
    /// says what it waits for and what it guarantees. Returns the rest of the append, to run
    /// in a task of its own (see [`spawned`](super::requests::spawned)) with the permit that
    /// holds its place.
    pub(super) async fn start_append(
        &self,
        mut append: Append,
        except: Option<ConnId>,
    ) -> Result<(OwnedSemaphorePermit, Committing), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let permit = self
            .queue
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let retried = match &mut append {
            Append::Direct { message, .. } => self.claim_direct(message).await?,
            Append::Room { .. } => false,
        };
        let mut appended = awaiting_offsets(append);
        let frames = fanout::frames(&appended, except);
        match &appended {
            Appended::Room { room, message, .. } => {
                let (channel, delivery) = frames.first().ok_or_else(|| no_frame("room"))?;
                let (meta, stream) = (self.keys.room(room, META), self.keys.room(room, STREAM));
                let mut invocation = SCRIPTS.room_append.prepare_invoke();
                invocation
                    .key(meta)
                    .key(stream)
                    .key(self.keys.channel(channel))
                    .arg(Epoch::random().0)
                    .arg(self.publish)
                    .arg(&awaiting_offset(delivery)?[..])
                    .arg(&message.id)
                    .arg(&*message.from)
                    .arg(message.ts);
                content_args(&mut invocation, &message.content);
                if let Some(key) = &message.idempotency {
                    let suffix = retry_suffix(key, Some(&message.from));
                    invocation
                        .key(self.keys.room(room, &suffix))
                        .arg(window_millis(key));
                }
                let request = self.start(invocation).await;
                let work = async move {
                    let reply = request.await.map_err(failed("append"))?;
                    let (stored_at, first) = room_appended(reply)?;
                    if let Appended::Room {
                        position, message, ..
                    } = &mut appended
                    {
                        *position = stored_at;
                        if let Some(FirstAttempt { id, ts }) = first {
                            message.id = id;
                            message.ts = ts;
                        }
                    }
                    Ok(appended)
                };
                Ok((permit, work.boxed()))
            }
            Appended::Direct { inbox, .. } if inbox.is_empty() => {
                Ok((permit, futures::future::ready(Ok(appended)).boxed()))
            }
            Appended::Direct { to, message, inbox } => {
                let to = serde_json::to_string(to).map_err(|error| StoreError::Backend {
                    operation: "append",
                    reason: error.to_string(),
                })?;
                let mut inbox_requests = Vec::with_capacity(inbox.len());
                let mut conversations = Vec::with_capacity(inbox.len());
                for (user, _) in inbox {
                    let delivery = frames
                        .iter()
                        .find(|(channel, delivery)| {
                            delivery.offset.is_some()
                                && matches!(channel, Channel::User(name) if **name == **user)
                        })
                        .map(|(_, delivery)| delivery)
                        .ok_or_else(|| no_frame("direct"))?;
                    let invocation = self.inbox_append(user, message, &to, delivery)?;
                    inbox_requests.push(self.start(invocation).await);
                    conversations.push(self.conversation_append(user, message, &to));
                }
                let sender_copy = frames
                    .iter()
                    .find(|(_, delivery)| delivery.offset.is_none())
                    .map(|(channel, delivery)| {
                        let mut publish = redis::cmd(self.publish);
                        publish
                            .arg(self.keys.channel(channel))
                            .arg(&wire::encode_delivery(delivery)[..]);
                        publish
                    });
                let turn = started(self.conversation_turn.clone().lock_owned().boxed()).await;
                let connection = self.connection.clone();
                let limit = self.limits.max_inbox_messages;
                // The turn is passed on as soon as the inbox replies are in: the message's
                // own task (see `spawned`) waits for them, however late the caller polls.
                let work = async move {
                    let replies = join_all(inbox_requests).await;
                    let mut stored = Vec::with_capacity(replies.len());
                    let mut full = Vec::new();
                    let mut failure = None;
                    if let Appended::Direct { inbox, .. } = &mut appended {
                        for ((user, offset), reply) in inbox.iter_mut().zip(replies) {
                            let outcome = reply.map_err(failed("append")).and_then(inbox_offset);
                            stored.push(matches!(outcome, Ok(Some(_))));
                            match outcome {
                                Ok(Some(at)) => *offset = at,
                                Ok(None) => full.push(user.clone()),
                                Err(error) => {
                                    failure.get_or_insert(error);
                                }
                            }
                        }
                    }
                    let turn = turn.await;
                    let mut requests = Vec::with_capacity(conversations.len());
                    for (invocation, stored) in conversations.into_iter().zip(stored) {
                        if stored {
                            requests.push(start(&connection, invocation).await);
                        }
                    }
                    // A retried request's first attempt published the sender's copy (or failed
                    // before its inbox writes: pub/sub is at-most-once, and the sender's other
                    // connections find the message in history).
                    let sender_copy = match sender_copy {
                        Some(publish) if !retried && full.is_empty() && failure.is_none() => {
                            let mut connection = connection.clone();
                            Some(
                                started(
                                    async move {
                                        publish.query_async::<Value>(&mut connection).await
                                    }
                                    .boxed(),
                                )
                                .await,
                            )
                        }
                        _ => None,
                    };
                    drop(turn);
                    let written = join_all(requests).await;
                    if let Some(published) = sender_copy
                        && let Err(error) = published.await
                    {
                        // Pub/sub is at-most-once: the message is stored, which is what the
                        // sender is told; their other connections find it in history.
                        tracing::warn!(%error, "the sender's copy of a direct message was not published");
                    }
                    if let Some(error) = failure {
                        return Err(error);
                    }
                    for reply in written {
                        reply.map_err(failed("append"))?;
                    }
                    if !full.is_empty() {
                        return Err(StoreError::InboxFull { users: full, limit });
                    }
                    Ok(appended)
                };
                Ok((permit, work.boxed()))
            }
        }
    }

    fn inbox_append(
        &self,
        user: &str,
        message: &NewMessage,
        to: &str,
        delivery: &Delivery,
    ) -> Result<ScriptInvocation<'static>, StoreError> {
        let mut invocation = SCRIPTS.inbox_append.prepare_invoke();
        invocation
            .key(self.keys.user(user, META))
            .key(self.keys.user(user, STREAM))
            .key(self.keys.user(user, MARKS))
            .key(self.keys.user(user, SEEN))
            .key(self.keys.channel(&Channel::User(user.into())))
            .arg(Epoch::random().0)
            .arg(self.publish)
            .arg(&awaiting_offset(delivery)?[..])
            .arg(self.limits.max_inbox_messages)
            .arg(IDS_REMEMBERED)
            .arg(IDS_LIFETIME_SECS)
            .arg(&message.id)
            .arg(&*message.from)
            .arg(to)
            .arg(message.ts);
        content_args(&mut invocation, &message.content);
        Ok(invocation)
    }

    fn conversation_append(
        &self,
        with: &str,
        message: &NewMessage,
        to: &str,
    ) -> ScriptInvocation<'static> {
        let key = |suffix| self.keys.conversation(&message.from, with, suffix);
        let mut invocation = SCRIPTS.conversation_append.prepare_invoke();
        invocation
            .key(key(META))
            .key(key(STREAM))
            .key(key(SEEN))
            .arg(Epoch::random().0)
            .arg(IDS_REMEMBERED)
            .arg(IDS_LIFETIME_SECS)
            .arg(&message.id)
            .arg(&*message.from)
            .arg(to)
            .arg(message.ts);
        content_args(&mut invocation, &message.content);
        invocation
    }
}

/// The message as it will be appended, with placeholder offsets in its frames: the scripts
/// splice the real ones in.
fn awaiting_offsets(append: Append) -> Appended {
    match append {
        Append::Room { room, message } => Appended::Room {
            room,
            message,
            position: StreamPosition {
                offset: Offset(wire::PLACEHOLDER),
                epoch: Epoch::default(),
            },
        },
        Append::Direct {
            to,
            recipients,
            message,
        } => Appended::Direct {
            to,
            message,
            inbox: recipients
                .into_iter()
                .map(|user| (user, Offset(wire::PLACEHOLDER)))
                .collect(),
        },
    }
}

/// The envelope of a frame encoded with the placeholder offset, ready for a script to append
/// the real offset's digits.
fn awaiting_offset(delivery: &Delivery) -> Result<Bytes, StoreError> {
    wire::encode_delivery_awaiting_offset(delivery).ok_or_else(|| StoreError::Backend {
        operation: "append",
        reason: "the encoded frame holds no offset placeholder".into(),
    })
}

fn no_frame(kind: &'static str) -> StoreError {
    StoreError::Backend {
        operation: "append",
        reason: format!("no frame was encoded for the {kind} message"),
    }
}

/// The two script arguments that carry a message's content: whether it is binary, and its
/// bytes.
fn content_args(invocation: &mut ScriptInvocation<'static>, content: &Payload) {
    match content {
        Payload::Json(raw) => invocation.arg(0).arg(raw.get().as_bytes()),
        Payload::Binary(bytes) => invocation.arg(1).arg(&bytes[..]),
    };
}
