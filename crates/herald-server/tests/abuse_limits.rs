//! What one abusive client can cost the server: Pings without reading, large replies it never
//! reads, sockets that never finish, a request that hits a bug. Each is bounded and ends with a
//! named close, and the server stays whole for everyone else.

mod common;

use std::time::Duration;

use common::hostile::{self, PING, RawSocket, TEXT};
use common::{EVENT_TIMEOUT, TestServer};
use herald_protocol::{ErrorCode, ServerEvent};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw WebSocket for `user`, past its welcome.
async fn raw_client(server: &TestServer, user: &str) -> RawSocket {
    let token = server.token(user);
    let mut socket = RawSocket::connect(server.addr, &format!("/ws?token={token}")).await;
    socket
        .text_matching(|text| text.contains("\"welcome\""))
        .await;
    socket
}

#[tokio::test]
async fn pings_count_against_the_rate_limit_and_a_flood_closes_with_1008() {
    let server = TestServer::start().await;
    let mut flooder = raw_client(&server, "mallory").await;
    // Default limits: a burst of 100, then 100 refused in a row close the connection.
    let flood: Vec<u8> = (0..400)
        .flat_map(|_| hostile::message(PING, b"p"))
        .collect();
    assert_eq!(flooder.close_code_while_sending(&flood).await, Some(1008));
}

