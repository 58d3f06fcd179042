//! Several Herald nodes on one real Redis act as one service: direct messages, rooms, presence,
//! offline inboxes and recovery work whichever node each client lands on, and Redis faults
//! end in clear errors and a clean resumption. Each test starts its own `redis-server`.

mod common;

use std::time::Duration;

use common::redis::{RedisCluster, RedisServer, nodes, nodes_with, on_redis, wait_for_ready};
use common::{TestServer, content_json, presence_on, reference_of};
use herald_protocol::{ErrorCode, ServerEvent};
use herald_server::config::EngineBackend;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_message_reaches_every_device_of_its_recipient_on_other_nodes() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut alice = nodes[0].connect("alice").await;
    let mut phone = nodes[1].connect("bob").await;
    let mut laptop = nodes[2].connect("bob").await;
    assert_ne!(phone.welcome.node, laptop.welcome.node);
    let ack = alice
        .ack(json!({"type": "send", "to": ["bob"], "content": {"text": "hi"}}))
        .await;
    assert_eq!(ack.online.as_deref(), Some(&["bob".to_owned()][..]));
    let offset = ack.offsets.unwrap()["bob"];
    for device in [&mut phone, &mut laptop] {
        let message = device.next_message_event().await;
        assert_eq!(message.from, "alice");
        assert_eq!(message.offset, Some(offset));
        assert_eq!(content_json(&message), json!({"text": "hi"}));
        device.expect_nothing_queued().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spread_over_three_nodes_gets_each_message_once_in_offset_order() {
    const EACH: u64 = 20;
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut members = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let mut client = node.connect(&format!("member{n}")).await;
        client.join("hall").await;
        members.push(client);
    }
    // Everyone publishes at once, without waiting for acks: the offsets interleave.
    for (n, member) in members.iter_mut().enumerate() {
        for k in 0..EACH {
            member
                .send_json(json!({"type": "publish", "room": "hall", "content": [n, k]}))
                .await;
        }
    }
    for member in &mut members {
        let mut offsets = Vec::new();
        while offsets.len() < 3 * EACH as usize {
            if let ServerEvent::Message(message) = member.next_event().await {
                assert_eq!(message.room.as_deref(), Some("hall"));
                offsets.push(message.offset.unwrap());
            }
        }
        let expected: Vec<u64> = (1..=3 * EACH).collect();
        assert_eq!(offsets, expected, "{}", member.welcome.user);
    }
}

/// A client whose node went away reconnects elsewhere and retries its unacknowledged
/// requests with the same ids: Redis, not the first node's memory, recognises them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_retried_on_another_node_gets_the_first_ack_and_is_stored_once() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let mut bob = nodes[1].connect("bob").await;
    bob.join("hall").await;
    let publish = json!({"type": "publish", "room": "hall", "content": "hello"});
    let mut alice = nodes[0].connect("alice").await;
    alice.join("hall").await;
    let first = alice.ack_with_id(publish.clone(), "p1").await;
    drop(alice);
    let mut again = nodes[1].connect("alice").await;
    again.join("hall").await;
    let retried = again.ack_with_id(publish, "p1").await;
    assert_eq!(
        (&retried.id, retried.offset, &retried.epoch),
        (&first.id, first.offset, &first.epoch)
    );
    let changed = json!({"type": "publish", "room": "hall", "content": "changed"});
    let other = again.ack_with_id(changed, "p1").await;
    assert_ne!(
        other.id, first.id,
        "the same id with another request is a new message"
    );

    let history = bob.history(json!({"room": "hall", "limit": 10})).await;
    let ids: Vec<Option<String>> = history.messages.into_iter().map(|m| Some(m.id)).collect();
    assert_eq!(ids, [first.id.clone(), other.id.clone()]);
    for expected in [first.id, other.id] {
        assert_eq!(Some(bob.next_message_event().await.id), expected);
    }
    bob.expect_nothing_queued().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_retried_on_another_node_reaches_each_inbox_and_conversation_once() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut bob = nodes[1].connect("bob").await;
    let mut carol = nodes[2].connect("carol").await;
    let send = json!({"type": "send", "to": ["bob", "carol"], "content": "once"});
    let mut phone = nodes[2].connect("alice").await;
    let mut alice = nodes[0].connect("alice").await;
    let first = alice.ack_with_id(send.clone(), "s1").await;
    drop(alice);
    let mut again = nodes[1].connect("alice").await;
    let retried = again.ack_with_id(send, "s1").await;
    assert_eq!((&retried.id, &retried.offsets), (&first.id, &first.offsets));
    // The sender's other connection got its copy of the first attempt, and no second one.
    for recipient in [&mut bob, &mut carol, &mut phone] {
        let delivered = recipient.next_message_event().await;
        assert_eq!(Some(delivered.id), first.id);
        recipient.expect_nothing_queued().await;
    }
    for recipient in [&mut bob, &mut carol] {
        let conversation = recipient
            .history(json!({"with": "alice", "limit": 10}))
            .await;
        assert_eq!(conversation.messages.len(), 1);
    }
}

