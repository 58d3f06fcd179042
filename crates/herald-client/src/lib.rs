//! Rust client for Herald, with the same semantics as the JavaScript client.
//!
//! A background task owns the WebSocket. It authenticates with the first message (asking the
//! token function each time), reconnects with exponential backoff and full jitter, rejoins every
//! room from the last offset it saw and that offset's epoch (the server replays what was missed,
//! or reports `recovered: false` when the room's stream was recreated), acknowledges the inbox,
//! drops duplicate message ids, answers refresh notices with a fresh token, and pings at the
//! application level to notice a dead link. Requests made while disconnected wait in a bounded
//! queue.
//!
//! ```no_run
//! # async fn demo() -> Result<(), herald_client::ClientError> {
//! use herald_client::{Client, ClientOptions, Event};
//! let mut client = Client::connect("ws://127.0.0.1:8080/ws", ClientOptions::with_token("JWT")).await?;
//! client.join("lobby").await?;
//! client.publish("lobby", serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = client.next_event().await {
//!     if let Event::Message(message) = event { println!("{}: {:?}", message.from, message.content); }
//! }
//! # Ok(()) }
//! ```

mod driver;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use std::collections::BTreeSet;

use herald_protocol::{Ack, ErrorEvent, Members, Message, PresenceDiff, ServerEvent, Welcome};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

/// Where tokens come from: called on every (re)connect and on every refresh notice.
pub type TokenFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

#[derive(Clone)]
pub struct ClientOptions {
    pub token: TokenFn,
    /// First reconnect delay ceiling; doubles per attempt up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Application ping interval; silence for twice this is a dead link.
    pub heartbeat: Duration,
    pub request_timeout: Duration,
    /// Requests kept while disconnected (beyond it, callers wait).
    pub max_queued: usize,
    /// A stable id of this device, sent as the `device` query parameter: the server keeps its
    /// own inbox mark, so this device gets every direct message once even when another device
    /// of the user acknowledged it. `None`: the mark is shared by all of the user's connections.
    pub device: Option<String>,
}

impl ClientOptions {
    /// Options with a fixed token.
    pub fn with_token(token: impl Into<String>) -> Self {
        let token: String = token.into();
        Self::with_token_fn(move || {
            let token = token.clone();
            async move { Ok(token) }
        })
    }

    /// Options with a token function (for refresh and reconnects).
    pub fn with_token_fn<F, Fut>(token: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        ClientOptions {
            token: Arc::new(move || Box::pin(token())),
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(15),
            heartbeat: Duration::from_secs(20),
            request_timeout: Duration::from_secs(10),
            max_queued: 1000,
            device: None,
        }
    }
}

/// The connection's state, observable with [`Client::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Connecting,
    Open(Welcome),
    Reconnecting {
        attempt: u32,
    },
    /// Closed for good: by [`Client::close`], or by a final close code (44xx).
    Closed {
        code: u16,
        reason: String,
    },
}

/// A room's members as a client follows them: start from [`Client::members`] right after
/// joining, then [`apply`](Roster::apply) every [`Event::Presence`] of the room received since
/// the join, in order (those that arrived before the `members` answer too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roster {
    users: BTreeSet<String>,
    count: u64,
    /// False once a diff came with the count only: the list is no longer followed.
    listed: bool,
}

impl Roster {
    pub fn from_members(members: &Members) -> Roster {
        Roster {
            users: members.users.iter().cloned().collect(),
            count: members.count,
            listed: true,
        }
    }

    pub fn apply(&mut self, diff: &PresenceDiff) {
        self.count = diff.count;
        match (&diff.joined, &diff.left) {
            (Some(joined), Some(left)) => {
                self.users.extend(joined.iter().cloned());
                for user in left {
                    self.users.remove(user);
                }
            }
            _ => self.listed = false,
        }
    }

