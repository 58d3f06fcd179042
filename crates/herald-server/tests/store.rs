//! The `Store` contract, run against every backend: SQLite, and Redis when `redis-server` is
//! installed (a real one per test, see `common::redis`). What a store publishes is recorded in
//! order: SQLite's through a started in-memory broker whose handler records what reaches it,
//! Redis's by a plain pub/sub subscription, decoded as a receiving node would. Tests for what
//! only one backend does follow the shared ones.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::redis::{RedisCluster, RedisServer};
use futures::StreamExt;
use herald_protocol::{Payload, ServerEvent};
use herald_server::config::RedisConfig;
use herald_server::delivery::{Channel, Control, Delivery, OutFrame};
use herald_server::engine::broker::{Broker, DeliveryHandler};
use herald_server::engine::memory::MemoryBroker;
use herald_server::engine::redis::Keys;
use herald_server::engine::redis::store::RedisStore;
use herald_server::engine::sqlite::staging::MergeTuning;
use herald_server::engine::sqlite::{SqliteStore, Synchronous};
use herald_server::engine::store::{
    Append, Appended, IdempotencyKey, NewMessage, Offset, Retention, Store, StoreError,
    StoreLimits, StoredMessage,
};
use herald_server::engine::wire::{self, Envelope};
use serde_json::value::RawValue;
use tempfile::TempDir;

/// Where a store under test keeps its data; opening it again finds the same data.
enum Backend {
    Sqlite(TempDir),
    Redis(Box<RedisBackend>),
}

struct RedisBackend {
    /// Stopped when the backend is dropped.
    server: RedisServer,
    config: RedisConfig,
}

/// One of each backend, each with data of its own.
async fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Sqlite(tempfile::tempdir().unwrap())];
    if let Some(server) = RedisServer::start().await {
        let config = redis_config(&server);
        backends.push(Backend::Redis(Box::new(RedisBackend { server, config })));
    }
    backends
}

fn redis_config(server: &RedisServer) -> RedisConfig {
    RedisConfig {
        urls: vec![server.url()],
        key_prefix: format!("test-{}", uuid::Uuid::now_v7().simple()),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    }
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Redis(_) => "redis",
        }
    }

    async fn open(&self, limits: StoreLimits) -> Arc<dyn Store> {
        self.open_recording(limits, &[]).await.0
    }

    /// Opens the store with a recording of what it publishes on `channels`.
    async fn open_recording(
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
    fn tracks_unacked_inboxes(&self) -> bool {
        matches!(self, Backend::Sqlite(_))
    }
}

/// What the store published, in the order the broker received it.
#[derive(Default)]
struct Published {
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
fn recording_broker() -> (Arc<dyn Broker>, Arc<Published>) {
    let published = Arc::new(Published::default());
    let broker = Arc::new(MemoryBroker::new());
    broker.start(published.clone());
    (broker, published)
}

/// What a store published, as a receiving node reads it.
enum Recording {
    Broker(Arc<Published>),
    PubSub(Box<redis::aio::PubSub>, Keys),
}

impl Recording {
    /// The next `count` deliveries published since the last call, in order. Appends resolve
    /// only once published, so they have been sent by then.
    async fn take(&mut self, count: usize) -> Vec<(Channel, Delivery)> {
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
                tokio::time::timeout(common::EVENT_TIMEOUT, messages.collect())
                    .await
                    .expect("every published frame arrives")
            }
        }
    }
}

fn message(from: &str, ts: u64, text: &str) -> NewMessage {
    NewMessage {
        id: uuid::Uuid::now_v7().to_string(),
        from: from.into(),
        ts,
        content: Payload::Json(RawValue::from_string(format!("{text:?}")).unwrap()),
        idempotency: None,
    }
}

/// Appends and waits until it is stored and published.
async fn append(store: &dyn Store, append: Append) -> Appended {
    try_append(store, append).await.unwrap()
}

async fn try_append(store: &dyn Store, append: Append) -> Result<Appended, StoreError> {
    store.append(append, None).await?.await
}

