//! The soak: a long run of ordinary, varied traffic that checks the server's resources stay
//! bounded. Herald only (it uses `join` with `since` and inbox acks).
//!
//! `users` connections run at once, each as its own user. The first `residents` stay connected
//! for the whole run; the others churn: connect, join two rooms (with `since`/`epoch` when they
//! were there before, so the server replays what they missed), trade traffic for a session of
//! about `session`, acknowledge their inbox, close, and reconnect. While connected, every
//! connection sends `rate` messages per second, alternating room messages and direct messages
//! to a random user (often one that is offline, so its inbox fills until it comes back), and
//! every tenth tick leaves one room for another.
//!
//! A sampler reads, every `sample_every`: the server's RSS and open files (`/proc/PID`, when the
//! pid is known) and, from `/metrics`, its open connections, alive tokio tasks and the depth of
//! the fan-out and store writer queues. At the end each series is judged by [`judge`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use herald_protocol::ServerEvent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use super::{Run, RunError, blank_report};
use crate::adapter::ServerKind;
use crate::client::{ClientError, Env, Socket};
use crate::report::{RunReport, Sample, SeriesVerdict, Soak, SoakTraffic};

/// Rooms each connection is in at a time.
const ROOMS_PER_CONNECTION: usize = 2;
/// Every this many ticks a connection leaves one room and joins another.
const REJOIN_EVERY: u64 = 10;
/// Pause between a churning user's sessions.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// Longest wait for a `/metrics` answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most error texts kept for the report.
const KEPT_ERRORS: usize = 10;
/// A series may rise by this share of its first-half maximum (or its floor, if larger).
const ALLOWED_RISE_SHARE: f64 = 0.10;

/// What the soak does and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct SoakParams {
    /// Connections at once, one user each.
    pub users: usize,
    /// Of those, how many stay connected the whole run.
    pub residents: usize,
    pub rooms: usize,
    /// Messages per second per connection.
    pub rate: f64,
    /// Mean length of a churning connection's session.
    pub session: Duration,
    pub length: Duration,
    pub sample_every: Duration,
}

/// The series the soak watches, with the rise each is allowed whatever its size: noise of the
/// allocator, a few connections mid-handshake, a queue that is busy at the instant of a sample.
const SERIES: [(&str, f64); 6] = [
    ("rss_kib", 8192.0),
    ("open_files", 16.0),
    ("connections", 8.0),
    ("tasks", 32.0),
    ("fanout_queue", 64.0),
    ("writer_queue", 64.0),
];

/// The metrics read from `/metrics`, by series name.
const SCRAPED: [(&str, &str); 4] = [
    ("connections", "herald_connections"),
    ("tasks", "herald_runtime_alive_tasks"),
    ("fanout_queue", "herald_fanout_queue_depth"),
    ("writer_queue", "herald_store_writer_queue_depth"),
];

