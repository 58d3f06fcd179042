//! Herald's WebSocket transport: how an HTTP request becomes a WebSocket (RFC 6455) and with
//! which limits. The server and the conformance echo example both go through here, so the
//! Autobahn run tests exactly what clients get.
//!
//! The library is `yawc` (see `docs/architecture.md` for the choice): it validates frames,
//! reassembles fragments, checks UTF-8, answers Ping and Close, and closes with 1009 when a
//! frame or a reassembled message reaches the size limit.

use http::{HeaderValue, Request, header};
use yawc::{HttpResponse, Options, UpgradeFut, WebSocket, WebSocketError};

/// Initial socket buffer sizes. Small, because most connections are idle most of the time;
/// both grow for a large frame and shrink back after it.
const READ_BUFFER_BYTES: usize = 1024;
const WRITE_BUFFER_BYTES: usize = 1024;

/// Library options for a server connection accepting messages up to `max_message_bytes`.
pub fn server_options(max_message_bytes: usize) -> Options {
    // yawc's limits are exclusive: a payload of exactly the limit is refused.
    let limit = max_message_bytes.saturating_add(1);
    Options::default()
        .with_limits(limit, limit)
        .with_utf8()
        .with_no_delay()
        .with_read_buffer_capacity(READ_BUFFER_BYTES)
        .with_write_buffer_capacity(WRITE_BUFFER_BYTES)
        .without_compression()
}

/// Answers a WebSocket upgrade request: the 101 response to return, and the future that yields
/// the WebSocket once the response is out.
pub fn upgrade<B>(
    request: &mut Request<B>,
    options: Options,
) -> Result<(HttpResponse, UpgradeFut), WebSocketError> {
    keep_first_extension_offer(request);
    WebSocket::upgrade_with_options(request, options)
}

/// A client may offer permessage-deflate several times with different parameters
/// (`permessage-deflate; a, permessage-deflate; b`). The library parses the header as one offer
/// and declines the whole header when it holds several, so only the first is kept: RFC 7692
/// lets the server accept any one offer.
fn keep_first_extension_offer<B>(request: &mut Request<B>) {
    let headers = request.headers_mut();
    let Some(first) = headers
        .get(header::SEC_WEBSOCKET_EXTENSIONS)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(',').next())
        .map(|offer| offer.trim().to_owned())
    else {
        return;
    };
    if let Ok(value) = HeaderValue::from_str(&first) {
        headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, value);
    }
}
