//! The Rust client against a real in-process Herald server, including a server restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herald_client::{Client, ClientError, ClientOptions, Event, Roster, State};
use herald_server::config::Config;
use herald_server::node::Node;
use herald_server::{embedded_node, server};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SECRET: &str = "client-test-secret-0123456789";
const WAIT: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    node: Arc<Node>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    /// The server's data folder (`store.path`), removed with it.
    _data: tempfile::TempDir,
}

async fn start(addr: SocketAddr) -> Running {
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.server.listen = addr;
    config.auth.secret = Some(SECRET.into());
    config.store.path = data.path().to_owned();
    let node = embedded_node(config, None).unwrap();
    let listener = server::bind(addr).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::run(listener, node.clone(), async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        node,
        stop,
        task,
        _data: data,
    }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }

    /// Stops the server and waits until `client` is reconnecting.
    async fn stop_under(self, client: &Client) {
        let mut state = client.state();
        self.stop().await;
        state
            .wait_for(|s| matches!(s, State::Reconnecting { .. }))
            .await
            .unwrap();
    }

    fn options(&self, user: &str) -> ClientOptions {
        let node = self.node.clone();
        let user = user.to_owned();
        let mut options = ClientOptions::with_token_fn(move || {
            let token = node
                .auth()
                .mint(&user, false, None, Duration::from_secs(3600));
            async move { token.map_err(|e| e.to_string()) }
        });
        options.initial_backoff = Duration::from_millis(20);
        options.max_backoff = Duration::from_millis(200);
        options
    }

    async fn client(&self, user: &str) -> Client {
        Client::connect(&format!("ws://{}/ws", self.addr), self.options(user))
            .await
            .unwrap()
    }
}

async fn next_message(client: &mut Client) -> herald_protocol::Message {
    loop {
        match tokio::time::timeout(WAIT, client.next_event())
            .await
            .unwrap()
        {
            Some(Event::Message(message)) => return message,
            Some(_) => continue,
            None => panic!("client closed"),
        }
    }
}

/// Applies the room's presence events to `roster` until `done` holds.
async fn follow(
    client: &mut Client,
    room: &str,
    roster: &mut Roster,
    done: impl Fn(&Roster) -> bool,
) {
    while !done(roster) {
        match tokio::time::timeout(WAIT, client.next_event())
            .await
            .unwrap()
        {
            Some(Event::Presence(diff)) if diff.room == room => roster.apply(&diff),
            Some(_) => continue,
            None => panic!("client closed"),
        }
    }
}

