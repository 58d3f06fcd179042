//! Redis broker: frames travel between nodes over Redis pub/sub (`PUBLISH`/`SUBSCRIBE`), or
//! sharded pub/sub on a Cluster (`SPUBLISH`/`SSUBSCRIBE`), so a channel's traffic stays on the
//! shard that holds its room's or user's keys.
//!
//! Two connections: a command connection publishes (it multiplexes, so concurrent publishes
//! share one round trip and keep their call order); a receiving connection is subscribed to the
//! channels this node has members on. Its pushes are decoded and handed to the node's handler
//! on the library's receive task, with no queue in between.
//!
//! One task (the subscriber) owns the set of subscribed channels:
//! - it drains subscribe/unsubscribe requests in batches and sends each run of the same kind
//!   as one `SUBSCRIBE a b c …` (on a Cluster, one `SSUBSCRIBE` per channel, all in flight at
//!   once: channels of one batch live on different shards), answering each request once Redis
//!   confirmed it;
//! - when the library reports the receiving connection lost, it marks the broker not ready and
//!   resubscribes every channel in the set (retrying with backoff) until Redis confirmed them
//!   all with no loss in between, then tells the handler `broker_restored`. While it is
//!   disconnected a subscribe fails as temporary and an unsubscribe only leaves the set.
//! - from the lost connection until the handler has been told, received frames are dropped:
//!   frames published meanwhile were missed, and one handed on after them would hide the gap
//!   from the client (its recovery starts after its last offset).

use std::collections::HashSet;
use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::{Connection, Keys, connect, connect_receiving};
use crate::config::RedisConfig;
use crate::delivery::{Channel, Control, Delivery};
use crate::engine::EngineError;
use crate::engine::broker::{Broker, DeliveryHandler};
use crate::engine::wire::{self, Envelope};

/// Subscription requests waiting for the subscriber task; a full queue makes callers wait.
const REQUEST_QUEUE: usize = 4096;
/// Requests taken per wakeup, and so the most channels one command names.
const BATCH: usize = 512;
/// Resubscription after a lost connection sends the channels in commands of this many.
const RESUBSCRIBE_CHUNK: usize = 1024;
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);

pub struct RedisBroker {
    keys: Keys,
    cluster: bool,
    /// Publishes; the library reconnects it by itself.
    publisher: Connection,
    /// The subscriber task ends once this is dropped, with the broker.
    requests: mpsc::Sender<Request>,
    shared: Arc<Shared>,
}

/// What the receiving connection's push callback and the subscriber task share.
struct Shared {
    keys: Keys,
    // Weak: the node owns the broker, so a strong reference back would leak both.
    handler: OnceLock<Weak<dyn DeliveryHandler>>,
    /// Connected and every channel of the set subscribed.
    subscribed: AtomicBool,
    /// Set by `close`: nothing is handed to the handler any more.
    closed: AtomicBool,
    /// Lost connections so far: a resubscription that saw it change meanwhile starts over.
    losses: AtomicU64,
    lost: Notify,
}

enum Change {
    Subscribe,
    Unsubscribe,
    /// Unsubscribe from everything and end the task.
    Close,
}

struct Request {
    change: Change,
    channel: String,
    done: oneshot::Sender<Result<(), EngineError>>,
}

impl RedisBroker {
    /// Opens both connections and starts the subscriber task. Fails, naming the URL, when
    /// Redis cannot be reached.
    pub async fn connect(config: &RedisConfig) -> Result<RedisBroker, EngineError> {
        let keys = Keys::new(&config.key_prefix);
        let shared = Arc::new(Shared {
            keys: keys.clone(),
            handler: OnceLock::new(),
            subscribed: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            losses: AtomicU64::new(0),
            lost: Notify::new(),
        });
        let publisher = connect(config).await?;
        let pushes = shared.clone();
        let receiver = connect_receiving(
            config,
            Arc::new(move |push: PushInfo| {
                pushes.receive(push);
                Ok::<(), Infallible>(())
            }),
        )
        .await?;
        let (requests, queue) = mpsc::channel(REQUEST_QUEUE);
        let subscriber = Subscriber {
            connection: receiver,
            channels: HashSet::new(),
            shared: shared.clone(),
            restoring: false,
            retry_at: Instant::now(),
            backoff: FIRST_RETRY,
        };
        tokio::spawn(subscriber.run(queue));
        Ok(RedisBroker {
            keys,
            cluster: config.cluster,
            publisher,
            requests,
            shared,
        })
    }