async fn to_room(store: &dyn Store, room: &str, ts: u64, text: &str) -> u64 {
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

async fn direct(store: &dyn Store, from: &str, to: &[&str], ts: u64, text: &str) -> Vec<u64> {
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

#[tokio::test]
async fn offsets_are_dense_per_stream_and_survive_a_reopen_with_the_same_epoch() {
    for backend in backends().await {
        let name = backend.name();
        let store = backend.open(StoreLimits::default()).await;
        for n in 1..=3 {
            assert_eq!(to_room(&*store, "a", 1, "x").await, n, "{name}");
        }
        assert_eq!(
            to_room(&*store, "b", 1, "x").await,
            1,
            "{name}: rooms count apart"
        );
        let before = store.room_bounds("a").await.unwrap();
        store.close().await;
        drop(store);

        let store = backend.open(StoreLimits::default()).await;
        let after = store.room_bounds("a").await.unwrap();
        assert_eq!(after, before, "{name}");
        assert_eq!(to_room(&*store, "a", 1, "x").await, 4, "{name}");
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_frames_are_published_in_offset_order_under_concurrent_appends() {
    for backend in backends().await {
        let name = backend.name();
        let (store, mut published) = backend
            .open_recording(StoreLimits::default(), &[Channel::Room("busy".into())])
            .await;
        let mut tasks = Vec::new();
        for task in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut waits = Vec::new();
                for n in 0..200 {
                    let append = Append::Room {
                        room: "busy".into(),
                        message: message("p", 1, &format!("{task}-{n}")),
                    };
                    waits.push(store.append(append, None).await.unwrap());
                }
                for wait in waits {
                    wait.await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // Every append resolved only after its frame was published, so all 1,600 are here.
        let order: Vec<u64> = published
            .take(1600)
            .await
            .iter()
            .map(|(channel, delivery)| {
                assert_eq!(*channel, Channel::Room("busy".into()), "{name}");
                delivery.offset.unwrap()
            })
            .collect();
        let expected: Vec<u64> = (1..=1600).collect();
        assert_eq!(order, expected, "{name}");
        store.close().await;
    }
}

#[tokio::test]
async fn history_pages_are_oldest_first_with_a_more_flag() {
    for backend in backends().await {
        let name = backend.name();
        let store = backend.open(StoreLimits::default()).await;
        for n in 1..=5 {
            to_room(&*store, "r", n, &format!("m{n}")).await;
        }
        let page = store.room_history("r", None, 2).await.unwrap();
        let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset.0).collect();
        assert_eq!(offsets, [4, 5], "{name}");
        assert!(page.more);
        let page = store.room_history("r", Some(Offset(2)), 2).await.unwrap();
        let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset.0).collect();
        assert_eq!(offsets, [1], "{name}");
        assert!(!page.more);

        let read = store.read_room("r", Offset(3), 10).await.unwrap();
        let offsets: Vec<u64> = read.messages.iter().map(|m| m.offset.0).collect();
        assert_eq!(offsets, [4, 5], "{name}");
        assert_eq!(read.bounds.top.offset, Offset(5));
        assert_eq!(read.bounds.first, Offset(1));
        store.close().await;
    }
}

#[tokio::test]
async fn a_direct_message_lands_in_every_inbox_and_both_conversations() {
    for backend in backends().await {
        let name = backend.name();
        let store = backend.open(StoreLimits::default()).await;
        assert_eq!(direct(&*store, "alice", &["bob"], 1, "one").await, [1]);
        assert_eq!(
            direct(&*store, "carol", &["bob", "dave"], 2, "two").await,
            [2, 1],
            "{name}: each recipient's inbox counts alone"
        );
        let inbox = store.read_inbox("bob", None, Offset(0), 10).await.unwrap();
        let from: Vec<&str> = inbox.messages.iter().map(|m| m.from.as_str()).collect();
        assert_eq!(from, ["alice", "carol"], "{name}");
        assert_eq!(
            inbox.messages[1].to.as_deref(),
            Some(&["bob".to_owned(), "dave".to_owned()][..])
        );
        let conversation = store
            .conversation_history("dave", "carol", None, 10)
            .await
            .unwrap();
        assert_eq!(conversation.messages.len(), 1, "{name}");
        let none = store
            .conversation_history("alice", "dave", None, 10)
            .await
            .unwrap();
        assert!(none.messages.is_empty(), "{name}");
        store.close().await;
    }
}

#[tokio::test]
async fn the_inbox_mark_only_moves_forward_and_never_past_the_newest_entry() {
    for backend in backends().await {
        let name = backend.name();
        let store = backend.open(StoreLimits::default()).await;
        for n in 0..3 {
            direct(&*store, "alice", &["bob"], n, "x").await;
        }
        assert_eq!(
            store.ack_inbox("bob", None, Offset(2)).await.unwrap(),
            Offset(2)
        );
        assert_eq!(
            store.ack_inbox("bob", None, Offset(1)).await.unwrap(),
            Offset(2)
        );
        let error = store.ack_inbox("bob", None, Offset(9)).await.unwrap_err();
        assert!(
            matches!(
                error,
                StoreError::AckBeyondInbox {
                    requested: 9,
                    newest: 3
                }
            ),
            "{name}: {error}"
        );
        let pending = store.read_inbox("bob", None, Offset(0), 10).await.unwrap();
        assert_eq!(pending.acked, Offset(2));
        let offsets: Vec<u64> = pending.messages.iter().map(|m| m.offset.0).collect();
        assert_eq!(offsets, [3], "{name}");
        store.close().await;
    }
}

#[tokio::test]
async fn each_device_reads_from_its_own_mark_and_a_new_one_from_the_floor() {
    for backend in backends().await {
        let name = backend.name();
        let store = backend.open(StoreLimits::default()).await;
        for n in 0..4 {
            direct(&*store, "alice", &["bob"], n, "x").await;
        }
        let pending = |device: Option<&'static str>| {
            let store = store.clone();
            async move {
                let read = store
                    .read_inbox("bob", device, Offset(0), 10)
                    .await
                    .unwrap();
                let offsets: Vec<u64> = read.messages.iter().map(|m| m.offset.0).collect();
                (offsets, read.device_has_mark)
            }
        };
        assert_eq!(
            pending(Some("phone")).await,
            (vec![1, 2, 3, 4], false),
            "{name}"
        );
        let mark = store.ack_inbox("bob", Some("phone"), Offset(1)).await;
        assert_eq!(mark.unwrap(), Offset(1));
        let mark = store.ack_inbox("bob", Some("laptop"), Offset(3)).await;
        assert_eq!(
            mark.unwrap(),
            Offset(3),
            "{name}: a new device starts at the floor"
        );
        // Moves backwards for nobody.
        let mark = store.ack_inbox("bob", Some("laptop"), Offset(2)).await;
        assert_eq!(mark.unwrap(), Offset(3), "{name}");
        assert_eq!(
            pending(Some("phone")).await,
            (vec![2, 3, 4], true),
            "{name}"
        );
        assert_eq!(pending(Some("laptop")).await, (vec![4], true), "{name}");
        // The user's mark follows every ack; a new device starts at the lowest device mark.
        assert_eq!(pending(None).await.0, [4], "{name}");
        assert_eq!(
            pending(Some("tablet")).await,
            (vec![2, 3, 4], false),
            "{name}"
        );
        store.close().await;
    }
}

#[tokio::test]
async fn past_the_device_bound_the_least_recently_acknowledged_mark_is_evicted() {
    for backend in backends().await {
        let name = backend.name();
        let limits = StoreLimits {
            max_devices_per_user: 2,
            ..StoreLimits::default()
        };
        let store = backend.open(limits).await;
        for n in 0..3 {
            direct(&*store, "alice", &["bob"], n, "x").await;
        }
        store
            .ack_inbox("bob", Some("old"), Offset(1))
            .await
            .unwrap();
        store
            .ack_inbox("bob", Some("kept"), Offset(3))
            .await
            .unwrap();
        store
            .ack_inbox("bob", Some("new"), Offset(3))
            .await
            .unwrap();
        let kept = store
            .read_inbox("bob", Some("kept"), Offset(0), 10)
            .await
            .unwrap();
        assert!(kept.device_has_mark, "{name}");
        let old = store
            .read_inbox("bob", Some("old"), Offset(0), 10)
            .await
            .unwrap();
        assert!(
            !old.device_has_mark,
            "{name}: the least recently used mark went"
        );
        assert_eq!(old.acked, Offset(3), "{name}: it reads from the floor now");
        store.close().await;
    }
}

#[tokio::test]
async fn inboxes_and_conversations_emptied_by_age_are_removed_but_acknowledged_ones_stay() {
    const DAY_MS: u64 = 24 * 3600 * 1000;
    for backend in backends().await {
        let name = backend.name();
        let store = backend.open(StoreLimits::default()).await;
        let now = 100 * DAY_MS;
        // To made-up names: never read, so only age removes them.
        for ghost in ["ghost-1", "ghost-2"] {
            direct(&*store, "spammer", &[ghost], now - 10 * DAY_MS, "x").await;
        }
        // A real user who read everything: the inbox empties by acknowledgement.
        direct(&*store, "alice", &["bob"], now, "x").await;
        store.ack_inbox("bob", None, Offset(1)).await.unwrap();
        let retention = Retention {
            room_max_messages: 0,
            room_max_age: Duration::ZERO,
            inbox_max_age: Duration::from_millis(DAY_MS),
        };
        let report = store.prune(retention, now).await.unwrap();
        // Two inboxes and two conversations.
        assert_eq!(report.empty_streams, 4, "{name}: {report:?}");
        if backend.tracks_unacked_inboxes() {
            assert!(!store.inbox_may_hold_unacked("ghost-1"), "{name}");
        }
        // A ghost's inbox starts afresh; bob's goes on.
        assert_eq!(
            direct(&*store, "spammer", &["ghost-1"], now, "x").await,
            [1],
            "{name}"
        );
        assert_eq!(direct(&*store, "alice", &["bob"], now, "x").await, [2]);
        let again = store.prune(retention, now).await.unwrap();
        assert_eq!(again.empty_streams, 0, "{name}: {again:?}");
        store.close().await;
    }
}

#[tokio::test]
async fn retention_removes_old_prefixes_by_count_and_by_age() {
    const DAY_MS: u64 = 24 * 3600 * 1000;
    for backend in backends().await {
        let name = backend.name();
        let store = backend.open(StoreLimits::default()).await;
        let now = 100 * DAY_MS;
        for n in 1..=10 {
            to_room(&*store, "counted", now, &n.to_string()).await;
        }
        for age_days in [5, 4, 3, 2, 1] {
            to_room(&*store, "aged", now - age_days * DAY_MS, "x").await;
            direct(&*store, "alice", &["bob"], now - age_days * DAY_MS, "x").await;
        }
        store.ack_inbox("bob", None, Offset(1)).await.unwrap();
        let retention = Retention {
            room_max_messages: 4,
            room_max_age: Duration::from_millis(3 * DAY_MS - 1),
            inbox_max_age: Duration::from_millis(2 * DAY_MS - 1),
        };
        let report = store.prune(retention, now).await.unwrap();
        // counted: 6 over the count; aged: the 5- 4- and 3-day-old ones (2 more over the count
        // limit would be none: 5 - 4 = 1, already among them).
        assert_eq!(report.room_messages, 6 + 3, "{name}: {report:?}");
        // Direct: 5,4,3,2-day-old ones go from the conversation; the inbox loses the same
        // four entries (the acked one among them).
        assert_eq!(report.direct_messages, 4, "{name}: {report:?}");
        assert_eq!(report.inbox_entries, 4, "{name}: {report:?}");

        let counted = store.room_history("counted", None, 100).await.unwrap();
        let offsets: Vec<u64> = counted.messages.iter().map(|m| m.offset.0).collect();
        assert_eq!(offsets, [7, 8, 9, 10], "{name}");
        let aged = store.room_bounds("aged").await.unwrap();
        assert_eq!((aged.first, aged.top.offset), (Offset(4), Offset(5)));
        let conversation = store
            .conversation_history("bob", "alice", None, 100)
            .await
            .unwrap();
        assert_eq!(conversation.messages.len(), 1, "{name}");
        let inbox = store.read_inbox("bob", None, Offset(0), 100).await.unwrap();
        assert_eq!(inbox.messages.len(), 1, "{name}");

        // Pruning never reuses offsets: the stream continues where it was.
        assert_eq!(to_room(&*store, "counted", now, "11").await, 11, "{name}");
        let again = store.prune(retention, now).await.unwrap();
        assert_eq!(again.room_messages, 1, "{name}");
        store.close().await;
    }
}

#[tokio::test]
async fn a_direct_message_to_a_full_inbox_is_refused_naming_the_user() {
    for backend in backends().await {
        let name = backend.name();
        let limits = StoreLimits {
            max_inbox_messages: 2,
            ..StoreLimits::default()
        };
        let store = backend.open(limits).await;
        for n in 0..2 {
            direct(&*store, "alice", &["bob"], n, "x").await;
        }
        let refused = try_append(
            &*store,
            Append::Direct {
                to: vec!["bob".into()],
                recipients: vec!["bob".into()],
                message: message("alice", 3, "one too many"),
            },
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&refused, StoreError::InboxFull { users, limit: 2 } if users == &["bob"]),
            "{name}: {refused}"
        );
        let conversation = store
            .conversation_history("alice", "bob", None, 10)
            .await
            .unwrap();
        assert_eq!(
            conversation.messages.len(),
            2,
            "{name}: nothing of a refused message is stored"
        );
        store.ack_inbox("bob", None, Offset(1)).await.unwrap();
        assert_eq!(
            direct(&*store, "alice", &["bob"], 4, "x").await,
            [3],
            "{name}"
        );
        store.close().await;
    }
}

#[tokio::test]
async fn published_frames_carry_their_streams_offsets_and_the_senders_copy_none() {
    for backend in backends().await {
        let name = backend.name();
        let channels = [
            Channel::Room("lobby".into()),
            Channel::User("bob".into()),
            Channel::User("alice".into()),
            Channel::User("carol".into()),
        ];
        let (store, mut published) = backend
            .open_recording(StoreLimits::default(), &channels)
            .await;
        for text in ["first", "second"] {
            try_append(&*store, room_append("lobby", text))
                .await
                .unwrap();
        }
        // bob's inbox holds one entry before alice writes: his frame must carry offset 2.
        direct(&*store, "carol", &["bob"], 1, "earlier").await;
        direct(&*store, "alice", &["bob"], 2, "hello").await;
        let mut frames: Vec<(Channel, Option<u64>, String)> = published
            .take(6)
            .await
            .into_iter()
            .map(|(channel, delivery)| {
                let OutFrame::Text(frame) = &delivery.frame else {
                    panic!("{name}: a text frame");
                };
                let ServerEvent::Message(event) =
                    ServerEvent::decode(std::str::from_utf8(frame).unwrap()).unwrap()
                else {
                    panic!("{name}: a message event");
                };
                assert_eq!(
                    event.offset, delivery.offset,
                    "{name}: the offset in the frame"
                );
                (
                    channel,
                    delivery.offset,
                    event.content.unwrap().get().to_owned(),
                )
            })
            .collect();
        // Channels have no order between them: sort each direct message's two frames.
        frames[2..4].sort_by_key(|(channel, _, _)| channel.to_string());
        frames[4..].sort_by_key(|(channel, _, _)| channel.to_string());
        let lobby = Channel::Room("lobby".into());
        let user = |name: &str| Channel::User(name.into());
        let expected: [(Channel, Option<u64>, String); 6] = [
            (lobby.clone(), Some(1), r#""first""#.into()),
            (lobby, Some(2), r#""second""#.into()),
            (user("bob"), Some(1), r#""earlier""#.into()),
            (user("carol"), None, r#""earlier""#.into()),
            (user("alice"), None, r#""hello""#.into()),
            (user("bob"), Some(2), r#""hello""#.into()),
        ];
        assert_eq!(frames, expected, "{name}");
        store.close().await;
    }
}

async fn redis_store(limits: StoreLimits) -> Option<(RedisServer, RedisConfig, RedisStore)> {
    let server = RedisServer::start().await?;
    let config = redis_config(&server);
    let store = RedisStore::open(&config, limits).await.unwrap();
    Some((server, config, store))
}

fn room_append(room: &str, text: &str) -> Append {
    Append::Room {
        room: room.into(),
        message: message("alice", 1, text),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_two_nodes_interleave_with_offsets_one_apart_in_each_nodes_call_order() {
    let Some((_server, config, first)) = redis_store(StoreLimits::default()).await else {
        return;
    };
    let second = RedisStore::open(&config, StoreLimits::default())
        .await
        .unwrap();
    // Each node starts 300 appends without waiting for any, as a session pipelines them.
    let run = |store: RedisStore| {
        tokio::spawn(async move {
            let mut committing = Vec::new();
            for n in 0..300 {
                committing.push(
                    store
                        .append(room_append("shared", &n.to_string()), None)
                        .await,
                );
            }
            let mut offsets = Vec::new();
            for append in committing {
                match append.unwrap().await.unwrap() {
                    Appended::Room { position, .. } => offsets.push(position.offset.0),
                    other => panic!("{other:?}"),
                }
            }
            offsets
        })
    };
    let (first, second) = (run(first), run(second));
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    for offsets in [&first, &second] {
        assert!(
            offsets.windows(2).all(|pair| pair[0] < pair[1]),
            "a node's appends keep their call order: {offsets:?}"
        );
    }
    let mut all: Vec<u64> = first.iter().chain(&second).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=600).collect::<Vec<_>>(), "no gap, no reuse");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_direct_messages_keep_their_order_in_inboxes_and_conversations() {
    for backend in backends().await {
        let name = backend.name();
        let store = backend.open(StoreLimits::default()).await;
        let mut committing = Vec::new();
        for n in 0..300 {
            let append = Append::Direct {
                to: vec!["bob".into(), "carol".into()],
                recipients: vec!["bob".into(), "carol".into()],
                message: message("alice", n, &n.to_string()),
            };
            committing.push(store.append(append, None).await.unwrap());
        }
        for append in committing {
            append.await.unwrap();
        }
        let texts = |messages: Vec<StoredMessage>| -> Vec<String> {
            messages
                .iter()
                .map(|m| match &m.content {
                    Payload::Json(raw) => raw.get().trim_matches('"').to_owned(),
                    Payload::Binary(_) => panic!("stored as JSON"),
                })
                .collect()
        };
        let sent: Vec<String> = (0..300).map(|n| n.to_string()).collect();
        for user in ["bob", "carol"] {
            let inbox = store.read_inbox(user, None, Offset(0), 1000).await.unwrap();
            assert_eq!(texts(inbox.messages), sent, "{name}: {user}'s inbox");
            let conversation = store
                .conversation_history(user, "alice", None, 1000)
                .await
                .unwrap();
            assert_eq!(
                texts(conversation.messages),
                sent,
                "{name}: {user}'s conversation"
            );
        }
        store.close().await;
    }
}

/// A pipelining caller keeps appending while it holds appends it has not polled yet: the
/// store's queue must free itself as the backend answers, not as the caller polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_past_the_stores_queue_complete_while_the_caller_polls_none() {
    const APPENDS: usize = 20_000;
    for backend in backends().await {
        let name = backend.name();
        let store = backend.open(StoreLimits::default()).await;
        let queued = async {
            let mut committing = Vec::with_capacity(APPENDS);
            for n in 0..APPENDS {
                committing.push(
                    store
                        .append(room_append("deep", &n.to_string()), None)
                        .await,
                );
            }
            committing
        };
        let committing = tokio::time::timeout(Duration::from_secs(120), queued)
            .await
            .unwrap_or_else(|_| panic!("{name}: append waited for a slot its caller holds"));
        for append in committing {
            append.unwrap().await.unwrap();
        }
        let bounds = store.room_bounds("deep").await.unwrap();
        assert_eq!(bounds.top.offset, Offset(APPENDS as u64), "{name}");
        store.close().await;
    }
}

/// On a Cluster each stream's keys and channel sit on one shard, so every script runs there;
/// the users and rooms here hash to different shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_appends_reads_retries_and_retention_work_across_shards() {
    let Some(cluster) = RedisCluster::start(3).await else {
        return;
    };
    let store = RedisStore::open(&cluster.config(), StoreLimits::default())
        .await
        .unwrap();
    let rooms: Vec<String> = (0..12).map(|n| format!("room-{n}")).collect();
    let users: Vec<String> = (0..12).map(|n| format!("user-{n}")).collect();
    let mut committing = Vec::new();
    for n in 0..10 {
        for room in &rooms {
            committing.push(store.append(room_append(room, &n.to_string()), None).await);
        }
    }
    for append in committing {
        append.unwrap().await.unwrap();
    }
    for room in &rooms {
        let read = store.read_room(room, Offset(0), 100).await.unwrap();
        let offsets: Vec<u64> = read.messages.iter().map(|m| m.offset.0).collect();
        assert_eq!(offsets, (1..=10).collect::<Vec<_>>(), "{room}");
    }
    let append = Append::Direct {
        to: users.clone(),
        recipients: users.clone(),
        message: message("alice", 1, "to everyone"),
    };
    let first = try_append(&store, append.clone()).await.unwrap();
    let retried = try_append(&store, append).await.unwrap();
    let inbox = |appended: Appended| match appended {
        Appended::Direct { inbox, .. } => inbox,
        other => panic!("{other:?}"),
    };
    let first = inbox(first);
    assert_eq!(inbox(retried), first, "a retry stores nothing twice");
    assert!(first.iter().all(|(_, offset)| *offset == Offset(1)));
    for user in &users {
        let read = store.read_inbox(user, None, Offset(0), 10).await.unwrap();
        assert_eq!(read.messages.len(), 1, "{user}");
        assert_eq!(
            store
                .ack_inbox(user, Some("phone"), Offset(1))
                .await
                .unwrap(),
            Offset(1)
        );
        let conversation = store
            .conversation_history(user, "alice", None, 10)
            .await
            .unwrap();
        assert_eq!(conversation.messages.len(), 1, "{user}");
    }
    let retention = Retention {
        room_max_messages: 4,
        ..Retention::default()
    };
    let report = store.prune(retention, 0).await.unwrap();
    assert_eq!(
        report.room_messages,
        12 * 6,
        "every shard's rooms: {report:?}"
    );
    assert_eq!(report.inbox_entries, 12, "acknowledged entries: {report:?}");
    store.close().await;
}

/// A message of `from` sent by a request that may be retried: `request` with `fingerprint`.
fn retried(from: &str, ts: u64, text: &str, request: &str, fingerprint: u128) -> NewMessage {
    NewMessage {
        idempotency: Some(IdempotencyKey {
            request: request.into(),
            fingerprint,
            window: Duration::from_secs(60),
        }),
        ..message(from, ts, text)
    }
}

/// Two stores on one Redis act as two nodes: a request appended on `first` and repeated on
/// `second` (a new message id and timestamp, as another node picks them) gets the first
/// attempt's result; the same request id with another fingerprint is a new message; a direct
/// message whose first attempt reached only some inboxes is completed under its first id.
async fn retries_are_recognised_across_nodes(name: &str, first: &dyn Store, second: &dyn Store) {
    let room = |message: NewMessage| Append::Room {
        room: "lobby".into(),
        message,
    };
    let Appended::Room {
        message: stored,
        position,
        ..
    } = append(first, room(retried("alice", 1, "hello", "r1", 7))).await
    else {
        panic!("{name}: a room append")
    };
    let Appended::Room {
        message: again,
        position: again_at,
        ..
    } = append(second, room(retried("alice", 2, "hello", "r1", 7))).await
    else {
        panic!("{name}: a room append")
    };
    assert_eq!(
        (&again.id, again.ts, &again_at),
        (&stored.id, 1, &position),
        "{name}: the retry gets the first attempt's id, ts and position"
    );
    let Appended::Room {
        message: other,
        position: other_at,
        ..
    } = append(second, room(retried("alice", 3, "changed", "r1", 8))).await
    else {
        panic!("{name}: a room append")
    };
    assert_ne!(
        other.id, stored.id,
        "{name}: another request under the same id"
    );
    assert_eq!(other_at.offset, Offset(2), "{name}");
    let history = second.read_room("lobby", Offset(0), 10).await.unwrap();
    let ids: Vec<&str> = history.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, [stored.id.as_str(), other.id.as_str()], "{name}");

    let direct = |to: &[&str], message: NewMessage| {
        let to: Vec<String> = to.iter().map(|user| user.to_string()).collect();
        Append::Direct {
            recipients: to.clone(),
            to,
            message,
        }
    };
    // The first attempt reached bob's inbox only; the retry names both recipients, as the
    // request did.
    let Appended::Direct {
        message: sent,
        inbox,
        ..
    } = append(first, direct(&["bob"], retried("alice", 4, "dm", "d1", 9))).await
    else {
        panic!("{name}: a direct append")
    };
    assert_eq!(inbox, [("bob".to_owned(), Offset(1))], "{name}");
    let retry = direct(&["bob", "carol"], retried("alice", 5, "dm", "d1", 9));
    let Appended::Direct {
        message: again,
        inbox,
        ..
    } = append(second, retry).await
    else {
        panic!("{name}: a direct append")
    };
    assert_eq!((&again.id, again.ts), (&sent.id, 4), "{name}");
    assert_eq!(
        inbox,
        [
            ("bob".to_owned(), Offset(1)),
            ("carol".to_owned(), Offset(1))
        ],
        "{name}"
    );
    for user in ["bob", "carol"] {
        let read = second.read_inbox(user, None, Offset(0), 10).await.unwrap();
        let ids: Vec<&str> = read.messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, [sent.id.as_str()], "{name}: {user}'s inbox");
        let conversation = second
            .conversation_history("alice", user, None, 10)
            .await
            .unwrap();
        let ids: Vec<&str> = conversation
            .messages
            .iter()
            .map(|m| m.id.as_str())
            .collect();
        assert_eq!(ids, [sent.id.as_str()], "{name}: {user}'s conversation");
    }
}

/// The Redis store keeps what recognises a retry next to the data (the SQLite store leaves it
/// to the node's memory, see the `Store` contract), and publishes nothing for a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_repeated_on_another_node_gets_the_first_result_and_is_published_once() {
    let Some((server, config, first)) = redis_store(StoreLimits::default()).await else {
        return;
    };
    let backend = Backend::Redis(Box::new(RedisBackend { server, config }));
    let channels = [
        Channel::Room("lobby".into()),
        Channel::User("alice".into()),
        Channel::User("bob".into()),
        Channel::User("carol".into()),
    ];
    let (second, mut published) = backend
        .open_recording(StoreLimits::default(), &channels)
        .await;
    retries_are_recognised_across_nodes("redis", &first, &*second).await;
    to_room(&*second, "lobby", 6, "last").await;
    let mut frames: Vec<(String, String)> = published
        .take(6)
        .await
        .into_iter()
        .map(|(channel, delivery)| {
            let OutFrame::Text(frame) = &delivery.frame else {
                panic!("a text frame");
            };
            let ServerEvent::Message(event) =
                ServerEvent::decode(std::str::from_utf8(frame).unwrap()).unwrap()
            else {
                panic!("a message event");
            };
            (channel.to_string(), event.content.unwrap().get().to_owned())
        })
        .collect();
    frames.sort();
    let mut expected: Vec<(String, String)> = [
        (Channel::Room("lobby".into()), "hello"),
        (Channel::Room("lobby".into()), "changed"),
        (Channel::User("bob".into()), "dm"),
        (Channel::User("alice".into()), "dm"),
        (Channel::User("carol".into()), "dm"),
        (Channel::Room("lobby".into()), "last"),
    ]
    .into_iter()
    .map(|(channel, text)| (channel.to_string(), format!("{text:?}")))
    .collect();
    expected.sort();
    assert_eq!(
        frames, expected,
        "each message published once, retries none"
    );
    first.close().await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_request_repeated_on_another_node_gets_the_first_result() {
    let Some(cluster) = RedisCluster::start(3).await else {
        return;
    };
    let config = cluster.config();
    let first = RedisStore::open(&config, StoreLimits::default())
        .await
        .unwrap();
    let second = RedisStore::open(&config, StoreLimits::default())
        .await
        .unwrap();
    retries_are_recognised_across_nodes("cluster", &first, &second).await;
    first.close().await;
    second.close().await;
}

#[tokio::test]
async fn a_retried_direct_append_with_the_same_message_id_is_stored_once() {
    let Some((_server, _config, store)) = redis_store(StoreLimits::default()).await else {
        return;
    };
    let append = Append::Direct {
        to: vec!["bob".into(), "carol".into()],
        recipients: vec!["bob".into(), "carol".into()],
        message: message("alice", 1, "once"),
    };
    let inbox = |appended: Appended| match appended {
        Appended::Direct { inbox, .. } => inbox,
        other => panic!("{other:?}"),
    };
    let first = inbox(try_append(&store, append.clone()).await.unwrap());
    let retried = inbox(try_append(&store, append).await.unwrap());
    assert_eq!(retried, first, "the retry gets the first attempt's offsets");
    for user in ["bob", "carol"] {
        let read = store.read_inbox(user, None, Offset(0), 10).await.unwrap();
        assert_eq!(read.messages.len(), 1, "{user}'s inbox");
        let conversation = store
            .conversation_history(user, "alice", None, 10)
            .await
            .unwrap();
        assert_eq!(conversation.messages.len(), 1, "{user}'s conversation");
    }
    assert_eq!(direct(&store, "alice", &["bob"], 2, "next").await, [2]);
}

#[tokio::test]
async fn while_redis_is_down_an_append_fails_as_unavailable_and_nothing_acknowledged_is_lost() {
    let Some(mut server) =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await
    else {
        return;
    };
    let config = redis_config(&server);
    let store = RedisStore::open(&config, StoreLimits::default())
        .await
        .unwrap();
    let stored = try_append(&store, room_append("lobby", "kept")).await;
    assert!(stored.is_ok(), "{stored:?}");
    server.kill().await;
    for text in ["lost", "lost again"] {
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            try_append(&store, room_append("lobby", text)),
        )
        .await
        .expect("an append fails in bounded time while Redis is down");
        assert!(
            matches!(outcome, Err(StoreError::Unavailable { .. })),
            "never Ok while Redis is down: {outcome:?}"
        );
    }
    server.restart().await;
    // The connection comes back on its own; until it has, appends keep failing as unavailable.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let offset = loop {
        match try_append(&store, room_append("lobby", "after")).await {
            Ok(Appended::Room { position, .. }) => break position.offset.0,
            Ok(other) => panic!("{other:?}"),
            Err(StoreError::Unavailable { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("{error}"),
        }
    };
    assert_eq!(
        offset, 2,
        "the acknowledged message survived the restart, no other did"
    );
    let history = store.room_history("lobby", None, 10).await.unwrap();
    let texts: Vec<String> = history
        .messages
        .iter()
        .map(|m| match &m.content {
            Payload::Json(raw) => raw.get().to_owned(),
            Payload::Binary(_) => panic!("stored as JSON"),
        })
        .collect();
    assert_eq!(texts, [r#""kept""#, r#""after""#]);
}

/// A SQLite store in `folder` with default limits, `synchronous = "normal"`.
/// Merges of staged entries small and frequent (the server waits for 64k entries), so that
/// reads meet them (`engine/sqlite/staging.rs`).
fn open_sqlite_merging_often(folder: &TempDir) -> Arc<SqliteStore> {
    let merges = MergeTuning {
        merge_at: 1000,
        slice: 300,
    };
    let broker = recording_broker().0;
    let store = SqliteStore::open_tuned(
        folder.path(),
        Synchronous::Normal,
        StoreLimits::default(),
        broker,
        merges,
    );
    Arc::new(store.unwrap())
}

fn open_sqlite(folder: &TempDir) -> Arc<SqliteStore> {
    Arc::new(
        SqliteStore::open(
            folder.path(),
            Synchronous::Normal,
            StoreLimits::default(),
            recording_broker().0,
        )
        .unwrap(),
    )
}

/// SQLite-specific: under appends that never pause, the writer still starts the WAL over about
/// once a second, each time after the checkpointer has caught up (so the restart, which holds
/// every append, has little left to copy), and nothing appended meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_unbroken_appends_the_wal_starts_over_after_the_checkpointer_caught_up() {
    let folder = tempfile::tempdir().unwrap();
    let store = open_sqlite(&folder);
    let restarts = || store.stats().wal_restarts.load(Ordering::Relaxed);
    // Keep 256 appends queued until the WAL has been started over twice.
    let mut in_flight = std::collections::VecDeque::new();
    let mut appended = 0u64;
    while restarts() < 2 {
        while in_flight.len() < 256 {
            let append = Append::Room {
                room: format!("r{}", appended % 64).into(),
                message: message("p", appended, "x"),
            };
            in_flight.push_back(store.append(append, None).await.unwrap());
            appended += 1;
        }
        in_flight.pop_front().unwrap().await.unwrap();
    }
    for wait in in_flight {
        wait.await.unwrap();
    }
    assert_eq!(
        store
            .stats()
            .wal_restarts_unprepared
            .load(Ordering::Relaxed),
        0,
        "a restart did not wait for the checkpointer to catch up"
    );
    let stored: u64 = futures::future::join_all((0..64).map(|room| {
        let store = store.clone();
        async move {
            store
                .room_bounds(&format!("r{room}"))
                .await
                .unwrap()
                .top
                .offset
                .0
        }
    }))
    .await
    .into_iter()
    .sum();
    assert_eq!(stored, appended, "every append is in its room once");
    store.close().await;
}

/// SQLite-specific: conversation and inbox entries are staged and merged into their tables in
/// bulk (`engine/sqlite/staging.rs`). A reader running while the writer stages and merges
/// always sees an inbox's entries from the first with no gap, every acknowledged one included;
/// and pages read the same on either side of a merge and after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_read_back_whole_while_their_entries_are_merged_and_after_a_reopen() {
    // Two entries each (a conversation's and an inbox's): ten merges, of four slices each.
    const MESSAGES: u64 = 5_000;
    let folder = tempfile::tempdir().unwrap();
    let store = open_sqlite_merging_often(&folder);
    let acknowledged = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = tokio::spawn({
        let (store, acknowledged, done) = (store.clone(), acknowledged.clone(), done.clone());
        async move {
            let mut reads = 0;
            while !done.load(Ordering::Relaxed) {
                let before = acknowledged.load(Ordering::Relaxed);
                let inbox = store.read_inbox("bob", None, Offset(0), 100_000).await;
                let offsets: Vec<u64> =
                    inbox.unwrap().messages.iter().map(|m| m.offset.0).collect();
                assert!(
                    offsets.len() as u64 >= before,
                    "an acknowledged entry is missing"
                );
                let expected: Vec<u64> = (1..=offsets.len() as u64).collect();
                assert!(
                    offsets == expected,
                    "a gap or a repeat in {} entries",
                    offsets.len()
                );
                // The newest page of the conversation, more than is staged at once: no gap, no
                // repeat, nothing acknowledged missing.
                let page = store
                    .conversation_history("alice", "bob", None, 2_000)
                    .await;
                let offsets: Vec<u64> = page.unwrap().messages.iter().map(|m| m.offset.0).collect();
                let newest = offsets.last().copied().unwrap_or(0);
                assert!(
                    newest >= before,
                    "an acknowledged message is missing from the history"
                );
                let first = newest + 1 - offsets.len() as u64;
                assert!(
                    offsets == (first..=newest).collect::<Vec<_>>(),
                    "a gap in the history"
                );
                reads += 1;
            }
            reads
        }
    });
    for chunk in 0..MESSAGES / 500 {
        let mut waits = Vec::new();
        for n in chunk * 500 + 1..=(chunk + 1) * 500 {
            let append = Append::Direct {
                to: vec!["bob".into()],
                recipients: vec!["bob".into()],
                message: message("alice", n, &format!("m{n}")),
            };
            waits.push(store.append(append, None).await.unwrap());
        }
        for wait in waits {
            wait.await.unwrap();
        }
        acknowledged.store((chunk + 1) * 500, Ordering::Relaxed);
    }
    done.store(true, Ordering::Relaxed);
    assert!(reader.await.unwrap() > 0);
    assert!(
        store.stats().merges.load(Ordering::Relaxed) >= 2,
        "entries were never merged"
    );

    async fn read_all(store: &SqliteStore) {
        let mut texts = Vec::new();
        let mut after = Offset(0);
        loop {
            let inbox = store.read_inbox("bob", None, after, 999).await.unwrap();
            let Some(last) = inbox.messages.last() else {
                break;
            };
            after = last.offset;
            texts.extend(inbox.messages.iter().map(|m| (m.offset.0, content_text(m))));
        }
        let expected: Vec<(u64, String)> = (1..=MESSAGES).map(|n| (n, format!("m{n}"))).collect();
        assert!(
            texts == expected,
            "the inbox read back {} entries, not in order",
            texts.len()
        );
        let mut offsets = Vec::new();
        let mut before = None;
        loop {
            let page = store
                .conversation_history("bob", "alice", before, 999)
                .await
                .unwrap();
            offsets.splice(0..0, page.messages.iter().map(|m| m.offset.0));
            before = page.messages.first().map(|m| m.offset);
            if !page.more {
                break;
            }
        }
        assert!(
            offsets == (1..=MESSAGES).collect::<Vec<_>>(),
            "the conversation pages differ"
        );
    }
    read_all(&store).await;
    store.close().await;
    drop(store);

    let store = open_sqlite_merging_often(&folder);
    read_all(&store).await;
    assert_eq!(
        direct(&*store, "alice", &["bob"], 0, "next").await,
        [MESSAGES + 1]
    );
    store.close().await;
}

/// SQLite-specific: the writer caches the state of the 10,000 streams it used last, and reads a
/// forgotten one back from the file and the staged entries (a conversation's or an inbox's
/// newest offset is its newest entry's, staged or merged). Offsets go on where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_go_on_for_a_stream_the_writer_forgot_whose_entries_are_still_staged() {
    // 2 streams each (an inbox and a conversation): past the cache, and under one merge.
    const USERS: usize = 6_000;
    let folder = tempfile::tempdir().unwrap();
    let store = open_sqlite(&folder);
    let mut waits = Vec::new();
    for user in 0..USERS {
        let to = vec![format!("user-{user}")];
        let append = Append::Direct {
            to: to.clone(),
            recipients: to,
            message: message("sender", 1, "x"),
        };
        waits.push(store.append(append, None).await.unwrap());
    }
    for wait in waits {
        wait.await.unwrap();
    }
    assert_eq!(
        store.stats().merges.load(Ordering::Relaxed),
        0,
        "merged: the test proves nothing"
    );
    assert_eq!(direct(&*store, "sender", &["user-0"], 2, "x").await, [2]);
    let history = store
        .conversation_history("user-0", "sender", None, 10)
        .await
        .unwrap();
    let offsets: Vec<u64> = history.messages.iter().map(|m| m.offset.0).collect();
    assert_eq!(offsets, [1, 2]);
    store.close().await;
}

fn content_text(message: &StoredMessage) -> String {
    match &message.content {
        Payload::Json(raw) => serde_json::from_str(raw.get()).unwrap(),
        Payload::Binary(_) => panic!("binary content"),
    }
}

/// SQLite-specific: it watches the writer's step counter to append while a pass is running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_not_held_up_behind_a_long_pruning_pass() {
    let folder = tempfile::tempdir().unwrap();
    let store = open_sqlite(&folder);
    // A backlog of 30,000 messages, appended without waiting for each commit.
    let mut waits = Vec::new();
    for n in 0..30_000u64 {
        let append = Append::Room {
            room: "backlog".into(),
            message: message("p", n, "x"),
        };
        waits.push(store.append(append, None).await.unwrap());
    }
    for wait in waits {
        wait.await.unwrap();
    }
    let retention = Retention {
        room_max_messages: 1,
        ..Retention::default()
    };
    let pruning = {
        let store = store.clone();
        tokio::spawn(async move { store.prune(retention, 0).await.unwrap() })
    };
    // Append only once the pass is under way.
    while store.stats().prune_steps.load(Ordering::Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    let urgent = Append::Room {
        room: "other".into(),
        message: message("p", 0, "urgent"),
    };
    store.append(urgent, None).await.unwrap().await.unwrap();
    // Steps delete 1,000 rows each: most of the backlog is still there when the append is done.
    let bounds = store.room_bounds("backlog").await.unwrap();
    assert!(
        bounds.first.0 < 25_000,
        "the append waited for the pruning pass (oldest kept offset {})",
        bounds.first
    );
    assert_eq!(pruning.await.unwrap().room_messages, 29_999);
    store.close().await;
}

/// SQLite-specific: a direct message is one row that its conversation and inbox entries share;
/// it leaves the file once retention has removed them.
#[tokio::test]
async fn pruned_direct_messages_leave_the_file_and_new_ones_read_back_whole() {
    const DAY_MS: u64 = 24 * 3600 * 1000;
    let now = 100 * DAY_MS;
    let folder = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        folder.path(),
        Synchronous::Normal,
        StoreLimits::default(),
        recording_broker().0,
    )
    .unwrap();
    for age_days in [5, 4, 3] {
        direct(
            &store,
            "alice",
            &["bob", "carol"],
            now - age_days * DAY_MS,
            "old",
        )
        .await;
    }
    let retention = Retention {
        inbox_max_age: Duration::from_millis(DAY_MS),
        ..Retention::default()
    };
    let report = store.prune(retention, now).await.unwrap();
    assert_eq!((report.direct_messages, report.inbox_entries), (6, 6));
    // Every stream emptied by age went too: bob's inbox starts afresh.
    assert_eq!(direct(&store, "alice", &["bob"], now, "new").await, [1]);
    let inbox = store.read_inbox("bob", None, Offset(0), 10).await.unwrap();
    let texts: Vec<String> = inbox
        .messages
        .iter()
        .map(|m| match &m.content {
            Payload::Json(raw) => format!("{}@{}", raw.get(), m.offset),
            Payload::Binary(_) => panic!("stored as JSON"),
        })
        .collect();
    assert_eq!(texts, ["\"new\"@1"]);
    store.close().await;

    let file = rusqlite::Connection::open(folder.path().join("herald.db")).unwrap();
    let rows: i64 = file
        .query_row("SELECT count(*) FROM direct_messages", [], |row| row.get(0))
        .unwrap();
    // The newest old message stays (so its number is never reused), with the new one.
    assert_eq!(rows, 2);
}

#[tokio::test]
async fn a_second_store_on_the_same_folder_is_refused_while_the_first_is_open() {
    let folder = tempfile::tempdir().unwrap();
    let first = SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .unwrap();
    let error = SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .err()
    .expect("a second writer on one folder must be refused");
    let text = error.to_string();
    assert!(text.contains("in use by another herald process"), "{text}");
    assert!(
        text.contains(&folder.path().display().to_string()),
        "{text}"
    );
    first.close().await;
    SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .expect("free again after close");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_naming_its_path() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("herald.db");
    std::fs::write(
        &path,
        b"these are not the bytes of a SQLite database, not at all",
    )
    .unwrap();
    let error = SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .err()
    .expect("must be refused");
    let text = error.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("not a database"), "{text}");
}

#[tokio::test]
async fn a_sqlite_file_of_another_application_is_refused() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("herald.db");
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute_batch("CREATE TABLE accounts (id INTEGER PRIMARY KEY);")
        .unwrap();
    drop(other);
    let error = SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .err()
    .expect("must be refused");
    let text = error.to_string();
    assert!(text.contains("not a Herald store"), "{text}");
}

#[tokio::test]
async fn a_store_of_an_older_schema_version_is_refused_and_left_untouched() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("herald.db");
    let old = rusqlite::Connection::open(&path).unwrap();
    // Version 1 keyed every table by stream name.
    old.execute_batch(
        "PRAGMA application_id = 0x48524c44;
         CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
         INSERT INTO meta VALUES ('schema', '1');
         CREATE TABLE streams (stream TEXT PRIMARY KEY, epoch TEXT NOT NULL,
             last_pos INTEGER NOT NULL, acked INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;",
    )
    .unwrap();
    drop(old);
    let error = SqliteStore::open(
        folder.path(),
        Synchronous::Full,
        StoreLimits::default(),
        recording_broker().0,
    )
    .err()
    .expect("must be refused");
    let text = error.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("schema version 1"), "{text}");
    let old = rusqlite::Connection::open(&path).unwrap();
    let tables: i64 = old
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(tables, 2, "nothing was created in the old file");
}
