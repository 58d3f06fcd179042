//! The `Presence` contract (engine/presence.rs), one suite for every backend. Each test runs two
//! "nodes": with the in-memory presence both are the one process's presence (what every node
//! of a single-process deployment shares); with Redis they are two `RedisPresence` instances
//! with their own node ids on one real redis-server. Expiry of a dead node's entries only
//! exists where nodes can die apart, so those tests run on Redis.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::EVENT_TIMEOUT;
use common::redis::{RedisCluster, RedisServer};
use herald_server::config::RedisConfig;
use herald_server::delivery::ConnId;
use herald_server::engine::memory::MemoryPresence;
use herald_server::engine::presence::{
    CountClaim, LocalEntry, Presence, PresenceHandler, RoomChange, RoomCount,
};
use herald_server::engine::redis::presence::RedisPresence;
use tokio::sync::mpsc;

const TTL: Duration = Duration::from_secs(3);

/// A room change a node's presence handler was told about: (room, user, count).
type Told = (String, String, u64);

/// Stands for the node: passes on what it is told and lists the entries a test says it holds.
struct Handler {
    expired: mpsc::UnboundedSender<Told>,
    reappeared: mpsc::UnboundedSender<Told>,
    entries: Mutex<Vec<LocalEntry>>,
}

#[async_trait]
impl PresenceHandler for Handler {
    async fn expired(&self, room: &str, user: &str, count: u64) {
        let _ = self.expired.send((room.to_owned(), user.to_owned(), count));
    }

    async fn reappeared(&self, room: &str, user: &str, count: u64) {
        let _ = self
            .reappeared
            .send((room.to_owned(), user.to_owned(), count));
    }

    fn local_entries(&self) -> Vec<LocalEntry> {
        self.entries.lock().unwrap().clone()
    }
}

struct Node {
    presence: Arc<dyn Presence>,
    expired: mpsc::UnboundedReceiver<Told>,
    reappeared: mpsc::UnboundedReceiver<Told>,
    handler: Arc<Handler>,
}

impl Node {
    fn started(presence: Arc<dyn Presence>) -> Node {
        let (expired_sender, expired) = mpsc::unbounded_channel();
        let (reappeared_sender, reappeared) = mpsc::unbounded_channel();
        let handler = Arc::new(Handler {
            expired: expired_sender,
            reappeared: reappeared_sender,
            entries: Mutex::new(Vec::new()),
        });
        presence.start(handler.clone());
        Node {
            presence,
            expired,
            reappeared,
            handler,
        }
    }

    /// Connects `conn` and joins it to `rooms`, as the node would, and lists it as held.
    async fn hold(&self, user: &str, conn: ConnId, rooms: &[&str]) {
        self.handler.entries.lock().unwrap().push(LocalEntry {
            user: user.into(),
            conn,
            rooms: rooms.iter().map(|room| Arc::from(*room)).collect(),
        });
        self.presence.connect(user, conn).await.unwrap();
        for room in rooms {
            self.presence.join(room, user, conn).await.unwrap();
        }
    }
}

enum Backend {
    Memory(Arc<MemoryPresence>),
    Redis(Box<RedisServer>, Box<RedisConfig>),
}

impl Backend {
    async fn all() -> Vec<Backend> {
        let mut backends = vec![Backend::Memory(Arc::new(MemoryPresence::new()))];
        backends.extend(Self::redis().await);
        backends
    }

    async fn redis() -> Option<Backend> {
        let server = RedisServer::start().await?;
        let mut config = server.config();
        config.presence_ttl = TTL;
        Some(Backend::Redis(Box::new(server), Box::new(config)))
    }

    async fn node(&self, id: &str) -> Node {
        match self {
            Backend::Memory(presence) => Node::started(presence.clone()),
            Backend::Redis(_, config) => {
                Node::started(Arc::new(RedisPresence::connect(id, config).await.unwrap()))
            }
        }
    }

    /// A client of the Redis backend's server, for the faults a test makes.
    async fn redis_client(&self) -> redis::aio::MultiplexedConnection {
        match self {
            Backend::Redis(server, _) => server.client().await,
            Backend::Memory(_) => unreachable!("only the Redis backend has a server"),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Memory(_) => "memory",
            Backend::Redis(..) => "redis",
        }
    }
}

