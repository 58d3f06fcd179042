//! [`ServerSocket`]: yawc's server WebSocket as Herald runs it, closing as RFC 6455 §7 says,
//! keeping the Pongs it owes bounded, and compressing each [`Outbound`] message without
//! context takeover itself.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use futures::{Sink, SinkExt, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use yawc::{Frame, OpCode, Options, Role, WebSocket, WebSocketError};

use super::control_guard::{ControlFrameGuard, GuardState, WriteProgress};
use super::negotiation::{FULL_WINDOW_BITS, parse_offer};
use crate::deflate::{DeflateParams, SharedDeflate};

/// yawc's server WebSocket over a [`ControlFrameGuard`], closing the way RFC 6455 §7 says.
///
/// yawc leaves two gaps this wrapper fills:
/// - It queues its echo of the peer's Close and writes it on the next read, not on flush or
///   close; a caller that stops reading there sends its own Close 1000 instead. This stream
///   reads once more before it hands the Close on, so the echo goes first.
/// - On a protocol error it may queue a Close with a code of its own (1003 for a reserved
///   opcode), or none at all (invalid UTF-8, broken fragmentation), and its `close` then says
///   1000. This stream stops reading at the error, never lets that queue out, and makes its
///   `close` send the code [`failure_code`] gives: 1002, 1007 or 1009.
pub struct ServerSocket<S> {
    inner: WebSocket<ControlFrameGuard<S>>,
    state: State,
    /// What the guard saw: whether a protocol error is its doing, and the bytes written.
    guard: Arc<GuardState>,
    /// A Ping was handed on and yawc queued its Pong: the Pong goes out before the next read.
    pong_owed: bool,
    /// Set when outgoing messages are compressed without context takeover: by this socket,
    /// not by yawc.
    deflate: Option<DeflateParams>,
}

/// A frame for a [`ServerSocket`] to send, with the compressed forms its message shares with
/// other recipients, if it has any.
pub struct Outbound {
    frame: Frame,
    shared: Option<Arc<SharedDeflate>>,
}

impl Outbound {
    pub fn new(frame: Frame, shared: Option<Arc<SharedDeflate>>) -> Self {
        Outbound { frame, shared }
    }
}

impl From<Frame> for Outbound {
    fn from(frame: Frame) -> Self {
        Outbound::new(frame, None)
    }
}

