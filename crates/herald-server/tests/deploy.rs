//! The deployment recipes in `deploy/`: the Grafana dashboard queries only series a fresh
//! server exposes, and the systemd unit raises the open-file limit, is hardened, and gives the
//! graceful stop more time than the shutdown grace. (The nginx config runs in
//! `deploy_nginx.rs`.)

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::TestServer;
use herald_server::config::Config;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repository().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every PromQL expression in the dashboard.
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/herald.json")).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    queries
}

/// The metric selectors of a query: each name (`herald_*`, `process_*`) with the
/// `label="value"` matchers written after it.
fn selectors(query: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut found = Vec::new();
    let bytes = query.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &query[at..];
        let starts_name = (rest.starts_with("herald_") || rest.starts_with("process_"))
            && (at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_'));
        if !starts_name {
            at += 1;
            continue;
        }
        let length = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = rest[..length].to_owned();
        at += length;
        let mut matchers = Vec::new();
        if query[at..].starts_with('{') {
            let end = at + query[at..].find('}').expect("a closing brace");
            for matcher in query[at + 1..end].split(',') {
                if let Some((label, value)) = matcher.split_once("=\"")
                    && !label.ends_with(['!', '=', '~'])
                {
                    matchers.push((label.trim().to_owned(), value.trim_end_matches('"').into()));
                }
            }
            at = end + 1;
        }
        found.push((name, matchers));
    }
    found
}

#[tokio::test]
async fn every_series_the_dashboard_queries_exists_on_a_fresh_server() {
    let server = TestServer::start().await;
    let scrape = server.scrape().await;
    let series: Vec<&str> = scrape
        .text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .collect();
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    let mut used = BTreeSet::new();
    for query in &queries {
        let found = selectors(query);
        assert!(!found.is_empty(), "no metric in {query:?}");
        for (name, matchers) in found {
            let exists = series.iter().any(|line| {
                let (series_name, labels) = line
                    .split_once('{')
                    .unwrap_or((line.split_once(' ').map_or(*line, |(name, _)| name), ""));
                series_name == name
                    && matchers
                        .iter()
                        .all(|(label, value)| labels.contains(&format!("{label}=\"{value}\"")))
            });
            assert!(
                exists,
                "the dashboard queries {name}{matchers:?}, which /metrics does not have:\n{}",
                scrape.text
            );
            used.insert(name);
        }
    }
    // What the operations docs promise the dashboard shows.
    for wanted in [
        "herald_connections",
        "herald_messages_in_total",
        "herald_messages_out_total",
        "herald_delivery_latency_seconds_bucket",
        "herald_store_commit_seconds_bucket",
        "herald_slow_consumers_total",
        "herald_handshakes_refused_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            used.contains(wanted),
            "the dashboard has no panel on {wanted}"
        );
    }
}

/// `key=value` settings of the unit's sections, in order.
fn unit_settings() -> Vec<(String, String)> {
    read("deploy/systemd/herald.service")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with('['))
        .map(|line| {
            let (key, value) = line.split_once('=').expect("key=value");
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

fn unit_value(key: &str) -> String {
    unit_settings()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("the unit has no {key}"))
}

#[test]
fn the_systemd_unit_stops_gracefully_with_room_for_the_shutdown_grace() {
    let defaults = Config::default();
    let stop = humantime::parse_duration(&unit_value("TimeoutStopSec")).unwrap();
    let needed = defaults.server.shutdown_delay + defaults.server.shutdown_grace;
    assert!(
        stop >= needed + Duration::from_secs(5),
        "TimeoutStopSec {stop:?} leaves no room after shutdown_delay + shutdown_grace {needed:?}"
    );
    assert_eq!(unit_value("KillSignal"), "SIGTERM");
    let nofile: u64 = unit_value("LimitNOFILE").parse().unwrap();
    assert!(nofile >= 65_536, "LimitNOFILE {nofile}");
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("DynamicUser", "yes"),
        ("StateDirectory", "herald"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(unit_value(key), value, "{key}");
    }
    // The data folder is the state directory, the one place the service may write.
    assert_eq!(
        unit_value("Environment"),
        "HERALD_STORE_PATH=/var/lib/herald"
    );
}

#[test]
fn the_systemd_unit_runs_a_command_line_the_binary_accepts() {
    let exec = unit_value("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/herald"));
    let args: Vec<&str> = words.collect();
    // clap checks every flag and value before `--help` prints; nothing is started.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(&args)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{exec}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `systemd-analyze verify` checks every key and value the way systemd will, with the test's
/// binary standing in for /usr/local/bin/herald.
#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let found = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output();
    if found.is_err() {
        eprintln!("NOTICE: systemd-analyze is not installed; the unit's keys were checked only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("herald.service");
    let text = read("deploy/systemd/herald.service")
        .replace("/usr/local/bin/herald", env!("CARGO_BIN_EXE_herald"));
    std::fs::write(&unit, text).unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("herald.service"))
        .collect();
    assert!(
        output.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
