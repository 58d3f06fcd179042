//! What every store backend does.

use std::time::Duration;

use herald_protocol::ServerEvent;
use herald_server::delivery::{Channel, OutFrame};
use herald_server::engine::store::{Append, Offset, Retention, StoreError, StoreLimits};

use crate::support::*;

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
                    waits.push(store.append(append, None).await);
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
