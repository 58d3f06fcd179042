//! Results: what one run of the tool measured, as JSON (`--json`, and the input of `compare`
//! and `chart`) and as a table for people.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Everything one invocation of `herald-bench run` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// `herald`, `ws` or `socketio`.
    pub server: String,
    /// `fanout`, `rooms`, `direct`, `connect`, `idle`, `soak` or `join-storm`.
    pub scenario: String,
    /// Connections opened for the scenario (for `connect`, the concurrency).
    pub connections: usize,
    /// The scenario's parameters as given.
    pub params: serde_json::Value,
    pub machine: Machine,
    pub setup: Setup,
    /// One per offered rate (traffic scenarios) or one for the handshake window (`connect`).
    #[serde(default)]
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Idle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak: Option<Soak>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_storm: Option<JoinStorm>,
    pub errors: Errors,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// CPUs the load tool could run on (its affinity mask).
    pub tool_cpus: usize,
    pub load_average_before: Option<[f64; 3]>,
    pub load_average_after: Option<[f64; 3]>,
    /// The server process observed through `/proc`, if a pid was given (the first of several).
    pub server_pid: Option<u32>,
    /// Every server process observed, when there were several (CPU and RSS are their sums).
    #[serde(default, skip_serializing_if = "at_most_one")]
    pub server_pids: Vec<u32>,
    pub server_command: Option<String>,
}

fn at_most_one(pids: &[u32]) -> bool {
    pids.len() <= 1
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Setup {
    /// Seconds to open (and set up) every connection.
    pub seconds: f64,
    pub opened: usize,
    pub failed: usize,
    /// Server RSS once every connection was set up, KiB.
    pub server_rss_kib: Option<u64>,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: u64,
}

impl Latency {
    pub fn from_micros(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
            samples: histogram.len(),
        }
    }
}

/// One measurement window at one offered rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// Messages per second the schedule sent (handshakes: 0).
    pub offered_msgs_per_s: f64,
    /// Deliveries per second those messages should cause.
    pub offered_deliveries_per_s: f64,
    /// Deliveries (or handshakes) per second that arrived in the window.
    pub delivered_per_s: f64,
    pub latency_ms: Latency,
    pub window_s: f64,
    /// Server CPU time per delivery (or handshake), µs; and its share of one core.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// With several server processes: each one's share of that, in `server_pids` order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_delivery_by_process: Option<Vec<f64>>,
    pub server_cpu_cores: Option<f64>,
    pub server_rss_kib: Option<u64>,
    pub client_cpu_us_per_delivery: f64,
    pub client_cpu_cores: f64,
    /// Messages sent in the step and deliveries still missing after the drain.
    pub sent: u64,
    pub missing: u64,
    /// Messages the tool could not hand to its own connections in time.
    pub client_backlog: u64,
    pub lost_connections: u64,
    pub refused: u64,
    /// Everything arrived, no connection was lost, and p99 stayed under the latency limit.
    pub sustained: bool,
    /// The load tool used 90% or more of its CPUs: the numbers may be the tool's limit.
    pub client_bound: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Idle {
    pub server_rss_before_kib: Option<u64>,
    pub server_rss_after_kib: Option<u64>,
    /// (after − before) / connections.
    pub server_rss_per_connection_kib: Option<f64>,
    pub client_rss_per_connection_kib: Option<f64>,
    /// Server CPU while the connections sat idle, share of one core.
    pub server_idle_cpu_cores: Option<f64>,
    pub connects_per_s: f64,
}

/// What a soak run saw: the server's resources over time and whether each stayed bounded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Soak {
    /// Every watched series stayed bounded (see `scenario::soak::judge`).
    pub bounded: bool,
    pub series: Vec<SeriesVerdict>,
    pub traffic: SoakTraffic,
    pub samples: Vec<Sample>,
}

/// The server's resources at one instant of a soak.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the start of the run.
    pub t_s: f64,
    /// By series: `rss_kib`, `open_files`, `connections`, `tasks`, `fanout_queue`,
    /// `writer_queue` (each present when it could be read).
    pub values: std::collections::BTreeMap<String, f64>,
}

/// One watched series over a soak, and the verdict on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeriesVerdict {
    pub name: String,
    pub samples: usize,
    pub start: f64,
    pub end: f64,
    pub max: f64,
    pub first_half_max: f64,
    pub second_half_max: f64,
    /// How much the least-squares trend of the second half rises over that half.
    pub second_half_rise: f64,
    /// The rise allowed: a share of the first half's maximum, at least the series' floor.
    pub allowance: f64,
    pub bounded: bool,
}

