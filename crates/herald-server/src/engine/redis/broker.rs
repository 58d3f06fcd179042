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
//!
//! Surveys: every node subscribes to the deployment's survey channel and to a reply channel of
//! its own (named after a random incarnation id) from the start. A survey publishes the question
//! on the survey channel; Redis answers the publish with how many nodes received it, so the
//! asker knows how many answers to wait for (at most `redis.response_timeout`). Each node
//! answers on the asker's reply channel from its receive path.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
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
use crate::engine::broker::{Answers, Broker, DeliveryHandler};
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
    /// How long a survey waits for the last answer.
    response_timeout: Duration,
    /// The subscriber task ends once this is dropped, with the broker.
    requests: mpsc::Sender<Request>,
    shared: Arc<Shared>,
    next_survey: AtomicU64,
}

/// What the receiving connection's push callback and the subscriber task share.
struct Shared {
    keys: Keys,
    cluster: bool,
    /// Publishes; the library reconnects it by itself.
    publisher: Connection,
    /// Where answers to this node's surveys come back.
    replies: String,
    /// Where every node receives surveys.
    surveys: String,
    /// Surveys this node is waiting on: id → where their answers go.
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<Bytes>>>,
    /// Answers are published from tasks spawned on the receive path, which must not wait.
    runtime: tokio::runtime::Handle,
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
        let publisher = connect(config).await?;
        let incarnation = format!("{:016x}", rand::random::<u64>());
        let shared = Arc::new(Shared {
            keys: keys.clone(),
            cluster: config.cluster,
            publisher,
            replies: keys.node(&incarnation, "replies"),
            surveys: keys.global("surveys"),
            waiting: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
            handler: OnceLock::new(),
            subscribed: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            losses: AtomicU64::new(0),
            lost: Notify::new(),
        });
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
        let broker = RedisBroker {
            keys,
            response_timeout: config.response_timeout,
            requests,
            shared,
            next_survey: AtomicU64::new(0),
        };
        for channel in [&broker.shared.surveys, &broker.shared.replies] {
            broker.request(Change::Subscribe, channel.clone()).await?;
        }
        Ok(broker)
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
        self.shared
            .publish(&self.keys.channel(channel), &payload)
            .await
            .map(drop)
            .map_err(|error| {
                EngineError::from_redis("broker", format!("publish on {channel}"), error)
            })
    }
}

/// Forgets a survey however its asker stops waiting (answered, timed out or dropped).
struct Waiting<'a> {
    shared: &'a Shared,
    survey: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.shared
            .waiting
            .lock()
            .expect("no panics while holding the lock")
            .remove(&self.survey);
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

    async fn survey(&self, question: Bytes) -> Result<Answers, EngineError> {
        let survey = self.next_survey.fetch_add(1, Ordering::Relaxed);
        let (answers, mut arriving) = mpsc::unbounded_channel();
        self.shared
            .waiting
            .lock()
            .expect("no panics while holding the lock")
            .insert(survey, answers);
        let _waiting = Waiting {
            shared: &self.shared,
            survey,
        };
        let message = wire::encode_question(survey, &self.shared.replies, &question);
        let asked = self
            .shared
            .publish(&self.shared.surveys, &message)
            .await
            .map_err(|error| EngineError::from_redis("broker", "publish a survey", error))?;
        let mut gathered = Answers::default();
        let deadline = tokio::time::sleep(self.response_timeout);
        tokio::pin!(deadline);
        while gathered.answers.len() < asked {
            tokio::select! {
                Some(answer) = arriving.recv() => gathered.answers.push(answer),
                _ = &mut deadline => break,
            }
        }
        gathered.unanswered = asked - gathered.answers.len();
        Ok(gathered)
    }

    async fn ready(&self) -> bool {
        if !self.shared.subscribed.load(Ordering::Acquire)
            || self.shared.closed.load(Ordering::Acquire)
        {
            return false;
        }
        redis::cmd("PING")
            .exec_async(&mut self.shared.publisher.clone())
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
    /// Publishes on a Redis channel; returns how many subscribers received it.
    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<usize, redis::RedisError> {
        let command = if self.cluster { "SPUBLISH" } else { "PUBLISH" };
        redis::cmd(command)
            .arg(channel)
            .arg(payload)
            .query_async(&mut self.publisher.clone())
            .await
    }

    /// Answers a survey on the asker's reply channel, from a task: publishing waits on Redis.
    fn answer(self: &Arc<Self>, handler: &dyn DeliveryHandler, payload: &[u8]) {
        let question = match wire::decode_question(payload) {
            Ok(question) => question,
            Err(error) => return malformed(&error.to_string()),
        };
        let Some(answer) = handler.answer(question.question) else {
            return malformed("a survey question this node cannot read");
        };
        let message = wire::encode_answer(question.survey, &answer);
        let reply_to = question.reply_to.to_string();
        let shared = self.clone();
        self.runtime.spawn(async move {
            if let Err(error) = shared.publish(&reply_to, &message).await {
                tracing::warn!(%error, "broker: answering a survey failed");
            }
        });
    }

    fn answered(&self, payload: &[u8]) {
        let (survey, answer) = match wire::decode_answer(payload) {
            Ok(answer) => answer,
            Err(error) => return malformed(&error.to_string()),
        };
        let waiting = self
            .waiting
            .lock()
            .expect("no panics while holding the lock");
        // A survey no longer waited on (timed out) is not an error: its answer came late.
        if let Some(answers) = waiting.get(&survey) {
            let _ = answers.send(Bytes::copy_from_slice(answer));
        }
    }

    /// Runs on the library's receive task for every push: must not block.
    fn receive(self: &Arc<Self>, push: PushInfo) {
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

    fn message(self: &Arc<Self>, data: &[Value]) {
        let (Some(Value::BulkString(name)), Some(Value::BulkString(payload))) =
            (data.first(), data.get(1))
        else {
            return malformed("a message push without channel and payload");
        };
        if name[..] == *self.replies.as_bytes() {
            return self.answered(payload);
        }
        if name[..] == *self.surveys.as_bytes() {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            if let Some(handler) = self.handler.get().and_then(Weak::upgrade) {
                self.answer(handler.as_ref(), payload);
            }
            return;
        }
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
