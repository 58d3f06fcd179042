//! The soak scenario against a real Herald server, in its own test binary: its 40 s of churn
//! would otherwise share the machine with the throughput scenarios running beside it.

mod common;

use std::time::Duration;

use common::{options, start_herald};
use herald_bench::scenario::soak::SoakParams;
use herald_bench::scenario::{self, Scenario};

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
