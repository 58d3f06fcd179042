//! Rooms: join, leave, publish with and without echo, presence events, members, rooms at connect.

mod common;

use std::time::Duration;

use common::{Client, TestServer, content_of};
use herald_protocol::{ErrorCode, ServerEvent};
use serde_json::json;

fn count_of(event: &ServerEvent) -> u64 {
    match event {
        ServerEvent::Ack(ack) => ack.count.expect("ack has a count"),
        other => panic!("no count in {other:?}"),
    }
}

fn users(names: &[&str]) -> Option<Vec<String>> {
    Some(names.iter().map(|name| name.to_string()).collect())
}

/// A window long enough that a test's requests all land in it, however busy the machine.
const LONG_WINDOW: Duration = Duration::from_secs(2);

async fn server_with_window(window: Duration) -> TestServer {
    TestServer::start_with(|c| {
        common::presence_on(c);
        c.presence.window = window;
    })
    .await
}

#[tokio::test]
async fn joins_within_one_window_reach_every_member_in_one_diff() {
    let server = server_with_window(LONG_WINDOW).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    assert_eq!(count_of(&alice.join("lobby").await), 1);
    assert_eq!(count_of(&bob.join("lobby").await), 2);

    for client in [&mut alice, &mut bob] {
        let diff = client.next_diff("lobby").await;
        assert_eq!(diff.joined, users(&["alice", "bob"]));
        assert_eq!(diff.left, users(&[]));
        assert_eq!(diff.count, 2);
        client.expect_nothing_queued().await;
    }
}

#[tokio::test]
async fn leaving_and_disconnecting_reach_the_others_with_the_new_count() {
    let server = TestServer::start_with(common::presence_on).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let mut carol = server.connect("carol").await;
    for client in [&mut alice, &mut bob, &mut carol] {
        client.join("lobby").await;
    }
    alice.diff_listing("lobby", "carol", true).await;
    let ack = bob.request(json!({"type": "leave", "room": "lobby"})).await;
    assert_eq!(count_of(&ack), 2);
    let diff = alice.diff_listing("lobby", "bob", false).await;
    assert_eq!((diff.joined, diff.count), (users(&[]), 2));

    drop(carol);
    let diff = alice.diff_listing("lobby", "carol", false).await;
    assert_eq!((diff.joined, diff.count), (users(&[]), 1));
}

#[tokio::test]
async fn a_user_who_joins_and_leaves_within_one_window_is_listed_once_as_left() {
    let server = server_with_window(LONG_WINDOW).await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    alice.diff_listing("lobby", "alice", true).await;
    let mut bob = server.connect("bob").await;
    bob.join("lobby").await;
    bob.request(json!({"type": "leave", "room": "lobby"})).await;

    let diff = alice.next_diff("lobby").await;
    assert_eq!((diff.joined, diff.left), (users(&[]), users(&["bob"])));
    assert_eq!(diff.count, 1);
}

#[tokio::test]
async fn a_user_with_two_connections_is_one_member() {
    let server = TestServer::start_with(common::presence_on).await;
    let mut watcher = server.connect("watcher").await;
    watcher.join("r").await;
    watcher.diff_listing("r", "watcher", true).await;
    let mut tab1 = server.connect("alice").await;
    let mut tab2 = server.connect("alice").await;
    assert_eq!(count_of(&tab1.join("r").await), 2);
    assert_eq!(count_of(&tab2.join("r").await), 2);
    let joined = watcher.diff_listing("r", "alice", true).await;
    assert_eq!(joined.count, 2);
    // Her first tab leaving changes nothing; her last one does.
    tab1.request(json!({"type": "leave", "room": "r"})).await;
    tab2.request(json!({"type": "leave", "room": "r"})).await;
    let next = watcher.next_diff("r").await;
    assert_eq!((next.joined, next.left), (users(&[]), users(&["alice"])));
    assert_eq!(next.count, 1);
}

#[tokio::test]
async fn above_max_members_listed_a_diff_carries_only_the_count() {
    let server = TestServer::start_with(|c| {
        common::presence_on(c);
        c.presence.max_members_listed = 2;
    })
    .await;
    let mut alice = server.connect("alice").await;
    alice.join("r").await;
    let first = alice.next_diff("r").await;
    assert_eq!((first.joined, first.count), (users(&["alice"]), 1));
    let mut bob = server.connect("bob").await;
    let mut carol = server.connect("carol").await;
    bob.join("r").await;
    carol.join("r").await;
    let mut last = alice.next_diff("r").await;
    while last.count < 3 {
        last = alice.next_diff("r").await;
    }
    assert_eq!((last.joined, last.left), (None, None));
}

#[tokio::test]
async fn rooms_matching_a_presence_off_pattern_send_no_diff() {
    let server = TestServer::start_with(|c| {
        common::presence_on(c);
        c.presence.off = vec!["live-*".into()];
    })
    .await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    for client in [&mut alice, &mut bob] {
        client.join("live-final").await;
        client.join("chat").await;
    }
    // Presence in `chat` proves the window has passed; nothing of `live-final` came before.
    let diff = alice.diff_listing("chat", "bob", true).await;
    assert_eq!(diff.room, "chat");
    bob.request(json!({"type": "leave", "room": "live-final"}))
        .await;
    bob.request(json!({"type": "leave", "room": "chat"})).await;
    let next = alice.next_diff("chat").await;
    assert_eq!(next.left, users(&["bob"]));
    alice.expect_nothing_queued().await;
}

