//! The traffic scenarios (fanout, rooms, direct): set up, then for each offered rate a warmup,
//! a measurement window and a drain, on the same connections.

use std::time::{Duration, Instant};

use super::setup::{ConnPlan, close_all, establish_all};
use super::{Run, RunError, Scenario, blank_report};
use crate::pacer::{Destination, Pacer, Sender};
use crate::procfs::{CpuMeter, Proc};
use crate::report::{Latency, RunReport, Setup, Step};
use crate::stamp;

/// A sustained step delivers at least this share of what it offered inside its window.
const SUSTAINED_SHARE: f64 = 0.95;
/// The tool counts as the bottleneck from this share of its CPUs on.
const CLIENT_BOUND_SHARE: f64 = 0.9;

struct SenderPlan {
    conn: usize,
    destination: Destination,
    recipients: u64,
}

struct Layout {
    conns: Vec<ConnPlan>,
    senders: Vec<SenderPlan>,
    rates: Vec<f64>,
}

/// The connections and senders of `scenario`, connections spread round-robin over `endpoints`
/// (so a room's members, and a direct pair's two sides, are on different nodes where there are
/// several); the fan-out publisher on the first.
fn layout(scenario: &Scenario, endpoints: usize) -> Result<Layout, RunError> {
    let spread = |i: usize| i % endpoints;
    match scenario {
        Scenario::Fanout { subscribers, rates } => {
            let room = "fanout".to_owned();
            let mut conns: Vec<ConnPlan> = (0..*subscribers)
                .map(|i| ConnPlan {
                    user: format!("sub-{i}"),
                    endpoint: spread(i),
                    rooms: vec![room.clone()],
                })
                .collect();
            // The publisher joins too: every server here lets only members publish.
            conns.push(ConnPlan {
                user: "publisher".to_owned(),
                endpoint: 0,
                rooms: vec![room.clone()],
            });
            Ok(Layout {
                senders: vec![SenderPlan {
                    conn: *subscribers,
                    destination: Destination::Room(room),
                    recipients: *subscribers as u64,
                }],
                conns,
                rates: rates.clone(),
            })
        }
        Scenario::Rooms {
            connections,
            room_size,
            rates,
        } => {
            if *room_size < 2 {
                return Err(RunError::Invalid("a room needs at least 2 members".into()));
            }
            let room_of = |i: usize| i / room_size;
            let members_of = |room: usize| {
                let first = room * room_size;
                (first + room_size).min(*connections) - first
            };
            let conns = (0..*connections)
                .map(|i| ConnPlan {
                    user: format!("member-{i}"),
                    endpoint: spread(i),
                    rooms: vec![format!("room-{}", room_of(i))],
                })
                .collect();
            let senders = (0..*connections)
                .filter(|i| members_of(room_of(*i)) > 1)
                .map(|i| SenderPlan {
                    conn: i,
                    destination: Destination::Room(format!("room-{}", room_of(i))),
                    recipients: members_of(room_of(i)) as u64 - 1,
                })
                .collect();
            Ok(Layout {
                conns,
                senders,
                rates: rates.clone(),
            })
        }
        Scenario::Direct { connections, rates } => {
            let pairs = connections / 2;
            if pairs == 0 {
                return Err(RunError::Invalid(
                    "direct needs at least 2 connections".into(),
                ));
            }
            let conns = (0..pairs * 2)
                .map(|i| ConnPlan {
                    user: format!("peer-{i}"),
                    endpoint: spread(i),
                    rooms: Vec::new(),
                })
                .collect();
            let senders = (0..pairs * 2)
                .map(|i| SenderPlan {
                    conn: i,
                    destination: Destination::User(format!("peer-{}", i ^ 1)),
                    recipients: 1,
                })
                .collect();
            Ok(Layout {
                conns,
                senders,
                rates: rates.clone(),
            })
        }
        _ => Err(RunError::Invalid(format!(
            "{} is not a traffic scenario",
            scenario.name()
        ))),
    }
}

