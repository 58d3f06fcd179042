//! The `herald` binary itself: help, token minting, config errors, and a real process that
//! shuts down gracefully on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Client, SECRET};
use herald_server::auth::Authenticator;
use herald_server::config::AuthConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn herald() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .env_remove("HERALD_AUTH_SECRET")
        .env_remove("HERALD_CONFIG");
    command
}

#[test]
fn help_lists_the_commands() {
    let output = herald().arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for word in ["serve", "token", "--config"] {
        assert!(help.contains(word), "{word} missing from:\n{help}");
    }
}

#[test]
fn token_mints_a_verifiable_token_with_the_requested_claims() {
    let output = herald()
        .args([
            "token", "--user", "alice", "--admin", "--rooms", "a,b", "--ttl", "10m",
        ])
        .env("HERALD_AUTH_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    let config = AuthConfig {
        secret: Some(SECRET.into()),
        ..AuthConfig::default()
    };
    let identity = Authenticator::from_config(&config, None)
        .unwrap()
        .verify(token.trim())
        .unwrap();
    assert_eq!(&*identity.user, "alice");
    assert!(identity.admin);
    assert!(identity.may_use_room("b") && !identity.may_use_room("c"));
    let expires_in = identity.expires_at.unwrap() - herald_server::auth::unix_now();
    assert!((590..=600).contains(&expires_in), "{expires_in}");
}

#[test]
fn token_without_a_secret_explains_what_to_set() {
    let output = herald()
        .args(["token", "--user", "alice"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("HERALD_AUTH_SECRET"), "{stderr}");
}

#[test]
fn invalid_config_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, "[limits]\nmax_message_bytes = -5\n").unwrap();
    let output = herald()
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("max_message_bytes"), "{stderr}");

    let output = herald()
        .args(["serve"])
        .env("HERALD_HEARTBEAT_INTERVAL", "soon")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.to_lowercase().contains("heartbeat.interval"),
        "{stderr}"
    );
}

#[test]
fn environment_overrides_the_file_and_flags_override_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, "[auth]\nsecret = \"file-secret-0123456789\"\n").unwrap();
    let mint = |env_secret: Option<&str>| {
        let mut command = herald();
        command
            .args(["token", "--user", "u", "--config"])
            .arg(&file);
        if let Some(secret) = env_secret {
            command.env("HERALD_AUTH_SECRET", secret);
        }
        String::from_utf8(command.output().unwrap().stdout).unwrap()
    };
    let verifies_with = |token: &str, secret: &str| {
        let config = AuthConfig {
            secret: Some(secret.into()),
            ..AuthConfig::default()
        };
        Authenticator::from_config(&config, None)
            .unwrap()
            .verify(token.trim())
            .is_ok()
    };
    assert!(verifies_with(&mint(None), "file-secret-0123456789"));
    assert!(verifies_with(
        &mint(Some("env-secret-0123456789")),
        "env-secret-0123456789"
    ));
}

#[tokio::test]
async fn the_real_binary_serves_and_closes_clients_with_1001_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let mut child = herald()
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("HERALD_AUTH_SECRET", SECRET)
        .env("HERALD_STORE_PATH", data.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(address) = entry["address"].as_str() {
                let _ = address_tx.send(address.to_owned());
            }
        }
    });
    let address = address_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let config = AuthConfig {
        secret: Some(SECRET.into()),
        ..AuthConfig::default()
    };
    let token = Authenticator::from_config(&config, None)
        .unwrap()
        .mint("alice", false, None, Duration::from_secs(60))
        .unwrap();
    let mut client = Client::open(&format!("ws://{address}/ws?token={token}")).await;
    assert_eq!(client.welcome.user, "alice");

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let close = client.expect_close().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Away);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// The Redis engine's settings are checked at start: a malformed URL and an unreachable Redis
/// both stop the server with a message naming `redis.urls`.
#[test]
fn redis_settings_that_cannot_work_fail_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let unused_port = common::free_port();
    for (url, expected) in [
        ("http://127.0.0.1:6379", "is not a Redis URL"),
        // Nothing listens there (the port was free a moment ago): refused at once.
        (
            &format!("redis://127.0.0.1:{unused_port}") as &str,
            "cannot connect",
        ),
    ] {
        let output = herald()
            .current_dir(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("HERALD_AUTH_SECRET", "a-secret-long-enough-for-hs256-0123")
            .env("HERALD_ENGINE_BACKEND", "redis")
            .env("HERALD_REDIS_URLS", url)
            .env("HERALD_REDIS_CONNECT_TIMEOUT", "2s")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{url}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains("redis.urls"), "{url}: {stderr}");
        assert!(stderr.contains(expected), "{url}: {stderr}");
    }
}
