//! A connection that has not authenticated yet may only authenticate: every other frame it
//! sends is answered, and counted, and past `auth.max_attempts` of them it is closed.

mod common;

use common::TestServer;
use common::pending::Pending;
use futures::SinkExt;
use herald_protocol::{ErrorCode, ServerEvent};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn a_flood_of_frames_before_auth_is_answered_a_bounded_number_of_times_then_closed_1008() {
    let server = TestServer::start_with(|c| c.auth.max_attempts = 3).await;
    let mut pending = Pending::open(&server).await;
    for n in 0..200 {
        let frame = json!({"type": "join", "room": "lobby", "id": format!("j{n}")});
        // The server closes the socket part way; a refused write ends the flood.
        if pending
            .ws
            .feed(WsMessage::text(frame.to_string()))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = pending.ws.flush().await;
    let (answers, close) = pending.events_until_close().await;
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|e| matches!(e, ServerEvent::Error(e) if e.code == ErrorCode::Unauthenticated))
    );
}

#[tokio::test]
async fn invalid_json_and_binary_frames_before_auth_count_too() {
    let server = TestServer::start_with(|c| c.auth.max_attempts = 2).await;
    let mut pending = Pending::open(&server).await;
    pending.ws.send(WsMessage::text("{not json")).await.unwrap();
    pending
        .ws
        .send(WsMessage::binary(vec![0u8, 0, 0, 2, b'{', b'}']))
        .await
        .unwrap();
    let (answers, close) = pending.events_until_close().await;
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(answers.len(), 2, "{answers:?}");
}

#[tokio::test]
async fn a_client_that_authenticates_within_its_allowance_is_welcomed() {
    let server = TestServer::start_with(|c| c.auth.max_attempts = 2).await;
    let mut pending = Pending::open(&server).await;
    pending.send(json!({"type": "ping", "id": "p"})).await;
    assert!(matches!(pending.next_event().await, ServerEvent::Error(_)));
    pending
        .send(json!({"type": "auth", "token": server.token("alice")}))
        .await;
    assert!(matches!(
        pending.next_event().await,
        ServerEvent::Welcome(_)
    ));
}
