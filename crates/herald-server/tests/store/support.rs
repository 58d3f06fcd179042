//! The backends under test, the recording of what they publish, and append helpers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::redis::RedisServer;
use futures::StreamExt;
use herald_protocol::Payload;
use herald_server::config::RedisConfig;
use herald_server::delivery::{Channel, Control, Delivery};
use herald_server::engine::broker::{Broker, DeliveryHandler};
use herald_server::engine::memory::MemoryBroker;
use herald_server::engine::redis::Keys;
use herald_server::engine::redis::store::RedisStore;
use herald_server::engine::sqlite::{SqliteStore, Synchronous};
use herald_server::engine::store::{
    Append, Appended, Committing, NewMessage, Store, StoreError, StoreLimits,
};
use herald_server::engine::wire::{self, Envelope};
use serde_json::value::RawValue;
use tempfile::TempDir;

/// Where a store under test keeps its data; opening it again finds the same data.
pub enum Backend {
    Sqlite(TempDir),
    Redis(Box<RedisBackend>),
}

pub struct RedisBackend {
    /// Stopped when the backend is dropped.
    pub server: RedisServer,
    pub config: RedisConfig,
}

/// One of each backend, each with data of its own.
pub async fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Sqlite(tempfile::tempdir().unwrap())];
    if let Some(server) = RedisServer::start().await {
        let config = redis_config(&server);
        backends.push(Backend::Redis(Box::new(RedisBackend { server, config })));
    }
    backends
}

pub fn redis_config(server: &RedisServer) -> RedisConfig {
    RedisConfig {
        urls: vec![server.url()],
        key_prefix: format!("test-{}", uuid::Uuid::now_v7().simple()),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    }
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Redis(_) => "redis",
        }
    }

    pub async fn open(&self, limits: StoreLimits) -> Arc<dyn Store> {
        self.open_recording(limits, &[]).await.0
    }

    /// Opens the store with a recording of what it publishes on `channels`.
    pub async fn open_recording(
        &self,
        limits: StoreLimits,
        channels: &[Channel],
    ) -> (Arc<dyn Store>, Recording) {
        match self {
            Backend::Sqlite(folder) => {
                let (broker, published) = recording_broker();
                let store = SqliteStore::open(folder.path(), Synchronous::Normal, limits, broker);
                (Arc::new(store.unwrap()), Recording::Broker(published))
            }
            Backend::Redis(redis) => {
                let keys = Keys::new(&redis.config.key_prefix);
                let mut subscriber = redis::Client::open(redis.server.url())
                    .unwrap()
                    .get_async_pubsub()
                    .await
                    .unwrap();
                for channel in channels {
                    subscriber.subscribe(keys.channel(channel)).await.unwrap();
                }
                let store = RedisStore::open(&redis.config, limits).await.unwrap();
                (
                    Arc::new(store),
                    Recording::PubSub(Box::new(subscriber), keys),
                )
            }
        }
    }

    /// Whether `inbox_may_hold_unacked` tracks inboxes (a store may always say true).
    pub fn tracks_unacked_inboxes(&self) -> bool {
        matches!(self, Backend::Sqlite(_))
    }
}

/// What the store published, in the order the broker received it.
#[derive(Default)]
pub struct Published {
    deliveries: Mutex<Vec<(Channel, Delivery)>>,
}

impl DeliveryHandler for Published {
    fn deliver(&self, channel: &Channel, delivery: &Delivery) {
        self.deliveries
            .lock()
            .unwrap()
            .push((channel.clone(), delivery.clone()));
    }

    fn control(&self, _channel: &Channel, _control: &Control) {}
}

/// A started broker and what reaches it.
pub fn recording_broker() -> (Arc<dyn Broker>, Arc<Published>) {
    let published = Arc::new(Published::default());
    let broker = Arc::new(MemoryBroker::new());
    broker.start(published.clone());
    (broker, published)
}

/// What a store published, as a receiving node reads it.
pub enum Recording {
    Broker(Arc<Published>),
    PubSub(Box<redis::aio::PubSub>, Keys),
}

impl Recording {
    /// The next `count` deliveries published since the last call, in order. Appends resolve
    /// only once published, so they have been sent by then.
    pub async fn take(&mut self, count: usize) -> Vec<(Channel, Delivery)> {
        match self {
            Recording::Broker(published) => {
                let mut deliveries = published.deliveries.lock().unwrap();
                assert!(deliveries.len() >= count, "{} published", deliveries.len());
                deliveries.drain(..count).collect()
            }
            Recording::PubSub(subscriber, keys) => {
                let messages = subscriber.on_message().take(count).map(|message| {
                    let channel = keys.parse_channel(message.get_channel_name()).unwrap();
                    let Envelope::Delivery(delivery) =
                        wire::decode(message.get_payload_bytes()).unwrap()
                    else {
                        panic!("a delivery, not a control");
                    };
                    (channel, delivery)
                });
                tokio::time::timeout(crate::common::EVENT_TIMEOUT, messages.collect())
                    .await
                    .expect("every published frame arrives")
            }
        }
    }
}

pub fn message(from: &str, ts: u64, text: &str) -> NewMessage {
    NewMessage {
        id: uuid::Uuid::now_v7().to_string(),
        from: from.into(),
        ts,
        content: Payload::Json(RawValue::from_string(format!("{text:?}")).unwrap()),
        idempotency: None,
    }
}

/// Appends and waits until it is stored and published.
/// Queues an append on any store, as a session does: what resolves once it is committed.
pub async fn queue(store: &dyn Store, append: Append) -> Committing {
    store.append(append, None).await
}

pub async fn append(store: &dyn Store, append: Append) -> Appended {
    try_append(store, append).await.unwrap()
}

pub async fn try_append(store: &dyn Store, append: Append) -> Result<Appended, StoreError> {
    store.append(append, None).await.await
}

pub async fn to_room(store: &dyn Store, room: &str, ts: u64, text: &str) -> u64 {
    match append(
        store,
        Append::Room {
            room: room.into(),
            message: message("alice", ts, text),
        },
    )
    .await
    {
        Appended::Room { position, .. } => position.offset.0,
        other => panic!("{other:?}"),
    }
}

pub async fn direct(store: &dyn Store, from: &str, to: &[&str], ts: u64, text: &str) -> Vec<u64> {
    let to: Vec<String> = to.iter().map(|u| u.to_string()).collect();
    match append(
        store,
        Append::Direct {
            recipients: to.clone(),
            to,
            message: message(from, ts, text),
        },
    )
    .await
    {
        Appended::Direct { inbox, .. } => inbox.into_iter().map(|(_, o)| o.0).collect(),
        other => panic!("{other:?}"),
    }
}

pub fn room_append(room: &str, text: &str) -> Append {
    Append::Room {
        room: room.into(),
        message: message("alice", 1, text),
    }
}
