//! Prometheus metrics: the catalogue of every metric Herald emits, the recorder behind
//! `/metrics`, and cached handles for the per-delivery hot path.
//!
//! Code anywhere records with the `metrics` crate's macros (`metrics::counter!(…)`); this module
//! installs the recorder those macros feed. The `metrics` facade has one recorder per process,
//! and its macros are what keeps recording cheap at every call site (a static handle, no lookup
//! through a server object), so Herald keeps that one registry rather than threading a registry
//! through every layer: [`install`] runs once per process, and every server in the process (tests
//! run several) renders the same registry. Tests therefore compare a scrape with an earlier one
//! (deltas) or start the real binary when they need a process of their own.
//!
//! [`CATALOGUE`] is the one list of metrics: [`install`] describes each one (`# HELP`) and
//! creates its series at zero, so a fresh server already exposes every series Prometheus and the
//! dashboard (`deploy/grafana/herald.json`) query. `docs/api.md#metrics` lists the same names (a
//! test compares them). To add a metric, add an entry here and a row there.
//!
//! Histograms buffer raw samples until they are folded into buckets, so a thread runs the
//! recorder's upkeep every [`UPKEEP_INTERVAL`]: memory stays bounded even if nobody scrapes. The
//! standard `process_*` series (CPU, memory, open files, threads) come from `metrics-process`,
//! collected on each scrape.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use herald_protocol::CloseCode;
use metrics::{Counter, Histogram, Label, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// How often buffered histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Upper bounds of the latency buckets, in seconds: 50 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The word Prometheus uses in `# TYPE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One entry of the catalogue.
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
    /// The label sets created at zero on start-up. Empty for a metric without labels (its one
    /// series is created). A labelled metric lists the values its label can take when they are
    /// a closed set; labels with open values (an API endpoint, a status) also appear as traffic
    /// brings them.
    pub series: &'static [&'static [(&'static str, &'static str)]],
}

const NO_LABELS: &[&[(&str, &str)]] = &[];

/// The `reason` of `herald_disconnects_total` when the client closed or vanished.
pub const PEER_CLOSED: &str = "peer closed";

