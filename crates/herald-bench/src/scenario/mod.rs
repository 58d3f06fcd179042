//! The scenarios. Each one opens its connections, measures, closes them, and returns a
//! [`RunReport`].
//!
//! - `fanout`: one room, N subscribers, one publisher at each offered rate.
//! - `rooms`: N connections in rooms of `room_size`, every connection publishing to its room.
//! - `direct`: N connections in pairs, each sending direct messages to its partner.
//! - `connect`: open, authenticate (JWT) and close connections as fast as `concurrency` allows.
//! - `idle`: N authenticated connections doing nothing; server RSS per connection.
//! - `soak`: a long run of churn and mixed traffic; fails when a server resource keeps growing.
//! - `join-storm`: N connections join one room at once; time until the room has formed for all.

mod connect;
mod idle;
pub mod join_storm;
mod progress;
mod setup;
pub mod soak;
mod traffic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::adapter::ServerKind;
use crate::client::{Endpoint, Env};
use crate::net::{self, SourceAddrs};
use crate::procfs::{self, Proc, Procs};
use crate::recorder::Recorder;
use crate::report::{Errors, Machine, RunReport};
use crate::tokens::TokenMinter;

pub use progress::Progress;

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub enum Scenario {
    Fanout {
        subscribers: usize,
        rates: Vec<f64>,
    },
    Rooms {
        connections: usize,
        room_size: usize,
        rates: Vec<f64>,
    },
    Direct {
        connections: usize,
        rates: Vec<f64>,
    },
    Connect {
        concurrency: usize,
    },
    Idle {
        connections: usize,
        settle: Duration,
    },
    Soak(soak::SoakParams),
    JoinStorm(join_storm::JoinStormParams),
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Fanout { .. } => "fanout",
            Scenario::Rooms { .. } => "rooms",
            Scenario::Direct { .. } => "direct",
            Scenario::Connect { .. } => "connect",
            Scenario::Idle { .. } => "idle",
            Scenario::Soak(_) => "soak",
            Scenario::JoinStorm(_) => "join-storm",
        }
    }
}

/// One address of the server (a node, when several serve as one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` for the WebSocket URL.
    pub host: String,
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Target {
            addr,
            host: addr.to_string(),
        }
    }
}

/// How to reach the server and how long to measure.
#[derive(Debug, Clone)]
pub struct Options {
    pub server: ServerKind,
    /// Where connections go, round-robin by connection (at least one). A scenario's single
    /// publisher goes to the first.
    pub targets: Vec<Target>,
    /// HS256 secret the server verifies tokens with.
    pub secret: String,
    /// The server's processes, for CPU time and RSS from `/proc` (same machine only), summed.
    pub server_pids: Vec<u32>,
    /// Bind each connection to its own 127.x.y.z (loopback targets only).
    pub spread_sources: bool,
    /// Connections being opened at once during setup.
    pub setup_concurrency: usize,
    /// Longest wait for one setup step of one connection.
    pub step_timeout: Duration,
    /// Traffic before each measurement window.
    pub warmup: Duration,
    /// Length of each measurement window.
    pub duration: Duration,
    /// Longest wait after a step for the deliveries still on their way.
    pub drain: Duration,
    /// p99 above this makes a step unsustained.
    pub latency_limit: Duration,
    /// Stop a rate sweep at the first unsustained step.
    pub stop_at_failure: bool,
    /// Bytes of padding in each message's content.
    pub padding: usize,
    /// Print a progress line on stderr.
    pub progress: bool,
}

impl Options {
    /// Defaults for a server at `target`, signed with `secret`.
    pub fn new(server: ServerKind, target: SocketAddr, secret: impl Into<String>) -> Self {
        Options {
            server,
            targets: vec![target.into()],
            secret: secret.into(),
            server_pids: Vec::new(),
            spread_sources: true,
            setup_concurrency: 256,
            step_timeout: Duration::from_secs(15),
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(5),
            drain: Duration::from_secs(5),
            latency_limit: Duration::from_millis(50),
            stop_at_failure: true,
            padding: 0,
            progress: false,
        }
    }
}

