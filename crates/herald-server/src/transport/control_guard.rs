//! [`ControlFrameGuard`]: the byte stream under yawc, read frame header by frame header, so a
//! control frame over 125 bytes fails the connection; it also counts the bytes written, and
//! reads ahead of yawc's small buffer (`read_ahead.rs`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::read_ahead::ReadAhead;

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
    /// Reads the socket in full when yawc has little room (see `read_ahead.rs`).
    ahead: ReadAhead,
    scanner: HeaderScanner,
    state: Arc<GuardState>,
}

/// What a [`ControlFrameGuard`] shares with the socket above it; one allocation for both.
#[derive(Default)]
pub(super) struct GuardState {
    /// Set when the guard turned a frame away, so the Close can name the real reason.
    pub(super) tripped: AtomicBool,
    /// Bytes written to the socket so far.
    written: AtomicU64,
}

/// Bytes written to one socket so far (see
/// [`ServerSocket::write_progress`](super::ServerSocket::write_progress)).
#[derive(Clone)]
pub struct WriteProgress(pub(super) Arc<GuardState>);

impl WriteProgress {
    pub fn bytes(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
    }
}

impl<S> ControlFrameGuard<S> {
    pub fn new(inner: S) -> Self {
        ControlFrameGuard {
            inner,
            ahead: ReadAhead::default(),
            scanner: HeaderScanner::default(),
            state: Arc::default(),
        }
    }

    pub(super) fn state(&self) -> Arc<GuardState> {
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
        ready!(this.ahead.poll_read(&mut this.inner, cx, buf))?;
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
    use crate::transport::test_frames::{CLOSE, PONG, TEXT, client_frame};

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
}
