//! The task that owns the WebSocket: connect, authenticate, serve, reconnect.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use herald_protocol::{Ack, Message, ServerEvent, Welcome};
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

/// Where the client is in a joined room's stream.
#[derive(Debug, Default, Clone)]
struct Position {
    /// The last offset seen; `None` before the join's ack.
    offset: Option<u64>,
    /// The epoch of the stream that offset belongs to; `None` until learned (an empty room has
    /// none yet). Offsets compare only within one epoch.
    epoch: Option<String>,
}

/// What the client remembers across connections.
struct Memory {
    /// Joined rooms and the position in each.
    rooms: HashMap<String, Position>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    /// Request ids are `<prefix>-<n>`: unique to this client, not only to its connection,
    /// since the server recognises a retried stored message by its user and id.
    id_prefix: String,
    next_id: u64,
    /// Stored publishes and direct messages whose connection was lost before their ack, in
    /// the order they were sent: sent again, with the same id, on the next connection.
    retries: Vec<Retry>,
}

/// A stored message's request to send again, and who waits for its answer.
struct Retry {
    sequence: u64,
    /// The request as sent, `id` included.
    body: Value,
    reply: Reply,
    notes: Notes,
}

impl Memory {
    fn new() -> Self {
        Memory {
            rooms: HashMap::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            id_prefix: format!("{:08x}", rand::random::<u32>()),
            next_id: 0,
            retries: Vec::new(),
        }
    }

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
        format!("{}-{}", self.id_prefix, self.next_id)
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
    /// An application request; its answer may also tell where the client is in a room. A
    /// stored message's request keeps its body (with its id and sequence) for a retry.
    Caller(Reply, Notes, Option<(u64, Value)>),
    /// A rejoin, and the joins of its room made offline, which its answer answers.
    Rejoin(String, Vec<Reply>),
    /// A one-entry history page asked for to learn a room's epoch.
    Epoch(String),
    Ignored,
}

/// What an application request's answer tells about a room's position.
enum Notes {
    Nothing,
    /// A `join`: its ack gives the position.
    Join(String),
    /// A `publish` or a room's `history`: its answer carries the room's epoch.
    Epoch(String),
}

