//! Several nodes on one real Redis through Redis faults: presence comes back whole after Redis
//! loses its data or reaps a node that was only stalled, and a Redis restarted under sustained
//! traffic loses no acknowledged message. Each test starts its own `redis-server`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::Duration;

use common::process::{herald, wait_for_log};
use common::redis::{RedisServer, nodes_with, wait_for_ready};
use common::{Client, EVENT_TIMEOUT, SECRET, TestServer, content_json, presence_on};
use futures::{SinkExt, StreamExt};
use herald_protocol::{ErrorCode, ServerEvent};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

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

const FEED: &str = "feed";

/// What one publisher saw: how many publishes it sent, the messages acknowledged (its number
/// n → offset) and how many publishes were refused with an error. Those sent but neither
/// acknowledged nor refused were unanswered when the connection closed: stored or not.
#[derive(Debug, Default)]
struct Published {
    sent: u64,
    acked: BTreeMap<u64, u64>,
    refused: usize,
}

/// Publishes `{"publisher": tag, "n": n}` to the feed every 10 ms, up to 8 unanswered at a time,
/// until the server closes the connection. `progress` follows (acked, refused).
async fn publish_until_closed(
    mut client: Client,
    tag: usize,
    progress: watch::Sender<(usize, usize)>,
) -> Published {
    const WINDOW: usize = 8;
    enum Step {
        Send,
        Frame(Option<WsMessage>),
    }
    let mut record = Published::default();
    let mut in_flight: HashMap<String, u64> = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    loop {
        let step = tokio::select! {
            _ = ticker.tick(), if in_flight.len() < WINDOW => Step::Send,
            frame = client.ws.next() => Step::Frame(frame.and_then(Result::ok)),
        };
        match step {
            Step::Send => {
                let n = record.sent;
                let id = format!("p{n}");
                let request = json!({"type": "publish", "room": FEED, "id": id,
                    "content": {"publisher": tag, "n": n}});
                if client
                    .ws
                    .send(WsMessage::text(request.to_string()))
                    .await
                    .is_err()
                {
                    break;
                }
                in_flight.insert(id, n);
                record.sent += 1;
            }
            Step::Frame(Some(WsMessage::Text(text))) => match ServerEvent::decode(&text).unwrap() {
                ServerEvent::Ack(ack) => {
                    if let Some(n) = ack.reference.and_then(|id| in_flight.remove(&id)) {
                        record
                            .acked
                            .insert(n, ack.offset.expect("a stored message's offset"));
                    }
                }
                ServerEvent::Error(error) => {
                    assert_eq!(error.code, ErrorCode::Internal, "{error:?}");
                    if error
                        .reference
                        .and_then(|id| in_flight.remove(&id))
                        .is_some()
                    {
                        record.refused += 1;
                    }
                }
                _ => {}
            },
            Step::Frame(Some(WsMessage::Close(_)) | None) => break,
            Step::Frame(Some(_)) => {}
        }
        progress.send_replace((record.acked.len(), record.refused));
    }
    record
}

/// Waits until a publisher's (acked, refused) satisfies `ready`.
async fn wait_until(
    progress: &mut watch::Receiver<(usize, usize)>,
    ready: fn(&(usize, usize)) -> bool,
) {
    tokio::time::timeout(EVENT_TIMEOUT, progress.wait_for(ready))
        .await
        .expect("publishing progresses")
        .expect("the publisher runs");
}

/// Reads the feed's messages until the server closes the connection: offset → content.
async fn read_until_closed(mut client: Client) -> BTreeMap<u64, Value> {
    let mut seen = BTreeMap::new();
    while let Some(Ok(frame)) = client.ws.next().await {
        if let WsMessage::Text(text) = frame
            && let ServerEvent::Message(message) = ServerEvent::decode(&text).unwrap()
        {
            let offset = message.offset.unwrap();
            assert!(
                seen.insert(offset, content_json(&message)).is_none(),
                "{offset} twice"
            );
        }
    }
    seen
}

