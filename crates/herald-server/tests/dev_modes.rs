//! The development modes (`auth.anonymous`, `auth.dev_login`) and the generated secret: what
//! would let anyone act as any user stays on the developer's machine.

mod common;

use common::process::{LogLines, herald, message_starts, wait_for_log};
use common::{TestServer, refusal};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A `POST /dev/token` with the given `Host` header; returns the status line.
async fn dev_token_with_host(server: &TestServer, host: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"user":"alice"}"#;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "POST /dev/token HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(common::EVENT_TIMEOUT, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    response.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_rebound_host_name_cannot_get_a_development_token() {
    let server = TestServer::start_with(|c| c.auth.dev_login = true).await;
    let port = server.addr.port();
    let rebound = dev_token_with_host(&server, &format!("evil.example:{port}")).await;
    assert!(rebound.contains(" 421 "), "{rebound}");
    for local in [format!("localhost:{port}"), server.addr.to_string()] {
        let status = dev_token_with_host(&server, &local).await;
        assert!(status.contains(" 200 "), "{local}: {status}");
    }
}

#[tokio::test]
async fn a_rebound_host_name_cannot_connect_anonymously() {
    let server = TestServer::start_with(|c| c.auth.anonymous = true).await;
    let port = server.addr.port();
    let mut request = server.url("/ws?user=alice").into_client_request().unwrap();
    let host = format!("evil.example:{port}");
    request.headers_mut().insert("host", host.parse().unwrap());
    request
        .headers_mut()
        .insert("origin", format!("http://{host}").parse().unwrap());
    let refused = refusal(request).await;
    assert_eq!(refused.status, 421, "{}", refused.body);
}

#[tokio::test]
async fn configured_hosts_are_the_only_ones_answered() {
    let server = TestServer::start_with(|c| {
        c.auth.dev_login = true;
        c.server.allowed_hosts = vec!["chat.example".into()];
    })
    .await;
    let allowed = dev_token_with_host(&server, "chat.example").await;
    assert!(allowed.contains(" 200 "), "{allowed}");
    let other = dev_token_with_host(&server, &server.addr.to_string()).await;
    assert!(other.contains(" 421 "), "{other}");
}

#[test]
fn development_modes_refuse_a_public_listen_address_unless_forced() {
    for flag in ["--anonymous", "--dev-login"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .env_clear()
            .env("HERALD_AUTH_SECRET", common::SECRET)
            .args(["serve", "--listen", "0.0.0.0:0", flag])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{flag} started on 0.0.0.0");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("auth.allow_insecure_public"), "{stderr}");
    }
}

#[tokio::test]
async fn a_development_mode_on_a_public_address_starts_when_forced() {
    let data = tempfile::tempdir().unwrap();
    let mut child = herald(data.path())
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--anonymous",
            "--log-format",
            "json",
        ])
        .env("HERALD_AUTH_SECRET", common::SECRET)
        .env("HERALD_AUTH_ALLOW_INSECURE_PUBLIC", "true")
        .spawn()
        .unwrap();
    let mut log: LogLines = BufReader::new(child.stderr.take().unwrap()).lines();
    wait_for_log(&mut log, |entry| message_starts(entry, "herald listening")).await;
}

#[tokio::test]
async fn the_generated_secret_never_reaches_the_log() {
    let data = tempfile::tempdir().unwrap();
    let mut child = herald(data.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .spawn()
        .unwrap();
    let mut log: LogLines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut lines = Vec::new();
    tokio::time::timeout(common::EVENT_TIMEOUT, async {
        while let Some(line) = log.next_line().await.unwrap() {
            let listening = line.contains("herald listening");
            lines.push(line);
            if listening {
                break;
            }
        }
    })
    .await
    .expect("the server did not start");
    let warning = lines
        .iter()
        .find(|line| line.contains("auth.secret is not set"))
        .unwrap_or_else(|| panic!("no warning about the generated secret in {lines:#?}"));
    assert!(
        warning.contains("\"secret_shown_on_terminal\":false"),
        "{warning}"
    );
    // Standard error is a pipe here, not a terminal: nothing on it carries a secret.
    for line in &lines {
        assert!(!line.contains("HERALD_AUTH_SECRET="), "{line}");
    }
}
