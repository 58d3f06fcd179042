//! Prometheus metrics: the process-wide recorder behind `/metrics`, the description of every
//! metric Herald emits, and cached handles for the per-delivery hot path.
//!
//! Code anywhere records with the `metrics` crate's macros (`metrics::counter!(…)`); this module
//! installs the one recorder those macros feed. A process has one global recorder, while tests
//! run several servers in one process, so [`install`] runs once per process (a `OnceLock`) and
//! every server renders the same registry.
//!
//! Histograms buffer raw samples until they are folded into buckets, so a thread runs the
//! recorder's upkeep every [`UPKEEP_INTERVAL`]: memory stays bounded even if nobody scrapes.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// How often buffered histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Upper bounds of the latency buckets, in seconds: 50 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder for this process (once) and returns its handle.
///
/// When another recorder is already installed (Herald embedded in an application that has its
/// own), Herald's metrics go to that one and `/metrics` renders an empty page.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if let Err(error) = metrics::set_global_recorder(recorder) {
            tracing::warn!(%error, "another metrics recorder is installed; /metrics stays empty");
        }
        describe();
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
        handle
    })
}

/// The metrics text in the Prometheus exposition format.
pub fn render() -> String {
    install().render()
}

/// Handles for the metrics recorded once per written batch, looked up once per process rather
/// than once per batch (a registry lookup costs about as much as queueing a frame).
pub struct HotPath {
    pub delivery_latency: Histogram,
    pub text_out: Counter,
    pub binary_out: Counter,
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
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
    }
});

/// `# HELP` text for every metric Herald emits; also the catalogue in
/// `docs/api.md#metrics`.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};

    describe_gauge!(
        "herald_connections",
        "Open WebSocket connections on this node."
    );
    describe_gauge!(
        "herald_pending_auth_connections",
        "Connections accepted without a token, waiting for their auth message."
    );
    describe_counter!(
        "herald_connects_total",
        "WebSocket connections accepted (registered with the node)."
    );
    describe_counter!(
        "herald_disconnects_total",
        "WebSocket connections ended, by reason (the close reason, or \"peer closed\")."
    );
    describe_counter!(
        "herald_handshakes_refused_total",
        "WebSocket handshakes refused before the upgrade, by reason."
    );
    describe_counter!(
        "herald_messages_in_total",
        "Frames received from clients, by request type (\"invalid\" when unparseable)."
    );
    describe_counter!(
        "herald_messages_out_total",
        "Frames written to client sockets, by frame type (text or binary)."
    );
    describe_counter!(
        "herald_received_bytes_total",
        Unit::Bytes,
        "Payload bytes of data frames received from clients."
    );
    describe_counter!(
        "herald_sent_bytes_total",
        Unit::Bytes,
        "Payload bytes of data frames written to client sockets."
    );
    describe_counter!(
        "herald_messages_accepted_total",
        "Messages accepted for delivery, by kind (room, direct, broadcast)."
    );
    describe_counter!(
        "herald_messages_queued_total",
        "Copies of messages queued on local connections' outboxes."
    );
    describe_histogram!(
        "herald_delivery_latency_seconds",
        Unit::Seconds,
        "Time from a message reaching this node's hub (with the in-memory broker: from its \
         acceptance) to its frame being flushed to the socket."
    );
    describe_counter!(
        "herald_slow_consumers_total",
        "Connections cut off because their bounded outbox was full."
    );
    describe_counter!(
        "herald_rate_limited_total",
        "Client frames dropped by the per-connection rate limit."
    );
    describe_counter!(
        "herald_request_errors_total",
        "Error frames sent to clients, by error code."
    );
    describe_histogram!(
        "herald_engine_operation_seconds",
        Unit::Seconds,
        "Latency of engine calls, by engine (broker, presence) and operation."
    );
    describe_counter!(
        "herald_api_requests_total",
        "Server API requests, by endpoint and status code."
    );
    describe_gauge!(
        "herald_runtime_alive_tasks",
        "Tasks alive on the server's tokio runtime, read when /metrics is scraped."
    );
    describe_gauge!(
        "herald_fanout_queue_depth",
        "Committed messages waiting for the fan-out task, read each time it takes one."
    );
    describe_gauge!(
        "herald_store_writer_queue_depth",
        "Commands waiting for the SQLite writer thread, read each time it takes a batch."
    );
    describe_counter!(
        "herald_tls_reloads_total",
        "Certificate reloads, by result (ok, error)."
    );
}
