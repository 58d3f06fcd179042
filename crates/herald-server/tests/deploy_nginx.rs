//! `deploy/nginx/herald.conf` run by a real nginx: TLS terminates in nginx (a certificate from a
//! test authority), and clients speak wss through it to a real Herald. Skipped with a notice
//! when nginx is not installed, unless `HERALD_REQUIRE_NGINX=1` (CI sets it).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;

use common::tls::{SERVER_NAME, TestCa};
use common::{Client, EVENT_TIMEOUT, TestServer, free_port};
use herald_protocol::ServerEvent;
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A source address other than the proxy's own (127.0.0.1), so the client's address can be
/// told apart from nginx's.
const CLIENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A running nginx with the repository's config, in one process (no workers that could outlive
/// it), stopped when dropped.
struct Nginx {
    port: u16,
    _child: Child,
    _dir: tempfile::TempDir,
}

fn nginx_binary() -> Option<&'static str> {
    ["nginx", "/usr/sbin/nginx"].into_iter().find(|binary| {
        std::process::Command::new(binary)
            .arg("-v")
            .stderr(Stdio::null())
            .status()
            .is_ok()
    })
}

/// Replaces `from` with `to` in the config, which must contain it: a config that drifts from
/// what this test adapts fails here rather than testing something else.
fn adapt(config: &mut String, from: &str, to: &str) {
    assert!(
        config.contains(from),
        "deploy/nginx/herald.conf has no {from:?}"
    );
    *config = config.replace(from, to);
}

/// Starts nginx in front of `upstream`, or returns `None` (after a notice) when nginx is absent
/// and not required.
async fn start_nginx(upstream: SocketAddr, ca: &TestCa) -> Option<Nginx> {
    start_nginx_for(&[upstream], ca).await
}

/// Starts nginx in front of every node of `upstreams` (the config's one `server` line becomes
/// one per node).
async fn start_nginx_for(upstreams: &[SocketAddr], ca: &TestCa) -> Option<Nginx> {
    let Some(binary) = nginx_binary() else {
        if std::env::var("HERALD_REQUIRE_NGINX").as_deref() == Ok("1") {
            panic!("nginx is not installed and HERALD_REQUIRE_NGINX=1");
        }
        eprintln!("NOTICE: nginx is not installed: the nginx deployment test is SKIPPED");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    ca.install(&ca.issue());
    let port = free_port();
    let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut site = std::fs::read_to_string(repository.join("deploy/nginx/herald.conf")).unwrap();
    let servers: Vec<String> = upstreams
        .iter()
        .map(|upstream| format!("server {upstream};"))
        .collect();
    adapt(&mut site, "server 127.0.0.1:8080;", &servers.join("\n    "));
    adapt(
        &mut site,
        "listen 443 ssl;",
        &format!("listen 127.0.0.1:{port} ssl;"),
    );
    adapt(
        &mut site,
        "listen 80;",
        &format!("listen 127.0.0.1:{};", free_port()),
    );
    adapt(&mut site, "listen [::]:443 ssl;", "");
    adapt(&mut site, "listen [::]:80;", "");
    adapt(
        &mut site,
        "/etc/letsencrypt/live/chat.example.com/fullchain.pem",
        ca.cert_path().to_str().unwrap(),
    );
    adapt(
        &mut site,
        "/etc/letsencrypt/live/chat.example.com/privkey.pem",
        ca.key_path().to_str().unwrap(),
    );
    std::fs::write(dir.path().join("herald.conf"), site).unwrap();
    let prefix = dir.path().display();
    let main = format!(
        "daemon off;\n\
         master_process off;\n\
         pid {prefix}/nginx.pid;\n\
         error_log {prefix}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
             access_log off;\n\
             client_body_temp_path {prefix}/body;\n\
             proxy_temp_path {prefix}/proxy;\n\
             fastcgi_temp_path {prefix}/fastcgi;\n\
             uwsgi_temp_path {prefix}/uwsgi;\n\
             scgi_temp_path {prefix}/scgi;\n\
             include {prefix}/herald.conf;\n\
         }}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
    let mut child = Command::new(binary)
        .arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // nginx announces nothing when it is ready: poll its port, watching for an early exit.
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            panic!("nginx exited with {status}:\n{log}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nginx did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Some(Nginx {
        port,
        _child: child,
        _dir: dir,
    })
}

/// Opens wss://localhost:PORT/... through nginx from [`CLIENT_ADDRESS`], with an optional
/// Origin, and reads the welcome.
async fn connect_through(
    nginx: &Nginx,
    ca: &TestCa,
    path_and_query: &str,
    origin: Option<&str>,
) -> Client<TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((CLIENT_ADDRESS, 0))).unwrap();
    let tcp = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], nginx.port)))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
    let tls = ca
        .connector()
        .connect(name, tcp)
        .await
        .expect("TLS handshake with nginx");
    let url = format!("wss://{SERVER_NAME}:{}{path_and_query}", nginx.port);
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("WebSocket handshake through nginx");
    Client::from_socket(ws).await
}