fn change(user_changed: bool, count: u64) -> RoomChange {
    RoomChange {
        user_changed,
        count,
    }
}

fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

#[tokio::test]
async fn a_user_enters_with_their_first_connection_and_leaves_with_their_last_across_nodes() {
    for backend in Backend::all().await {
        let name = backend.name();
        let a = backend.node("node-a").await.presence;
        let b = backend.node("node-b").await.presence;
        assert_eq!(
            a.join("r", "alice", ConnId(1)).await.unwrap(),
            change(true, 1),
            "{name}"
        );
        assert_eq!(
            b.join("r", "alice", ConnId(2)).await.unwrap(),
            change(false, 1),
            "{name}"
        );
        assert_eq!(
            b.join("r", "alice", ConnId(2)).await.unwrap(),
            change(false, 1),
            "{name}"
        );
        assert_eq!(
            b.join("r", "bob", ConnId(3)).await.unwrap(),
            change(true, 2),
            "{name}"
        );
        assert_eq!(
            a.members("r").await.unwrap(),
            users(&["alice", "bob"]),
            "{name}"
        );

        assert_eq!(
            a.leave("r", "alice", ConnId(1)).await.unwrap(),
            change(false, 2),
            "{name}"
        );
        assert_eq!(
            a.leave("r", "alice", ConnId(1)).await.unwrap(),
            change(false, 2),
            "{name}"
        );
        assert_eq!(
            b.leave("r", "alice", ConnId(2)).await.unwrap(),
            change(true, 1),
            "{name}"
        );
        assert_eq!(
            a.leave("r", "bob", ConnId(3)).await.unwrap(),
            change(true, 0),
            "{name}"
        );
        assert_eq!(b.members("r").await.unwrap(), users(&[]), "{name}");
        assert_eq!(b.rooms().await.unwrap(), [], "{name}");
    }
}

#[tokio::test]
async fn entering_and_leaving_are_reported_once_when_connections_race_on_both_nodes() {
    for backend in Backend::all().await {
        let name = backend.name();
        let a = backend.node("node-a").await.presence;
        let b = backend.node("node-b").await.presence;
        let joins = (0..40).map(|i| {
            let node = if i % 2 == 0 { &a } else { &b };
            node.join("r", "alice", ConnId(i))
        });
        let entered = futures::future::join_all(joins)
            .await
            .into_iter()
            .filter(|change| change.as_ref().unwrap().user_changed)
            .count();
        assert_eq!(entered, 1, "{name}: first connection in, once");
        let leaves = (0..40).map(|i| {
            let node = if i % 2 == 0 { &b } else { &a };
            node.leave("r", "alice", ConnId(i))
        });
        let left = futures::future::join_all(leaves)
            .await
            .into_iter()
            .filter(|change| change.as_ref().unwrap().user_changed)
            .count();
        assert_eq!(left, 1, "{name}: last connection out, once");
        assert_eq!(a.count("r").await.unwrap(), 0, "{name}");
    }
}

#[tokio::test]
async fn counts_members_online_connections_and_rooms_are_the_same_from_every_node() {
    for backend in Backend::all().await {
        let name = backend.name();
        let a = backend.node("node-a").await.presence;
        let b = backend.node("node-b").await.presence;
        a.connect("alice", ConnId(1)).await.unwrap();
        b.connect("alice", ConnId(2)).await.unwrap();
        b.connect("bob", ConnId(3)).await.unwrap();
        a.join("lobby", "alice", ConnId(1)).await.unwrap();
        b.join("lobby", "bob", ConnId(3)).await.unwrap();
        b.join("den", "alice", ConnId(2)).await.unwrap();

        for node in [&a, &b] {
            assert_eq!(node.count("lobby").await.unwrap(), 2, "{name}");
            assert_eq!(node.count("nowhere").await.unwrap(), 0, "{name}");
            assert_eq!(
                node.members("lobby").await.unwrap(),
                users(&["alice", "bob"])
            );
            assert_eq!(
                node.online(&users(&["alice", "bob", "carol"]))
                    .await
                    .unwrap(),
                [true, true, false],
                "{name}"
            );
            let mut conns = node.connections("alice").await.unwrap();
            conns.sort();
            assert_eq!(conns, [ConnId(1), ConnId(2)], "{name}");
            assert_eq!(
                node.rooms().await.unwrap(),
                [
                    RoomCount {
                        room: "den".into(),
                        users: 1
                    },
                    RoomCount {
                        room: "lobby".into(),
                        users: 2
                    }
                ],
                "{name}"
            );
        }

        a.disconnect("alice", ConnId(1)).await.unwrap();
        assert_eq!(
            b.online(&users(&["alice"])).await.unwrap(),
            [true],
            "{name}"
        );
        b.disconnect("alice", ConnId(2)).await.unwrap();
        assert_eq!(
            a.online(&users(&["alice"])).await.unwrap(),
            [false],
            "{name}"
        );
        assert_eq!(a.connections("alice").await.unwrap(), [], "{name}");
    }
}

