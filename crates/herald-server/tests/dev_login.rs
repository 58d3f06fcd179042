//! Browser conveniences: the JavaScript client at /herald.js and the development sign-in.

mod common;

use common::{Client, TestServer, http_request};

#[tokio::test]
async fn dev_token_is_absent_unless_enabled() {
    let server = TestServer::start().await;
    let (status, _, _) =
        http_request(server.addr, "POST", "/dev/token", Some(r#"{"user":"a"}"#)).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn dev_token_mints_a_token_that_connects() {
    let server = TestServer::start_with(|c| c.auth.dev_login = true).await;
    let (status, _, body) = http_request(
        server.addr,
        "POST",
        "/dev/token",
        Some(r#"{"user":"alice"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = token["token"].as_str().unwrap();
    let client = Client::open(&server.url(&format!("/ws?token={token}"))).await;
    assert_eq!(client.welcome.user, "alice");

    for bad in [r#"{"user":"has space"}"#, r#"{"name":"x"}"#, "not json"] {
        let (status, _, body) = http_request(server.addr, "POST", "/dev/token", Some(bad)).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("\"error\""), "{body}");
    }
}

#[tokio::test]
async fn the_javascript_client_is_served_as_a_module() {
    let server = TestServer::start().await;
    let (status, headers, body) = http_request(server.addr, "GET", "/herald.js", None).await;
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(n, v)| n == "content-type" && v.starts_with("text/javascript"))
    );
    assert!(body.contains("export class HeraldClient"));
}
