//! A client that did not get the ack of a stored `publish` or `send` (its connection closed
//! first) retries it with the same `id`: the retry gets the first attempt's ack, and the
//! message is stored and delivered once.

mod common;

use std::time::Duration;

use common::{Client, TestServer};
use herald_protocol::ServerEvent;
use serde_json::json;

/// Proves that no further message is queued for `client`: presence events may come before the
/// pong, messages may not.
async fn expect_no_more_messages(client: &mut Client) {
    client
        .send_json(json!({"type": "ping", "id": "no-more"}))
        .await;
    loop {
        match client.next_event().await {
            ServerEvent::Pong(_) => return,
            ServerEvent::Message(message) => panic!("delivered again: {message:?}"),
            _ => continue,
        }
    }
}

async fn history_ids(client: &mut Client, room: &str) -> Vec<String> {
    let page = client.history(json!({"room": room, "limit": 100})).await;
    page.messages.iter().map(|m| m.id.clone()).collect()
}

#[tokio::test]
async fn a_retried_publish_gets_the_first_ack_and_is_stored_and_delivered_once() {
    let server = TestServer::start().await;
    let mut bob = server.connect("bob").await;
    bob.join("lobby").await;
    let publish = json!({"type": "publish", "room": "lobby", "content": "hello"});

    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    let first = alice.ack_with_id(publish.clone(), "p1").await;
    drop(alice);
    let mut again = server.connect("alice").await;
    again.join("lobby").await;
    let retried = again.ack_with_id(publish.clone(), "p1").await;
    assert_eq!(retried.id, first.id);
    assert_eq!(retried.offset, first.offset);
    assert_eq!(retried.epoch, first.epoch);

    assert_eq!(
        history_ids(&mut bob, "lobby").await,
        [first.id.clone().unwrap()]
    );
    let delivered = bob.next_message_event().await;
    assert_eq!(Some(delivered.id), first.id);
    expect_no_more_messages(&mut bob).await;
}

#[tokio::test]
async fn a_retried_send_gets_the_first_ack_and_reaches_the_recipient_once() {
    let server = TestServer::start().await;
    let mut bob = server.connect("bob").await;
    let send = json!({"type": "send", "to": ["bob"], "content": "once"});
    let mut alice = server.connect("alice").await;
    let first = alice.ack_with_id(send.clone(), "s1").await;
    let retried = alice.ack_with_id(send, "s1").await;
    assert_eq!(retried.id, first.id);
    assert_eq!(retried.offsets, first.offsets);
    let delivered = bob.next_message_event().await;
    assert_eq!(Some(delivered.id), first.id);
    expect_no_more_messages(&mut bob).await;
}

#[tokio::test]
async fn the_same_id_with_another_request_or_another_user_is_a_new_message() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    let mut carol = server.connect("carol").await;
    carol.join("lobby").await;
    let one = json!({"type": "publish", "room": "lobby", "content": "one"});
    let two = json!({"type": "publish", "room": "lobby", "content": "two"});
    let a = alice.ack_with_id(one.clone(), "x").await;
    let b = alice.ack_with_id(two, "x").await;
    let c = carol.ack_with_id(one, "x").await;
    assert_ne!(a.id, b.id);
    assert_ne!(a.id, c.id);
    assert_eq!(history_ids(&mut alice, "lobby").await.len(), 3);
}

#[tokio::test]
async fn retries_are_off_with_a_zero_window() {
    let server = TestServer::start_with(|c| c.limits.idempotency_window = Duration::ZERO).await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    let publish = json!({"type": "publish", "room": "lobby", "content": "hello"});
    let first = alice.ack_with_id(publish.clone(), "p1").await;
    let second = alice.ack_with_id(publish, "p1").await;
    assert_ne!(first.id, second.id);
}

#[tokio::test]
async fn publishes_cut_off_by_a_disconnect_and_retried_are_stored_once() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    let count = 50;
    for n in 0..count {
        let request =
            json!({"type": "publish", "room": "lobby", "content": n, "id": format!("m{n}")});
        alice.send_json(request).await;
    }
    // Closed while (some of) the publishes are still being stored: their acks may be lost.
    let (status, body) = server
        .api("POST", "/api/users/alice/disconnect", None)
        .await;
    assert_eq!(status, 200, "{body}");
    alice.expect_close().await;

    let mut again = server.connect("alice").await;
    again.join("lobby").await;
    let mut offsets = Vec::new();
    for n in 0..count {
        let request = json!({"type": "publish", "room": "lobby", "content": n});
        let ack = again.ack_with_id(request, &format!("m{n}")).await;
        offsets.push(ack.offset.expect("a stored offset"));
    }
    let mut unique = offsets.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), count, "{offsets:?}");
    assert_eq!(history_ids(&mut again, "lobby").await.len(), count);
}