/// Pings of the largest size, a batch of them in one buffer.
fn ping_batch() -> Vec<u8> {
    (0..1000)
        .flat_map(|_| hostile::message(PING, &[b'p'; 125]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_pings_without_reading_stops_being_read() {
    let server = TestServer::start_with(|config| {
        // Lift the rate limit: this is about what the server holds, not how fast it fills.
        config.limits.messages_per_second = 1_000_000;
        config.limits.burst = 1_000_000;
    })
    .await;
    let mut flooder = raw_client(&server, "mallory").await;
    let batch = ping_batch();
    // Once the Pongs it owes cannot go out, the server reads nothing more: what this side can
    // write is then what the kernel buffers of both sides hold (tens of MB at most). A server
    // that kept reading would take Pings (and queue Pongs) without end.
    let mut written = 0usize;
    loop {
        let write = tokio::time::timeout(Duration::from_secs(3), flooder.send(&batch)).await;
        match write {
            Ok(result) => result.expect("the server is still up"),
            Err(_blocked) => break,
        }
        written += batch.len();
        assert!(
            written < 32 << 20,
            "the server kept reading Pings from a client that reads nothing"
        );
    }
}

#[tokio::test]
async fn a_write_that_makes_no_progress_closes_the_connection() {
    let server = TestServer::start_with(|config| {
        config.limits.messages_per_second = 1_000_000;
        config.limits.burst = 1_000_000;
        config.heartbeat.interval = Duration::from_millis(500);
        config.limits.write_timeout = Duration::from_millis(500);
    })
    .await;
    let mut flooder = raw_client(&server, "mallory").await;
    let batch = ping_batch();
    // The server's own Ping cannot go out to a client that reads nothing; after
    // `limits.write_timeout` without progress the server drops the socket, and the writes
    // here fail.
    let flooding = async { while flooder.send(&batch).await.is_ok() {} };
    tokio::time::timeout(EVENT_TIMEOUT, flooding)
        .await
        .expect("the server kept a connection whose socket took nothing");
}

/// Publishes `count` messages of about `bytes` bytes each to `room`.
async fn fill_room(server: &TestServer, room: &str, count: usize, bytes: usize) {
    let mut publisher = server.connect("publisher").await;
    publisher.join(room).await;
    let filler = "x".repeat(bytes);
    for _ in 0..count {
        publisher.publish(room, json!({ "text": filler })).await;
    }
}

#[tokio::test]
async fn a_history_page_over_the_byte_budget_is_refused_with_limit_exceeded() {
    let server = TestServer::start_with(|config| {
        config.limits.send_queue_bytes = 256 * 1024;
    })
    .await;
    fill_room(&server, "big", 6, 60_000).await;
    let mut reader = server.connect("reader").await;
    let refused = reader
        .request(json!({"type": "history", "room": "big", "limit": 6}))
        .await;
    let ServerEvent::Error(error) = refused else {
        panic!("expected an error, got {refused:?}");
    };
    assert_eq!(error.code, ErrorCode::LimitExceeded);
    assert!(
        error.message.contains("limits.send_queue_bytes"),
        "{}",
        error.message
    );
    let page = reader.history(json!({"room": "big", "limit": 3})).await;
    assert_eq!(page.messages.len(), 3);
}

#[tokio::test]
async fn a_client_requesting_history_without_reading_is_cut_off_with_4001() {
    let server = TestServer::start_with(|config| {
        config.limits.messages_per_second = 1_000_000;
        config.limits.burst = 1_000_000;
        config.limits.send_queue_bytes = 1024 * 1024;
        config.limits.write_timeout = Duration::from_millis(500);
    })
    .await;
    fill_room(&server, "big", 10, 60_000).await;
    let mut hoarder = raw_client(&server, "hoarder").await;
    // Each reply is about 600 KB; 200 of them, unread, would be 120 MB queued in the server.
    let request = hostile::message(TEXT, br#"{"type":"history","room":"big","limit":10}"#);
    for _ in 0..200 {
        if hoarder.send(&request).await.is_err() {
            break;
        }
    }
    server
        .scrape_until(|scrape| scrape.total("herald_slow_consumers_total") >= 1.0)
        .await;
    // What the server had written before it gave up, then the end of the connection.
    let mut replies = 0;
    while let Some(frame) = hoarder.read_frame().await {
        match frame.opcode() {
            TEXT => replies += 1,
            hostile::CLOSE => {
                assert_eq!(frame.close_code(), 4001);
                break;
            }
            _ => {}
        }
    }
    assert!(replies < 200, "every reply was queued: {replies}");
}

#[tokio::test]
async fn sockets_over_max_sockets_wait_until_one_closes_even_once_upgraded() {
    let server = TestServer::start_with(|config| config.server.max_sockets = 2).await;
    let websocket = server.connect("alice").await;
    let idle = TcpStream::connect(server.addr).await.unwrap();

    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr
    );
    third.write_all(request.as_bytes()).await.unwrap();
    let mut first_byte = [0u8; 1];
    // Nothing is due here: at the cap the server does not even accept the socket.
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut first_byte)).await;
    assert!(
        early.is_err(),
        "a third socket was served at max_sockets = 2"
    );

    // The WebSocket held its place after the upgrade; closing it frees one.
    drop(websocket);
    drop(idle);
    let mut response = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, third.read_to_end(&mut response))
        .await
        .expect("the waiting socket is served once another closes")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response)
    );
}

#[tokio::test]
async fn a_connection_that_panics_leaves_its_rooms_and_goes_offline() {
    let server = TestServer::start_with(common::presence_on).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;

    alice
        .send_raw(tokio_tungstenite::tungstenite::Message::text(
            herald_server::connection::PANIC_REQUEST,
        ))
        .await;
    let left = bob
        .next_matching(|event| {
            matches!(event, ServerEvent::PresenceDiff(diff)
                if diff.left.iter().flatten().any(|user| user == "alice"))
        })
        .await;
    let ServerEvent::PresenceDiff(diff) = left else {
        unreachable!()
    };
    assert_eq!(diff.count, 1);
    assert!(
        alice
            .expect_close()
            .await
            .is_none_or(|close| close.code == 1011.into())
    );
    assert!(
        server
            .node
            .user_connections("alice")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(server.node.hub().connection_count(), 1);

    // The server goes on serving: alice comes back and is alone in nothing.
    let mut again = server.connect("alice").await;
    again.join("lobby").await;
}
