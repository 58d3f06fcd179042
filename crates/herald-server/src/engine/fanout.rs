//! What a committed message fans out as: its frames, encoded once per destination, and the
//! task that hands committed messages to the broker in commit order for a store that commits
//! off the event loop (the embedded SQLite store's writer thread).

use std::sync::Arc;

use herald_protocol::{Message, Payload, ServerEvent};
use tokio::sync::mpsc;

use crate::delivery::{Channel, ConnId, Delivery, OutFrame};
use crate::engine::broker::Broker;
use crate::engine::store::{Appended, NewMessage, OnCommit, StoreError};
use crate::engine::wire::{self, OffsetTemplate};

/// Commits (each a batch of messages) waiting for the publishing task. The writer waits when it
/// is full, so this bounds how far commits run ahead of their fan-out.
const QUEUE: usize = 8;

/// Encodes a message once, in its wire form: a text frame for JSON content, a binary frame for
/// bytes. `header` carries everything but the content.
pub fn encode(mut header: Message, content: Payload) -> OutFrame {
    match content {
        Payload::Json(raw) => {
            header.content = Some(raw);
            OutFrame::Text(ServerEvent::Message(header).encode())
        }
        Payload::Binary(bytes) => OutFrame::Binary(ServerEvent::encode_binary(&header, &bytes)),
    }
}

pub fn room_header(message: &NewMessage, room: &str, offset: Option<u64>) -> Message {
    Message {
        id: message.id.clone(),
        from: message.from.to_string(),
        to: None,
        room: Some(room.to_owned()),
        content: None,
        ts: message.ts,
        offset,
        encoding: None,
    }
}

/// The frames of a committed message with their channels. A direct message has one per
/// recipient with its inbox offset, and a copy without offset for the sender's other
/// connections (unless the sender is a recipient), all made from one encode.
pub fn frames(appended: &Appended, except: Option<ConnId>) -> Vec<(Channel, Delivery)> {
    let (to, message, inbox) = match appended {
        Appended::Room {
            room,
            message,
            position,
        } => {
            let offset = position.offset.0;
            let frame = encode(
                room_header(message, room, Some(offset)),
                message.content.clone(),
            );
            let delivery = Delivery {
                frame,
                except,
                offset: Some(offset),
            };
            return vec![(Channel::Room(room.clone()), delivery)];
        }
        Appended::Direct { to, message, inbox } => (to, message, inbox),
    };
    let header = |offset: Option<u64>| Message {
        id: message.id.clone(),
        from: message.from.to_string(),
        to: Some(to.clone()),
        room: None,
        content: None,
        ts: message.ts,
        offset,
        encoding: None,
    };
    // Every copy differs only in its offset: encoded once, each copy writes its own digits.
    let template = OffsetTemplate::new(encode(
        header(Some(wire::PLACEHOLDER)),
        message.content.clone(),
    ));
    let copy = |offset: Option<u64>| match &template {
        Some(template) => template.with_offset(offset),
        None => encode(header(offset), message.content.clone()),
    };
    let mut items = Vec::with_capacity(inbox.len() + 1);
    for (user, offset) in inbox {
        items.push((
            Channel::User(user.as_str().into()),
            Delivery {
                frame: copy(Some(offset.0)),
                except,
                offset: Some(offset.0),
            },
        ));
    }
    if !inbox.iter().any(|(user, _)| *user == *message.from) {
        items.push((
            Channel::User(message.from.clone()),
            Delivery {
                frame: copy(None),
                except,
                offset: None,
            },
        ));
    }
    items
}

/// An append queued on the store, waiting for its commit.
pub struct AwaitingCommit {
    /// The connection that must not get a copy (the sender's, or the publisher's without echo).
    pub except: Option<ConnId>,
    /// Called once the frames are with the broker, so the sender's ack, and whatever the sender
    /// does next (a leave, say), comes after the message's delivery.
    pub then: OnCommit,
}

/// A committed (or failed) append on its way to the broker.
pub struct Committed {
    pub result: Result<Appended, StoreError>,
    pub waiting: AwaitingCommit,
}

/// The appends of one commit, in commit order: the writer hands them over together, so the
/// publishing task is woken once per commit, not once per message.
pub type CommitBatch = Vec<Committed>;

/// Starts the task that publishes committed messages in the order they are queued, and returns
/// its queue. A store queues each commit's messages as one batch, in commit order, so every
/// stream's frames reach the broker in offset order and only after their commit. The task ends
/// when every sender of the queue is gone.
pub fn publish_in_commit_order(broker: Arc<dyn Broker>) -> mpsc::Sender<CommitBatch> {
    let (queue, receiver) = mpsc::channel(QUEUE);
    tokio::spawn(publish(broker, receiver));
    queue
}

async fn publish(broker: Arc<dyn Broker>, mut queue: mpsc::Receiver<CommitBatch>) {
    let depth = crate::metrics::gauge("herald_fanout_queue_depth");
    while let Some(batch) = queue.recv().await {
        depth.set(queue.len() as f64);
        for committed in batch {
            if let Ok(appended) = &committed.result {
                for (channel, delivery) in frames(appended, committed.waiting.except) {
                    if let Err(error) = broker.publish(&channel, delivery).await {
                        // The message is stored: clients get it through recovery or history.
                        tracing::warn!(%channel, %error, "fan-out of a stored message failed");
                    }
                }
            }
            committed.waiting.then.call(committed.result);
        }
    }
}
