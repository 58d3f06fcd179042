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

/// An operator reads every warning as a problem: a clean stop of the real binary logs none.
/// Retention passes run back to back, and each visits ten thousand streams in small steps, so
/// one is under way when shutdown begins: the passes use the store, so they must stop before it
/// closes. Alice is in a room: her leave is the last presence diff, sent before the broker
/// closes.
#[tokio::test]
async fn a_clean_sigterm_of_the_binary_logs_no_warning() {
    use common::process::{herald, message_starts, wait_for_log};
    use serde_json::json;
    use tokio::io::AsyncBufReadExt;

    let data = tempfile::tempdir().unwrap();
    let mut child = herald(data.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("HERALD_AUTH_SECRET", common::SECRET)
        .env("HERALD_STORE_PRUNE_INTERVAL", "1ms")
        .env("HERALD_STORE_SYNCHRONOUS", "normal")
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = wait_for_log(&mut lines, |entry| entry["address"].is_string()).await;
    let address = listening["address"].as_str().unwrap().to_owned();

    let token = herald_server::auth::Authenticator::from_config(
        &herald_server::config::AuthConfig {
            secret: Some(common::SECRET.into()),
            ..Default::default()
        },
        None,
    )
    .unwrap()
    .mint("alice", false, None, std::time::Duration::from_secs(60))
    .unwrap();
    let mut alice = common::Client::open(&format!("ws://{address}/ws?token={token}")).await;
    alice.join("lobby").await;
    // Each direct message adds an inbox and a conversation per recipient: 10,000 streams.
    for batch in 0..50 {
        let to: Vec<String> = (0..100).map(|n| format!("u{batch}x{n}")).collect();
        alice
            .request(json!({"type": "send", "to": to, "content": batch}))
            .await;
    }
    // The client answers the server's Close, as a real one does.
    let closed = tokio::spawn(async move { alice.expect_close().await });
    let pid = child.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    wait_for_log(&mut lines, |entry| message_starts(entry, "shutting down")).await;
    let mut warnings = Vec::new();
    while let Some(line) = tokio::time::timeout(common::EVENT_TIMEOUT, lines.next_line())
        .await
        .expect("the server stops in time")
        .unwrap()
    {
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or(json!({}));
        if entry["level"] != "INFO" && entry["level"] != "DEBUG" {
            warnings.push(line);
        }
    }
    let status = child.wait().await.unwrap();
    assert!(status.success(), "exit status {status}");
    let close = closed.await.unwrap().expect("a close frame");
    assert_eq!(close.code, CloseCode::Away);
    assert!(warnings.is_empty(), "logged at shutdown: {warnings:#?}");
}