#[derive(Default)]
struct Counters {
    sessions: AtomicU64,
    failed_sessions: AtomicU64,
    lost: AtomicU64,
    published: AtomicU64,
    sent_direct: AtomicU64,
    received: AtomicU64,
    joins: AtomicU64,
    recovered_joins: AtomicU64,
    inbox_acks: AtomicU64,
    errors: AtomicU64,
    first_errors: std::sync::Mutex<Vec<String>>,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, text: String) {
        Counters::add(&self.errors);
        let mut kept = self.first_errors.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEPT_ERRORS {
            kept.push(text);
        }
    }

    fn snapshot(&self) -> SoakTraffic {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SoakTraffic {
            sessions: read(&self.sessions),
            failed_sessions: read(&self.failed_sessions),
            lost_connections: read(&self.lost),
            published: read(&self.published),
            sent_direct: read(&self.sent_direct),
            received: read(&self.received),
            joins: read(&self.joins),
            recovered_joins: read(&self.recovered_joins),
            inbox_acks: read(&self.inbox_acks),
            errors: read(&self.errors),
            first_errors: self
                .first_errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// What one user remembers across its sessions, as a real client would.
#[derive(Default)]
struct Memory {
    /// Per room: the newest offset seen and the stream's epoch.
    marks: HashMap<String, (u64, Option<String>)>,
    /// The newest inbox offset received, and the one acknowledged.
    inbox_seen: u64,
    inbox_acked: u64,
}

/// A small deterministic generator: the soak needs variety, not quality randomness.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// In [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Ctx {
    params: SoakParams,
    env: Arc<Env>,
    counters: Counters,
}

fn user_name(index: usize) -> String {
    format!("soak-{index}")
}

fn room_name(index: usize) -> String {
    format!("soak-room-{index}")
}

pub(crate) async fn run(run: &Run, params: &SoakParams) -> Result<RunReport, RunError> {
    if run.options.server != ServerKind::Herald {
        return Err(RunError::Invalid(
            "soak speaks Herald's protocol only".into(),
        ));
    }
    if run.env.endpoints.len() > 1 {
        return Err(RunError::Invalid(
            "soak watches one server: give one --target".into(),
        ));
    }
    if params.users < 2 || params.rooms < ROOMS_PER_CONNECTION + 1 || params.rate <= 0.0 {
        return Err(RunError::Invalid(
            "soak needs at least 2 users, 3 rooms and a positive rate".into(),
        ));
    }
    let tokens = (0..params.users)
        .map(|index| run.tokens.mint(&user_name(index)))
        .collect::<Result<Vec<_>, _>>()?;
    let ctx = Arc::new(Ctx {
        params: params.clone(),
        env: run.env.clone(),
        counters: Counters::default(),
    });
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut users = JoinSet::new();
    for (index, token) in tokens.into_iter().enumerate() {
        users.spawn(user_loop(ctx.clone(), index, token, stop.clone()));
    }

    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(params.sample_every);
    let end = tokio::time::Instant::now() + params.length;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => break,
            _ = ticker.tick() => {
                let sample = take_sample(run, started).await;
                run.progress.phase(format!(
                    "soak: {:.0}/{:.0} s, {}",
                    sample.t_s,
                    params.length.as_secs_f64(),
                    sample
                        .values
                        .iter()
                        .map(|(name, value)| format!("{name} {value:.0}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                samples.push(sample);
            }
        }
    }
    stop.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while users.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        users.abort_all();
    }

    let series: Vec<SeriesVerdict> = SERIES
        .iter()
        .filter_map(|(name, floor)| {
            let points: Vec<(f64, f64)> = samples
                .iter()
                .filter_map(|s| s.values.get(*name).map(|v| (s.t_s, *v)))
                .collect();
            judge(name, &points, *floor)
        })
        .collect();
    let mut report = blank_report(params.users);
    report.setup.opened = params.users;
    report.setup.server_rss_kib = run.server_rss_kib();
    let traffic = ctx.counters.snapshot();
    report.errors.refused = traffic.errors;
    report.errors.lost_connections = traffic.lost_connections;
    report.errors.first = traffic.first_errors.clone();
    report.soak = Some(Soak {
        bounded: series.iter().all(|s| s.bounded),
        series,
        traffic,
        samples,
    });
    Ok(report)
}

/// Judges one series of `(seconds, value)` samples. Growth in the first half (warm-up: the
/// connections arriving, allocator arenas and caches filling) is allowed. The series grows
/// without bound when, in the second half, both
/// - its least-squares trend rises over that half by more than the allowance, and
/// - its maximum exceeds the first half's maximum by more than the allowance,
///
/// where the allowance is `ALLOWED_RISE_SHARE` of the first half's maximum or `floor`, whichever
/// is larger. A series that levels off fails neither; one that keeps climbing fails both.
/// `None` when there are fewer than four samples.
pub fn judge(name: &str, points: &[(f64, f64)], floor: f64) -> Option<SeriesVerdict> {
    if points.len() < 4 {
        return None;
    }
    let (first, second) = points.split_at(points.len() / 2);
    let max = |points: &[(f64, f64)]| points.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let first_half_max = max(first);
    let second_half_max = max(second);
    let span = second.last().map_or(0.0, |p| p.0) - second[0].0;
    let second_half_rise = slope(second) * span;
    let allowance = floor.max(ALLOWED_RISE_SHARE * first_half_max);
    let bounded = second_half_rise <= allowance || second_half_max <= first_half_max + allowance;
    Some(SeriesVerdict {
        name: name.to_owned(),
        samples: points.len(),
        start: points[0].1,
        end: points[points.len() - 1].1,
        max: first_half_max.max(second_half_max),
        first_half_max,
        second_half_max,
        second_half_rise,
        allowance,
        bounded,
    })
}

/// Least-squares slope of `points`, per second.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let covariance: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_v)).sum();
    let variance: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance
    }
}

