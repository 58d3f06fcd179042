//! What only the Redis store does: appends from several nodes, pipelining, a Cluster, retries
//! recognised across nodes, Redis going away.

use std::time::Duration;

use crate::common::redis::{RedisCluster, RedisServer};
use herald_protocol::{Payload, ServerEvent};
use herald_server::config::RedisConfig;
use herald_server::delivery::{Channel, OutFrame};
use herald_server::engine::redis::store::RedisStore;
use herald_server::engine::store::{
    Append, Appended, IdempotencyKey, NewMessage, Offset, Retention, Store, StoreError,
    StoreLimits, StoredMessage,
};

use crate::support::*;

async fn redis_store(limits: StoreLimits) -> Option<(RedisServer, RedisConfig, RedisStore)> {
    let server = RedisServer::start().await?;
    let config = redis_config(&server);
    let store = RedisStore::open(&config, limits).await.unwrap();
    Some((server, config, store))
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
                committing.push(queue(&store, room_append("shared", &n.to_string())).await);
            }
            let mut offsets = Vec::new();
            for append in committing {
                match append.await.unwrap() {
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
            committing.push(store.append(append, None).await);
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
            append.await.unwrap();
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
            committing.push(queue(&store, room_append(room, &n.to_string())).await);
        }
    }
    for append in committing {
        append.await.unwrap();
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
