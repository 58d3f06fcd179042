//! Direct messages between users, across all of each user's connections.

mod common;

use common::{TestServer, content_of};
use herald_protocol::ServerEvent;
use serde_json::json;

#[tokio::test]
async fn direct_message_reaches_one_recipient_with_the_authenticated_sender() {
    let server = TestServer::start().await;
    let mut carol = server.connect("carol").await;
    let mut alice = server.connect("alice").await;

    // A forged "from" is ignored: the server always names the authenticated user.
    let ack = carol
        .request(
            json!({"type": "send", "to": ["alice"], "from": "mallory", "content": {"text": "hi"}}),
        )
        .await;
    let ServerEvent::Ack(ack) = ack else {
        panic!("{ack:?}")
    };
    assert_eq!(ack.online.as_deref(), Some(&["alice".to_owned()][..]));
    assert_eq!(ack.offline.as_deref(), Some(&[][..]));

    let event = alice.next_event().await;
    let ServerEvent::Message(message) = &event else {
        panic!("{event:?}")
    };
    assert_eq!(message.from, "carol");
    assert_eq!(message.to.as_deref(), Some(&["alice".to_owned()][..]));
    assert_eq!(Some(&message.id), ack.id.as_ref());
    assert!(message.ts > 0);
    assert_eq!(content_of(&event), json!({"text": "hi"}));
}

#[tokio::test]
async fn direct_message_reaches_three_users_and_reports_the_offline_one() {
    let server = TestServer::start().await;
    let mut sender = server.connect("sender").await;
    let mut users = Vec::new();
    for name in ["u1", "u2", "u3"] {
        users.push(server.connect(name).await);
    }
    let ack = sender
        .request(json!({"type": "send", "to": ["u1", "u2", "u3", "ghost"], "content": 42}))
        .await;
    let ServerEvent::Ack(ack) = ack else {
        panic!("{ack:?}")
    };
    assert_eq!(ack.online.unwrap(), ["u1", "u2", "u3"]);
    assert_eq!(ack.offline.unwrap(), ["ghost"]);
    for user in &mut users {
        let event = user.next_event().await;
        assert_eq!(content_of(&event), json!(42));
    }
}

#[tokio::test]
async fn direct_message_reaches_every_connection_of_the_recipient_and_the_senders_other_devices() {
    let server = TestServer::start().await;
    let mut phone = server.connect("carol").await;
    let mut laptop = server.connect("carol").await;
    let mut tabs = Vec::new();
    for _ in 0..3 {
        tabs.push(server.connect("alice").await);
    }
    let ack = phone
        .request(json!({"type": "send", "to": ["alice"], "content": "multi"}))
        .await;
    assert!(matches!(ack, ServerEvent::Ack(_)));
    for tab in &mut tabs {
        assert_eq!(content_of(&tab.next_event().await), json!("multi"));
    }
    // The sender's other device gets a copy...
    assert_eq!(content_of(&laptop.next_event().await), json!("multi"));
    // ...and the sending connection gets only its ack: the next thing it sees is its pong.
    let pong = phone.request(json!({"type": "ping"})).await;
    assert!(matches!(pong, ServerEvent::Pong(_)), "{pong:?}");
}

#[tokio::test]
async fn binary_direct_message_keeps_its_bytes() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let server = TestServer::start().await;
    let mut carol = server.connect("carol").await;
    let mut alice = server.connect("alice").await;
    let header = br#"{"type":"send","to":["alice"]}"#;
    let payload = [0u8, 159, 146, 150, 255];
    let frame = herald_protocol::binary::join(header, &payload);
    carol.send_raw(WsMessage::binary(frame.to_vec())).await;

    let message = alice.ws.next().await.unwrap().unwrap();
    let WsMessage::Binary(bytes) = message else {
        panic!("{message:?}")
    };
    let (header, body) = ServerEvent::decode_binary(&bytes).unwrap();
    assert_eq!(header.from, "carol");
    assert!(header.content.is_none());
    assert_eq!(&body[..], &payload);
}
