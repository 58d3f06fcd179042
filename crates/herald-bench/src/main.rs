//! The `herald-bench` command line: parse, run a scenario (or fold results), print.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use herald_bench::adapter::ServerKind;
use herald_bench::compare::{self, Reference};
use herald_bench::scenario::join_storm::JoinStormParams;
use herald_bench::scenario::soak::SoakParams;
use herald_bench::scenario::{self, Options, Scenario, Target};
use herald_bench::spawned::SpawnedServer;
use herald_bench::{chart, procfs};

/// Load tool for Herald and its peers: fan-out, rooms, direct messages, handshakes, idle memory.
///
/// Each scenario prints a table (one line per offered rate) and, with --json or --output, the
/// same results as JSON. `compare` and `chart` read a folder of such JSON files.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One room of N subscribers, one publisher at each offered rate (messages/s).
    Fanout {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Publisher messages per second, one measurement step each.
        #[arg(long, value_delimiter = ',', default_value = "100")]
        rates: Vec<f64>,
        #[command(flatten)]
        common: Common,
    },
    /// N connections in rooms of --room-size; every connection publishes to its room.
    Rooms {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        room_size: usize,
        /// Total messages per second over all connections, one step each.
        #[arg(long, value_delimiter = ',', default_value = "1000")]
        rates: Vec<f64>,
        #[command(flatten)]
        common: Common,
    },
    /// N connections in pairs, each sending direct messages to its partner.
    Direct {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Total messages per second over all connections, one step each.
        #[arg(long, value_delimiter = ',', default_value = "1000")]
        rates: Vec<f64>,
        #[command(flatten)]
        common: Common,
    },
    /// Handshakes per second: open, authenticate (JWT), close, with --concurrency at once.
    Connect {
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[command(flatten)]
        common: Common,
    },
    /// N idle authenticated connections; server RSS per connection (needs --server-pid).
    Idle {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Wait after the last connection before reading memory.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        settle: Duration,
        #[command(flatten)]
        common: Common,
    },
    /// Churn and mixed traffic for --length; fails if server memory, open files, tasks or
    /// queues keep growing (rule in docs/benchmarks.md#soak). Herald only.
    Soak {
        /// Connections at once, one user each.
        #[arg(long, default_value_t = 200)]
        users: usize,
        /// Of those, connections that stay for the whole run (the others churn).
        #[arg(long, default_value_t = 50)]
        residents: usize,
        #[arg(long, default_value_t = 20)]
        rooms: usize,
        /// Messages per second per connection.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Mean session length of a churning connection.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        session: Duration,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        length: Duration,
        /// How often the server's resources are read.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        sample_every: Duration,
        /// Start this herald binary on a free port (and watch its pid) instead of using
        /// --target.
        #[arg(long, value_name = "PATH")]
        spawn_server: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// N connections join one room as fast as the server lets them: time until every join is
    /// acknowledged and (Herald) every member was told the full count, server CPU and RSS.
    JoinStorm {
        #[arg(long, default_value_t = 10_000)]
        subscribers: usize,
        /// Each connection joins as soon as it is ready, the clock starting at the first connect
        /// (default: connect everyone first, then all join at once).
        #[arg(long)]
        pipelined: bool,
        /// Longest the storm may take; members not in by then are reported missing.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        deadline: Duration,
        /// This process's members are users storm-K… (a room split over several processes).
        #[arg(long, default_value_t = 0, value_name = "K")]
        first_member: usize,
        /// The count that means the room is full, every process's members together
        /// (default: --subscribers).
        #[arg(long, value_name = "N")]
        room_members: Option<usize>,
        /// Once every connection is ready, print "join-storm: ready for SIGUSR1" on stderr and
        /// send the joins when SIGUSR1 comes (several processes starting one storm together).
        #[arg(long)]
        go_on_signal: bool,
        #[command(flatten)]
        common: Common,
    },
    /// One table with Herald/peer ratios from a folder of JSON results (median of runs).
    Compare {
        dir: PathBuf,
        /// The fan-out rate (publisher messages/s) whose step gives CPU per delivery and p99.
        #[arg(long, default_value_t = 100.0)]
        reference_rate: f64,
    },
    /// SVG chart of fan-out latency against offered load, from a folder of JSON results.
    Chart {
        dir: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
        #[arg(long, default_value = "Fan-out latency against offered load")]
        title: String,
        /// The p99 target drawn on the chart, ms.
        #[arg(long, default_value_t = 50.0)]
        limit_ms: f64,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Which protocol the server speaks.
    #[arg(long, value_enum, default_value = "herald")]
    server: ServerKind,
    /// Server address, host:port (a remote machine works too). Several, comma-separated, for
    /// nodes serving as one: connections are spread over them round-robin, a single publisher
    /// uses the first.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8080")]
    target: Vec<String>,
    /// HS256 secret the server verifies tokens with.
    #[arg(long, env = "HERALD_AUTH_SECRET", hide_env_values = true)]
    secret: String,
    /// The server's pid, for its CPU time and RSS from /proc (same machine only). Several,
    /// comma-separated (nodes, Redis): CPU time and RSS are summed over them.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Do not bind connections to distinct 127.x.y.z source addresses.
    #[arg(long)]
    no_spread: bool,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 256)]
    setup_concurrency: usize,
    /// Traffic before each measurement window.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Length of each measurement window.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Longest wait after a step for deliveries still in flight.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// A step whose p99 is above this is not sustained.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    latency_limit: Duration,
    /// Run every rate even after a step was not sustained.
    #[arg(long)]
    keep_going: bool,
    /// Bytes of padding in each message.
    #[arg(long, default_value_t = 0)]
    padding: usize,
    /// Print the results as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON results to this file.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long, short)]
    quiet: bool,
}

