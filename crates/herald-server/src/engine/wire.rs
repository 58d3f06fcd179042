//! The broker's wire format: how a [`Delivery`] or a [`Control`] travels between nodes as one
//! opaque byte string (a Redis pub/sub message, say).
//!
//! ```text
//! +---------+------+-------+-------------+------------------+-------------+---------+--------+
//! | version | kind | flags | except: u64 | frame length: u32 | splice: u32 | frame   | offset |
//! |  1 byte | 1    | 1     | BE          | BE               | BE          | (len)   | ASCII  |
//! +---------+------+-------+-------------+------------------+-------------+---------+--------+
//! ```
//!
//! - `kind`: 0 a text frame, 1 a binary frame, 2 a disconnect control (its "frame" is the close
//!   code, u16 BE, then the UTF-8 reason).
//! - `flags`: bit 0 `except` names a connection; bit 1 an offset follows the frame.
//! - The offset, when present, is the message's position in its stream, in decimal ASCII, and
//!   runs to the end of the payload. It comes last so that an engine which assigns the offset
//!   inside the backend (a Redis script appending and publishing in one step) can append it to
//!   an envelope encoded beforehand, without knowing the format.
//! - `splice`, when not `u32::MAX`, is where the offset's digits belong in the frame: the frame
//!   was encoded before the offset was known, with `"offset":` followed directly by the rest of
//!   the header. [`decode`] inserts the digits there once per node, so a receiving node never
//!   re-encodes a message; for a binary frame it also corrects the header length prefix.
//!
//! A survey ([`crate::engine::broker::Broker::survey`]) travels on channels of its own, so its
//! messages are not envelopes:
//!
//! ```text
//! question: | version: 1 byte | survey id: u64 BE | reply channel length: u16 BE | reply channel | question |
//! answer:   | version: 1 byte | survey id: u64 BE | answer |
//! ```
//!
//! A receiving node refuses (never panics on) anything malformed or of another version.

use bytes::{BufMut, Bytes, BytesMut};
use herald_protocol::binary::PREFIX_BYTES;

use crate::delivery::{ConnId, Control, Delivery, OutFrame};

pub const VERSION: u8 = 1;

const KIND_TEXT: u8 = 0;
const KIND_BINARY: u8 = 1;
const KIND_DISCONNECT: u8 = 2;

const FLAG_EXCEPT: u8 = 1;
const FLAG_OFFSET: u8 = 2;

const HEADER_BYTES: usize = 1 + 1 + 1 + 8 + 4 + 4;
const NO_SPLICE: u32 = u32::MAX;

/// What one envelope carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    Delivery(Delivery),
    Control(Control),
}

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("envelope shorter than its header")]
    Truncated,
    #[error("envelope version {0}, this node reads {VERSION}")]
    Version(u8),
    #[error("unknown envelope kind {0}")]
    Kind(u8),
    #[error("envelope offset is not a decimal number")]
    Offset,
    #[error("envelope splice position lies outside the frame")]
    Splice,
    #[error("disconnect control with an invalid code or reason")]
    Control,
    #[error("survey question without a valid reply channel")]
    ReplyChannel,
}

/// A survey's question, to be answered on `reply_to`.
#[derive(Debug, PartialEq, Eq)]
pub struct Question<'a> {
    pub survey: u64,
    pub reply_to: &'a str,
    pub question: &'a [u8],
}

pub fn encode_question(survey: u64, reply_to: &str, question: &[u8]) -> Bytes {
    let reply_length = u16::try_from(reply_to.len()).expect("a reply channel name is short");
    let mut bytes = BytesMut::with_capacity(1 + 8 + 2 + reply_to.len() + question.len());
    bytes.put_u8(VERSION);
    bytes.put_u64(survey);
    bytes.put_u16(reply_length);
    bytes.put_slice(reply_to.as_bytes());
    bytes.put_slice(question);
    bytes.freeze()
}

pub fn decode_question(bytes: &[u8]) -> Result<Question<'_>, WireError> {
    let (survey, rest) = survey_head(bytes)?;
    let (length, rest) = rest.split_at_checked(2).ok_or(WireError::Truncated)?;
    let length = u16::from_be_bytes([length[0], length[1]]) as usize;
    let (reply_to, question) = rest.split_at_checked(length).ok_or(WireError::Truncated)?;
    let reply_to = std::str::from_utf8(reply_to).map_err(|_| WireError::ReplyChannel)?;
    Ok(Question {
        survey,
        reply_to,
        question,
    })
}

