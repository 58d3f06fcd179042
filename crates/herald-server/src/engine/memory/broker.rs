//! In-process broker: with one node, publishing is handing the frame straight to the node.

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use bytes::Bytes;

use crate::delivery::{Channel, Control, Delivery};
use crate::engine::EngineError;
use crate::engine::broker::{Answers, Broker, DeliveryHandler};

/// Delivers every publish synchronously to the local node. Subscriptions are implicit: the hub
/// already drops frames for channels without local members.
#[derive(Default)]
pub struct MemoryBroker {
    // Weak: the node owns the broker, so a strong reference back would leak both.
    handler: OnceLock<Weak<dyn DeliveryHandler>>,
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn start(&self, handler: Arc<dyn DeliveryHandler>) {
        let _ = self.handler.set(Arc::downgrade(&handler));
    }

    async fn subscribe(&self, _channel: &Channel) -> Result<(), EngineError> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &Channel) -> Result<(), EngineError> {
        Ok(())
    }

    async fn publish(&self, channel: &Channel, delivery: Delivery) -> Result<(), EngineError> {
        self.handler()?.deliver(channel, &delivery);
        Ok(())
    }

    async fn publish_control(
        &self,
        channel: &Channel,
        control: Control,
    ) -> Result<(), EngineError> {
        self.handler()?.control(channel, &control);
        Ok(())
    }

    /// The only node answers; a question it cannot read is unanswered.
    async fn survey(&self, question: Bytes) -> Result<Answers, EngineError> {
        let answer = self.handler()?.answer(&question);
        Ok(Answers {
            unanswered: usize::from(answer.is_none()),
            answers: answer.into_iter().collect(),
        })
    }

    async fn close(&self) {}
}

impl MemoryBroker {
    fn handler(&self) -> Result<Arc<dyn DeliveryHandler>, EngineError> {
        self.handler
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| EngineError::new("broker", "not started"))
    }
}
