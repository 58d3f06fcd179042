//! `herald backup`: a copy of a running server's database that another server starts from.

mod common;

use common::TestServer;
use serde_json::json;

#[tokio::test]
async fn a_backup_taken_while_the_server_runs_restores_every_committed_message() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    for n in 0..50 {
        alice
            .request(json!({"type": "publish", "room": "lobby", "content": n}))
            .await;
    }
    let copies = tempfile::tempdir().unwrap();
    let copy = copies.path().join("herald-backup.db");
    let data = server.node.config().store.path.clone();

    // The server keeps running, with its WAL holding recent commits.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["backup", "--to"])
        .arg(&copy)
        .env_clear()
        .env("HERALD_STORE_PATH", &data)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("backed up"));
    // A second backup to the same name is refused: a copy is never overwritten.
    let again = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["backup", "--to"])
        .arg(&copy)
        .env_clear()
        .env("HERALD_STORE_PATH", &data)
        .output()
        .await
        .unwrap();
    assert!(!again.status.success());
    let refusal = String::from_utf8_lossy(&again.stderr);
    assert!(refusal.contains("exists already"), "{refusal}");

    server.stop().await;

    let restored = tempfile::tempdir().unwrap();
    std::fs::copy(&copy, restored.path().join("herald.db")).unwrap();
    let path = restored.path().to_owned();
    let server = TestServer::start_with(|config| config.store.path = path).await;
    let (status, page) = server
        .api("GET", "/api/rooms/lobby/history?limit=100", None)
        .await;
    assert_eq!(status, 200, "{page}");
    let contents: Vec<i64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_i64().unwrap())
        .collect();
    assert_eq!(contents, (0..50).collect::<Vec<_>>());
}

#[test]
fn a_backup_of_a_folder_without_a_database_says_so() {
    let empty = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["backup", "--to", "copy.db"])
        .current_dir(empty.path())
        .env_clear()
        .env("HERALD_STORE_PATH", empty.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no database at"), "{stderr}");
    assert!(!empty.path().join("copy.db").exists());
}