pub fn encode_answer(survey: u64, answer: &[u8]) -> Bytes {
    let mut bytes = BytesMut::with_capacity(1 + 8 + answer.len());
    bytes.put_u8(VERSION);
    bytes.put_u64(survey);
    bytes.put_slice(answer);
    bytes.freeze()
}

/// (survey id, answer).
pub fn decode_answer(bytes: &[u8]) -> Result<(u64, &[u8]), WireError> {
    survey_head(bytes)
}

fn survey_head(bytes: &[u8]) -> Result<(u64, &[u8]), WireError> {
    let (&version, rest) = bytes.split_first().ok_or(WireError::Truncated)?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let (survey, rest) = rest.split_at_checked(8).ok_or(WireError::Truncated)?;
    Ok((
        u64::from_be_bytes(survey.try_into().expect("8 bytes")),
        rest,
    ))
}

/// Encodes a delivery whose offset (if any) is already known.
pub fn encode_delivery(delivery: &Delivery) -> Bytes {
    let frame = match &delivery.frame {
        OutFrame::Text(bytes) | OutFrame::Binary(bytes) => bytes,
    };
    let mut out = envelope_head(delivery, frame.len(), NO_SPLICE, delivery.offset.is_some());
    out.put_slice(frame);
    if let Some(offset) = delivery.offset {
        out.put_slice(offset.to_string().as_bytes());
    }
    out.freeze()
}

/// Encodes a delivery whose offset the backend will append: its frame was encoded with the
/// offset [`PLACEHOLDER`], whose digits are left out here, and the envelope records where they
/// were. It is complete once the backend appends the decimal offset to it. `None` when the
/// frame holds no placeholder.
pub fn encode_delivery_awaiting_offset(delivery: &Delivery) -> Option<Bytes> {
    let (bytes, binary) = delivery.frame.parts();
    let digits_at = placeholder_digits(bytes, binary)?;
    let mut out = envelope_head(
        delivery,
        bytes.len() - PLACEHOLDER_DIGITS,
        digits_at as u32,
        true,
    );
    out.put_slice(&bytes[..digits_at]);
    out.put_slice(&bytes[digits_at + PLACEHOLDER_DIGITS..]);
    if binary {
        adjust_header_length(&mut out[HEADER_BYTES..], -(PLACEHOLDER_DIGITS as i64))?;
    }
    Some(out.freeze())
}

/// The envelope's header, with room for a frame of `frame_len` bytes and the offset's digits.
fn envelope_head(
    delivery: &Delivery,
    frame_len: usize,
    splice: u32,
    with_offset: bool,
) -> BytesMut {
    let kind = match &delivery.frame {
        OutFrame::Text(_) => KIND_TEXT,
        OutFrame::Binary(_) => KIND_BINARY,
    };
    let mut flags = 0;
    if delivery.except.is_some() {
        flags |= FLAG_EXCEPT;
    }
    if with_offset {
        flags |= FLAG_OFFSET;
    }
    let mut out = BytesMut::with_capacity(HEADER_BYTES + frame_len + 20);
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u64(delivery.except.map_or(0, |conn| conn.0));
    out.put_u32(frame_len as u32);
    out.put_u32(splice);
    out
}

pub fn encode_control(control: &Control) -> Bytes {
    let Control::Disconnect { code, reason } = control;
    let mut out = BytesMut::with_capacity(HEADER_BYTES + 2 + reason.len());
    out.put_u8(VERSION);
    out.put_u8(KIND_DISCONNECT);
    out.put_u8(0);
    out.put_u64(0);
    out.put_u32((2 + reason.len()) as u32);
    out.put_u32(NO_SPLICE);
    out.put_u16(*code);
    out.put_slice(reason.as_bytes());
    out.freeze()
}

/// A message's frame encoded once with the offset [`PLACEHOLDER`], from which each copy is
/// made with its own offset, or without the field: a message to several recipients (and the
/// sender's own copy) costs one encode, and each copy a copy of its bytes.
#[derive(Debug, Clone)]
pub struct OffsetTemplate {
    frame: OutFrame,
    /// Where the placeholder's digits start in the frame.
    digits_at: usize,
}

