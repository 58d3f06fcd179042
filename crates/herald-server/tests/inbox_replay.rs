//! Replaying a large inbox: however many direct messages wait, the user gets the welcome at
//! once, then every pending message in order, exactly once across reconnects, with live ones
//! after the stored ones; a `join` with `since` replays a long gap the same way.

mod common;

use std::time::{Duration, Instant};

use common::{Client, EVENT_TIMEOUT, TestServer, content_json};
use futures::{SinkExt, StreamExt};
use herald_protocol::ServerEvent;
use herald_server::config::Synchronous;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const PENDING: u64 = 100_000;

/// How long storing a whole backlog may take (each event otherwise has `EVENT_TIMEOUT`).
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(60);

/// Senders storing the large backlog side by side (larger group commits).
const SENDERS: u64 = 4;

/// A server that lets connections pipeline a large backlog in quickly: no rate limit, and
/// commits that reach the OS, not the disk (durability is not what is tested here).
async fn server_without_rate_limit() -> TestServer {
    TestServer::start_with(|config| {
        config.limits.messages_per_second = 10_000_000;
        config.limits.burst = 10_000_000;
        config.store.synchronous = Synchronous::Normal;
        config.store.max_inbox_messages = 2 * PENDING;
    })
    .await
}

/// Sends direct messages to `to` with the contents `contents`, pipelined without waiting for
/// each ack, and returns once all are committed.
async fn pipeline_direct(sender: &mut Client, to: &str, contents: std::ops::RangeInclusive<u64>) {
    for n in contents {
        // Without an `id`, a request is not answered: nothing queues up for the sender.
        let request = json!({"type": "send", "to": [to], "content": n});
        sender
            .ws
            .feed(WsMessage::text(request.to_string()))
            .await
            .unwrap();
    }
    sender.ws.flush().await.unwrap();
    // Requests are answered in order, so this ack comes after every earlier send committed; it
    // goes to someone else, so that `to`'s inbox holds exactly `contents`.
    let marker = json!({"type": "send", "to": ["marker"], "content": 0, "id": "committed"});
    await_answer(sender, marker).await;
}

/// Sends a request and waits for its answer, longer than for a single event: the server
/// answers it once everything pipelined before it is stored.
async fn await_answer(client: &mut Client, request: serde_json::Value) {
    let reference = request["id"].as_str().unwrap().to_owned();
    client.send_json(request).await;
    let deadline = Instant::now() + BACKLOG_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, client.ws.next())
            .await
            .expect("the backlog is stored in time")
            .expect("connection open")
            .unwrap();
        if let WsMessage::Text(text) = frame {
            let event = ServerEvent::decode(&text).unwrap();
            if common::reference_of(&event) == Some(reference.as_str()) {
                assert!(matches!(event, ServerEvent::Ack(_)), "{event:?}");
                return;
            }
        }
    }
}

/// The next direct message; checks it is the inbox entry at `offset` with content `offset`.
async fn expect_entry(client: &mut Client, offset: u64) {
    let message = client.next_message_event().await;
    assert_eq!(message.offset, Some(offset), "inbox entries out of order");
    assert_eq!(content_json(&message), json!(offset));
}

