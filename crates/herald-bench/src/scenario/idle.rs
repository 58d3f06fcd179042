//! Idle connections: open N authenticated connections, let the server settle, and read its RSS.
//! The figure is (RSS after − RSS before) / N, so the server's fixed cost is left out.

use std::time::Duration;

use super::setup::{ConnPlan, close_all, establish_all};
use super::{Run, RunError, blank_report};
use crate::procfs::{CpuMeter, Proc};
use crate::report::{Idle, RunReport, Setup};

pub async fn run(run: &Run, connections: usize, settle: Duration) -> Result<RunReport, RunError> {
    let server_before = run.server_rss_kib();
    let client_before = Proc::Myself.rss_bytes()?;
    let plans = (0..connections)
        .map(|i| ConnPlan {
            user: format!("idle-{i}"),
            endpoint: run.env.round_robin(i),
            rooms: Vec::new(),
        })
        .collect();
    let stop = tokio_util::sync::CancellationToken::new();
    let established = establish_all(run, plans, &stop).await?;
    let opened = established.opened;

    run.progress
        .phase(format!("idle: {opened} connections settling"));
    let server_meter = run.server.clone().map(CpuMeter::start).transpose()?;
    tokio::time::sleep(settle).await;
    let server_idle_cpu = server_meter.map(|m| m.read()).transpose()?;
    let server_after = run.server_rss_kib();
    let client_after = Proc::Myself.rss_bytes()?;

    let per_connection = |before: u64, after: u64| {
        (opened > 0).then(|| after.saturating_sub(before) as f64 / opened as f64)
    };
    let mut report = blank_report(connections);
    report.setup = Setup {
        seconds: established.seconds,
        opened,
        failed: established.failed.len(),
        server_rss_kib: server_after,
    };
    report.idle = Some(Idle {
        server_rss_before_kib: server_before,
        server_rss_after_kib: server_after,
        server_rss_per_connection_kib: server_before
            .zip(server_after)
            .and_then(|(before, after)| per_connection(before, after)),
        client_rss_per_connection_kib: per_connection(client_before, client_after)
            .map(|bytes| bytes / 1024.0),
        server_idle_cpu_cores: server_idle_cpu.map(|(_, cores)| cores),
        connects_per_s: opened as f64 / established.seconds.max(1e-9),
    });
    let failures: Vec<String> = established
        .failed
        .iter()
        .take(5)
        .map(|(index, error)| format!("connection {index}: {error}"))
        .collect();
    close_all(&stop, established.tasks).await;
    report.errors = run.errors(report.setup.failed);
    report.errors.first.extend(failures);
    Ok(report)
}
