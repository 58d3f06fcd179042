//! permessage-deflate (RFC 7692) on a real server: what the handshake agrees to, and that clients
//! with and without it exchange every kind of message on one server. tokio-tungstenite has no
//! deflate, so the deflate side is yawc's client; its socket keeps a copy of what it reads, so
//! the tests can look at the frames as they travelled.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use common::{Client, EVENT_TIMEOUT, TestServer, content_of};
use futures::{SinkExt, StreamExt};
use herald_protocol::{ServerEvent, binary};
use http::header::SEC_WEBSOCKET_EXTENSIONS;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yawc::close::CloseCode;
use yawc::{CompressionLevel, Frame, HttpRequest, OpCode, Options, WebSocket};

/// What the server answers a plain `permessage-deflate` offer with, by default.
const DEFAULT_AGREEMENT: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The server's default compression threshold.
const THRESHOLD: usize = 64;

/// A TCP stream that keeps a copy of every byte it reads.
struct RecordingStream {
    inner: TcpStream,
    read: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for RecordingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let start = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.read
                .lock()
                .unwrap()
                .extend_from_slice(&buf.filled()[start..]);
        }
        polled
    }
}

impl AsyncWrite for RecordingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A server frame as it crossed the wire.
#[derive(Debug)]
struct WireFrame {
    /// RSV1: the message was compressed.
    compressed: bool,
    opcode: u8,
    wire_len: usize,
    /// The payload as sent (compressed, if `compressed`).
    payload: Vec<u8>,
}

/// yawc's client over a [`RecordingStream`].
struct DeflateClient {
    ws: WebSocket<RecordingStream>,
    read: Arc<Mutex<Vec<u8>>>,
    next_id: u64,
}

impl DeflateClient {
    /// Connects with `options` (which decide the offer) and reads the welcome.
    async fn connect(server: &TestServer, user: &str, options: Options) -> DeflateClient {
        let url = server.url(&format!("/ws?token={}", server.token(user)));
        DeflateClient::open(server.addr, &url, options).await
    }

    /// Connects to `url` on `addr` with `options` and reads the welcome.
    async fn open(addr: SocketAddr, url: &str, options: Options) -> DeflateClient {
        let read = Arc::new(Mutex::new(Vec::new()));
        let io = RecordingStream {
            inner: TcpStream::connect(addr).await.unwrap(),
            read: read.clone(),
        };
        let handshake = WebSocket::handshake_with_request(
            url.parse().unwrap(),
            io,
            options,
            HttpRequest::builder(),
        );
        let ws = tokio::time::timeout(EVENT_TIMEOUT, handshake)
            .await
            .expect("handshake timed out")
            .expect("handshake failed");
        let mut client = DeflateClient {
            ws,
            read,
            next_id: 0,
        };
        match client.next_event().await {
            ServerEvent::Welcome(_) => client,
            other => panic!("expected welcome first, got {other:?}"),
        }
    }

