//! One client connection: open it (source address, WebSocket handshake), bring it to the state a
//! scenario needs (authenticated, rooms joined), then serve it: record deliveries, answer what
//! the protocol asks, write what the pacer queues.
//!
//! The client is tokio-tungstenite with a small read buffer (its 128 KiB default would cost
//! 2.4 GiB at 19k connections). A connection is one task that owns the whole socket: reading
//! and writing alternate in one `select!`, so there is no lock between two halves.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};
use tokio_util::sync::CancellationToken;

use crate::adapter::{Incoming, Protocol};
use crate::net::SourceAddrs;
use crate::recorder::Recorder;
use crate::stamp;

/// Read buffer per connection: enough for a burst of small messages, small enough for 100k.
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// Most queued frames written before one flush.
const MAX_WRITE_BATCH: usize = 64;
/// How long a stopping connection waits for its Close frame to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

pub type Socket = WebSocketStream<TcpStream>;

/// One address of the server and how connections to it are made.
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The `Host` of the WebSocket URL (the address unless a name was given).
    pub host: String,
    pub sources: SourceAddrs,
}

/// Where and how every connection of a run connects.
pub struct Env {
    pub protocol: Arc<dyn Protocol>,
    /// The server's addresses (one per node when several serve as one); at least one.
    pub endpoints: Vec<Endpoint>,
    pub recorder: Arc<Recorder>,
    /// Longest wait for any one setup step (TCP connect, upgrade, ready, each join).
    pub step_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {target} from {source_addr:?}: {error}")]
    Connect {
        target: SocketAddr,
        source_addr: Option<IpAddr>,
        error: std::io::Error,
    },
    #[error("WebSocket handshake failed: {0}")]
    Handshake(tungstenite::Error),
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("no {0} within the step timeout")]
    Timeout(&'static str),
    #[error("the connection closed while waiting for {0}")]
    Closed(&'static str),
    #[error("WebSocket error: {0}")]
    Socket(tungstenite::Error),
}

impl Env {
    /// The endpoint connection number `index` uses when connections are spread round-robin.
    pub fn round_robin(&self, index: usize) -> usize {
        index % self.endpoints.len()
    }

    /// Opens TCP and WebSocket for connection number `index` to endpoint `endpoint`, presenting
    /// `token`.
    pub async fn open(
        &self,
        endpoint: usize,
        index: u64,
        token: &str,
    ) -> Result<Socket, ClientError> {
        let Endpoint {
            addr: target,
            host,
            sources,
        } = &self.endpoints[endpoint];
        let target = *target;
        let source_addr = sources.for_connection(index);
        let connect_error = |error| ClientError::Connect {
            target,
            source_addr,
            error,
        };
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(connect_error)?;
        if let Some(ip) = source_addr {
            socket.bind(SocketAddr::new(ip, 0)).map_err(connect_error)?;
        }
        let stream = tokio::time::timeout(self.step_timeout, socket.connect(target))
            .await
            .map_err(|_| ClientError::Timeout("TCP connection"))?
            .map_err(connect_error)?;
        stream.set_nodelay(true).map_err(connect_error)?;
        let url = format!("ws://{host}{}", self.protocol.path(token));
        let request = url.into_client_request().map_err(ClientError::Handshake)?;
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0);
        let (socket, _response) = tokio::time::timeout(
            self.step_timeout,
            client_async_with_config(request, stream, Some(config)),
        )
        .await
        .map_err(|_| ClientError::Timeout("WebSocket upgrade"))?
        .map_err(ClientError::Handshake)?;
        Ok(socket)
    }

    /// Opens connection `index` to endpoint `endpoint` and waits until the server accepts
    /// requests on it.
    pub async fn open_ready(
        &self,
        endpoint: usize,
        index: u64,
        token: &str,
    ) -> Result<Socket, ClientError> {
        let mut socket = self.open(endpoint, index, token).await?;
        if let Some(opening) = self.protocol.opening(token) {
            socket
                .send(Message::text(opening))
                .await
                .map_err(ClientError::Socket)?;
        }
        self.wait_for(&mut socket, index as usize, &Incoming::Ready, "ready")
            .await?;
        Ok(socket)
    }

    /// Joins each room in turn, waiting for each acknowledgement.
    pub async fn join_rooms(
        &self,
        socket: &mut Socket,
        conn: usize,
        rooms: &[String],
    ) -> Result<(), ClientError> {
        for room in rooms {
            socket
                .send(Message::text(self.protocol.join(room)))
                .await
                .map_err(ClientError::Socket)?;
            self.wait_for(socket, conn, &Incoming::Joined, "join acknowledgement")
                .await?;
        }
        Ok(())
    }

    /// Reads frames until one decodes as `wanted`, handling the others as the traffic loop does.
    async fn wait_for(
        &self,
        socket: &mut Socket,
        conn: usize,
        wanted: &Incoming,
        what: &'static str,
    ) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + self.step_timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline, socket.next())
                .await
                .map_err(|_| ClientError::Timeout(what))?;
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) | None => return Err(ClientError::Closed(what)),
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(ClientError::Socket(error)),
            };
            match self.protocol.decode(&text) {
                incoming if &incoming == wanted => return Ok(()),
                Incoming::Refused(reason) => return Err(ClientError::Refused(reason)),
                Incoming::Reply(reply) => socket
                    .send(Message::text(reply))
                    .await
                    .map_err(ClientError::Socket)?,
                Incoming::Delivery { sent_ns } => self
                    .recorder
                    .delivery(conn, stamp::now_ns().saturating_sub(sent_ns)),
                _ => {}
            }
        }
    }

    /// Serves an established connection until `stop`: records deliveries, answers the protocol,
    /// writes the frames the pacer queues (everything already queued, then one flush).
    pub async fn serve(
        &self,
        mut socket: Socket,
        conn: usize,
        mut outgoing: mpsc::Receiver<String>,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(MAX_WRITE_BATCH);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                frame = socket.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                            self.recorder.lost_connection();
                            return;
                        }
                        Some(Ok(_)) => continue,
                    };
                    match self.protocol.decode(&text) {
                        Incoming::Delivery { sent_ns } => self
                            .recorder
                            .delivery(conn, stamp::now_ns().saturating_sub(sent_ns)),
                        Incoming::Reply(reply) => {
                            if socket.send(Message::text(reply)).await.is_err() {
                                self.recorder.lost_connection();
                                return;
                            }
                        }
                        Incoming::Refused(reason) => self.recorder.refused(reason),
                        Incoming::Ready
                        | Incoming::Joined
                        | Incoming::Presence { .. }
                        | Incoming::Other => {}
                    }
                }
                received = outgoing.recv_many(&mut batch, MAX_WRITE_BATCH) => {
                    if received == 0 {
                        break;
                    }
                    if write_all(&mut socket, &mut batch).await.is_err() {
                        self.recorder.lost_connection();
                        return;
                    }
                }
            }
        }
        let _ = tokio::time::timeout(CLOSE_WAIT, socket.close(None)).await;
    }
}

/// Writes every queued frame, then flushes once.
async fn write_all(socket: &mut Socket, batch: &mut Vec<String>) -> Result<(), tungstenite::Error> {
    for text in batch.drain(..) {
        socket.feed(Message::text(text)).await?;
    }
    socket.flush().await
}
