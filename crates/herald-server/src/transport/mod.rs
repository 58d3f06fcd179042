//! Herald's WebSocket transport: how an HTTP request becomes a WebSocket (RFC 6455), with which
//! limits and which extension. The server and the conformance echo example
//! (`examples/echo.rs`) both go through here, so the Autobahn run tests exactly what clients get.
//!
//! The library is `yawc`: it validates frames, reassembles fragments, checks UTF-8, answers Ping
//! and Close, closes with 1009 when a frame or a reassembled message reaches the size limit, and
//! runs permessage-deflate (RFC 7692). Herald adds three things around it:
//!
//! - **Negotiation** ([`negotiate`]). yawc reads `Sec-WebSocket-Extensions` as one offer,
//!   declines a header holding several, and may accept a window size it cannot keep. Herald
//!   parses the offers itself, accepts the first it can honour, writes the response header, and
//!   starts yawc's codec on exactly those terms.
//! - **[`ControlFrameGuard`]**. yawc answers a Close frame whose payload exceeds 125 bytes as an
//!   ordinary close (1000), where RFC 6455 §5.5 requires failing the connection (1002).
//! - **[`ServerSocket`]**, which closes as RFC 6455 §7 says: the peer's Close is echoed, and a
//!   protocol error gets 1002, 1007 or 1009, where yawc would send 1003, nothing, or the 1000
//!   its own `close` adds. It also keeps yawc's Pongs bounded: yawc queues one per Ping and
//!   writes them only when a read would block, so a peer sending Pings without reading grew
//!   that queue without end; this socket reads nothing more until the Pong it owes is written.
//!
//! Outgoing compression without server context takeover (the default) is Herald's
//! ([`crate::deflate`]): the socket compresses each [`Outbound`] message itself, or takes the
//! form other recipients of the same message already compressed with the same terms, so a
//! message going to N deflate connections is compressed once. yawc compresses nothing on such
//! a connection; with server context takeover it compresses per connection, as before.
//! Memory: yawc borrows its deflate state for incoming messages (and for outgoing ones with
//! context takeover off) from one process-wide [`DeflatePool`] for one message at a time, and
//! Herald's outgoing state is per worker thread, so an idle connection holds none.
//! `docs/benchmarks.md` (#15 §3) gives the measured price per delivery.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};

use futures::{Sink, SinkExt, Stream};
use http::{HeaderMap, HeaderValue, Request, header};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use yawc::{
    CompressionLevel, DeflateOptions, DeflatePool, Frame, HttpResponse, OpCode, Options, Role,
    WebSocket, WebSocketError,
};

use crate::config::{CompressionConfig, WINDOW_BITS};
use crate::deflate::{DeflateParams, SharedDeflate};

/// A server-side WebSocket as Herald runs it, on the upgraded HTTP connection.
pub type Socket = ServerSocket<TokioIo<Upgraded>>;

/// Socket buffer sizes, small because most connections are idle most of the time. The read
/// buffer must exist while waiting for data; 256 bytes holds a typical client request whole
/// (a chat message, a join, an ack), and it grows for a larger frame and shrinks back after
/// it. 512 cost every idle connection a quarter of a KiB more; `docs/benchmarks.md` gives
/// what a larger frame pays for the regrowth. The write buffer starts empty
/// and grows with what is written (an idle connection has been sent only its `welcome`);
/// yawc gives back what grew past its backpressure boundary (8 KiB) after each flush.
const READ_BUFFER_BYTES: usize = 256;
const WRITE_BUFFER_BYTES: usize = 0;

/// The window size deflate uses when nothing smaller was agreed.
const FULL_WINDOW_BITS: u8 = 15;

/// Deflate state for directions without context takeover, shared by every connection in the
/// process. It only holds state between two messages, so its size follows the worker threads
/// compressing at the same moment, not the connections, and one pool serves every server a
/// process runs (the tests run several).
static DEFLATE_POOL: LazyLock<DeflatePool> = LazyLock::new(|| {
    let workers = std::thread::available_parallelism().map_or(4, usize::from);
    DeflatePool::new(2 * workers)
});

