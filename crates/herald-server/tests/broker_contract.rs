//! The `Broker` contract (engine/broker.rs), one suite for every backend: the in-memory broker
//! (one process, so one node that receives everything it publishes) and the Redis broker
//! against a real redis-server, where two broker instances act as two nodes. Tests about
//! several nodes, subscriptions and lost connections run where the backend has them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::EVENT_TIMEOUT;
use common::redis::{RedisCluster, RedisServer};
use herald_server::config::RedisConfig;
use herald_server::delivery::{Channel, ConnId, Control, Delivery, OutFrame};
use herald_server::engine::broker::{Broker, DeliveryHandler};
use herald_server::engine::memory::MemoryBroker;
use herald_server::engine::redis::broker::RedisBroker;
use tokio::sync::mpsc;

#[derive(Debug, PartialEq)]
enum Event {
    Frame(Channel, Delivery),
    Control(Channel, Control),
    Restored,
}

/// Records what it receives; answers a survey with its name and the question, and leaves
/// the question "unreadable" unanswered.
struct Recorder(mpsc::UnboundedSender<Event>, String);

impl DeliveryHandler for Recorder {
    fn deliver(&self, channel: &Channel, delivery: &Delivery) {
        let _ = self.0.send(Event::Frame(channel.clone(), delivery.clone()));
    }

    fn control(&self, channel: &Channel, control: &Control) {
        let _ = self
            .0
            .send(Event::Control(channel.clone(), control.clone()));
    }

    fn broker_restored(&self) {
        let _ = self.0.send(Event::Restored);
    }

    fn answer(&self, question: &[u8]) -> Option<Bytes> {
        (question != b"unreadable")
            .then(|| Bytes::from(format!("{}: {}", self.1, String::from_utf8_lossy(question))))
    }
}

/// One node's view: its broker and what its handler received.
struct Node {
    broker: Arc<dyn Broker>,
    events: mpsc::UnboundedReceiver<Event>,
    // The broker holds its handler weakly, as the node owns the broker.
    handler: Arc<Recorder>,
}

impl Node {
    fn started(broker: Arc<dyn Broker>) -> Node {
        static NODES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "node{}",
            NODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let (sender, events) = mpsc::unbounded_channel();
        let handler = Arc::new(Recorder(sender, name));
        broker.start(handler.clone());
        Node {
            broker,
            events,
            handler,
        }
    }

    async fn next(&mut self) -> Event {
        tokio::time::timeout(EVENT_TIMEOUT, self.events.recv())
            .await
            .expect("an event within the timeout")
            .expect("the handler is alive")
    }

