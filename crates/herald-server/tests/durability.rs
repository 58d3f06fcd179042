//! The real `herald` binary: what it acknowledged survives `kill -9`, and a data folder it
//! cannot use stops it at start with a message naming the path.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Client, SECRET, content_json};
use herald_server::auth::Authenticator;
use herald_server::config::AuthConfig;
use serde_json::json;

/// A `herald serve` process on an ephemeral port.
struct Herald {
    child: Child,
    addr: String,
}

fn config_file(folder: &Path, data: &Path) -> std::path::PathBuf {
    let path = folder.join("herald.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nsecret = \"{SECRET}\"\n\
             [log]\nformat = \"json\"\n[store]\npath = {:?}\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    path
}

fn command(config: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

impl Herald {
    /// Starts the binary and waits for its "listening" log line, which names the address.
    fn start(config: &Path) -> Herald {
        let mut child = command(config).spawn().expect("herald starts");
        let stderr = child.stderr.take().unwrap();
        let (found, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Some(addr) = entry["address"].as_str()
                {
                    let _ = found.send(addr.to_owned());
                }
            }
        });
        let addr = address
            .recv_timeout(Duration::from_secs(20))
            .expect("herald did not log its address");
        Herald { child, addr }
    }

    async fn connect(&self, user: &str) -> Client {
        let auth = AuthConfig {
            secret: Some(SECRET.to_owned()),
            ..AuthConfig::default()
        };
        let token = Authenticator::from_config(&auth, None)
            .unwrap()
            .mint(user, false, None, Duration::from_secs(600))
            .unwrap();
        Client::open(&format!("ws://{}/ws?token={token}", self.addr)).await
    }

    /// SIGKILL: no shutdown code runs.
    fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn acknowledged_messages_survive_kill_9() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let config = config_file(folder.path(), &data);

    let herald = Herald::start(&config);
    let mut alice = herald.connect("alice").await;
    alice.join("lobby").await;
    let mut acked = Vec::new();
    for n in 1..=20 {
        let offset = alice.publish("lobby", json!({"n": n})).await;
        acked.push(offset);
    }
    let direct = alice
        .ack(json!({"type": "send", "to": ["bob"], "content": "kept"}))
        .await;
    herald.kill_9();
    assert!(data.join("herald.db").exists());

    let herald = Herald::start(&config);
    let mut bob = herald.connect("bob").await;
    let message = bob.next_message_event().await;
    assert_eq!(Some(&message.id), direct.id.as_ref());
    assert_eq!(content_json(&message), json!("kept"));
    // Its conversation entry, like its inbox entry, may have been staged and not yet merged
    // when the process died (`engine/sqlite/staging.rs`): the next start merges it.
    let conversation = bob.history(json!({"with": "alice"})).await;
    let ids: Vec<Option<&String>> = conversation.messages.iter().map(|m| Some(&m.id)).collect();
    assert_eq!(ids, [direct.id.as_ref()]);
    let page = bob.history(json!({"room": "lobby"})).await;
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset.unwrap()).collect();
    assert_eq!(offsets, acked);
    assert_eq!(content_json(&page.messages[19]), json!({"n": 20}));
}

/// Runs the binary against a config and returns (exit code, stderr) once it exits.
fn run_until_exit(config: &Path) -> (Option<i32>, String) {
    let output = command(config).output().expect("herald runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_data_folder_that_cannot_be_created_stops_the_server_naming_it() {
    let folder = tempfile::tempdir().unwrap();
    // Beneath a regular file: no user, root included, can create this folder.
    let blocker = folder.path().join("not-a-folder");
    std::fs::write(&blocker, b"x").unwrap();
    let data = blocker.join("data");
    let (code, stderr) = run_until_exit(&config_file(folder.path(), &data));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(code.is_some(), "it exits rather than dying by a signal");
    assert!(stderr.contains(&data.display().to_string()), "{stderr}");
    assert!(stderr.contains("cannot create the data folder"), "{stderr}");
}

#[test]
fn a_database_file_that_is_not_sqlite_stops_the_server_naming_it() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let db = data.join("herald.db");
    std::fs::write(
        &db,
        b"plain text where the database should be, long enough to have a header",
    )
    .unwrap();
    let (code, stderr) = run_until_exit(&config_file(folder.path(), &data));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(code.is_some());
    assert!(stderr.contains(&db.display().to_string()), "{stderr}");
    assert!(stderr.contains("not a database"), "{stderr}");
}
