//! Test harness: a real Herald server on an ephemeral port and a real WebSocket client
//! (tokio-tungstenite, an implementation independent of the server's), an HTTP client for the
//! server API (ureq), and in `tls` a test certificate authority (rcgen).
#![allow(dead_code)]

pub mod hostile;
pub mod pending;
pub mod process;
pub mod redis;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use herald_protocol::{Ack, History, Message, PresenceDiff, ServerEvent, Welcome};
use herald_server::config::Config;
use herald_server::node::Node;
use herald_server::tls::ServerTls;
use herald_server::{build_node, server};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789";
/// The server API key every test server accepts.
pub const API_KEY: &str = "test-api-key-0123456789";
/// Upper bound on waiting for any event the test expects; never a sleep.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    /// The TLS side, for servers started with `start_tls_with`.
    pub tls: Option<Arc<ServerTls>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The server's own data folder (`store.path`), removed when the server is dropped.
    _data: TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server whose config the caller may adjust first. It stores its data in a
    /// fresh temporary folder unless `adjust` names another `store.path`.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        Self::launch(adjust, false).await
    }

    /// Starts an HTTPS/WSS server; `adjust` must set `tls.cert` and `tls.key`.
    pub async fn start_tls_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        Self::launch(adjust, true).await
    }

    async fn launch(adjust: impl FnOnce(&mut Config), tls: bool) -> TestServer {
        let data = tempfile::tempdir().expect("a temporary data folder");
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.auth.secret = Some(SECRET.to_owned());
        config.api.keys = vec![API_KEY.to_owned()];
        config.store.path = data.path().to_owned();
        // Presence diffs go out on a timer, at a moment a test does not choose: off unless a
        // test turns it on ([`presence_on`]), so other tests see only the events they cause.
        config.presence.off = vec!["*".to_owned()];
        adjust(&mut config);
        let tls = tls.then(|| ServerTls::load(&config.tls).expect("test certificate loads"));
        let node = build_node(config.clone(), None)
            .await
            .expect("test config is valid");
        let listener = server::bind(config.server.listen).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = async move {
            let _ = stopped.await;
        };
        let task = match &tls {
            Some(tls) => tokio::spawn(server::run_tls(
                listener,
                node.clone(),
                tls.clone(),
                stopped,
            )),
            None => tokio::spawn(server::run(listener, node.clone(), stopped)),
        };
        TestServer {
            addr,
            node,
            tls,
            stop: Some(stop),
            task: Some(task),
            _data: data,
        }
    }

    /// Sends the shutdown signal without waiting for the server to finish.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Calls the server API with the test key; returns the status and the JSON body.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_with_key(method, path, body, Some(API_KEY)).await
    }

    /// Calls the server API with any key (or none).
    pub async fn api_with_key(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        let reply = self
            .http(method, path, body.map(|b| b.to_string()), key)
            .await;
        let json = serde_json::from_str(&reply.body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {:?}", reply.body));
        (reply.status, json)
    }

    /// One plain HTTP request with an optional body (sent as JSON) and bearer key.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        key: Option<&str>,
    ) -> HttpReply {
        fetch(self.http_url(path), method, body, key).await
    }

    /// Reads `/metrics`.
    pub async fn scrape(&self) -> Scrape {
        let reply = self.http("GET", "/metrics", None, None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        Scrape::parse(&reply.body)
    }

    /// Scrapes until `moved` holds. For effects that happen after the client has seen
    /// everything (cleanup after a close), where the metric itself is the only event.
    pub async fn scrape_until(&self, moved: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            let scrape = self.scrape().await;
            if moved(&scrape) {
                return scrape;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "metrics did not move in time:\n{}",
                scrape.text
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A request written byte for byte (no client-side path normalisation); returns the raw
    /// response head and body.
    pub async fn raw_http(&self, request_line_target: &str) -> String {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        let request = format!(
            "GET {request_line_target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(EVENT_TIMEOUT, stream.read_to_end(&mut response))
            .await
            .expect("timed out waiting for the response")
            .unwrap();
        String::from_utf8_lossy(&response).into_owned()
    }

    pub fn token(&self, user: &str) -> String {
        self.token_with(user, false, None, Duration::from_secs(3600))
    }

    pub fn token_with(
        &self,
        user: &str,
        admin: bool,
        rooms: Option<Vec<&str>>,
        ttl: Duration,
    ) -> String {
        self.node
            .auth()
            .mint(
                user,
                admin,
                rooms.map(|r| r.into_iter().map(str::to_owned).collect()),
                ttl,
            )
            .unwrap()
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Connects as `user` with a token in the query and reads the welcome.
    pub async fn connect(&self, user: &str) -> Client {
        let token = self.token(user);
        Client::open(&self.url(&format!("/ws?token={token}"))).await
    }

    /// Connects with a token carrying the given claims.
    pub async fn connect_with(&self, user: &str, admin: bool, rooms: Option<Vec<&str>>) -> Client {
        let token = self.token_with(user, admin, rooms, Duration::from_secs(3600));
        Client::open(&self.url(&format!("/ws?token={token}"))).await
    }

    /// Stops the server the way a signal does and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One scrape of `/metrics`: each sample line by its series (`name{labels}`).
pub struct Scrape {
    pub text: String,
    samples: std::collections::HashMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect();
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    /// One series, or `None` when the scrape does not have it.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// One series, e.g. `herald_messages_in_total{type="join"}`; 0 when absent.
    pub fn value(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }

    /// The sum of every series of a metric, whatever its labels.
    pub fn total(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(series, _)| {
                series.as_str() == name || series.starts_with(&format!("{name}{{"))
            })
            .map(|(_, value)| value)
            .sum()
    }
}

/// An HTTP response as the tests see it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// One HTTP request with ureq (blocking, so on the blocking pool).
pub async fn fetch(
    url: String,
    method: &str,
    body: Option<String>,
    key: Option<&str>,
) -> HttpReply {
    let method = http::Method::from_bytes(method.as_bytes()).unwrap();
    let key = key.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(EVENT_TIMEOUT))
            .build()
            .into();
        let mut request = http::Request::builder().method(method).uri(&url);
        if let Some(key) = key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let response = match body {
            Some(body) => agent.run(
                request
                    .header("Content-Type", "application/json")
                    .body(body)
                    .unwrap(),
            ),
            None => agent.run(request.body(()).unwrap()),
        };
        let mut response = response.unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
        HttpReply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.body_mut().read_to_string().unwrap_or_default(),
        }
    })
    .await
    .unwrap()
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client<S = MaybeTlsStream<TcpStream>> {
    pub ws: WebSocketStream<S>,
    pub welcome: Welcome,
    next_id: u64,
    /// Events that arrived while `request` waited for its answer, returned by `next_event`.
    pending: std::collections::VecDeque<ServerEvent>,
}

/// How a handshake failed: the HTTP status and the JSON `error` text.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub body: String,
}

