//! What the server reads from a token besides `sub`: `exp` (however far away), `nbf`, `iss`,
//! and the `direct` claim that completes what `rooms` limits.

mod common;

use common::{Client, SECRET, TestServer, refusal};
use herald_protocol::{ErrorCode, ServerEvent};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn sign(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    herald_server::auth::unix_now()
}

/// An `exp` whose milliseconds pass 2^62, the range of the connection's packed expiry.
const FAR_FUTURE_EXP: u64 = (1 << 62) / 1000 + 1;

#[tokio::test]
async fn a_token_expiring_in_the_far_future_does_not_expire_at_once() {
    let server = TestServer::start().await;
    let token = sign(json!({"sub": "alice", "exp": FAR_FUTURE_EXP}));
    let mut alice = Client::open(&server.url(&format!("/ws?token={token}"))).await;
    // A connection whose expiry wrapped into the past is closed with 4100 right after the
    // welcome, before it can answer this.
    alice.expect_nothing_queued().await;
    let token = sign(json!({"sub": "alice", "exp": u64::MAX}));
    let mut again = Client::open(&server.url(&format!("/ws?token={token}"))).await;
    again.expect_nothing_queued().await;
}

#[tokio::test]
async fn a_token_before_its_nbf_is_refused_at_the_handshake() {
    let server = TestServer::start().await;
    let early = sign(json!({"sub": "alice", "exp": now() + 600, "nbf": now() + 300}));
    let refused = refusal(
        server
            .url(&format!("/ws?token={early}"))
            .into_client_request()
            .unwrap(),
    )
    .await;
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("nbf"), "{}", refused.body);
}

#[tokio::test]
async fn with_an_issuer_configured_tokens_of_other_issuers_are_refused() {
    let server =
        TestServer::start_with(|c| c.auth.issuer = Some("https://id.example".into())).await;
    let exp = now() + 600;
    for (claims, accepted) in [
        (
            json!({"sub": "alice", "exp": exp, "iss": "https://id.example"}),
            true,
        ),
        (
            json!({"sub": "alice", "exp": exp, "iss": "https://elsewhere.example"}),
            false,
        ),
        (json!({"sub": "alice", "exp": exp}), false),
    ] {
        let token = sign(claims.clone());
        let request = server
            .url(&format!("/ws?token={token}"))
            .into_client_request()
            .unwrap();
        match common::handshake(request).await {
            Ok(_) => assert!(accepted, "{claims} was accepted"),
            Err(refused) => {
                assert!(!accepted, "{claims} was refused: {}", refused.body);
                assert_eq!(refused.status, 401);
            }
        }
    }
}

#[tokio::test]
async fn a_token_without_direct_may_not_name_other_users_but_still_receives() {
    let server = TestServer::start().await;
    let token =
        sign(json!({"sub": "kiosk", "exp": now() + 600, "rooms": ["lobby"], "direct": false}));
    let mut kiosk = Client::open(&server.url(&format!("/ws?token={token}"))).await;
    for request in [
        json!({"type": "send", "to": ["bob"], "content": "hi"}),
        json!({"type": "presence", "users": ["bob"]}),
        json!({"type": "history", "with": "bob"}),
    ] {
        let answer = kiosk.request(request.clone()).await;
        assert!(
            matches!(&answer, ServerEvent::Error(e) if e.code == ErrorCode::Forbidden),
            "{request}: {answer:?}"
        );
    }
    assert!(matches!(kiosk.join("lobby").await, ServerEvent::Ack(_)));

    let mut bob = server.connect("bob").await;
    bob.ack(json!({"type": "send", "to": ["kiosk"], "content": "to the kiosk"}))
        .await;
    let message = kiosk.next_message_event().await;
    assert_eq!(common::content_json(&message), json!("to the kiosk"));
}
