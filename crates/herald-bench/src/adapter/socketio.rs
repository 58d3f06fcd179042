//! Socket.IO 4 over a bare WebSocket (Engine.IO protocol 4, no long-polling).
//!
//! Packets are text frames whose first character is the Engine.IO type (`0` open, `2` ping,
//! `3` pong, `4` message) and, for messages, the next one the Socket.IO type (`0` connect,
//! `1` disconnect, `2` event, `3` ack, `4` connect error). The client connects to the default
//! namespace with `40{"token":…}` (the handshake's `auth`), gets `40{"sid":…}`, and must answer
//! every ping with a pong or the server drops it.

use super::{Incoming, Protocol};
use crate::stamp;

pub struct SocketIo;

impl Protocol for SocketIo {
    fn name(&self) -> &'static str {
        "socketio"
    }

    fn path(&self, _token: &str) -> String {
        "/socket.io/?EIO=4&transport=websocket".to_owned()
    }

    fn opening(&self, token: &str) -> Option<String> {
        Some(format!(r#"40{{"token":"{token}"}}"#))
    }

    fn join(&self, room: &str) -> String {
        // Event with acknowledgement id 0; the server answers `430[…]`.
        format!(r#"420["join","{room}"]"#)
    }

    fn publish(&self, room: &str, content: &str) -> String {
        format!(r#"42["publish",{{"room":"{room}","content":{content}}}]"#)
    }

    fn direct(&self, user: &str, content: &str) -> String {
        format!(r#"42["send",{{"to":["{user}"],"content":{content}}}]"#)
    }

    fn decode(&self, frame: &str) -> Incoming {
        let bytes = frame.as_bytes();
        match (bytes.first(), bytes.get(1)) {
            (Some(b'4'), Some(b'2')) => {
                stamp::find(frame).map_or(Incoming::Other, |sent_ns| Incoming::Delivery { sent_ns })
            }
            (Some(b'2'), _) => Incoming::Reply("3"),
            (Some(b'4'), Some(b'0')) => Incoming::Ready,
            (Some(b'4'), Some(b'3')) if frame.contains(r#""error""#) => {
                Incoming::Refused(frame.to_owned())
            }
            (Some(b'4'), Some(b'3')) => Incoming::Joined,
            (Some(b'4'), Some(b'4')) => Incoming::Refused(format!("connect error: {frame}")),
            (Some(b'4'), Some(b'1')) => Incoming::Refused("disconnected by the server".into()),
            _ => Incoming::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_io_packets_are_classified() {
        assert_eq!(
            SocketIo.decode(r#"0{"sid":"x","pingInterval":25000}"#),
            Incoming::Other
        );
        assert_eq!(SocketIo.decode("2"), Incoming::Reply("3"));
        assert_eq!(SocketIo.decode(r#"40{"sid":"y"}"#), Incoming::Ready);
        assert_eq!(SocketIo.decode(r#"430[{"room":"r"}]"#), Incoming::Joined);
        let event = format!(
            r#"42["message",{{"from":"a","room":"r","content":{}}}]"#,
            stamp::content(11, "")
        );
        assert_eq!(SocketIo.decode(&event), Incoming::Delivery { sent_ns: 11 });
        assert!(matches!(
            SocketIo.decode(r#"44{"message":"unauthorized"}"#),
            Incoming::Refused(_)
        ));
    }
}