/// What precedes the offset's digits in the frame, the comma that opens the field included:
/// the field always follows another one (`ts`).
const OFFSET_FIELD_OPENING: &[u8] = b",\"offset\":";

impl OffsetTemplate {
    /// `None` when the frame holds no placeholder offset field after another field.
    pub fn new(frame: OutFrame) -> Option<OffsetTemplate> {
        let (bytes, binary) = frame.parts();
        let digits_at = placeholder_digits(bytes, binary)?;
        let field_at = digits_at.checked_sub(OFFSET_FIELD_OPENING.len())?;
        if &bytes[field_at..digits_at] != OFFSET_FIELD_OPENING {
            return None;
        }
        Some(OffsetTemplate { frame, digits_at })
    }

    /// The frame with `offset` in place of the placeholder, or without the offset field.
    pub fn with_offset(&self, offset: Option<u64>) -> OutFrame {
        let (bytes, binary) = self.frame.parts();
        let mut buffer = [0u8; PLACEHOLDER_DIGITS + 1];
        let (cut_from, inserted): (usize, &[u8]) = match offset {
            Some(offset) => (self.digits_at, decimal(offset, &mut buffer)),
            None => (self.digits_at - OFFSET_FIELD_OPENING.len(), &[]),
        };
        let rest = &bytes[self.digits_at + PLACEHOLDER_DIGITS..];
        let mut out = BytesMut::with_capacity(cut_from + inserted.len() + rest.len());
        out.put_slice(&bytes[..cut_from]);
        out.put_slice(inserted);
        out.put_slice(rest);
        if binary {
            let removed = (self.digits_at + PLACEHOLDER_DIGITS - cut_from) as i64;
            // The template's prefix was read when it was made, and a header only shrinks here.
            let _ = adjust_header_length(&mut out, inserted.len() as i64 - removed);
            OutFrame::Binary(out.freeze())
        } else {
            OutFrame::Text(out.freeze())
        }
    }
}

