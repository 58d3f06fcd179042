//! The server API under `/api/`, over real HTTP: keys, validation, and each endpoint's effect on
//! real WebSocket clients.

mod common;

use common::{API_KEY, TestServer, content_of};
use herald_protocol::ServerEvent;
use herald_server::http::ENDPOINTS;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A path with its parameters filled in, so it can be requested.
fn concrete(path: &str) -> String {
    path.replace("{room}", "lobby")
        .replace("{user}", "alice")
        .replace("{other}", "bob")
        .replace("{id}", "0000000000000001")
}

#[tokio::test]
async fn every_api_endpoint_refuses_a_missing_or_wrong_key_with_401_json() {
    let server = TestServer::start().await;
    for endpoint in ENDPOINTS.iter().filter(|e| e.needs_api_key) {
        let path = concrete(endpoint.path);
        let method = endpoint.method.as_str();
        for key in [None, Some("wrong-key-0123456789"), Some("")] {
            let reply = server.http(method, &path, Some("{}".into()), key).await;
            assert_eq!(reply.status, 401, "{method} {path} with {key:?}");
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
            let body: Value = serde_json::from_str(&reply.body).unwrap();
            assert!(body["error"].is_string(), "{body}");
            assert_eq!(body["field"], "Authorization");
        }
    }
}

#[tokio::test]
async fn the_api_is_off_while_no_keys_are_configured() {
    let server = TestServer::start_with(|config| config.api.keys.clear()).await;
    let (status, body) = server
        .api("POST", "/api/broadcast", Some(json!({"content": 1})))
        .await;
    assert_eq!(status, 401);
    assert!(
        body["error"].as_str().unwrap().contains("api.keys"),
        "{body}"
    );
}

