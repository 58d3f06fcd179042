//! Devices: a connection opened with `?device=ID` reads and moves that device's own inbox mark,
//! so every device of a user receives every direct message once, whatever the others
//! acknowledged; connections without an id share the user's mark.

mod common;

use common::{Client, TestServer, content_json};
use serde_json::json;

async fn connect_device(server: &TestServer, user: &str, device: &str) -> Client {
    let token = server.token(user);
    Client::open(&server.url(&format!("/ws?token={token}&device={device}"))).await
}

async fn expect_entries(client: &mut Client, offsets: &[u64]) {
    for &offset in offsets {
        let message = client.next_message_event().await;
        assert_eq!(message.offset, Some(offset));
        assert_eq!(content_json(&message), json!(offset));
    }
    client.expect_nothing_queued().await;
}

#[tokio::test]
async fn a_device_gets_what_another_device_acknowledged_while_it_was_away() {
    let server = TestServer::start().await;
    // The phone has been seen before the messages arrive.
    connect_device(&server, "bob", "phone")
        .await
        .expect_nothing_queued()
        .await;

    let mut alice = server.connect("alice").await;
    for n in 1..=3 {
        alice
            .ack(json!({"type": "send", "to": ["bob"], "content": n}))
            .await;
    }
    let mut laptop = connect_device(&server, "bob", "laptop").await;
    expect_entries(&mut laptop, &[1, 2, 3]).await;
    let ack = laptop.ack(json!({"type": "ack", "inbox": 3})).await;
    assert_eq!(ack.inbox, Some(3));
    drop(laptop);

    let mut phone = connect_device(&server, "bob", "phone").await;
    expect_entries(&mut phone, &[1, 2, 3]).await;
    let ack = phone.ack(json!({"type": "ack", "inbox": 2})).await;
    assert_eq!(ack.inbox, Some(2), "the phone's own mark");
    drop(phone);

    // Each device resumes from its own mark.
    let mut phone = connect_device(&server, "bob", "phone").await;
    expect_entries(&mut phone, &[3]).await;
    let mut laptop = connect_device(&server, "bob", "laptop").await;
    laptop.expect_nothing_queued().await;
    // A connection without a device id shares the user's mark, which every ack raised.
    let mut plain = server.connect("bob").await;
    plain.expect_nothing_queued().await;
}

#[tokio::test]
async fn an_invalid_device_id_is_refused_at_the_handshake() {
    let server = TestServer::start().await;
    let token = server.token("bob");
    let refusal = common::refusal(
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            server.url(&format!("/ws?token={token}&device=a%20b")),
        )
        .unwrap(),
    )
    .await;
    assert_eq!(refusal.status, 400);
    assert!(refusal.body.contains("device"), "{}", refusal.body);
}