#[tokio::test]
async fn clients_chat_over_wss_through_nginx() {
    let server = TestServer::start().await;
    let ca = TestCa::new();
    let Some(nginx) = start_nginx(server.addr, &ca).await else {
        return;
    };
    let query = |user: &str| format!("/ws?token={}", server.token(user));
    let mut alice = connect_through(&nginx, &ca, &query("alice"), None).await;
    // A browser page served through the proxy sends its own origin: nginx passes the Host
    // with its port, so Herald's Origin check accepts it.
    let page_origin = format!("https://{SERVER_NAME}:{}", nginx.port);
    let mut bob = connect_through(&nginx, &ca, &query("bob"), Some(&page_origin)).await;
    assert_eq!(alice.welcome.user, "alice");

    alice.join("lobby").await;
    bob.join("lobby").await;
    alice
        .request(json!({"type": "publish", "room": "lobby", "content": {"text": "via nginx"}}))
        .await;
    let ServerEvent::Message(message) = bob
        .next_matching(|e| matches!(e, ServerEvent::Message(_)))
        .await
    else {
        unreachable!()
    };
    assert_eq!(message.from, "alice");
    assert_eq!(message.content.unwrap().get(), r#"{"text":"via nginx"}"#);

    // The server's shutdown reaches the client through the proxy as Close 1001.
    let stopped = tokio::spawn(server.stop());
    let close = alice
        .expect_close()
        .await
        .expect("a close frame through nginx");
    assert_eq!(u16::from(close.code), 1001);
    stopped.await.unwrap();
}

/// With nginx as a trusted proxy, `GET /api/connections` shows the client's own address (from
/// X-Forwarded-For), not nginx's. Needs `server.trusted_proxies` and the `addr` field of the
/// connections API, which land with the robustness work.
#[tokio::test]
async fn a_client_behind_the_trusted_proxy_is_seen_with_its_own_address() {
    let settings = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        settings.path(),
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n",
    )
    .unwrap();
    let loaded = herald_server::config::Config::load(Some(settings.path()), [])
        .expect("server.trusted_proxies is a known key");
    let server = TestServer::start_with(|config| {
        let listen = config.server.listen;
        config.server = loaded.server;
        config.server.listen = listen;
    })
    .await;
    let ca = TestCa::new();
    let Some(nginx) = start_nginx(server.addr, &ca).await else {
        return;
    };
    let query = format!("/ws?token={}", server.token("alice"));
    let alice = connect_through(&nginx, &ca, &query, None).await;
    let (status, body) = server.api("GET", "/api/connections?user=alice", None).await;
    assert_eq!(status, 200, "{body}");
    let entry = &body["connections"][0];
    assert_eq!(entry["id"], alice.welcome.conn.as_str());
    let addr = entry["addr"].as_str().expect("an addr field");
    assert_eq!(addr.split(':').next(), Some("127.0.0.2"), "{entry}");
}

/// Three nodes on one Redis behind the repository's nginx config are one service: clients
/// spread over the nodes chat in one room, and a client whose node goes away reconnects through
/// nginx to another and recovers exactly what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_redis_behind_nginx_are_one_service() {
    let Some(redis) = common::redis::RedisServer::start().await else {
        return;
    };
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.push(
            TestServer::start_with(|config| {
                config.engine.backend = herald_server::config::EngineBackend::Redis;
                config.redis.urls = vec![redis.url()];
                config.server.node_id = format!("node{n}");
            })
            .await,
        );
    }
    let ca = TestCa::new();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|node| node.addr).collect();
    let Some(nginx) = start_nginx_for(&addrs, &ca).await else {
        return;
    };
    let tokens: std::collections::HashMap<&str, String> = ["ann", "ben", "cat"]
        .into_iter()
        .map(|user| (user, nodes[0].token(user)))
        .collect();
    let query = |user: &str| format!("/ws?token={}", tokens[user]);
    let mut clients = Vec::new();
    for user in ["ann", "ben", "cat"] {
        let mut client = connect_through(&nginx, &ca, &query(user), None).await;
        client.join("plaza").await;
        clients.push(client);
    }
    let mut seen: Vec<&str> = clients.iter().map(|c| c.welcome.node.as_str()).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(
        seen.len(),
        3,
        "least_conn spreads three clients over three nodes"
    );

    let first = clients[0].publish("plaza", json!("hello")).await;
    for client in &mut clients[1..] {
        assert_eq!(client.next_message_event().await.offset, Some(first));
    }

    // Ben's node goes away: he is told to reconnect (1001), comes back through nginx to a
    // surviving node and recovers what was published meanwhile.
    let ben_node = clients[1].welcome.node.clone();
    let index = nodes
        .iter()
        .position(|n| n.node.id().as_ref() == ben_node)
        .unwrap();
    let stopping = nodes.remove(index);
    let stopped = tokio::spawn(stopping.stop());
    let close = clients[1].expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1001);
    stopped.await.unwrap();
    let missed = clients[0].publish("plaza", json!("while away")).await;
    let mut ben = connect_through(&nginx, &ca, &query("ben"), None).await;
    assert_ne!(ben.welcome.node, ben_node);
    let ack = ben
        .ack(json!({"type": "join", "room": "plaza", "since": first}))
        .await;
    assert_eq!(ack.recovered, Some(true));
    let message = ben.next_message_event().await;
    assert_eq!(message.offset, Some(missed));
}