#[tokio::test]
async fn a_dead_nodes_entries_expire_and_the_survivors_report_each_leave_once() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    let mut a = backend.node("node-a").await;
    let mut c = backend.node("node-c").await;
    let b = backend.node("node-b").await;
    b.presence.connect("alice", ConnId(1)).await.unwrap();
    b.presence.connect("bob", ConnId(2)).await.unwrap();
    b.presence.join("r1", "alice", ConnId(1)).await.unwrap();
    b.presence.join("r2", "alice", ConnId(1)).await.unwrap();
    b.presence.join("r1", "bob", ConnId(2)).await.unwrap();
    b.presence.join("r1", "carol", ConnId(4)).await.unwrap();
    a.presence.connect("carol", ConnId(3)).await.unwrap();
    a.presence.join("r1", "carol", ConnId(3)).await.unwrap();

    // Dropped without close: its heartbeat stops and its entries stay, as after a crash.
    drop(b);

    let mut reported = Vec::new();
    while reported.len() < 3 {
        let event = tokio::select! {
            Some(event) = a.expired.recv() => event,
            Some(event) = c.expired.recv() => event,
            _ = tokio::time::sleep(TTL * 3) => panic!("expiry within the ttl, got {reported:?}"),
        };
        reported.push(event);
    }
    let left: HashSet<(String, String)> = reported
        .iter()
        .map(|(room, user, _)| (room.clone(), user.clone()))
        .collect();
    let expected: HashSet<(String, String)> = [("r1", "alice"), ("r2", "alice"), ("r1", "bob")]
        .into_iter()
        .map(|(room, user)| (room.to_owned(), user.to_owned()))
        .collect();
    assert_eq!(left, expected, "carol stays through node a: {reported:?}");
    assert!(reported.contains(&("r2".into(), "alice".into(), 0)));

    // Reaping ends by releasing its claim on the dead node; every report came before that.
    let mut raw = backend.redis_client().await;
    let reaping = format!("{}:{{global}}:reaping", key_prefix(&backend));
    tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let claimed: u64 = redis::cmd("ZCARD")
                .arg(&reaping)
                .query_async(&mut raw)
                .await
                .unwrap();
            if claimed == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("reaping finishes");
    assert!(a.expired.try_recv().is_err(), "each leave reported once");
    assert!(c.expired.try_recv().is_err(), "each leave reported once");

    let p = &a.presence;
    assert_eq!(p.members("r1").await.unwrap(), users(&["carol"]));
    assert_eq!(p.count("r2").await.unwrap(), 0);
    assert_eq!(
        p.online(&users(&["alice", "bob", "carol"])).await.unwrap(),
        [false, false, true]
    );
    assert_eq!(p.connections("carol").await.unwrap(), [ConnId(3)]);
    assert_eq!(
        p.rooms().await.unwrap(),
        [RoomCount {
            room: "r1".into(),
            users: 1
        }]
    );
}

#[tokio::test]
async fn a_node_restarted_under_the_same_id_does_not_keep_its_previous_entries_alive() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    let before = backend.node("node-x").await;
    before.presence.join("r", "alice", ConnId(1)).await.unwrap();
    drop(before);
    let mut after = backend.node("node-x").await;
    after.presence.join("r", "bob", ConnId(2)).await.unwrap();
    let expired = tokio::time::timeout(TTL * 3, after.expired.recv())
        .await
        .expect("the previous incarnation's entries expire");
    assert_eq!(expired, Some(("r".into(), "alice".into(), 1)));
    assert_eq!(after.presence.members("r").await.unwrap(), users(&["bob"]));
}

