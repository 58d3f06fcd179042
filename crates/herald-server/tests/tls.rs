//! HTTPS and WSS on the one port, with certificates made in the test, and certificate reload
//! while clients stay connected.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::process::{herald, message_starts, wait_for_log};
use common::tls::TestCa;
use common::{EVENT_TIMEOUT, TestServer, content_of};
use herald_protocol::ServerEvent;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

async fn tls_server(ca: &TestCa, watch_interval: Duration) -> TestServer {
    let (cert, key) = (ca.cert_path(), ca.key_path());
    TestServer::start_tls_with(move |config| {
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        config.tls.watch_interval = watch_interval;
        config.server.handshake_timeout = Duration::from_millis(500);
    })
    .await
}

#[tokio::test]
async fn wss_clients_exchange_messages_and_https_serves_the_api() {
    let ca = TestCa::new();
    let leaf = ca.issue();
    ca.install(&leaf);
    let server = tls_server(&ca, Duration::ZERO).await;

    let (mut alice, shown) = ca.connect_wss(&server, "alice").await;
    assert_eq!(shown, leaf.der);
    let (mut bob, _) = ca.connect_wss(&server, "bob").await;
    let ack = alice
        .request(json!({"type": "send", "to": ["bob"], "content": {"text": "over TLS"}}))
        .await;
    assert!(matches!(ack, ServerEvent::Ack(_)), "{ack:?}");
    assert_eq!(
        content_of(&bob.next_event().await),
        json!({"text": "over TLS"})
    );

    let (mut stream, _) = ca.tls_connect(&server).await;
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test]
async fn a_changed_certificate_is_served_to_new_clients_while_open_ones_stay() {
    let ca = TestCa::new();
    let first = ca.issue();
    ca.install(&first);
    let server = tls_server(&ca, Duration::from_millis(50)).await;
    let (mut alice, shown) = ca.connect_wss(&server, "alice").await;
    assert_eq!(shown, first.der);

    let mut reloads = server.tls.as_ref().unwrap().reloads();
    let second = ca.issue();
    ca.install(&second);
    tokio::time::timeout(EVENT_TIMEOUT, reloads.changed())
        .await
        .expect("the watcher reloads the changed files")
        .unwrap();

    let (mut bob, shown) = ca.connect_wss(&server, "bob").await;
    assert_eq!(
        shown, second.der,
        "a new handshake gets the new certificate"
    );
    // The connection opened under the old certificate is still served, both ways.
    alice
        .request(json!({"type": "send", "to": ["bob"], "content": "still here"}))
        .await;
    assert_eq!(content_of(&bob.next_event().await), json!("still here"));
    let pong = alice.request(json!({"type": "ping"})).await;
    assert!(matches!(pong, ServerEvent::Pong(_)));
}

#[tokio::test]
async fn a_broken_certificate_file_keeps_the_current_certificate() {
    let ca = TestCa::new();
    let first = ca.issue();
    ca.install(&first);
    let server = tls_server(&ca, Duration::ZERO).await;
    let tls = server.tls.as_ref().unwrap();

    std::fs::write(ca.cert_path(), "not a certificate").unwrap();
    let error = tls.reload().await.unwrap_err().to_string();
    assert!(error.contains("cert.pem"), "{error}");
    // A key from another certificate does not fit.
    let other = ca.issue();
    std::fs::write(ca.cert_path(), &first.cert_pem).unwrap();
    std::fs::write(ca.key_path(), &other.key_pem).unwrap();
    let error = tls.reload().await.unwrap_err().to_string();
    assert!(error.contains("does not fit"), "{error}");

    let (_client, shown) = ca.connect_wss(&server, "alice").await;
    assert_eq!(shown, first.der);
}

#[tokio::test]
async fn a_stalled_tls_handshake_neither_blocks_others_nor_stays_open() {
    let ca = TestCa::new();
    ca.install(&ca.issue());
    let server = tls_server(&ca, Duration::ZERO).await;
    // A client that opens a socket and never says hello.
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();

    let (mut alice, _) = ca.connect_wss(&server, "alice").await;
    let pong = alice.request(json!({"type": "ping"})).await;
    assert!(matches!(pong, ServerEvent::Pong(_)));

    // The server drops it after server.handshake_timeout: the read sees the end of stream.
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(EVENT_TIMEOUT, stalled.read(&mut buffer))
        .await
        .expect("the server closes a stalled handshake");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn starting_with_a_half_configured_or_unreadable_certificate_names_the_problem() {
    let ca = TestCa::new();
    let mut config = herald_server::config::TlsConfig {
        cert: Some(ca.cert_path()),
        ..Default::default()
    };
    assert!(
        herald_server::tls::ServerTls::load(&config)
            .err()
            .unwrap()
            .to_string()
            .contains("tls.cert and tls.key")
    );
    config.key = Some(ca.key_path());
    let error = herald_server::tls::ServerTls::load(&config)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("cert.pem"), "{error}");
}

#[tokio::test]
async fn serve_reloads_its_certificate_on_sighup_without_dropping_clients() {
    let ca = TestCa::new();
    let first = ca.issue();
    ca.install(&first);
    let cwd = tempfile::tempdir().unwrap();
    let mut child = herald(cwd.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--anonymous",
        ])
        .env("HERALD_TLS_CERT", ca.cert_path())
        .env("HERALD_TLS_KEY", ca.key_path())
        // Only the signal may trigger the reload.
        .env("HERALD_TLS_WATCH_INTERVAL", "0s")
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = wait_for_log(&mut log, |entry| message_starts(entry, "herald listening")).await;
    assert!(
        listening["message"].as_str().unwrap().contains("wss://"),
        "{listening}"
    );
    let addr: SocketAddr = listening["address"].as_str().unwrap().parse().unwrap();

    let (mut alice, shown) = ca.connect_wss_to(addr, "/ws?user=alice").await;
    assert_eq!(shown, first.der);

    let second = ca.issue();
    ca.install(&second);
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for_log(&mut log, |entry| {
        message_starts(entry, "TLS certificate reloaded") && entry["trigger"] == "SIGHUP"
    })
    .await;

    let (_bob, shown) = ca.connect_wss_to(addr, "/ws?user=bob").await;
    assert_eq!(shown, second.der);
    let pong = alice.request(json!({"type": "ping"})).await;
    assert!(matches!(pong, ServerEvent::Pong(_)), "{pong:?}");

    child.start_kill().unwrap();
    let _ = child.wait().await;
}