async fn take_sample(run: &Run, started: Instant) -> Sample {
    let mut values = std::collections::BTreeMap::new();
    if let Some(server) = &run.server {
        if let Ok(bytes) = server.rss_bytes() {
            values.insert("rss_kib".to_owned(), bytes as f64 / 1024.0);
        }
        if let Ok(files) = server.open_files() {
            values.insert("open_files".to_owned(), files as f64);
        }
    }
    let endpoint = &run.env.endpoints[0];
    if let Ok(metrics) = scrape(endpoint.addr, &endpoint.host).await {
        for (series, metric) in SCRAPED {
            if let Some(value) = metrics.get(metric) {
                values.insert(series.to_owned(), *value);
            }
        }
    }
    Sample {
        t_s: started.elapsed().as_secs_f64(),
        values,
    }
}

/// The unlabelled samples of `GET /metrics`, by metric name.
async fn scrape(
    target: std::net::SocketAddr,
    host: &str,
) -> Result<HashMap<String, f64>, std::io::Error> {
    let fetch = async {
        let mut stream = TcpStream::connect(target).await?;
        stream
            .write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let response = String::from_utf8_lossy(&response);
    let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidData);
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(invalid)?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(invalid());
    }
    Ok(body
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(' '))
        .filter(|(name, _)| !name.contains('{'))
        .filter_map(|(name, value)| Some((name.to_owned(), value.trim().parse().ok()?)))
        .collect())
}

