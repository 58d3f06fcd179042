//! Direct messages to users who are away: stored in their inbox, delivered at connect in order
//! before live traffic, until acknowledged.

mod common;

use common::{TestServer, content_json};
use herald_protocol::{ErrorCode, ServerEvent};
use serde_json::json;

#[tokio::test]
async fn messages_sent_while_offline_arrive_at_connect_in_order_before_live_ones() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    for n in 1..=5 {
        let ack = alice
            .ack(json!({"type": "send", "to": ["bob"], "content": n}))
            .await;
        assert_eq!(ack.offline.as_deref(), Some(&["bob".to_owned()][..]));
        assert_eq!(ack.offsets.unwrap()["bob"], n);
    }
    let mut bob = server.connect("bob").await;
    // Sent after bob is registered: it must still come after the stored ones.
    alice
        .ack(json!({"type": "send", "to": ["bob"], "content": 6}))
        .await;
    for n in 1..=6u64 {
        let message = bob.next_message_event().await;
        assert_eq!(content_json(&message), json!(n));
        assert_eq!(message.offset, Some(n));
        assert_eq!(message.from, "alice");
    }
    bob.expect_nothing_queued().await;
}

#[tokio::test]
async fn acknowledged_inbox_entries_are_not_sent_again_to_any_connection() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    for n in 1..=3 {
        alice
            .ack(json!({"type": "send", "to": ["bob"], "content": n}))
            .await;
    }
    // Two devices connect before either acknowledges: both get everything.
    let mut phone = server.connect("bob").await;
    let mut laptop = server.connect("bob").await;
    for device in [&mut phone, &mut laptop] {
        for n in 1..=3 {
            assert_eq!(content_json(&device.next_message_event().await), json!(n));
        }
    }
    let ack = phone.ack(json!({"type": "ack", "inbox": 2})).await;
    assert_eq!(ack.inbox, Some(2));

    // A new connection gets only what nobody acknowledged.
    let mut tablet = server.connect("bob").await;
    let message = tablet.next_message_event().await;
    assert_eq!(message.offset, Some(3));
    tablet.expect_nothing_queued().await;

    // The mark never moves backwards.
    let ack = laptop.ack(json!({"type": "ack", "inbox": 1})).await;
    assert_eq!(ack.inbox, Some(2));
    laptop.ack(json!({"type": "ack", "inbox": 3})).await;
    let mut watch = server.connect("bob").await;
    watch.expect_nothing_queued().await;
}

#[tokio::test]
async fn acknowledging_past_the_newest_inbox_entry_is_refused() {
    let server = TestServer::start().await;
    let mut bob = server.connect("bob").await;
    let reply = bob.request(json!({"type": "ack", "inbox": 4})).await;
    let ServerEvent::Error(error) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(error.code, ErrorCode::InvalidField);
    assert!(error.message.contains("\"inbox\""), "{}", error.message);
}

#[tokio::test]
async fn the_senders_other_devices_get_a_copy_without_an_inbox_offset() {
    let server = TestServer::start().await;
    let mut phone = server.connect("alice").await;
    let mut laptop = server.connect("alice").await;
    phone
        .ack(json!({"type": "send", "to": ["bob"], "content": "hi"}))
        .await;
    let copy = laptop.next_message_event().await;
    assert_eq!(content_json(&copy), json!("hi"));
    assert_eq!(copy.offset, None);
}

#[tokio::test]
async fn a_message_sent_before_a_restart_reaches_the_recipient_after_it() {
    let data = tempfile::tempdir().unwrap();
    let first = TestServer::start_with(|config| config.store.path = data.path().to_owned()).await;
    let mut alice = first.connect("alice").await;
    let ack = alice
        .ack(json!({"type": "send", "to": ["bob"], "content": {"text": "while you were away"}}))
        .await;
    let id = ack.id.unwrap();
    drop(alice);
    first.stop().await;

    let second = TestServer::start_with(|config| config.store.path = data.path().to_owned()).await;
    let mut bob = second.connect("bob").await;
    let message = bob.next_message_event().await;
    assert_eq!(message.id, id);
    assert_eq!(
        content_json(&message),
        json!({"text": "while you were away"})
    );
    assert_eq!(message.offset, Some(1));
}

/// Several senders write to bob while he keeps reconnecting, reading a random number of
/// messages, acknowledging the last one and leaving. Every connection must start right after
/// the acknowledged mark and see consecutive inbox offsets from there: nothing lost, nothing
/// repeated at the seam between stored and live messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_reconnecting_under_load_resumes_exactly_after_its_ack() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const SENDERS: usize = 3;
    const PER_SENDER: usize = 150;
    let server = TestServer::start_with(|config| {
        config.limits.messages_per_second = 1_000_000;
        config.limits.burst = 1_000_000;
    })
    .await;
    let total = (SENDERS * PER_SENDER) as u64;
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut client = server.connect(&format!("sender{s}")).await;
        senders.push(tokio::spawn(async move {
            for n in 0..PER_SENDER {
                client
                    .ack(json!({"type": "send", "to": ["bob"], "content": {"s": s, "n": n}}))
                    .await;
            }
        }));
    }

    let mut rng = StdRng::seed_from_u64(0x1B0C);
    let mut acked = 0u64;
    let mut seen = Vec::new();
    let mut cycles = 0;
    while acked < total {
        cycles += 1;
        assert!(cycles < 10_000, "bob made no progress");
        let mut bob = server.connect("bob").await;
        let to_read = rng.random_range(1..=25);
        let mut last = acked;
        for _ in 0..to_read {
            if last == total {
                break;
            }
            let message = bob.next_message_event().await;
            assert_eq!(
                message.offset,
                Some(last + 1),
                "cycle {cycles}: the connection did not continue right after the mark"
            );
            last += 1;
            seen.push(content_json(&message));
        }
        if last > acked {
            let ack = bob.ack(json!({"type": "ack", "inbox": last})).await;
            assert_eq!(ack.inbox, Some(last));
            acked = last;
        }
    }
    for sender in senders {
        sender.await.unwrap();
    }
    for s in 0..SENDERS {
        let own: Vec<u64> = seen
            .iter()
            .filter(|c| c["s"] == json!(s))
            .map(|c| c["n"].as_u64().unwrap())
            .collect();
        assert_eq!(
            own,
            (0..PER_SENDER as u64).collect::<Vec<_>>(),
            "sender {s}"
        );
    }
    assert!(cycles >= 20, "only {cycles} reconnects");
}