/// Library options for a server connection accepting messages up to `max_message_bytes`, with
/// permessage-deflate offered to clients as `compression` says.
pub fn server_options(max_message_bytes: usize, compression: &CompressionConfig) -> Options {
    // yawc's limits are exclusive: a payload of exactly the limit is refused. They bound the
    // inflated size too, so a small compressed frame cannot expand past them.
    let limit = max_message_bytes.saturating_add(1);
    let options = Options::default()
        .with_limits(limit, limit)
        .with_utf8()
        .with_no_delay()
        .with_read_buffer_capacity(READ_BUFFER_BYTES)
        .with_write_buffer_capacity(WRITE_BUFFER_BYTES)
        .without_compression();
    if !compression.enabled {
        return options;
    }
    let deflate = DeflateOptions {
        level: CompressionLevel::new(compression.level.min(9)),
        server_max_window_bits: Some(clamp_window_bits(compression.server_max_window_bits)),
        client_max_window_bits: Some(clamp_window_bits(compression.client_max_window_bits)),
        server_no_context_takeover: compression.server_no_context_takeover,
        client_no_context_takeover: compression.client_no_context_takeover,
        compression_threshold: compression.threshold,
        pool: Some(DEFLATE_POOL.clone()),
    };
    Options {
        compression: Some(deflate),
        ..options
    }
}

fn clamp_window_bits(bits: u8) -> u8 {
    bits.clamp(*WINDOW_BITS.start(), *WINDOW_BITS.end())
}

/// Answers a WebSocket upgrade request: the 101 response to return, and the future that yields
/// the WebSocket once the response is out.
///
/// permessage-deflate is agreed here when `options` enable it and the client offers terms
/// Herald can keep; the response's `Sec-WebSocket-Extensions` states the agreement.
pub fn upgrade<B>(
    request: &mut Request<B>,
    options: Options,
) -> Result<
    (
        HttpResponse,
        impl Future<Output = Result<Socket, WebSocketError>> + Send + 'static,
    ),
    WebSocketError,
> {
    let agreed = options
        .compression
        .as_ref()
        .and_then(|policy| negotiate(request.headers(), policy))
        .and_then(|agreement| HeaderValue::from_str(&agreement.to_string()).ok());
    // yawc checks the key and version and builds the 101; it must not see the offers, or it
    // would answer them on its own terms.
    request
        .headers_mut()
        .remove(header::SEC_WEBSOCKET_EXTENSIONS);
    // Taken before yawc's upgrade takes it: its upgrade future can only yield a bare socket,
    // and Herald's runs inside the guard.
    let on_upgrade = hyper::upgrade::on(&mut *request);
    let (mut response, _bare_socket) =
        WebSocket::upgrade_with_options(&mut *request, Options::default())?;
    if let Some(value) = &agreed {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_EXTENSIONS, value.clone());
    }
    let socket = async move {
        let io = TokioIo::new(on_upgrade.await?);
        let extensions = agreed.as_ref().and_then(|value| value.to_str().ok());
        ServerSocket::new(io, extensions, options)
    };
    Ok((response, socket))
}

/// The permessage-deflate terms of one connection, as the response header states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Agreement {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    client_max_window_bits: Option<u8>,
}

impl fmt::Display for Agreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("permessage-deflate")?;
        if self.server_no_context_takeover {
            f.write_str("; server_no_context_takeover")?;
        }
        if self.client_no_context_takeover {
            f.write_str("; client_no_context_takeover")?;
        }
        if let Some(bits) = self.server_max_window_bits {
            write!(f, "; server_max_window_bits={bits}")?;
        }
        if let Some(bits) = self.client_max_window_bits {
            write!(f, "; client_max_window_bits={bits}")?;
        }
        Ok(())
    }
}

/// One valid permessage-deflate offer (RFC 7692 §7.1).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    /// The largest window the client will inflate with; absent means 15 bits.
    server_max_window_bits: Option<u8>,
    /// Present when the client can limit its own window; the value, if any, is a hint.
    client_max_window_bits: Option<Option<u8>>,
}

/// Picks the first permessage-deflate offer the server can honour under `policy`, in the
/// client's order of preference (RFC 7692 §5), across every `Sec-WebSocket-Extensions` line.
/// Other extensions and invalid offers are declined one by one, never the whole header.
fn negotiate(headers: &HeaderMap, policy: &DeflateOptions) -> Option<Agreement> {
    headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| split_unquoted(value, ','))
        .filter_map(parse_offer)
        .find_map(|offer| agree(&offer, policy))
}

