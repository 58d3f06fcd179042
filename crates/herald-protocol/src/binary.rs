//! Binary payloads: one WebSocket binary frame holds a JSON header and the raw bytes.
//!
//! ```text
//! +----------------------+----------------------+-------------------+
//! | header length: u32 BE | header: JSON object  | payload: raw bytes |
//! +----------------------+----------------------+-------------------+
//! ```
//!
//! From a client the header is a request without `content` (`send`, `publish` or `broadcast`);
//! from the server it is a `message` event without `content`. Everything else about the request
//! or event is the same as in text form.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes taken by the header length prefix.
pub const PREFIX_BYTES: usize = 4;

/// Why a binary frame could not be split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitError {
    /// Shorter than the four-byte length prefix.
    NoPrefix,
    /// The prefix names more header bytes than the frame holds.
    HeaderTruncated,
}

impl SplitError {
    pub fn describe(self) -> &'static str {
        match self {
            SplitError::NoPrefix => "binary frame is shorter than its 4-byte header length",
            SplitError::HeaderTruncated => "binary frame header length exceeds the frame",
        }
    }
}

/// Splits a binary frame into its JSON header and its payload (which shares the frame's memory).
pub fn split(frame: &Bytes) -> Result<(&[u8], Bytes), SplitError> {
    if frame.len() < PREFIX_BYTES {
        return Err(SplitError::NoPrefix);
    }
    let mut prefix = [0u8; PREFIX_BYTES];
    prefix.copy_from_slice(&frame[..PREFIX_BYTES]);
    let header_len = u32::from_be_bytes(prefix) as usize;
    let header_end = PREFIX_BYTES
        .checked_add(header_len)
        .filter(|end| *end <= frame.len())
        .ok_or(SplitError::HeaderTruncated)?;
    Ok((&frame[PREFIX_BYTES..header_end], frame.slice(header_end..)))
}

/// Builds one binary frame from a JSON header and a payload.
pub fn join(header: &[u8], payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(PREFIX_BYTES + header.len() + payload.len());
    // A header never approaches 4 GiB: it is a small JSON object bounded by the message limit.
    frame.put_u32(header.len() as u32);
    frame.put_slice(header);
    frame.put_slice(payload);
    frame.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_then_split_round_trips() {
        let frame = join(br#"{"type":"publish"}"#, &[0, 1, 2, 255]);
        let (header, payload) = split(&frame).unwrap();
        assert_eq!(header, br#"{"type":"publish"}"#);
        assert_eq!(&payload[..], &[0, 1, 2, 255]);
    }

    #[test]
    fn short_or_lying_frames_are_refused() {
        assert_eq!(
            split(&Bytes::from_static(&[0, 0])),
            Err(SplitError::NoPrefix)
        );
        assert_eq!(
            split(&Bytes::from_static(&[0, 0, 0, 9, b'{'])),
            Err(SplitError::HeaderTruncated)
        );
        assert_eq!(
            split(&Bytes::from_static(&[255, 255, 255, 255])),
            Err(SplitError::HeaderTruncated)
        );
    }
}