pub async fn run(run: &Run, scenario: &Scenario) -> Result<RunReport, RunError> {
    let layout = layout(scenario, run.env.endpoints.len())?;
    let name = scenario.name();
    let connections = layout.conns.len();
    let stop = tokio_util::sync::CancellationToken::new();
    let established = establish_all(run, layout.conns, &stop).await?;
    if let Some((index, error)) = established.failed.into_iter().next() {
        close_all(&stop, established.tasks).await;
        return Err(RunError::Setup { index, error });
    }
    let senders = layout
        .senders
        .into_iter()
        .map(|plan| Sender {
            queue: established.queues[plan.conn].clone(),
            destination: plan.destination,
            recipients: plan.recipients,
        })
        .collect();
    let mut pacer = Pacer::new(
        run.env.protocol.clone(),
        senders,
        stamp::padding(run.options.padding),
    );
    let mut report = blank_report(connections);
    report.setup = Setup {
        seconds: established.seconds,
        opened: established.opened,
        failed: 0,
        server_rss_kib: run.server_rss_kib(),
    };

    let recorder = &run.recorder;
    let options = &run.options;
    // Deliveries expected since the start and still missing after the previous step.
    let mut expected = recorder.delivered_total();
    let mut missing_before = 0;
    for rate in layout.rates {
        let lost_before = recorder.lost_connections();
        let refused_before = recorder.refused_count();
        run.progress
            .phase(format!("{name}: warmup at {rate} msg/s"));
        let warm = pacer.run(rate, options.warmup).await;

        run.progress
            .phase(format!("{name}: measuring at {rate} msg/s"));
        recorder.open_window();
        let server_meter = run.server.clone().map(CpuMeter::start).transpose()?;
        let client_meter = CpuMeter::start(Proc::Myself)?;
        let window_started = Instant::now();
        let measured = pacer.run(rate, options.duration).await;
        let window = recorder.close_window();
        let window_s = window_started.elapsed().as_secs_f64();
        let server_cpu = server_meter.map(|m| m.usage()).transpose()?;
        let (client_cpu, client_cores) = client_meter.read()?;

        run.progress.phase(format!("{name}: draining"));
        expected += warm.expected + measured.expected;
        drain(run, expected, options.drain).await;
        let missing_now = expected.saturating_sub(recorder.delivered_total());
        let missing = missing_now.saturating_sub(missing_before);
        missing_before = missing_now;

        let latency = Latency::from_micros(&window.latency_us);
        let offered_deliveries = rate * pacer.mean_recipients();
        let delivered_per_s = window.delivered as f64 / window_s;
        let per_delivery =
            |cpu: Duration| cpu.as_secs_f64() * 1e6 / (window.delivered.max(1) as f64);
        let lost = recorder.lost_connections() - lost_before;
        let client_backlog = warm.client_backlog + measured.client_backlog;
        let sustained = missing == 0
            && lost == 0
            && client_backlog == 0
            && delivered_per_s >= SUSTAINED_SHARE * offered_deliveries
            && latency.p99 <= options.latency_limit.as_secs_f64() * 1000.0;
        report.steps.push(Step {
            offered_msgs_per_s: rate,
            offered_deliveries_per_s: offered_deliveries,
            delivered_per_s,
            latency_ms: latency,
            window_s,
            server_cpu_us_per_delivery: server_cpu.as_ref().map(|cpu| per_delivery(cpu.total())),
            server_cpu_us_per_delivery_by_process: server_cpu
                .as_ref()
                .and_then(|cpu| cpu.several())
                .map(|each| each.iter().copied().map(per_delivery).collect()),
            server_cpu_cores: server_cpu.as_ref().map(|cpu| cpu.cores()),
            server_rss_kib: run.server_rss_kib(),
            client_cpu_us_per_delivery: per_delivery(client_cpu),
            client_cpu_cores: client_cores,
            sent: warm.sent + measured.sent,
            missing,
            client_backlog,
            lost_connections: lost,
            refused: recorder.refused_count() - refused_before,
            sustained,
            client_bound: client_cores >= CLIENT_BOUND_SHARE * crate::procfs::usable_cpus() as f64,
        });
        if !sustained && options.stop_at_failure {
            break;
        }
    }
    close_all(&stop, established.tasks).await;
    report.errors = run.errors(0);
    Ok(report)
}

/// Waits until `expected` deliveries have arrived in all, or `limit` has passed.
async fn drain(run: &Run, expected: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while run.recorder.delivered_total() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
