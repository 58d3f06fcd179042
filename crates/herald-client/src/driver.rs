//! The task that owns the WebSocket: connect, authenticate, serve, reconnect.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use herald_protocol::{ServerEvent, Welcome};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{ClientError, ClientOptions, Command, Event, State};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Reply = oneshot::Sender<Result<ServerEvent, ClientError>>;

/// Message ids remembered for dedupe.
const DEDUPE_WINDOW: usize = 2000;
/// How long the welcome may take after the `auth` message.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// What the client remembers across connections.
#[derive(Default)]
struct Memory {
    /// Joined rooms and the last offset seen in each.
    rooms: HashMap<String, Option<u64>>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    next_id: u64,
}

impl Memory {
    fn first_sight(&mut self, id: &str) -> bool {
        if !self.seen.insert(id.to_owned()) {
            return false;
        }
        self.seen_order.push_back(id.to_owned());
        if self.seen_order.len() > DEDUPE_WINDOW
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }

    fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("c{}", self.next_id)
    }
}

/// How a connection ended.
enum Ended {
    /// Lost (network, server restart, heartbeat): reconnect.
    Lost,
    /// Final close from the server (44xx) or the application closed the client.
    Final { code: u16, reason: String },
}

/// What a pending request is for.
enum Waiting {
    Caller(Reply),
    Rejoin(String),
    Ignored,
}

pub(crate) async fn run(
    url: String,
    options: ClientOptions,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    state: watch::Sender<State>,
) {
    let mut memory = Memory::default();
    let mut attempt: u32 = 0;
    loop {
        if attempt > 0 {
            state.send_replace(State::Reconnecting { attempt });
            sleep(backoff(&options, attempt)).await;
        }
        let Some((socket, welcome)) = open(&url, &options).await else {
            attempt = attempt.saturating_add(1);
            continue;
        };
        state.send_replace(State::Open(welcome));
        match serve(socket, &options, &mut memory, &mut commands, &events).await {
            Ended::Lost => attempt = 1,
            Ended::Final { code, reason } => {
                state.send_replace(State::Closed { code, reason });
                return;
            }
        }
    }
}

/// Full jitter: uniform in [0, min(max, initial × 2^(attempt-1))].
fn backoff(options: &ClientOptions, attempt: u32) -> Duration {
    let ceiling = options
        .initial_backoff
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)))
        .min(options.max_backoff);
    ceiling.mul_f64(rand::random::<f64>())
}

async fn open(url: &str, options: &ClientOptions) -> Option<(Socket, Welcome)> {
    let token = match (options.token)().await {
        Ok(token) => token,
        Err(error) => {
            tracing::warn!(%error, "token function failed");
            return None;
        }
    };
    let (mut socket, _) = match tokio_tungstenite::connect_async(url).await {
        Ok(connected) => connected,
        Err(error) => {
            tracing::debug!(%error, "connect failed");
            return None;
        }
    };
    let auth = json!({"type": "auth", "token": token}).to_string();
    socket.send(WsMessage::text(auth)).await.ok()?;
    let welcome = timeout(WELCOME_TIMEOUT, async {
        while let Some(Ok(message)) = socket.next().await {
            if let WsMessage::Text(text) = message {
                match ServerEvent::decode(&text) {
                    Ok(ServerEvent::Welcome(welcome)) => return Some(welcome),
                    Ok(ServerEvent::Error(error)) => {
                        tracing::warn!(code = ?error.code, message = %error.message, "authentication refused");
                        return None;
                    }
                    _ => {}
                }
            }
        }
        None
    })
    .await
    .ok()??;
    Some((socket, welcome))
}

