//! A real `redis-server` on a free port, started by a test and stopped when dropped. Tests that
//! need one call [`RedisServer::start`], which returns `None` after a loud notice when the
//! binary is absent, unless `HERALD_REQUIRE_REDIS=1` (CI sets it): then a missing binary fails.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use herald_server::config::{Config, EngineBackend};

use super::{EVENT_TIMEOUT, TestServer, free_port};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// The data folder (AOF, dumps); kept across [`restart`](Self::restart).
    pub dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a standalone Redis with `extra` arguments (e.g. `["--appendonly", "yes"]`).
    pub async fn start_with(extra: &[&str]) -> Option<RedisServer> {
        redis_binary()?;
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|arg| arg.to_string()).collect(),
        };
        server.spawn().await;
        Some(server)
    }

    pub async fn start() -> Option<RedisServer> {
        Self::start_with(&[]).await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let mut child = Command::new(redis_binary().unwrap())
            .arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--protected-mode",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("Ready to accept connections") {
                    return;
                }
            }
            panic!("redis-server exited before it was ready");
        };
        tokio::time::timeout(Duration::from_secs(20), ready)
            .await
            .expect("redis-server ready within 20 s");
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    /// Kills the server at once (SIGKILL): what a crash looks like to its clients.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Starts it again on the same port and data folder (after [`kill`](Self::kill)).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

fn redis_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        if std::env::var("HERALD_REQUIRE_REDIS").as_deref() == Ok("1") {
            panic!("redis-server is not installed and HERALD_REQUIRE_REDIS=1");
        }
        eprintln!(
            "\n\n*** NOTICE: redis-server is not installed: this Redis test is SKIPPED \
             (apt-get install redis-server) ***\n\n"
        );
    }
    found
}

impl RedisServer {
    /// A `[redis]` section for this server with a key prefix of its own, so deployments
    /// started by one test never see each other's keys.
    pub fn config(&self) -> herald_server::config::RedisConfig {
        herald_server::config::RedisConfig {
            urls: vec![self.url()],
            key_prefix: format!("t{:08x}", rand::random::<u32>()),
            ..Default::default()
        }
    }

    /// A plain client connection, for a test to look at or write raw keys and channels.
    pub async fn client(&self) -> ::redis::aio::MultiplexedConnection {
        ::redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

/// A Redis Cluster of `masters` masters and no replicas, from `redis-server --cluster-enabled
/// yes` processes joined by `redis-cli --cluster create`; stopped when dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start(masters: usize) -> Option<RedisCluster> {
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            let bus_port = free_port().to_string();
            let node = RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                &bus_port,
                "--appendonly",
                "no",
            ])
            .await?;
            nodes.push(node);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .await
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes };
        cluster.wait_until_ok().await;
        Some(cluster)
    }

    /// Every node agrees the cluster serves all slots. No event announces it, so this polls
    /// `CLUSTER INFO`.
    async fn wait_until_ok(&self) {
        let all_ok = async {
            for node in &self.nodes {
                let mut client = node.client().await;
                loop {
                    let info: String = ::redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut client)
                        .await
                        .unwrap();
                    if info.contains("cluster_state:ok") {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all_ok)
            .await
            .expect("the cluster is ok within 30 s");
    }

    /// A `[redis]` section for this cluster (every node a seed) with a key prefix of its own.
    pub fn config(&self) -> herald_server::config::RedisConfig {
        herald_server::config::RedisConfig {
            urls: self.nodes.iter().map(RedisServer::url).collect(),
            cluster: true,
            ..self.nodes[0].config()
        }
    }
}

/// Starts `count` nodes sharing `redis`, each named `node{n}`.
pub async fn nodes(redis: &RedisServer, count: usize) -> Vec<TestServer> {
    nodes_with(redis, count, |_| {}).await
}

/// Starts `count` nodes sharing `redis` like [`nodes`], each config adjusted by `adjust` last.
pub async fn nodes_with(
    redis: &RedisServer,
    count: usize,
    adjust: impl Fn(&mut Config),
) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for n in 0..count {
        nodes.push(
            TestServer::start_with(|c| {
                on_redis(c, redis, n);
                adjust(c);
            })
            .await,
        );
    }
    nodes
}

/// Node `n` of a deployment on `redis`: short presence ttl and timeouts, so faults show fast.
pub fn on_redis(config: &mut Config, redis: &RedisServer, n: usize) {
    config.engine.backend = EngineBackend::Redis;
    config.redis.urls = vec![redis.url()];
    config.redis.presence_ttl = Duration::from_secs(3);
    config.redis.response_timeout = Duration::from_secs(2);
    config.redis.connect_timeout = Duration::from_secs(2);
    config.server.node_id = format!("node{n}");
}

/// Polls `/ready` until it answers `status` (the node notices Redis within its timeouts; no
/// event announces it).
pub async fn wait_for_ready(node: &TestServer, status: u16) {
    tokio::time::timeout(EVENT_TIMEOUT * 2, async {
        loop {
            if node.http("GET", "/ready", None, None).await.status == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("/ready never answered {status}"));
}
