//! The load tool against a real Herald server (in this process, on an ephemeral port): every
//! scenario sets up, sends, and accounts for every message it sent.

mod common;

use std::time::Duration;

use std::process::Stdio;

use common::{SECRET, closed_port, options, start_herald, start_herald_listening};
use herald_bench::report::RunReport;
use herald_bench::scenario::join_storm::{JoinStormParams, READY_LINE};
use herald_bench::scenario::{self, RunError, Scenario, Target};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

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
async fn connections_are_spread_round_robin_over_the_targets() {
    let herald = start_herald().await;
    let mut options = options(herald.addr);
    options.targets.push(Target::from(closed_port()));
    let report = scenario::run(
        options,
        Scenario::Idle {
            connections: 10,
            settle: Duration::from_millis(10),
        },
    )
    .await
    .unwrap();
    assert_eq!(report.setup.opened, 5, "{:?}", report.errors);
    assert_eq!(report.setup.failed, 5, "{:?}", report.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fanout_publisher_uses_the_first_target() {
    let herald = start_herald().await;
    let mut options = options(herald.addr);
    options.targets.push(Target::from(closed_port()));
    // One subscriber (connection 0) on the first target; the publisher, connection 1, would
    // land on the closed one if it were spread like the subscribers.
    let report = scenario::run(
        options,
        Scenario::Fanout {
            subscribers: 1,
            rates: vec![20.0],
        },
    )
    .await
    .unwrap();
    assert_every_message_arrived(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_several_targets_sums_the_server_processes() {
    let herald = start_herald_listening(3).await;
    let mut options = options(herald.addr);
    options.targets = herald.addrs.iter().copied().map(Target::from).collect();
    let pid = std::process::id();
    options.server_pids = vec![pid, pid];
    let report = scenario::run(
        options,
        Scenario::Fanout {
            subscribers: 20,
            rates: vec![50.0],
        },
    )
    .await
    .unwrap();
    assert_every_message_arrived(&report);
    assert_eq!(report.machine.server_pids, vec![pid, pid]);
    let step = &report.steps[0];
    let each = step.server_cpu_us_per_delivery_by_process.as_ref().unwrap();
    assert_eq!(each.len(), 2);
    let sum = step.server_cpu_us_per_delivery.unwrap();
    assert!(
        (each[0] + each[1] - sum).abs() < 1e-6 * sum.max(1.0),
        "{each:?} {sum}"
    );
    let targets = &report.params["target"];
    assert_eq!(targets.as_str().unwrap().split(',').count(), 3, "{targets}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_target_and_one_pid_report_as_before() {
    let herald = start_herald().await;
    let report = scenario::run(
        options(herald.addr),
        Scenario::Fanout {
            subscribers: 2,
            rates: vec![20.0],
        },
    )
    .await
    .unwrap();
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["machine"].get("server_pids").is_none(), "{json}");
    assert!(
        json["steps"][0]
            .get("server_cpu_us_per_delivery_by_process")
            .is_none(),
        "{json}"
    );
    assert_eq!(json["params"]["target"], herald.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_ends_when_every_member_is_acked_and_told_the_full_count() {
    let herald = start_herald().await;
    let report = scenario::run(
        options(herald.addr),
        Scenario::JoinStorm(JoinStormParams {
            subscribers: 60,
            pipelined: false,
            deadline: Duration::from_secs(30),
            ..JoinStormParams::default()
        }),
    )
    .await
    .unwrap();
    let storm = report.join_storm.unwrap();
    assert_eq!(storm.acked, 60, "{:?}", report.errors);
    assert!(storm.sends_presence);
    assert_eq!(storm.told_full_count, 60, "{:?}", report.errors);
    let all_in = storm.all_in_s.unwrap();
    assert!(all_in >= storm.all_acked_s.unwrap() && all_in >= storm.all_told_s.unwrap());
    assert!(storm.presence_frames >= 60);
    assert!(storm.server_cpu_us_per_member.is_some());
    assert_eq!(report.errors.refused, 0, "{:?}", report.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_join_storm_over_several_targets_forms_one_room() {
    let herald = start_herald_listening(2).await;
    let mut options = options(herald.addr);
    options.targets = herald.addrs.iter().copied().map(Target::from).collect();
    let report = scenario::run(
        options,
        Scenario::JoinStorm(JoinStormParams {
            subscribers: 40,
            pipelined: true,
            deadline: Duration::from_secs(30),
            ..JoinStormParams::default()
        }),
    )
    .await
    .unwrap();
    let storm = report.join_storm.unwrap();
    assert!(storm.pipelined);
    assert_eq!(storm.told_full_count, 40, "{:?}", report.errors);
    assert!(storm.all_in_s.is_some());
}

/// A room bigger than one process's open files is formed by several tool processes (as
/// `bench/big-room` runs them): each holds its own slice of the users, counts the room full at
/// the total, and joins on SIGUSR1 once it said it is ready. Two real `herald-bench` processes
/// of 30 members each: each member must be told a count of 60, which only the two slices
/// together (distinct users, one room) make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_split_over_two_processes_forms_one_room_when_signalled() {
    let herald = start_herald().await;
    let dir = tempfile::tempdir().unwrap();
    let mut parts = Vec::new();
    for part in 0..2 {
        let output = dir.path().join(format!("part{part}.json"));
        let first_member = (part * 30).to_string();
        let mut tool = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
            .args([
                "join-storm",
                "--subscribers",
                "30",
                "--first-member",
                &first_member,
            ])
            .args([
                "--room-members",
                "60",
                "--go-on-signal",
                "--deadline",
                "30s",
                "--quiet",
            ])
            .args(["--target", &herald.addr.to_string(), "--secret", SECRET])
            .arg("--output")
            .arg(&output)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = BufReader::new(tool.stderr.take().unwrap()).lines();
        parts.push((tool, stderr, output));
    }
    for (_, stderr, _) in &mut parts {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), stderr.next_line())
                .await
                .expect("the tool says it is ready")
                .unwrap()
                .expect("the tool says it is ready before it exits");
            if line == READY_LINE {
                break;
            }
        }
    }
    for (tool, _, _) in &parts {
        let pid = tool.id().expect("the tool is still running") as libc::pid_t;
        // SAFETY: kill(2) on a child this test spawned and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    }
    for (mut tool, _, output) in parts {
        let status = tokio::time::timeout(Duration::from_secs(60), tool.wait())
            .await
            .expect("the storm ends")
            .unwrap();
        assert!(status.success(), "{status}");
        let report: RunReport = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
        let storm = report.join_storm.unwrap();
        assert_eq!((storm.members, storm.room_members), (30, 60));
        assert_eq!(storm.acked, 30, "{:?}", report.errors);
        assert_eq!(storm.told_full_count, 30, "{:?}", report.errors);
        assert!(storm.all_in_s.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_that_cannot_form_reports_who_is_missing() {
    let herald = start_herald().await;
    let mut options = options(herald.addr);
    options.targets.push(Target::from(closed_port()));
    let error = scenario::run(
        options,
        Scenario::JoinStorm(JoinStormParams {
            subscribers: 4,
            pipelined: false,
            deadline: Duration::from_secs(5),
            ..JoinStormParams::default()
        }),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, RunError::Setup { index, .. } if index % 2 == 1),
        "{error}"
    );
}
