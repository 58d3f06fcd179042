//! The bench payload and its send instant.
//!
//! Every message the tool sends carries `{"hb_t":<ns>,"pad":"…"}` as its content, where `<ns>`
//! is the instant the schedule meant it to leave, in nanoseconds on this process's monotonic
//! clock. Each server copies the content verbatim into what it delivers, so the receiving task
//! finds the marker in the frame and the latency is `now - hb_t`. Stamping the scheduled instant
//! rather than the moment the frame was written keeps a stalled sender from hiding latency
//! (no coordinated omission).

use std::sync::OnceLock;
use std::time::Instant;

/// What precedes the send instant in every bench payload. No server field is named like it.
pub const MARKER: &str = "\"hb_t\":";

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since this process's clock epoch.
pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// The instant `ns` (on the same clock) as an `Instant`.
pub fn instant_of(ns: u64) -> Instant {
    epoch() + std::time::Duration::from_nanos(ns)
}

/// The content of a bench message sent at `sent_ns`, padded with `pad` bytes.
pub fn content(sent_ns: u64, pad: &str) -> String {
    format!("{{{MARKER}{sent_ns},\"pad\":\"{pad}\"}}")
}

/// The send instant in a delivered frame, if it carries a bench payload.
pub fn find(frame: &str) -> Option<u64> {
    let start = frame.find(MARKER)? + MARKER.len();
    let digits = &frame.as_bytes()[start..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    frame[start..start + end].parse().ok()
}

/// `len` bytes of padding (plain ASCII, nothing to escape).
pub fn padding(len: usize) -> String {
    "x".repeat(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_instant_is_found_wherever_a_server_puts_the_content() {
        let content = content(123_456_789, "xx");
        for frame in [
            format!(
                r#"{{"type":"message","id":"m","from":"a","room":"r","content":{content},"ts":5}}"#
            ),
            format!(r#"{{"from":"a","content":{content}}}"#),
            format!(r#"42["message",{{"from":"a","room":"r","content":{content}}}]"#),
        ] {
            assert_eq!(find(&frame), Some(123_456_789), "{frame}");
        }
    }

    #[test]
    fn frames_without_the_marker_have_no_send_instant() {
        assert_eq!(
            find(r#"{"type":"presence_diff","room":"r","joined":["u"],"left":[],"count":2}"#),
            None
        );
        assert_eq!(find(r#"{"ts":5,"hb_t":}"#), None);
    }
}
