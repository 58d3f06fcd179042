//! `/metrics`: Prometheus text that moves when traffic flows (scrape, send, scrape again).

mod common;

use common::{Scrape, TestServer};
use herald_protocol::ServerEvent;
use herald_server::metrics::Kind;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test]
async fn metrics_move_when_traffic_flows() {
    let server = TestServer::start_with(|config| {
        config.limits.messages_per_second = 1;
        config.limits.burst = 4;
    })
    .await;
    let before = server.scrape().await;

    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    alice
        .request(json!({"type": "publish", "room": "lobby", "content": "hello"}))
        .await;
    let event = bob
        .next_matching(|e| matches!(e, ServerEvent::Message(_)))
        .await;
    assert!(matches!(event, ServerEvent::Message(_)));
    bob.request(json!({"type": "send", "to": ["alice"], "content": "hi"}))
        .await;
    // Past the burst of 4 (join and publish used 2 of alice's), pings are rate-limited.
    for _ in 0..5 {
        alice.send_raw(WsMessage::text(r#"{"type":"ping"}"#)).await;
    }
    alice
        .next_matching(|e| matches!(e, ServerEvent::Error(_)))
        .await;

    let after = server.scrape().await;
    let moved = |series: &str| after.value(series) - before.value(series);
    let moved_total = |name: &str| after.total(name) - before.total(name);
    assert!(moved("herald_connects_total") >= 2.0);
    assert!(after.value("herald_connections") >= 2.0);
    assert!(moved(r#"herald_messages_in_total{type="join"}"#) >= 2.0);
    assert!(moved(r#"herald_messages_in_total{type="publish"}"#) >= 1.0);
    assert!(moved(r#"herald_messages_in_total{type="send"}"#) >= 1.0);
    // welcome ×2, join acks ×2, the publish ack, bob's copy, alice's rate-limit error
    assert!(moved(r#"herald_messages_out_total{type="text"}"#) >= 7.0);
    assert!(moved(r#"herald_messages_accepted_total{kind="room"}"#) >= 1.0);
    assert!(moved("herald_received_bytes_total") > 0.0);
    assert!(moved("herald_sent_bytes_total") > 0.0);
    assert!(moved("herald_rate_limited_total") >= 1.0);
    assert!(moved("herald_delivery_latency_seconds_count") >= 7.0);
    assert!(
        moved(r#"herald_engine_operation_seconds_count{engine="presence",operation="join"}"#)
            >= 2.0
    );
    assert!(
        moved(r#"herald_engine_operation_seconds_count{engine="broker",operation="publish"}"#)
            >= 1.0
    );
    assert!(moved_total("herald_request_errors_total") >= 1.0);

    // A disconnect is counted by reason once the server has cleaned up after it.
    let peer_closed = r#"herald_disconnects_total{reason="peer closed"}"#;
    drop(alice);
    bob.ws.close(None).await.unwrap();
    let closed = server
        .scrape_until(|now| now.value(peer_closed) - before.value(peer_closed) >= 1.0)
        .await;
    assert!(closed.value(peer_closed) >= 1.0);
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_help_and_type_lines() {
    let server = TestServer::start().await;
    let _client = server.connect("alice").await;
    // The welcome is queued before the connection is counted, so the client can read it first.
    server
        .scrape_until(|now| now.value("herald_connects_total") >= 1.0)
        .await;
    let reply = server.http("GET", "/metrics", None, None).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        reply.headers
    );
    for line in [
        "# TYPE herald_connections gauge",
        "# TYPE herald_connects_total counter",
        "# TYPE herald_delivery_latency_seconds histogram",
        "# HELP herald_connections Open WebSocket connections on this node.",
    ] {
        assert!(
            reply.body.contains(line),
            "missing {line:?} in\n{}",
            reply.body
        );
    }
    assert!(
        reply
            .body
            .contains(r#"herald_delivery_latency_seconds_bucket{le="0.001"}"#)
    );
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let server = TestServer::start_with(|config| config.metrics.enabled = false).await;
    let (status, body) = server.api("GET", "/metrics", None).await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("metrics.enabled"));
}

#[tokio::test]
async fn runtime_tasks_and_queue_depths_are_gauges() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    // A stored publish is acknowledged after the writer committed it and the fan-out task took
    // it: both have set their gauge by then.
    alice
        .request(json!({"type": "publish", "room": "lobby", "content": "hello"}))
        .await;
    let scrape = server.scrape().await;
    for gauge in [
        "herald_runtime_alive_tasks",
        "herald_fanout_queue_depth",
        "herald_store_writer_queue_depth",
    ] {
        assert!(
            scrape.text.contains(&format!("# TYPE {gauge} gauge")),
            "missing {gauge} in\n{}",
            scrape.text
        );
    }
    // At least this connection's reader and writer, and the fan-out task.
    assert!(scrape.value("herald_runtime_alive_tasks") >= 3.0);
}

/// The series of a catalogue entry as the exposition format writes them, e.g.
/// `herald_disconnects_total{reason="peer closed"}`; histograms by their `_count` series.
fn catalogue_series() -> Vec<String> {
    let mut all = Vec::new();
    for metric in herald_server::metrics::CATALOGUE {
        let name = match metric.kind {
            Kind::Histogram => format!("{}_count", metric.name),
            _ => metric.name.to_owned(),
        };
        if metric.series.is_empty() {
            all.push(name.clone());
        }
        for labels in metric.series {
            let labels: Vec<String> = labels
                .iter()
                .map(|(key, value)| format!("{key}=\"{value}\""))
                .collect();
            all.push(format!("{name}{{{}}}", labels.join(",")));
        }
    }
    all
}

/// A scrape of a fresh `herald` process, which has its own registry: nothing has happened in it.
#[tokio::test]
async fn a_fresh_server_exposes_every_series_at_zero_and_the_process_series() {
    use common::process::{herald, wait_for_log};
    use tokio::io::AsyncBufReadExt;

    let data = tempfile::tempdir().unwrap();
    let mut child = herald(data.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("HERALD_AUTH_SECRET", common::SECRET)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = wait_for_log(&mut lines, |entry| entry["address"].is_string()).await;
    let url = format!("http://{}/metrics", listening["address"].as_str().unwrap());
    let reply = common::fetch(url, "GET", None, None).await;
    assert_eq!(reply.status, 200);
    let scrape = Scrape::parse(&reply.body);
    for series in catalogue_series() {
        if series == "herald_runtime_alive_tasks" {
            // Read from the runtime at each scrape: the server's own tasks are alive.
            assert!(scrape.get(&series).is_some_and(|tasks| tasks >= 1.0));
            continue;
        }
        assert_eq!(
            scrape.get(&series),
            Some(0.0),
            "{series} should be 0 on a fresh server:\n{}",
            reply.body
        );
    }
    for series in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_threads",
        "process_start_time_seconds",
    ] {
        let value = scrape.get(series);
        assert!(
            value.is_some_and(|v| v > 0.0),
            "{series} = {value:?}:\n{}",
            reply.body
        );
    }
    assert!(
        reply
            .body
            .contains("# TYPE process_cpu_seconds_total counter")
    );
}
