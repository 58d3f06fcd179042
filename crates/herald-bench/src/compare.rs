//! Folds the JSON reports of a comparison (every server, every scenario, several runs) into one
//! table with Herald/peer ratios. Each figure is the median over the runs, since near a server's
//! limit the maximum varies a lot from run to run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::report::{RunReport, Step};

/// Whether a bigger number is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One row of the comparison.
pub struct Metric {
    pub label: &'static str,
    pub better: Better,
    extract: fn(&RunReport, &Reference) -> Option<f64>,
    scenario: &'static str,
}

/// Where the per-delivery CPU cost is read: the sweep step at this offered message rate.
#[derive(Debug, Clone, Copy)]
pub struct Reference {
    pub fanout_rate: f64,
}

fn max_sustained(report: &RunReport, _: &Reference) -> Option<f64> {
    report
        .steps
        .iter()
        .filter(|s| s.sustained)
        .map(|s| s.delivered_per_s)
        .reduce(f64::max)
}

fn reference_step<'a>(report: &'a RunReport, reference: &Reference) -> Option<&'a Step> {
    match report.scenario.as_str() {
        "fanout" => report
            .steps
            .iter()
            .find(|s| (s.offered_msgs_per_s - reference.fanout_rate).abs() < 1e-6),
        _ => report.steps.first(),
    }
}

fn cpu_at_reference(report: &RunReport, reference: &Reference) -> Option<f64> {
    reference_step(report, reference)?.server_cpu_us_per_delivery
}

fn p99_at_reference(report: &RunReport, reference: &Reference) -> Option<f64> {
    Some(reference_step(report, reference)?.latency_ms.p99)
}

fn handshakes(report: &RunReport, _: &Reference) -> Option<f64> {
    report.steps.first().map(|s| s.delivered_per_s)
}

fn idle_rss(report: &RunReport, _: &Reference) -> Option<f64> {
    report.idle.as_ref()?.server_rss_per_connection_kib
}

fn storm_all_in(report: &RunReport, _: &Reference) -> Option<f64> {
    report.join_storm.as_ref()?.all_in_s
}

fn storm_cpu(report: &RunReport, _: &Reference) -> Option<f64> {
    report.join_storm.as_ref()?.server_cpu_us_per_member
}

pub const METRICS: [Metric; 13] = [
    Metric {
        label: "fanout: max deliveries/s at p99 ≤ limit",
        better: Better::Higher,
        extract: max_sustained,
        scenario: "fanout",
    },
    Metric {
        label: "fanout: server CPU µs/delivery (reference rate)",
        better: Better::Lower,
        extract: cpu_at_reference,
        scenario: "fanout",
    },
    Metric {
        label: "fanout: p99 ms (reference rate)",
        better: Better::Lower,
        extract: p99_at_reference,
        scenario: "fanout",
    },
    Metric {
        label: "rooms: max deliveries/s at p99 ≤ limit",
        better: Better::Higher,
        extract: max_sustained,
        scenario: "rooms",
    },
    Metric {
        label: "rooms: server CPU µs/delivery (first rate)",
        better: Better::Lower,
        extract: cpu_at_reference,
        scenario: "rooms",
    },
    Metric {
        label: "direct: max deliveries/s at p99 ≤ limit",
        better: Better::Higher,
        extract: max_sustained,
        scenario: "direct",
    },
    Metric {
        label: "direct: server CPU µs/delivery (first rate)",
        better: Better::Lower,
        extract: cpu_at_reference,
        scenario: "direct",
    },
    Metric {
        label: "direct: p99 ms (first rate)",
        better: Better::Lower,
        extract: p99_at_reference,
        scenario: "direct",
    },
    Metric {
        label: "connect: handshakes/s (JWT)",
        better: Better::Higher,
        extract: handshakes,
        scenario: "connect",
    },
    Metric {
        label: "connect: server CPU µs/handshake",
        better: Better::Lower,
        extract: cpu_at_reference,
        scenario: "connect",
    },
    Metric {
        label: "idle: server RSS KiB/connection",
        better: Better::Lower,
        extract: idle_rss,
        scenario: "idle",
    },
    Metric {
        label: "join-storm: s until all in (acks; Herald: and presence)",
        better: Better::Lower,
        extract: storm_all_in,
        scenario: "join-storm",
    },
    Metric {
        label: "join-storm: server CPU µs/member",
        better: Better::Lower,
        extract: storm_cpu,
        scenario: "join-storm",
    },
];

