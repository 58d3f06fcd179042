//! A connection's stored publishes are pipelined: it does not wait for one commit (an fsync
//! with `synchronous = "full"`) before taking its next publish, yet everything keeps its
//! order. Alone in its test binary: it counts the store's commits, a process-wide metric.

mod common;

use common::{TestServer, content_json};
use herald_protocol::ServerEvent;
use serde_json::json;

const BURST: u64 = 40;

/// The store's commits so far.
async fn commits(server: &TestServer) -> f64 {
    server
        .scrape()
        .await
        .value("herald_store_commit_seconds_count")
}

#[tokio::test]
async fn a_burst_of_publishes_shares_commits_and_keeps_its_order() {
    let server = TestServer::start_with(common::presence_on).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    let commits_before = commits(&server).await;

    // The whole burst is written before any answer is read; then a leave, which must take
    // effect after every publish before it.
    for n in 1..=BURST {
        alice
            .send_json(
                json!({"type": "publish", "id": format!("p{n}"), "room": "lobby", "content": n}),
            )
            .await;
    }
    alice
        .send_json(json!({"type": "leave", "id": "bye", "room": "lobby"}))
        .await;

    let mut offsets: Vec<u64> = Vec::new();
    loop {
        let event = alice.next_event().await;
        match event {
            ServerEvent::Ack(ack) if ack.reference.as_deref() == Some("bye") => break,
            ServerEvent::Ack(ack) => {
                assert_eq!(
                    ack.reference.as_deref(),
                    Some(format!("p{}", offsets.len() + 1).as_str()),
                    "acks come in request order"
                );
                offsets.push(ack.offset.expect("a stored message has an offset"));
            }
            ServerEvent::Message(_) | ServerEvent::PresenceDiff(_) => {}
            other => panic!("unexpected {other:?} after {offsets:?}"),
        }
    }
    assert_eq!(offsets, (1..=BURST).collect::<Vec<_>>());

    for n in 1..=BURST {
        let message = loop {
            match bob.next_event().await {
                ServerEvent::Message(message) => break message,
                ServerEvent::PresenceDiff(diff) => assert_eq!(diff.left, Some(vec![]), "{n}"),
                other => panic!("message {n} expected, got {other:?}"),
            }
        };
        assert_eq!(content_json(&message), json!(n));
        assert_eq!(message.offset, Some(n));
    }
    // Alice's leave came after her publishes, and so does what Bob sees of it.
    let left = bob.diff_listing("lobby", "alice", false).await;
    assert_eq!(left.count, 1);

    let commits = commits(&server).await - commits_before;
    assert!(
        commits < BURST as f64,
        "{BURST} publishes took {commits} commits: each waited for the one before"
    );
}

#[tokio::test]
async fn a_burst_of_direct_messages_keeps_its_order() {
    let server = TestServer::start_with(common::presence_on).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    for n in 1..=BURST {
        alice
            .send_json(json!({"type": "send", "id": format!("d{n}"), "to": ["bob"], "content": n}))
            .await;
    }
    alice
        .send_json(json!({"type": "ping", "id": "after"}))
        .await;
    for n in 1..=BURST {
        match alice.next_event().await {
            ServerEvent::Ack(ack) => {
                assert_eq!(
                    ack.reference,
                    Some(format!("d{n}")),
                    "acks come in request order"
                );
                assert_eq!(ack.offsets.expect("inbox offsets")["bob"], n);
            }
            other => panic!("ack {n} expected, got {other:?}"),
        }
    }
    assert!(matches!(alice.next_event().await, ServerEvent::Pong(_)));
    for n in 1..=BURST {
        let message = bob.next_message_event().await;
        assert_eq!(content_json(&message), json!(n));
        assert_eq!(message.offset, Some(n));
    }
}

/// More than a connection may have in flight (256), so the reader also waits for commits.
const UNANSWERED_BURST: u64 = 600;

#[tokio::test]
async fn messages_without_id_get_no_answer_yet_keep_their_order_and_precede_what_follows() {
    let server = TestServer::start_with(|config| {
        config.limits.messages_per_second = 100_000;
        config.limits.burst = 100_000;
    })
    .await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let commits_before = commits(&server).await;
    for n in 1..=UNANSWERED_BURST {
        alice
            .send_json(json!({"type": "send", "to": ["bob"], "content": n}))
            .await;
    }
    // A read right behind them finds every one committed.
    let newest = alice.history(json!({"with": "bob", "limit": 1})).await;
    assert_eq!(content_json(&newest.messages[0]), json!(UNANSWERED_BURST));
    // Nothing answered the messages themselves.
    alice.expect_nothing_queued().await;

    for n in 1..=UNANSWERED_BURST {
        let message = bob.next_message_event().await;
        assert_eq!(content_json(&message), json!(n));
        assert_eq!(message.offset, Some(n));
    }
    let commits = commits(&server).await - commits_before;
    assert!(
        commits < UNANSWERED_BURST as f64 / 2.0,
        "{UNANSWERED_BURST} messages took {commits} commits"
    );
}
