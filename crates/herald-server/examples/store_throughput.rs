//! Persisted messages per second: how fast the SQLite store (and the node on top of it)
//! accepts messages when every one is acknowledged only after its commit.
//!
//! ```text
//! cargo run --release -p herald-server --example store_throughput -- \
//!     --kind direct --via node --messages 200000 --senders 1000 --synchronous full
//! ```
//!
//! `--via store` drives the `Store` trait directly (each sender keeps `--in-flight` appends
//! queued); `--via node` calls `Node::send_direct` / `Node::publish` from `--senders` tasks,
//! each awaiting its ack like a client would, so it adds encoding and fan-out. The data folder
//! is a fresh temporary one unless `--path` names one. `--redis URL` drives the Redis store
//! instead (with `--via store`), under a fresh key prefix. `--ids on` gives every message an
//! idempotency key, as a client's request with an `id` has (the Redis store records it).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use herald_protocol::Payload;
use herald_server::config::{Config, RedisConfig, Synchronous};
use herald_server::engine::broker::Broker;
use herald_server::engine::memory::{MemoryBroker, MemoryPresence};
use herald_server::engine::redis::store::RedisStore;
use herald_server::engine::sqlite::SqliteStore;
use herald_server::engine::store::{Append, IdempotencyKey, NewMessage, Store, StoreLimits};
use herald_server::node::Node;
use serde_json::value::RawValue;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    Room,
}

struct Args {
    kind: Kind,
    via_node: bool,
    messages: usize,
    senders: usize,
    in_flight: usize,
    synchronous: Synchronous,
    path: Option<PathBuf>,
    redis: Option<String>,
    ids: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        kind: Kind::Direct,
        via_node: true,
        messages: 200_000,
        senders: 1000,
        in_flight: 64,
        synchronous: Synchronous::Full,
        path: None,
        redis: None,
        ids: false,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let value = words
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--kind" => {
                args.kind = match value.as_str() {
                    "direct" => Kind::Direct,
                    "room" => Kind::Room,
                    other => panic!("--kind is direct or room, not {other}"),
                }
            }
            "--via" => args.via_node = value == "node",
            "--messages" => args.messages = value.parse().expect("--messages is a number"),
            "--senders" => args.senders = value.parse().expect("--senders is a number"),
            "--in-flight" => args.in_flight = value.parse().expect("--in-flight is a number"),
            "--synchronous" => {
                args.synchronous = match value.as_str() {
                    "full" => Synchronous::Full,
                    "normal" => Synchronous::Normal,
                    other => panic!("--synchronous is full or normal, not {other}"),
                }
            }
            "--path" => args.path = Some(PathBuf::from(value)),
            "--redis" => args.redis = Some(value),
            "--ids" => args.ids = value == "on",
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

/// Users and rooms the messages spread over; each user writes to a few friends.
const USERS: usize = 1000;
const ROOMS: usize = 100;
const FRIENDS: usize = 5;

fn friend(sender: usize, n: usize) -> String {
    format!("user{}", (sender + 1 + n % FRIENDS) % USERS)
}

/// CPU seconds (user + system) of this process, and of its store writer thread.
fn cpu_seconds() -> (f64, f64) {
    // Clock ticks are 100 per second on Linux.
    let ticks = |stat: &str| -> f64 {
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (field(11) + field(12)) / 100.0
    };
    let process = std::fs::read_to_string("/proc/self/stat").map_or(0.0, |s| ticks(&s));
    let mut writer = 0.0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() == "herald-store-wr" {
                writer =
                    std::fs::read_to_string(task.path().join("stat")).map_or(0.0, |s| ticks(&s));
            }
        }
    }
    (process, writer)
}

