//! Handshakes per second: `concurrency` workers each open a connection, wait until the server
//! has verified its token and accepts requests, close it, and start over. The window counts the
//! handshakes completed inside it; the latency is one handshake's, TCP connect to ready.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Run, RunError, blank_report};
use crate::procfs::{CpuMeter, Proc};
use crate::report::{Latency, RunReport, Step};
use crate::stamp;

/// Distinct users the handshakes cycle through (each token is minted once, up front).
const USERS: usize = 1024;
/// Pause after a failed handshake, so a refusing server is not hammered in a tight loop.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

pub async fn run(run: &Run, concurrency: usize) -> Result<RunReport, RunError> {
    let concurrency = concurrency.max(1);
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..USERS)
            .map(|i| run.tokens.mint(&format!("handshake-{i}")))
            .collect::<Result<_, _>>()?,
    );
    let stop = CancellationToken::new();
    let next_index = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let env = run.env.clone();
        let tokens = tokens.clone();
        let stop = stop.clone();
        let next_index = next_index.clone();
        let failures = failures.clone();
        workers.spawn(async move {
            while !stop.is_cancelled() {
                let index = next_index.fetch_add(1, Ordering::Relaxed);
                let token = &tokens[index as usize % tokens.len()];
                let started = stamp::now_ns();
                let opened = tokio::select! {
                    opened = env.open_ready(env.round_robin(index as usize), index, token) => opened,
                    _ = stop.cancelled() => break,
                };
                match opened {
                    Ok(mut socket) => {
                        env.recorder
                            .sample(worker, stamp::now_ns().saturating_sub(started));
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
                    }
                    Err(error) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        env.recorder.refused(error.to_string());
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        });
    }
    run.progress.phase("connect: warmup");
    tokio::time::sleep(run.options.warmup).await;
    run.progress.phase("connect: measuring handshakes");
    run.recorder.open_window();
    let refused_before = run.recorder.refused_count();
    let server_meter = run.server.clone().map(CpuMeter::start).transpose()?;
    let client_meter = CpuMeter::start(Proc::Myself)?;
    let started = Instant::now();
    tokio::time::sleep(run.options.duration).await;
    let window = run.recorder.close_window();
    let window_s = started.elapsed().as_secs_f64();
    let server_cpu = server_meter.map(|m| m.usage()).transpose()?;
    let (client_cpu, client_cores) = client_meter.read()?;
    let server_rss_kib = run.server_rss_kib();
    stop.cancel();
    while workers.join_next().await.is_some() {}

    let per_handshake = |cpu: Duration| cpu.as_secs_f64() * 1e6 / (window.delivered.max(1) as f64);
    let refused = run.recorder.refused_count() - refused_before;
    let mut report = blank_report(concurrency);
    report.steps.push(Step {
        offered_msgs_per_s: 0.0,
        offered_deliveries_per_s: 0.0,
        delivered_per_s: window.delivered as f64 / window_s,
        latency_ms: Latency::from_micros(&window.latency_us),
        window_s,
        server_cpu_us_per_delivery: server_cpu.as_ref().map(|cpu| per_handshake(cpu.total())),
        server_cpu_us_per_delivery_by_process: server_cpu
            .as_ref()
            .and_then(|cpu| cpu.several())
            .map(|each| each.iter().copied().map(per_handshake).collect()),
        server_cpu_cores: server_cpu.as_ref().map(|cpu| cpu.cores()),
        server_rss_kib,
        client_cpu_us_per_delivery: per_handshake(client_cpu),
        client_cpu_cores: client_cores,
        sent: window.delivered,
        missing: 0,
        client_backlog: 0,
        lost_connections: 0,
        refused,
        sustained: refused == 0,
        client_bound: client_cores >= 0.9 * crate::procfs::usable_cpus() as f64,
    });
    report.errors = run.errors(failures.load(Ordering::Relaxed) as usize);
    Ok(report)
}
