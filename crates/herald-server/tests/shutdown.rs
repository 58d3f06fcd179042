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
