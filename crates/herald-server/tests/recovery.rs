//! Reconnect recovery: `join` with `since` replays exactly what was missed, in order, before
//! live messages, or says `recovered: false` when it cannot.

mod common;

use common::{Client, TestServer, content_json};
use herald_protocol::{Ack, ErrorCode, ServerEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Sends a join and returns its ack, which must be the very next event: the replay follows it.
async fn join_since(client: &mut Client, room: &str, since: u64, epoch: Option<&str>) -> Ack {
    let mut request = json!({"type": "join", "room": room, "since": since, "id": "rejoin"});
    if let Some(epoch) = epoch {
        request["epoch"] = json!(epoch);
    }
    client.send_json(request).await;
    match client.next_event().await {
        ServerEvent::Ack(ack) if ack.reference.as_deref() == Some("rejoin") => ack,
        other => panic!("expected the join's ack first, got {other:?}"),
    }
}

#[tokio::test]
async fn join_with_since_replays_exactly_the_missed_messages_then_live_ones() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    for n in 1..=5 {
        alice.publish("lobby", json!(n)).await;
    }
    let mut bob = server.connect("bob").await;
    let ack = join_since(&mut bob, "lobby", 2, None).await;
    assert_eq!(ack.recovered, Some(true));
    assert_eq!(ack.offset, Some(5));
    alice.publish("lobby", json!(6)).await;
    for n in 3..=6u64 {
        let message = bob.next_message_event().await;
        assert_eq!(message.offset, Some(n));
        assert_eq!(content_json(&message), json!(n));
    }
    bob.expect_nothing_queued().await;
}

#[tokio::test]
async fn a_gap_that_retention_no_longer_covers_gets_recovered_false_and_the_newest_page() {
    let server = TestServer::start_with(|config| config.store.room_max_messages = 5).await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    for n in 1..=12 {
        alice.publish("lobby", json!(n)).await;
    }
    let report = server.node.prune().await.unwrap();
    assert_eq!(report.room_messages, 7);

    let mut bob = server.connect("bob").await;
    let ack = join_since(&mut bob, "lobby", 2, None).await;
    assert_eq!(ack.recovered, Some(false));
    for n in 8..=12u64 {
        assert_eq!(bob.next_message_event().await.offset, Some(n));
    }
    alice.publish("lobby", json!(13)).await;
    assert_eq!(bob.next_message_event().await.offset, Some(13));
}

#[tokio::test]
async fn an_offset_from_another_epoch_or_beyond_the_newest_is_not_recovered() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    alice.publish("lobby", json!(1)).await;

    let mut bob = server.connect("bob").await;
    let ack = join_since(&mut bob, "lobby", 1, Some("another-epoch")).await;
    assert_eq!(ack.recovered, Some(false));
    assert_eq!(bob.next_message_event().await.offset, Some(1));

    let mut carol = server.connect("carol").await;
    let ack = join_since(&mut carol, "lobby", 40, None).await;
    assert_eq!(ack.recovered, Some(false));
}

#[tokio::test]
async fn an_epoch_that_differs_is_never_recovered_whatever_the_offset() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    for n in 1..=3 {
        alice.publish("lobby", json!(n)).await;
    }
    // Every offset, in range or not, of a stream that is not the room's: a recreated stream
    // (a new data folder) soon covers the old offsets, so they say nothing.
    for since in 0..=4 {
        let mut bob = server.connect(&format!("bob-{since}")).await;
        let ack = join_since(&mut bob, "lobby", since, Some("another-epoch")).await;
        assert_eq!(ack.recovered, Some(false), "since {since}");
        for n in 1..=3u64 {
            assert_eq!(bob.next_message_event().await.offset, Some(n), "the page");
        }
    }
    // A room that has no epoch (recreated and still empty) differs from the client's too.
    let mut carol = server.connect("carol").await;
    let ack = join_since(&mut carol, "empty", 0, Some("another-epoch")).await;
    assert_eq!(ack.recovered, Some(false));
    assert_eq!(ack.epoch, None);
    carol.expect_nothing_queued().await;
}

