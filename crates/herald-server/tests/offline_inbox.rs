//! Direct messages to users who are away: stored in their inbox, delivered at connect in order
//! before live traffic, until acknowledged.

mod common;

use common::{TestServer, content_json};
use herald_protocol::{ErrorCode, ServerEvent};
use serde_json::json;

#[tokio::test]
async fn messages_sent_while_offline_arrive_at_connect_in_order_before_live_ones() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    for n in 1..=5 {
        let ack = alice
            .ack(json!({"type": "send", "to": ["bob"], "content": n}))
            .await;
        assert_eq!(ack.offline.as_deref(), Some(&["bob".to_owned()][..]));
        assert_eq!(ack.offsets.unwrap()["bob"], n);
    }
    let mut bob = server.connect("bob").await;
    // Sent after bob is registered: it must still come after the stored ones.
    alice
        .ack(json!({"type": "send", "to": ["bob"], "content": 6}))
        .await;
    for n in 1..=6u64 {
        let message = bob.next_message_event().await;
        assert_eq!(content_json(&message), json!(n));
        assert_eq!(message.offset, Some(n));
        assert_eq!(message.from, "alice");
    }
    bob.expect_nothing_queued().await;
}

#[tokio::test]
async fn acknowledged_inbox_entries_are_not_sent_again_to_any_connection() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    for n in 1..=3 {
        alice
            .ack(json!({"type": "send", "to": ["bob"], "content": n}))
            .await;
    }
    // Two devices connect before either acknowledges: both get everything.
    let mut phone = server.connect("bob").await;
    let mut laptop = server.connect("bob").await;
    for device in [&mut phone, &mut laptop] {
        for n in 1..=3 {
            assert_eq!(content_json(&device.next_message_event().await), json!(n));
        }
    }
    let ack = phone.ack(json!({"type": "ack", "inbox": 2})).await;
    assert_eq!(ack.inbox, Some(2));

    // A new connection gets only what nobody acknowledged.
    let mut tablet = server.connect("bob").await;
    let message = tablet.next_message_event().await;
    assert_eq!(message.offset, Some(3));
    tablet.expect_nothing_queued().await;

    // The mark never moves backwards.
    let ack = laptop.ack(json!({"type": "ack", "inbox": 1})).await;
    assert_eq!(ack.inbox, Some(2));
    laptop.ack(json!({"type": "ack", "inbox": 3})).await;
    let mut watch = server.connect("bob").await;
    watch.expect_nothing_queued().await;
}

#[tokio::test]
async fn acknowledging_past_the_newest_inbox_entry_is_refused() {
    let server = TestServer::start().await;
    let mut bob = server.connect("bob").await;
    let reply = bob.request(json!({"type": "ack", "inbox": 4})).await;
    let ServerEvent::Error(error) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(error.code, ErrorCode::InvalidField);
    assert!(error.message.contains("\"inbox\""), "{}", error.message);
}

#[tokio::test]
async fn the_senders_other_devices_get_a_copy_without_an_inbox_offset() {
    let server = TestServer::start().await;
    let mut phone = server.connect("alice").await;
    let mut laptop = server.connect("alice").await;
    phone
        .ack(json!({"type": "send", "to": ["bob"], "content": "hi"}))
        .await;
    let copy = laptop.next_message_event().await;
    assert_eq!(content_json(&copy), json!("hi"));
    assert_eq!(copy.offset, None);
}

#[tokio::test]
async fn a_message_sent_before_a_restart_reaches_the_recipient_after_it() {
    let data = tempfile::tempdir().unwrap();
    let first = TestServer::start_with(|config| config.store.path = data.path().to_owned()).await;
    let mut alice = first.connect("alice").await;
    let ack = alice
        .ack(json!({"type": "send", "to": ["bob"], "content": {"text": "while you were away"}}))
        .await;
    let id = ack.id.unwrap();
    drop(alice);
    first.stop().await;

    let second = TestServer::start_with(|config| config.store.path = data.path().to_owned()).await;
    let mut bob = second.connect("bob").await;
    let message = bob.next_message_event().await;
    assert_eq!(message.id, id);
    assert_eq!(
        content_json(&message),
        json!({"text": "while you were away"})
    );
    assert_eq!(message.offset, Some(1));
}