    async fn next_frame(&mut self) -> (Channel, String) {
        match self.next().await {
            Event::Frame(channel, delivery) => (channel, text(&delivery)),
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

fn frame(text: &str) -> Delivery {
    Delivery {
        frame: OutFrame::Text(Bytes::from(text.to_owned())),
        except: None,
        offset: None,
    }
}

fn text(delivery: &Delivery) -> String {
    match &delivery.frame {
        OutFrame::Text(bytes) | OutFrame::Binary(bytes) => {
            String::from_utf8(bytes.to_vec()).unwrap()
        }
    }
}

fn room(name: &str) -> Channel {
    Channel::Room(name.into())
}

/// A backend under test and how to make its nodes.
enum Backend {
    Memory,
    Redis(Box<RedisServer>, Box<RedisConfig>),
}

impl Backend {
    /// Memory always; Redis when redis-server is installed (a loud skip otherwise).
    async fn all() -> Vec<Backend> {
        let mut backends = vec![Backend::Memory];
        if let Some(server) = RedisServer::start().await {
            let config = server.config();
            backends.push(Backend::Redis(Box::new(server), Box::new(config)));
        }
        backends
    }

    async fn redis() -> Option<Backend> {
        let server = RedisServer::start().await?;
        let config = server.config();
        Some(Backend::Redis(Box::new(server), Box::new(config)))
    }

    async fn node(&self) -> Node {
        match self {
            Backend::Memory => Node::started(Arc::new(MemoryBroker::new())),
            Backend::Redis(_, config) => {
                Node::started(Arc::new(RedisBroker::connect(config).await.unwrap()))
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis(..) => "redis",
        }
    }
}

#[tokio::test]
async fn frames_from_one_node_arrive_in_publish_order_on_each_channel() {
    for backend in Backend::all().await {
        let mut node = backend.node().await;
        node.broker.subscribe(&room("a")).await.unwrap();
        node.broker.subscribe(&room("b")).await.unwrap();
        for i in 0..200 {
            let channel = if i % 2 == 0 { room("a") } else { room("b") };
            node.broker
                .publish(&channel, frame(&i.to_string()))
                .await
                .unwrap();
        }
        let (mut next_a, mut next_b) = (0, 1);
        for _ in 0..200 {
            let (channel, text) = node.next_frame().await;
            let expected = if channel == room("a") {
                &mut next_a
            } else {
                &mut next_b
            };
            assert_eq!(
                text,
                expected.to_string(),
                "{}: order on {channel}",
                backend.name()
            );
            *expected += 2;
        }
    }
}

/// Every node answers a survey, the asker included; a node that cannot read the question is
/// counted as unanswered once the response timeout has passed.
#[tokio::test]
async fn a_survey_gathers_one_answer_from_every_node() {
    for backend in Backend::all().await {
        let mut nodes = vec![backend.node().await];
        if !matches!(backend, Backend::Memory) {
            nodes.push(backend.node().await);
        }
        let gathered = nodes[0]
            .broker
            .survey(Bytes::from_static(b"who"))
            .await
            .unwrap();
        let mut answers: Vec<String> = gathered
            .answers
            .iter()
            .map(|answer| String::from_utf8(answer.to_vec()).unwrap())
            .collect();
        answers.sort();
        let mut expected: Vec<String> = nodes
            .iter()
            .map(|node| format!("{}: who", node.handler.1))
            .collect();
        expected.sort();
        assert_eq!(answers, expected, "{}", backend.name());
        assert_eq!(gathered.unanswered, 0, "{}", backend.name());

        let unread = nodes[0]
            .broker
            .survey(Bytes::from_static(b"unreadable"))
            .await
            .unwrap();
        assert!(unread.answers.is_empty(), "{}", backend.name());
        assert_eq!(unread.unanswered, nodes.len(), "{}", backend.name());
    }
}

#[tokio::test]
async fn a_delivery_keeps_its_excepted_connection_and_offset() {
    for backend in Backend::all().await {
        let mut node = backend.node().await;
        node.broker
            .subscribe(&Channel::User("bob".into()))
            .await
            .unwrap();
        let sent = Delivery {
            frame: OutFrame::Binary(Bytes::from_static(b"\x00\x00\x00\x02{}raw")),
            except: Some(ConnId(7)),
            offset: Some(42),
        };
        node.broker
            .publish(&Channel::User("bob".into()), sent.clone())
            .await
            .unwrap();
        assert_eq!(
            node.next().await,
            Event::Frame(Channel::User("bob".into()), sent),
            "{}",
            backend.name()
        );
    }
}

#[tokio::test]
async fn controls_travel_on_channels_like_frames_and_after_them() {
    for backend in Backend::all().await {
        let mut node = backend.node().await;
        node.broker
            .subscribe(&Channel::User("bob".into()))
            .await
            .unwrap();
        let control = Control::Disconnect {
            code: 4000,
            reason: "bye".into(),
        };
        node.broker
            .publish(&Channel::User("bob".into()), frame("last words"))
            .await
            .unwrap();
        node.broker
            .publish_control(&Channel::User("bob".into()), control.clone())
            .await
            .unwrap();
        assert_eq!(
            node.next_frame().await,
            (Channel::User("bob".into()), "last words".into())
        );
        assert_eq!(
            node.next().await,
            Event::Control(Channel::User("bob".into()), control),
            "{}",
            backend.name()
        );
    }
}

#[tokio::test]
async fn a_node_receives_another_nodes_publishes_only_on_channels_it_subscribed() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    let mut a = backend.node().await;
    let mut b = backend.node().await;
    a.broker.subscribe(&room("shared")).await.unwrap();
    b.broker.subscribe(&room("shared")).await.unwrap();
    b.broker.subscribe(&Channel::All).await.unwrap();

    a.broker
        .publish(&room("elsewhere"), frame("not for b"))
        .await
        .unwrap();
    a.broker
        .publish(&Channel::All, frame("everyone"))
        .await
        .unwrap();
    a.broker
        .publish(&room("shared"), frame("both"))
        .await
        .unwrap();

    // A standalone Redis delivers to one connection in the order it ran the publishes, so b's
    // first frame being "everyone" proves "not for b" was never sent to it.
    assert_eq!(b.next_frame().await, (Channel::All, "everyone".into()));
    assert_eq!(b.next_frame().await, (room("shared"), "both".into()));
    assert_eq!(a.next_frame().await, (room("shared"), "both".into()));
    assert!(
        a.events.try_recv().is_err(),
        "a subscribed to neither other channel"
    );
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_a_new_subscribe_starts_it_again() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    let mut a = backend.node().await;
    let b = backend.node().await;
    a.broker.subscribe(&room("r")).await.unwrap();
    a.broker.subscribe(&room("marker")).await.unwrap();
    b.broker.publish(&room("r"), frame("1")).await.unwrap();
    assert_eq!(a.next_frame().await, (room("r"), "1".into()));

    a.broker.unsubscribe(&room("r")).await.unwrap();
    b.broker.publish(&room("r"), frame("2")).await.unwrap();
    b.broker.publish(&room("marker"), frame("m")).await.unwrap();
    assert_eq!(a.next_frame().await, (room("marker"), "m".into()));

    a.broker.subscribe(&room("r")).await.unwrap();
    b.broker.publish(&room("r"), frame("3")).await.unwrap();
    assert_eq!(a.next_frame().await, (room("r"), "3".into()));
}

#[tokio::test]
async fn many_subscriptions_asked_at_once_are_all_confirmed() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    let mut a = backend.node().await;
    let b = backend.node().await;
    let channels: Vec<Channel> = (0..2000).map(|i| room(&format!("r{i}"))).collect();
    let subscribes = channels.iter().map(|channel| a.broker.subscribe(channel));
    for result in futures::future::join_all(subscribes).await {
        result.unwrap();
    }
    for channel in &channels {
        b.broker.publish(channel, frame("x")).await.unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..channels.len() {
        seen.insert(a.next_frame().await.0);
    }
    assert_eq!(seen.len(), channels.len());
}

#[tokio::test]
async fn malformed_messages_are_dropped_and_the_next_one_is_delivered() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    let Backend::Redis(server, config) = &backend else {
        unreachable!()
    };
    let mut a = backend.node().await;
    a.broker.subscribe(&room("r")).await.unwrap();
    let name = herald_server::engine::redis::Keys::new(&config.key_prefix).channel(&room("r"));
    let mut raw = server.client().await;
    for garbage in [
        &b""[..],
        b"\x01",
        b"\x09garbage",
        &[
            1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0,
        ],
    ] {
        redis::cmd("PUBLISH")
            .arg(&name)
            .arg(garbage)
            .exec_async(&mut raw)
            .await
            .unwrap();
    }
    let b = backend.node().await;
    b.broker.publish(&room("r"), frame("fine")).await.unwrap();
    assert_eq!(a.next_frame().await, (room("r"), "fine".into()));
}

#[tokio::test]
async fn after_redis_restarts_the_broker_resubscribes_reports_restored_and_delivers_again() {
    let Some(mut backend) = Backend::redis().await else {
        return;
    };
    let mut a = backend.node().await;
    let mut b = backend.node().await;
    a.broker.subscribe(&room("r")).await.unwrap();
    assert!(a.broker.ready().await);

    let Backend::Redis(server, _) = &mut backend else {
        unreachable!()
    };
    server.restart().await;
    assert_eq!(a.next().await, Event::Restored);
    assert_eq!(b.next().await, Event::Restored);
    assert!(a.broker.ready().await, "ready once every channel is back");

    b.broker.publish(&room("r"), frame("after")).await.unwrap();
    assert_eq!(a.next_frame().await, (room("r"), "after".into()));
    a.broker.subscribe(&room("new")).await.unwrap();
    b.broker
        .publish(&room("new"), frame("fresh"))
        .await
        .unwrap();
    assert_eq!(a.next_frame().await, (room("new"), "fresh".into()));
}

#[tokio::test]
async fn while_redis_is_down_the_broker_is_not_ready_and_subscribing_fails_as_temporary() {
    let Some(mut backend) = Backend::redis().await else {
        return;
    };
    let mut config = match &backend {
        Backend::Redis(_, config) => config.clone(),
        Backend::Memory => unreachable!(),
    };
    config.response_timeout = Duration::from_millis(500);
    let broker = Arc::new(RedisBroker::connect(&config).await.unwrap());
    let mut a = Node::started(broker);
    let Backend::Redis(server, _) = &mut backend else {
        unreachable!()
    };
    server.kill().await;
    assert!(!a.broker.ready().await);
    let error = a.broker.subscribe(&room("r")).await.unwrap_err();
    assert!(error.temporary, "{error}");
    assert!(a.broker.publish(&room("r"), frame("x")).await.is_err());
    // Nothing to resubscribe is no proof of a connection: no restored while Redis is down (a
    // retry comes every 0.1 s at first, so one second would show one).
    assert!(
        tokio::time::timeout(Duration::from_secs(1), a.events.recv())
            .await
            .is_err(),
        "no event while Redis is down"
    );
}

#[tokio::test]
async fn close_resolves_once_redis_confirmed_the_node_left_every_channel() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    let Backend::Redis(server, config) = &backend else {
        unreachable!()
    };
    let a = backend.node().await;
    a.broker.subscribe(&room("r")).await.unwrap();
    let name = herald_server::engine::redis::Keys::new(&config.key_prefix).channel(&room("r"));
    let mut raw = server.client().await;
    let receivers: u64 = redis::cmd("PUBLISH")
        .arg(&name)
        .arg("probe")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(receivers, 1);
    a.broker.close().await;
    assert!(!a.broker.ready().await);
    let receivers: u64 = redis::cmd("PUBLISH")
        .arg(&name)
        .arg("probe")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(receivers, 0, "no subscriber left on the channel");
}

#[tokio::test]
async fn sharded_pub_sub_carries_frames_between_nodes_across_a_three_master_cluster() {
    let Some(cluster) = RedisCluster::start(3).await else {
        return;
    };
    let config = cluster.config();
    let a = Node::started(Arc::new(RedisBroker::connect(&config).await.unwrap()));
    let mut b = Node::started(Arc::new(RedisBroker::connect(&config).await.unwrap()));
    // Enough rooms that every shard holds some of them.
    let channels: Vec<Channel> = (0..30)
        .map(|i| room(&format!("r{i}")))
        .chain([Channel::User("bob".into()), Channel::All])
        .collect();
    let subscribes = channels.iter().map(|channel| b.broker.subscribe(channel));
    for result in futures::future::join_all(subscribes).await {
        result.unwrap();
    }
    for channel in &channels {
        for i in 0..3 {
            a.broker
                .publish(channel, frame(&i.to_string()))
                .await
                .unwrap();
        }
    }
    // Sharded pub/sub: each shard holds the subscriptions of its own channels, and every
    // shard holds some.
    let mut per_shard = Vec::new();
    for node in &cluster.nodes {
        let names: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .query_async(&mut node.client().await)
            .await
            .unwrap();
        // Fan-out channels only, not the survey channels every broker holds.
        per_shard.push(names.iter().filter(|name| name.ends_with("}:ch")).count());
    }
    assert_eq!(
        per_shard.iter().sum::<usize>(),
        channels.len(),
        "{per_shard:?}"
    );
    assert!(per_shard.iter().all(|count| *count > 0), "{per_shard:?}");
    let mut next = std::collections::HashMap::new();
    for _ in 0..channels.len() * 3 {
        let (channel, text) = b.next_frame().await;
        let expected = next.entry(channel.clone()).or_insert(0);
        assert_eq!(text, expected.to_string(), "order on {channel}");
        *expected += 1;
    }
    assert_eq!(next.len(), channels.len());
    assert!(next.values().all(|count| *count == 3));
    assert!(b.broker.ready().await);
    let gathered = a.broker.survey(Bytes::from_static(b"q")).await.unwrap();
    assert_eq!((gathered.answers.len(), gathered.unanswered), (2, 0));
}

#[tokio::test]
async fn on_a_cluster_a_restarted_master_is_resubscribed_and_reported_restored() {
    let Some(mut cluster) = RedisCluster::start(3).await else {
        return;
    };
    let config = cluster.config();
    let mut a = Node::started(Arc::new(RedisBroker::connect(&config).await.unwrap()));
    let b = Node::started(Arc::new(RedisBroker::connect(&config).await.unwrap()));
    let channels: Vec<Channel> = (0..30).map(|i| room(&format!("r{i}"))).collect();
    for channel in &channels {
        a.broker.subscribe(channel).await.unwrap();
    }
    cluster.nodes[0].restart().await;
    assert_eq!(a.next().await, Event::Restored);
    assert!(a.broker.ready().await);
    for channel in &channels {
        b.broker.publish(channel, frame("after")).await.unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..channels.len() {
        seen.insert(a.next_frame().await.0);
    }
    assert_eq!(seen.len(), channels.len());
}