fn content(n: usize) -> Payload {
    Payload::Json(
        RawValue::from_string(format!(
            r#"{{"text":"message number {n} with a typical chat length","n":{n}}}"#
        ))
        .unwrap(),
    )
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    if let Some(url) = &args.redis {
        assert!(
            !args.via_node,
            "--redis measures the store: add --via store"
        );
        let config = RedisConfig {
            urls: vec![url.clone()],
            key_prefix: format!("bench-{}", uuid::Uuid::now_v7().simple()),
            ..RedisConfig::default()
        };
        let store = Arc::new(
            RedisStore::open(&config, StoreLimits::default())
                .await
                .unwrap(),
        );
        let started = Instant::now();
        run_store(&args, store.clone()).await;
        let seconds = started.elapsed().as_secs_f64();
        let (cpu, _) = cpu_seconds();
        println!(
            "redis: {:.0} persisted messages/s ({} in {seconds:.2} s), {:.1} µs of this process's cpu per message",
            args.messages as f64 / seconds,
            args.messages,
            cpu * 1e6 / args.messages as f64
        );
        store.close().await;
        return;
    }
    let temporary = tempfile::tempdir().unwrap();
    let folder = args
        .path
        .clone()
        .unwrap_or_else(|| temporary.path().to_owned());
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let store = Arc::new(
        SqliteStore::open(
            &folder,
            args.synchronous,
            StoreLimits::default(),
            broker.clone(),
        )
        .unwrap(),
    );
    let started = Instant::now();
    if args.via_node {
        run_node(&args, broker, store.clone()).await;
    } else {
        run_store(&args, store.clone()).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds();
    report(&args, &store, elapsed, cpu);
    store.close().await;
}

async fn run_store(args: &Args, store: Arc<dyn Store>) {
    let per_sender = args.messages / args.senders;
    let mut tasks = Vec::new();
    for sender in 0..args.senders {
        let store = store.clone();
        let (kind, in_flight, ids) = (args.kind, args.in_flight, args.ids);
        tasks.push(tokio::spawn(async move {
            let from: Arc<str> = format!("user{}", sender % USERS).into();
            let mut pending = std::collections::VecDeque::new();
            for n in 0..per_sender {
                let message = NewMessage {
                    id: uuid::Uuid::now_v7().to_string(),
                    from: from.clone(),
                    ts: 0,
                    content: content(n),
                    idempotency: ids.then(|| IdempotencyKey {
                        request: format!("r{n}"),
                        fingerprint: rand::random(),
                        window: Duration::from_secs(120),
                    }),
                };
                let append = match kind {
                    Kind::Direct => {
                        let to = vec![friend(sender, n)];
                        Append::Direct {
                            recipients: to.clone(),
                            to,
                            message,
                        }
                    }
                    Kind::Room => Append::Room {
                        room: format!("room{}", (sender + n) % ROOMS).into(),
                        message,
                    },
                };
                pending.push_back(store.append(append, None).await);
                if pending.len() >= in_flight {
                    pending.pop_front().unwrap().await.unwrap();
                }
            }
            for committed in pending {
                committed.await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

async fn run_node(args: &Args, broker: Arc<dyn Broker>, store: Arc<SqliteStore>) {
    let mut config = Config::default();
    config.auth.secret = Some("benchmark-secret-0123456789".into());
    let auth = herald_server::auth::Authenticator::from_config(&config.auth, None).unwrap();
    let node = Node::new(
        Arc::new(config),
        auth,
        broker,
        Arc::new(MemoryPresence::new()),
        store,
    );
    let per_sender = args.messages / args.senders;
    let mut tasks = Vec::new();
    for sender in 0..args.senders {
        let node = node.clone();
        let kind = args.kind;
        tasks.push(tokio::spawn(async move {
            let from: Arc<str> = format!("user{}", sender % USERS).into();
            for n in 0..per_sender {
                match kind {
                    Kind::Direct => {
                        let to = vec![friend(sender, n)];
                        node.send_direct(&from, None, to, content(n)).await.unwrap();
                    }
                    Kind::Room => {
                        let room: Arc<str> = format!("room{}", (sender + n) % ROOMS).into();
                        node.publish(&from, None, &room, content(n), true, true)
                            .await
                            .unwrap();
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

fn report(args: &Args, store: &SqliteStore, elapsed: Duration, (cpu, writer_cpu): (f64, f64)) {
    let stats = store.stats();
    let batches = stats.batches.load(Ordering::Relaxed).max(1);
    let appends = stats.appends.load(Ordering::Relaxed);
    let seconds = elapsed.as_secs_f64();
    let ms = |ns: &std::sync::atomic::AtomicU64| ns.load(Ordering::Relaxed) as f64 / 1e6;
    println!(
        "kind={} via={} synchronous={} messages={} senders={}",
        if args.kind == Kind::Direct {
            "direct"
        } else {
            "room"
        },
        if args.via_node { "node" } else { "store" },
        if args.synchronous == Synchronous::Full {
            "full"
        } else {
            "normal"
        },
        appends,
        args.senders
    );
    println!(
        "{:.0} persisted messages/s ({appends} in {seconds:.2} s)",
        appends as f64 / seconds
    );
    println!(
        "writer: {batches} commits, {:.0} messages per commit; statements {:.0} ms, commit {:.0} ms, hand-off {:.0} ms, WAL restarts {:.0} ms ({:.0}% of wall time busy)",
        appends as f64 / batches as f64,
        ms(&stats.statement_ns),
        ms(&stats.commit_ns),
        ms(&stats.handoff_ns),
        ms(&stats.wal_restart_ns),
        (ms(&stats.statement_ns)
            + ms(&stats.commit_ns)
            + ms(&stats.handoff_ns)
            + ms(&stats.wal_restart_ns))
            / 10.0
            / seconds
    );
    println!(
        "cpu: {:.1} µs per message in the whole process, {:.1} µs in the writer thread",
        cpu * 1e6 / appends.max(1) as f64,
        writer_cpu * 1e6 / appends.max(1) as f64
    );
    let db = store.path();
    let size = |path: &std::path::Path| std::fs::metadata(path).map_or(0, |m| m.len());
    println!(
        "database {} KiB, WAL {} KiB",
        size(db) / 1024,
        size(&db.with_extension("db-wal")) / 1024
    );
}
