//! Liveness: server Ping frames, the two-interval silence limit, and the app-level ping.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use herald_protocol::ServerEvent;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const INTERVAL: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_silent_client_is_closed_after_two_intervals_and_leaves_its_rooms() {
    let server = TestServer::start_with(|c| {
        c.heartbeat.interval = INTERVAL;
        common::presence_on(c);
    })
    .await;
    let mut watcher = server.connect("watcher").await;
    watcher.join("r").await;
    let mut silent = server.connect("silent").await;
    silent.join("r").await;
    let silent_since = Instant::now();
    // From here `silent` reads nothing, so it answers no Ping. The watcher keeps reading (the
    // client library answers Pings while reading), so it stays connected.
    let left = watcher.diff_listing("r", "silent", false).await;
    let waited = silent_since.elapsed();
    assert!(
        waited >= INTERVAL * 2 - Duration::from_millis(50),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < INTERVAL * 2 + Duration::from_secs(2),
        "closed too late: {waited:?}"
    );
    assert_eq!(left.count, 1);

    let close = silent.expect_close().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::from(4000));

    // The watcher, which answered every Ping, outlived the silence limit.
    assert!(watcher_since_connect_outlived(&mut watcher).await);
}

async fn watcher_since_connect_outlived(watcher: &mut common::Client) -> bool {
    matches!(
        watcher.request(json!({"type": "ping"})).await,
        ServerEvent::Pong(_)
    )
}

#[tokio::test]
async fn the_server_sends_protocol_pings_at_the_interval() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let server = TestServer::start_with(|c| c.heartbeat.interval = INTERVAL).await;
    let mut client = server.connect("alice").await;
    let started = Instant::now();
    let ping = tokio::time::timeout(common::EVENT_TIMEOUT, async {
        loop {
            if let Some(Ok(WsMessage::Ping(_))) = client.ws.next().await {
                return started.elapsed();
            }
        }
    })
    .await
    .unwrap();
    assert!(ping < INTERVAL * 2, "first ping after {ping:?}");
}

#[tokio::test]
async fn app_level_ping_is_answered_with_pong_carrying_the_ref() {
    let server = TestServer::start().await;
    let mut client = server.connect("alice").await;
    client.send_json(json!({"type": "ping", "id": "hb1"})).await;
    let pong = client.next_event().await;
    assert!(
        matches!(&pong, ServerEvent::Pong(p) if p.reference.as_deref() == Some("hb1")),
        "{pong:?}"
    );
}
