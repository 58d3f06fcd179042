//! permessage-deflate (RFC 7692) for outgoing messages on connections without server context
//! takeover: each message is compressed on its own, so its compressed form depends only on the
//! message and the connection's parameters (window size, level), never on what the connection
//! sent before. A message fanned out to many connections is therefore compressed once per
//! parameter set and the same bytes go to each ([`SharedDeflate`]).
//!
//! yawc compresses inside its `Sink`, once per connection, and has no public way to mark a frame
//! as compressed. Herald keeps yawc's codec and its frame order (one writer, one write buffer)
//! and gets such a frame from yawc's own public decoder: the frame is built on the wire with
//! RSV1 set and decoded as a client would, which yields a `Frame` that yawc's encoder writes
//! back with RSV1 and the payload untouched. yawc itself compresses nothing on those connections
//! (its threshold is set out of reach); connections with context takeover keep yawc's
//! per-connection compression.
//!
//! Deflate state lives per worker thread, one per parameter set in use, reset after each
//! message: no lock, and memory that follows the threads, not the connections.

use std::cell::RefCell;
use std::sync::OnceLock;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress, Status};
use tokio_util::codec::Decoder as _;
use yawc::codec::Decoder;
use yawc::{Frame, OpCode, Role};

use crate::config::WINDOW_BITS;
use crate::metrics::HOT;

/// The deflate terms of one connection's outgoing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// Messages under this many bytes go uncompressed.
    threshold: u32,
    level: u8,
    window_bits: u8,
}

impl DeflateParams {
    /// Terms for `level` (0 to 9), a window of `window_bits` (clamped to 9–15: deflate cannot
    /// use an 8-bit window) and a threshold in bytes.
    pub fn new(level: u32, window_bits: u8, threshold: usize) -> Self {
        DeflateParams {
            threshold: u32::try_from(threshold).unwrap_or(u32::MAX),
            level: level.min(9) as u8,
            window_bits: window_bits.clamp(*WINDOW_BITS.start(), *WINDOW_BITS.end()),
        }
    }

    /// Whether `frame` is sent compressed: a whole text or binary message at the threshold or
    /// above.
    fn applies_to(&self, frame: &Frame) -> bool {
        matches!(frame.opcode(), OpCode::Text | OpCode::Binary)
            && frame.is_fin()
            && frame.payload().len() >= self.threshold as usize
    }

    /// `frame` as this connection sends it: compressed when it qualifies, taken from `shared`
    /// when other recipients of the same message already compressed it with these terms.
    /// A message that fails to compress goes uncompressed, which RFC 7692 allows.
    pub fn prepare(&self, frame: Frame, shared: Option<&SharedDeflate>) -> Frame {
        if !self.applies_to(&frame) {
            return frame;
        }
        let compressed = match shared {
            Some(shared) => shared.forms[self.slot()]
                .get_or_init(|| compress(*self, &frame))
                .clone(),
            None => compress(*self, &frame),
        };
        compressed.unwrap_or(frame)
    }

    fn slot(&self) -> usize {
        usize::from(self.window_bits - WINDOW_BITS.start())
    }
}

/// The compressed forms of one message, one per window size, shared by every recipient's
/// writer. Within one node every connection uses the configured level, so the window size is
/// the only term that varies. The first writer that needs a form compresses it; the others
/// wait for it and reuse it.
#[derive(Default)]
pub struct SharedDeflate {
    forms: [OnceLock<Option<Frame>>; WINDOW_SIZES],
}

const WINDOW_SIZES: usize = (*WINDOW_BITS.end() - *WINDOW_BITS.start() + 1) as usize;

impl std::fmt::Debug for SharedDeflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let compressed = self
            .forms
            .iter()
            .filter(|form| form.get().is_some())
            .count();
        f.debug_struct("SharedDeflate")
            .field("compressed_forms", &compressed)
            .finish()
    }
}

thread_local! {
    /// This thread's deflate state, one per parameter set it has compressed with.
    static DEFLATERS: RefCell<Vec<((u8, u8), Compress)>> = const { RefCell::new(Vec::new()) };
}

/// Room before the compressed payload for the longest server frame header.
const HEADER_ROOM: usize = 10;

/// The tail a sync flush ends with, which RFC 7692 §7.2.1 removes.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// `frame` compressed as one message with `params`, as a frame with RSV1 set; `None` if
/// deflate failed.
fn compress(params: DeflateParams, frame: &Frame) -> Option<Frame> {
    let payload = deflate_payload(params, frame.payload())?;
    HOT.deflate_compressions.increment(1);
    compressed_frame(frame.opcode(), payload)
}

