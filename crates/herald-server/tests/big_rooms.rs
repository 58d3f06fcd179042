//! Presence in big rooms: 10,000 users form one room and every member ends with the room's
//! count, and the paginated `members` lists all of them; a few hundred users, below
//! `presence.max_members_listed`, each derive the exact member list from the diffs.
//!
//! The 10k room runs the `herald` binary as its own process: a server and its clients in one
//! process would need 20,000 sockets, the hard open-file limit on the machines that run this.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use common::{Client, TestServer};
use futures::{StreamExt, stream};
use herald_protocol::{PresenceDiff, ServerEvent};
use herald_server::auth::Authenticator;
use herald_server::config::AuthConfig;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

const SECRET: &str = "big-room-secret-0123456789";

/// Handshakes in flight at once while the room forms.
const CONNECTING: usize = 64;

fn name(n: usize) -> String {
    format!("u{n:05}")
}

/// Applies diffs, in the order received, to the member list a client keeps.
fn apply(members: &mut BTreeSet<String>, diff: &PresenceDiff) {
    for user in diff.joined.iter().flatten() {
        members.insert(user.clone());
    }
    for user in diff.left.iter().flatten() {
        members.remove(user);
    }
}

/// Reads diffs of `room` until one has `count`; returns what the client saw.
async fn diffs_until_count(client: &mut Client, room: &str, count: u64) -> Vec<PresenceDiff> {
    let mut seen = Vec::new();
    loop {
        let diff = client.next_diff(room).await;
        let done = diff.count == count;
        seen.push(diff);
        if done {
            return seen;
        }
    }
}

/// Every page of `members`, in order.
async fn all_members(client: &mut Client, room: &str) -> Vec<String> {
    let mut users = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut request = json!({"type": "members", "room": room});
        if let Some(after) = &after {
            request["after"] = json!(after);
        }
        let ServerEvent::Members(page) = client.request(request).await else {
            panic!("members expected")
        };
        users.extend(page.users);
        match page.next {
            Some(next) => after = Some(next),
            None => return users,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_of_a_10k_room_ends_with_its_count_and_members_lists_them_all() {
    const MEMBERS: usize = 10_000;
    let data = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env_clear()
        .env("HERALD_AUTH_SECRET", SECRET)
        .env("HERALD_STORE_PATH", data.path())
        // The clients read nothing until the room has formed, so they answer no Ping before.
        .env("HERALD_HEARTBEAT_INTERVAL", "10m")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = common::process::wait_for_log(&mut log, |entry| entry["address"].is_string());
    let address = listening.await["address"].as_str().unwrap().to_owned();
    // The log pipe must keep draining, or a server that logs a lot would block on it.
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let auth = Authenticator::from_config(
        &AuthConfig {
            secret: Some(SECRET.into()),
            ..AuthConfig::default()
        },
        None,
    )
    .unwrap();

    // Each connection joins `big` at connect (`/ws/big`) and answers nothing until the end.
    let mut clients: Vec<Client> = stream::iter(0..MEMBERS)
        .map(|n| {
            let token = auth
                .mint(&name(n), false, None, Duration::from_secs(600))
                .unwrap();
            let url = format!("ws://{address}/ws/big?token={token}");
            async move { Client::open(&url).await }
        })
        .buffer_unordered(CONNECTING)
        .collect()
        .await;

    let every_member_done = stream::iter(clients.iter_mut())
        .map(|client| async move {
            let seen = diffs_until_count(client, "big", MEMBERS as u64).await;
            let last = seen.last().unwrap();
            // Above `presence.max_members_listed` (1,000 by default) only the count goes out.
            assert_eq!((&last.joined, &last.left), (&None, &None));
        })
        .buffer_unordered(CONNECTING)
        .count()
        .await;
    assert_eq!(every_member_done, MEMBERS);

    let listed = all_members(&mut clients[0], "big").await;
    let expected: Vec<String> = (0..MEMBERS).map(name).collect();
    assert_eq!(listed, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_max_members_listed_every_member_derives_the_exact_member_list() {
    const MEMBERS: usize = 300;
    let server = TestServer::start_with(|c| {
        common::presence_on(c);
        // The first members read nothing while the others join, so they answer no Ping.
        c.heartbeat.interval = Duration::from_secs(600);
    })
    .await;
    let mut clients = Vec::with_capacity(MEMBERS);
    // What docs/protocol.md tells a client to do: join, ask `members`, then apply every diff
    // received since the join (those that came before the answer too) in arrival order.
    for n in 0..MEMBERS {
        let mut client = server.connect(&name(n)).await;
        client.join("r").await;
        let members: BTreeSet<String> = all_members(&mut client, "r").await.into_iter().collect();
        clients.push((client, members));
    }
    let expected: BTreeSet<String> = (0..MEMBERS).map(name).collect();
    for (client, members) in &mut clients {
        loop {
            let diff = client.next_diff("r").await;
            apply(members, &diff);
            if diff.count == MEMBERS as u64 && *members == expected {
                break;
            }
        }
    }
}

/// Above `presence.max_members_listed` every diff is a frame to every member, so once a room's
/// diff has carried only the count, its next window is `presence.count_window`: two joins a
/// tenth of a second apart, more than `presence.window`, reach the members as one count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_members_listed_counts_are_gathered_over_the_count_window() {
    let server = TestServer::start_with(|c| {
        common::presence_on(c);
        c.presence.max_members_listed = 2;
        c.presence.count_window = Duration::from_secs(2);
    })
    .await;
    let mut watcher = server.connect(&name(0)).await;
    watcher.join("r").await;
    let mut others = Vec::new();
    for n in 1..3 {
        let mut client = server.connect(&name(n)).await;
        client.join("r").await;
        others.push(client);
    }
    let mut diff = watcher.next_diff("r").await;
    while diff.count < 3 {
        diff = watcher.next_diff("r").await;
    }
    assert_eq!(
        (diff.joined, diff.left),
        (None, None),
        "only the count above 2"
    );

    let mut fourth = server.connect(&name(3)).await;
    fourth.join("r").await;
    // Longer than `presence.window` (20 ms here), well within the count window.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fifth = server.connect(&name(4)).await;
    fifth.join("r").await;
    let diff = watcher.next_diff("r").await;
    assert_eq!(diff.count, 5, "both joins in one count: {diff:?}");
    assert_eq!((diff.joined, diff.left), (None, None));
}