/// Redis runs a script whose reply came too late: the node answered with an error, and the
/// client's retry with the same id gets the stored message's ack instead of a second copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_retried_after_its_reply_timed_out_is_stored_once() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let node = TestServer::start_with(|c| {
        on_redis(c, &redis, 0);
        c.redis.response_timeout = Duration::from_millis(300);
    })
    .await;
    let mut bob = node.connect("bob").await;
    bob.join("hall").await;
    let mut alice = node.connect("alice").await;
    alice.join("hall").await;
    // Writes (scripts included) wait until the pause ends, well past the response timeout.
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("WRITE")
        .exec_async(&mut admin)
        .await
        .unwrap();
    let publish = json!({"type": "publish", "room": "hall", "content": "late", "id": "p1"});
    alice.send_json(publish.clone()).await;
    match alice
        .next_matching(|event| reference_of(event) == Some("p1"))
        .await
    {
        ServerEvent::Error(error) => assert_eq!(error.code, ErrorCode::Internal),
        other => panic!("expected the timeout's error, got {other:?}"),
    }
    // Once the pause ends the first attempt is stored and delivered.
    let stored = bob.next_message_event().await;
    let retried = alice.ack_with_id(publish, "p1").await;
    assert_eq!(
        (retried.id, retried.offset),
        (Some(stored.id.clone()), stored.offset)
    );
    let history = bob.history(json!({"room": "hall", "limit": 10})).await;
    let ids: Vec<String> = history.messages.into_iter().map(|m| m.id).collect();
    assert_eq!(ids, [stored.id]);
    bob.expect_nothing_queued().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_counts_and_online_are_answered_cluster_wide() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut clients = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let mut client = node.connect(&format!("user{n}")).await;
        client.join("club").await;
        clients.push(client);
    }
    match clients[0]
        .request(json!({"type": "members", "room": "club"}))
        .await
    {
        ServerEvent::Members(members) => {
            assert_eq!(members.users, ["user0", "user1", "user2"]);
            assert_eq!(members.count, 3);
        }
        other => panic!("{other:?}"),
    }
    match clients[1]
        .request(json!({"type": "presence", "users": ["user0", "user2", "nobody"]}))
        .await
    {
        ServerEvent::Presence(presence) => {
            let online: Vec<bool> = ["user0", "user2", "nobody"]
                .iter()
                .map(|user| presence.online[*user])
                .collect();
            assert_eq!(online, [true, true, false]);
        }
        other => panic!("{other:?}"),
    }
    let (status, rooms) = nodes[2].api("GET", "/api/rooms", None).await;
    assert_eq!(status, 200, "{rooms}");
    assert_eq!(rooms["rooms"][0]["room"], "club", "{rooms}");
    assert_eq!(rooms["rooms"][0]["count"], 3, "{rooms}");
}

