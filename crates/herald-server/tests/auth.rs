//! Authentication at the handshake: every token source, every refusal.

mod common;

use std::time::Duration;

use common::{Client, SECRET, TestServer, handshake, next_frame, refusal};
use futures::SinkExt;
use herald_protocol::ServerEvent;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

fn request(url: &str) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    url.into_client_request().unwrap()
}

async fn refusal_status(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> (u16, String) {
    let refusal = refusal(request).await;
    (refusal.status, refusal.body)
}

#[tokio::test]
async fn token_is_accepted_from_the_query_string() {
    let server = TestServer::start().await;
    let client = server.connect("alice").await;
    assert_eq!(client.welcome.user, "alice");
    assert_eq!(client.welcome.node, server.node.id().as_ref());
    assert_eq!(client.welcome.heartbeat, 25);
    assert_eq!(client.welcome.conn.len(), 16);
}

#[tokio::test]
async fn token_is_accepted_from_the_authorization_header() {
    let server = TestServer::start().await;
    let mut req = request(&server.url("/ws"));
    let value = format!("Bearer {}", server.token("bob"));
    req.headers_mut()
        .insert("authorization", HeaderValue::from_str(&value).unwrap());
    let client = Client::open_request(req).await.unwrap();
    assert_eq!(client.welcome.user, "bob");
}

#[tokio::test]
async fn token_is_accepted_from_the_subprotocol_and_herald_is_selected() {
    let server = TestServer::start().await;
    let mut req = request(&server.url("/ws"));
    let value = format!("herald, herald.bearer.{}", server.token("carol"));
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&value).unwrap(),
    );
    let (ws, response) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "herald"
    );
    drop(ws);
}

#[tokio::test]
async fn missing_token_is_refused_with_401() {
    let server = TestServer::start_with(|c| c.auth.message_auth = false).await;
    let (status, body) = refusal_status(request(&server.url("/ws"))).await;
    assert_eq!(status, 401);
    assert!(body.contains("no token"), "{body}");
}

#[tokio::test]
async fn expired_token_is_refused_with_401() {
    let server = TestServer::start().await;
    let claims = json!({"sub": "alice", "exp": herald_server::auth::unix_now() - 60});
    let token = jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (status, body) = refusal_status(request(&server.url(&format!("/ws?token={token}")))).await;
    assert_eq!(status, 401);
    assert!(body.contains("expired"), "{body}");
}

#[tokio::test]
async fn badly_signed_token_is_refused_with_401() {
    let server = TestServer::start().await;
    let claims = json!({"sub": "alice", "exp": herald_server::auth::unix_now() + 60});
    let token = jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(b"not-the-server-secret"),
    )
    .unwrap();
    let (status, _) = refusal_status(request(&server.url(&format!("/ws?token={token}")))).await;
    assert_eq!(status, 401);

    let (status, _) = refusal_status(request(&server.url("/ws?token=garbage"))).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn alg_none_token_is_refused_with_401() {
    let server = TestServer::start().await;
    // {"alg":"none","typ":"JWT"}.{"sub":"mallory","exp":9999999999}. with no signature
    let token =
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo5OTk5OTk5OTk5fQ.";
    let (status, _) = refusal_status(request(&server.url(&format!("/ws?token={token}")))).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_with_a_public_key_file() {
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("public.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let server = TestServer::start_with(|c| {
        c.auth.secret = None;
        c.auth.public_key = Some(public.clone());
        c.auth.algorithm = Some("ES256".into());
    })
    .await;
    let claims = json!({"sub": "erin", "exp": herald_server::auth::unix_now() + 60});
    let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let token = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &signing,
    )
    .unwrap();
    let client = Client::open(&server.url(&format!("/ws?token={token}"))).await;
    assert_eq!(client.welcome.user, "erin");

    // An HS256 token is refused by a server configured for ES256 (no algorithm confusion).
    let hs = jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(key.public_key_pem().as_bytes()),
    )
    .unwrap();
    let (status, _) = refusal_status(request(&server.url(&format!("/ws?token={hs}")))).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn anonymous_users_are_accepted_only_when_enabled() {
    let closed = TestServer::start_with(|c| c.auth.message_auth = false).await;
    let (status, _) = refusal_status(request(&closed.url("/ws?user=dev"))).await;
    assert_eq!(status, 401);

    let open = TestServer::start_with(|c| c.auth.anonymous = true).await;
    let client = Client::open(&open.url("/ws?user=dev")).await;
    assert_eq!(client.welcome.user, "dev");
}

