//! Join storm: N connections join one room as fast as the server lets them, and the clock runs
//! until the room has formed for everyone: every join acknowledged and, on a server that tells
//! members who is in the room (Herald's `presence_diff`), every member told a count of N.
//!
//! By default the connections are opened and authenticated first and then all send their join
//! at once (the storm starts at that instant, so handshakes are left out). With `pipelined`,
//! each connection joins as soon as it is ready and the clock starts with the first connect:
//! users arriving, handshakes included.
//!
//! A room bigger than one process's open files holds is formed by several tool processes, each
//! with its own slice of the members (`first_member`), all counting the room full at the total
//! (`room_members`) and sending their joins when they get SIGUSR1 (`go_on_signal`) once every
//! process has said it is ready: `bench/big-room` runs them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::setup::close_all;
use super::{Run, RunError, blank_report};
use crate::adapter::Incoming;
use crate::client::{ClientError, Env, Socket};
use crate::procfs::{CpuMeter, Proc};
use crate::report::{JoinStorm, RunReport, Setup};

/// The one room everybody joins.
const ROOM: &str = "storm";
/// The tool counts as the bottleneck from this share of its CPUs on (as in the traffic runs).
const CLIENT_BOUND_SHARE: f64 = 0.9;

#[derive(Debug, Clone, PartialEq)]
pub struct JoinStormParams {
    pub subscribers: usize,
    /// Join as soon as each connection is ready instead of all at once after every connection is.
    pub pipelined: bool,
    /// Longest the storm may take; members not in by then are counted as missing.
    pub deadline: Duration,
    /// This process's members are users `storm-{first_member}`… (several processes, one room).
    pub first_member: usize,
    /// The count that means the room is full: every process's members together. `None`: this
    /// process's `subscribers`.
    pub room_members: Option<usize>,
    /// Once every connection is ready, say so on stderr and send the joins on SIGUSR1 (the
    /// storm's start) instead of at once.
    pub go_on_signal: bool,
}

impl Default for JoinStormParams {
    /// `herald-bench join-storm`'s defaults: 10,000 members joining at once, 120 s at most.
    fn default() -> Self {
        JoinStormParams {
            subscribers: 10_000,
            pipelined: false,
            deadline: Duration::from_secs(120),
            first_member: 0,
            room_members: None,
            go_on_signal: false,
        }
    }
}

/// What a split storm prints on stderr when its connections are ready for the signal.
pub const READY_LINE: &str = "join-storm: ready for SIGUSR1";

/// What one member saw, as instants.
#[derive(Default)]
struct Outcome {
    acked: Option<Instant>,
    /// When a presence event first gave the room's full count.
    full_count: Option<Instant>,
    error: Option<String>,
}

enum Event {
    Ready(Instant),
    Failed(usize, ClientError),
    Done(Outcome),
}

/// What every member task shares.
struct Storm {
    env: Arc<Env>,
    members: u64,
    /// Fires when the members are to send their join; the storm's start is then set.
    go: CancellationToken,
    start: std::sync::OnceLock<Instant>,
    presence_frames: AtomicU64,
    stop: CancellationToken,
}

