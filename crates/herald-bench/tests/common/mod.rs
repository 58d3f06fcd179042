//! What the load tool's tests share: a real Herald server in this process, on an ephemeral port.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use herald_bench::adapter::ServerKind;
use herald_bench::scenario::Options;
use herald_server::config::Config;
use herald_server::{embedded_node, server};
use tokio::sync::oneshot;

pub const SECRET: &str = "bench-test-secret-0123456789";

/// A Herald server without the per-connection rate limit (the tool publishes faster than a
/// chat user), stopped when dropped.
pub struct Herald {
    pub addr: SocketAddr,
    /// Every address the server listens on (`addr` first).
    pub addrs: Vec<SocketAddr>,
    _stop: Vec<oneshot::Sender<()>>,
    /// Each server keeps its store in a folder of its own.
    _data: tempfile::TempDir,
}

pub async fn start_herald() -> Herald {
    start_herald_listening(1).await
}

/// One Herald node accepting on `listeners` addresses: to a load tool given all of them, the
/// addresses of one service, as nodes sharing an engine would be.
pub async fn start_herald_listening(listeners: usize) -> Herald {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.auth.secret = Some(SECRET.to_owned());
    config.limits.messages_per_second = 1_000_000;
    config.limits.burst = 1_000_000;
    let data = tempfile::tempdir().unwrap();
    config.store.path = data.path().to_owned();
    let node = embedded_node(config.clone(), None).unwrap();
    let mut addrs = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..listeners {
        let listener = server::bind(config.server.listen).unwrap();
        addrs.push(listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        tokio::spawn(server::run(listener, node.clone(), async move {
            let _ = stopped.await;
        }));
    }
    Herald {
        addr: addrs[0],
        addrs,
        _stop: stops,
        _data: data,
    }
}

/// An address where nothing listens: connecting to it is refused at once.
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

pub fn options(addr: SocketAddr) -> Options {
    let mut options = Options::new(ServerKind::Herald, addr, SECRET);
    options.server_pids = vec![std::process::id()];
    options.warmup = Duration::from_millis(200);
    options.duration = Duration::from_millis(500);
    // Correctness, not speed, is under test here: a loaded CI machine must not fail it.
    options.latency_limit = Duration::from_secs(30);
    // A half-second window holds ten messages at the lowest rate, so one landing just past the
    // window's end reads as an unsustained step; every step must run for its messages to count.
    options.stop_at_failure = false;
    options
}