pub(crate) async fn run(
    url: String,
    options: ClientOptions,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    state: watch::Sender<State>,
) {
    let mut memory = Memory::new();
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

/// Whether a request stores a message, and so is sent again after a lost connection: a `send`,
/// or a `publish` without `persist: false`.
fn is_stored(body: &Value) -> bool {
    match body["type"].as_str() {
        Some("send") => true,
        Some("publish") => body["persist"].as_bool() != Some(false),
        _ => false,
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

/// `url` with `device=ID` added to its query, the id percent-encoded.
fn with_device(url: &str, device: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    let mut encoded = String::with_capacity(device.len());
    for byte in device.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("{url}{separator}device={encoded}")
}

async fn open(url: &str, options: &ClientOptions) -> Option<(Socket, Welcome)> {
    let token = match (options.token)().await {
        Ok(token) => token,
        Err(error) => {
            tracing::warn!(%error, "token function failed");
            return None;
        }
    };
    let url = match &options.device {
        Some(device) => with_device(url, device),
        None => url.to_owned(),
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

    // Requests made offline, taken before the rejoins so that each room is joined once: a join
    // of a room the rejoin joins anyway waits for the rejoin's answer, and a leave of a tracked
    // room only forgets it (the server dropped the old connection's rooms with it).
    let mut queued = VecDeque::new();
    let mut joins: HashMap<String, Vec<Reply>> = HashMap::new();
    while let Ok(command) = commands.try_recv() {
        let Command::Request { body, reply } = command else {
            queued.push_back(command);
            break;
        };
        let room = body["room"].as_str().unwrap_or_default().to_owned();
        match body["type"].as_str() {
            Some("join") if memory.rooms.contains_key(&room) => {
                joins.entry(room).or_default().push(reply);
            }
            Some("leave") if memory.rooms.remove(&room).is_some() => {
                for join in joins.remove(&room).into_iter().flatten() {
                    let _ = join.send(Err(ClientError::Server {
                        code: "cancelled".into(),
                        message: format!("left room {room:?} before it was joined"),
                    }));
                }
                let ack = Ack {
                    room: Some(room),
                    ..Ack::default()
                };
                let _ = reply.send(Ok(ServerEvent::Ack(ack)));
            }
            _ => queued.push_back(Command::Request { body, reply }),
        }
    }

    let mut rejoins = Vec::new();
    for (room, position) in &mut memory.rooms {
        let mut body = json!({"type": "join", "room": room});
        if position.offset.is_some() {
            // An offset whose epoch was never learned cannot be told from an offset of a
            // recreated stream, so it is not trusted: since 0 asks for the whole room (the server
            // answers recovered:false beyond store.max_recovery) and the dedupe drops what was
            // seen.
            if position.epoch.is_none() {
                position.offset = Some(0);
            }
            body["since"] = json!(position.offset);
            if let Some(epoch) = &position.epoch {
                body["epoch"] = json!(epoch);
            }
        }
        rejoins.push((room.clone(), body));
    }
    for (room, mut body) in rejoins {
        let id = memory.next_id();
        body["id"] = json!(id);
        if socket
            .send(WsMessage::text(body.to_string()))
            .await
            .is_err()
        {
            return Ended::Lost;
        }
        let waiting = joins.remove(&room).unwrap_or_default();
        pending.insert(id, Waiting::Rejoin(room, waiting));
    }

    // Stored messages cut off with the last connection, before anything new.
    let mut retries = std::mem::take(&mut memory.retries);
    retries.sort_by_key(|retry| retry.sequence);
    for Retry {
        sequence,
        body,
        reply,
        notes,
    } in retries
    {
        let id = body["id"].as_str().unwrap_or_default().to_owned();
        if socket
            .send(WsMessage::text(body.to_string()))
            .await
            .is_err()
        {
            let _ = reply.send(Err(ClientError::Disconnected));
            return Ended::Lost;
        }
        pending.insert(id, Waiting::Caller(reply, notes, Some((sequence, body))));
    }

    let ended = loop {
        tokio::select! {
            command = async {
                match queued.pop_front() {
                    Some(command) => Some(command),
                    None => commands.recv().await,
                }
            } => match command {
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
                    let notes = memory.before_request(&body);
                    let retry = is_stored(&body).then(|| (memory.next_id, body.clone()));
                    if socket.send(WsMessage::text(body.to_string())).await.is_err() {
                        let _ = reply.send(Err(ClientError::Disconnected));
                        break Ended::Lost;
                    }
                    pending.insert(id, Waiting::Caller(reply, notes, retry));
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
                        let Ok((header, payload)) = ServerEvent::decode_binary(&bytes) else { continue };
                        let reply = note_message(&header, header.offset, memory, &mut pending);
                        if memory.first_sight(&header.id) {
                            let _ = events.send(Event::Binary(header, payload)).await;
                        }
                        if let Some(frame) = reply
                            && socket.send(WsMessage::text(frame)).await.is_err()
                        {
                            break Ended::Lost;
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
        match waiting {
            // Perhaps stored, perhaps not: the same id again tells the server it is a retry.
            Waiting::Caller(reply, notes, Some((sequence, body)))
                if matches!(ended, Ended::Lost) && !reply.is_closed() =>
            {
                memory.retries.push(Retry {
                    sequence,
                    body,
                    reply,
                    notes,
                });
            }
            Waiting::Caller(reply, ..) => {
                let _ = reply.send(Err(ClientError::Disconnected));
            }
            Waiting::Rejoin(_, replies) => {
                for reply in replies {
                    let _ = reply.send(Err(ClientError::Disconnected));
                }
            }
            _ => {}
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
            let reply = note_message(&message, offset_of(text), memory, pending);
            if memory.first_sight(&message.id) {
                let _ = events.send(Event::Message(message)).await;
            }
            reply
        }
        ServerEvent::PresenceDiff(diff) => {
            let _ = events.send(Event::Presence(diff)).await;
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
                Waiting::Caller(reply, notes, _) => {
                    match (&notes, &answer) {
                        (Notes::Join(room), ServerEvent::Ack(ack)) => memory.note_joined(room, ack),
                        (Notes::Epoch(room), ServerEvent::Ack(ack)) => {
                            memory.note_epoch(room, ack.epoch.as_deref());
                        }
                        (Notes::Epoch(room), ServerEvent::History(page)) => {
                            memory.note_epoch(room, page.epoch.as_deref());
                        }
                        _ => {}
                    }
                    let result = match answer {
                        ServerEvent::Error(error) => Err(ClientError::Server {
                            code: error.code.as_str().to_owned(),
                            message: error.message,
                        }),
                        other => Ok(other),
                    };
                    let _ = reply.send(result);
                }
                Waiting::Rejoin(room, replies) => match answer {
                    ServerEvent::Error(error) if replies.is_empty() => {
                        let _ = events.send(Event::Error(error)).await;
                    }
                    ServerEvent::Error(error) => {
                        for reply in replies {
                            let _ = reply.send(Err(ClientError::Server {
                                code: error.code.as_str().to_owned(),
                                message: error.message.clone(),
                            }));
                        }
                    }
                    ServerEvent::Ack(ack) => {
                        // Before the replayed messages behind the ack move the offset on.
                        memory.note_joined(&room, &ack);
                        for reply in replies {
                            let _ = reply.send(Ok(ServerEvent::Ack(ack.clone())));
                        }
                        let recovered = ack.recovered;
                        let _ = events.send(Event::Rejoined { room, recovered }).await;
                    }
                    _ => {}
                },
                Waiting::Epoch(room) => {
                    // On an error the next message of the room asks again.
                    if let ServerEvent::History(page) = answer {
                        memory.note_epoch(&room, page.epoch.as_deref());
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

/// Moves a room's position on with a message, duplicates included (a replay after `since: 0`
/// or `recovered: false` is mostly messages already seen). Returns a frame to send back: the
/// inbox ack of a direct message, or a one-entry history request that tells a room's epoch
/// when it is not known yet (a room joined while empty: its ack had none, messages carry none).
fn note_message(
    message: &Message,
    offset: Option<u64>,
    memory: &mut Memory,
    pending: &mut HashMap<String, Waiting>,
) -> Option<String> {
    let offset = offset?;
    if let Some(room) = &message.room {
        let position = memory.rooms.get_mut(room)?;
        if position.offset.is_none_or(|last| offset > last) {
            position.offset = Some(offset);
        }
        let asking = pending
            .values()
            .any(|waiting| matches!(waiting, Waiting::Epoch(r) if r == room));
        if position.epoch.is_some() || asking {
            return None;
        }
        let id = memory.next_id();
        pending.insert(id.clone(), Waiting::Epoch(room.clone()));
        return Some(json!({"type": "history", "room": room, "limit": 1, "id": id}).to_string());
    }
    message.to.as_ref()?;
    Some(json!({"type": "ack", "inbox": offset}).to_string())
}

impl Memory {
    /// Notes what an application request does to the rooms, before it is sent.
    fn before_request(&mut self, body: &Value) -> Notes {
        let room = body["room"].as_str().unwrap_or_default().to_owned();
        match body["type"].as_str() {
            Some("join") => {
                let since = body["since"].as_u64();
                let epoch = since.and(body["epoch"].as_str().map(str::to_owned));
                self.rooms.entry(room.clone()).or_insert(Position {
                    offset: since,
                    epoch,
                });
                Notes::Join(room)
            }
            Some("leave") => {
                self.rooms.remove(&room);
                Notes::Nothing
            }
            Some("publish" | "history") if !room.is_empty() => Notes::Epoch(room),
            _ => Notes::Nothing,
        }
    }

    /// Takes a room's position from the ack of a join (first join or rejoin), before the
    /// replayed messages behind it move the offset on.
    fn note_joined(&mut self, room: &str, ack: &Ack) {
        let Some(position) = self.rooms.get_mut(room) else {
            return; // left meanwhile
        };
        match ack.recovered {
            // The old offset means nothing in this stream: the page and the live messages
            // that follow count from its start.
            Some(false) => {
                *position = Position {
                    offset: Some(0),
                    epoch: ack.epoch.clone(),
                }
            }
            Some(true) => {
                if ack.epoch.is_some() {
                    position.epoch = ack.epoch.clone();
                }
            }
            None => {
                if position.offset.is_none() {
                    position.offset = ack.offset;
                }
                self.note_epoch(room, ack.epoch.as_deref());
            }
        }
    }

    /// An epoch read on this connection: the one of the stream its offsets of `room` come from.
    fn note_epoch(&mut self, room: &str, epoch: Option<&str>) {
        if let (Some(position), Some(epoch)) = (self.rooms.get_mut(room), epoch)
            && position.epoch.is_none()
        {
            position.epoch = Some(epoch.to_owned());
        }
    }
}

fn reference_of(event: &ServerEvent) -> Option<String> {
    let reference = match event {
        ServerEvent::Ack(ack) => &ack.reference,
        ServerEvent::History(history) => &history.reference,
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

#[cfg(test)]
mod tests {
    use super::with_device;

    #[test]
    fn the_device_id_joins_the_query_percent_encoded() {
        assert_eq!(
            with_device("ws://h/ws", "phone-1"),
            "ws://h/ws?device=phone-1"
        );
        assert_eq!(
            with_device("ws://h/ws?rooms=a", "ana's phone&1"),
            "ws://h/ws?rooms=a&device=ana%27s%20phone%261"
        );
    }
}