#[tokio::test]
async fn too_large_a_gap_is_not_replayed() {
    let server = TestServer::start_with(|config| config.store.max_recovery = 3).await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    for n in 1..=6 {
        alice.publish("lobby", json!(n)).await;
    }
    let mut bob = server.connect("bob").await;
    assert_eq!(
        join_since(&mut bob, "lobby", 3, None).await.recovered,
        Some(true)
    );
    let mut carol = server.connect("carol").await;
    assert_eq!(
        join_since(&mut carol, "lobby", 2, None).await.recovered,
        Some(false)
    );
}

#[tokio::test]
async fn since_on_a_room_already_joined_is_refused() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    let reply = alice
        .request(json!({"type": "join", "room": "lobby", "since": 0}))
        .await;
    let ServerEvent::Error(error) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(error.code, ErrorCode::InvalidField);
    assert!(error.message.contains("\"since\""), "{}", error.message);
}

const PUBLISHERS: usize = 3;
const PER_PUBLISHER: usize = 200;
const SEED: u64 = 0x4845_5241_4c44;

/// Several publishers write to one room while a reader keeps dropping its connection at random
/// points (before the join's ack, right after it, in the middle of the replay, during live
/// traffic) and rejoining with the last offset it saw. At the end it has seen every message
/// exactly once, in offset order, with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_reconnects_at_random_sees_every_message_once_in_order() {
    let server = TestServer::start_with(|config| {
        config.limits.messages_per_second = 1_000_000;
        config.limits.burst = 1_000_000;
    })
    .await;
    let total = (PUBLISHERS * PER_PUBLISHER) as u64;

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let mut client = server.connect(&format!("publisher{p}")).await;
        client.join("stream").await;
        publishers.push(tokio::spawn(async move {
            for n in 0..PER_PUBLISHER {
                client
                    .ack(json!({"type": "publish", "room": "stream", "echo": false,
                                "content": {"p": p, "n": n}}))
                    .await;
            }
            client
        }));
    }

    let mut rng = StdRng::seed_from_u64(SEED);
    let mut last_seen = 0u64;
    let mut epoch: Option<String> = None;
    let mut seen: Vec<Value> = Vec::new();
    let mut cycles = 0;
    while last_seen < total {
        cycles += 1;
        assert!(cycles < 10_000, "the reader made no progress");
        let mut reader = server.connect("reader").await;
        if rng.random_ratio(1, 10) {
            // Gone before the join is even answered.
            reader
                .send_json(json!({"type": "join", "room": "stream", "since": last_seen}))
                .await;
            continue;
        }
        let ack = join_since(&mut reader, "stream", last_seen, epoch.as_deref()).await;
        assert_eq!(
            ack.recovered,
            Some(true),
            "cycle {cycles}, since {last_seen}"
        );
        // An empty room has no epoch yet; once it has one, it keeps it.
        if let Some(known) = &epoch {
            assert_eq!(ack.epoch.as_ref(), Some(known), "the epoch is stable");
        }
        let ack_seen = format!("{ack:?}");
        epoch = epoch.or(ack.epoch);
        let to_read = rng.random_range(0..=30);
        for _ in 0..to_read {
            if last_seen == total {
                break;
            }
            let message = reader.next_message_event().await;
            let offset = message.offset.expect("stored messages carry offsets");
            assert_eq!(
                offset,
                last_seen + 1,
                "cycle {cycles}: a gap or a duplicate at the seam: {message:?} ack {ack_seen}"
            );
            last_seen = offset;
            seen.push(content_json(&message));
        }
        // Dropping the client closes the socket without a goodbye.
    }

    for publisher in publishers {
        publisher.await.unwrap();
    }
    assert_eq!(seen.len() as u64, total);
    for p in 0..PUBLISHERS {
        let own: Vec<u64> = seen
            .iter()
            .filter(|c| c["p"] == json!(p))
            .map(|c| c["n"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (0..PER_PUBLISHER as u64).collect();
        assert_eq!(
            own, expected,
            "publisher {p}'s messages, each once, in its order"
        );
    }
    assert!(
        cycles >= 30,
        "only {cycles} reconnects: the test exercised too little"
    );
}