    async fn request(&self, change: Change, channel: String) -> Result<(), EngineError> {
        let (done, answer) = oneshot::channel();
        let request = Request {
            change,
            channel,
            done,
        };
        let closed = || EngineError::new("broker", "closed");
        self.requests.send(request).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    async fn publish_payload(&self, channel: &Channel, payload: Bytes) -> Result<(), EngineError> {
        let command = if self.cluster { "SPUBLISH" } else { "PUBLISH" };
        redis::cmd(command)
            .arg(self.keys.channel(channel))
            .arg(&payload[..])
            .exec_async(&mut self.publisher.clone())
            .await
            .map_err(|error| {
                EngineError::from_redis("broker", format!("publish on {channel}"), error)
            })
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn start(&self, handler: Arc<dyn DeliveryHandler>) {
        let _ = self.shared.handler.set(Arc::downgrade(&handler));
    }

    async fn subscribe(&self, channel: &Channel) -> Result<(), EngineError> {
        self.request(Change::Subscribe, self.keys.channel(channel))
            .await
    }

    async fn unsubscribe(&self, channel: &Channel) -> Result<(), EngineError> {
        self.request(Change::Unsubscribe, self.keys.channel(channel))
            .await
    }

    async fn publish(&self, channel: &Channel, delivery: Delivery) -> Result<(), EngineError> {
        self.publish_payload(channel, wire::encode_delivery(&delivery))
            .await
    }

    async fn publish_control(
        &self,
        channel: &Channel,
        control: Control,
    ) -> Result<(), EngineError> {
        self.publish_payload(channel, wire::encode_control(&control))
            .await
    }

    async fn ready(&self) -> bool {
        if !self.shared.subscribed.load(Ordering::Acquire)
            || self.shared.closed.load(Ordering::Acquire)
        {
            return false;
        }
        redis::cmd("PING")
            .exec_async(&mut self.publisher.clone())
            .await
            .is_ok()
    }

    /// Resolves once Redis confirmed the node left every channel (or the connection is down).
    async fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        if let Err(error) = self.request(Change::Close, String::new()).await {
            tracing::debug!(%error, "broker already closed");
        }
    }
}

impl Shared {
    /// Runs on the library's receive task for every push: must not block.
    fn receive(&self, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => self.message(&push.data),
            PushKind::Disconnection => {
                self.subscribed.store(false, Ordering::Release);
                self.losses.fetch_add(1, Ordering::AcqRel);
                self.lost.notify_one();
            }
            _ => {}
        }
    }

    fn message(&self, data: &[Value]) {
        let (Some(Value::BulkString(name)), Some(Value::BulkString(payload))) =
            (data.first(), data.get(1))
        else {
            return malformed("a message push without channel and payload");
        };
        let Some(channel) = std::str::from_utf8(name)
            .ok()
            .and_then(|name| self.keys.parse_channel(name))
        else {
            return malformed("a message on a channel this deployment does not use");
        };
        let envelope = match wire::decode(payload) {
            Ok(envelope) => envelope,
            Err(error) => return malformed(&error.to_string()),
        };
        // From a lost connection until `restored` has closed the node's connections, a frame
        // may follow ones this node missed: handed on, it would let a client's last offset
        // jump the gap, and its recovery with `since` would start after it.
        if self.closed.load(Ordering::Acquire) || !self.subscribed.load(Ordering::Acquire) {
            return;
        }
        let Some(handler) = self.handler.get().and_then(Weak::upgrade) else {
            return;
        };
        match envelope {
            Envelope::Delivery(delivery) => handler.deliver(&channel, &delivery),
            Envelope::Control(control) => handler.control(&channel, &control),
        }
    }

    /// The handler hears of it before frames flow again (see `message`).
    fn restored(&self) {
        if let Some(handler) = self.handler.get().and_then(Weak::upgrade) {
            handler.broker_restored();
        }
        self.subscribed.store(true, Ordering::Release);
    }
}

fn malformed(what: &str) {
    metrics::counter!("herald_broker_malformed_total").increment(1);
    tracing::warn!(what, "broker message dropped");
}

/// The task that owns the receiving connection's subscriptions.
struct Subscriber {
    connection: Connection,
    /// Redis channel names this node wants, whether or not currently confirmed.
    channels: HashSet<String>,
    shared: Arc<Shared>,
    /// The connection was lost and not every channel is resubscribed yet.
    restoring: bool,
    retry_at: Instant,
    backoff: Duration,
}

