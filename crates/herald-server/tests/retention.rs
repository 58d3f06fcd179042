//! Retention runs in the background: rooms keep their newest messages, offsets go on.

mod common;

use std::time::Duration;

use common::{EVENT_TIMEOUT, TestServer};
use serde_json::json;

#[tokio::test]
async fn the_background_pass_keeps_the_newest_messages_of_each_room() {
    let server = TestServer::start_with(|config| {
        config.store.room_max_messages = 3;
        config.store.prune_interval = Duration::from_millis(50);
    })
    .await;
    let mut pruned = server.node.pruned();
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;
    for n in 1..=10 {
        alice.publish("lobby", json!(n)).await;
    }
    // A pass may run between two publishes and prune only part: wait for one that leaves the
    // newest three.
    let page = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            pruned.changed().await.unwrap();
            if pruned.borrow().room_messages == 0 {
                continue;
            }
            let page = alice.history(json!({"room": "lobby"})).await;
            if page.messages.len() <= 3 {
                break page;
            }
        }
    })
    .await
    .expect("no pruning pass brought the room down to three messages");

    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset.unwrap()).collect();
    assert_eq!(offsets, [8, 9, 10]);
    assert!(!page.more);
    assert_eq!(alice.publish("lobby", json!(11)).await, 11, "offsets go on");
}