/// One node per room wins a count window; the others learn for how long it is held. With one
/// process there is nobody to share with: every claim wins.
#[tokio::test]
async fn a_count_window_is_won_by_one_node_until_it_ends() {
    let window = Duration::from_millis(300);
    for backend in Backend::all().await {
        let a = backend.node("node-a").await;
        let b = backend.node("node-b").await;
        let name = backend.name();
        assert_eq!(
            a.presence.claim_count("r", window).await.unwrap(),
            CountClaim::Won
        );
        let held = b.presence.claim_count("r", window).await.unwrap();
        let claimed_again = a.presence.claim_count("r", window).await.unwrap();
        let other_room = b.presence.claim_count("s", window).await.unwrap();
        assert_eq!(
            other_room,
            CountClaim::Won,
            "{name}: rooms are claimed apart"
        );
        let Backend::Redis(..) = backend else {
            assert_eq!((held, claimed_again), (CountClaim::Won, CountClaim::Won));
            continue;
        };
        let CountClaim::HeldFor(left) = held else {
            panic!("{name}: the window is a's, b got {held:?}");
        };
        assert!(left <= window && !left.is_zero(), "{name}: {left:?}");
        assert!(
            matches!(claimed_again, CountClaim::HeldFor(_)),
            "{name}: one claim per window"
        );
        // Once the window has passed (Redis counts whole milliseconds), the next claim wins.
        tokio::time::sleep(left + Duration::from_millis(2)).await;
        assert_eq!(
            b.presence.claim_count("r", window).await.unwrap(),
            CountClaim::Won,
            "{name}: a new window"
        );
    }
}

#[tokio::test]
async fn close_removes_the_nodes_entries_at_once() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    let a = backend.node("node-a").await;
    let b = backend.node("node-b").await;
    b.presence.connect("bob", ConnId(2)).await.unwrap();
    b.presence.join("r", "bob", ConnId(2)).await.unwrap();
    a.presence.join("r", "alice", ConnId(1)).await.unwrap();
    b.presence.close().await;
    assert_eq!(a.presence.members("r").await.unwrap(), users(&["alice"]));
    assert_eq!(a.presence.online(&users(&["bob"])).await.unwrap(), [false]);
}

#[tokio::test]
async fn on_a_three_master_cluster_presence_is_decided_once_and_read_from_any_node() {
    let Some(cluster) = RedisCluster::start(3).await else {
        return;
    };
    let mut config = cluster.config();
    config.presence_ttl = TTL;
    let a = RedisPresence::connect("node-a", &config).await.unwrap();
    let b = RedisPresence::connect("node-b", &config).await.unwrap();
    for i in 0..12 {
        let room = format!("r{i}");
        assert_eq!(
            a.join(&room, "alice", ConnId(1)).await.unwrap(),
            change(true, 1)
        );
        assert_eq!(
            b.join(&room, "alice", ConnId(2)).await.unwrap(),
            change(false, 1)
        );
        assert_eq!(
            b.join(&room, "bob", ConnId(3)).await.unwrap(),
            change(true, 2)
        );
    }
    a.connect("alice", ConnId(1)).await.unwrap();
    assert_eq!(
        b.online(&users(&["alice", "bob"])).await.unwrap(),
        [true, false]
    );
    assert_eq!(b.members("r7").await.unwrap(), users(&["alice", "bob"]));
    assert_eq!(a.rooms().await.unwrap().len(), 12);
    assert_eq!(
        b.leave("r7", "alice", ConnId(2)).await.unwrap(),
        change(false, 2)
    );
    assert_eq!(
        a.leave("r7", "alice", ConnId(1)).await.unwrap(),
        change(true, 1)
    );
}

