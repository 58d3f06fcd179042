//! The Node `ws` peer (`bench/peers/ws-server.js`): the token in the query, `{"type":"join"}`
//! answered by `{"type":"joined"}`, room messages `{"type":"publish","room","content"}`, and the
//! tutorial's direct message `{"to":[…],"content"}` delivered as `{"from","content"}`.

use super::{Incoming, Protocol};
use crate::stamp;

pub struct WsPeer;

impl Protocol for WsPeer {
    fn name(&self) -> &'static str {
        "ws"
    }

    fn path(&self, token: &str) -> String {
        format!("/?token={token}")
    }

    fn join(&self, room: &str) -> String {
        format!(r#"{{"type":"join","room":"{room}"}}"#)
    }

    fn publish(&self, room: &str, content: &str) -> String {
        format!(r#"{{"type":"publish","room":"{room}","content":{content}}}"#)
    }

    fn direct(&self, user: &str, content: &str) -> String {
        format!(r#"{{"to":["{user}"],"content":{content}}}"#)
    }

    fn decode(&self, frame: &str) -> Incoming {
        if frame.starts_with(r#"{"from":"#) {
            return stamp::find(frame)
                .map_or(Incoming::Other, |sent_ns| Incoming::Delivery { sent_ns });
        }
        if frame.starts_with(r#"{"type":"welcome""#) {
            Incoming::Ready
        } else if frame.starts_with(r#"{"type":"joined""#) {
            Incoming::Joined
        } else if frame.starts_with(r#"{"type":"error""#) {
            Incoming::Refused(frame.to_owned())
        } else {
            Incoming::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_frames_are_classified() {
        assert_eq!(
            WsPeer.decode(r#"{"type":"welcome","user":"u"}"#),
            Incoming::Ready
        );
        assert_eq!(
            WsPeer.decode(r#"{"type":"joined","room":"r"}"#),
            Incoming::Joined
        );
        let delivered = format!(r#"{{"from":"a","content":{}}}"#, stamp::content(9, ""));
        assert_eq!(WsPeer.decode(&delivered), Incoming::Delivery { sent_ns: 9 });
        assert!(matches!(
            WsPeer.decode(r#"{"type":"error","message":"no"}"#),
            Incoming::Refused(_)
        ));
    }
}