#[tokio::test]
async fn a_roster_follows_a_room_through_presence_diffs() {
    let server = start("127.0.0.1:0".parse().unwrap()).await;
    let mut alice = server.client("alice").await;
    let bob = server.client("bob").await;
    alice.join("room").await.unwrap();
    let mut roster = Roster::from_members(&alice.members("room").await.unwrap());
    bob.join("room").await.unwrap();
    let both = |r: &Roster| r.count() == 2 && r.users().is_some_and(|u| u.len() == 2);
    follow(&mut alice, "room", &mut roster, both).await;
    assert!(roster.users().unwrap().contains("bob"));

    bob.leave("room").await.unwrap();
    let alone = |r: &Roster| r.count() == 1 && r.users().is_some_and(|u| !u.contains("bob"));
    follow(&mut alice, "room", &mut roster, alone).await;
    assert_eq!(roster.users().unwrap().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn requests_resolve_with_their_answers_and_errors() {
    let server = start("127.0.0.1:0".parse().unwrap()).await;
    let alice = server.client("alice").await;
    let mut bob = server.client("bob").await;

    let ack = alice.send(&["bob"], json!({"text": "hi"})).await.unwrap();
    assert_eq!(ack.online.unwrap(), ["bob"]);
    let message = next_message(&mut bob).await;
    assert_eq!(message.from, "alice");

    let ack = alice.join("room").await.unwrap();
    assert_eq!(ack.count, Some(1));
    let members = alice.members("room").await.unwrap();
    assert_eq!(members.users, ["alice"]);
    let refused = alice.publish("elsewhere", json!(1)).await.unwrap_err();
    assert!(
        matches!(refused, ClientError::Server { ref code, .. } if code == "not_member"),
        "{refused:?}"
    );
    alice.close().await;
    bob.close().await;
    server.stop().await;
}

#[tokio::test]
async fn after_a_server_restart_the_client_reconnects_and_rejoins_its_rooms() {
    let first = start("127.0.0.1:0".parse().unwrap()).await;
    let addr = first.addr;
    let mut alice = first.client("alice").await;
    alice.join("lobby").await.unwrap();
    first.stop_under(&alice).await;

    let second = start(addr).await;
    let rejoined = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Event::Rejoined { room, .. }) = alice.next_event().await {
                return room;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(rejoined, "lobby");
    let bob = second.client("bob").await;
    bob.join("lobby").await.unwrap();
    bob.publish("lobby", json!("after restart")).await.unwrap();
    let message = next_message(&mut alice).await;
    assert_eq!(message.content.unwrap().get(), "\"after restart\"");
    alice.close().await;
    bob.close().await;
    second.stop().await;
}

#[tokio::test]
async fn joins_and_leaves_made_offline_give_one_join_per_room_and_no_rejoin_of_a_room_left() {
    let first = start("127.0.0.1:0".parse().unwrap()).await;
    let addr = first.addr;
    let mut alice = first.client("alice").await;
    alice.join("kept").await.unwrap();
    alice.join("gone").await.unwrap();
    first.stop_under(&alice).await;

    // Queued while the server is down; the server comes back after they are.
    let (kept, gone, second) = tokio::join!(
        alice.request(json!({"type": "join", "room": "kept", "since": 0})),
        alice.leave("gone"),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            start(addr).await
        },
    );
    match kept.unwrap() {
        herald_protocol::ServerEvent::Ack(ack) => assert_eq!(ack.room.as_deref(), Some("kept")),
        other => panic!("expected an ack, got {other:?}"),
    }
    assert_eq!(gone.unwrap().room.as_deref(), Some("gone"));
    // The server answers in order: by now every rejoin's answer has been read.
    assert_eq!(alice.members("kept").await.unwrap().users, ["alice"]);
    assert!(alice.members("gone").await.unwrap().users.is_empty());
    let mut rejoined = Vec::new();
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(200), alice.next_event()).await
    {
        match event {
            Event::Rejoined { room, .. } => rejoined.push(room),
            Event::Error(error) => panic!("error event: {error:?}"),
            _ => {}
        }
    }
    assert_eq!(rejoined, ["kept"], "one rejoin, none for the room left");
    alice.close().await;
    second.stop().await;
}

/// The server restarts with a fresh data folder, so the room's stream starts again at offset 1
/// with a new epoch, and gets more messages than Alice had seen before she is back. Her old
/// offset then points into the new stream: without the epoch the server would replay only what
/// lies above it, and she would silently miss the new messages below it.
async fn a_rejoin_into_a_recreated_stream_is_reported(messages_before_join: usize) {
    let first = start("127.0.0.1:0".parse().unwrap()).await;
    let addr = first.addr;
    // While held back, Alice's token function fails, so she keeps retrying without connecting.
    let held_back = Arc::new(AtomicBool::new(false));
    let mut options = first.options("alice");
    let token = options.token.clone();
    let gate = held_back.clone();
    options.token = Arc::new(move || {
        let token = token.clone();
        let gate = gate.clone();
        Box::pin(async move {
            if gate.load(Ordering::SeqCst) {
                return Err("held back until the new stream has passed her offset".into());
            }
            token().await
        })
    });
    let mut alice = Client::connect(&format!("ws://{addr}/ws"), options)
        .await
        .unwrap();
    let bob = first.client("bob").await;
    bob.join("room").await.unwrap();
    for n in 0..messages_before_join {
        bob.publish("room", json!(format!("old {n}")))
            .await
            .unwrap();
    }
    alice.join("room").await.unwrap();
    for n in 0..3 {
        bob.publish("room", json!(format!("old {n}")))
            .await
            .unwrap();
    }
    bob.publish("room", json!("old last")).await.unwrap();
    while content(&next_message(&mut alice).await) != "old last" {}
    // Give an epoch lookup the client may make a moment to be answered.
    alice.request(json!({"type": "ping"})).await.unwrap();

    held_back.store(true, Ordering::SeqCst);
    bob.close().await;
    first.stop_under(&alice).await;
    let second = start(addr).await;
    let bob = second.client("bob").await;
    bob.join("room").await.unwrap();
    let fresh: Vec<String> = (1..=messages_before_join + 6)
        .map(|n| format!("new {n}"))
        .collect();
    for message in &fresh {
        bob.publish("room", json!(message)).await.unwrap();
    }

    held_back.store(false, Ordering::SeqCst);
    let recovered = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Event::Rejoined { room, recovered }) = alice.next_event().await {
                assert_eq!(room, "room");
                return recovered;
            }
        }
    })
    .await
    .unwrap();
    bob.publish("room", json!("end")).await.unwrap();
    let mut received = Vec::new();
    loop {
        let message = content(&next_message(&mut alice).await);
        if message == "end" {
            break;
        }
        received.push(message);
    }
    let missing: Vec<&String> = fresh.iter().filter(|m| !received.contains(m)).collect();
    assert!(
        recovered == Some(false) || missing.is_empty(),
        "recovered: {recovered:?}, yet missed {missing:?}"
    );
    // The client knew the old stream's epoch (from the join's ack, or looked up once the first
    // message came), so the server could tell the streams apart.
    assert_eq!(recovered, Some(false), "the recreated stream is reported");
    assert!(missing.is_empty(), "the page holds the new messages");
    alice.close().await;
    bob.close().await;
    second.stop().await;
}

