//! The load tool against a real Herald server (in this process, on an ephemeral port): every
//! scenario sets up, sends, and accounts for every message it sent.

mod common;

use std::time::Duration;

use common::{options, start_herald};
use herald_bench::report::RunReport;
use herald_bench::scenario::{self, RunError, Scenario};

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