/// The raw deflate stream of `input` after a sync flush, without its tail, placed after
/// [`HEADER_ROOM`] spare bytes.
fn deflate_payload(params: DeflateParams, input: &[u8]) -> Option<Vec<u8>> {
    DEFLATERS.with_borrow_mut(|deflaters| {
        let key = (params.level, params.window_bits);
        let at = match deflaters.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                let level = Compression::new(u32::from(params.level));
                let fresh = Compress::new_with_window_bits(level, false, params.window_bits);
                deflaters.push((key, fresh));
                deflaters.len() - 1
            }
        };
        let deflater = &mut deflaters[at].1;
        // Fresh state for each message: no context takeover.
        deflater.reset();
        let mut output = Vec::with_capacity(HEADER_ROOM + input.len() / 2 + 64);
        output.resize(HEADER_ROOM, 0);
        let start = deflater.total_in();
        loop {
            let consumed = (deflater.total_in() - start) as usize;
            if output.capacity() - output.len() < 64 {
                output.reserve(output.len());
            }
            let status = deflater
                .compress_vec(&input[consumed..], &mut output, FlushCompress::Sync)
                .ok()?;
            let done = (deflater.total_in() - start) as usize == input.len();
            // The flush is complete once deflate stops short of the space it was given.
            if done && output.len() < output.capacity() {
                break;
            }
            if status == Status::StreamEnd {
                return None;
            }
        }
        output.ends_with(&SYNC_TAIL).then(|| {
            output.truncate(output.len() - SYNC_TAIL.len());
            output
        })
    })
}

/// A server frame carrying `payload` (after [`HEADER_ROOM`]) with RSV1 set, as yawc's decoder
/// reads it off the wire, so yawc's encoder writes it back unchanged.
fn compressed_frame(opcode: OpCode, mut payload: Vec<u8>) -> Option<Frame> {
    let len = payload.len() - HEADER_ROOM;
    let mut head = BytesMut::with_capacity(HEADER_ROOM);
    head.put_u8(0x80 | 0x40 | u8::from(opcode));
    match len {
        0..=125 => head.put_u8(len as u8),
        126..=0xFFFF => {
            head.put_u8(126);
            head.put_u16(len as u16);
        }
        _ => {
            head.put_u8(127);
            head.put_u64(len as u64);
        }
    }
    let start = HEADER_ROOM - head.len();
    payload[start..HEADER_ROOM].copy_from_slice(&head);
    // Unique, so the conversion keeps the allocation: the payload is not copied.
    let mut wire = BytesMut::from(Bytes::from(payload));
    wire.advance(start);
    Decoder::new(Role::Client, usize::MAX)
        .decode(&mut wire)
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    fn inflate(payload: &[u8]) -> Vec<u8> {
        let mut input = payload.to_vec();
        input.extend_from_slice(&SYNC_TAIL);
        let mut inflater = Decompress::new(false);
        let mut output = Vec::with_capacity(1 << 20);
        inflater
            .decompress_vec(&input, &mut output, FlushDecompress::Sync)
            .unwrap();
        output
    }

    fn text(len: usize) -> String {
        "a message that repeats itself, as chat does. "
            .chars()
            .cycle()
            .take(len)
            .collect()
    }

    /// What yawc writes for `frame`: its first header byte and its payload.
    fn wire(frame: Frame) -> (u8, Bytes) {
        use tokio_util::codec::Encoder as _;
        let mut out = BytesMut::new();
        yawc::codec::Encoder::new(Role::Server)
            .encode(frame, &mut out)
            .unwrap();
        let header = match out[1] & 0x7F {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        (out[0], out.freeze().slice(header..))
    }

    #[test]
    fn a_large_message_goes_out_with_rsv1_and_inflates_to_itself() {
        let params = DeflateParams::new(1, 15, 64);
        for len in [64, 2_000, 70_000, 300_000] {
            let message = text(len);
            let frame = params.prepare(Frame::text(message.clone()), None);
            let (first, payload) = wire(frame);
            assert_eq!(first, 0x80 | 0x40 | 0x01, "FIN, RSV1, text ({len} B)");
            assert!(payload.len() < len, "{len} B became {}", payload.len());
            assert_eq!(inflate(&payload), message.as_bytes());
        }
    }

    #[test]
    fn small_messages_and_control_frames_stay_as_they_are() {
        let params = DeflateParams::new(1, 15, 64);
        let (first, payload) = wire(params.prepare(Frame::text(text(63)), None));
        assert_eq!((first, payload.len()), (0x81, 63));
        let (first, _) = wire(params.prepare(Frame::ping(Bytes::from(text(100))), None));
        assert_eq!(first, 0x89);
    }

    #[test]
    fn each_window_size_gets_its_own_shared_form_compressed_once() {
        let shared = SharedDeflate::default();
        let message = Frame::binary(Bytes::from(text(5_000)));
        let (wide, narrow) = (DeflateParams::new(1, 15, 64), DeflateParams::new(1, 9, 64));
        let first = wide.prepare(message.clone(), Some(&shared));
        let again = wide.prepare(message.clone(), Some(&shared));
        assert_eq!(
            first.payload().as_ptr(),
            again.payload().as_ptr(),
            "the same bytes, not a copy"
        );
        let (first, again) = (wire(first), wire(again));
        assert_eq!(first.0, 0x80 | 0x40 | 0x02);
        assert_eq!(first, again);
        let small_window = wire(narrow.prepare(message, Some(&shared)));
        assert_eq!(inflate(&small_window.1), inflate(&first.1));
        assert_eq!(shared.forms.iter().filter(|f| f.get().is_some()).count(), 2);
    }
}
