//! Several nodes on one real Redis through Redis faults: presence comes back whole after Redis
//! loses its data or reaps a node that was only stalled. Each test starts its own
//! `redis-server`.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use common::process::{herald, wait_for_log};
use common::redis::{RedisServer, nodes_with};
use common::{Client, SECRET, presence_on};
use herald_protocol::ServerEvent;
use serde_json::json;
use tokio::time::Instant;

/// The nodes' `redis.presence_ttl` (see `common::redis::on_redis`): heartbeats every third.
const PRESENCE_TTL: Duration = Duration::from_secs(3);

/// Reads `room`'s diffs until every user of `wanted` has been listed as joined; returns how
/// often each user was listed joined or left meanwhile.
async fn joined_until(
    client: &mut Client,
    room: &str,
    wanted: &[&str],
) -> (HashMap<String, usize>, Vec<String>) {
    let mut joined: HashMap<String, usize> = HashMap::new();
    let mut left = Vec::new();
    while !wanted.iter().all(|user| joined.contains_key(*user)) {
        let diff = client.next_diff(room).await;
        for user in diff.joined.unwrap_or_default() {
            *joined.entry(user).or_default() += 1;
        }
        left.extend(diff.left.unwrap_or_default());
    }
    (joined, left)
}

async fn members(client: &mut Client, room: &str) -> (Vec<String>, u64) {
    match client
        .request(json!({"type": "members", "room": room}))
        .await
    {
        ServerEvent::Members(members) => (members.users, members.count),
        other => panic!("expected members, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_loses_its_data_every_user_reappears_once_within_a_heartbeat() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes_with(&redis, 2, presence_on).await;
    // Bob joins first and watches; Alice has a connection on each node.
    let mut bob = nodes[1].connect("bob").await;
    bob.join("club").await;
    let mut alice = nodes[0].connect("alice").await;
    let mut carol = nodes[0].connect("carol").await;
    let mut alice_phone = nodes[1].connect("alice").await;
    for client in [&mut alice, &mut carol, &mut alice_phone] {
        client.join("club").await;
    }
    // Each of the three entered once: once all are listed, no diff of the joins is left.
    joined_until(&mut bob, "club", &["alice", "bob", "carol"]).await;

    let mut raw = redis.client().await;
    let flushed = Instant::now();
    redis::cmd("FLUSHALL")
        .exec_async(&mut raw)
        .await
        .expect("FLUSHALL");
    let (joined, left) = joined_until(&mut bob, "club", &["alice", "bob", "carol"]).await;
    let took = flushed.elapsed();
    assert!(
        took < PRESENCE_TTL,
        "re-asserted within about a heartbeat ({:?}), took {took:?}",
        PRESENCE_TTL / 3
    );
    let once: HashMap<String, usize> = ["alice", "bob", "carol"]
        .into_iter()
        .map(|user| (user.to_owned(), 1))
        .collect();
    assert_eq!(
        joined, once,
        "Alice re-asserted by both nodes is announced once"
    );
    assert_eq!(left, Vec::<String>::new());

    assert_eq!(
        members(&mut carol, "club").await,
        (vec!["alice".into(), "bob".into(), "carol".into()], 3)
    );
    let (status, rooms) = nodes[0].api("GET", "/api/rooms", None).await;
    assert_eq!(status, 200, "{rooms}");
    assert_eq!(
        rooms["rooms"],
        json!([{"room": "club", "count": 3}]),
        "{rooms}"
    );
    for user in ["alice", "bob", "carol"] {
        let (status, answer) = nodes[1]
            .api("GET", &format!("/api/users/{user}"), None)
            .await;
        assert_eq!((status, &answer["online"]), (200, &json!(true)), "{answer}");
    }
    bob.expect_nothing_queued().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaped_while_stalled_brings_its_users_back_when_it_resumes() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let watcher = nodes_with(&redis, 1, presence_on).await.remove(0);
    // The other node is a real `herald` process, so that it can be stalled with SIGSTOP: its
    // heartbeat stops, the watcher's node reaps it, and it resumes unaware.
    let data = tempfile::tempdir().unwrap();
    let mut child = herald(data.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("HERALD_AUTH_SECRET", SECRET)
        .env("HERALD_ENGINE_BACKEND", "redis")
        .env("HERALD_REDIS_URLS", redis.url())
        .env("HERALD_REDIS_PRESENCE_TTL", "3s")
        .env("HERALD_SERVER_NODE_ID", "stalled")
        .env("HERALD_PRESENCE_WINDOW", "20ms")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stderr.take().unwrap()));
    let listening = wait_for_log(&mut log, |entry| entry["address"].is_string()).await;
    let address = listening["address"].as_str().unwrap().to_owned();
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });

    let mut bob = watcher.connect("bob").await;
    bob.join("club").await;
    let mut alice = Client::open(&format!(
        "ws://{address}/ws?token={}",
        watcher.token("alice")
    ))
    .await;
    alice.join("club").await;
    bob.diff_listing("club", "alice", true).await;

    let pid = child.id().unwrap().to_string();
    signal(&pid, "-STOP").await;
    bob.diff_listing("club", "alice", false).await;
    assert_eq!(members(&mut bob, "club").await.0, ["bob"]);
    signal(&pid, "-CONT").await;

    bob.diff_listing("club", "alice", true).await;
    assert_eq!(
        members(&mut bob, "club").await,
        (vec!["alice".into(), "bob".into()], 2)
    );
    let (_, answer) = watcher.api("GET", "/api/users/alice", None).await;
    assert_eq!(answer["online"], json!(true), "{answer}");
    // Alice's connection lived through it all.
    assert!(matches!(
        alice.request(json!({"type": "ping"})).await,
        ServerEvent::Pong(_)
    ));
}

async fn signal(pid: &str, signal: &str) {
    let status = tokio::process::Command::new("kill")
        .args([signal, pid])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}