pub(crate) async fn run(run: &Run, params: &JoinStormParams) -> Result<RunReport, RunError> {
    if params.subscribers == 0 {
        return Err(RunError::Invalid(
            "join-storm needs at least 1 subscriber".into(),
        ));
    }
    let room_members = params.room_members.unwrap_or(params.subscribers);
    if room_members < params.subscribers {
        return Err(RunError::Invalid(format!(
            "--room-members ({room_members}) is below this process's --subscribers ({})",
            params.subscribers
        )));
    }
    if params.go_on_signal && params.pipelined {
        return Err(RunError::Invalid(
            "--go-on-signal starts joins that wait for every connection: not with --pipelined"
                .into(),
        ));
    }
    // Installed before any connection is ready, so a signal sent as soon as the ready line
    // shows never meets the default action (which ends the process).
    let mut go_signal = if params.go_on_signal {
        let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
            .map_err(|e| RunError::Invalid(format!("cannot wait for SIGUSR1: {e}")))?;
        Some(signal)
    } else {
        None
    };
    let tokens = (params.first_member..params.first_member + params.subscribers)
        .map(|i| run.tokens.mint(&format!("storm-{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let storm = Arc::new(Storm {
        env: run.env.clone(),
        members: room_members as u64,
        go: CancellationToken::new(),
        start: std::sync::OnceLock::new(),
        presence_frames: AtomicU64::new(0),
        stop: CancellationToken::new(),
    });
    let rss_before = run.server_rss_kib();
    let connect_started = Instant::now();
    let mut server_meter = None;
    let mut client_meter = None;
    if params.pipelined {
        server_meter = run.server.clone().map(CpuMeter::start).transpose()?;
        client_meter = Some(CpuMeter::start(Proc::Myself)?);
        let _ = storm.start.set(connect_started);
        storm.go.cancel();
    }

    let permits = Arc::new(Semaphore::new(run.options.setup_concurrency.max(1)));
    let (events, mut event_rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    // Each member keeps its connection (and this queue's sender stays here) until the end.
    let mut queues = Vec::with_capacity(tokens.len());
    for (index, token) in tokens.into_iter().enumerate() {
        let (queue, outgoing) = mpsc::channel(1);
        queues.push(queue);
        tasks.spawn(member(
            storm.clone(),
            index,
            token,
            permits.clone(),
            events.clone(),
            outgoing,
            params.deadline,
        ));
    }
    drop(events);

    let total = params.subscribers;
    let mut ready = 0;
    let mut last_ready = connect_started;
    let mut outcomes = Vec::with_capacity(total);
    let mut rss_connected = None;
    while outcomes.len() < total {
        let Some(event) = event_rx.recv().await else {
            break;
        };
        match event {
            Event::Ready(at) => {
                ready += 1;
                last_ready = last_ready.max(at);
                if ready % 500 == 0 || ready == total {
                    run.progress
                        .phase(format!("join-storm: {ready}/{total} connections ready"));
                }
                if ready == total && !params.pipelined {
                    if let Some(signal) = go_signal.as_mut() {
                        eprintln!("{READY_LINE}");
                        let waited = tokio::time::timeout(params.deadline, signal.recv()).await;
                        if waited.is_err() {
                            close_all(&storm.stop, tasks).await;
                            return Err(RunError::Invalid(format!(
                                "no SIGUSR1 within {:?} of being ready",
                                params.deadline
                            )));
                        }
                    }
                    rss_connected = run.server_rss_kib();
                    server_meter = run.server.clone().map(CpuMeter::start).transpose()?;
                    client_meter = Some(CpuMeter::start(Proc::Myself)?);
                    let _ = storm.start.set(Instant::now());
                    storm.go.cancel();
                    run.progress.phase("join-storm: every connection joining");
                }
            }
            Event::Failed(index, error) => {
                close_all(&storm.stop, tasks).await;
                return Err(RunError::Setup { index, error });
            }
            Event::Done(outcome) => outcomes.push(outcome),
        }
    }
    let server_cpu = server_meter.map(|m| m.usage()).transpose()?;
    let client_cpu = client_meter.map(|m| m.usage()).transpose()?;
    let rss_after = run.server_rss_kib();
    close_all(&storm.stop, tasks).await;
    drop(queues);

    let start = *storm.start.get().unwrap_or(&connect_started);
    let since_start = |at: Instant| at.saturating_duration_since(start).as_secs_f64();
    let mut acks: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.acked)
        .map(since_start)
        .collect();
    acks.sort_by(f64::total_cmp);
    let full_counts: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.full_count)
        .map(since_start)
        .collect();
    let all_acked_s = (acks.len() == total).then(|| acks[total - 1]);
    let sends_presence = run.env.protocol.sends_presence();
    let all_told_s = (sends_presence && full_counts.len() == total)
        .then(|| full_counts.iter().copied().fold(0.0, f64::max));
    let all_in_s = match (sends_presence, all_acked_s, all_told_s) {
        (false, acked, _) => acked,
        (true, Some(acked), Some(told)) => Some(acked.max(told)),
        (true, _, _) => None,
    };
    let quantile =
        |q: f64| (!acks.is_empty()).then(|| acks[((acks.len() - 1) as f64 * q).round() as usize]);
    let errors: Vec<String> = outcomes.iter().filter_map(|o| o.error.clone()).collect();

    let mut report = blank_report(total);
    report.setup = Setup {
        seconds: last_ready.duration_since(connect_started).as_secs_f64(),
        opened: ready,
        failed: 0,
        server_rss_kib: rss_connected,
    };
    report.join_storm = Some(JoinStorm {
        members: total,
        room_members,
        pipelined: params.pipelined,
        acked: acks.len(),
        all_acked_s,
        ack_p50_s: quantile(0.5),
        ack_p99_s: quantile(0.99),
        sends_presence,
        told_full_count: full_counts.len(),
        all_told_s,
        all_in_s,
        presence_frames: storm.presence_frames.load(Ordering::Relaxed),
        server_cpu_s: server_cpu.as_ref().map(|cpu| cpu.total().as_secs_f64()),
        server_cpu_cores: server_cpu.as_ref().map(|cpu| cpu.cores()),
        server_cpu_us_per_member: server_cpu
            .as_ref()
            .map(|cpu| cpu.total().as_secs_f64() * 1e6 / total as f64),
        client_cpu_cores: client_cpu.as_ref().map(|cpu| cpu.cores()),
        client_bound: client_cpu.as_ref().is_some_and(|cpu| {
            cpu.cores() >= CLIENT_BOUND_SHARE * crate::procfs::usable_cpus() as f64
        }),
        server_rss_before_kib: rss_before,
        server_rss_after_kib: rss_after,
    });
    report.errors = run.errors(0);
    report.errors.refused += errors.len() as u64;
    report.errors.first.extend(errors.into_iter().take(5));
    Ok(report)
}

