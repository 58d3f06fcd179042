//! `herald publish`, `send` and `broadcast`: the real binary pushing through a running
//! server's API, as a cron job or shell script would.

mod common;

use std::process::Stdio;

use common::process::herald;
use common::{API_KEY, EVENT_TIMEOUT, TestServer, content_of};
use herald_protocol::ServerEvent;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

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