/// What the soak's clients did and saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SoakTraffic {
    /// Connections opened (sessions), and those that could not be opened or set up.
    pub sessions: u64,
    pub failed_sessions: u64,
    /// Established connections the server closed.
    pub lost_connections: u64,
    pub published: u64,
    pub sent_direct: u64,
    /// Messages received (live, replayed inbox and recovery alike).
    pub received: u64,
    pub joins: u64,
    /// Joins with `since` whose ack said every missed message was replayed.
    pub recovered_joins: u64,
    pub inbox_acks: u64,
    /// Error frames, undecodable frames and failed sessions, with the first few verbatim.
    pub errors: u64,
    pub first_errors: Vec<String>,
}

/// A join storm: N members joining one room at once. Times are seconds since the storm's start:
/// the moment every member sent its join, or with `pipelined`, the first connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinStorm {
    /// This process's members, and the room's (several processes, one room: `bench/big-room`).
    pub members: usize,
    #[serde(default)]
    pub room_members: usize,
    /// Each member joined as soon as it was ready (handshakes inside the storm).
    pub pipelined: bool,
    /// Members whose join was acknowledged, and when the last was.
    pub acked: usize,
    pub all_acked_s: Option<f64>,
    pub ack_p50_s: Option<f64>,
    pub ack_p99_s: Option<f64>,
    /// Whether the server tells members who is in the room (Herald's `presence_diff`).
    pub sends_presence: bool,
    /// Members told a count of `members`, and when the last was.
    pub told_full_count: usize,
    pub all_told_s: Option<f64>,
    /// When the room had formed for everyone: every join acknowledged and, where the server
    /// sends presence, every member told the full count. `None` if that never happened.
    pub all_in_s: Option<f64>,
    /// Presence events the members received before they were told the full count.
    pub presence_frames: u64,
    /// Server CPU over the storm (from its start until the last member was in).
    pub server_cpu_s: Option<f64>,
    pub server_cpu_cores: Option<f64>,
    pub server_cpu_us_per_member: Option<f64>,
    /// The load tool's CPU over the storm, share of one core; `client_bound` from 90% of the
    /// CPUs it may use (then the times may be the tool's limit, not the server's).
    #[serde(default)]
    pub client_cpu_cores: Option<f64>,
    #[serde(default)]
    pub client_bound: bool,
    pub server_rss_before_kib: Option<u64>,
    pub server_rss_after_kib: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Errors {
    pub refused: u64,
    pub lost_connections: u64,
    pub failed_connections: usize,
    /// The first few refusal or failure messages, verbatim.
    pub first: Vec<String>,
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// `1234567.0` as `1,234,567`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl RunReport {
    /// A table for people: one line per step, then idle memory and errors.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let load = |l: Option<[f64; 3]>| l.map_or_else(|| "?".into(), |l| format!("{:.2}", l[0]));
        let _ = writeln!(
            out,
            "{} · {} · {} connections · setup {:.1} s · load {} → {}",
            self.server,
            self.scenario,
            self.connections,
            self.setup.seconds,
            load(self.machine.load_average_before),
            load(self.machine.load_average_after),
        );
        if !self.steps.is_empty() {
            let unit = if self.scenario == "connect" {
                "handshakes/s"
            } else {
                "delivered/s"
            };
            let _ = writeln!(
                out,
                "{:>10} {:>12} {:>12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7}  ok",
                "offered/s",
                "offered dl/s",
                unit,
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "srv µs/dl",
                "srv cores",
                "cli cores",
                "missing",
            );
            for step in &self.steps {
                let _ = writeln!(
                    out,
                    "{:>10} {:>12} {:>12} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>9} {:>9.2} {:>7}  {}{}",
                    thousands(step.offered_msgs_per_s),
                    thousands(step.offered_deliveries_per_s),
                    thousands(step.delivered_per_s),
                    step.latency_ms.p50,
                    step.latency_ms.p90,
                    step.latency_ms.p99,
                    step.latency_ms.max,
                    opt(step.server_cpu_us_per_delivery, 2),
                    opt(step.server_cpu_cores, 2),
                    step.client_cpu_cores,
                    step.missing,
                    if step.sustained { "yes" } else { "no" },
                    if step.client_bound {
                        " (client-bound)"
                    } else {
                        ""
                    },
                );
            }
        }
        if let Some(idle) = &self.idle {
            let _ = writeln!(
                out,
                "idle: server RSS {} → {} KiB, {} KiB per connection; client {} KiB per connection; \
                 server idle CPU {} cores; {} connects/s",
                idle.server_rss_before_kib
                    .map_or_else(|| "-".into(), |v| v.to_string()),
                idle.server_rss_after_kib
                    .map_or_else(|| "-".into(), |v| v.to_string()),
                opt(idle.server_rss_per_connection_kib, 2),
                opt(idle.client_rss_per_connection_kib, 2),
                opt(idle.server_idle_cpu_cores, 3),
                thousands(idle.connects_per_s),
            );
        }
        if let Some(soak) = &self.soak {
            let t = &soak.traffic;
            let _ = writeln!(
                out,
                "soak: {} sessions ({} failed, {} lost), {} published, {} direct, {} received, \
                 {} joins ({} recovered), {} inbox acks, {} errors",
                t.sessions,
                t.failed_sessions,
                t.lost_connections,
                t.published,
                t.sent_direct,
                t.received,
                t.joins,
                t.recovered_joins,
                t.inbox_acks,
                t.errors,
            );
            let _ = writeln!(
                out,
                "{:<14} {:>12} {:>12} {:>12} {:>14} {:>14} {:>12}  bounded",
                "series", "start", "end", "max", "1st-half max", "2nd-half rise", "allowance"
            );
            for s in &soak.series {
                let _ = writeln!(
                    out,
                    "{:<14} {:>12.0} {:>12.0} {:>12.0} {:>14.0} {:>14.1} {:>12.0}  {}",
                    s.name,
                    s.start,
                    s.end,
                    s.max,
                    s.first_half_max,
                    s.second_half_rise,
                    s.allowance,
                    if s.bounded { "yes" } else { "NO" },
                );
            }
        }
        if let Some(storm) = &self.join_storm {
            let secs =
                |v: Option<f64>| v.map_or_else(|| "never".to_owned(), |v| format!("{v:.2} s"));
            let _ = writeln!(
                out,
                "join storm ({}): {} members; {} acked, last at {} (p50 {}, p99 {})",
                if storm.pipelined {
                    "each joining once connected, clock from the first connect"
                } else {
                    "all joining at once after connecting, clock from the first join"
                },
                storm.members,
                storm.acked,
                secs(storm.all_acked_s),
                secs(storm.ack_p50_s),
                secs(storm.ack_p99_s),
            );
            if storm.sends_presence {
                let _ = writeln!(
                    out,
                    "presence: {} members told the count {}, last at {}; {} presence frames \
                     ({:.1} per member)",
                    storm.told_full_count,
                    storm.members,
                    secs(storm.all_told_s),
                    thousands(storm.presence_frames as f64),
                    storm.presence_frames as f64 / storm.members.max(1) as f64,
                );
            }
            let _ = writeln!(
                out,
                "all in: {}; server CPU {} s ({} cores, {} µs per member); tool {} cores{}; \
                 server RSS {} → {} KiB",
                secs(storm.all_in_s),
                opt(storm.server_cpu_s, 2),
                opt(storm.server_cpu_cores, 2),
                opt(storm.server_cpu_us_per_member, 1),
                opt(storm.client_cpu_cores, 2),
                if storm.client_bound {
                    " (client-bound)"
                } else {
                    ""
                },
                storm
                    .server_rss_before_kib
                    .map_or_else(|| "-".into(), |v| v.to_string()),
                storm
                    .server_rss_after_kib
                    .map_or_else(|| "-".into(), |v| v.to_string()),
            );
        }
        let errors = &self.errors;
        if errors.refused + errors.lost_connections > 0 || errors.failed_connections > 0 {
            let _ = writeln!(
                out,
                "errors: {} refused, {} connections lost, {} failed to open; first: {:?}",
                errors.refused, errors.lost_connections, errors.failed_connections, errors.first
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.4), "1,234,567");
    }

    #[test]
    fn percentiles_come_out_in_milliseconds() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3).unwrap();
        for us in 1..=1000u64 {
            histogram.record(us * 100).unwrap();
        }
        let latency = Latency::from_micros(&histogram);
        assert!((latency.p50 - 50.0).abs() < 0.1, "{latency:?}");
        assert!((latency.p99 - 99.0).abs() < 0.1, "{latency:?}");
        assert!((latency.max - 100.0).abs() < 0.1, "{latency:?}");
        assert_eq!(latency.samples, 1000);
    }
}
