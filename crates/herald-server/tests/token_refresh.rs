//! Token refresh in place: notice before `exp`, refresh with a new token, expiry without one.

mod common;

use std::time::Duration;

use common::{Client, TestServer};
use herald_protocol::{ErrorCode, ServerEvent};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Waits (by the wall clock, which is what `exp` is read on) until a Unix second has passed.
async fn until_unix_second_passed(second: u64) {
    let now_ms = herald_server::hub::control::unix_ms();
    let target_ms = (second + 1) * 1000 + 100;
    tokio::time::sleep(Duration::from_millis(target_ms.saturating_sub(now_ms))).await;
}

fn exp_of(server: &TestServer, token: &str) -> u64 {
    server
        .node
        .auth()
        .verify(token)
        .unwrap()
        .expires_at
        .unwrap()
}

#[tokio::test]
async fn a_refresh_notice_comes_before_exp_and_a_refresh_extends_the_connection() {
    let server = TestServer::start_with(|c| c.auth.refresh_notice = Duration::from_secs(1)).await;
    let short = server.token_with("alice", false, None, Duration::from_secs(2));
    let first_exp = exp_of(&server, &short);
    let mut alice = Client::open(&server.url(&format!("/ws?token={short}"))).await;

    let notice = alice
        .next_matching(|e| matches!(e, ServerEvent::Refresh(_)))
        .await;
    let ServerEvent::Refresh(notice) = notice else {
        unreachable!()
    };
    assert!(notice.expires_in <= 1, "{notice:?}");

    let fresh = server.token_with("alice", false, None, Duration::from_secs(60));
    let ack = alice
        .request(json!({"type": "refresh", "token": fresh}))
        .await;
    assert!(matches!(ack, ServerEvent::Ack(_)), "{ack:?}");

    until_unix_second_passed(first_exp).await;
    assert!(matches!(
        alice.request(json!({"type": "ping"})).await,
        ServerEvent::Pong(_)
    ));
}

#[tokio::test]
async fn without_a_refresh_the_connection_closes_with_token_expired() {
    let server = TestServer::start_with(|c| c.auth.refresh_notice = Duration::from_secs(1)).await;
    let short = server.token_with("alice", false, None, Duration::from_secs(1));
    let mut alice = Client::open(&server.url(&format!("/ws?token={short}"))).await;
    let close = alice.expect_close().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::from(4100));
}

#[tokio::test]
async fn a_token_for_another_user_is_refused_and_the_connection_is_unchanged() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mallory = server.token("mallory");
    let refused = alice
        .request(json!({"type": "refresh", "token": mallory}))
        .await;
    assert!(
        matches!(&refused, ServerEvent::Error(e) if e.code == ErrorCode::Forbidden),
        "{refused:?}"
    );
    let garbage = alice
        .request(json!({"type": "refresh", "token": "garbage"}))
        .await;
    assert!(
        matches!(&garbage, ServerEvent::Error(e) if e.code == ErrorCode::Unauthenticated),
        "{garbage:?}"
    );

    let mut bob = server.connect("bob").await;
    alice
        .request(json!({"type": "send", "to": ["bob"], "content": "still me"}))
        .await;
    let event = bob.next_event().await;
    let ServerEvent::Message(message) = event else {
        panic!()
    };
    assert_eq!(message.from, "alice");
}

#[tokio::test]
async fn a_narrowed_rooms_claim_leaves_the_rooms_no_longer_allowed() {
    let server = TestServer::start_with(common::presence_on).await;
    let mut alice = server
        .connect_with("alice", false, Some(vec!["a", "b"]))
        .await;
    let mut bob = server.connect("bob").await;
    bob.join("b").await;
    alice.join("a").await;
    alice.join("b").await;
    bob.diff_listing("b", "alice", true).await;

    let narrowed = server.token_with("alice", false, Some(vec!["a"]), Duration::from_secs(60));
    let ack = alice
        .request(json!({"type": "refresh", "token": narrowed}))
        .await;
    assert!(matches!(ack, ServerEvent::Ack(_)), "{ack:?}");
    let left = bob.diff_listing("b", "alice", false).await;
    assert_eq!(left.count, 1);

    let refused = alice
        .request(json!({"type": "publish", "room": "b", "content": 1}))
        .await;
    assert!(
        matches!(&refused, ServerEvent::Error(e) if e.code == ErrorCode::NotMember),
        "{refused:?}"
    );
    let allowed = alice
        .request(json!({"type": "publish", "room": "a", "content": 1}))
        .await;
    assert!(matches!(allowed, ServerEvent::Ack(_)));
}

#[tokio::test]
async fn admin_is_granted_and_withdrawn_by_refresh() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let refused = alice
        .request(json!({"type": "broadcast", "content": 1}))
        .await;
    assert!(matches!(refused, ServerEvent::Error(_)));

    let admin = server.token_with("alice", true, None, Duration::from_secs(60));
    alice
        .request(json!({"type": "refresh", "token": admin}))
        .await;
    let ok = alice
        .request(json!({"type": "broadcast", "content": 1}))
        .await;
    assert!(matches!(ok, ServerEvent::Ack(_)), "{ok:?}");

    let plain = server.token("alice");
    alice
        .request(json!({"type": "refresh", "token": plain}))
        .await;
    let refused = alice
        .request(json!({"type": "broadcast", "content": 2}))
        .await;
    assert!(
        matches!(&refused, ServerEvent::Error(e) if e.code == ErrorCode::Forbidden),
        "{refused:?}"
    );
}
