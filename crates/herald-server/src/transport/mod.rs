//! Herald's WebSocket transport: how an HTTP request becomes a WebSocket (RFC 6455), with which
//! limits and which extension. The server and the conformance echo example
//! (`examples/echo.rs`) both go through here, so the Autobahn run tests exactly what clients get.
//! This file holds the options and the upgrade; each thing Herald adds has a file of its own.
//!
//! The library is `yawc`: it validates frames, reassembles fragments, checks UTF-8, answers Ping
//! and Close, closes with 1009 when a frame or a reassembled message reaches the size limit, and
//! runs permessage-deflate (RFC 7692). Herald adds four things around it:
//!
//! - **Negotiation** (`negotiation.rs`). yawc reads `Sec-WebSocket-Extensions` as one offer,
//!   declines a header holding several, and may accept a window size it cannot keep. Herald
//!   parses the offers itself, accepts the first it can honour, writes the response header, and
//!   starts yawc's codec on exactly those terms.
//! - **[`ControlFrameGuard`]** (`control_guard.rs`). yawc answers a Close frame whose payload
//!   exceeds 125 bytes as an ordinary close (1000), where RFC 6455 §5.5 requires failing the
//!   connection (1002).
//! - **[`ServerSocket`]** (`socket.rs`), which closes as RFC 6455 §7 says: the peer's Close is
//!   echoed, and a protocol error gets 1002, 1007 or 1009, where yawc would send 1003, nothing, or
//!   the 1000 its own `close` adds. It also keeps yawc's Pongs bounded: yawc queues one per Ping
//!   and writes them only when a read would block, so a peer sending Pings without reading grew
//!   that queue without end; this socket reads nothing more until the Pong it owes is written.
//! - **Read-ahead** (`read_ahead.rs`), in the guard's reads: a frame that arrives when yawc's
//!   small read buffer is nearly used up is read in one system call, not two.
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

mod control_guard;
mod negotiation;
mod read_ahead;
mod socket;
#[cfg(test)]
mod test_frames;

use std::future::Future;
use std::sync::LazyLock;

use http::{HeaderValue, Request, header};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use yawc::{
    CompressionLevel, DeflateOptions, DeflatePool, HttpResponse, Options, WebSocket, WebSocketError,
};

use crate::config::{CompressionConfig, WINDOW_BITS};
use negotiation::negotiate;

pub use control_guard::{ControlFrameGuard, WriteProgress};
pub use socket::{Outbound, ServerSocket};

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
#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection's socket lives, split in two, in one allocation with its lock and
    /// counts; at 984 bytes it takes jemalloc's 1 KiB size class, and 32 bytes more (the first
    /// read-ahead) moved every idle connection to the next one: 4.18–4.20 → 4.40 KiB per
    /// connection (`docs/benchmarks.md`, idle memory).
    #[test]
    fn a_socket_fits_its_size_class() {
        let socket = std::mem::size_of::<Socket>();
        assert!(socket <= 984, "a socket takes {socket} bytes");
    }
}