async fn serve(
    mut socket: Socket,
    options: &ClientOptions,
    memory: &mut Memory,
    commands: &mut mpsc::Receiver<Command>,
    events: &mpsc::Sender<Event>,
) -> Ended {
    let mut pending: HashMap<String, Waiting> = HashMap::new();
    let mut last_seen = Instant::now();
    let mut heartbeat = tokio::time::interval(options.heartbeat);
    heartbeat.tick().await;

    let rejoins: Vec<(String, Option<u64>)> =
        memory.rooms.iter().map(|(r, o)| (r.clone(), *o)).collect();
    for (room, since) in rejoins {
        let id = memory.next_id();
        let mut body = json!({"type": "join", "room": room, "id": id});
        if let Some(since) = since {
            body["since"] = json!(since);
        }
        if socket
            .send(WsMessage::text(body.to_string()))
            .await
            .is_err()
        {
            return Ended::Lost;
        }
        pending.insert(id, Waiting::Rejoin(room));
    }

    let ended = loop {
        tokio::select! {
            command = commands.recv() => match command {
                None | Some(Command::Close) => {
                    let _ = socket.close(None).await;
                    break Ended::Final { code: 1000, reason: "client closed".into() };
                }
                Some(Command::Request { mut body, reply }) => {
                    if reply.is_closed() {
                        continue; // its caller gave up while it waited
                    }
                    let id = memory.next_id();
                    body["id"] = json!(id);
                    if let Some("join") = body["type"].as_str() {
                        let room = body["room"].as_str().unwrap_or_default().to_owned();
                        memory.rooms.entry(room).or_insert(None);
                    } else if let Some("leave") = body["type"].as_str() {
                        memory.rooms.remove(body["room"].as_str().unwrap_or_default());
                    }
                    if socket.send(WsMessage::text(body.to_string())).await.is_err() {
                        let _ = reply.send(Err(ClientError::Disconnected));
                        break Ended::Lost;
                    }
                    pending.insert(id, Waiting::Caller(reply));
                }
            },
            message = socket.next() => {
                last_seen = Instant::now();
                let message = match message {
                    Some(Ok(message)) => message,
                    _ => break Ended::Lost,
                };
                match message {
                    WsMessage::Text(text) => {
                        let Ok(event) = ServerEvent::decode(&text) else { continue };
                        let reply = handle(event, &text, memory, &mut pending, events, options).await;
                        if let Some(frame) = reply
                            && socket.send(WsMessage::text(frame)).await.is_err()
                        {
                            break Ended::Lost;
                        }
                    }
                    WsMessage::Binary(bytes) => {
                        if let Ok((header, payload)) = ServerEvent::decode_binary(&bytes)
                            && memory.first_sight(&header.id)
                        {
                            let _ = events.send(Event::Binary(header, payload)).await;
                        }
                    }
                    WsMessage::Close(frame) => {
                        let (code, reason) = frame
                            .map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new()));
                        if !herald_protocol::CloseCode::new(code, "").should_reconnect() {
                            break Ended::Final { code, reason };
                        }
                        break Ended::Lost;
                    }
                    _ => {}
                }
            }
            _ = heartbeat.tick() => {
                if last_seen.elapsed() > options.heartbeat * 2 {
                    break Ended::Lost;
                }
                let ping = json!({"type": "ping"}).to_string();
                if socket.send(WsMessage::text(ping)).await.is_err() {
                    break Ended::Lost;
                }
            }
        }
    };
    for (_, waiting) in pending {
        if let Waiting::Caller(reply) = waiting {
            let _ = reply.send(Err(ClientError::Disconnected));
        }
    }
    ended
}

/// Handles one event; returns a frame to send back (an inbox ack, a refresh).
async fn handle(
    event: ServerEvent,
    text: &str,
    memory: &mut Memory,
    pending: &mut HashMap<String, Waiting>,
    events: &mpsc::Sender<Event>,
    options: &ClientOptions,
) -> Option<String> {
    match event {
        ServerEvent::Message(message) => {
            if !memory.first_sight(&message.id) {
                return None;
            }
            let offset = offset_of(text);
            let mut reply = None;
            if let (Some(room), Some(offset)) = (&message.room, offset)
                && let Some(last) = memory.rooms.get_mut(room)
                && last.is_none_or(|last| offset > last)
            {
                *last = Some(offset);
            } else if let (Some(_), Some(offset)) = (&message.to, offset) {
                reply = Some(json!({"type": "ack", "inbox": offset}).to_string());
            }
            let _ = events.send(Event::Message(message)).await;
            reply
        }
        ServerEvent::Joined(change) => {
            let _ = events.send(Event::Joined(change)).await;
            None
        }
        ServerEvent::Left(change) => {
            let _ = events.send(Event::Left(change)).await;
            None
        }
        ServerEvent::Refresh(_) => {
            let token = (options.token)().await.ok()?;
            let id = memory.next_id();
            pending.insert(id.clone(), Waiting::Ignored);
            Some(json!({"type": "refresh", "token": token, "id": id}).to_string())
        }
        ServerEvent::Welcome(_) => None,
        answer => {
            let reference = reference_of(&answer)?;
            match pending.remove(&reference)? {
                Waiting::Caller(reply) => {
                    let result = match answer {
                        ServerEvent::Error(error) => Err(ClientError::Server {
                            code: error.code.as_str().to_owned(),
                            message: error.message,
                        }),
                        other => Ok(other),
                    };
                    let _ = reply.send(result);
                }
                Waiting::Rejoin(room) => {
                    if let ServerEvent::Error(error) = answer {
                        let _ = events.send(Event::Error(error)).await;
                    } else {
                        let recovered = recovered_of(text);
                        let _ = events.send(Event::Rejoined { room, recovered }).await;
                    }
                }
                Waiting::Ignored => {
                    if let ServerEvent::Error(error) = answer {
                        let _ = events.send(Event::Error(error)).await;
                    }
                }
            }
            None
        }
    }
}

fn reference_of(event: &ServerEvent) -> Option<String> {
    let reference = match event {
        ServerEvent::Ack(ack) => &ack.reference,
        ServerEvent::Members(members) => &members.reference,
        ServerEvent::Error(error) => &error.reference,
        ServerEvent::Pong(pong) => &pong.reference,
        ServerEvent::Presence(reply) => &reply.reference,
        _ => return None,
    };
    reference.clone()
}

/// The `offset` of a message event, read from its text so that this client works with servers
/// with and without durable delivery.
fn offset_of(text: &str) -> Option<u64> {
    serde_json::from_str::<Value>(text)
        .ok()?
        .get("offset")?
        .as_u64()
}

fn recovered_of(text: &str) -> Option<bool> {
    serde_json::from_str::<Value>(text)
        .ok()?
        .get("recovered")?
        .as_bool()
}