#[tokio::test]
async fn publish_reaches_every_member_of_the_room() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let mut outsider = server.connect("carol").await;
    alice.join("lobby").await;
    bob.join("lobby").await;

    let (status, body) = server
        .api(
            "POST",
            "/api/publish",
            Some(json!({"room": "lobby", "content": {"text": "deploy done"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for client in [&mut alice, &mut bob] {
        let event = client
            .next_matching(|e| matches!(e, ServerEvent::Message(_)))
            .await;
        let ServerEvent::Message(message) = &event else {
            unreachable!()
        };
        assert_eq!(message.room.as_deref(), Some("lobby"));
        assert_eq!(message.from, "server");
        assert_eq!(body["id"], message.id.as_str());
        assert_eq!(content_of(&event), json!({"text": "deploy done"}));
    }
    // Not a member: the next thing the outsider sees is its own pong.
    let pong = outsider.request(json!({"type": "ping"})).await;
    assert!(matches!(pong, ServerEvent::Pong(_)), "{pong:?}");
}

#[tokio::test]
async fn publish_refuses_bad_fields_naming_each() {
    let server = TestServer::start_with(|config| config.limits.max_message_bytes = 64).await;
    let cases = [
        (json!({"content": 1}), 400, "room"),
        (json!({"room": 5, "content": 1}), 400, "room"),
        (json!({"room": "a b", "content": 1}), 400, "room"),
        (json!({"room": "lobby"}), 400, "content"),
        (json!({"room": "lobby", "content": null}), 400, "content"),
        (
            json!({"room": "lobby", "content": "x".repeat(100)}),
            413,
            "content",
        ),
        (
            json!({"room": "lobby", "content": 1, "from": ""}),
            400,
            "from",
        ),
        (json!({"room": "lobby", "contnet": 1}), 400, "contnet"),
    ];
    for (body, expected_status, field) in cases {
        let (status, answer) = server.api("POST", "/api/publish", Some(body.clone())).await;
        assert_eq!(status, expected_status, "{body} -> {answer}");
        assert_eq!(answer["field"], field, "{body} -> {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(field),
            "{answer}"
        );
    }
}

#[tokio::test]
async fn malformed_empty_and_oversized_bodies_are_refused_with_json() {
    let server = TestServer::start_with(|config| config.api.max_body_bytes = 1024).await;
    for (body, expected_error) in [
        ("{\"room\": ", "not a valid JSON object"),
        ("[\"lobby\", 1]", "must be a JSON object"),
        ("", "body is empty"),
        (
            "{\"room\":\"r\",\"content\":1} trailing",
            "not a valid JSON object",
        ),
    ] {
        let reply = server
            .http("POST", "/api/publish", Some(body.into()), Some(API_KEY))
            .await;
        assert_eq!(reply.status, 400, "{body:?}: {}", reply.body);
        let answer: Value = serde_json::from_str(&reply.body).unwrap();
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(expected_error), "{body:?}: {error}");
    }
    let huge = json!({"room": "r", "content": "x".repeat(2000)}).to_string();
    let reply = server
        .http("POST", "/api/publish", Some(huge), Some(API_KEY))
        .await;
    assert_eq!(reply.status, 413, "{}", reply.body);
    assert!(reply.body.contains("api.max_body_bytes"), "{}", reply.body);
}

#[tokio::test]
async fn send_reaches_every_connection_of_each_recipient_and_names_the_offline() {
    let server = TestServer::start().await;
    let mut phone = server.connect("alice").await;
    let mut laptop = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let (status, body) = server
        .api(
            "POST",
            "/api/send",
            Some(json!({"to": ["alice", "bob", "ghost"], "content": "invoice ready", "from": "billing"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["online"], json!(["alice", "bob"]));
    assert_eq!(body["offline"], json!(["ghost"]));
    for client in [&mut phone, &mut laptop, &mut bob] {
        let event = client.next_event().await;
        let ServerEvent::Message(message) = &event else {
            panic!("{event:?}")
        };
        assert_eq!(message.from, "billing");
        assert_eq!(body["id"], message.id.as_str());
        assert_eq!(content_of(&event), json!("invoice ready"));
    }
}

#[tokio::test]
async fn send_refuses_bad_recipient_lists_naming_the_field() {
    let server = TestServer::start_with(|config| config.api.max_recipients = 2).await;
    let cases = [
        (json!({"content": 1}), "to"),
        (json!({"to": [], "content": 1}), "to"),
        (json!({"to": "alice", "content": 1}), "to"),
        (json!({"to": ["alice", 7], "content": 1}), "to[1]"),
        (json!({"to": ["alice", "b,c"], "content": 1}), "to[1]"),
        (json!({"to": ["a", "b", "c"], "content": 1}), "to"),
    ];
    for (body, field) in cases {
        let (status, answer) = server.api("POST", "/api/send", Some(body.clone())).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["field"], field, "{body} -> {answer}");
    }
}

#[tokio::test]
async fn broadcast_reaches_every_connection() {
    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for user in ["u1", "u2", "u3"] {
        clients.push(server.connect(user).await);
    }
    let (status, body) = server
        .api(
            "POST",
            "/api/broadcast",
            Some(json!({"content": {"maintenance": "22:00"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for client in &mut clients {
        let event = client.next_event().await;
        assert_eq!(content_of(&event), json!({"maintenance": "22:00"}));
    }
    let (status, body) = server.api("POST", "/api/broadcast", Some(json!({}))).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "content");
}

#[tokio::test]
async fn rooms_are_listed_with_member_counts_and_members_by_room() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut alice_again = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("team:a").await;
    alice_again.join("team:a").await;
    bob.join("team:a").await;
    bob.join("lobby").await;

    let (status, body) = server.api("GET", "/api/rooms", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"rooms": [{"room": "lobby", "count": 1}, {"room": "team:a", "count": 2}], "truncated": false})
    );
    let (_, body) = server.api("GET", "/api/rooms?prefix=team:", None).await;
    assert_eq!(body["rooms"], json!([{"room": "team:a", "count": 2}]));
    let (_, body) = server.api("GET", "/api/rooms?limit=1", None).await;
    assert_eq!(body["rooms"].as_array().unwrap().len(), 1);
    assert_eq!(body["truncated"], true);
    let (status, body) = server.api("GET", "/api/rooms?limit=0", None).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "limit");
    let (status, body) = server.api("GET", "/api/rooms?limit=many", None).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "limit");
    let (status, body) = server.api("GET", "/api/rooms?limt=5", None).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "limt");

    let (status, body) = server.api("GET", "/api/rooms/team:a/members", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"room": "team:a", "count": 2, "users": ["alice", "bob"]})
    );
    let (_, body) = server.api("GET", "/api/rooms/empty/members", None).await;
    assert_eq!(body, json!({"room": "empty", "count": 0, "users": []}));
    // A room name with a slash travels percent-encoded in one path segment.
    bob.join("a/b").await;
    let (_, body) = server.api("GET", "/api/rooms/a%2Fb/members", None).await;
    assert_eq!(body["users"], json!(["bob"]));
    let (status, body) = server.api("GET", "/api/rooms/a%20b/members", None).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "room");
}