/// Reads the inbox entries at `offsets`, in order, and marks each content (a number sent once)
/// as received, refusing one received before.
async fn receive_entries(
    client: &mut Client,
    offsets: std::ops::RangeInclusive<u64>,
    received: &mut [bool],
) {
    for offset in offsets {
        let message = client.next_message_event().await;
        assert_eq!(message.offset, Some(offset), "inbox entries out of order");
        let content = content_json(&message).as_u64().unwrap() as usize;
        assert!(!received[content], "{content} delivered twice");
        received[content] = true;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_a_hundred_thousand_pending_messages_connects_at_once_and_gets_each_once() {
    let server = server_without_rate_limit().await;
    let share = PENDING / SENDERS;
    let mut senders = Vec::new();
    // Different users: a user's other connections would get a copy of each message.
    for k in 0..SENDERS {
        senders.push(server.connect(&format!("sender{k}")).await);
    }
    futures::future::join_all(
        senders
            .iter_mut()
            .zip(0..)
            .map(|(sender, k)| pipeline_direct(sender, "bob", k * share + 1..=(k + 1) * share)),
    )
    .await;

    let started = Instant::now();
    let mut bob = server.connect("bob").await;
    let welcomed = started.elapsed();
    assert!(
        welcomed < Duration::from_secs(2),
        "the welcome took {welcomed:?} with {PENDING} pending messages"
    );

    let mut received = vec![false; PENDING as usize + 1];
    let part = 40_000;
    receive_entries(&mut bob, 1..=part, &mut received).await;
    // Live while the replay is far behind: it must come after every stored one, once.
    let live = senders[0]
        .ack(json!({"type": "send", "to": ["bob"], "content": "live"}))
        .await;
    assert_eq!(live.offsets.unwrap()["bob"], PENDING + 1);
    // The ack is answered while the replay still runs; entries keep coming meanwhile.
    let ack = bob.ack(json!({"type": "ack", "inbox": part})).await;
    assert_eq!(ack.inbox, Some(part));
    drop(bob);

    // A reconnect gets exactly what was not acknowledged, in order.
    let mut bob = server.connect("bob").await;
    receive_entries(&mut bob, part + 1..=PENDING, &mut received).await;
    assert!(
        received[1..].iter().all(|&got| got),
        "every message arrived"
    );
    let live = bob.next_message_event().await;
    assert_eq!(live.offset, Some(PENDING + 1));
    assert_eq!(content_json(&live), json!("live"));
    bob.expect_nothing_queued().await;
}

#[tokio::test]
async fn a_backlog_larger_than_the_send_queue_is_delivered_to_a_client_that_reads() {
    let server = TestServer::start_with(|config| {
        config.limits.messages_per_second = 10_000_000;
        config.limits.burst = 10_000_000;
        config.limits.send_queue = 16;
    })
    .await;
    let mut alice = server.connect("alice").await;
    pipeline_direct(&mut alice, "bob", 1..=1_100).await;

    let mut bob = tokio::time::timeout(EVENT_TIMEOUT, server.connect("bob"))
        .await
        .expect("the welcome arrives with 1,100 pending messages and a send queue of 16");
    for offset in 1..=1_100 {
        expect_entry(&mut bob, offset).await;
    }
    bob.expect_nothing_queued().await;
}

#[tokio::test]
async fn a_join_recovering_more_than_the_send_queue_replays_every_message_in_order_then_live() {
    let server = TestServer::start_with(|config| {
        config.limits.messages_per_second = 10_000_000;
        config.limits.burst = 10_000_000;
        config.limits.send_queue = 16;
        config.store.max_recovery = 5_000;
    })
    .await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    let missed = 3_000u64;
    for n in 1..=missed {
        // Without echo: alice, who does not read here, gets no copy.
        let request = json!({"type": "publish", "room": "lobby", "content": n, "echo": false});
        alice
            .ws
            .feed(WsMessage::text(request.to_string()))
            .await
            .unwrap();
    }
    alice.ws.flush().await.unwrap();
    // Answered in order: every publish before it is committed.
    let done = json!({"type": "publish", "room": "lobby", "content": "done", "echo": false,
                      "id": "done"});
    await_answer(&mut alice, done).await;

    let mut bob = server.connect("bob").await;
    let joined = bob
        .ack(json!({"type": "join", "room": "lobby", "since": 0}))
        .await;
    assert_eq!(joined.recovered, Some(true));
    for offset in 1..=missed {
        let message = bob.next_message_event().await;
        assert_eq!(message.offset, Some(offset));
        assert_eq!(content_json(&message), json!(offset));
        if offset == 1_000 {
            // Published while the replay is pages behind: delivered after it, once.
            let live = json!({"type": "publish", "room": "lobby", "content": "live",
                              "echo": false});
            alice.ack(live).await;
        }
    }
    assert_eq!(bob.next_message_event().await.offset, Some(missed + 1));
    let live = bob.next_message_event().await;
    assert_eq!(live.offset, Some(missed + 2));
    assert_eq!(content_json(&live), json!("live"));
    bob.expect_nothing_queued().await;
}