/// A leave and a disconnect that fail (Redis refusing writes, as with a connection that drops
/// between a join and its rollback) leave entries the node no longer holds: once Redis takes
/// writes again the node removes them, and the room is told once that the user left.
#[tokio::test]
async fn entries_whose_removal_failed_are_removed_once_redis_takes_writes_again() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    let mut a = backend.node("node-a").await;
    let mut b = backend.node("node-b").await;
    a.hold("alice", ConnId(1), &["r"]).await;
    b.hold("bob", ConnId(2), &["r"]).await;

    // The node forgets the connection first, as it does, then fails to remove its entries.
    a.handler.entries.lock().unwrap().clear();
    let mut redis = backend.redis_client().await;
    let refuse_writes = |replicas: u32| {
        let mut config = redis::cmd("CONFIG");
        config.arg("SET").arg("min-replicas-to-write").arg(replicas);
        config
    };
    refuse_writes(1).exec_async(&mut redis).await.unwrap();
    let left = a.presence.leave("r", "alice", ConnId(1)).await;
    let disconnected = a.presence.disconnect("alice", ConnId(1)).await;
    refuse_writes(0).exec_async(&mut redis).await.unwrap();
    assert!(
        left.is_err() && disconnected.is_err(),
        "{left:?} {disconnected:?}"
    );
    assert_eq!(
        b.presence.members("r").await.unwrap(),
        users(&["alice", "bob"])
    );

    let expired = tokio::time::timeout(TTL, a.expired.recv())
        .await
        .expect("removed within a heartbeat");
    assert_eq!(expired, Some(("r".into(), "alice".into(), 1)));
    assert_eq!(b.presence.members("r").await.unwrap(), users(&["bob"]));
    assert_eq!(
        b.presence.online(&users(&["alice", "bob"])).await.unwrap(),
        [false, true]
    );
    assert!(a.expired.try_recv().is_err() && b.expired.try_recv().is_err());
}

#[tokio::test]
async fn after_redis_loses_the_entries_each_node_re_asserts_its_own_and_each_user_reappears_once() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    let mut a = backend.node("node-a").await;
    let mut b = backend.node("node-b").await;
    a.hold("alice", ConnId(1), &["r1", "r2"]).await;
    b.hold("alice", ConnId(2), &["r1"]).await;
    b.hold("bob", ConnId(3), &["r1"]).await;

    redis::cmd("FLUSHALL")
        .exec_async(&mut backend.redis_client().await)
        .await
        .unwrap();

    let mut reported = Vec::new();
    while reported.len() < 3 {
        let event = tokio::select! {
            Some(event) = a.reappeared.recv() => event,
            Some(event) = b.reappeared.recv() => event,
            _ = tokio::time::sleep(TTL) => panic!("re-asserted within a heartbeat, got {reported:?}"),
        };
        reported.push((event.0, event.1));
    }
    reported.sort();
    let expected: Vec<(String, String)> = [("r1", "alice"), ("r1", "bob"), ("r2", "alice")]
        .into_iter()
        .map(|(room, user)| (room.to_owned(), user.to_owned()))
        .collect();
    assert_eq!(
        reported, expected,
        "alice, held by both nodes, reappears once"
    );

    // Every entry is back, the second connection of alice too (no event tells when that one
    // is written: its user was already back).
    let mut raw = backend.redis_client().await;
    tokio::time::timeout(EVENT_TIMEOUT, async {
        while a.presence.connections("alice").await.unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every connection re-asserted");
    let p = &b.presence;
    assert_eq!(p.members("r1").await.unwrap(), users(&["alice", "bob"]));
    assert_eq!(p.members("r2").await.unwrap(), users(&["alice"]));
    assert_eq!(
        p.online(&users(&["alice", "bob", "carol"])).await.unwrap(),
        [true, true, false]
    );
    assert_eq!(p.rooms().await.unwrap().len(), 2);
    let registered: u64 = redis::cmd("ZCARD")
        .arg(format!("{}:{{global}}:nodes", key_prefix(&backend)))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(registered, 2, "both nodes registered again");
    assert!(a.reappeared.try_recv().is_err() && b.reappeared.try_recv().is_err());
    assert!(a.expired.try_recv().is_err() && b.expired.try_recv().is_err());
}

fn key_prefix(backend: &Backend) -> &str {
    match backend {
        Backend::Redis(_, config) => &config.key_prefix,
        Backend::Memory(_) => unreachable!(),
    }
}
