//! Engine decorators that time every call into `herald_engine_operation_seconds`, labelled by
//! engine and operation. The node wraps whatever backends it is given, so every backend is
//! measured the same way without timing code in each.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use super::EngineError;
use super::broker::{Answers, Broker, DeliveryHandler};
use super::presence::{CountClaim, Presence, PresenceHandler, RoomChange, RoomCount};
use crate::delivery::{Channel, ConnId, Control, Delivery};

async fn timed<T>(
    engine: &'static str,
    operation: &'static str,
    call: impl Future<Output = T>,
) -> T {
    timed_into(&crate::metrics::engine_operation(engine, operation), call).await
}

/// [`timed`] into a histogram handle kept from before: for the calls every message makes.
async fn timed_into<T>(histogram: &metrics::Histogram, call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let result = call.await;
    histogram.record(started.elapsed().as_secs_f64());
    result
}

pub struct TimedBroker(pub Arc<dyn Broker>);

#[async_trait]
impl Broker for TimedBroker {
    fn start(&self, handler: Arc<dyn DeliveryHandler>) {
        self.0.start(handler);
    }

    async fn subscribe(&self, channel: &Channel) -> Result<(), EngineError> {
        timed("broker", "subscribe", self.0.subscribe(channel)).await
    }

    async fn unsubscribe(&self, channel: &Channel) -> Result<(), EngineError> {
        timed("broker", "unsubscribe", self.0.unsubscribe(channel)).await
    }

    async fn publish(&self, channel: &Channel, delivery: Delivery) -> Result<(), EngineError> {
        let histogram = &crate::metrics::HOT.broker_publish;
        timed_into(histogram, self.0.publish(channel, delivery)).await
    }

    async fn publish_control(
        &self,
        channel: &Channel,
        control: Control,
    ) -> Result<(), EngineError> {
        timed(
            "broker",
            "publish_control",
            self.0.publish_control(channel, control),
        )
        .await
    }

    async fn survey(&self, question: Bytes) -> Result<Answers, EngineError> {
        timed("broker", "survey", self.0.survey(question)).await
    }

    async fn ready(&self) -> bool {
        self.0.ready().await
    }

    async fn close(&self) {
        self.0.close().await;
    }
}

pub struct TimedPresence(pub Arc<dyn Presence>);

#[async_trait]
impl Presence for TimedPresence {
    fn start(&self, handler: Arc<dyn PresenceHandler>) {
        self.0.start(handler);
    }

    async fn join(&self, room: &str, user: &str, conn: ConnId) -> Result<RoomChange, EngineError> {
        timed("presence", "join", self.0.join(room, user, conn)).await
    }

    async fn leave(&self, room: &str, user: &str, conn: ConnId) -> Result<RoomChange, EngineError> {
        timed("presence", "leave", self.0.leave(room, user, conn)).await
    }

    async fn members(&self, room: &str) -> Result<Vec<String>, EngineError> {
        timed("presence", "members", self.0.members(room)).await
    }

    async fn count(&self, room: &str) -> Result<u64, EngineError> {
        timed("presence", "count", self.0.count(room)).await
    }

    async fn claim_count(&self, room: &str, window: Duration) -> Result<CountClaim, EngineError> {
        timed("presence", "claim_count", self.0.claim_count(room, window)).await
    }

    async fn connect(&self, user: &str, conn: ConnId) -> Result<(), EngineError> {
        timed("presence", "connect", self.0.connect(user, conn)).await
    }

    async fn disconnect(&self, user: &str, conn: ConnId) -> Result<(), EngineError> {
        timed("presence", "disconnect", self.0.disconnect(user, conn)).await
    }

    async fn online(&self, users: &[String]) -> Result<Vec<bool>, EngineError> {
        let histogram = &crate::metrics::HOT.presence_online;
        timed_into(histogram, self.0.online(users)).await
    }

    async fn connections(&self, user: &str) -> Result<Vec<ConnId>, EngineError> {
        timed("presence", "connections", self.0.connections(user)).await
    }

    async fn rooms(&self) -> Result<Vec<RoomCount>, EngineError> {
        timed("presence", "rooms", self.0.rooms()).await
    }

    async fn close(&self) {
        self.0.close().await;
    }

    async fn ready(&self) -> bool {
        self.0.ready().await
    }
}