#[tokio::test]
async fn user_status_shows_online_and_every_connection() {
    let server = TestServer::start().await;
    let phone = server.connect("alice").await;
    let laptop = server.connect("alice").await;
    let (status, body) = server.api("GET", "/api/users/alice", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"], "alice");
    assert_eq!(body["online"], true);
    let mut ids: Vec<&str> = body["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut expected = vec![phone.welcome.conn.as_str(), laptop.welcome.conn.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);

    let (_, body) = server.api("GET", "/api/users/nobody", None).await;
    assert_eq!(
        body,
        json!({"user": "nobody", "online": false, "connections": []})
    );
}

#[tokio::test]
async fn disconnect_closes_every_connection_of_the_user_with_the_code_and_reason() {
    let server = TestServer::start().await;
    let mut phone = server.connect("alice").await;
    let mut laptop = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let (status, _) = server
        .api(
            "POST",
            "/api/send",
            Some(json!({"to": ["alice"], "content": "you are suspended"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = server
        .api(
            "POST",
            "/api/users/alice/disconnect",
            Some(json!({"code": 4403, "reason": "account suspended"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["connections"], 2);
    for client in [&mut phone, &mut laptop] {
        // What was sent before the disconnect arrives before the close.
        let WsMessage::Text(text) = client.next_message().await else {
            panic!("expected the notice first")
        };
        assert!(text.contains("you are suspended"), "{text}");
        let frame = client.expect_close().await.expect("a close frame");
        assert_eq!(u16::from(frame.code), 4403);
        assert_eq!(frame.reason.as_str(), "account suspended");
    }
    let pong = bob.request(json!({"type": "ping"})).await;
    assert!(
        matches!(pong, ServerEvent::Pong(_)),
        "other users stay: {pong:?}"
    );
}

#[tokio::test]
async fn disconnect_defaults_to_kicked_and_checks_code_and_reason() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    for (body, field) in [
        (json!({"code": 1000}), "code"),
        (json!({"code": 5000}), "code"),
        (json!({"code": "x"}), "code"),
        (json!({"reason": "r".repeat(124)}), "reason"),
    ] {
        let (status, answer) = server
            .api("POST", "/api/users/alice/disconnect", Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["field"], field, "{answer}");
    }
    let reply = server
        .http("POST", "/api/users/alice/disconnect", None, Some(API_KEY))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let frame = alice.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 4400);
    assert_eq!(frame.reason.as_str(), "disconnected by the server");
}

#[tokio::test]
async fn connection_stats_count_messages_and_bytes_both_ways() {
    let server = TestServer::start().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut alice = server.connect("alice").await;
    let _bob = server.connect("bob").await;
    let join = json!({"type": "join", "room": "lobby", "id": "r1"}).to_string();
    alice.send_json(serde_json::from_str(&join).unwrap()).await;
    alice
        .next_matching(|e| matches!(e, ServerEvent::Ack(_)))
        .await;
    let ping = json!({"type": "ping", "id": "r2"}).to_string();
    alice.send_json(serde_json::from_str(&ping).unwrap()).await;
    let pong = alice.next_event().await;
    assert!(matches!(pong, ServerEvent::Pong(_)));

    let id = &alice.welcome.conn;
    let (status, stats) = server
        .api("GET", &format!("/api/connections/{id}"), None)
        .await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["id"], id.as_str());
    assert_eq!(stats["user"], "alice");
    assert_eq!(stats["node"], server.node.id().as_ref());
    assert_eq!(stats["rooms"], json!(["lobby"]));
    assert_eq!(stats["messages_in"], 2);
    assert_eq!(stats["bytes_in"], join.len() + ping.len());
    // welcome, join ack, pong
    assert_eq!(stats["messages_out"], 3);
    assert!(stats["bytes_out"].as_u64().unwrap() > 0);
    let connected_at = stats["connected_at"].as_u64().unwrap();
    assert!(connected_at >= before, "{connected_at} < {before}");

    let (_, list) = server.api("GET", "/api/connections?user=alice", None).await;
    let connections = list["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 1);
    assert_eq!(connections[0]["rooms"], json!(["lobby"]));
    let (_, list) = server.api("GET", "/api/connections", None).await;
    assert_eq!(list["connections"].as_array().unwrap().len(), 2);
    assert_eq!(list["truncated"], false);

    let (status, body) = server
        .api("GET", "/api/connections/00000000000000ff", None)
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.api("GET", "/api/connections/not-hex", None).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "id");
}

#[tokio::test]
async fn unknown_api_paths_and_wrong_methods_are_refused() {
    let server = TestServer::start().await;
    let (status, body) = server.api("GET", "/api/nothing/here", None).await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
    let reply = server
        .http("GET", "/api/publish", None, Some(API_KEY))
        .await;
    assert_eq!(reply.status, 405);
}

#[tokio::test]
async fn history_endpoints_page_through_rooms_and_conversations() {
    let server = TestServer::start().await;
    for n in 0..3 {
        let (status, _) = server
            .api(
                "POST",
                "/api/publish",
                Some(json!({"room": "lobby", "content": n})),
            )
            .await;
        assert_eq!(status, 200);
    }
    let (status, page) = server
        .api("GET", "/api/rooms/lobby/history?limit=2", None)
        .await;
    assert_eq!(status, 200, "{page}");
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(
        messages[0]["content"],
        json!(1),
        "oldest first, newest page"
    );
    assert_eq!(page["more"], json!(true));
    let before = messages[0]["offset"].as_u64().unwrap();
    let (_, older) = server
        .api(
            "GET",
            &format!("/api/rooms/lobby/history?before={before}"),
            None,
        )
        .await;
    assert_eq!(older["messages"][0]["content"], json!(0));
    assert_eq!(older["more"], json!(false));

    let mut alice = server.connect("alice").await;
    alice
        .request(json!({"type": "send", "to": ["bob"], "content": "hi bob"}))
        .await;
    let (status, page) = server
        .api("GET", "/api/conversations/bob/alice/history", None)
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"][0]["content"], json!("hi bob"));
    assert_eq!(page["messages"][0]["from"], json!("alice"));

    let (status, error) = server
        .api("GET", "/api/rooms/lobby/history?before=soon", None)
        .await;
    assert_eq!(status, 400);
    assert_eq!(error["field"], json!("before"));
    let (status, _) = server
        .api("GET", "/api/rooms/lobby/history?limit=0", None)
        .await;
    assert_eq!(status, 400);
}