/// The server's answer to one offer, or `None` to decline it.
fn agree(offer: &Offer, policy: &DeflateOptions) -> Option<Agreement> {
    let server_limit = policy
        .server_max_window_bits
        .map_or(FULL_WINDOW_BITS, clamp_window_bits);
    let server_max_window_bits = match offer.server_max_window_bits {
        // The client cannot inflate anything larger, and deflate cannot go below 9 bits.
        Some(asked) if asked < *WINDOW_BITS.start() => return None,
        // Accepting this parameter means answering it with the same value or a smaller one.
        Some(asked) => Some(asked.min(server_limit)),
        // The server may announce a smaller window than the client could take.
        None => (server_limit < FULL_WINDOW_BITS).then_some(server_limit),
    };
    let client_limit = policy
        .client_max_window_bits
        .map_or(FULL_WINDOW_BITS, clamp_window_bits);
    let client_max_window_bits = match offer.client_max_window_bits {
        // A response must not limit a client that did not offer to be limited.
        None => None,
        Some(hint) => {
            let bits = hint.map_or(client_limit, |hint| hint.min(client_limit));
            (bits < FULL_WINDOW_BITS).then_some(bits)
        }
    };
    Some(Agreement {
        server_no_context_takeover: offer.server_no_context_takeover
            || policy.server_no_context_takeover,
        // Confirming the client's own hint costs it nothing and lets the server inflate with
        // pooled state.
        client_no_context_takeover: offer.client_no_context_takeover
            || policy.client_no_context_takeover,
        server_max_window_bits,
        client_max_window_bits,
    })
}

/// Reads one extension from a `Sec-WebSocket-Extensions` list; `None` when it is not
/// permessage-deflate or breaks RFC 7692 §7.1 (unknown or repeated parameter, bad value).
fn parse_offer(extension: &str) -> Option<Offer> {
    let mut parts = split_unquoted(extension, ';').into_iter();
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut offer = Offer::default();
    for parameter in parts {
        let (name, value) = match parameter.split_once('=') {
            Some((name, value)) => (name.trim_end(), Some(unquote(value.trim_start()))),
            None => (parameter, None),
        };
        let name = name.to_ascii_lowercase();
        match (name.as_str(), value) {
            ("server_no_context_takeover", None) if !offer.server_no_context_takeover => {
                offer.server_no_context_takeover = true;
            }
            ("client_no_context_takeover", None) if !offer.client_no_context_takeover => {
                offer.client_no_context_takeover = true;
            }
            ("server_max_window_bits", Some(value)) if offer.server_max_window_bits.is_none() => {
                offer.server_max_window_bits = Some(window_bits(value)?);
            }
            ("client_max_window_bits", value) if offer.client_max_window_bits.is_none() => {
                offer.client_max_window_bits = Some(match value {
                    Some(value) => Some(window_bits(value)?),
                    None => None,
                });
            }
            _ => return None,
        }
    }
    Some(offer)
}

/// A window size as RFC 7692 writes it: 8 to 15, no leading zero.
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// A parameter value may be a quoted string (RFC 6455 §9.1); window sizes never need escapes.
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(value)
}

/// Splits at `separator` outside quoted strings, trimming each part.
fn split_unquoted(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(text[start..at].trim());
                start = at + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(text[start..].trim());
    parts
}

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

/// Bytes written to one socket so far (see [`ServerSocket::write_progress`]).
#[derive(Clone)]
pub struct WriteProgress(Arc<GuardState>);