/// One member: connect (within the setup concurrency), wait for the go, join, read until the
/// room has formed for it, report, then hold the connection until the storm is over.
async fn member(
    storm: Arc<Storm>,
    index: usize,
    token: String,
    permits: Arc<Semaphore>,
    events: mpsc::UnboundedSender<Event>,
    outgoing: mpsc::Receiver<String>,
    deadline: Duration,
) {
    let env = &storm.env;
    let permit = permits.acquire_owned().await;
    let opened = tokio::select! {
        opened = env.open_ready(env.round_robin(index), index as u64, &token) => opened,
        _ = storm.stop.cancelled() => return,
    };
    drop(permit);
    let mut socket = match opened {
        Ok(socket) => socket,
        Err(error) => {
            let _ = events.send(Event::Failed(index, error));
            return;
        }
    };
    let _ = events.send(Event::Ready(Instant::now()));
    tokio::select! {
        _ = storm.go.cancelled() => {}
        _ = storm.stop.cancelled() => return,
    }
    let start = storm.start.get().copied().unwrap_or_else(Instant::now);
    let outcome = join(
        &storm,
        &mut socket,
        tokio::time::Instant::from_std(start + deadline),
    )
    .await;
    let _ = events.send(Event::Done(outcome));
    drop(events);
    env.serve(socket, index, outgoing, storm.stop.clone()).await;
}

/// Sends the join and reads until it is acknowledged and, where the server sends presence, a
/// presence event gives the full count; or until `deadline`.
async fn join(storm: &Storm, socket: &mut Socket, deadline: tokio::time::Instant) -> Outcome {
    let protocol = &storm.env.protocol;
    let wants_count = protocol.sends_presence();
    let mut outcome = Outcome::default();
    if let Err(error) = socket.send(Message::text(protocol.join(ROOM))).await {
        outcome.error = Some(format!("cannot send the join: {error}"));
        return outcome;
    }
    while outcome.acked.is_none() || (wants_count && outcome.full_count.is_none()) {
        let frame = match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(frame) => frame,
            Err(_) => {
                outcome.error = Some(if outcome.acked.is_none() {
                    "no join acknowledgement before the deadline".to_owned()
                } else {
                    "the full count never came before the deadline".to_owned()
                });
                return outcome;
            }
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => {
                outcome.error = Some("the connection closed during the storm".to_owned());
                return outcome;
            }
        };
        match protocol.decode(&text) {
            Incoming::Joined => outcome.acked = Some(Instant::now()),
            Incoming::Presence { count } => {
                storm.presence_frames.fetch_add(1, Ordering::Relaxed);
                if count >= storm.members && outcome.full_count.is_none() {
                    outcome.full_count = Some(Instant::now());
                }
            }
            Incoming::Reply(reply) => {
                let answered = socket.send(Message::text(reply)).await;
                if answered.is_err() {
                    outcome.error = Some("the connection closed during the storm".to_owned());
                    return outcome;
                }
            }
            Incoming::Refused(reason) => {
                outcome.error = Some(reason);
                return outcome;
            }
            _ => {}
        }
    }
    outcome
}