/// A node shutting down sends its users' leaves at once, whatever its presence window: members
/// on the other nodes see them go, with the count that remains, instead of a room that still
/// shows them until its next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_other_nodes_see_the_users_of_a_node_that_shuts_down_leave() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    // The leaving node's window is long: its last diff can only come from the shutdown.
    let mut nodes = nodes_with(&redis, 2, |config| {
        presence_on(config);
        if config.server.node_id == "node0" {
            config.presence.window = Duration::from_secs(5);
        }
    })
    .await;
    let leaving = nodes.remove(0);
    let mut alice = leaving.connect("alice").await;
    alice.join("club").await;
    let mut bob = nodes[0].connect("bob").await;
    bob.join("club").await;
    bob.diff_listing("club", "bob", true).await;

    leaving.stop().await;
    let diff = bob.diff_listing("club", "alice", false).await;
    assert_eq!(diff.count, 1, "{diff:?}");
}

/// Past `max_members_listed` a room's diffs carry only its count; the nodes claim each count
/// window, so members get one count for changes made on two nodes at once, not one per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_room_on_two_nodes_gets_one_count_for_both_nodes_changes() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes_with(&redis, 3, |config| {
        presence_on(config);
        config.presence.max_members_listed = 2;
        config.presence.count_window = Duration::from_millis(500);
        if config.server.node_id == "node2" {
            // Its diff comes well after any the first two nodes send for the same changes.
            config.presence.window = Duration::from_millis(300);
        }
    })
    .await;
    // One change at a time, each diff awaited, until both nodes have sent a count-only diff
    // (and so claim their next windows) and no window is open.
    let mut watcher = nodes[0].connect("watcher").await;
    watcher.join("big").await;
    watcher.diff_listing("big", "watcher", true).await;
    let mut members = Vec::new();
    for (n, node) in [1, 0, 1].into_iter().enumerate() {
        let mut member = nodes[node].connect(&format!("m{n}")).await;
        member.join("big").await;
        let diff = watcher.next_diff("big").await;
        assert_eq!(diff.count, n as u64 + 2, "{diff:?}");
        members.push(member);
    }

    // A join on each node at once: one window, claimed by one of them.
    let (mut first, mut second) = (nodes[0].connect("m3").await, nodes[1].connect("m4").await);
    tokio::join!(first.join("big"), second.join("big"));
    let diff = watcher.next_diff("big").await;
    assert_eq!((diff.count, diff.joined, diff.left), (6, None, None));
    let mut last = nodes[2].connect("m5").await;
    last.join("big").await;
    let diff = watcher.next_diff("big").await;
    assert_eq!(
        diff.count, 7,
        "one count for the two joins, then the next join's: {diff:?}"
    );
}