fn content(message: &herald_protocol::Message) -> String {
    let content = message.content.as_ref().expect("a JSON message");
    serde_json::from_str(content.get()).unwrap()
}

#[tokio::test]
async fn a_rejoin_into_a_recreated_stream_of_a_room_that_had_messages_is_reported() {
    a_rejoin_into_a_recreated_stream_is_reported(2).await;
}

#[tokio::test]
async fn a_rejoin_into_a_recreated_stream_of_a_room_joined_empty_is_reported() {
    a_rejoin_into_a_recreated_stream_is_reported(0).await;
}

/// A TCP relay between the client and the server that can hold back the server's frames and
/// cut the connections it carries, so that a request reaches the server while its answer is
/// lost with the connection.
struct Relay {
    addr: SocketAddr,
    /// While set, bytes from the server are dropped.
    mute: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mute = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (muted, cutting) = (mute.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                let (mut client_read, mut client_write) = inbound.into_split();
                let (mut server_read, mut server_write) = outbound.into_split();
                let (muted, cutting) = (muted.clone(), cutting.clone());
                tokio::spawn(async move {
                    let upstream = tokio::io::copy(&mut client_read, &mut server_write);
                    let downstream = async {
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            let read = server_read.read(&mut buffer).await?;
                            if read == 0 {
                                return std::io::Result::Ok(());
                            }
                            if !muted.load(Ordering::SeqCst) {
                                client_write.write_all(&buffer[..read]).await?;
                            }
                        }
                    };
                    tokio::select! {
                        _ = upstream => {}
                        _ = downstream => {}
                        _ = cutting.notified() => {}
                    }
                });
            }
        });
        Relay { addr, mute, cut }
    }
}

#[tokio::test]
async fn a_publish_whose_ack_is_lost_with_the_connection_is_retried_and_stored_once() {
    let server = start("127.0.0.1:0".parse().unwrap()).await;
    let relay = Relay::start(server.addr).await;
    let alice = Client::connect(&format!("ws://{}/ws", relay.addr), server.options("alice"))
        .await
        .unwrap();
    alice.join("lobby").await.unwrap();
    let mut bob = server.client("bob").await;
    bob.join("lobby").await.unwrap();

    relay.mute.store(true, Ordering::SeqCst);
    let publishing = tokio::spawn(async move {
        let ack = alice.publish("lobby", json!("once")).await;
        (alice, ack)
    });
    // Stored and delivered: only its ack is missing.
    let delivered = next_message(&mut bob).await;
    relay.mute.store(false, Ordering::SeqCst);
    relay.cut.notify_waiters();

    let (alice, ack) = tokio::time::timeout(WAIT, publishing)
        .await
        .unwrap()
        .unwrap();
    let ack = ack.expect("the retry is answered with the first attempt's ack");
    assert_eq!(ack.id.as_deref(), Some(delivered.id.as_str()));
    let page = server.node.room_history("lobby", None, None).await.unwrap();
    assert_eq!(page.messages.len(), 1, "stored once");
    alice.close().await;
    bob.close().await;
    server.stop().await;
}
