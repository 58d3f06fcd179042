//! Bad input gets an error frame naming the problem and the connection stays open; oversized
//! frames, floods and slow consumers end the connection with their documented close codes.

mod common;

use common::{TestServer, content_of};
use futures::StreamExt;
use herald_protocol::{ErrorCode, ServerEvent};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

async fn error_for(
    client: &mut common::Client,
    frame: &str,
) -> (ErrorCode, String, Option<String>) {
    client.send_raw(WsMessage::text(frame)).await;
    match client.next_event().await {
        ServerEvent::Error(error) => (error.code, error.message, error.reference),
        other => panic!("expected an error for {frame}, got {other:?}"),
    }
}

#[tokio::test]
async fn every_bad_request_gets_its_error_code_and_the_connection_stays_open() {
    let server = TestServer::start().await;
    let mut client = server.connect("alice").await;
    let cases = [
        ("not json at all", ErrorCode::InvalidJson, None),
        ("[1, 2, 3]", ErrorCode::InvalidJson, None),
        (r#"{"id": "a"}"#, ErrorCode::UnknownType, Some("a")),
        (
            r#"{"type": "teleport", "id": "b"}"#,
            ErrorCode::UnknownType,
            Some("b"),
        ),
        (
            r#"{"type": "send", "content": 1, "id": "c"}"#,
            ErrorCode::InvalidField,
            Some("c"),
        ),
        (
            r#"{"type": "send", "to": "bob", "content": 1, "id": "d"}"#,
            ErrorCode::InvalidField,
            Some("d"),
        ),
        (
            r#"{"type": "join", "room": 7, "id": "e"}"#,
            ErrorCode::InvalidField,
            Some("e"),
        ),
        (
            r#"{"type": "join", "room": "has space", "id": "f"}"#,
            ErrorCode::InvalidField,
            Some("f"),
        ),
        (
            r#"{"type": "publish", "room": "r", "content": 1, "id": "g"}"#,
            ErrorCode::NotMember,
            Some("g"),
        ),
        (
            r#"{"type": "broadcast", "content": 1, "id": "h"}"#,
            ErrorCode::Forbidden,
            Some("h"),
        ),
        (
            r#"{"type": "auth", "token": "x", "id": "i"}"#,
            ErrorCode::Forbidden,
            Some("i"),
        ),
    ];
    for (frame, code, reference) in cases {
        let (got, message, got_ref) = error_for(&mut client, frame).await;
        assert_eq!(got, code, "{frame}: {message}");
        assert_eq!(got_ref.as_deref(), reference, "{frame}");
        assert!(!message.is_empty());
    }
    let (_, message, _) = error_for(
        &mut client,
        r#"{"type": "send", "to": "bob", "content": 1}"#,
    )
    .await;
    assert!(
        message.contains("\"to\""),
        "the message names the field: {message}"
    );
    // Still open and working.
    assert!(matches!(
        client.request(json!({"type": "ping"})).await,
        ServerEvent::Pong(_)
    ));
}

#[tokio::test]
async fn too_many_recipients_is_a_limit_error() {
    let server = TestServer::start_with(|c| c.limits.max_recipients = 2).await;
    let mut client = server.connect("alice").await;
    let error = client
        .request(json!({"type": "send", "to": ["a", "b", "c"], "content": 1}))
        .await;
    assert!(
        matches!(&error, ServerEvent::Error(e) if e.code == ErrorCode::LimitExceeded),
        "{error:?}"
    );
}

#[tokio::test]
async fn malformed_binary_frames_get_an_error_not_a_close() {
    let server = TestServer::start().await;
    let mut client = server.connect("alice").await;
    client.send_raw(WsMessage::binary(vec![0u8, 0])).await;
    let event = client.next_event().await;
    assert!(
        matches!(&event, ServerEvent::Error(e) if e.code == ErrorCode::InvalidJson),
        "{event:?}"
    );
    client
        .send_raw(WsMessage::binary(vec![0u8, 0, 0, 200, b'{']))
        .await;
    assert!(matches!(client.next_event().await, ServerEvent::Error(_)));
    assert!(matches!(
        client.request(json!({"type": "ping"})).await,
        ServerEvent::Pong(_)
    ));
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let server = TestServer::start_with(|c| c.limits.max_message_bytes = 1024).await;
    let mut client = server.connect("alice").await;
    // Exactly at the limit is fine.
    let at_limit = format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(1024 - 23));
    assert_eq!(at_limit.len(), 1024);
    client.send_raw(WsMessage::text(at_limit)).await;
    assert!(
        matches!(client.next_event().await, ServerEvent::Error(_)),
        "id too long, but read"
    );
    client.send_raw(WsMessage::text("x".repeat(1025))).await;
    let close = client.expect_close().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Size);
}