/// Only the node holding a connection knows its traffic: any node lists every node's
/// connections by asking them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_listed_from_every_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut phone = nodes[1].connect("erin").await;
    phone.join("den").await;
    let laptop = nodes[2].connect("erin").await;
    let _other = nodes[2].connect("frank").await;

    let (status, list) = nodes[0]
        .api("GET", "/api/connections?user=erin", None)
        .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["node"], "node0");
    assert_eq!(list["nodes"], json!(["node0", "node1", "node2"]), "{list}");
    assert_eq!(list["unanswered"], 0);
    let mut listed: Vec<(String, String)> = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_owned(),
                c["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    listed.sort();
    let mut expected = vec![
        (phone.welcome.conn.clone(), "node1".to_owned()),
        (laptop.welcome.conn.clone(), "node2".to_owned()),
    ];
    expected.sort();
    assert_eq!(listed, expected);

    let (status, all) = nodes[1].api("GET", "/api/connections?limit=2", None).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["connections"].as_array().unwrap().len(), 2);
    assert_eq!(all["truncated"], true, "{all}");

    let id = &phone.welcome.conn;
    let (status, one) = nodes[2]
        .api("GET", &format!("/api/connections/{id}"), None)
        .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(
        (&one["node"], &one["rooms"]),
        (&json!("node1"), &json!(["den"]))
    );
    let (status, body) = nodes[0]
        .api("GET", "/api/connections/00000000000000ff", None)
        .await;
    assert_eq!(status, 404, "{body}");

    // Something on the survey channel that never answers (a node of another version, or a
    // stuck one): the listing says so instead of waiting forever or hiding it.
    let mut silent = redis::Client::open(redis.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    silent.subscribe("herald:{global}:surveys").await.unwrap();
    let (status, partial) = nodes[0]
        .api("GET", "/api/connections?user=erin", None)
        .await;
    assert_eq!(status, 200, "{partial}");
    assert_eq!(partial["unanswered"], 1, "{partial}");
    assert_eq!(partial["connections"].as_array().unwrap().len(), 2);
    let (status, body) = nodes[0]
        .api("GET", "/api/connections/00000000000000ff", None)
        .await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_written_on_one_node_is_replayed_on_another_once() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut alice = nodes[0].connect("alice").await;
    for n in 0..3 {
        let ack = alice
            .ack(json!({"type": "send", "to": ["carol"], "content": n}))
            .await;
        assert_eq!(ack.offline.as_deref(), Some(&["carol".to_owned()][..]));
    }
    let mut carol = nodes[2].connect("carol").await;
    let mut last = 0;
    for n in 0..3 {
        let message = carol.next_message_event().await;
        assert_eq!(content_json(&message), json!(n));
        last = message.offset.unwrap();
    }
    carol.ack(json!({"type": "ack", "inbox": last})).await;
    drop(carol);
    let mut again = nodes[1].connect("carol").await;
    again.expect_nothing_queued().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moving_to_another_node_recovers_exactly_what_it_missed() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut publisher = nodes[1].connect("publisher").await;
    publisher.join("news").await;
    let mut reader = nodes[0].connect("reader").await;
    let joined = match reader.join("news").await {
        ServerEvent::Ack(ack) => ack,
        other => panic!("{other:?}"),
    };
    let first = publisher.publish("news", json!("seen")).await;
    let seen = reader.next_message_event().await;
    assert_eq!(seen.offset, Some(first));
    drop(reader);
    let mut missed = Vec::new();
    for n in 0..5 {
        missed.push(publisher.publish("news", json!(n)).await);
    }
    let mut moved = nodes[2].connect("reader").await;
    let ack = moved
        .ack(json!({"type": "join", "room": "news", "since": first, "epoch": joined.epoch}))
        .await;
    assert_eq!(ack.recovered, Some(true));
    for (n, offset) in missed.iter().enumerate() {
        let message = moved.next_message_event().await;
        assert_eq!(
            (message.offset, content_json(&message)),
            (Some(*offset), json!(n))
        );
    }
    // And it is live again: the next message comes once.
    let next = publisher.publish("news", json!("live")).await;
    assert_eq!(moved.next_message_event().await.offset, Some(next));
    moved.expect_nothing_queued().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_a_node_stays_up_refuses_writes_and_resumes_when_it_returns() {
    // With an append-only file fsynced per write, a restarted Redis keeps every acknowledged
    // message.
    let Some(mut redis) =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await
    else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let mut writer = nodes[0].connect("writer").await;
    let mut reader = nodes[1].connect("reader").await;
    let joined = match reader.join("ops").await {
        ServerEvent::Ack(ack) => ack,
        other => panic!("{other:?}"),
    };
    writer.join("ops").await;
    let before = writer.publish("ops", json!("before")).await;
    reader.next_message_event().await;

    redis.kill().await;
    wait_for_ready(&nodes[0], 503).await;
    // The WebSocket stays open; a stored publish gets an error, never an ack.
    match writer
        .request(json!({"type": "publish", "room": "ops", "content": "during"}))
        .await
    {
        ServerEvent::Error(error) => assert_eq!(error.code, ErrorCode::Internal, "{error:?}"),
        other => panic!("expected an error while Redis is down, got {other:?}"),
    }

    redis.restart().await;
    wait_for_ready(&nodes[0], 200).await;
    wait_for_ready(&nodes[1], 200).await;
    // Once resubscribed, each node tells its clients that fan-out was interrupted (1012)...
    for client in [&mut writer, &mut reader] {
        let close = client.expect_close().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1012);
    }
    // ...and they come back, on either node, recovering what they may have missed.
    let mut writer = nodes[1].connect("writer").await;
    writer.join("ops").await;
    let mut reader = nodes[0].connect("reader").await;
    let ack = reader
        .ack(json!({"type": "join", "room": "ops", "since": before, "epoch": joined.epoch}))
        .await;
    // Nothing was stored while Redis was down (the refused publish is not there).
    assert_eq!(ack.recovered, Some(true));
    let offset = writer.publish("ops", json!("after")).await;
    assert_eq!(offset, before + 1);
    let message = reader.next_message_event().await;
    assert_eq!(
        (message.offset, content_json(&message)),
        (Some(offset), json!("after"))
    );
}