#[tokio::test]
async fn cross_site_origin_is_refused_unless_allowed() {
    let server = TestServer::start().await;
    let url = server.url(&format!("/ws?token={}", server.token("alice")));
    let mut req = request(&url);
    req.headers_mut()
        .insert("origin", HeaderValue::from_static("https://evil.example"));
    let (status, body) = refusal_status(req).await;
    assert_eq!(status, 403);
    assert!(body.contains("origin"), "{body}");

    // The server's own origin is always allowed.
    let mut req = request(&url);
    let own = format!("http://{}", server.addr);
    req.headers_mut()
        .insert("origin", HeaderValue::from_str(&own).unwrap());
    Client::open_request(req).await.unwrap();

    let allowing = TestServer::start_with(|c| {
        c.limits.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let url = allowing.url(&format!("/ws?token={}", allowing.token("alice")));
    let mut req = request(&url);
    req.headers_mut()
        .insert("origin", HeaderValue::from_static("https://app.example"));
    Client::open_request(req).await.unwrap();
}

#[tokio::test]
async fn rooms_claim_limits_joins_publishes_and_rooms_at_connect() {
    let server = TestServer::start().await;
    let mut limited = server
        .connect_with("lim", false, Some(vec!["allowed"]))
        .await;
    let ok = limited.join("allowed").await;
    assert!(matches!(ok, ServerEvent::Ack(_)), "{ok:?}");
    let refused = limited.join("secret").await;
    let ServerEvent::Error(error) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(error.code, herald_protocol::ErrorCode::Forbidden);

    let token = server.token_with("lim", false, Some(vec!["allowed"]), Duration::from_secs(60));
    let (status, body) =
        refusal_status(request(&server.url(&format!("/ws/secret?token={token}")))).await;
    assert_eq!(status, 403);
    assert!(body.contains("secret"), "{body}");
}

#[tokio::test]
async fn connections_per_user_are_limited() {
    let server = TestServer::start_with(|c| c.limits.max_connections_per_user = 2).await;
    let _one = server.connect("alice").await;
    let _two = server.connect("alice").await;
    let (status, _) = refusal_status(request(
        &server.url(&format!("/ws?token={}", server.token("alice"))),
    ))
    .await;
    assert_eq!(status, 429);
    // Other users are unaffected.
    server.connect("bob").await;
}

/// The per-user limit is checked at the handshake and again when the connection registers, so
/// concurrent handshakes can pass the first check and lose the second. The loser must get
/// 1013 with nothing before it: a `welcome` it then loses would tell the client it was in.
#[tokio::test]
async fn a_connection_refused_after_the_upgrade_gets_no_welcome_before_its_close() {
    const ATTEMPTS: usize = 24;
    let server = TestServer::start_with(|c| c.limits.max_connections_per_user = 1).await;
    let url = server.url(&format!("/ws?token={}", server.token("alice")));
    let attempts = (0..ATTEMPTS).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let Ok(mut ws) = handshake(url.into_client_request().unwrap()).await else {
                return None; // 429 at the handshake
            };
            match next_frame(&mut ws).await {
                WsMessage::Text(text) => {
                    assert!(text.contains("\"welcome\""), "{text}");
                    Some(Ok(ws))
                }
                WsMessage::Close(frame) => Some(Err(frame.map(|f| u16::from(f.code)))),
                other => panic!("unexpected first message {other:?}"),
            }
        })
    });
    let mut welcomed = Vec::new();
    let mut refused_after_upgrade = 0;
    for outcome in futures::future::join_all(attempts).await {
        match outcome.unwrap() {
            None => {}
            Some(Ok(ws)) => welcomed.push(ws),
            Some(Err(code)) => {
                assert_eq!(code, Some(1013), "refused after the upgrade with 1013");
                refused_after_upgrade += 1;
            }
        }
    }
    // Every welcomed connection is really in: it answers a request instead of closing.
    for ws in &mut welcomed {
        ws.send(WsMessage::text(r#"{"type":"ping","id":"p"}"#))
            .await
            .unwrap();
        loop {
            match next_frame(ws).await {
                WsMessage::Text(text) => {
                    assert!(text.contains("\"pong\""), "{text}");
                    break;
                }
                WsMessage::Close(frame) => panic!("welcomed, then closed: {frame:?}"),
                _ => continue,
            }
        }
    }
    assert_eq!(welcomed.len(), 1, "one connection admitted");
    eprintln!("refused after the upgrade: {refused_after_upgrade} of {ATTEMPTS}");
}
