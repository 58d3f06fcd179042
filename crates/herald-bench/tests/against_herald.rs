//! The load tool against a real Herald server (in this process, on an ephemeral port): every
//! scenario sets up, sends, and accounts for every message it sent.

use std::net::SocketAddr;
use std::time::Duration;

use herald_bench::adapter::ServerKind;
use herald_bench::report::RunReport;
use herald_bench::scenario::soak::SoakParams;
use herald_bench::scenario::{self, Options, RunError, Scenario};
use herald_server::config::Config;
use herald_server::{embedded_node, server};
use tokio::sync::oneshot;

const SECRET: &str = "bench-test-secret-0123456789";

/// A Herald server without the per-connection rate limit (the tool publishes faster than a
/// chat user), stopped when dropped.
struct Herald {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
    /// Each server keeps its store in a folder of its own.
    _data: tempfile::TempDir,
}

async fn start_herald() -> Herald {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.auth.secret = Some(SECRET.to_owned());
    config.limits.messages_per_second = 1_000_000;
    config.limits.burst = 1_000_000;
    let data = tempfile::tempdir().unwrap();
    config.store.path = data.path().to_owned();
    let node = embedded_node(config.clone(), None).unwrap();
    let listener = server::bind(config.server.listen).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server::run(listener, node, async move {
        let _ = stopped.await;
    }));
    Herald {
        addr,
        _stop: stop,
        _data: data,
    }
}

fn options(addr: SocketAddr) -> Options {
    let mut options = Options::new(ServerKind::Herald, addr, SECRET);
    options.server_pid = Some(std::process::id());
    options.warmup = Duration::from_millis(200);
    options.duration = Duration::from_millis(500);
    // Correctness, not speed, is under test here: a loaded CI machine must not fail it.
    options.latency_limit = Duration::from_secs(30);
    options
}

fn assert_every_message_arrived(report: &RunReport) {
    assert!(!report.steps.is_empty(), "{report:#?}");
    for step in &report.steps {
        assert!(step.sent > 0, "{step:#?}");
        assert_eq!(step.missing, 0, "{step:#?}");
        assert_eq!(step.lost_connections, 0, "{step:#?}");
        assert_eq!(step.refused, 0, "{step:#?}");
        assert!(step.latency_ms.samples > 0, "{step:#?}");
        assert!(step.server_cpu_us_per_delivery.is_some(), "{step:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_each_message_to_every_subscriber() {
    let herald = start_herald().await;
    let report = scenario::run(
        options(herald.addr),
        Scenario::Fanout {
            subscribers: 20,
            rates: vec![20.0, 50.0],
        },
    )
    .await
    .unwrap();
    assert_eq!(report.connections, 21);
    assert_eq!(report.steps.len(), 2);
    assert_eq!(report.steps[1].offered_deliveries_per_s, 50.0 * 20.0);
    assert_every_message_arrived(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_deliver_to_the_other_members_of_each_room() {
    let herald = start_herald().await;
    let report = scenario::run(
        options(herald.addr),
        Scenario::Rooms {
            connections: 40,
            room_size: 5,
            rates: vec![200.0],
        },
    )
    .await
    .unwrap();
    assert_eq!(report.steps[0].offered_deliveries_per_s, 200.0 * 4.0);
    assert_every_message_arrived(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_reach_each_partner() {
    let herald = start_herald().await;
    let report = scenario::run(
        options(herald.addr),
        Scenario::Direct {
            connections: 40,
            rates: vec![200.0],
        },
    )
    .await
    .unwrap();
    assert_eq!(report.steps[0].offered_deliveries_per_s, 200.0);
    assert_every_message_arrived(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_counts_completed_handshakes() {
    let herald = start_herald().await;
    let report = scenario::run(options(herald.addr), Scenario::Connect { concurrency: 4 })
        .await
        .unwrap();
    let step = &report.steps[0];
    assert!(step.delivered_per_s > 0.0, "{step:#?}");
    assert_eq!(step.refused, 0, "{:?}", report.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_opens_every_connection_and_reads_server_memory() {
    let herald = start_herald().await;
    let report = scenario::run(
        options(herald.addr),
        Scenario::Idle {
            connections: 100,
            settle: Duration::from_millis(100),
        },
    )
    .await
    .unwrap();
    assert_eq!(report.setup.opened, 100);
    assert_eq!(report.setup.failed, 0);
    let idle = report.idle.unwrap();
    assert!(idle.server_rss_after_kib.is_some());
    assert!(idle.server_rss_per_connection_kib.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_server_refuses_fails_setup_with_its_answer() {
    let herald = start_herald().await;
    let mut options = options(herald.addr);
    options.secret = "not-the-servers-secret".to_owned();
    let error = scenario::run(
        options,
        Scenario::Fanout {
            subscribers: 2,
            rates: vec![10.0],
        },
    )
    .await
    .unwrap_err();
    let RunError::Setup { error, .. } = &error else {
        panic!("not a setup error: {error}")
    };
    assert!(error.to_string().contains("401"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_churns_recovers_and_keeps_every_resource_bounded() {
    let herald = start_herald().await;
    let params = SoakParams {
        users: 30,
        residents: 10,
        rooms: 6,
        rate: 4.0,
        session: Duration::from_secs(2),
        length: Duration::from_secs(40),
        sample_every: Duration::from_secs(1),
    };
    let report = scenario::run(options(herald.addr), Scenario::Soak(params))
        .await
        .unwrap();
    let soak = report.soak.expect("a soak report");
    let traffic = &soak.traffic;
    assert_eq!(traffic.errors, 0, "{traffic:#?}");
    assert_eq!(traffic.failed_sessions, 0, "{traffic:#?}");
    assert_eq!(traffic.lost_connections, 0, "{traffic:#?}");
    assert!(
        traffic.sessions > 2 * 20,
        "the churners reconnected: {traffic:#?}"
    );
    assert!(
        traffic.recovered_joins > 0,
        "rejoins with since: {traffic:#?}"
    );
    assert!(traffic.published > 0 && traffic.sent_direct > 0 && traffic.received > 0);
    let watched: Vec<&str> = soak.series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        watched,
        [
            "rss_kib",
            "open_files",
            "connections",
            "tasks",
            "fanout_queue",
            "writer_queue"
        ],
        "every series was sampled"
    );
    assert!(soak.bounded, "{:#?}", soak.series);
}
