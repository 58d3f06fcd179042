//! Stored room messages and conversations: offsets, history pages, ephemeral messages.

mod common;

use common::{TestServer, content_json};
use herald_protocol::{ContentEncoding, ErrorCode, ServerEvent};
use serde_json::json;

#[tokio::test]
async fn stored_room_messages_get_consecutive_offsets_on_the_event_and_the_ack() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let joined = alice.ack(json!({"type": "join", "room": "lobby"})).await;
    assert_eq!(
        joined.offset,
        Some(0),
        "an empty room starts before offset 1"
    );
    bob.join("lobby").await;

    for n in 1..=3u64 {
        let ack = alice
            .ack(json!({"type": "publish", "room": "lobby", "content": n, "echo": false}))
            .await;
        assert_eq!(ack.offset, Some(n));
        assert!(ack.epoch.as_deref().is_some_and(|e| !e.is_empty()));
        let message = bob.next_message_event().await;
        assert_eq!(message.offset, Some(n));
        assert_eq!(Some(&message.id), ack.id.as_ref());
        assert_eq!(content_json(&message), json!(n));
    }
    let joined = server
        .connect("carol")
        .await
        .ack(json!({"type": "join", "room": "lobby"}))
        .await;
    assert_eq!(
        joined.offset,
        Some(3),
        "a join reports the room's newest offset"
    );
}

#[tokio::test]
async fn room_history_pages_back_oldest_first_until_nothing_is_left() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    for n in 1..=7 {
        alice.publish("lobby", json!({"n": n})).await;
    }
    let page = alice.history(json!({"room": "lobby", "limit": 3})).await;
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset.unwrap()).collect();
    assert_eq!(offsets, [5, 6, 7]);
    assert!(page.more);
    assert_eq!(content_json(&page.messages[0]), json!({"n": 5}));
    assert_eq!(page.room.as_deref(), Some("lobby"));

    let page = alice
        .history(json!({"room": "lobby", "limit": 3, "before": 5}))
        .await;
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset.unwrap()).collect();
    assert_eq!(offsets, [2, 3, 4]);
    assert!(page.more);

    let page = alice
        .history(json!({"room": "lobby", "limit": 3, "before": 2}))
        .await;
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset.unwrap()).collect();
    assert_eq!(offsets, [1]);
    assert!(!page.more);
}

#[tokio::test]
async fn history_limits_are_capped_and_default_to_fifty() {
    let server = TestServer::start_with(|config| config.store.history_max_limit = 5).await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    for n in 1..=8 {
        alice.publish("lobby", json!(n)).await;
    }
    let page = alice.history(json!({"room": "lobby", "limit": 1000})).await;
    assert_eq!(page.messages.len(), 5, "capped at store.history_max_limit");
    assert!(page.more);

    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("big").await;
    for n in 1..=55 {
        alice.publish("big", json!(n)).await;
    }
    let page = alice.history(json!({"room": "big"})).await;
    assert_eq!(page.messages.len(), 50);
    assert_eq!(page.messages[0].offset, Some(6));
}

#[tokio::test]
async fn conversation_history_holds_both_directions_in_order_and_pages() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    for n in 1..=6 {
        let (sender, to) = if n % 2 == 1 {
            (&mut alice, "bob")
        } else {
            (&mut bob, "alice")
        };
        sender
            .ack(json!({"type": "send", "to": [to], "content": n}))
            .await;
    }
    // A message to someone else is not part of the conversation.
    alice
        .ack(json!({"type": "send", "to": ["carol"], "content": "other"}))
        .await;

    let page = alice.history(json!({"with": "bob", "limit": 4})).await;
    assert_eq!(page.with.as_deref(), Some("bob"));
    let contents: Vec<_> = page.messages.iter().map(content_json).collect();
    assert_eq!(contents, [json!(3), json!(4), json!(5), json!(6)]);
    let senders: Vec<_> = page.messages.iter().map(|m| m.from.as_str()).collect();
    assert_eq!(senders, ["alice", "bob", "alice", "bob"]);
    assert!(page.more);

    let before = page.messages[0].offset.unwrap();
    let page = bob
        .history(json!({"with": "alice", "limit": 4, "before": before}))
        .await;
    let contents: Vec<_> = page.messages.iter().map(content_json).collect();
    assert_eq!(
        contents,
        [json!(1), json!(2)],
        "bob sees the same conversation"
    );
    assert!(!page.more);
}

#[tokio::test]
async fn ephemeral_messages_are_relayed_without_offset_and_never_stored() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    let ack = alice
        .ack(json!({"type": "publish", "room": "lobby", "persist": false, "content": "typing"}))
        .await;
    assert!(ack.id.is_some());
    assert_eq!(ack.offset, None);
    let message = bob.next_message_event().await;
    assert_eq!(content_json(&message), json!("typing"));
    assert_eq!(message.offset, None);

    let page = bob.history(json!({"room": "lobby"})).await;
    assert!(page.messages.is_empty(), "{:?}", page.messages);
    let stored = alice.publish("lobby", json!("kept")).await;
    assert_eq!(stored, 1, "the ephemeral message took no offset");
}

#[tokio::test]
async fn binary_messages_come_back_from_history_as_base64() {
    use base64::Engine;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("files").await;
    let frame = herald_protocol::binary::join(
        br#"{"type":"publish","room":"files","echo":false}"#,
        &[0, 1, 2, 255],
    );
    alice.send_raw(WsMessage::binary(frame.to_vec())).await;
    alice.publish("files", json!("after")).await;
    let page = alice.history(json!({"room": "files"})).await;
    let binary = &page.messages[0];
    assert_eq!(binary.encoding, Some(ContentEncoding::Base64));
    let text: String = serde_json::from_str(binary.content.as_ref().unwrap().get()).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    assert_eq!(bytes, [0, 1, 2, 255]);
}

#[tokio::test]
async fn history_of_a_room_outside_the_token_is_forbidden() {
    let server = TestServer::start().await;
    let mut alice = server
        .connect_with("alice", false, Some(vec!["open"]))
        .await;
    let reply = alice
        .request(json!({"type": "history", "room": "secret"}))
        .await;
    let ServerEvent::Error(error) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(error.code, ErrorCode::Forbidden);
}