/// Why a run could not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("connection {index} could not be set up")]
    Setup {
        index: usize,
        #[source]
        error: crate::client::ClientError,
    },
    #[error("cannot mint a token")]
    Token(#[from] jsonwebtoken::errors::Error),
    #[error("cannot read the server process")]
    Proc(#[from] procfs::ProcError),
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// State shared by every scenario's code.
pub(crate) struct Run {
    pub options: Options,
    pub env: Arc<Env>,
    pub recorder: Arc<Recorder>,
    pub tokens: TokenMinter,
    pub server: Option<Procs>,
    pub progress: Progress,
}

impl Run {
    fn new(options: Options) -> Self {
        let recorder = Arc::new(Recorder::new());
        let env = Arc::new(Env {
            protocol: options.server.protocol(),
            endpoints: options
                .targets
                .iter()
                .map(|target| Endpoint {
                    addr: target.addr,
                    host: target.host.clone(),
                    sources: SourceAddrs::for_target(target.addr, options.spread_sources),
                })
                .collect(),
            recorder: recorder.clone(),
            step_timeout: options.step_timeout,
        });
        Run {
            tokens: TokenMinter::new(&options.secret, Duration::from_secs(24 * 3600)),
            server: Procs::new(options.server_pids.iter().copied().map(Proc::Pid).collect()),
            progress: Progress::start(options.progress, recorder.clone()),
            options,
            env,
            recorder,
        }
    }

    pub fn server_rss_kib(&self) -> Option<u64> {
        self.server
            .as_ref()
            .and_then(|server| server.rss_bytes().ok())
            .map(|bytes| bytes / 1024)
    }

    pub fn errors(&self, failed_connections: usize) -> Errors {
        Errors {
            refused: self.recorder.refused_count(),
            lost_connections: self.recorder.lost_connections(),
            failed_connections,
            first: self.recorder.refusal_texts(),
        }
    }
}

/// Runs one scenario against the server and reports what it measured.
pub async fn run(options: Options, scenario: Scenario) -> Result<RunReport, RunError> {
    // Without the raise, a run stops near 1,024 connections with "too many open files".
    let _ = net::raise_open_file_limit();
    if options.targets.is_empty() {
        return Err(RunError::Invalid("no target to connect to".into()));
    }
    let run = Run::new(options);
    let server_command = match &run.server {
        Some(server) => Some(server.command()?),
        None => None,
    };
    let machine = Machine {
        tool_cpus: procfs::usable_cpus(),
        load_average_before: procfs::load_average(),
        load_average_after: None,
        server_pid: run.options.server_pids.first().copied(),
        server_pids: run.options.server_pids.clone(),
        server_command,
    };
    let params = serde_json::json!({
        "scenario": format!("{scenario:?}"),
        "warmup_s": run.options.warmup.as_secs_f64(),
        "duration_s": run.options.duration.as_secs_f64(),
        "latency_limit_ms": run.options.latency_limit.as_secs_f64() * 1000.0,
        "padding": run.options.padding,
        "target": run
            .options
            .targets
            .iter()
            .map(|target| target.addr.to_string())
            .collect::<Vec<_>>()
            .join(","),
    });
    let mut report = match &scenario {
        Scenario::Fanout { .. } | Scenario::Rooms { .. } | Scenario::Direct { .. } => {
            traffic::run(&run, &scenario).await?
        }
        Scenario::Connect { concurrency } => connect::run(&run, *concurrency).await?,
        Scenario::Idle {
            connections,
            settle,
        } => idle::run(&run, *connections, *settle).await?,
        Scenario::Soak(params) => soak::run(&run, params).await?,
        Scenario::JoinStorm(params) => join_storm::run(&run, params).await?,
    };
    run.progress.finish();
    report.server = run.options.server.name().to_owned();
    report.scenario = scenario.name().to_owned();
    report.params = params;
    report.machine = Machine {
        load_average_after: procfs::load_average(),
        ..machine
    };
    Ok(report)
}

/// An empty report the scenarios fill in; `run` sets the common fields.
pub fn blank_report(connections: usize) -> RunReport {
    RunReport {
        server: String::new(),
        scenario: String::new(),
        connections,
        params: serde_json::Value::Null,
        machine: Machine {
            tool_cpus: 0,
            load_average_before: None,
            load_average_after: None,
            server_pid: None,
            server_pids: Vec::new(),
            server_command: None,
        },
        setup: Default::default(),
        steps: Vec::new(),
        idle: None,
        soak: None,
        join_storm: None,
        errors: Default::default(),
    }
}