    /// The users in the room, while the room is small enough for the server to list them.
    pub fn users(&self) -> Option<&BTreeSet<String>> {
        self.listed.then_some(&self.users)
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// What the server sends that was not an answer to a request.
#[derive(Debug, Clone)]
pub enum Event {
    Message(Message),
    /// A binary message: its header and its bytes.
    Binary(Message, Bytes),
    /// Who joined and who left a room during the server's presence window (see [`Roster`]).
    Presence(PresenceDiff),
    /// A room rejoined after a reconnect, sent before the replayed messages. `Some(true)`: every
    /// missed message follows. `Some(false)`: they could not all be replayed (the room's stream
    /// was recreated, e.g. a new data folder, or the gap was pruned or too long); the newest
    /// page follows instead, so rebuild the room's view from it. `None`: rejoined without an
    /// offset (the first join had no answer yet).
    Rejoined {
        room: String,
        recovered: Option<bool>,
    },
    /// An error not tied to a request.
    Error(ErrorEvent),
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("server refused the request: {code}: {message}")]
    Server { code: String, message: String },
    #[error("no answer within the request timeout")]
    Timeout,
    #[error("the connection was lost before the answer")]
    Disconnected,
    #[error("the client is closed: {0}")]
    Closed(String),
    #[error("could not connect: {0}")]
    Connect(String),
}

pub(crate) enum Command {
    Request {
        body: Value,
        reply: oneshot::Sender<Result<ServerEvent, ClientError>>,
    },
    Close,
}

pub struct Client {
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<Event>,
    state: watch::Receiver<State>,
    request_timeout: Duration,
}

impl Client {
    /// Connects and waits for the first welcome; afterwards the client reconnects by itself.
    pub async fn connect(url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let (commands, command_rx) = mpsc::channel(options.max_queued.max(1));
        let request_timeout = options.request_timeout;
        let (event_tx, events) = mpsc::channel(1024);
        let (state_tx, mut state) = watch::channel(State::Connecting);
        tokio::spawn(driver::run(
            url.to_owned(),
            options,
            command_rx,
            event_tx,
            state_tx,
        ));
        loop {
            match &*state.borrow_and_update() {
                State::Open(_) => break,
                State::Closed { reason, .. } => return Err(ClientError::Connect(reason.clone())),
                _ => {}
            }
            if state.changed().await.is_err() {
                return Err(ClientError::Connect("client task ended".into()));
            }
        }
        Ok(Client {
            commands,
            events,
            state,
            request_timeout,
        })
    }

    /// The next event, or `None` once the client is closed.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// A watch on the connection state.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// Sends any request (`{"type": …}`) and returns the server's answer.
    pub async fn request(&self, body: Value) -> Result<ServerEvent, ClientError> {
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            self.commands
                .send(Command::Request { body, reply })
                .await
                .map_err(|_| ClientError::Closed("client task ended".into()))?;
            answer
                .await
                .map_err(|_| ClientError::Closed("client task ended".into()))?
        };
        // A request abandoned here is skipped by the driver if it has not been sent yet.
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    async fn ack(&self, body: Value) -> Result<Ack, ClientError> {
        match self.request(body).await? {
            ServerEvent::Ack(ack) => Ok(ack),
            other => Err(unexpected(other)),
        }
    }

    pub async fn send(&self, to: &[&str], content: Value) -> Result<Ack, ClientError> {
        self.ack(json!({"type": "send", "to": to, "content": content}))
            .await
    }

    /// Joins a room; reconnects rejoin it from the last offset seen, with its epoch.
    pub async fn join(&self, room: &str) -> Result<Ack, ClientError> {
        self.ack(json!({"type": "join", "room": room})).await
    }

    pub async fn leave(&self, room: &str) -> Result<Ack, ClientError> {
        self.ack(json!({"type": "leave", "room": room})).await
    }

    pub async fn publish(&self, room: &str, content: Value) -> Result<Ack, ClientError> {
        self.ack(json!({"type": "publish", "room": room, "content": content}))
            .await
    }

    pub async fn broadcast(&self, content: Value) -> Result<Ack, ClientError> {
        self.ack(json!({"type": "broadcast", "content": content}))
            .await
    }

    /// Every user in a room, following the pages of `members` to the last.
    pub async fn members(&self, room: &str) -> Result<Members, ClientError> {
        let mut all = self.members_page(room, None, None).await?;
        while let Some(after) = all.next.take() {
            let page = self.members_page(room, Some(&after), None).await?;
            all.users.extend(page.users);
            all.count = page.count;
            all.next = page.next;
        }
        Ok(all)
    }

    /// One page of a room's users: those after `after`, at most `limit` (server default 1000).
    pub async fn members_page(
        &self,
        room: &str,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Members, ClientError> {
        let mut request = json!({"type": "members", "room": room});
        if let Some(after) = after {
            request["after"] = json!(after);
        }
        if let Some(limit) = limit {
            request["limit"] = json!(limit);
        }
        match self.request(request).await? {
            ServerEvent::Members(members) => Ok(members),
            other => Err(unexpected(other)),
        }
    }

    /// Closes for good.
    pub async fn close(self) {
        let _ = self.commands.send(Command::Close).await;
    }
}

fn unexpected(event: ServerEvent) -> ClientError {
    ClientError::Server {
        code: "unexpected".into(),
        message: format!("unexpected answer {event:?}"),
    }
}
