//! Graceful shutdown: every client is told to reconnect elsewhere with Close 1001.

mod common;

use common::TestServer;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn graceful_shutdown_sends_1001_to_every_client() {
    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for user in ["a", "b", "c"] {
        let mut client = server.connect(user).await;
        client.join("r").await;
        clients.push(client);
    }
    let stopped = tokio::spawn(server.stop());
    for client in &mut clients {
        let close = client.expect_close().await.expect("a close frame");
        assert_eq!(close.code, CloseCode::Away);
    }
    stopped.await.unwrap();
}

/// A connection still waiting for its `auth` message is in no room or user index yet: shutdown
/// reaches it through the node's shutdown signal, with the same 1001.
#[tokio::test]
async fn graceful_shutdown_sends_1001_to_a_connection_still_authenticating() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let server = TestServer::start().await;
    let request = server.url("/ws").into_client_request().unwrap();
    let mut pending = common::handshake(request)
        .await
        .expect("pending handshake accepted");
    let mut authenticated = server.connect("a").await;
    let stopped = tokio::spawn(server.stop());
    let close = match common::next_frame(&mut pending).await {
        Message::Close(Some(frame)) => frame,
        other => panic!("expected a close frame, got {other:?}"),
    };
    assert_eq!(close.code, CloseCode::Away);
    let close = authenticated.expect_close().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Away);
    stopped.await.unwrap();
}