/// On a 3-master Redis Cluster (keys hash-tagged per room and user, fan-out over sharded
/// pub/sub), three nodes still act as one service: a room spread over them gets every message
/// once in offset order, and direct messages reach online devices and offline inboxes on any
/// node, with rooms and users spread over every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_redis_cluster_are_one_service() {
    const EACH: u64 = 5;
    let Some(cluster) = RedisCluster::start(3).await else {
        return;
    };
    // One deployment: the same key prefix for every node.
    let shared = cluster.config();
    let mut nodes = Vec::new();
    for n in 0..3 {
        let redis = shared.clone();
        nodes.push(
            TestServer::start_with(|c| {
                c.engine.backend = EngineBackend::Redis;
                c.redis = redis;
                c.server.node_id = format!("node{n}");
            })
            .await,
        );
    }
    // Several rooms, so that their keys and channels land on different shards.
    for room in ["north", "south", "east", "west"] {
        let mut members = Vec::new();
        for (n, node) in nodes.iter().enumerate() {
            let mut client = node.connect(&format!("{room}-member{n}")).await;
            client.join(room).await;
            members.push(client);
        }
        for member in members.iter_mut() {
            for k in 0..EACH {
                member
                    .send_json(json!({"type": "publish", "room": room, "content": k}))
                    .await;
            }
        }
        for member in &mut members {
            let mut offsets = Vec::new();
            while offsets.len() < 3 * EACH as usize {
                if let ServerEvent::Message(message) = member.next_event().await {
                    offsets.push(message.offset.unwrap());
                }
            }
            assert_eq!(offsets, (1..=3 * EACH).collect::<Vec<_>>(), "{room}");
        }
    }
    let mut sender = nodes[0].connect("sender").await;
    let mut phone = nodes[1].connect("dana").await;
    let mut laptop = nodes[2].connect("dana").await;
    let recipients: Vec<String> = std::iter::once("dana".to_owned())
        .chain((0..6).map(|n| format!("away{n}")))
        .collect();
    let ack = sender
        .ack(json!({"type": "send", "to": recipients, "content": "hello"}))
        .await;
    assert_eq!(ack.online.as_deref(), Some(&["dana".to_owned()][..]));
    for device in [&mut phone, &mut laptop] {
        let message = device.next_message_event().await;
        assert_eq!(message.offset, Some(ack.offsets.as_ref().unwrap()["dana"]));
    }
    // Surveys ride sharded pub/sub too: every node's connections are listed.
    let (status, list) = nodes[0]
        .api("GET", "/api/connections?user=dana", None)
        .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["nodes"], json!(["node0", "node1", "node2"]), "{list}");
    assert_eq!(list["connections"].as_array().unwrap().len(), 2, "{list}");
    for (n, user) in recipients.iter().skip(1).enumerate() {
        let mut back = nodes[n % 3].connect(user).await;
        let message = back.next_message_event().await;
        assert_eq!(
            (message.from.as_str(), content_json(&message)),
            ("sender", json!("hello"))
        );
    }
}