impl Common {
    fn options(&self) -> anyhow::Result<Options> {
        let targets = self
            .target
            .iter()
            .map(|target| {
                let addr: SocketAddr = target
                    .to_socket_addrs()
                    .with_context(|| format!("--target {target}"))?
                    .next()
                    .with_context(|| format!("--target {target} resolves to no address"))?;
                Ok(Target {
                    addr,
                    host: target.clone(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let first = targets.first().context("--target names no address")?.addr;
        let mut options = Options::new(self.server, first, self.secret.clone());
        options.targets = targets;
        options.server_pids = self.server_pid.clone();
        options.spread_sources = !self.no_spread;
        options.setup_concurrency = self.setup_concurrency;
        options.warmup = self.warmup;
        options.duration = self.duration;
        options.drain = self.drain;
        options.latency_limit = self.latency_limit;
        options.stop_at_failure = !self.keep_going;
        options.padding = self.padding;
        options.progress = !self.quiet;
        Ok(options)
    }
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("herald-bench: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut spawned = None;
    let (scenario, common) = match cli.command {
        Command::Compare {
            dir,
            reference_rate,
        } => {
            let reports = compare::load_reports(&dir)?;
            anyhow::ensure!(!reports.is_empty(), "no JSON results in {}", dir.display());
            print!(
                "{}",
                compare::table(
                    &reports,
                    &Reference {
                        fanout_rate: reference_rate
                    }
                )
            );
            return Ok(());
        }
        Command::Chart {
            dir,
            output,
            title,
            limit_ms,
        } => {
            let reports = compare::load_reports(&dir)?;
            let series = chart::fanout_series(&reports);
            anyhow::ensure!(!series.is_empty(), "no fanout results in {}", dir.display());
            std::fs::write(&output, chart::svg(&series, limit_ms, &title))
                .with_context(|| format!("cannot write {}", output.display()))?;
            return Ok(());
        }
        Command::Fanout {
            subscribers,
            rates,
            common,
        } => (Scenario::Fanout { subscribers, rates }, common),
        Command::Rooms {
            connections,
            room_size,
            rates,
            common,
        } => (
            Scenario::Rooms {
                connections,
                room_size,
                rates,
            },
            common,
        ),
        Command::Direct {
            connections,
            rates,
            common,
        } => (Scenario::Direct { connections, rates }, common),
        Command::Connect {
            concurrency,
            common,
        } => (Scenario::Connect { concurrency }, common),
        Command::Idle {
            connections,
            settle,
            common,
        } => (
            Scenario::Idle {
                connections,
                settle,
            },
            common,
        ),
        Command::JoinStorm {
            subscribers,
            pipelined,
            deadline,
            first_member,
            room_members,
            go_on_signal,
            common,
        } => (
            Scenario::JoinStorm(JoinStormParams {
                subscribers,
                pipelined,
                deadline,
                first_member,
                room_members,
                go_on_signal,
            }),
            common,
        ),
        Command::Soak {
            users,
            residents,
            rooms,
            rate,
            session,
            length,
            sample_every,
            spawn_server,
            mut common,
        } => {
            if let Some(binary) = spawn_server {
                let server = SpawnedServer::start(&binary, &common.secret)?;
                common.target = vec![server.addr().to_string()];
                common.server_pid = vec![server.pid()];
                spawned = Some(server);
            }
            (
                Scenario::Soak(SoakParams {
                    users,
                    residents,
                    rooms,
                    rate,
                    session,
                    length,
                    sample_every,
                }),
                common,
            )
        }
    };
    let options = common.options()?;
    // One runtime with a worker per CPU the tool may use (`taskset` narrows it).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(procfs::usable_cpus())
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(scenario::run(options, scenario))?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &common.output {
        std::fs::write(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if common.json {
        println!("{json}");
    } else {
        print!("{}", report.table());
    }
    drop(spawned);
    if let Some(soak) = &report.soak {
        anyhow::ensure!(
            soak.bounded,
            "a server resource kept growing in the second half of the soak"
        );
    }
    Ok(())
}