/// One user: sessions until the run stops (a resident has one session, the whole run).
async fn user_loop(ctx: Arc<Ctx>, index: usize, token: String, stop: CancellationToken) {
    let mut rng = Rng::new(index as u64 + 1);
    let mut memory = Memory::default();
    let resident = index < ctx.params.residents;
    while !stop.is_cancelled() {
        let session = if resident {
            ctx.params.length * 2
        } else {
            ctx.params.session.mul_f64(0.5 + rng.unit())
        };
        Counters::add(&ctx.counters.sessions);
        let result = session_once(&ctx, index, &token, session, &mut memory, &mut rng, &stop).await;
        match result {
            Ok(()) => {}
            Err(SessionError::Lost) => Counters::add(&ctx.counters.lost),
            Err(SessionError::Client(error)) => {
                Counters::add(&ctx.counters.failed_sessions);
                ctx.counters.error(format!("{}: {error}", user_name(index)));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            _ = stop.cancelled() => {}
        }
    }
}

#[derive(Debug)]
enum SessionError {
    /// The server closed an established connection.
    Lost,
    /// The connection could not be opened or set up.
    Client(ClientError),
}

impl From<ClientError> for SessionError {
    fn from(error: ClientError) -> Self {
        SessionError::Client(error)
    }
}

/// What a frame was, for a caller waiting for one.
enum Seen {
    Welcome,
    JoinAck(String),
    Other,
}

/// One connection of one user, from handshake to close.
async fn session_once(
    ctx: &Ctx,
    index: usize,
    token: &str,
    length: Duration,
    memory: &mut Memory,
    rng: &mut Rng,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let params = &ctx.params;
    let mut socket = ctx.env.open(0, index as u64, token).await?;
    wait_for(
        ctx,
        &mut socket,
        memory,
        |seen| matches!(seen, Seen::Welcome),
        "welcome",
    )
    .await?;
    let mut joined: Vec<String> = Vec::with_capacity(ROOMS_PER_CONNECTION);
    while joined.len() < ROOMS_PER_CONNECTION {
        let room = room_name(rng.below(params.rooms));
        if !joined.contains(&room) {
            join(ctx, &mut socket, memory, &room).await?;
            joined.push(room);
        }
    }

    let end = tokio::time::Instant::now() + length;
    let period = Duration::from_secs_f64(1.0 / params.rate);
    // A random phase, so that connections opened together do not send together.
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + period.mul_f64(rng.unit()),
        period,
    );
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(end) => break,
            _ = ticker.tick() => {
                ticks += 1;
                if ticks.is_multiple_of(REJOIN_EVERY) {
                    let left = joined.remove(rng.below(joined.len()));
                    send(&mut socket, format!(r#"{{"type":"leave","room":"{left}","id":"l"}}"#)).await?;
                    let room = loop {
                        let room = room_name(rng.below(params.rooms));
                        if !joined.contains(&room) {
                            break room;
                        }
                    };
                    join(ctx, &mut socket, memory, &room).await?;
                    joined.push(room);
                } else if ticks.is_multiple_of(2) {
                    let room = &joined[rng.below(joined.len())];
                    send(&mut socket, format!(
                        r#"{{"type":"publish","room":"{room}","echo":false,"content":{{"soak":{ticks}}},"id":"p"}}"#
                    )).await?;
                    Counters::add(&ctx.counters.published);
                } else {
                    let mut to = rng.below(params.users);
                    if to == index {
                        to = (to + 1) % params.users;
                    }
                    send(&mut socket, format!(
                        r#"{{"type":"send","to":["{}"],"content":{{"soak":{ticks}}},"id":"d"}}"#,
                        user_name(to)
                    )).await?;
                    Counters::add(&ctx.counters.sent_direct);
                }
                ack_inbox(ctx, &mut socket, memory).await?;
            }
            frame = socket.next() => {
                match frame {
                    Some(Ok(WsMessage::Text(text))) => {
                        observe(ctx, &text, memory);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Err(SessionError::Lost),
                }
            }
        }
    }
    ack_inbox(ctx, &mut socket, memory).await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
    Ok(())
}

async fn send(socket: &mut Socket, text: String) -> Result<(), SessionError> {
    socket
        .send(WsMessage::text(text))
        .await
        .map_err(|_| SessionError::Lost)
}

async fn ack_inbox(
    ctx: &Ctx,
    socket: &mut Socket,
    memory: &mut Memory,
) -> Result<(), SessionError> {
    if memory.inbox_seen > memory.inbox_acked {
        send(
            socket,
            format!(r#"{{"type":"ack","inbox":{}}}"#, memory.inbox_seen),
        )
        .await?;
        memory.inbox_acked = memory.inbox_seen;
        Counters::add(&ctx.counters.inbox_acks);
    }
    Ok(())
}

/// Joins `room`, asking for what was missed since the last visit, and waits for the ack.
async fn join(
    ctx: &Ctx,
    socket: &mut Socket,
    memory: &mut Memory,
    room: &str,
) -> Result<(), SessionError> {
    let frame = match memory.marks.get(room) {
        Some((offset, Some(epoch))) => format!(
            r#"{{"type":"join","room":"{room}","since":{offset},"epoch":"{epoch}","id":"j"}}"#
        ),
        Some((offset, None)) => {
            format!(r#"{{"type":"join","room":"{room}","since":{offset},"id":"j"}}"#)
        }
        None => format!(r#"{{"type":"join","room":"{room}","id":"j"}}"#),
    };
    send(socket, frame).await?;
    Counters::add(&ctx.counters.joins);
    wait_for(
        ctx,
        socket,
        memory,
        |seen| matches!(seen, Seen::JoinAck(r) if r.as_str() == room),
        "join acknowledgement",
    )
    .await
}

/// Reads frames, observing each, until one is `wanted`.
async fn wait_for(
    ctx: &Ctx,
    socket: &mut Socket,
    memory: &mut Memory,
    wanted: impl Fn(&Seen) -> bool,
    what: &'static str,
) -> Result<(), SessionError> {
    let deadline = tokio::time::Instant::now() + ctx.env.step_timeout;
    loop {
        let frame = tokio::time::timeout_at(deadline, socket.next())
            .await
            .map_err(|_| ClientError::Timeout(what))?;
        match frame {
            Some(Ok(WsMessage::Text(text))) => {
                if wanted(&observe(ctx, &text, memory)) {
                    return Ok(());
                }
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => return Err(ClientError::Socket(error).into()),
            None => return Err(ClientError::Closed(what).into()),
        }
    }
}

/// Counts a frame from the server and remembers the offsets a client keeps.
fn observe(ctx: &Ctx, text: &str, memory: &mut Memory) -> Seen {
    let counters = &ctx.counters;
    match ServerEvent::decode(text) {
        Ok(ServerEvent::Welcome(_)) => Seen::Welcome,
        Ok(ServerEvent::Message(message)) => {
            Counters::add(&counters.received);
            if let (Some(room), Some(offset)) = (&message.room, message.offset) {
                let mark = memory.marks.entry(room.clone()).or_default();
                mark.0 = mark.0.max(offset);
            } else if let (Some(_), Some(offset)) = (&message.to, message.offset) {
                memory.inbox_seen = memory.inbox_seen.max(offset);
            }
            Seen::Other
        }
        Ok(ServerEvent::Ack(ack)) => match (ack.reference.as_deref(), ack.room) {
            (Some("j"), Some(room)) => {
                if ack.recovered == Some(true) {
                    Counters::add(&counters.recovered_joins);
                }
                let mark = memory.marks.entry(room.clone()).or_default();
                if ack.epoch.is_some() && mark.1 != ack.epoch {
                    // A new stream (or the first visit): offsets of the old one mean nothing.
                    *mark = (ack.offset.unwrap_or(0), ack.epoch);
                } else {
                    mark.0 = mark.0.max(ack.offset.unwrap_or(0));
                }
                Seen::JoinAck(room)
            }
            _ => Seen::Other,
        },
        Ok(ServerEvent::Error(error)) => {
            counters.error(format!("{}: {}", error.code.as_str(), error.message));
            Seen::Other
        }
        Ok(_) => Seen::Other,
        Err(error) => {
            counters.error(format!("undecodable frame: {error}"));
            Seen::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(values: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
        (0..60).map(|i| (i as f64, values(i as f64))).collect()
    }

    #[test]
    fn a_series_that_keeps_climbing_grows_without_bound() {
        let verdict = judge("rss_kib", &series(|t| 50_000.0 + 500.0 * t), 8192.0).unwrap();
        assert!(!verdict.bounded, "{verdict:?}");
    }

    #[test]
    fn warm_up_growth_that_levels_off_is_bounded() {
        let verdict = judge(
            "rss_kib",
            &series(|t| 50_000.0 + 1000.0 * t.min(20.0)),
            8192.0,
        )
        .unwrap();
        assert!(verdict.bounded, "{verdict:?}");
    }

    #[test]
    fn churn_that_goes_up_and_down_is_bounded() {
        let verdict = judge(
            "connections",
            &series(|t| 100.0 + 40.0 * (t / 3.0).sin()),
            8.0,
        )
        .unwrap();
        assert!(verdict.bounded, "{verdict:?}");
    }

    #[test]
    fn a_slow_leak_under_the_floor_is_tolerated_and_a_large_one_is_not() {
        let small = judge("open_files", &series(|t| 30.0 + 0.2 * t), 16.0).unwrap();
        assert!(small.bounded, "{small:?}");
        let large = judge("open_files", &series(|t| 30.0 + 2.0 * t), 16.0).unwrap();
        assert!(!large.bounded, "{large:?}");
    }

    #[test]
    fn too_few_samples_give_no_verdict() {
        assert!(judge("tasks", &[(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)], 32.0).is_none());
    }
}
