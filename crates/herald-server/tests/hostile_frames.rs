//! The hostile-client suite: frames no well-behaved client sends, against the real `herald`
//! binary in a child process. Each attack gets its RFC 6455 close code (or a clear error and
//! the connection goes on), and all the while a normal client on the same server keeps its
//! round-trip time under a bound and the server's resident memory stays under a fixed bound.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::hostile::{
    self, BINARY, CLOSE, CONTINUATION, FIN, PING, RSV1, RawSocket, TEXT, frame, message,
};
use common::process::{herald, wait_for_log};
use common::{Client, EVENT_TIMEOUT};
use herald_server::auth::Authenticator;
use herald_server::config::AuthConfig;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const SECRET: &str = "hostile-secret-0123456789";
/// A normal client's round trip (a `ping` request to its `pong`) while an attack runs. Generous
/// for a debug build on a shared 2-core machine; an attack that starves the server's other
/// connections takes seconds.
const MAX_ROUND_TRIP: Duration = Duration::from_millis(1500);
/// Growth of the server's resident memory over its idle size, at any moment of the suite
/// (about 16 MiB here, 500 dribbling sockets included). A Ping flood grew it by over 500 MiB
/// in 8 seconds when yawc's Pongs could pile up, and by 55 MiB in the 4 seconds this suite's
/// write deadline then allows.
const MAX_RSS_GROWTH_KIB: u64 = 32 * 1024;

/// The server under attack: its process, address and a way to mint tokens.
struct Target {
    child: tokio::process::Child,
    address: std::net::SocketAddr,
    auth: Authenticator,
    _data: tempfile::TempDir,
}

impl Target {
    async fn start() -> Target {
        let data = tempfile::tempdir().unwrap();
        let mut child = herald(data.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .env("HERALD_AUTH_SECRET", SECRET)
            .env("HERALD_STORE_PATH", data.path())
            .env("HERALD_COMPRESSION_ENABLED", "true")
            .env("HERALD_SERVER_HANDSHAKE_TIMEOUT", "2s")
            .env("HERALD_HEARTBEAT_INTERVAL", "3s")
            .env("HERALD_LIMITS_WRITE_TIMEOUT", "1s")
            // The attacks here are about content and framing, not rate: lift the rate limit.
            .env("HERALD_LIMITS_MESSAGES_PER_SECOND", "1000000")
            .env("HERALD_LIMITS_BURST", "1000000")
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let listening = wait_for_log(&mut lines, |entry| entry["address"].is_string()).await;
        // Keep draining the log so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let config = AuthConfig {
            secret: Some(SECRET.into()),
            ..AuthConfig::default()
        };
        Target {
            child,
            address: listening["address"].as_str().unwrap().parse().unwrap(),
            auth: Authenticator::from_config(&config, None).unwrap(),
            _data: data,
        }
    }

    fn token(&self, user: &str) -> String {
        self.auth
            .mint(user, false, None, Duration::from_secs(3600))
            .unwrap()
    }

    async fn raw(&self, user: &str, headers: &str) -> RawSocket {
        let path = format!("/ws?token={}", self.token(user));
        let mut socket = RawSocket::connect_with_headers(self.address, &path, headers).await;
        // The welcome is the first text frame (compressed, when deflate was agreed).
        socket.text_matching(|_| true).await;
        socket
    }

    fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("the server is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

/// A normal client pinging the server all along; keeps the worst round trip and the largest
/// server RSS seen since the last [`Watch::reset`].
struct Watch {
    worst_round_trip_us: AtomicU64,
    peak_rss_kib: AtomicU64,
    /// Told after each sample.
    sampled: tokio::sync::Notify,
}

impl Watch {
    fn reset(&self) {
        self.worst_round_trip_us.store(0, Ordering::Relaxed);
        self.peak_rss_kib.store(0, Ordering::Relaxed);
    }

    /// Waits for a whole sample taken from now on, so an attack over in a few milliseconds
    /// still has a round trip measured right after it.
    async fn next_samples(&self, count: usize) {
        for _ in 0..=count {
            self.sampled.notified().await;
        }
    }

    async fn check(&self, attack: &str, idle_rss_kib: u64) {
        self.next_samples(2).await;
        let worst = Duration::from_micros(self.worst_round_trip_us.load(Ordering::Relaxed));
        let peak = self.peak_rss_kib.load(Ordering::Relaxed);
        eprintln!(
            "{attack}: worst round trip {worst:?}, peak RSS {peak} KiB (idle {idle_rss_kib})"
        );
        assert!(
            worst <= MAX_ROUND_TRIP,
            "{attack}: a normal client waited {worst:?} for a pong"
        );
        assert!(
            peak <= idle_rss_kib + MAX_RSS_GROWTH_KIB,
            "{attack}: server RSS reached {peak} KiB (idle: {idle_rss_kib} KiB)"
        );
    }
}

async fn watch(target: Arc<Target>, watch: Arc<Watch>) {
    let url = format!(
        "ws://{}/ws?token={}",
        target.address,
        target.token("watcher")
    );
    let mut client = Client::open(&url).await;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        let sent = Instant::now();
        client.request(json!({"type": "ping"})).await;
        let round_trip = sent.elapsed().as_micros() as u64;
        watch
            .worst_round_trip_us
            .fetch_max(round_trip, Ordering::Relaxed);
        watch
            .peak_rss_kib
            .fetch_max(target.rss_kib(), Ordering::Relaxed);
        watch.sampled.notify_waiters();
    }
}

/// What the server must do with an attack.
enum Expect {
    /// Fail the connection with this close code.
    Close(u16),
    /// Answer with a text frame containing this, and stay open for the next request.
    Answer(&'static str),
}

const PING_REQUEST: &[u8] = br#"{"type":"ping","id":"alive"}"#;

/// `payload` as a text message in one-byte fragments, with a Ping after each when `pings`.
fn one_byte_fragments(payload: &[u8], pings: bool) -> Vec<u8> {
    let last = payload.len() - 1;
    let mut out = Vec::new();
    for (at, byte) in payload.iter().enumerate() {
        let opcode = if at == 0 { TEXT } else { CONTINUATION };
        let fin = if at == last { FIN } else { 0 };
        out.extend(frame(fin | opcode, &[*byte], true));
        if pings && at != last {
            out.extend(message(PING, b"between"));
        }
    }
    out
}

/// Raw deflate of `len` zero bytes, as permessage-deflate carries it (RFC 7692 §7.2.1).
fn deflated_zeros(len: usize) -> Vec<u8> {
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let now = left.min(zeros.len());
        encoder.write_all(&zeros[..now]).unwrap();
        left -= now;
    }
    encoder.flush().unwrap();
    let mut out = encoder.finish().unwrap();
    if out.ends_with(&[0, 0, 0xff, 0xff]) {
        out.truncate(out.len() - 4);
    }
    out
}

/// The frame-level attacks: name, bytes, how many bytes per write, whether the connection
/// negotiates permessage-deflate, and what must happen.
fn frame_attacks() -> Vec<(&'static str, Vec<u8>, usize, bool, Expect)> {
    let pong = Expect::Answer("\"ref\":\"alive\"");
    let any_error = Expect::Answer("\"type\":\"error\"");
    let mut invalid_utf8 = message(TEXT, b"\"ab");
    let at = invalid_utf8.len() - 1;
    invalid_utf8[at] ^= 0xC0 ^ b'b'; // a lone 0xC0 once unmasked
    let bomb = deflated_zeros(16 * 1024 * 1024);
    let mut fragmented_bomb = Vec::new();
    let pieces: Vec<&[u8]> = bomb.chunks(bomb.len().div_ceil(4)).collect();
    for (at, piece) in pieces.iter().enumerate() {
        let first = match at {
            0 => RSV1 | BINARY,
            _ => CONTINUATION,
        };
        let fin = if at == pieces.len() - 1 { FIN } else { 0 };
        fragmented_bomb.extend(frame(fin | first, piece, true));
    }
    let deep_json = format!(
        r#"{{"type":"publish","room":"deep","id":"deep","content":{}{}}}"#,
        "[".repeat(30_000),
        "]".repeat(30_000)
    );
    let mut close_126 = 1000u16.to_be_bytes().to_vec();
    close_126.resize(126, b'x');
    vec![
        (
            "one-byte fragments",
            one_byte_fragments(PING_REQUEST, false),
            usize::MAX,
            false,
            pong,
        ),
        (
            "one byte per write",
            message(TEXT, PING_REQUEST),
            1,
            false,
            Expect::Answer("\"ref\":\"alive\""),
        ),
        (
            "control frames between fragments",
            one_byte_fragments(PING_REQUEST, true),
            usize::MAX,
            false,
            Expect::Answer("\"ref\":\"alive\""),
        ),
        (
            "reserved bit RSV2",
            frame(FIN | 0x20 | TEXT, PING_REQUEST, true),
            usize::MAX,
            false,
            Expect::Close(1002),
        ),
        (
            "RSV1 without permessage-deflate",
            frame(FIN | RSV1 | TEXT, PING_REQUEST, true),
            usize::MAX,
            false,
            Expect::Close(1002),
        ),
        (
            "reserved data opcode",
            message(0x3, b"x"),
            usize::MAX,
            false,
            Expect::Close(1002),
        ),
        (
            "reserved control opcode",
            message(0xB, b"x"),
            usize::MAX,
            false,
            Expect::Close(1002),
        ),
        (
            "unmasked frame",
            frame(FIN | TEXT, PING_REQUEST, false),
            usize::MAX,
            false,
            Expect::Close(1002),
        ),
        (
            "continuation without a start",
            message(CONTINUATION, b"x"),
            usize::MAX,
            false,
            Expect::Close(1002),
        ),
        (
            "close code 999",
            hostile::close(999, ""),
            usize::MAX,
            false,
            Expect::Close(1002),
        ),
        (
            "close code 1004 (reserved)",
            hostile::close(1004, ""),
            usize::MAX,
            false,
            Expect::Close(1002),
        ),
        (
            "close code 5000",
            hostile::close(5000, ""),
            usize::MAX,
            false,
            Expect::Close(1002),
        ),
        (
            "close payload of 126 bytes",
            message(CLOSE, &close_126),
            usize::MAX,
            false,
            Expect::Close(1002),
        ),
        (
            "invalid UTF-8 in text",
            invalid_utf8,
            usize::MAX,
            false,
            Expect::Close(1007),
        ),
        (
            "deflate bomb (16 MiB of zeros)",
            frame(FIN | RSV1 | BINARY, &bomb, true),
            usize::MAX,
            true,
            Expect::Close(1009),
        ),
        (
            "fragmented deflate bomb",
            fragmented_bomb,
            usize::MAX,
            true,
            Expect::Close(1009),
        ),
        (
            "content nested 30,000 deep",
            message(TEXT, deep_json.as_bytes()),
            usize::MAX,
            false,
            any_error,
        ),
        (
            "duplicate keys",
            message(TEXT, br#"{"type":"ping","id":"a","id":"b"}"#),
            usize::MAX,
            false,
            Expect::Answer("\"type\":\"error\""),
        ),
        (
            "join since the largest offset",
            message(
                TEXT,
                br#"{"type":"join","room":"max","id":"s","since":18446744073709551615,"epoch":"x"}"#,
            ),
            usize::MAX,
            false,
            Expect::Answer("\"ref\":\"s\""),
        ),
        (
            "history with the largest limit and before",
            message(
                TEXT,
                br#"{"type":"history","room":"max","id":"h","limit":18446744073709551615,"before":18446744073709551615}"#,
            ),
            usize::MAX,
            false,
            Expect::Answer("\"ref\":\"h\""),
        ),
        (
            "history with a limit past u32",
            message(
                TEXT,
                br#"{"type":"history","room":"max","id":"h","limit":4294967296}"#,
            ),
            usize::MAX,
            false,
            Expect::Answer("\"ref\":\"h\""),
        ),
    ]
}

/// Runs one frame-level attack on a fresh connection and checks the server's answer.
async fn frame_attack(
    target: &Target,
    name: &str,
    bytes: &[u8],
    piece: usize,
    deflate: bool,
    expect: &Expect,
) {
    let headers = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate\r\n"
    } else {
        ""
    };
    let mut socket = target.raw("mallory", headers).await;
    socket
        .send_in_pieces(bytes, piece.min(bytes.len()))
        .await
        .unwrap_or_else(|error| panic!("{name}: write failed: {error}"));
    match expect {
        Expect::Close(code) => {
            assert_eq!(socket.close_code().await, Some(*code), "{name}");
        }
        Expect::Answer(wanted) => {
            let answer = socket.text_matching(|text| text.contains(*wanted)).await;
            assert!(answer.contains(wanted), "{name}: {answer}");
            // Still open and answering.
            socket.send(&message(TEXT, PING_REQUEST)).await.unwrap();
            socket
                .text_matching(|text| text.contains("\"ref\":\"alive\""))
                .await;
        }
    }
}

/// Sends Pings without ever reading, until the server gives up on the socket.
async fn ping_flood_without_reading(target: &Target) {
    let mut socket = target.raw("mallory", "").await;
    let batch: Vec<u8> = (0..1000)
        .flat_map(|_| message(PING, &[b'p'; 125]))
        .collect();
    let flooding = async { while socket.send(&batch).await.is_ok() {} };
    tokio::time::timeout(EVENT_TIMEOUT, flooding)
        .await
        .expect("the server kept taking Pings from a client that reads nothing");
}

/// Opens 500 sockets that send their upgrade request one byte at a time, slower than the
/// handshake deadline allows; the server must cut every one off (an answer or a close).
async fn dribbling_handshakes(target: &Target) {
    let request = hostile::upgrade_request(target.address, "/ws", "");
    let mut dribblers = Vec::new();
    for _ in 0..500 {
        let request = request.clone();
        let address = target.address;
        dribblers.push(tokio::spawn(async move {
            let stream = TcpStream::connect(address).await.unwrap();
            let (mut reader, mut writer) = stream.into_split();
            let dribble = async move {
                for byte in request.as_bytes() {
                    if writer.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                    // Paced on purpose: slowness is the attack, there is no event to await.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                std::future::pending::<()>().await;
            };
            let mut answer = [0u8; 64];
            tokio::select! {
                // Whatever the server does (a 408, a close, a reset), it acted.
                _ = reader.read(&mut answer) => {}
                () = dribble => {}
            }
        }));
    }
    for dribbler in dribblers {
        tokio::time::timeout(EVENT_TIMEOUT, dribbler)
            .await
            .expect("a dribbling socket outlived the handshake deadline")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_their_close_codes_while_others_keep_latency_and_memory_bounded() {
    let target = Arc::new(Target::start().await);
    let watch_state = Arc::new(Watch {
        worst_round_trip_us: AtomicU64::new(0),
        peak_rss_kib: AtomicU64::new(0),
        sampled: tokio::sync::Notify::new(),
    });
    let watcher = tokio::spawn(watch(target.clone(), watch_state.clone()));
    let idle_rss_kib = target.rss_kib();

    for (name, bytes, piece, deflate, expect) in frame_attacks() {
        // Shown with the failure, to tell which attack it was.
        eprintln!("attack: {name}");
        watch_state.reset();
        frame_attack(&target, name, &bytes, piece, deflate, &expect).await;
        watch_state.check(name, idle_rss_kib).await;
    }

    watch_state.reset();
    ping_flood_without_reading(&target).await;
    watch_state
        .check("Ping flood without reading", idle_rss_kib)
        .await;

    watch_state.reset();
    dribbling_handshakes(&target).await;
    watch_state
        .check("500 dribbling handshakes", idle_rss_kib)
        .await;

    assert!(
        !watcher.is_finished(),
        "the normal client lost its connection"
    );
    watcher.abort();
}