/// Every report found in `dir` (files ending in `.json`), skipping none silently.
pub fn load_reports(dir: &Path) -> anyhow::Result<Vec<RunReport>> {
    let mut reports = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let report: RunReport = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a herald-bench report: {e}", path.display()))?;
        reports.push(report);
    }
    Ok(reports)
}

/// The median of some numbers (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Servers in display order: Herald first, then the peers by name.
pub fn servers(reports: &[RunReport]) -> Vec<String> {
    let mut names: Vec<String> = reports.iter().map(|r| r.server.clone()).collect();
    names.sort_by_key(|name| (name != "herald", name.clone()));
    names.dedup();
    names
}

/// The comparison as a Markdown table: a row per metric, a column per server (median of the
/// runs, with their count), then Herald/peer for each peer.
pub fn table(reports: &[RunReport], reference: &Reference) -> String {
    let servers = servers(reports);
    let peers: Vec<&String> = servers.iter().filter(|s| *s != "herald").collect();
    // (median, runs with a value, runs in all)
    let mut medians: BTreeMap<(&str, &str), (f64, usize, usize)> = BTreeMap::new();
    let mut partial = false;
    for metric in &METRICS {
        for server in &servers {
            let runs: Vec<&RunReport> = reports
                .iter()
                .filter(|r| &r.server == server && r.scenario == metric.scenario)
                .collect();
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|r| (metric.extract)(r, reference))
                .collect();
            let count = values.len();
            partial |= count > 0 && count < runs.len();
            if let Some(value) = median(values) {
                medians.insert((metric.label, server.as_str()), (value, count, runs.len()));
            }
        }
    }
    let mut out = String::new();
    let _ = write!(out, "| metric | better |");
    for server in &servers {
        let _ = write!(out, " {server} |");
    }
    for peer in &peers {
        let _ = write!(out, " herald/{peer} |");
    }
    out.push('\n');
    let _ = write!(out, "|---|---|");
    for _ in 0..servers.len() + peers.len() {
        out.push_str("---:|");
    }
    out.push('\n');
    for metric in &METRICS {
        let herald = medians.get(&(metric.label, "herald")).map(|v| v.0);
        if servers
            .iter()
            .all(|s| !medians.contains_key(&(metric.label, s.as_str())))
        {
            continue;
        }
        let arrow = match metric.better {
            Better::Higher => "↑",
            Better::Lower => "↓",
        };
        let _ = write!(out, "| {} | {arrow} |", metric.label);
        for server in &servers {
            let cell = medians.get(&(metric.label, server.as_str())).map_or_else(
                || "–".to_owned(),
                |&(value, count, runs)| {
                    if count < runs {
                        format!("{} ({count}/{runs} runs)", format_value(value))
                    } else {
                        format_value(value)
                    }
                },
            );
            let _ = write!(out, " {cell} |");
        }
        for peer in &peers {
            let peer_value = medians.get(&(metric.label, peer.as_str())).map(|v| v.0);
            let cell = match (herald, peer_value) {
                (Some(h), Some(p)) if p > 0.0 => format!("{:.2}×", h / p),
                _ => "–".to_owned(),
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    let mut per_group: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for report in reports {
        *per_group
            .entry((report.server.as_str(), report.scenario.as_str()))
            .or_default() += 1;
    }
    let runs = per_group.values().copied().max().unwrap_or(0);
    let _ = writeln!(
        out,
        "\nMedian of up to {runs} run(s) per cell. ↑: higher is better, ↓: lower is better; \
         herald/peer is Herald's value divided by the peer's."
    );
    if partial {
        let _ = writeln!(
            out,
            "(k/n runs): only k of the n runs had a value; in the others no step was sustained \
             (the server failed at the lowest offered rate), so the median is of those k."
        );
    }
    let flagged: Vec<String> = reports
        .iter()
        .filter(|r| {
            r.steps.iter().any(|s| s.client_bound)
                || r.join_storm
                    .as_ref()
                    .is_some_and(|storm| storm.client_bound)
        })
        .map(|r| format!("{} {}", r.server, r.scenario))
        .collect();
    if !flagged.is_empty() {
        let _ = writeln!(
            out,
            "Client-bound steps or storms (the load tool used ≥ 90% of its CPUs) in: {}.",
            flagged.join(", ")
        );
    }
    out
}

fn format_value(value: f64) -> String {
    if value >= 1000.0 {
        crate::report::thousands(value)
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle_report(server: &str, kib: f64) -> RunReport {
        let mut report = crate::scenario::blank_report(100);
        report.server = server.to_owned();
        report.scenario = "idle".to_owned();
        report.idle = Some(crate::report::Idle {
            server_rss_before_kib: Some(1000),
            server_rss_after_kib: Some(2000),
            server_rss_per_connection_kib: Some(kib),
            client_rss_per_connection_kib: None,
            server_idle_cpu_cores: None,
            connects_per_s: 1.0,
        });
        report
    }

    #[test]
    fn the_table_has_medians_per_server_and_herald_over_peer_ratios() {
        let reports = vec![
            idle_report("ws", 6.0),
            idle_report("herald", 4.0),
            idle_report("herald", 3.0),
            idle_report("herald", 100.0),
        ];
        let table = table(&reports, &Reference { fanout_rate: 100.0 });
        let row = table
            .lines()
            .find(|line| line.starts_with("| idle"))
            .expect("an idle row");
        assert_eq!(
            row,
            "| idle: server RSS KiB/connection | ↓ | 4.00 | 6.00 | 0.67× |"
        );
        assert!(table.contains("| metric | better | herald | ws | herald/ws |"));
        assert!(!table.contains("fanout"), "no row without data");
    }

    fn storm_report(server: &str, all_in_s: Option<f64>) -> RunReport {
        let mut report = crate::scenario::blank_report(1000);
        report.server = server.to_owned();
        report.scenario = "join-storm".to_owned();
        report.join_storm = Some(crate::report::JoinStorm {
            members: 1000,
            room_members: 1000,
            pipelined: false,
            acked: 1000,
            all_acked_s: Some(0.5),
            ack_p50_s: Some(0.2),
            ack_p99_s: Some(0.5),
            sends_presence: server == "herald",
            told_full_count: 1000,
            all_told_s: all_in_s,
            all_in_s,
            presence_frames: 0,
            server_cpu_s: Some(0.1),
            server_cpu_cores: Some(0.2),
            server_cpu_us_per_member: Some(100.0),
            client_cpu_cores: None,
            client_bound: false,
            server_rss_before_kib: None,
            server_rss_after_kib: None,
        });
        report
    }

    #[test]
    fn join_storms_compare_the_time_until_all_are_in() {
        let reports = vec![
            storm_report("herald", Some(1.0)),
            storm_report("ws", Some(2.0)),
        ];
        let table = table(&reports, &Reference { fanout_rate: 100.0 });
        let row = table
            .lines()
            .find(|line| line.starts_with("| join-storm: s until all in"))
            .expect("a join-storm row");
        assert!(row.ends_with("| 1.00 | 2.00 | 0.50× |"), "{row}");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
