//! The `herald` binary itself: `publish`, `send` and `broadcast` against a running server, and
//! `serve` reloading its certificate on SIGHUP.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::tls::TestCa;
use common::{API_KEY, EVENT_TIMEOUT, TestServer, content_of};
use herald_protocol::ServerEvent;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStderr, Command};

/// The binary with a clean environment (no HERALD_* from the caller) in an empty folder.
fn herald(cwd: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .env_clear()
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs an API command against `server` with the test key; returns (success, stdout, stderr).
async fn run_api_command(
    server: &TestServer,
    key: Option<&str>,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    let cwd = tempfile::tempdir().unwrap();
    let mut command = herald(cwd.path());
    command
        .args(args)
        .env("HERALD_API_URL", server.http_url(""));
    if let Some(key) = key {
        command.env("HERALD_API_KEY", key);
    }
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command.spawn().unwrap();
    if let Some(text) = stdin {
        let mut input = child.stdin.take().unwrap();
        input.write_all(text.as_bytes()).await.unwrap();
    }
    let output = tokio::time::timeout(EVENT_TIMEOUT, child.wait_with_output())
        .await
        .expect("the command finishes")
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn publish_send_and_broadcast_commands_reach_clients_of_a_running_server() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("lobby").await;

    let (ok, stdout, stderr) = run_api_command(
        &server,
        Some(API_KEY),
        &[
            "publish",
            "--room",
            "lobby",
            r#"{"text":"the time is 12:00"}"#,
        ],
        None,
    )
    .await;
    assert!(ok, "{stderr}");
    let answer: Value = serde_json::from_str(stdout.trim()).unwrap();
    let event = alice.next_event().await;
    let ServerEvent::Message(message) = &event else {
        panic!("{event:?}")
    };
    assert_eq!(answer["id"], message.id.as_str());
    assert_eq!(message.room.as_deref(), Some("lobby"));
    assert_eq!(content_of(&event), json!({"text": "the time is 12:00"}));

    // Content that is not JSON travels as a string.
    let (ok, stdout, stderr) = run_api_command(
        &server,
        Some(API_KEY),
        &[
            "send",
            "--to",
            "alice,bob,ghost",
            "--from",
            "cron",
            "backup done",
        ],
        None,
    )
    .await;
    assert!(ok, "{stderr}");
    let answer: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(answer["offline"], json!(["ghost"]));
    for client in [&mut alice, &mut bob] {
        let event = client.next_event().await;
        let ServerEvent::Message(message) = &event else {
            panic!("{event:?}")
        };
        assert_eq!(message.from, "cron");
        assert_eq!(content_of(&event), json!("backup done"));
    }

    // `-` reads the content from standard input.
    let (ok, _, stderr) = run_api_command(
        &server,
        Some(API_KEY),
        &["broadcast", "-"],
        Some("{\"maintenance\": true}\n"),
    )
    .await;
    assert!(ok, "{stderr}");
    for client in [&mut alice, &mut bob] {
        assert_eq!(
            content_of(&client.next_event().await),
            json!({"maintenance": true})
        );
    }
}

#[tokio::test]
async fn a_refused_command_fails_with_the_servers_reason() {
    let server = TestServer::start().await;
    let (ok, _, stderr) = run_api_command(
        &server,
        Some("wrong-key-0123456789"),
        &["broadcast", "hello"],
        None,
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("401") && stderr.contains("invalid API key"),
        "{stderr}"
    );

    let (ok, _, stderr) = run_api_command(
        &server,
        Some(API_KEY),
        &["publish", "--room", "a b", "x"],
        None,
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("\"room\""), "{stderr}");

    let (ok, _, stderr) = run_api_command(&server, None, &["broadcast", "hello"], None).await;
    assert!(!ok);
    assert!(stderr.contains("HERALD_API_KEY"), "{stderr}");
}

/// Reads JSON log lines until one satisfies `wanted`.
async fn wait_for_log(
    lines: &mut Lines<BufReader<ChildStderr>>,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the server exited early");
            if let Ok(entry) = serde_json::from_str::<Value>(&line)
                && wanted(&entry)
            {
                return entry;
            }
        }
    })
    .await
    .expect("the log line did not come")
}

fn message_starts(entry: &Value, prefix: &str) -> bool {
    entry["message"]
        .as_str()
        .is_some_and(|message| message.starts_with(prefix))
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
