//! `/health` and `/ready`: a draining node stays alive but tells load balancers to go away.

mod common;

use common::TestServer;
use serde_json::json;

#[tokio::test]
async fn a_running_node_is_healthy_and_ready() {
    let server = TestServer::start().await;
    let (status, body) = server.api("GET", "/health", None).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let (status, body) = server.api("GET", "/ready", None).await;
    assert_eq!((status, body), (200, json!({"status": "ready"})));
}

#[tokio::test]
async fn ready_answers_503_while_shutting_down_and_health_stays_200() {
    let mut server = TestServer::start_with(|config| {
        // Long enough that the node is still serving when the test asks.
        config.server.shutdown_delay = std::time::Duration::from_secs(60);
    })
    .await;
    let mut client = server.connect("alice").await;
    server.begin_shutdown();
    tokio::time::timeout(common::EVENT_TIMEOUT, server.node.draining())
        .await
        .expect("shutdown begins");

    let (status, body) = server.api("GET", "/ready", None).await;
    assert_eq!((status, body), (503, json!({"status": "shutting down"})));
    let (status, _) = server.api("GET", "/health", None).await;
    assert_eq!(status, 200);
    // Existing clients are served until the delay is over.
    let pong = client.request(json!({"type": "ping"})).await;
    assert!(matches!(pong, herald_protocol::ServerEvent::Pong(_)));
}
