//! The broker carries encoded frames from the node where a message is accepted to every node
//! with connections on its channel.
//!
//! # Contract
//! - Delivery is at-most-once and unordered across channels; within one channel, frames
//!   published from one node arrive at each node in publish order.
//! - A node receives only channels it subscribed to (a backend may deliver more; the hub drops
//!   frames for channels without local members). The node subscribes on a channel's first local
//!   member and unsubscribes after its last.
//! - Frames arrive through the one [`DeliveryHandler`] given to [`Broker::start`], the node's,
//!   which routes them to local connections without blocking.
//! - Controls ([`Control`], e.g. "disconnect this user") travel on the same channels with the
//!   same guarantees, so a control published after a frame on one channel from one node is
//!   acted on after that frame is queued. A backend shared by nodes must carry them to every
//!   subscribed node, like frames: the server API's disconnect relies on it.
//! - `subscribe` resolves once the backend confirmed the subscription: a frame published on
//!   that channel afterwards, from any node, reaches this one.
//! - A backend that can lose its connection reports it: `ready()` is false from the loss until
//!   it has reconnected and resubscribed every channel, and then it calls
//!   [`DeliveryHandler::broker_restored`] once. Frames published meanwhile may be lost
//!   (at-most-once), so the node uses that call to make its clients recover from the store.
//! - [`Broker::survey`] asks every node connected to the backend (this one included) a
//!   question and gathers their answers, each given by [`DeliveryHandler::answer`]: that is how
//!   the server API lists what only each node knows (its connections' traffic). A node that
//!   does not answer within the backend's response timeout is counted, not waited for.
//! - After [`Broker::close`] nothing more is delivered and the backend's connections are
//!   released.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::EngineError;
use crate::delivery::{Channel, Control, Delivery};

/// Receives frames from the broker; implemented by the node, which hands them to the hub.
pub trait DeliveryHandler: Send + Sync {
    /// Must not block: it runs on the broker's receive path.
    fn deliver(&self, channel: &Channel, delivery: &Delivery);
    /// Acts on a control for the channel's local connections. Must not block either.
    fn control(&self, channel: &Channel, control: &Control);
    /// The broker had lost its connection and has now reconnected and resubscribed every
    /// channel: what was published in between may be missing. Must not block.
    fn broker_restored(&self) {}
    /// This node's answer to a survey's question; `None` for a question it cannot read (from
    /// a node of another version), which then counts as unanswered. Must not block.
    fn answer(&self, _question: &[u8]) -> Option<Bytes> {
        None
    }
}

/// What the nodes answered to a survey.
#[derive(Debug, Default)]
pub struct Answers {
    /// One per node that answered in time, in no particular order.
    pub answers: Vec<Bytes>,
    /// Nodes that received the question but did not answer in time.
    pub unanswered: usize,
}

#[async_trait]
pub trait Broker: Send + Sync {
    /// Connects the broker to the node. Called once, before any other method.
    fn start(&self, handler: Arc<dyn DeliveryHandler>);
    async fn subscribe(&self, channel: &Channel) -> Result<(), EngineError>;
    async fn unsubscribe(&self, channel: &Channel) -> Result<(), EngineError>;
    async fn publish(&self, channel: &Channel, delivery: Delivery) -> Result<(), EngineError>;
    /// Carries a control to every node subscribed to the channel (this one included).
    async fn publish_control(&self, channel: &Channel, control: Control)
    -> Result<(), EngineError>;
    /// Asks every node the question and gathers the answers (see the module's contract).
    async fn survey(&self, question: Bytes) -> Result<Answers, EngineError>;
    /// Whether the backend is reachable and every subscription is in place (for readiness
    /// checks).
    async fn ready(&self) -> bool {
        true
    }
    /// Stops delivering and releases the backend's connections.
    async fn close(&self);
}