impl Client {
    pub async fn open(url: &str) -> Client {
        Self::open_request(url.into_client_request().unwrap())
            .await
            .unwrap_or_else(|refusal| panic!("handshake refused: {refusal:?}"))
    }

    /// Opens a connection from a full request (custom headers), reading the welcome.
    pub async fn open_request(
        request: tungstenite::handshake::client::Request,
    ) -> Result<Client, Refusal> {
        let ws = handshake(request).await?;
        Ok(Client::from_socket(ws).await)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Wraps an open WebSocket and reads the welcome.
    pub async fn from_socket(ws: WebSocketStream<S>) -> Client<S> {
        let mut client = Client {
            ws,
            welcome: Welcome {
                conn: String::new(),
                user: String::new(),
                node: String::new(),
                heartbeat: 0,
            },
            next_id: 0,
            pending: Default::default(),
        };
        match client.next_event().await {
            ServerEvent::Welcome(welcome) => client.welcome = welcome,
            other => panic!("expected welcome first, got {other:?}"),
        }
        client
    }

    pub async fn send_json(&mut self, value: Value) {
        self.ws
            .send(WsMessage::text(value.to_string()))
            .await
            .expect("send failed");
    }

    pub async fn send_raw(&mut self, message: WsMessage) {
        self.ws.send(message).await.expect("send failed");
    }

    /// Sends a request with a fresh `id` and returns the `ack`, `members`, `pong` or `error`
    /// that answers it. Events arriving in between are kept for `next_event`.
    pub async fn request(&mut self, mut value: Value) -> ServerEvent {
        self.next_id += 1;
        let id = format!("r{}", self.next_id);
        value["id"] = json!(id);
        self.send_json(value).await;
        let mut skipped = Vec::new();
        let answer = loop {
            let event = self.read_event().await;
            if reference_of(&event) == Some(id.as_str()) {
                break event;
            }
            skipped.push(event);
        };
        self.pending.extend(skipped);
        answer
    }

    /// The next text event from the server (Ping frames are answered by the library).
    pub async fn next_event(&mut self) -> ServerEvent {
        match self.pending.pop_front() {
            Some(event) => event,
            None => self.read_event().await,
        }
    }

    async fn read_event(&mut self) -> ServerEvent {
        loop {
            match self.next_message().await {
                WsMessage::Text(text) => {
                    return ServerEvent::decode(&text)
                        .unwrap_or_else(|e| panic!("undecodable event {text}: {e}"));
                }
                WsMessage::Binary(bytes) => {
                    let (header, _) = ServerEvent::decode_binary(&bytes).unwrap();
                    return ServerEvent::Message(header);
                }
                WsMessage::Close(frame) => panic!("connection closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next WebSocket message of any kind but Ping/Pong.
    pub async fn next_message(&mut self) -> WsMessage {
        next_frame(&mut self.ws).await
    }

    pub async fn next_matching(
        &mut self,
        mut accept: impl FnMut(&ServerEvent) -> bool,
    ) -> ServerEvent {
        loop {
            let event = self.next_event().await;
            if accept(&event) {
                return event;
            }
        }
    }

    /// Reads until the server closes; returns the close frame, skipping other messages.
    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        loop {
            let next = tokio::time::timeout(EVENT_TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for close");
            match next {
                Some(Ok(WsMessage::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn join(&mut self, room: &str) -> ServerEvent {
        self.request(json!({"type": "join", "room": room})).await
    }

    /// Sends a request and returns its `ack`, panicking on anything else.
    pub async fn ack(&mut self, value: Value) -> Ack {
        match self.request(value).await {
            ServerEvent::Ack(ack) => ack,
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    /// Sends `request` with the given `id`, as a client retrying it would, and returns its ack.
    pub async fn ack_with_id(&mut self, mut request: Value, id: &str) -> Ack {
        request["id"] = json!(id);
        self.send_json(request).await;
        match self
            .next_matching(|event| reference_of(event) == Some(id))
            .await
        {
            ServerEvent::Ack(ack) => ack,
            other => panic!("expected an ack for {id}, got {other:?}"),
        }
    }

    /// Publishes a stored message and returns its offset.
    pub async fn publish(&mut self, room: &str, content: Value) -> u64 {
        let ack = self
            .ack(json!({"type": "publish", "room": room, "content": content}))
            .await;
        ack.offset.expect("a stored message has an offset")
    }

    /// Asks for a page of history.
    pub async fn history(&mut self, value: Value) -> History {
        let mut request = value;
        request["type"] = json!("history");
        match self.request(request).await {
            ServerEvent::History(history) => history,
            other => panic!("expected history, got {other:?}"),
        }
    }

    /// The next `presence_diff` of `room`, skipping other events.
    pub async fn next_diff(&mut self, room: &str) -> PresenceDiff {
        match self
            .next_matching(|event| matches!(event, ServerEvent::PresenceDiff(d) if d.room == room))
            .await
        {
            ServerEvent::PresenceDiff(diff) => diff,
            _ => unreachable!(),
        }
    }

    /// Reads diffs of `room` until one says a user `present` (in or out of the room).
    pub async fn diff_listing(&mut self, room: &str, user: &str, present: bool) -> PresenceDiff {
        loop {
            let diff = self.next_diff(room).await;
            let list = if present { &diff.joined } else { &diff.left };
            if list
                .as_ref()
                .is_some_and(|users| users.iter().any(|u| u == user))
            {
                return diff;
            }
        }
    }

    /// The next message event, skipping presence and other events.
    pub async fn next_message_event(&mut self) -> Message {
        match self
            .next_matching(|event| matches!(event, ServerEvent::Message(_)))
            .await
        {
            ServerEvent::Message(message) => message,
            _ => unreachable!(),
        }
    }

    /// Proves that nothing is queued for this client: a ping's pong is the next event.
    pub async fn expect_nothing_queued(&mut self) {
        self.expect_nothing_queued_but(|_| false).await;
    }

    /// Proves that nothing but events `allowed` accepts is queued for this client: they may
    /// come before a ping's pong, anything else fails the test.
    pub async fn expect_nothing_queued_but(&mut self, allowed: impl Fn(&ServerEvent) -> bool) {
        self.send_json(json!({"type": "ping", "id": "nothing-queued"}))
            .await;
        loop {
            let next = self.next_event().await;
            if matches!(&next, ServerEvent::Pong(pong) if pong.reference.as_deref() == Some("nothing-queued"))
            {
                return;
            }
            assert!(
                allowed(&next),
                "expected nothing before the pong, got {next:?}"
            );
        }
    }
}

/// Turns room presence events on, with a window short enough for tests that only need them
/// to arrive.
pub fn presence_on(config: &mut Config) {
    config.presence.off.clear();
    config.presence.window = Duration::from_millis(20);
}

/// A loopback port nothing listens on at the moment of the call (for a process the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The JSON content of a message.
pub fn content_json(message: &Message) -> Value {
    serde_json::from_str(message.content.as_ref().expect("content").get()).unwrap()
}

/// The next message of any kind but Ping/Pong on a raw WebSocket (one that may have had no
/// welcome), within [`EVENT_TIMEOUT`].
pub async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> WsMessage {
    loop {
        let message = tokio::time::timeout(EVENT_TIMEOUT, ws.next())
            .await
            .expect("timed out waiting for the server")
            .expect("connection ended")
            .expect("websocket error");
        if !matches!(message, WsMessage::Ping(_) | WsMessage::Pong(_)) {
            return message;
        }
    }
}

pub async fn handshake(
    request: tungstenite::handshake::client::Request,
) -> Result<Socket, Refusal> {
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _response)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err(Refusal { status, body })
        }
        Err(other) => panic!("handshake failed: {other}"),
    }
}

/// A plain HTTP/1.1 exchange over a real socket: `(status, lower-cased headers, body)`.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, stream.read_to_end(&mut response))
        .await
        .expect("timed out reading the response")
        .unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// Attempts a handshake that must be refused, and returns how.
pub async fn refusal(request: tungstenite::handshake::client::Request) -> Refusal {
    match handshake(request).await {
        Ok(_) => panic!("handshake unexpectedly accepted"),
        Err(refusal) => refusal,
    }
}

pub fn reference_of(event: &ServerEvent) -> Option<&str> {
    match event {
        ServerEvent::Ack(ack) => ack.reference.as_deref(),
        ServerEvent::Members(members) => members.reference.as_deref(),
        ServerEvent::Presence(reply) => reply.reference.as_deref(),
        ServerEvent::Error(error) => error.reference.as_deref(),
        ServerEvent::Pong(pong) => pong.reference.as_deref(),
        ServerEvent::History(history) => history.reference.as_deref(),
        _ => None,
    }
}

/// The content of a message event as JSON.
pub fn content_of(event: &ServerEvent) -> Value {
    match event {
        ServerEvent::Message(message) => {
            serde_json::from_str(message.content.as_ref().expect("content").get()).unwrap()
        }
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The status code of a raw HTTP response (as [`TestServer::raw_http`] returns it); 0 when
/// there is none.
pub fn status_of(raw: &str) -> u16 {
    raw.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
