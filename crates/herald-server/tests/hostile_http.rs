//! HTTP requests an attacker would try: hidden files and links out of the static folder, API
//! keys that almost match, and bodies far over the limit.

mod common;

use std::path::Path;

use common::{API_KEY, EVENT_TIMEOUT, TestServer, status_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET_TEXT: &str = "outside-the-web-folder";

/// `root/web` with a page, hidden files, and links pointing in and out of it; `root/secret.txt`
/// beside it.
fn site() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let web = root.path().join("web");
    std::fs::create_dir_all(web.join(".git")).unwrap();
    std::fs::write(web.join("app.js"), "console.log('hi')").unwrap();
    std::fs::write(web.join(".env"), SECRET_TEXT).unwrap();
    std::fs::write(web.join(".git/config"), SECRET_TEXT).unwrap();
    std::fs::write(root.path().join("secret.txt"), SECRET_TEXT).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        symlink(root.path().join("secret.txt"), web.join("leak.txt")).unwrap();
        symlink(root.path(), web.join("up")).unwrap();
        symlink(web.join("app.js"), web.join("alias.js")).unwrap();
    }
    root
}

async fn serve(root: &Path) -> TestServer {
    let dir = root.join("web");
    TestServer::start_with(move |config| config.static_files.dir = dir).await
}

#[tokio::test]
async fn hidden_files_are_not_served_however_the_path_is_spelled() {
    let root = site();
    let server = serve(root.path()).await;
    for target in [
        "/.env",
        "/%2eenv",
        "/%2Eenv",
        "/.git/config",
        "/%2egit/config",
        "/.git%2fconfig",
        "/./.env",
    ] {
        let raw = server.raw_http(target).await;
        assert_eq!(status_of(&raw), 404, "{target}:\n{raw}");
        assert!(!raw.contains(SECRET_TEXT), "{target} leaked");
    }
    assert_eq!(status_of(&server.raw_http("/app.js").await), 200);
}

#[cfg(unix)]
#[tokio::test]
async fn links_out_of_the_folder_are_not_followed_and_links_inside_it_are() {
    let root = site();
    let server = serve(root.path()).await;
    for target in ["/leak.txt", "/up/secret.txt"] {
        let raw = server.raw_http(target).await;
        assert_eq!(status_of(&raw), 404, "{target}:\n{raw}");
        assert!(!raw.contains(SECRET_TEXT), "{target} leaked");
    }
    let alias = server.raw_http("/alias.js").await;
    assert_eq!(status_of(&alias), 200, "{alias}");
}

#[tokio::test]
async fn api_keys_that_almost_match_are_refused() {
    let server = TestServer::start().await;
    let mut one_off = API_KEY.to_owned();
    one_off.replace_range(3..4, "X");
    let near_misses = [
        one_off,
        API_KEY[..API_KEY.len() - 1].to_owned(),
        format!("{API_KEY}0"),
        API_KEY.to_ascii_uppercase(),
        format!("{API_KEY}{API_KEY}"),
        String::new(),
    ];
    for key in &near_misses {
        let (status, body) = server
            .api_with_key("GET", "/api/rooms", None, Some(key))
            .await;
        assert_eq!(status, 401, "{key:?}: {body}");
        assert_eq!(body["field"], "Authorization", "{key:?}: {body}");
    }
    let (status, _) = server.api("GET", "/api/rooms", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_two_mebibyte_api_body_is_refused_with_413() {
    let server = TestServer::start().await;
    let content = "x".repeat(2 * 1024 * 1024);
    let body = serde_json::json!({"room": "lobby", "content": content}).to_string();
    let reply = server
        .http("POST", "/api/publish", Some(body), Some(API_KEY))
        .await;
    assert_eq!(reply.status, 413, "{}", reply.body);
    assert!(reply.body.contains("api.max_body_bytes"), "{}", reply.body);
    // The server is unharmed.
    let (status, _) = server.api("GET", "/api/rooms", None).await;
    assert_eq!(status, 200);
}

/// Posts eight megabytes to `/api/publish` with `key`, writing the whole body before reading,
/// and returns the reply. Eight megabytes is more than loopback's socket buffers hold: a server
/// that replied and closed with the body unread would reset the connection, failing the write
/// and losing the reply.
async fn reply_to_a_body_written_whole_first(server: &TestServer, key: &str) -> String {
    let body = vec![b'x'; 8 * 1024 * 1024];
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        server.addr,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
        .write_all(&body)
        .await
        .expect("the server reads the whole body instead of resetting the connection");
    let mut reply = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, stream.read_to_end(&mut reply))
        .await
        .expect("the reply comes")
        .expect("the connection ends cleanly");
    String::from_utf8_lossy(&reply).into_owned()
}

/// A client that writes its whole oversized body before reading reads the 413: the server reads
/// and drops the rest of the body before replying.
#[tokio::test]
async fn a_client_that_sends_a_whole_oversized_body_before_reading_gets_the_413() {
    let server = TestServer::start().await;
    let reply = reply_to_a_body_written_whole_first(&server, API_KEY).await;
    assert_eq!(status_of(&reply), 413, "{reply}");
    assert!(reply.contains("api.max_body_bytes"), "{reply}");
}

/// The same for a caller whose key is refused: its 401 is read, not lost to a reset, whatever
/// the body it was still sending.
#[tokio::test]
async fn a_caller_with_a_wrong_key_that_sends_a_whole_large_body_before_reading_gets_the_401() {
    let server = TestServer::start().await;
    let reply = reply_to_a_body_written_whole_first(&server, "not-the-key").await;
    assert_eq!(status_of(&reply), 401, "{reply}");
    assert!(reply.contains("invalid API key"), "{reply}");
}