#[tokio::test]
async fn publish_reaches_every_member_and_echoes_to_the_sender_by_default() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let mut outsider = server.connect("outsider").await;
    alice.join("r").await;
    bob.join("r").await;

    let ack = alice
        .request(json!({"type": "publish", "room": "r", "content": {"n": 1}}))
        .await;
    let ServerEvent::Ack(ack) = ack else {
        panic!("{ack:?}")
    };
    for client in [&mut alice, &mut bob] {
        let event = client.next_event().await;
        let ServerEvent::Message(message) = &event else {
            panic!("{event:?}")
        };
        assert_eq!(message.room.as_deref(), Some("r"));
        assert_eq!(message.from, "alice");
        assert_eq!(Some(&message.id), ack.id.as_ref());
        assert_eq!(content_of(&event), json!({"n": 1}));
    }
    // The outsider got nothing: its next event is the answer to its own ping.
    let pong = outsider.request(json!({"type": "ping"})).await;
    assert!(matches!(pong, ServerEvent::Pong(_)));
}

#[tokio::test]
async fn publish_without_echo_skips_only_the_sending_connection() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut alice_tab = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    for client in [&mut alice, &mut alice_tab, &mut bob] {
        client.join("r").await;
    }
    alice
        .send_json(json!({"type": "publish", "room": "r", "content": "quiet", "echo": false}))
        .await;
    alice
        .send_json(json!({"type": "publish", "room": "r", "content": "loud", "echo": true}))
        .await;
    // The sender's first message event is the echoed one, so the quiet one never came back.
    let first = alice
        .next_matching(|e| matches!(e, ServerEvent::Message(_)))
        .await;
    assert_eq!(content_of(&first), json!("loud"));
    for client in [&mut alice_tab, &mut bob] {
        let first = client
            .next_matching(|e| matches!(e, ServerEvent::Message(_)))
            .await;
        assert_eq!(content_of(&first), json!("quiet"));
    }
}

#[tokio::test]
async fn members_lists_users_and_count() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("r").await;
    bob.join("r").await;
    let members = alice.request(json!({"type": "members", "room": "r"})).await;
    let ServerEvent::Members(members) = members else {
        panic!("{members:?}")
    };
    assert_eq!(members.count, 2);
    assert_eq!(members.users, ["alice", "bob"]);
    let empty = alice
        .request(json!({"type": "members", "room": "nobody"}))
        .await;
    assert!(matches!(empty, ServerEvent::Members(m) if m.count == 0 && m.users.is_empty()));
}

#[tokio::test]
async fn members_pages_follow_the_next_cursor_to_the_last_user() {
    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for name in ["dan", "alice", "erin", "bob", "carol"] {
        let mut client = server.connect(name).await;
        client.join("r").await;
        clients.push(client);
    }
    let asker = &mut clients[0];
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut request = json!({"type": "members", "room": "r", "limit": 2});
        if let Some(after) = &after {
            request["after"] = json!(after);
        }
        let ServerEvent::Members(page) = asker.request(request).await else {
            panic!("members expected")
        };
        pages += 1;
        assert_eq!(page.count, 5);
        assert!(page.users.len() <= 2);
        listed.extend(page.users);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(listed, ["alice", "bob", "carol", "dan", "erin"]);
    let refused = asker
        .request(json!({"type": "members", "room": "r", "limit": 0}))
        .await;
    assert!(
        matches!(&refused, ServerEvent::Error(e) if e.code == ErrorCode::InvalidField),
        "{refused:?}"
    );
}

#[tokio::test]
async fn rooms_can_be_joined_at_connect_by_query_and_by_path() {
    let server = TestServer::start().await;
    let token = server.token("alice");
    let mut alice =
        Client::open(&server.url(&format!("/ws/lobby?token={token}&rooms=news,sport"))).await;
    let members = alice
        .request(json!({"type": "members", "room": "lobby"}))
        .await;
    assert!(matches!(members, ServerEvent::Members(m) if m.users == ["alice"]));
    for room in ["news", "sport"] {
        let members = alice
            .request(json!({"type": "members", "room": room}))
            .await;
        assert!(
            matches!(members, ServerEvent::Members(m) if m.users == ["alice"]),
            "{room}"
        );
    }
    // Already a member: publishing works without a join.
    let ack = alice
        .request(json!({"type": "publish", "room": "sport", "content": 1}))
        .await;
    assert!(matches!(ack, ServerEvent::Ack(_)), "{ack:?}");
}