/// Every metric Herald emits, in the order of `docs/api.md#metrics`.
pub const CATALOGUE: &[Metric] = &[
    Metric {
        name: "herald_connections",
        kind: Kind::Gauge,
        unit: None,
        help: "Open WebSocket connections on this node.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_pending_auth_connections",
        kind: Kind::Gauge,
        unit: None,
        help: "Connections accepted without a token, waiting for their auth message.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_connects_total",
        kind: Kind::Counter,
        unit: None,
        help: "WebSocket connections accepted (registered with the node).",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_disconnects_total",
        kind: Kind::Counter,
        unit: None,
        help: "WebSocket connections ended, by reason (the close reason, or \"peer closed\").",
        series: &[
            &[("reason", PEER_CLOSED)],
            &[("reason", CloseCode::GOING_AWAY.reason)],
            &[("reason", CloseCode::HEARTBEAT_TIMEOUT.reason)],
            &[("reason", CloseCode::SLOW_CONSUMER.reason)],
            &[("reason", CloseCode::TOKEN_EXPIRED.reason)],
            &[("reason", CloseCode::AUTH_TIMEOUT.reason)],
            &[("reason", CloseCode::AUTH_FAILED.reason)],
            &[("reason", CloseCode::POLICY_VIOLATION.reason)],
            &[("reason", CloseCode::KICKED.reason)],
        ],
    },
    Metric {
        name: "herald_handshakes_refused_total",
        kind: Kind::Counter,
        unit: None,
        help: "WebSocket handshakes refused before the upgrade, by reason.",
        series: &[
            &[("reason", "auth")],
            &[("reason", "origin")],
            &[("reason", "pending_limit")],
        ],
    },
    Metric {
        name: "herald_messages_in_total",
        kind: Kind::Counter,
        unit: None,
        help: "Frames received from clients, by request type (\"invalid\" when unparseable).",
        series: &[
            &[("type", "send")],
            &[("type", "publish")],
            &[("type", "join")],
            &[("type", "leave")],
            &[("type", "invalid")],
        ],
    },
    Metric {
        name: "herald_messages_out_total",
        kind: Kind::Counter,
        unit: None,
        help: "Frames written to client sockets, by frame type (text or binary).",
        series: &[&[("type", "text")], &[("type", "binary")]],
    },
    Metric {
        name: "herald_received_bytes_total",
        kind: Kind::Counter,
        unit: Some(Unit::Bytes),
        help: "Payload bytes of data frames received from clients.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_sent_bytes_total",
        kind: Kind::Counter,
        unit: Some(Unit::Bytes),
        help: "Payload bytes of data frames written to client sockets.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_deflate_compressions_total",
        kind: Kind::Counter,
        unit: None,
        help: "Messages compressed by Herald for connections without server context takeover: \
               one per message and window size, however many connections it goes to.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_messages_accepted_total",
        kind: Kind::Counter,
        unit: None,
        help: "Messages accepted for delivery, by kind (room, ephemeral, direct, broadcast).",
        series: &[
            &[("kind", "room")],
            &[("kind", "ephemeral")],
            &[("kind", "direct")],
            &[("kind", "broadcast")],
        ],
    },
    Metric {
        name: "herald_messages_stored_total",
        kind: Kind::Counter,
        unit: None,
        help: "Messages committed to the store (room messages and direct messages).",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_messages_queued_total",
        kind: Kind::Counter,
        unit: None,
        help: "Copies of messages queued on local connections' outboxes.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_delivery_latency_seconds",
        kind: Kind::Histogram,
        unit: Some(Unit::Seconds),
        help: "Time from a message reaching this node's hub (for a stored message: after its \
               commit) to its frame being flushed to the socket.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_slow_consumers_total",
        kind: Kind::Counter,
        unit: None,
        help: "Connections cut off because their bounded outbox was full.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_rate_limited_total",
        kind: Kind::Counter,
        unit: None,
        help: "Client frames dropped by the per-connection rate limit.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_request_errors_total",
        kind: Kind::Counter,
        unit: None,
        help: "Error frames sent to clients, by error code.",
        series: &[
            &[("code", "invalid_json")],
            &[("code", "unknown_type")],
            &[("code", "invalid_field")],
            &[("code", "not_member")],
            &[("code", "forbidden")],
            &[("code", "rate_limited")],
            &[("code", "limit_exceeded")],
            &[("code", "unauthenticated")],
            &[("code", "internal")],
        ],
    },
    Metric {
        name: "herald_inbox_replayed_total",
        kind: Kind::Counter,
        unit: None,
        help: "Unacknowledged inbox messages replayed to connections at connect.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_recoveries_total",
        kind: Kind::Counter,
        unit: None,
        help: "Joins that asked to recover missed room messages, by outcome.",
        series: &[&[("outcome", "recovered")], &[("outcome", "not_recovered")]],
    },
    Metric {
        name: "herald_store_commit_seconds",
        kind: Kind::Histogram,
        unit: Some(Unit::Seconds),
        help: "Time the store's writer takes to commit one batch of messages.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_store_wal_restart_seconds",
        kind: Kind::Histogram,
        unit: Some(Unit::Seconds),
        help: "Time the store's writer is held while it starts the WAL over, about once a second under writes.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_store_merge_step_seconds",
        kind: Kind::Histogram,
        unit: Some(Unit::Seconds),
        help: "Time the store's writer is held by one step of merging staged direct-message entries into their tables.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_store_pruned_total",
        kind: Kind::Counter,
        unit: None,
        help: "Stored messages removed by retention passes.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_engine_operation_seconds",
        kind: Kind::Histogram,
        unit: Some(Unit::Seconds),
        help: "Latency of engine calls, by engine (broker, presence) and operation.",
        series: &[
            &[("engine", "broker"), ("operation", "publish")],
            &[("engine", "broker"), ("operation", "subscribe")],
            &[("engine", "presence"), ("operation", "join")],
            &[("engine", "presence"), ("operation", "connect")],
        ],
    },
    Metric {
        name: "herald_broker_malformed_total",
        kind: Kind::Counter,
        unit: None,
        help: "Messages from other nodes the broker dropped as malformed (another wire version).",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_api_requests_total",
        kind: Kind::Counter,
        unit: None,
        help: "Server API requests, by endpoint and status code.",
        series: &[&[("endpoint", "/api/publish"), ("status", "200")]],
    },
    Metric {
        name: "herald_tls_reloads_total",
        kind: Kind::Counter,
        unit: None,
        help: "Certificate reloads, by result (ok, error).",
        series: &[&[("result", "ok")], &[("result", "error")]],
    },
    Metric {
        name: "herald_runtime_alive_tasks",
        kind: Kind::Gauge,
        unit: None,
        help: "Tasks alive on the server's tokio runtime, read when /metrics is scraped.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_fanout_queue_depth",
        kind: Kind::Gauge,
        unit: None,
        help: "Commits (each a batch of messages) waiting for the embedded store's publishing task, read each time it takes one.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_store_writer_queue_depth",
        kind: Kind::Gauge,
        unit: None,
        help: "Commands waiting for the SQLite writer thread, read each time it takes a batch.",
        series: NO_LABELS,
    },
    Metric {
        name: "herald_store_cached_streams",
        kind: Kind::Gauge,
        unit: None,
        help: "Streams whose state the SQLite writer holds in memory (at most 10,000), after each batch.",
        series: NO_LABELS,
    },
];

/// The recorder's handle and the process collector, made once per process.
struct Exporter {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Installs the Prometheus recorder for this process (once), describes every metric and
/// creates its series at zero.
///
/// When another recorder is already installed (Herald embedded in an application that has its
/// own), Herald's metrics go to that one and `/metrics` renders an empty page.
pub fn install() -> &'static PrometheusHandle {
    &exporter().handle
}