#[tokio::test]
async fn flooding_gets_rate_limited_errors_then_a_1008_close() {
    let server = TestServer::start_with(|c| {
        c.limits.messages_per_second = 1;
        c.limits.burst = 2;
        c.limits.abuse_threshold = 5;
    })
    .await;
    let mut client = server.connect("alice").await;
    for i in 0..20 {
        client
            .send_raw(WsMessage::text(format!(r#"{{"type":"ping","id":"p{i}"}}"#)))
            .await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    let close = loop {
        match client.ws.next().await {
            Some(Ok(WsMessage::Text(text))) => match ServerEvent::decode(&text).unwrap() {
                ServerEvent::Pong(_) => pongs += 1,
                ServerEvent::Error(e) if e.code == ErrorCode::RateLimited => limited += 1,
                other => panic!("{other:?}"),
            },
            Some(Ok(WsMessage::Close(frame))) => break frame.expect("a close code"),
            Some(Ok(_)) => {}
            other => panic!("connection ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::Policy);
    assert!(
        pongs >= 2,
        "the burst is served (pongs {pongs}, limited {limited})"
    );
    assert!(limited >= 1, "refusals are announced before the close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_while_a_fast_one_receives_everything() {
    const MESSAGES: usize = 400;
    /// The publisher waits for the fast reader every WINDOW messages, so the fast reader's
    /// outbox (QUEUE deep) never fills, whatever the speed of this machine.
    const WINDOW: usize = 16;
    const QUEUE: usize = 32;
    let server = TestServer::start_with(|c| {
        c.limits.send_queue = QUEUE;
        c.limits.max_message_bytes = 128 * 1024;
        c.limits.messages_per_second = 100_000;
        c.limits.burst = 100_000;
        common::presence_on(c);
    })
    .await;
    let mut publisher = server.connect("publisher").await;
    let mut fast = server.connect("fast").await;
    let mut slow = server.connect("slow").await;
    for client in [&mut publisher, &mut fast, &mut slow] {
        client.join("feed").await;
    }

    let (progress, mut fast_received) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let mut received = Vec::new();
        let mut slow_left = false;
        while received.len() < MESSAGES || !slow_left {
            match fast.next_event().await {
                ServerEvent::Message(message) => {
                    received.push(message);
                    progress.send_replace(received.len());
                }
                ServerEvent::PresenceDiff(diff)
                    if diff.left.iter().flatten().any(|user| user == "slow") =>
                {
                    slow_left = true
                }
                _ => {}
            }
        }
        received
    });

    // 64 KiB per message, 25 MiB in all: far more than the loopback socket buffers hold.
    let blob = "x".repeat(64 * 1024);
    for n in 0..MESSAGES {
        publisher
            .send_json(json!({"type": "publish", "room": "feed", "content": {"n": n, "blob": blob}, "echo": false}))
            .await;
        if (n + 1) % WINDOW == 0 {
            fast_received.wait_for(|got| *got > n).await.unwrap();
        }
    }
    let received = reader.await.unwrap();
    for (n, message) in received.iter().enumerate() {
        let content = content_of(&ServerEvent::Message(message.clone()));
        assert_eq!(content["n"], json!(n), "in order, none missing");
    }

    // The slow client finds its stream ended well before all messages.
    let mut slow_got = 0;
    loop {
        match tokio::time::timeout(common::EVENT_TIMEOUT, slow.ws.next())
            .await
            .unwrap()
        {
            Some(Ok(WsMessage::Text(_))) => slow_got += 1,
            Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
            Some(Ok(_)) => {}
        }
    }
    assert!(
        slow_got < MESSAGES,
        "the slow consumer was cut off (got {slow_got})"
    );
}

/// A direct message costs the rate limit one unit per distinct recipient: one client cannot
/// make the store and the fan-out do 100 deliveries per frame at the frame rate.
#[tokio::test]
async fn a_direct_message_costs_the_rate_limit_per_recipient() {
    let server = TestServer::start_with(|c| {
        c.limits.messages_per_second = 1;
        c.limits.burst = 11;
        c.limits.max_recipients = 20;
    })
    .await;
    let mut client = server.connect("alice").await;
    let ten: Vec<String> = (0..10).map(|n| format!("friend{n}")).collect();
    // Ten recipients (one named twice) take ten of the eleven units...
    let mut to = ten.clone();
    to.push("friend0".into());
    match client
        .request(json!({"type": "send", "to": to, "content": "hi"}))
        .await
    {
        ServerEvent::Ack(ack) => assert!(ack.offsets.is_some()),
        other => panic!("{other:?}"),
    }
    // ...so the next one to ten gets its frame's unit but not the nine more it needs.
    match client
        .request(json!({"type": "send", "to": ten, "content": "again"}))
        .await
    {
        ServerEvent::Error(error) => {
            assert_eq!(error.code, ErrorCode::RateLimited);
            assert!(error.message.contains("per recipient"), "{}", error.message);
        }
        other => panic!("{other:?}"),
    }
    // More recipients than the burst can ever hold is a limit, not a wait.
    let twenty: Vec<String> = (0..20).map(|n| format!("friend{n}")).collect();
    // The bucket is empty: the next frame needs the unit that refills in a second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    match client
        .request(json!({"type": "send", "to": twenty, "content": "all"}))
        .await
    {
        ServerEvent::Error(error) => {
            assert_eq!(error.code, ErrorCode::LimitExceeded, "{}", error.message);
            assert!(error.message.contains("limits.burst"), "{}", error.message);
        }
        other => panic!("{other:?}"),
    }
}