#[tokio::test]
async fn publishing_or_leaving_a_room_not_joined_is_an_error() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let error = alice
        .request(json!({"type": "publish", "room": "r", "content": 1}))
        .await;
    assert!(
        matches!(&error, ServerEvent::Error(e) if e.code == ErrorCode::NotMember),
        "{error:?}"
    );
    let error = alice.request(json!({"type": "leave", "room": "r"})).await;
    assert!(
        matches!(&error, ServerEvent::Error(e) if e.code == ErrorCode::NotMember),
        "{error:?}"
    );
}

#[tokio::test]
async fn rooms_per_connection_are_limited() {
    let server = TestServer::start_with(|c| c.limits.max_rooms_per_connection = 2).await;
    let mut alice = server.connect("alice").await;
    alice.join("a").await;
    alice.join("b").await;
    let error = alice.join("c").await;
    assert!(
        matches!(&error, ServerEvent::Error(e) if e.code == ErrorCode::LimitExceeded),
        "{error:?}"
    );
    // Rejoining a room already joined is not a new room.
    assert!(matches!(alice.join("a").await, ServerEvent::Ack(_)));
}

#[tokio::test]
async fn broadcast_is_refused_without_admin_and_reaches_everyone_with_it() {
    let server = TestServer::start().await;
    let mut user = server.connect("user").await;
    let mut admin = server.connect_with("root", true, None).await;
    let mut other = server.connect("other").await;

    let refused = user
        .request(json!({"type": "broadcast", "content": "x"}))
        .await;
    assert!(
        matches!(&refused, ServerEvent::Error(e) if e.code == ErrorCode::Forbidden),
        "{refused:?}"
    );

    let ack = admin
        .request(json!({"type": "broadcast", "content": "maintenance at noon"}))
        .await;
    assert!(matches!(ack, ServerEvent::Ack(_)));
    for client in [&mut user, &mut other, &mut admin] {
        let event = client
            .next_matching(|e| matches!(e, ServerEvent::Message(_)))
            .await;
        assert_eq!(content_of(&event), json!("maintenance at noon"));
        let ServerEvent::Message(message) = event else {
            unreachable!()
        };
        assert_eq!(message.from, "root");
        assert!(message.room.is_none() && message.to.is_none());
    }
}

#[tokio::test]
async fn presence_tells_which_users_are_online() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let bob = server.connect("bob").await;
    let answer = alice
        .request(json!({"type": "presence", "users": ["bob", "carol"]}))
        .await;
    let ServerEvent::Presence(reply) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(reply.online.get("bob"), Some(&true));
    assert_eq!(reply.online.get("carol"), Some(&false));
    drop(bob);
    // Once bob's connection is cleaned up he is offline; poll the event, not the clock.
    loop {
        let answer = alice
            .request(json!({"type": "presence", "users": ["bob"]}))
            .await;
        let ServerEvent::Presence(reply) = answer else {
            panic!("{answer:?}")
        };
        if reply.online.get("bob") == Some(&false) {
            break;
        }
        tokio::task::yield_now().await;
    }
    let error = alice
        .request(json!({"type": "presence", "users": []}))
        .await;
    assert!(
        matches!(&error, ServerEvent::Error(e) if e.code == ErrorCode::InvalidField),
        "{error:?}"
    );
}

/// Joins that race a stream of publishes each get a position after which every message
/// reaches them live, in order: no gap (which a position read before the joiner was in the
/// room would leave) and no duplicate. A message stored while the join was under way may also
/// arrive, at or below the position. Joins of one room share their position reads, so this
/// proves that a shared read never started before a joiner that uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_racing_publishes_each_get_a_position_followed_live_without_a_gap() {
    const MESSAGES: u64 = 300;
    const JOINERS: usize = 40;
    let server = TestServer::start_with(|c| {
        c.limits.messages_per_second = 100_000;
        c.limits.burst = 100_000;
    })
    .await;
    let mut publisher = server.connect("publisher").await;
    publisher.join("stage").await;
    let mut joiners = Vec::new();
    for n in 0..JOINERS {
        joiners.push(server.connect(&format!("joiner{n}")).await);
    }
    for k in 0..MESSAGES {
        publisher
            .send_json(json!({"type": "publish", "room": "stage", "content": k}))
            .await;
    }
    let joins = joiners.into_iter().map(|mut joiner| async move {
        let position = match joiner.join("stage").await {
            ServerEvent::Ack(ack) => ack.offset.expect("a join names the room's offset"),
            other => panic!("expected the join's ack, got {other:?}"),
        };
        let mut next = position + 1;
        while next <= MESSAGES {
            let offset = joiner.next_message_event().await.offset.unwrap();
            if offset <= position && next == position + 1 {
                continue;
            }
            assert_eq!(offset, next, "after position {position}");
            next += 1;
        }
        // Nothing else is queued, except, when no live message came after the ack (the join
        // read the last position), a message stored while the join was under way.
        let no_live_message = next == position + 1;
        joiner
            .expect_nothing_queued_but(|event| {
                matches!(event, ServerEvent::Message(message)
                    if no_live_message && message.offset.unwrap() <= position)
            })
            .await;
        position
    });
    let positions = futures::future::join_all(joins).await;
    assert!(positions.iter().all(|p| *p <= MESSAGES), "{positions:?}");
}
