//! Static files at `/`: content types, caching headers, no way out of the folder, and a server
//! that starts without the folder.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TestServer, status_of};

const SECRET_TEXT: &str = "outside-the-web-folder";

/// A folder with a page, assets and a subfolder, beside a file that must stay unreachable.
fn site() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let web = root.path().join("web");
    std::fs::create_dir_all(web.join("docs")).unwrap();
    std::fs::write(web.join("index.html"), "<!doctype html><title>chat</title>").unwrap();
    std::fs::write(web.join("app.js"), "console.log('hi')").unwrap();
    std::fs::write(web.join("style.css"), "body{}").unwrap();
    std::fs::write(web.join("docs/index.html"), "<p>docs</p>").unwrap();
    std::fs::write(root.path().join("secret.txt"), SECRET_TEXT).unwrap();
    root
}

async fn serve(root: &Path, max_age: Duration) -> TestServer {
    let dir = root.join("web");
    TestServer::start_with(move |config| {
        config.static_files.dir = dir;
        config.static_files.max_age = max_age;
    })
    .await
}

#[tokio::test]
async fn pages_and_assets_are_served_with_their_content_types_and_cache_policy() {
    let root = site();
    let server = serve(root.path(), Duration::from_secs(3600)).await;

    let page = server.http("GET", "/", None, None).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>chat</title>"));
    assert_eq!(page.header("content-type"), Some("text/html"));
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    assert!(page.header("last-modified").is_some());

    for (path, content_type) in [("/app.js", "text/javascript"), ("/style.css", "text/css")] {
        let asset = server.http("GET", path, None, None).await;
        assert_eq!(asset.status, 200, "{path}");
        assert_eq!(asset.header("content-type"), Some(content_type), "{path}");
        assert_eq!(
            asset.header("cache-control"),
            Some("public, max-age=3600"),
            "{path}"
        );
    }
    let nested = server.http("GET", "/docs/", None, None).await;
    assert_eq!(nested.status, 200);
    assert!(nested.body.contains("docs"));
    assert_eq!(nested.header("cache-control"), Some("no-cache"));

    let missing = server.http("GET", "/nope.js", None, None).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("cache-control"), None);
    // Files are only read.
    let post = server
        .http("POST", "/app.js", Some("{}".into()), None)
        .await;
    assert_eq!(post.status, 404);
}

#[tokio::test]
async fn a_revalidation_gets_304_with_the_same_policy() {
    let root = site();
    let server = serve(root.path(), Duration::ZERO).await;
    let first = server.http("GET", "/app.js", None, None).await;
    assert_eq!(first.header("cache-control"), Some("no-cache"));
    let modified = first.header("last-modified").unwrap().to_owned();
    let raw = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let request = format!(
            "GET /app.js HTTP/1.1\r\nHost: x\r\nIf-Modified-Since: {modified}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    assert_eq!(status_of(&raw), 304, "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains("cache-control: no-cache"),
        "{raw}"
    );
}

#[tokio::test]
async fn paths_out_of_the_folder_are_refused() {
    let root = site();
    let server = serve(root.path(), Duration::ZERO).await;
    let absolute = root.path().join("secret.txt");
    let absolute = absolute.to_str().unwrap();
    let targets = [
        "/../secret.txt".to_owned(),
        "/docs/../../secret.txt".to_owned(),
        "/%2e%2e/secret.txt".to_owned(),
        "/%2E%2E/secret.txt".to_owned(),
        "/..%2fsecret.txt".to_owned(),
        "/docs/..%2f..%2fsecret.txt".to_owned(),
        "/%2e%2e%2fsecret.txt".to_owned(),
        "/..%5csecret.txt".to_owned(),
        format!("/{absolute}"),
        format!("/{}", absolute.replace('/', "%2f")),
        "/%00/../secret.txt".to_owned(),
    ];
    for target in &targets {
        let raw = server.raw_http(target).await;
        let status = status_of(&raw);
        assert!(
            status == 404 || status == 400,
            "{target} answered {status}:\n{raw}"
        );
        assert!(!raw.contains(SECRET_TEXT), "{target} leaked the file");
    }
    // The same folder is still served normally.
    assert_eq!(status_of(&server.raw_http("/app.js").await), 200);
}

#[tokio::test]
async fn endpoints_are_not_shadowed_by_the_folder() {
    let root = site();
    std::fs::write(root.path().join("web/health"), "a file named health").unwrap();
    let server = serve(root.path(), Duration::ZERO).await;
    let (status, body) = server.api("GET", "/health", None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = server.api("GET", "/api/unknown", None).await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn a_missing_folder_does_not_stop_the_server() {
    let server = TestServer::start_with(|config| {
        config.static_files.dir = "/nonexistent/herald-web".into();
    })
    .await;
    assert_eq!(server.http("GET", "/", None, None).await.status, 404);
    assert_eq!(server.http("GET", "/health", None, None).await.status, 200);
    let _client = server.connect("alice").await;
}

#[tokio::test]
async fn static_files_can_be_turned_off() {
    let root = site();
    let dir = root.path().join("web");
    let server = TestServer::start_with(move |config| {
        config.static_files.dir = dir;
        config.static_files.enabled = false;
    })
    .await;
    assert_eq!(server.http("GET", "/", None, None).await.status, 404);
    assert_eq!(server.http("GET", "/app.js", None, None).await.status, 404);
}