    /// The response's `Sec-WebSocket-Extensions`, as received.
    fn extensions(&self) -> Option<String> {
        let read = self.read.lock().unwrap();
        let head_end = find(&read, b"\r\n\r\n").expect("a complete response head");
        let head = std::str::from_utf8(&read[..head_end]).unwrap();
        head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case(SEC_WEBSOCKET_EXTENSIONS.as_str())
                .then(|| value.trim().to_owned())
        })
    }

    /// Every frame the server sent so far.
    fn frames_received(&self) -> Vec<WireFrame> {
        let read = self.read.lock().unwrap();
        let mut rest = &read[find(&read, b"\r\n\r\n").unwrap() + 4..];
        let mut frames = Vec::new();
        while rest.len() >= 10 || (rest.len() >= 2 && rest[1] < 126) {
            let (header, len) = match rest[1] & 0x7F {
                126 => (4, usize::from(u16::from_be_bytes([rest[2], rest[3]]))),
                127 => (
                    10,
                    u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize,
                ),
                short => (2, usize::from(short)),
            };
            if rest.len() < header + len {
                break; // still arriving
            }
            frames.push(WireFrame {
                compressed: rest[0] & 0x40 != 0,
                opcode: rest[0] & 0x0F,
                wire_len: len,
                payload: rest[header..header + len].to_vec(),
            });
            rest = &rest[header + len..];
        }
        frames
    }

    async fn send(&mut self, frame: Frame) {
        self.ws.send(frame).await.expect("send failed");
    }

    async fn send_json(&mut self, value: Value) {
        self.send(Frame::text(value.to_string())).await;
    }

    /// The next frame other than Ping or Pong.
    async fn next_frame(&mut self) -> Frame {
        loop {
            let frame = tokio::time::timeout(EVENT_TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for the server")
                .expect("connection ended");
            if !matches!(frame.opcode(), OpCode::Ping | OpCode::Pong) {
                return frame;
            }
        }
    }

    /// The next event; a binary message comes with its payload.
    async fn next_event_with_payload(&mut self) -> (ServerEvent, Option<Bytes>) {
        let frame = self.next_frame().await;
        match frame.opcode() {
            OpCode::Text => (ServerEvent::decode(frame.as_str()).unwrap(), None),
            OpCode::Binary => {
                let (header, payload) = ServerEvent::decode_binary(frame.payload()).unwrap();
                (ServerEvent::Message(header), Some(payload))
            }
            OpCode::Close => panic!("connection closed: {:?}", frame.close_code()),
            other => panic!("unexpected {other:?} frame"),
        }
    }

    async fn next_event(&mut self) -> ServerEvent {
        self.next_event_with_payload().await.0
    }

    /// Sends a request with a fresh `id` and waits for the event answering it.
    async fn request(&mut self, mut value: Value) -> ServerEvent {
        self.next_id += 1;
        let id = format!("d{}", self.next_id);
        value["id"] = json!(id);
        self.send_json(value).await;
        loop {
            let event = self.next_event().await;
            if common::reference_of(&event) == Some(id.as_str()) {
                return event;
            }
        }
    }

    /// The next message event, skipping presence and other events.
    async fn next_message(&mut self) -> (ServerEvent, Option<Bytes>) {
        loop {
            let (event, payload) = self.next_event_with_payload().await;
            if matches!(event, ServerEvent::Message(_)) {
                return (event, payload);
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A client that offers plain `permessage-deflate` and, like the server, sends messages under
/// the threshold uncompressed.
fn deflate_offer() -> Options {
    Options::default()
        .with_compression_level(CompressionLevel::fast())
        .with_compression_threshold(THRESHOLD)
}

async fn compressing_server() -> TestServer {
    TestServer::start_with(|config| config.compression.enabled = true).await
}

/// Text that deflate shrinks a lot, as chat traffic does, `len` bytes long.
fn chatty_text(len: usize) -> String {
    "the quick brown fox jumps over the lazy dog; "
        .chars()
        .cycle()
        .take(len)
        .collect()
}

/// Random letters repeating every `period` bytes: deflate finds matches in them only with a
/// window of at least `period` bytes.
fn periodic_letters(len: usize, period: usize) -> String {
    let mut state = 0x2545_F491_u32;
    let block: Vec<char> = (0..period)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect();
    block.iter().cycle().take(len).collect()
}

#[tokio::test]
async fn deflate_and_plain_clients_exchange_small_and_large_messages_on_one_server() {
    let server = compressing_server().await;
    let mut deflate = DeflateClient::connect(&server, "dora", deflate_offer()).await;
    let mut plain = server.connect("pat").await;
    assert_eq!(deflate.extensions().as_deref(), Some(DEFAULT_AGREEMENT));
    assert!(matches!(
        deflate
            .request(json!({"type": "join", "room": "mix"}))
            .await,
        ServerEvent::Ack(_)
    ));
    assert!(matches!(plain.join("mix").await, ServerEvent::Ack(_)));

    let large = chatty_text(30_000);
    let large_binary = chatty_text(20_000);

    // From the deflate client to the plain one: small and large text, large binary.
    for content in [json!(1), json!(large)] {
        deflate
            .send_json(json!({"type": "publish", "room": "mix", "content": content, "echo": false}))
            .await;
        let event = plain
            .next_matching(|e| matches!(e, ServerEvent::Message(_)))
            .await;
        assert_eq!(content_of(&event), content);
    }
    let header = br#"{"type":"publish","room":"mix","echo":false}"#;
    deflate
        .send(Frame::binary(binary::join(header, large_binary.as_bytes())))
        .await;
    let WsMessage::Binary(frame) = plain.next_message().await else {
        panic!("expected the binary message");
    };
    let (_, payload) = ServerEvent::decode_binary(&frame).unwrap();
    assert_eq!(payload, large_binary.as_bytes());

    // From the plain client to the deflate one: the same three.
    for content in [json!(2), json!(large)] {
        plain
            .send_json(json!({"type": "publish", "room": "mix", "content": content, "echo": false}))
            .await;
        let (event, _) = deflate.next_message().await;
        assert_eq!(content_of(&event), content);
    }
    plain
        .send_raw(WsMessage::Binary(binary::join(
            header,
            large_binary.as_bytes(),
        )))
        .await;
    let (_, payload) = deflate.next_message().await;
    assert_eq!(payload.unwrap(), large_binary.as_bytes());

    // An acknowledged request, so a reply under the threshold is among the frames.
    assert!(matches!(
        deflate
            .request(json!({"type": "leave", "room": "mix"}))
            .await,
        ServerEvent::Ack(_)
    ));
    let frames = deflate.frames_received();
    assert!(
        frames.iter().any(|f| f.opcode == 1 && !f.compressed),
        "replies under the threshold go uncompressed: {frames:?}"
    );
    for frame in &frames {
        assert!(
            frame.compressed || frame.wire_len < THRESHOLD,
            "a message over the threshold went uncompressed: {frame:?}"
        );
    }
    let largest = frames.iter().map(|f| f.wire_len).max().unwrap();
    assert!(
        largest < 20_000 / 10,
        "20 and 30 kB messages take {largest} bytes on the wire"
    );
}

#[tokio::test]
async fn a_client_that_offers_nothing_gets_no_extension() {
    let server = compressing_server().await;
    let url = server.url(&format!("/ws?token={}", server.token("pat")));
    let (_ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.headers().get(SEC_WEBSOCKET_EXTENSIONS), None);
}

#[tokio::test]
async fn with_compression_off_a_deflate_offer_is_declined_and_messages_flow_uncompressed() {
    let server = TestServer::start().await;
    let mut deflate = DeflateClient::connect(&server, "dora", deflate_offer()).await;
    assert_eq!(deflate.extensions(), None);
    let large = chatty_text(30_000);
    deflate
        .request(json!({"type": "join", "room": "solo"}))
        .await;
    deflate
        .send_json(json!({"type": "publish", "room": "solo", "content": large, "echo": true}))
        .await;
    let (event, _) = deflate.next_message().await;
    assert_eq!(content_of(&event), json!(large));
    assert!(deflate.frames_received().iter().all(|f| !f.compressed));
}

#[tokio::test]
async fn a_requested_server_window_is_agreed_and_kept() {
    let server = compressing_server().await;
    let mut deflate = DeflateClient::connect(
        &server,
        "dora",
        deflate_offer().with_server_max_window_bits(10),
    )
    .await;
    assert_eq!(
        deflate.extensions().as_deref(),
        Some(&*format!("{DEFAULT_AGREEMENT}; server_max_window_bits=10"))
    );
    // Text that repeats every 4 KiB and is random within: with its window limited to 1 KiB the
    // server finds no match, and the message cannot shrink much below its 4.7 bits a letter.
    let repeating = periodic_letters(40_000, 4096);
    deflate
        .request(json!({"type": "join", "room": "solo"}))
        .await;
    deflate
        .send_json(json!({"type": "publish", "room": "solo", "content": repeating, "echo": true}))
        .await;
    let (event, _) = deflate.next_message().await;
    assert_eq!(content_of(&event), json!(repeating));
    let echo = deflate.frames_received().into_iter().last().unwrap();
    assert!(echo.compressed);
    assert!(
        echo.wire_len > 40_000 / 2,
        "a 15-bit window would have shrunk it to a tenth: {echo:?}"
    );
}

#[tokio::test]
async fn a_compressed_message_inflating_past_the_size_limit_closes_with_1009() {
    let server = TestServer::start_with(|config| {
        config.compression.enabled = true;
        config.limits.max_message_bytes = 64 * 1024;
    })
    .await;
    let mut deflate = DeflateClient::connect(&server, "dora", deflate_offer()).await;
    // A megabyte of one letter deflates to about a kilobyte.
    let bomb = json!({"type": "publish", "room": "solo", "content": "a".repeat(1 << 20)});
    deflate.send_json(bomb).await;
    let close = deflate.next_frame().await;
    assert_eq!(close.opcode(), OpCode::Close);
    assert_eq!(close.close_code(), Some(CloseCode::Size));
}

#[tokio::test]
async fn a_deflate_client_and_a_plain_client_each_get_the_same_direct_message() {
    let server = compressing_server().await;
    let mut deflate = DeflateClient::connect(&server, "dora", deflate_offer()).await;
    let mut plain: Client = server.connect("dora").await;
    let mut sender = server.connect("sam").await;
    let large = chatty_text(10_000);
    sender
        .send_json(json!({"type": "send", "to": ["dora"], "content": large}))
        .await;
    let (to_deflate, _) = deflate.next_message().await;
    let to_plain = plain
        .next_matching(|e| matches!(e, ServerEvent::Message(_)))
        .await;
    assert_eq!(content_of(&to_deflate), json!(large));
    assert_eq!(content_of(&to_plain), json!(large));
}

/// A `herald serve` process of its own, with compression on, presence off and anonymous users:
/// its metrics count only what this test does.
struct CompressingProcess {
    _child: tokio::process::Child,
    _data: tempfile::TempDir,
    addr: SocketAddr,
}

impl CompressingProcess {
    async fn start() -> CompressingProcess {
        let data = tempfile::tempdir().unwrap();
        let mut child = common::process::herald(data.path())
            .args(["serve", "--anonymous", "--listen", "127.0.0.1:0"])
            .args(["--log-format", "json"])
            .env("HERALD_STORE_PATH", data.path())
            .env("HERALD_COMPRESSION_ENABLED", "true")
            .env("HERALD_PRESENCE_OFF", "*")
            .spawn()
            .unwrap();
        let mut log = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            child.stderr.take().unwrap(),
        ));
        let listening =
            common::process::wait_for_log(&mut log, |entry| entry["address"].is_string()).await;
        let addr = listening["address"].as_str().unwrap().parse().unwrap();
        // The log pipe must keep draining, or a server that logs a lot would block on it.
        tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
        CompressingProcess {
            _child: child,
            _data: data,
            addr,
        }
    }

    fn url(&self, user: &str) -> String {
        format!("ws://{}/ws?user={user}", self.addr)
    }

    async fn compressions(&self) -> f64 {
        let reply = common::fetch(format!("http://{}/metrics", self.addr), "GET", None, None).await;
        common::Scrape::parse(&reply.body).value("herald_deflate_compressions_total")
    }
}

#[tokio::test]
async fn a_room_message_is_compressed_once_for_all_its_deflate_members_and_plain_ones_get_it_plain()
{
    const DEFLATE_MEMBERS: usize = 4;
    let server = CompressingProcess::start().await;
    let join = json!({"type": "join", "room": "fan"});
    let mut deflate = Vec::new();
    for n in 0..DEFLATE_MEMBERS {
        let url = server.url(&format!("d{n}"));
        let mut client = DeflateClient::open(server.addr, &url, deflate_offer()).await;
        assert_eq!(client.extensions().as_deref(), Some(DEFAULT_AGREEMENT));
        assert!(matches!(
            client.request(join.clone()).await,
            ServerEvent::Ack(_)
        ));
        deflate.push(client);
    }
    let mut plain = common::Client::open(&server.url("plain")).await;
    assert!(matches!(plain.join("fan").await, ServerEvent::Ack(_)));
    let mut publisher = common::Client::open(&server.url("publisher")).await;
    assert!(matches!(publisher.join("fan").await, ServerEvent::Ack(_)));

    let before = server.compressions().await;
    let content = json!(chatty_text(2_000));
    publisher.publish("fan", content.clone()).await;
    let to_plain = plain
        .next_matching(|e| matches!(e, ServerEvent::Message(_)))
        .await;
    assert_eq!(content_of(&to_plain), content);
    let mut sent = Vec::new();
    for client in &mut deflate {
        let (event, _) = client.next_message().await;
        assert_eq!(content_of(&event), content);
        let frame = client.frames_received().pop().unwrap();
        assert!(frame.compressed, "{frame:?}");
        assert!(frame.wire_len < 2_000 / 4, "{} bytes", frame.wire_len);
        sent.push(frame.payload);
    }
    assert!(
        sent.windows(2).all(|pair| pair[0] == pair[1]),
        "every deflate member got the same compressed bytes"
    );
    assert_eq!(
        server.compressions().await - before,
        1.0,
        "one compression for {DEFLATE_MEMBERS} deflate members"
    );

    // Each message is compressed once: the second one once more.
    let content = json!(chatty_text(3_000));
    publisher.publish("fan", content.clone()).await;
    for client in &mut deflate {
        let (event, _) = client.next_message().await;
        assert_eq!(content_of(&event), content);
    }
    assert_eq!(server.compressions().await - before, 2.0);
}

/// The measurements behind `docs/conformance.md`, "Compression cost": a `herald serve` process
/// pinned to CPU 0, and yawc clients in this process (run it on CPU 1). Slow, so by hand:
///
/// ```text
/// taskset -c 1 cargo test --release -p herald-server --test compression -- \
///     --ignored --nocapture --test-threads=1
/// ```
mod cost {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};
    use yawc::DeflatePool;

    /// A `herald serve` process with anonymous users, compression on and no rate limit.
    struct ServerProcess {
        child: Child,
        addr: SocketAddr,
    }

    impl ServerProcess {
        fn start(settings: &[(&str, &str)]) -> ServerProcess {
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let mut child = Command::new("taskset")
                .args([
                    "-c",
                    "0",
                    env!("CARGO_BIN_EXE_herald"),
                    "serve",
                    "--anonymous",
                ])
                .args(["--listen", &addr.to_string()])
                .env_remove("RUST_LOG")
                .env("HERALD_LOG_LEVEL", "info")
                .env("HERALD_HEARTBEAT_INTERVAL", "1h")
                .env("HERALD_COMPRESSION_ENABLED", "true")
                .env("HERALD_LIMITS_MESSAGES_PER_SECOND", "1000000")
                .env("HERALD_LIMITS_BURST", "1000000")
                .envs(settings.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("taskset and the herald binary");
            // The log says when the server listens; the thread keeps draining it afterwards.
            let (listening, ready) = mpsc::channel();
            let log = BufReader::new(child.stderr.take().unwrap());
            std::thread::spawn(move || {
                for line in log.lines().map_while(Result::ok) {
                    if line.contains("listening") {
                        let _ = listening.send(());
                    }
                }
            });
            ready
                .recv_timeout(EVENT_TIMEOUT)
                .expect("herald serve did not start");
            ServerProcess { child, addr }
        }

        fn proc_file(&self, name: &str) -> String {
            std::fs::read_to_string(format!("/proc/{}/{name}", self.child.id())).unwrap()
        }

        fn rss_kib(&self) -> f64 {
            let status = self.proc_file("status");
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        }

        /// User plus system CPU time.
        fn cpu(&self) -> Duration {
            let stat = self.proc_file("stat");
            // Fields after the command name, which is in parentheses: utime is 14th, stime 15th.
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            let ticks: u64 =
                fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
            Duration::from_millis(ticks * 1000 / clock_ticks_per_second())
        }

        /// Bytes the process has written to sockets and files.
        fn bytes_written(&self) -> u64 {
            let io = self.proc_file("io");
            let line = io.lines().find(|l| l.starts_with("wchar:")).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        }

        async fn connect(&self, user: &str, options: Options) -> Subscriber {
            let url = format!("ws://{}/ws?user={user}", self.addr);
            let ws = WebSocket::connect(url.parse().unwrap())
                .with_options(options)
                .await
                .expect("connect");
            let mut subscriber = Subscriber { ws };
            subscriber.next_text().await; // welcome
            subscriber
        }
    }

    impl Drop for ServerProcess {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn clock_ticks_per_second() -> u64 {
        let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    struct Subscriber {
        ws: WebSocket<yawc::MaybeTlsStream<TcpStream>>,
    }

    impl Subscriber {
        async fn next_text(&mut self) -> Frame {
            loop {
                let frame = tokio::time::timeout(EVENT_TIMEOUT, self.ws.next())
                    .await
                    .expect("timed out")
                    .expect("connection ended");
                match frame.opcode() {
                    OpCode::Text => return frame,
                    OpCode::Close => panic!("closed: {:?}", frame.close_code()),
                    _ => {}
                }
            }
        }

        /// Sends a request with `id` and waits for the frame that names it.
        async fn request(&mut self, request: Value, id: &str) {
            self.ws
                .send(Frame::text(request.to_string()))
                .await
                .unwrap();
            while !self.next_text().await.as_str().contains(id) {}
        }
    }

    /// Options for clients in these measurements: deflate with the client side pooled too,
    /// so this process stays small, or no offer at all.
    fn client_options(deflate: bool) -> Options {
        if deflate {
            deflate_offer()
                .with_compression_threshold(0)
                .client_no_context_takeover()
                .with_deflate_pool(DeflatePool::new(8))
        } else {
            Options::default()
        }
    }

    /// Opens `count` connections that each receive a compressible message and send one (a
    /// `ping` with a long id, answered by a `pong` carrying it), then stay idle.
    async fn open_used(
        server: &ServerProcess,
        first: usize,
        count: usize,
        options: &Options,
    ) -> Vec<Subscriber> {
        futures::stream::iter(first..first + count)
            .map(|n| {
                let options = options.clone();
                async move {
                    let mut client = server.connect(&format!("u{n}"), options).await;
                    let id = format!("{n:0>60}");
                    client.request(json!({"type": "ping", "id": id}), &id).await;
                    client
                }
            })
            .buffer_unordered(32)
            .collect()
            .await
    }

    /// RSS per idle connection: `count` connections opened after a warm-up of 200.
    async fn rss_per_connection(settings: &[(&str, &str)], options: Options, count: usize) -> f64 {
        let server = ServerProcess::start(settings);
        let _warm = open_used(&server, 0, 200, &options).await;
        let before = server.rss_kib();
        let _measured = open_used(&server, 200, count, &options).await;
        (server.rss_kib() - before) / count as f64
    }

    #[tokio::test]
    #[ignore = "measurement; see docs/conformance.md"]
    async fn idle_connections_with_deflate_cost_little_more_memory_than_plain_ones() {
        let plain = rss_per_connection(&[], client_options(false), 2000).await;
        let pooled = rss_per_connection(&[], client_options(true), 2000).await;
        let keeping_context = rss_per_connection(
            &[
                ("HERALD_COMPRESSION_SERVER_NO_CONTEXT_TAKEOVER", "false"),
                ("HERALD_COMPRESSION_CLIENT_NO_CONTEXT_TAKEOVER", "false"),
            ],
            deflate_offer().with_compression_threshold(0),
            300,
        )
        .await;
        println!("RSS per idle connection (KiB), herald serve:");
        println!("  no deflate                                   {plain:7.1}");
        println!("  deflate, no context takeover, shared pool    {pooled:7.1}");
        println!("  deflate, context takeover both ways          {keeping_context:7.1}");
        assert!(
            pooled - plain < 4.0,
            "deflate adds {:.1} KiB to an idle connection",
            pooled - plain
        );
    }

    /// Chat-like text: common words in a pseudo-random order, `len` bytes long. It deflates to
    /// about half, as real chat does, where `chatty_text` would shrink to nothing.
    fn prose(len: usize) -> String {
        const WORDS: [&str; 24] = [
            "the", "meeting", "is", "moved", "to", "three", "tomorrow", "can", "you", "send", "me",
            "latest", "draft", "thanks", "I", "think", "we", "should", "ship", "it", "after",
            "review", "sounds", "good",
        ];
        let mut state = 0x9E37_79B9_u32;
        let mut text = String::with_capacity(len + 16);
        while text.len() < len {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            text.push_str(WORDS[(state >> 16) as usize % WORDS.len()]);
            text.push(if state.is_multiple_of(7) { '.' } else { ' ' });
        }
        text.truncate(len);
        text
    }

    /// Server CPU per delivered message: one publisher, `subscribers` connections in one room.
    async fn fan_out(deflate: bool, subscribers: usize, messages: usize, content: &str) -> FanOut {
        let server = ServerProcess::start(&[]);
        let room = json!({"type": "join", "room": "fan", "id": "joined"});
        let mut readers = Vec::new();
        for n in 0..subscribers {
            let mut client = server
                .connect(&format!("s{n}"), client_options(deflate))
                .await;
            client.request(room.clone(), "joined").await;
            readers.push(tokio::spawn(async move {
                for _ in 0..messages {
                    while !client
                        .next_text()
                        .await
                        .as_str()
                        .starts_with(r#"{"type":"message""#)
                    {}
                }
            }));
        }
        let mut publisher = server.connect("publisher", client_options(false)).await;
        publisher.request(room, "joined").await;

        let (cpu, written, started) = (server.cpu(), server.bytes_written(), Instant::now());
        for n in 0..messages {
            let id = format!("p{n}");
            let publish = json!({
                "type": "publish", "room": "fan", "id": id, "echo": false,
                "content": {"text": content, "n": n},
            });
            publisher.request(publish, &format!("\"{id}\"")).await;
        }
        for reader in readers {
            reader.await.unwrap();
        }
        let deliveries = (subscribers * messages) as f64;
        FanOut {
            cpu_micros: (server.cpu() - cpu).as_secs_f64() * 1e6 / deliveries,
            bytes: (server.bytes_written() - written) as f64 / deliveries,
            rate: deliveries / started.elapsed().as_secs_f64(),
        }
    }

    /// Per delivery: server CPU and bytes written; and deliveries per second.
    struct FanOut {
        cpu_micros: f64,
        bytes: f64,
        rate: f64,
    }

    /// `docs/benchmarks.md`, #15 §3: plain and deflate deliveries of 2 KB messages to 1,000
    /// subscribers, alternating in one run, with the ratio of server CPU per delivery.
    #[tokio::test]
    #[ignore = "measurement; see docs/benchmarks.md"]
    async fn deflate_against_plain_cpu_per_delivery_at_1000_subscribers() {
        let content = prose(2000);
        println!("2 KB content, 1,000 subscribers × 100 messages; server CPU per delivery:");
        for _ in 0..3 {
            let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap();
            let plain = fan_out(false, 1000, 100, &content).await;
            let deflate = fan_out(true, 1000, 100, &content).await;
            println!(
                "  plain {:5.2} µs {:5.0} B | deflate {:5.2} µs {:5.0} B | ratio {:4.2} | load {}",
                plain.cpu_micros,
                plain.bytes,
                deflate.cpu_micros,
                deflate.bytes,
                deflate.cpu_micros / plain.cpu_micros,
                loadavg
                    .split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            assert!(deflate.bytes < plain.bytes, "{} B", deflate.bytes);
        }
    }

    #[tokio::test]
    #[ignore = "measurement; see docs/conformance.md"]
    async fn server_cpu_per_delivery_with_and_without_deflate() {
        println!("server CPU and bytes written per delivery, 200 subscribers × 500 messages:");
        for len in [100, 2000] {
            let content = prose(len);
            let plain = fan_out(false, 200, 500, &content).await;
            let deflate = fan_out(true, 200, 500, &content).await;
            for (kind, run) in [("plain  ", &plain), ("deflate", &deflate)] {
                println!(
                    "  {len:5} B content, {kind}  {:6.2} µs  {:7.0} B  {:9.0}/s",
                    run.cpu_micros, run.bytes, run.rate
                );
            }
            // Otherwise deflate was not in use, and the figures compare nothing.
            assert!(deflate.bytes < plain.bytes, "{} B", deflate.bytes);
        }
    }
}
