//! User and room names that would display like another name (zero-width characters) or
//! rearrange the text around them (bidi controls) are refused wherever a name comes in.

mod common;

use common::{SECRET, TestServer, refusal};
use herald_protocol::{ErrorCode, ServerEvent};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const LOOKALIKES: [&str; 4] = [
    "alice\u{200B}",
    "alice\u{2060}",
    "\u{202E}alice",
    "al\u{00AD}ice",
];

#[tokio::test]
async fn a_token_for_a_name_with_invisible_characters_is_refused() {
    let server = TestServer::start().await;
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    for user in LOOKALIKES {
        let exp = herald_server::auth::unix_now() + 60;
        let token =
            jsonwebtoken::encode(&Header::default(), &json!({"sub": user, "exp": exp}), &key)
                .unwrap();
        let request = server
            .url(&format!("/ws?token={token}"))
            .into_client_request()
            .unwrap();
        let refused = refusal(request).await;
        assert_eq!(refused.status, 401, "{user:?}: {}", refused.body);
        assert!(refused.body.contains("invisible"), "{}", refused.body);
    }
}

#[tokio::test]
async fn rooms_and_recipients_with_invisible_characters_are_invalid_fields() {
    let server = TestServer::start().await;
    let mut bob = server.connect("bob").await;
    for name in LOOKALIKES {
        for request in [
            json!({"type": "join", "room": name}),
            json!({"type": "send", "to": [name], "content": "hi"}),
            json!({"type": "presence", "users": [name]}),
        ] {
            let answer = bob.request(request.clone()).await;
            assert!(
                matches!(&answer, ServerEvent::Error(e) if e.code == ErrorCode::InvalidField),
                "{request}: {answer:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_room_with_invisible_characters_is_refused_at_the_handshake() {
    let server = TestServer::start().await;
    let token = server.token("bob");
    let request = server
        .url(&format!("/ws/lobby%E2%80%8B?token={token}"))
        .into_client_request()
        .unwrap();
    let refused = refusal(request).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
}
