//! Authentication by the first message, for clients that cannot put a token in the URL.

mod common;

use std::time::Duration;

use common::pending::Pending;
use common::{TestServer, handshake, refusal};
use futures::{FutureExt, StreamExt};
use herald_protocol::{ErrorCode, ServerEvent};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn a_valid_auth_message_gets_the_same_welcome_as_a_handshake_token() {
    let server = TestServer::start().await;
    let mut pending = Pending::open(&server).await;
    pending
        .send(json!({"type": "auth", "token": server.token("alice"), "id": "a1"}))
        .await;
    let welcome = pending.next_event().await;
    let ServerEvent::Welcome(welcome) = welcome else {
        panic!("{welcome:?}")
    };
    assert_eq!(welcome.user, "alice");
    assert_eq!(welcome.conn.len(), 16);

    // Fully functional afterwards.
    let mut bob = server.connect("bob").await;
    pending
        .send(json!({"type": "send", "to": ["bob"], "content": "hello"}))
        .await;
    let event = bob.next_event().await;
    assert_eq!(common::content_of(&event), json!("hello"));
}

#[tokio::test]
async fn frames_before_auth_are_refused_and_not_acted_on() {
    let server = TestServer::start().await;
    let mut bob = server.connect("bob").await;
    let mut pending = Pending::open(&server).await;
    pending
        .send(json!({"type": "send", "to": ["bob"], "content": "sneaky", "id": "s1"}))
        .await;
    let refused = pending.next_event().await;
    let ServerEvent::Error(error) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(error.code, ErrorCode::Unauthenticated);
    assert_eq!(error.reference.as_deref(), Some("s1"));
    pending.send(json!({"type": "nonsense"})).await;
    assert!(
        matches!(pending.next_event().await, ServerEvent::Error(e) if e.code == ErrorCode::Unauthenticated)
    );

    // Nothing reached bob: the first thing he sees is the answer to his own ping.
    assert!(matches!(
        bob.request(json!({"type": "ping"})).await,
        ServerEvent::Pong(_)
    ));
    assert!(
        bob.ws.next().now_or_never().is_none(),
        "and nothing after it"
    );
}

#[tokio::test]
async fn a_bad_token_gets_an_error_and_a_good_one_still_works_after_it() {
    let server = TestServer::start().await;
    let mut pending = Pending::open(&server).await;
    pending
        .send(json!({"type": "auth", "token": "bad", "id": "a1"}))
        .await;
    let error = pending.next_event().await;
    assert!(
        matches!(&error, ServerEvent::Error(e) if e.code == ErrorCode::Unauthenticated && e.reference.as_deref() == Some("a1")),
        "{error:?}"
    );
    pending
        .send(json!({"type": "auth", "token": server.token("alice")}))
        .await;
    assert!(matches!(
        pending.next_event().await,
        ServerEvent::Welcome(_)
    ));
}

#[tokio::test]
async fn running_out_of_auth_attempts_closes_with_4102() {
    let server = TestServer::start_with(|c| c.auth.max_attempts = 2).await;
    let mut pending = Pending::open(&server).await;
    pending.send(json!({"type": "auth", "token": "bad1"})).await;
    pending.send(json!({"type": "auth", "token": "bad2"})).await;
    let close = pending.expect_close().await;
    assert_eq!(close.code, CloseCode::from(4102));
}

#[tokio::test]
async fn no_auth_within_the_timeout_closes_with_4101() {
    let server = TestServer::start_with(|c| c.auth.timeout = Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let mut pending = Pending::open(&server).await;
    let close = pending.expect_close().await;
    assert_eq!(close.code, CloseCode::from(4101));
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn pending_connections_are_limited_per_ip_and_in_total() {
    let per_ip = TestServer::start_with(|c| c.limits.max_pending_auth_per_ip = 2).await;
    let _one = Pending::open(&per_ip).await;
    let _two = Pending::open(&per_ip).await;
    let refused = refusal(per_ip.url("/ws").into_client_request().unwrap()).await;
    assert_eq!(refused.status, 429);
    // Authenticated handshakes are not pending and not limited by it.
    per_ip.connect("alice").await;

    let total = TestServer::start_with(|c| c.limits.max_pending_auth = 1).await;
    let mut first = Pending::open(&total).await;
    let refused = refusal(total.url("/ws").into_client_request().unwrap()).await;
    assert_eq!(refused.status, 503);
    // Authenticating frees the place.
    first
        .send(json!({"type": "auth", "token": total.token("alice")}))
        .await;
    assert!(matches!(first.next_event().await, ServerEvent::Welcome(_)));
    Pending::open(&total).await;
}

#[tokio::test]
async fn rooms_named_at_connect_are_joined_after_auth_within_the_claim() {
    let server = TestServer::start().await;
    let request = server
        .url("/ws?rooms=open,closed")
        .into_client_request()
        .unwrap();
    let ws = handshake(request).await.unwrap();
    let mut pending = Pending { ws };
    let token = server.token_with("alice", false, Some(vec!["open"]), Duration::from_secs(60));
    pending.send(json!({"type": "auth", "token": token})).await;
    assert!(matches!(
        pending.next_event().await,
        ServerEvent::Welcome(_)
    ));
    let refused = pending.next_event().await;
    assert!(
        matches!(&refused, ServerEvent::Error(e) if e.code == ErrorCode::Forbidden && e.message.contains("closed")),
        "{refused:?}"
    );
    let mut other = server.connect("bob").await;
    let members = other
        .request(json!({"type": "members", "room": "open"}))
        .await;
    assert!(matches!(members, ServerEvent::Members(m) if m.users == ["alice"]));
}

#[tokio::test]
async fn message_auth_can_be_turned_off() {
    let server = TestServer::start_with(|c| c.auth.message_auth = false).await;
    let refused = refusal(server.url("/ws").into_client_request().unwrap()).await;
    assert_eq!(refused.status, 401);
}