/// `value` in decimal ASCII, written at the end of `buffer`.
fn decimal(mut value: u64, buffer: &mut [u8; PLACEHOLDER_DIGITS + 1]) -> &[u8] {
    let mut start = buffer.len();
    loop {
        start -= 1;
        buffer[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    &buffer[start..]
}

/// Where the [`PLACEHOLDER`]'s digits are in a frame encoded with it.
fn placeholder_digits(bytes: &[u8], binary: bool) -> Option<usize> {
    // The offset field follows the content in a text frame (whose JSON is the sender's and may
    // hold anything), and nothing the sender wrote follows it: the last match is the field, a
    // few bytes from the end. A binary frame's payload follows its header: only the header is
    // searched.
    let searched = if binary {
        let prefix: [u8; PREFIX_BYTES] = bytes.get(..PREFIX_BYTES)?.try_into().ok()?;
        let header_end = PREFIX_BYTES + u32::from_be_bytes(prefix) as usize;
        bytes.get(..header_end)?
    } else {
        bytes
    };
    let at = rfind(searched, PLACEHOLDER_FIELD.as_bytes())?;
    Some(at + PLACEHOLDER_FIELD.len() - PLACEHOLDER_DIGITS)
}

/// An offset no stream reaches, used while encoding a frame whose offset is not known yet.
pub const PLACEHOLDER: u64 = 9_999_999_999_999_999_999;
const PLACEHOLDER_DIGITS: usize = 19;
/// The offset field as a frame encoded with the placeholder holds it.
const PLACEHOLDER_FIELD: &str = "\"offset\":9999999999999999999";

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .rposition(|window| window == needle)
}

/// Moves a binary frame's header length prefix by `by` bytes.
fn adjust_header_length(frame: &mut [u8], by: i64) -> Option<()> {
    let prefix: [u8; PREFIX_BYTES] = frame.get(..PREFIX_BYTES)?.try_into().ok()?;
    let length = u32::from_be_bytes(prefix) as i64 + by;
    let length = u32::try_from(length).ok()?;
    frame[..PREFIX_BYTES].copy_from_slice(&length.to_be_bytes());
    Some(())
}

pub fn decode(bytes: &[u8]) -> Result<Envelope, WireError> {
    if bytes.len() < HEADER_BYTES {
        return Err(WireError::Truncated);
    }
    let version = bytes[0];
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let kind = bytes[1];
    let flags = bytes[2];
    let except = u64::from_be_bytes(bytes[3..11].try_into().expect("8 bytes"));
    let length = u32::from_be_bytes(bytes[11..15].try_into().expect("4 bytes")) as usize;
    let splice = u32::from_be_bytes(bytes[15..19].try_into().expect("4 bytes"));
    let rest = &bytes[HEADER_BYTES..];
    if rest.len() < length {
        return Err(WireError::Truncated);
    }
    let (frame, trailer) = rest.split_at(length);
    if kind == KIND_DISCONNECT {
        if frame.len() < 2 {
            return Err(WireError::Control);
        }
        let code = u16::from_be_bytes([frame[0], frame[1]]);
        let reason = std::str::from_utf8(&frame[2..]).map_err(|_| WireError::Control)?;
        return Ok(Envelope::Control(Control::Disconnect {
            code,
            reason: reason.into(),
        }));
    }
    if kind != KIND_TEXT && kind != KIND_BINARY {
        return Err(WireError::Kind(kind));
    }
    let offset = if flags & FLAG_OFFSET != 0 {
        let digits = std::str::from_utf8(trailer).map_err(|_| WireError::Offset)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(WireError::Offset);
        }
        Some(digits.parse::<u64>().map_err(|_| WireError::Offset)?)
    } else {
        None
    };
    let frame = if splice == NO_SPLICE {
        Bytes::copy_from_slice(frame)
    } else {
        let at = splice as usize;
        let (Some(offset), true) = (offset, at <= frame.len()) else {
            return Err(WireError::Splice);
        };
        let digits = offset.to_string();
        let mut spliced = BytesMut::with_capacity(frame.len() + digits.len());
        spliced.put_slice(&frame[..at]);
        spliced.put_slice(digits.as_bytes());
        spliced.put_slice(&frame[at..]);
        if kind == KIND_BINARY {
            adjust_header_length(&mut spliced, digits.len() as i64).ok_or(WireError::Splice)?;
        }
        spliced.freeze()
    };
    let frame = if kind == KIND_TEXT {
        OutFrame::Text(frame)
    } else {
        OutFrame::Binary(frame)
    };
    Ok(Envelope::Delivery(Delivery {
        frame,
        except: (flags & FLAG_EXCEPT != 0).then_some(ConnId(except)),
        offset,
    }))
}

#[cfg(test)]
mod tests {
    use herald_protocol::{Message, ServerEvent};
    use serde_json::value::RawValue;

    use super::*;

    fn message(offset: u64) -> Message {
        Message {
            id: "m1".into(),
            from: "alice".into(),
            to: None,
            room: Some("lobby".into()),
            content: None,
            ts: 7,
            offset: Some(offset),
            encoding: None,
        }
    }