fn exporter() -> &'static Exporter {
    EXPORTER.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if let Err(error) = metrics::set_global_recorder(recorder) {
            tracing::warn!(%error, "another metrics recorder is installed; /metrics stays empty");
        }
        CATALOGUE.iter().for_each(register);
        let process = metrics_process::Collector::default();
        process.describe();
        process.collect();
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("herald-metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the metrics upkeep thread");
        }
        Exporter { handle, process }
    })
}

/// Describes one metric and creates its series: counters and gauges at 0, histograms empty.
fn register(metric: &Metric) {
    let help = metric.help;
    match (metric.kind, metric.unit) {
        (Kind::Counter, Some(unit)) => metrics::describe_counter!(metric.name, unit, help),
        (Kind::Counter, None) => metrics::describe_counter!(metric.name, help),
        (Kind::Gauge, Some(unit)) => metrics::describe_gauge!(metric.name, unit, help),
        (Kind::Gauge, None) => metrics::describe_gauge!(metric.name, help),
        (Kind::Histogram, Some(unit)) => metrics::describe_histogram!(metric.name, unit, help),
        (Kind::Histogram, None) => metrics::describe_histogram!(metric.name, help),
    }
    let unlabelled: &[&[(&str, &str)]] = &[&[]];
    let series = if metric.series.is_empty() {
        unlabelled
    } else {
        metric.series
    };
    for labels in series {
        let labels: Vec<Label> = labels
            .iter()
            .map(|&(key, value)| Label::new(key, value))
            .collect();
        // Adding zero creates the series without disturbing a value recorded already.
        match metric.kind {
            Kind::Counter => metrics::counter!(metric.name, labels).increment(0),
            Kind::Gauge => metrics::gauge!(metric.name, labels).increment(0.0),
            Kind::Histogram => drop(metrics::histogram!(metric.name, labels)),
        }
    }
}

/// The metrics text in the Prometheus exposition format, with fresh `process_*` figures.
pub fn render() -> String {
    let exporter = exporter();
    exporter.process.collect();
    exporter.handle.render()
}

/// Handles for the metrics recorded once per written batch or per message, looked up once per
/// process rather than at each record (a registry lookup costs about as much as queueing a
/// frame).
pub struct HotPath {
    pub delivery_latency: Histogram,
    pub text_out: Counter,
    pub binary_out: Counter,
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
    pub messages_queued: Counter,
    pub messages_stored: Counter,
    pub accepted_direct: Counter,
    pub accepted_room: Counter,
    /// `herald_engine_operation_seconds` of the two engine calls every message makes.
    pub broker_publish: Histogram,
    pub presence_online: Histogram,
    pub deflate_compressions: Counter,
    /// `herald_messages_in_total` of the two requests that carry messages.
    pub send_in: Counter,
    pub publish_in: Counter,
}

/// Counts one request by its type in `herald_messages_in_total`: from a kept handle for the
/// requests every message makes, from the registry for the rest.
pub fn count_request(kind: &'static str) {
    match kind {
        "send" => HOT.send_in.increment(1),
        "publish" => HOT.publish_in.increment(1),
        _ => metrics::counter!("herald_messages_in_total", "type" => kind).increment(1),
    }
}

/// The `herald_engine_operation_seconds` histogram of one engine call.
pub fn engine_operation(engine: &'static str, operation: &'static str) -> Histogram {
    metrics::histogram!(
        "herald_engine_operation_seconds",
        "engine" => engine,
        "operation" => operation
    )
}

/// A gauge handle for a long-lived task to keep: the recorder is installed first, since a handle
/// taken before it exists would stay a no-op.
pub fn gauge(name: &'static str) -> metrics::Gauge {
    install();
    metrics::gauge!(name)
}

/// The hot-path handles, created after the recorder is installed so they are never no-ops.
pub static HOT: LazyLock<HotPath> = LazyLock::new(|| {
    install();
    HotPath {
        delivery_latency: metrics::histogram!("herald_delivery_latency_seconds"),
        text_out: metrics::counter!("herald_messages_out_total", "type" => "text"),
        binary_out: metrics::counter!("herald_messages_out_total", "type" => "binary"),
        sent_bytes: metrics::counter!("herald_sent_bytes_total"),
        received_bytes: metrics::counter!("herald_received_bytes_total"),
        messages_queued: metrics::counter!("herald_messages_queued_total"),
        messages_stored: metrics::counter!("herald_messages_stored_total"),
        accepted_direct: metrics::counter!("herald_messages_accepted_total", "kind" => "direct"),
        accepted_room: metrics::counter!("herald_messages_accepted_total", "kind" => "room"),
        broker_publish: engine_operation("broker", "publish"),
        presence_online: engine_operation("presence", "online"),
        deflate_compressions: metrics::counter!("herald_deflate_compressions_total"),
        send_in: metrics::counter!("herald_messages_in_total", "type" => "send"),
        publish_in: metrics::counter!("herald_messages_in_total", "type" => "publish"),
    }
});
