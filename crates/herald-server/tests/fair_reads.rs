//! Fair database reads: clients that loop the heaviest reads a client can ask for (`join` with
//! `since=0` into a room of thousands of stored messages, `history` at its largest page) do not
//! hold up another user's inbox at connect, `join` with recovery and `history`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Client, TestServer, reference_of};
use futures::SinkExt;
use herald_protocol::ServerEvent;
use herald_server::config::Synchronous;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Messages stored in the room the abusers read: more than `store.max_recovery`, so each of
/// their joins reads a first page from the oldest, finds the gap too long and sends the newest
/// page instead. The oldest are large and the newest small: each join costs the store a page of
/// large rows and the connection little, so the readers are what the abusers use up.
const STORED_LARGE: u64 = 2000;
const STORED_SMALL: u64 = 200;
/// Clients looping heavy reads, each as its own user.
const ABUSERS: usize = 64;
/// Bytes of each large message's content.
const LARGE_BYTES: usize = 8 * 1024;
/// How long the inbox at connect (a light read) may take while the abusers run: generous for
/// a loaded 2-core machine running a debug build (54–157 ms there), where reads that queued
/// behind every heavy one took 1.9 s.
const LIGHT_BOUND: Duration = Duration::from_millis(750);
/// How long the join with recovery and the history page (heavy reads, each waiting for about
/// a page per abuser) may take. On that machine they took 0.15–1.2 s, and 0.8–1.2 s when the
/// abusers' pages were five times larger: this bound shows they stay bounded, while the light
/// bound is the one that tells fair reads from unfair ones.
const HEAVY_BOUND: Duration = Duration::from_secs(3);

async fn server() -> TestServer {
    TestServer::start_with(|config| {
        config.limits.messages_per_second = 10_000_000;
        config.limits.burst = 10_000_000;
        config.store.synchronous = Synchronous::Normal;
    })
    .await
}

/// Sends `value` with `id` and reads until its answer, dropping everything else (replayed and
/// live messages): an abuser takes what it asked for so that it is never a slow consumer.
async fn request_discarding(client: &mut Client, mut value: Value, id: &str) -> ServerEvent {
    value["id"] = json!(id);
    client.send_json(value).await;
    loop {
        let event = client.next_event().await;
        if reference_of(&event) == Some(id) {
            return event;
        }
    }
}

/// Stores `count` messages in `room` from `client` (already a member), pipelined, and returns
/// once all are committed.
async fn fill(client: &mut Client, room: &str, count: u64, content: &str) {
    let content = json!(content);
    for _ in 0..count {
        // Without an `id` nor an echo, nothing comes back: nothing queues up for the sender.
        let request = json!({"type": "publish", "room": room, "content": content, "echo": false});
        client
            .ws
            .feed(WsMessage::text(request.to_string()))
            .await
            .unwrap();
    }
    client.ws.flush().await.unwrap();
    // Answered in order: after every publish before it has committed.
    let last = json!({"type": "publish", "room": room, "content": content});
    assert!(matches!(
        request_discarding(client, last, "filled").await,
        ServerEvent::Ack(_)
    ));
}

/// Loops `join` with `since: 0`, `leave` and the largest `history` page until `stop`.
async fn abuse(server: &TestServer, n: usize, stop: Arc<AtomicBool>, rounds: watch::Sender<u64>) {
    let mut client = server.connect(&format!("abuser{n}")).await;
    while !stop.load(Ordering::Relaxed) {
        let join = json!({"type": "join", "room": "big", "since": 0});
        let joined = request_discarding(&mut client, join, "join").await;
        assert!(matches!(joined, ServerEvent::Ack(_)), "{joined:?}");
        let leave = json!({"type": "leave", "room": "big"});
        request_discarding(&mut client, leave, "leave").await;
        let history = json!({"type": "history", "room": "big", "limit": 100});
        let page = request_discarding(&mut client, history, "history").await;
        assert!(matches!(page, ServerEvent::History(_)), "{page:?}");
        rounds.send_modify(|done| *done += 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_looping_heavy_reads_do_not_hold_up_another_users_reads() {
    let server = server().await;
    let mut filler = server.connect("filler").await;
    filler.join("big").await;
    fill(&mut filler, "big", STORED_LARGE, &"x".repeat(LARGE_BYTES)).await;
    fill(&mut filler, "big", STORED_SMALL, "small").await;

    // carol: a room she left with 10 messages missed since, and 5 direct messages waiting.
    let mut carol = server.connect("carol").await;
    let ServerEvent::Ack(joined) = carol.join("quiet").await else {
        panic!("carol joins quiet")
    };
    let since = joined.offset.expect("a join's ack has the room's offset");
    let epoch = joined.epoch;
    drop(carol);
    filler.join("quiet").await;
    fill(&mut filler, "quiet", 10, "missed").await;
    for n in 0..5 {
        filler
            .ack(json!({"type": "send", "to": ["carol"], "content": n}))
            .await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (rounds, mut done) = watch::channel(0u64);
    let server = Arc::new(server);
    let abusers: Vec<_> = (0..ABUSERS)
        .map(|n| {
            let (server, stop, rounds) = (server.clone(), stop.clone(), rounds.clone());
            tokio::spawn(async move { abuse(&server, n, stop, rounds).await })
        })
        .collect();
    // The abusers are all looping before carol starts.
    done.wait_for(|done| *done >= 2 * ABUSERS as u64)
        .await
        .unwrap();
    let before = *done.borrow();

    let started = Instant::now();
    let mut carol = server.connect("carol").await;
    for n in 0..5 {
        let ServerEvent::Message(message) = carol.next_event().await else {
            panic!("an inbox message")
        };
        assert_eq!(common::content_json(&message), json!(n));
    }
    let inbox = started.elapsed();

    let started = Instant::now();
    let ServerEvent::Ack(ack) = carol
        .request(json!({"type": "join", "room": "quiet", "since": since, "epoch": epoch}))
        .await
    else {
        panic!("carol rejoins quiet")
    };
    assert_eq!(ack.recovered, Some(true));
    for _ in 0..10 {
        assert!(matches!(carol.next_event().await, ServerEvent::Message(_)));
    }
    let recovery = started.elapsed();

    let started = Instant::now();
    let page = carol.history(json!({"room": "quiet", "limit": 10})).await;
    assert_eq!(page.messages.len(), 10);
    let history = started.elapsed();

    let during = *done.borrow() - before;
    stop.store(true, Ordering::Relaxed);
    for abuser in abusers {
        abuser.await.unwrap();
    }
    eprintln!(
        "inbox {inbox:?}, join with recovery {recovery:?}, history {history:?}, {during} abuser rounds meanwhile"
    );
    assert!(during > 0, "the abusers kept reading");
    assert!(inbox < LIGHT_BOUND, "connect with inbox took {inbox:?}");
    assert!(
        recovery < HEAVY_BOUND,
        "join with recovery took {recovery:?}"
    );
    assert!(history < HEAVY_BOUND, "history took {history:?}");
}