    fn text(offset: u64) -> OutFrame {
        let mut header = message(offset);
        header.content =
            Some(RawValue::from_string(r#"{"offset":9999999999999999999}"#.into()).unwrap());
        OutFrame::Text(ServerEvent::Message(header).encode())
    }

    fn binary(offset: u64) -> OutFrame {
        OutFrame::Binary(ServerEvent::encode_binary(
            &message(offset),
            b"\x00\x01payload",
        ))
    }

    #[test]
    fn a_delivery_with_a_known_offset_comes_back_whole() {
        let delivery = Delivery {
            frame: text(42),
            except: Some(ConnId(9)),
            offset: Some(42),
        };
        let decoded = decode(&encode_delivery(&delivery)).unwrap();
        assert_eq!(decoded, Envelope::Delivery(delivery));
    }

    #[test]
    fn an_offset_appended_by_the_backend_is_spliced_into_text_and_binary_frames() {
        for (placeholder, expected) in [
            (text(PLACEHOLDER), text(1234)),
            (binary(PLACEHOLDER), binary(1234)),
        ] {
            let pending = Delivery {
                frame: placeholder,
                except: None,
                offset: None,
            };
            let mut wire = encode_delivery_awaiting_offset(&pending).unwrap().to_vec();
            wire.extend_from_slice(b"1234");
            let Envelope::Delivery(decoded) = decode(&wire).unwrap() else {
                panic!("not a delivery");
            };
            assert_eq!(decoded.frame, expected);
            assert_eq!(decoded.offset, Some(1234));
        }
        let (_, payload) = ServerEvent::decode_binary(match &binary(5) {
            OutFrame::Binary(bytes) => bytes,
            OutFrame::Text(_) => unreachable!(),
        })
        .unwrap();
        assert_eq!(&payload[..], b"\x00\x01payload");
    }

    fn without_offset(frame: OutFrame) -> OutFrame {
        let mut header = message(0);
        header.offset = None;
        match frame {
            OutFrame::Text(_) => {
                header.content = Some(
                    RawValue::from_string(r#"{"offset":9999999999999999999}"#.into()).unwrap(),
                );
                OutFrame::Text(ServerEvent::Message(header).encode())
            }
            OutFrame::Binary(_) => {
                OutFrame::Binary(ServerEvent::encode_binary(&header, b"\x00\x01payload"))
            }
        }
    }

    #[test]
    fn a_template_makes_the_frames_a_direct_encode_makes_for_every_offset_and_none() {
        for (template, encode) in [
            (text(PLACEHOLDER), text as fn(u64) -> OutFrame),
            (binary(PLACEHOLDER), binary),
        ] {
            let template = OffsetTemplate::new(template.clone()).expect("a placeholder");
            for offset in [0, 1, 9, 10, 1234, u64::MAX] {
                assert_eq!(template.with_offset(Some(offset)), encode(offset));
            }
            assert_eq!(template.with_offset(None), without_offset(encode(1)));
        }
        assert!(OffsetTemplate::new(text(5)).is_none(), "no placeholder");
    }

    #[test]
    fn the_placeholder_field_is_the_placeholder_offset_as_encoded() {
        assert_eq!(PLACEHOLDER_FIELD, format!("\"offset\":{PLACEHOLDER}"));
        assert_eq!(PLACEHOLDER.to_string().len(), PLACEHOLDER_DIGITS);
    }

    #[test]
    fn a_control_comes_back_whole() {
        let control = Control::Disconnect {
            code: 4000,
            reason: "bye".into(),
        };
        assert_eq!(
            decode(&encode_control(&control)).unwrap(),
            Envelope::Control(control)
        );
    }

    #[test]
    fn survey_questions_and_answers_come_back_whole() {
        let question = encode_question(7, "p:{node:n1}:replies", b"{\"ask\":1}");
        assert_eq!(
            decode_question(&question),
            Ok(Question {
                survey: 7,
                reply_to: "p:{node:n1}:replies",
                question: b"{\"ask\":1}",
            })
        );
        let answer = encode_answer(7, b"[]");
        assert_eq!(decode_answer(&answer), Ok((7, &b"[]"[..])));
    }

    #[test]
    fn malformed_survey_messages_are_refused_not_panicked_on() {
        let question = encode_question(7, "reply", b"q");
        for cut in 0..12 {
            assert!(decode_question(&question[..cut]).is_err(), "cut at {cut}");
        }
        for cut in 0..9 {
            assert!(decode_answer(&encode_answer(7, b"")[..cut]).is_err());
        }
        let mut other_version = question.to_vec();
        other_version[0] = VERSION + 1;
        assert_eq!(
            decode_question(&other_version),
            Err(WireError::Version(VERSION + 1))
        );
        let mut bad_name = encode_question(7, "ab", b"").to_vec();
        bad_name[11] = 0xff;
        assert_eq!(decode_question(&bad_name), Err(WireError::ReplyChannel));
    }

    #[test]
    fn malformed_envelopes_are_refused_not_panicked_on() {
        let good = encode_delivery(&Delivery {
            frame: text(3),
            except: None,
            offset: Some(3),
        });
        for cut in 0..good.len() {
            let _ = decode(&good[..cut]);
        }
        let mut other_version = good.to_vec();
        other_version[0] = 2;
        assert_eq!(decode(&other_version), Err(WireError::Version(2)));
        let mut bad_splice = good.to_vec();
        bad_splice[15..19].copy_from_slice(&u32::MAX.wrapping_sub(1).to_be_bytes());
        assert_eq!(decode(&bad_splice), Err(WireError::Splice));
    }
}