/// The feed's whole history, read newest page first through the server API: offset → content.
async fn whole_history(node: &TestServer) -> Vec<(u64, Value)> {
    let mut messages = Vec::new();
    let mut before = String::new();
    loop {
        let (status, page) = node
            .api(
                "GET",
                &format!("/api/rooms/{FEED}/history?limit=100{before}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        let page_messages = page["messages"].as_array().unwrap();
        for message in page_messages.iter().rev() {
            messages.push((
                message["offset"].as_u64().unwrap(),
                message["content"].clone(),
            ));
        }
        if page["more"] != json!(true) {
            break;
        }
        before = format!("&before={}", page_messages[0]["offset"]);
    }
    messages.reverse();
    messages
}

/// Publishers on two nodes keep publishing while Redis (AOF, `appendfsync always`) is killed
/// and restarted: every acknowledged message is in history once, subscribers recover exactly
/// with `since`, and publishes made while Redis is down are refused, never acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_sustained_publishing_loses_no_acknowledged_message() {
    let Some(mut redis) =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await
    else {
        return;
    };
    let nodes = nodes_with(&redis, 2, |config| {
        config.limits.messages_per_second = 1000;
        config.limits.burst = 1000;
    })
    .await;
    let mut epochs = Vec::new();
    let mut readers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let mut subscriber = node.connect(&format!("subscriber{n}")).await;
        let ack = subscriber.ack(json!({"type": "join", "room": FEED})).await;
        epochs.push(ack.epoch);
        readers.push(tokio::spawn(read_until_closed(subscriber)));
    }
    let mut publishers = Vec::new();
    let mut progress = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let mut publisher = node.connect(&format!("publisher{n}")).await;
        publisher.join(FEED).await;
        let (sender, receiver) = watch::channel((0, 0));
        publishers.push(tokio::spawn(publish_until_closed(publisher, n, sender)));
        progress.push(receiver);
    }
    for receiver in &mut progress {
        wait_until(receiver, |(acked, _)| *acked >= 20).await;
    }
    redis.kill().await;
    for receiver in &mut progress {
        wait_until(receiver, |(_, refused)| *refused >= 1).await;
    }
    redis.restart().await;

    // Once resubscribed, each node closes its connections (1012): both tasks end.
    let mut published = Vec::new();
    for task in publishers {
        published.push(
            tokio::time::timeout(EVENT_TIMEOUT * 3, task)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let mut seen = Vec::new();
    for task in readers {
        seen.push(
            tokio::time::timeout(EVENT_TIMEOUT * 3, task)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    wait_for_ready(&nodes[0], 200).await;
    wait_for_ready(&nodes[1], 200).await;
    // Traffic resumes after the restart, each publisher back on its node.
    for (n, node) in nodes.iter().enumerate() {
        let mut publisher = node.connect(&format!("publisher{n}")).await;
        publisher.join(FEED).await;
        let first = published[n].sent;
        for k in first..first + 5 {
            let offset = publisher
                .publish(FEED, json!({"publisher": n, "n": k}))
                .await;
            published[n].acked.insert(k, offset);
        }
    }

    let history = whole_history(&nodes[0]).await;
    let offsets: Vec<u64> = history.iter().map(|(offset, _)| *offset).collect();
    let top = *offsets.last().unwrap();
    assert_eq!(offsets, (1..=top).collect::<Vec<_>>(), "history has no gap");
    let stored: HashMap<u64, &Value> = history.iter().map(|(o, c)| (*o, c)).collect();
    for (n, record) in published.iter().enumerate() {
        assert!(record.refused >= 1, "publisher {n}: {record:?}");
        for (k, offset) in &record.acked {
            let content = json!({"publisher": n, "n": k});
            assert_eq!(
                stored.get(offset),
                Some(&&content),
                "acked {content} at {offset}"
            );
            let copies = history.iter().filter(|(_, c)| *c == content).count();
            assert_eq!(copies, 1, "{content} stored once");
        }
    }

    // Each subscriber comes back on the other node and recovers from its last offset.
    for (n, mut received) in seen.into_iter().enumerate() {
        let since = received.keys().last().copied().unwrap_or(0);
        let mut moved = nodes[1 - n].connect(&format!("subscriber{n}")).await;
        let ack = moved
            .ack(json!({"type": "join", "room": FEED, "since": since, "epoch": epochs[n]}))
            .await;
        assert_eq!((ack.recovered, ack.offset), (Some(true), Some(top)));
        let mut last = since;
        while last < top {
            let message = moved.next_message_event().await;
            last = message.offset.unwrap();
            assert!(
                received.insert(last, content_json(&message)).is_none(),
                "{last} twice"
            );
        }
        let recovered: Vec<(u64, Value)> = received.into_iter().collect();
        assert_eq!(
            recovered, history,
            "subscriber{n} has every stored message once"
        );
        moved.expect_nothing_queued().await;
    }
}