impl Subscriber {
    async fn run(mut self, mut queue: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                _ = self.shared.lost.notified() => {
                    self.restoring = true;
                    self.retry_at = Instant::now();
                    self.backoff = FIRST_RETRY;
                }
                _ = tokio::time::sleep_until(self.retry_at), if self.restoring => {
                    self.restore().await;
                }
                received = queue.recv_many(&mut batch, BATCH) => {
                    if received == 0 || self.apply(&mut batch).await.is_break() {
                        break;
                    }
                }
            }
        }
    }

    /// One attempt to resubscribe every channel; on failure the next waits longer.
    async fn restore(&mut self) {
        let losses = self.shared.losses.load(Ordering::Acquire);
        let channels: Vec<String> = self.channels.iter().cloned().collect();
        // Proves the connection is back even when there is nothing to resubscribe.
        let mut result = redis::cmd("PING")
            .exec_async(&mut self.connection)
            .await
            .map_err(|error| EngineError::from_redis("broker", "reconnect", error));
        for chunk in channels.chunks(RESUBSCRIBE_CHUNK) {
            if result.is_err() {
                break;
            }
            result = self.send(Change::Subscribe, chunk).await;
        }
        match result {
            Ok(()) if self.shared.losses.load(Ordering::Acquire) == losses => {
                self.restoring = false;
                tracing::info!(
                    channels = channels.len(),
                    "broker resubscribed after a lost connection"
                );
                self.shared.restored();
            }
            Ok(()) => self.retry_at = Instant::now(),
            Err(error) => {
                tracing::warn!(%error, retry_in = ?self.backoff, "broker resubscription failed");
                self.retry_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(LAST_RETRY);
            }
        }
    }

    /// Answers a batch of requests, sending each run of the same change as one command.
    /// Breaks at a close request, the task's last.
    async fn apply(&mut self, batch: &mut Vec<Request>) -> ControlFlow<()> {
        let mut run: Vec<Request> = Vec::with_capacity(batch.len());
        for request in batch.drain(..) {
            if matches!(request.change, Change::Close) {
                self.apply_run(&mut run).await;
                let channels: Vec<String> = self.channels.drain().collect();
                if !self.restoring
                    && let Err(error) = self.send(Change::Unsubscribe, &channels).await
                {
                    tracing::warn!(%error, "broker: unsubscribing at close failed");
                }
                let _ = request.done.send(Ok(()));
                return ControlFlow::Break(());
            }
            if run
                .last()
                .is_some_and(|last| !same_change(&last.change, &request.change))
            {
                self.apply_run(&mut run).await;
            }
            run.push(request);
        }
        self.apply_run(&mut run).await;
        ControlFlow::Continue(())
    }

    async fn apply_run(&mut self, run: &mut Vec<Request>) {
        let Some(first) = run.first() else { return };
        let subscribing = matches!(first.change, Change::Subscribe);
        if subscribing {
            // Already confirmed (or to be restored with the rest): nothing to send.
            let (known, new): (Vec<Request>, Vec<Request>) = run
                .drain(..)
                .partition(|request| self.channels.contains(&request.channel));
            for request in known {
                let _ = request.done.send(if self.restoring {
                    Err(disconnected())
                } else {
                    Ok(())
                });
            }
            run.extend(new);
            if run.is_empty() {
                return;
            }
            if self.restoring {
                for request in run.drain(..) {
                    let _ = request.done.send(Err(disconnected()));
                }
                return;
            }
        } else {
            let (wanted, unknown): (Vec<Request>, Vec<Request>) = run
                .drain(..)
                .partition(|request| self.channels.remove(&request.channel));
            for request in unknown {
                let _ = request.done.send(Ok(()));
            }
            run.extend(wanted);
            if self.restoring {
                for request in run.drain(..) {
                    let _ = request.done.send(Ok(()));
                }
                return;
            }
        }
        let names: Vec<String> = run.iter().map(|request| request.channel.clone()).collect();
        let change = if subscribing {
            Change::Subscribe
        } else {
            Change::Unsubscribe
        };
        let result = self.send(change, &names).await;
        if subscribing && result.is_ok() {
            self.channels.extend(names);
        }
        for request in run.drain(..) {
            let _ = request.done.send(match &result {
                Ok(()) => Ok(()),
                Err(error) => Err(copy_error(error)),
            });
        }
    }

    async fn send(&mut self, change: Change, names: &[String]) -> Result<(), EngineError> {
        if names.is_empty() {
            return Ok(());
        }
        let result = match (&mut self.connection, change) {
            (Connection::Standalone(connection), Change::Subscribe) => {
                connection.subscribe(names).await
            }
            (Connection::Standalone(connection), _) => connection.unsubscribe(names).await,
            (Connection::Cluster(connection), change) => {
                let subscribing = matches!(change, Change::Subscribe);
                let sends = names.iter().map(|name| {
                    let mut connection = connection.clone();
                    async move {
                        if subscribing {
                            connection.ssubscribe(name).await
                        } else {
                            connection.sunsubscribe(name).await
                        }
                    }
                });
                futures::future::join_all(sends).await.into_iter().collect()
            }
        };
        result.map_err(|error| {
            EngineError::from_redis(
                "broker",
                format!("(un)subscribe {} channels", names.len()),
                error,
            )
        })
    }
}

fn same_change(a: &Change, b: &Change) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

fn disconnected() -> EngineError {
    EngineError::new("broker", "Redis connection lost; resubscribing").temporary()
}

/// One failed command answers several requests; each gets the message and whether to retry.
fn copy_error(error: &EngineError) -> EngineError {
    EngineError {
        temporary: error.temporary,
        ..EngineError::new(error.engine, error.to_string())
    }
}