impl WriteProgress {
    pub fn bytes(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
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

/// Fails a connection whose peer sends a control frame with more than 125 bytes of payload
/// (RFC 6455 §5.5). yawc checks this for Ping only, and echoes such a Close as a normal one.
///
/// The guard follows frame headers as the bytes go by: a few operations per frame, payloads
/// skipped, not scanned. At the second header byte of an oversized control frame it rewrites
/// that byte to "unmasked, no payload", which yawc's server codec rejects as a protocol error
/// the moment it decodes it: yawc sends Close 1002 and ends the connection. Nothing after
/// that byte is decoded.
///
/// It also counts the bytes written, so the writer can tell a stalled socket from a slow one.
pub struct ControlFrameGuard<S> {
    inner: S,
    scanner: HeaderScanner,
    state: Arc<GuardState>,
}

/// What a [`ControlFrameGuard`] shares with the socket above it; one allocation for both.
#[derive(Default)]
struct GuardState {
    /// Set when the guard turned a frame away, so the Close can name the real reason.
    tripped: AtomicBool,
    /// Bytes written to the socket so far.
    written: AtomicU64,
}

impl<S> ControlFrameGuard<S> {
    pub fn new(inner: S) -> Self {
        ControlFrameGuard {
            inner,
            scanner: HeaderScanner::default(),
            state: Arc::default(),
        }
    }

    fn state(&self) -> Arc<GuardState> {
        self.state.clone()
    }

    fn count_written(&self, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(bytes)) = written {
            self.state
                .written
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
        written
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ControlFrameGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let start = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.scanner.scan(&mut buf.filled_mut()[start..]) {
            this.state.tripped.store(true, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ControlFrameGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count_written(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count_written(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The longest frame header: 2 bytes, an 8-byte extended length, a 4-byte mask.
const MAX_HEADER_BYTES: usize = 14;
/// The largest payload a control frame may carry.
const MAX_CONTROL_PAYLOAD: u8 = 125;

/// Where the incoming byte stream is, frame by frame. Invariant: it stays in step with yawc's
/// decoder, since both start at the first byte after the upgrade and read the same bytes.
#[derive(Debug, Clone, Copy)]
enum HeaderScanner {
    /// Inside a frame header, `seen` bytes of it so far.
    Header {
        head: [u8; MAX_HEADER_BYTES],
        seen: usize,
    },
    /// Inside a payload, with this many bytes to go.
    Payload(u64),
    /// An oversized control frame was turned away; what follows is never decoded.
    Tripped,
}

impl Default for HeaderScanner {
    fn default() -> Self {
        HeaderScanner::Header {
            head: [0; MAX_HEADER_BYTES],
            seen: 0,
        }
    }
}

impl HeaderScanner {
    /// Follows `bytes`, just read, and defuses an oversized control frame among them; true
    /// when it did.
    fn scan(&mut self, bytes: &mut [u8]) -> bool {
        let mut at = 0;
        while at < bytes.len() {
            match self {
                HeaderScanner::Tripped => return false,
                HeaderScanner::Payload(remaining) => {
                    let skipped = (*remaining).min((bytes.len() - at) as u64);
                    // `skipped` is at most `bytes.len() - at`, so it fits in usize.
                    at += skipped as usize;
                    *remaining -= skipped;
                    if *remaining == 0 {
                        *self = HeaderScanner::default();
                    }
                }
                HeaderScanner::Header { head, seen } => {
                    head[*seen] = bytes[at];
                    *seen += 1;
                    if *seen == 2 && is_control(head[0]) && head[1] & 0x7F > MAX_CONTROL_PAYLOAD {
                        bytes[at] = 0;
                        *self = HeaderScanner::Tripped;
                        return true;
                    }
                    at += 1;
                    if *seen >= 2 && *seen == header_len(head[1]) {
                        let payload = payload_len(head);
                        *self = if payload == 0 {
                            HeaderScanner::default()
                        } else {
                            HeaderScanner::Payload(payload)
                        };
                    }
                }
            }
        }
        false
    }
}

/// Control opcodes have the high bit of the opcode nibble set (RFC 6455 §5.5).
fn is_control(first: u8) -> bool {
    first & 0x08 != 0
}

/// Header length from its second byte: the length code and the mask bit.
fn header_len(second: u8) -> usize {
    let extended = match second & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// Payload length from a complete header.
fn payload_len(head: &[u8; MAX_HEADER_BYTES]) -> u64 {
    let [_, second, b2, b3, b4, b5, b6, b7, b8, b9, ..] = *head;
    match second & 0x7F {
        126 => u64::from(u16::from_be_bytes([b2, b3])),
        127 => u64::from_be_bytes([b2, b3, b4, b5, b6, b7, b8, b9]),
        short => u64::from(short),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn policy(adjust: impl FnOnce(&mut CompressionConfig)) -> DeflateOptions {
        let mut config = CompressionConfig {
            enabled: true,
            ..CompressionConfig::default()
        };
        adjust(&mut config);
        server_options(1024, &config).compression.unwrap()
    }

    fn answer(offers: &str, policy: &DeflateOptions) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_str(offers).unwrap(),
        );
        negotiate(&headers, policy).map(|agreement| agreement.to_string())
    }

    #[test]
    fn a_plain_offer_gets_no_context_takeover_both_ways_by_default() {
        assert_eq!(
            answer("permessage-deflate", &policy(|_| {})).as_deref(),
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
        );
    }

    #[test]
    fn context_takeover_is_kept_when_configured_unless_the_client_refuses_it() {
        let keep = policy(|c| {
            c.server_no_context_takeover = false;
            c.client_no_context_takeover = false;
        });
        assert_eq!(
            answer("permessage-deflate", &keep).as_deref(),
            Some("permessage-deflate")
        );
        assert_eq!(
            answer("permessage-deflate; server_no_context_takeover", &keep).as_deref(),
            Some("permessage-deflate; server_no_context_takeover")
        );
    }

    #[test]
    fn a_requested_server_window_is_answered_with_that_size_or_smaller() {
        assert_eq!(
            answer(
                "permessage-deflate; server_max_window_bits=10",
                &policy(|_| {})
            )
            .as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=10"
            )
        );
        let small = policy(|c| c.server_max_window_bits = 11);
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=13", &small).as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=11"
            )
        );
    }

    #[test]
    fn an_offer_needing_an_8_bit_window_is_declined_for_the_next_one() {
        let only_8 = "permessage-deflate; server_max_window_bits=8";
        assert_eq!(answer(only_8, &policy(|_| {})), None);
        let answer = answer(
            &format!("{only_8}, permessage-deflate; server_max_window_bits=9"),
            &policy(|_| {}),
        )
        .unwrap();
        assert!(answer.ends_with("server_max_window_bits=9"), "{answer}");
    }

    #[test]
    fn the_client_window_is_limited_only_when_the_client_offers_it() {
        let small = policy(|c| c.client_max_window_bits = 10);
        assert!(
            !answer("permessage-deflate", &small)
                .unwrap()
                .contains("client_max_window_bits")
        );
        assert!(
            answer("permessage-deflate; client_max_window_bits", &small)
                .unwrap()
                .ends_with("client_max_window_bits=10")
        );
        assert!(
            answer("permessage-deflate; client_max_window_bits=9", &small)
                .unwrap()
                .ends_with("client_max_window_bits=9")
        );
        // A full window need not be stated.
        assert!(
            !answer(
                "permessage-deflate; client_max_window_bits",
                &policy(|_| {})
            )
            .unwrap()
            .contains("client_max_window_bits")
        );
    }

    #[test]
    fn the_first_acceptable_of_several_offers_is_taken() {
        let answer = answer(
            "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=12; \
             client_max_window_bits, permessage-deflate",
            &policy(|_| {}),
        )
        .unwrap();
        assert!(answer.contains("server_max_window_bits=12"), "{answer}");
    }

    #[test]
    fn offers_breaking_rfc_7692_are_declined() {
        for offer in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; mystery",
            "permessage-deflate;",
            "deflate-frame",
        ] {
            assert_eq!(answer(offer, &policy(|_| {})), None, "{offer}");
        }
    }

    #[test]
    fn quoted_values_and_loose_spacing_are_read() {
        let answer = answer(
            "Permessage-Deflate ;  server_max_window_bits = \"10\" ; client_max_window_bits",
            &policy(|_| {}),
        )
        .unwrap();
        assert!(answer.contains("server_max_window_bits=10"), "{answer}");
    }

    #[test]
    fn a_comma_inside_quotes_does_not_split_offers() {
        assert_eq!(
            split_unquoted(r#"a; p="x,y", b"#, ','),
            [r#"a; p="x,y""#, "b"]
        );
    }

    /// A masked client frame with `payload_len` bytes of payload.
    fn client_frame(first: u8, payload_len: usize) -> Vec<u8> {
        let mut frame = vec![first];
        match payload_len {
            0..=125 => frame.push(0x80 | payload_len as u8),
            126..=65535 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[0; 4]);
        frame.resize(frame.len() + payload_len, b'*');
        frame
    }

    const TEXT: u8 = 0x81;
    const CLOSE: u8 = 0x88;
    const PONG: u8 = 0x8A;

    /// Feeds `stream` to a scanner in pieces of `piece` bytes; returns what came out.
    fn scan_in_pieces(stream: &[u8], piece: usize) -> Vec<u8> {
        let mut scanner = HeaderScanner::default();
        let mut out = stream.to_vec();
        for chunk in out.chunks_mut(piece) {
            scanner.scan(chunk);
        }
        out
    }

    #[test]
    fn frames_within_the_rules_pass_untouched_however_the_reads_split() {
        let mut stream = Vec::new();
        for (first, len) in [
            (TEXT, 0),
            (TEXT, 125),
            (TEXT, 126),
            (TEXT, 70_000),
            (CLOSE, 125),
            (PONG, 3),
        ] {
            stream.extend(client_frame(first, len));
        }
        for piece in [1, 2, 3, 7, 13, 4096, stream.len()] {
            assert_eq!(scan_in_pieces(&stream, piece), stream, "pieces of {piece}");
        }
    }

    #[test]
    fn an_oversized_control_frame_after_large_data_frames_is_defused() {
        let mut stream = client_frame(TEXT, 70_000);
        stream.extend(client_frame(TEXT, 300));
        let close_at = stream.len();
        stream.extend(client_frame(CLOSE, 126));
        for piece in [1, 2, 5, 1000, stream.len()] {
            let out = scan_in_pieces(&stream, piece);
            assert_eq!(
                out[..close_at + 1],
                stream[..close_at + 1],
                "pieces of {piece}"
            );
            assert_eq!(out[close_at + 1], 0, "pieces of {piece}");
        }
    }

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