enum State {
    Open,
    /// The peer sent this Close; the library's echo goes out before it is handed on.
    Echoing(Option<Frame>),
    /// The peer's Close was handed on; the stream has ended.
    Closed,
    /// Reading failed. The Close to send, unless the socket itself failed; `None` once sent.
    Failed(Option<Frame>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> ServerSocket<S> {
    /// Starts the WebSocket on `io`, an upgraded connection, with the agreed `extensions`
    /// (the response's `Sec-WebSocket-Extensions`, if any).
    pub fn new(
        io: S,
        extensions: Option<&str>,
        mut options: Options,
    ) -> Result<Self, WebSocketError> {
        let agreed = extensions.and_then(parse_offer);
        let deflate = match (agreed, options.compression.as_mut()) {
            (Some(agreed), Some(policy)) if agreed.server_no_context_takeover => {
                let params = DeflateParams::new(
                    policy.level.level(),
                    agreed.server_max_window_bits.unwrap_or(FULL_WINDOW_BITS),
                    policy.compression_threshold,
                );
                // Out of reach: this socket compresses, and yawc must not do it again.
                policy.compression_threshold = usize::MAX;
                Some(params)
            }
            _ => None,
        };
        let guard = ControlFrameGuard::new(io);
        let state = guard.state();
        let inner =
            WebSocket::from_stream_with_extensions(guard, Role::Server, extensions, options)?;
        Ok(ServerSocket {
            inner,
            state: State::Open,
            guard: state,
            pong_owed: false,
            deflate,
        })
    }

    /// A counter of the bytes written to the socket, which the writer watches to tell a slow
    /// write from one that makes no progress at all.
    pub fn write_progress(&self) -> WriteProgress {
        WriteProgress(self.guard.clone())
    }
}

/// The Close code that fails a connection after `error` (RFC 6455 §7.4.1), or `None` when the
/// socket itself is gone and nothing can be sent.
fn failure_code(error: &WebSocketError) -> Option<yawc::close::CloseCode> {
    use yawc::close::CloseCode;
    match error {
        WebSocketError::InvalidUTF8 => Some(CloseCode::Invalid),
        WebSocketError::FrameTooLarge => Some(CloseCode::Size),
        // yawc's inflater reports a corrupt compressed payload this way.
        WebSocketError::IoError(error) if error.kind() == io::ErrorKind::InvalidInput => {
            Some(CloseCode::Invalid)
        }
        WebSocketError::ConnectionClosed | WebSocketError::IoError(_) => None,
        _ => Some(CloseCode::Protocol),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for ServerSocket<S> {
    type Item = Frame;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Open if this.pong_owed => {
                    // yawc writes the Pongs it owes only when a read would block, so a peer that
                    // sends Pings without reading would have them pile up without bound. The
                    // sink's readiness writes them out: reading waits until they are gone.
                    if ready!(this.inner.poll_ready_unpin(cx)).is_err() {
                        this.state = State::Failed(None);
                        return Poll::Ready(None);
                    }
                    this.pong_owed = false;
                }
                State::Open => match ready!(this.inner.poll_next_frame(cx)) {
                    Ok(frame) if frame.opcode() == OpCode::Close => {
                        this.state = State::Echoing(Some(frame));
                    }
                    Ok(frame) => {
                        this.pong_owed = frame.opcode() == OpCode::Ping;
                        return Poll::Ready(Some(frame));
                    }
                    Err(error) => {
                        let close = failure_code(&error).map(|code| {
                            let reason = if this.guard.tripped.load(Ordering::Relaxed) {
                                "control frame payload over 125 bytes".to_owned()
                            } else {
                                error.to_string()
                            };
                            Frame::close(code, truncate(&reason, MAX_CLOSE_REASON_BYTES))
                        });
                        this.state = State::Failed(close);
                        return Poll::Ready(None);
                    }
                },
                State::Echoing(close) => {
                    // The library's stream has ended: this read only writes the echo it queued.
                    let _ = ready!(this.inner.poll_next_frame(cx));
                    let close = close.take();
                    this.state = State::Closed;
                    return Poll::Ready(close);
                }
                State::Closed | State::Failed(_) => return Poll::Ready(None),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Outbound> for ServerSocket<S> {
    type Error = WebSocketError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let State::Failed(_) = self.state {
            // The library's readiness would write the Close it queued, with its code.
            return Poll::Ready(Err(WebSocketError::ConnectionClosed));
        }
        self.inner.poll_ready_unpin(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, outbound: Outbound) -> Result<(), Self::Error> {
        if let State::Failed(_) = self.state {
            return Err(WebSocketError::ConnectionClosed);
        }
        let frame = match &self.deflate {
            Some(deflate) => deflate.prepare(outbound.frame, outbound.shared.as_deref()),
            None => outbound.frame,
        };
        self.inner.start_send_unpin(frame)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_flush_unpin(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let State::Failed(close) = &mut self.state
            && let Some(close) = close.take()
        {
            // Straight into the write buffer, after whole frames: readiness is skipped on
            // purpose (see poll_ready). Once a Close is written the library sends no other.
            self.inner.start_send_unpin(close)?;
        }
        self.inner.poll_close_unpin(cx)
    }
}

/// Room for the reason in a Close frame: 125 payload bytes less the 2-byte code.
const MAX_CLOSE_REASON_BYTES: usize = 123;

/// The longest prefix of `text` within `max` bytes that ends on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CompressionConfig;
    use crate::transport::server_options;
    use crate::transport::test_frames::{CLOSE, TEXT, client_frame};
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Runs an echo server on one end of a pipe, writes `frames` from the other, and returns
    /// the code and reason of the first Close frame the server sends. Text is echoed first, so every
    /// frame before the last must be accepted.
    async fn close_after(frames: &[Vec<u8>]) -> (u16, String) {
        let (mut peer, server_side) = tokio::io::duplex(1 << 20);
        let options = server_options(1024, &CompressionConfig::default());
        let mut socket = ServerSocket::new(server_side, None, options).unwrap();
        let server = tokio::spawn(async move {
            while let Some(frame) = socket.next().await {
                if frame.opcode() == OpCode::Text {
                    let echo = Frame::text(frame.into_payload());
                    socket.send(echo.into()).await.unwrap();
                }
            }
            // As Herald's writer does once the reader has stopped.
            let _ = socket.close().await;
        });
        for frame in frames {
            peer.write_all(frame).await.unwrap();
        }
        let close = loop {
            let mut head = [0; 2];
            peer.read_exact(&mut head).await.unwrap();
            assert!(head[1] < 126, "a short frame from the server: {head:?}");
            let mut payload = vec![0; usize::from(head[1])];
            peer.read_exact(&mut payload).await.unwrap();
            if head[0] == 0x80 | u8::from(OpCode::Close) {
                let reason = String::from_utf8(payload[2..].to_vec()).unwrap();
                break (u16::from_be_bytes([payload[0], payload[1]]), reason);
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("the server ends the connection")
            .unwrap();
        close
    }

    #[tokio::test]
    async fn a_close_frame_over_125_bytes_fails_the_connection_with_1002() {
        let mut close = client_frame(CLOSE, 126);
        close[8..10].copy_from_slice(&1000u16.to_be_bytes());
        let (code, reason) = close_after(&[client_frame(TEXT, 5), close]).await;
        assert_eq!(code, 1002);
        assert_eq!(reason, "control frame payload over 125 bytes");
    }

    #[tokio::test]
    async fn protocol_errors_fail_the_connection_with_the_rfc_6455_code() {
        let mut bad_utf8 = client_frame(TEXT, 2);
        bad_utf8[6..].copy_from_slice(&[0xC0, 0xAF]);
        let cases = [
            ("reserved opcode", client_frame(0x83, 1), 1002),
            ("continuation without a start", client_frame(0x80, 1), 1002),
            (
                "text inside a fragmented message",
                {
                    let mut frames = client_frame(0x01, 1);
                    frames.extend(client_frame(TEXT, 1));
                    frames
                },
                1002,
            ),
            ("invalid UTF-8", bad_utf8, 1007),
            ("message over the limit", client_frame(TEXT, 1025), 1009),
        ];
        for (what, frames, code) in cases {
            let (sent, reason) = close_after(&[client_frame(TEXT, 5), frames]).await;
            assert_eq!(sent, code, "{what}: {reason}");
        }
    }

    #[tokio::test]
    async fn the_peers_close_is_echoed_before_the_socket_hands_it_on() {
        let (mut peer, server_side) = tokio::io::duplex(4096);
        let options = server_options(1024, &CompressionConfig::default());
        let mut socket = ServerSocket::new(server_side, None, options).unwrap();
        let server = tokio::spawn(async move {
            let close = socket.next().await.expect("the peer's close");
            // What Herald's writer does next: close its side, which alone would say 1000.
            let _ = socket.close().await;
            close.close_code()
        });

        let mut close = client_frame(CLOSE, 2);
        close[6..8].copy_from_slice(&1001u16.to_be_bytes());
        peer.write_all(&close).await.unwrap();
        let mut head = [0; 4];
        peer.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x80 | u8::from(OpCode::Close));
        assert_eq!(u16::from_be_bytes([head[2], head[3]]), 1001);
        assert_eq!(
            server.await.unwrap(),
            Some(yawc::close::CloseCode::Away),
            "the close is still handed on"
        );
    }
}
