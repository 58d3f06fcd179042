//! Storage stays bounded whatever a sender does: a user's inbox holds at most
//! `store.max_inbox_messages` unacknowledged messages, and a send beyond that is refused with
//! `limit_exceeded` naming the recipient.

mod common;

use common::TestServer;
use herald_protocol::{ErrorCode, ServerEvent};
use serde_json::json;

async fn server_with_inboxes_of(max: u64) -> TestServer {
    TestServer::start_with(|config| config.store.max_inbox_messages = max).await
}

#[tokio::test]
async fn a_send_to_a_full_inbox_is_refused_naming_the_user_until_it_is_acknowledged() {
    let server = server_with_inboxes_of(3).await;
    let mut alice = server.connect("alice").await;
    for n in 1..=3 {
        alice
            .ack(json!({"type": "send", "to": ["bob"], "content": n}))
            .await;
    }
    let reply = alice
        .request(json!({"type": "send", "to": ["carol", "bob"], "content": 4}))
        .await;
    let ServerEvent::Error(error) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(error.code, ErrorCode::LimitExceeded);
    assert!(error.message.contains("bob"), "{}", error.message);
    assert!(!error.message.contains("carol"), "{}", error.message);
    assert!(
        error.message.contains("store.max_inbox_messages"),
        "{}",
        error.message
    );
    // Refused as a whole: carol got nothing either.
    server.connect("carol").await.expect_nothing_queued().await;

    // Once bob acknowledges, there is room again.
    let mut bob = server.connect("bob").await;
    for _ in 1..=3 {
        bob.next_message_event().await;
    }
    bob.ack(json!({"type": "ack", "inbox": 2})).await;
    let ack = alice
        .ack(json!({"type": "send", "to": ["bob"], "content": 5}))
        .await;
    assert_eq!(ack.offsets.unwrap()["bob"], 4);
}

#[tokio::test]
async fn a_send_without_id_to_a_full_inbox_is_refused_all_the_same() {
    let server = server_with_inboxes_of(1).await;
    let mut alice = server.connect("alice").await;
    alice
        .ack(json!({"type": "send", "to": ["bob"], "content": 1}))
        .await;
    alice
        .send_json(json!({"type": "send", "to": ["bob"], "content": 2}))
        .await;
    let ServerEvent::Error(error) = alice.next_event().await else {
        panic!("an error expected")
    };
    assert_eq!(error.code, ErrorCode::LimitExceeded);
    assert!(error.message.contains("bob"), "{}", error.message);
    assert_eq!(error.reference, None);
    // The connection goes on.
    let ack = alice
        .ack(json!({"type": "send", "to": ["carol"], "content": 3}))
        .await;
    assert_eq!(ack.offsets.unwrap()["carol"], 1);
}

#[tokio::test]
async fn the_server_api_answers_a_send_to_a_full_inbox_with_429_naming_the_user() {
    let server = server_with_inboxes_of(1).await;
    let send = json!({"to": ["made-up-name"], "content": "x", "from": "spammer"});
    let (status, _) = server.api("POST", "/api/send", Some(send.clone())).await;
    assert_eq!(status, 200);
    let (status, body) = server.api("POST", "/api/send", Some(send)).await;
    assert_eq!(status, 429, "{body}");
    let text = body["error"].as_str().unwrap();
    assert!(text.contains("made-up-name"), "{text}");
}
