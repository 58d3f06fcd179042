//! Connections accepted without a token (`auth.message_auth`): until their first valid
//! `{"type":"auth","token":…}` they may do nothing else.
//!
//! Pending connections are cheap to open and hold no identity, so they are capped in total and
//! per client address ([`PendingAuth`]; an IPv6 client by its /64, a client behind trusted
//! proxies by the address they name), closed at `auth.timeout` by the writer's deadline (4101),
//! after `auth.max_attempts` bad tokens (4102), and after `auth.max_attempts` other data frames
//! (1008, policy violation: the client is not following the protocol, and reconnecting would
//! not help). Every refused frame is parsed and answered, so without that cap a pending
//! connection could make the server work for it without limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use herald_protocol::request::parse_text;
use herald_protocol::{CloseCode, ErrorCode, ErrorEvent, Request, RequestBody, ServerEvent};
use yawc::{Frame, OpCode};

use super::flush_library_close;
use crate::auth::Identity;
use crate::delivery::OutFrame;
use crate::hub::ConnHandle;
use crate::hub::control::{CloseReason, ConnControl, Side};
use crate::node::Node;

/// Counts pending connections, in total and per client address key
/// ([`crate::http::client_addr::limit_key`]).
#[derive(Default)]
pub struct PendingAuth {
    /// Held only to bump a counter, never across an `.await`.
    counts: Mutex<PendingCounts>,
}

#[derive(Default)]
struct PendingCounts {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// Why a pending connection was refused at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PendingLimit {
    #[error("too many connections waiting to authenticate (limits.max_pending_auth)")]
    Total,
    #[error(
        "too many connections waiting to authenticate from this address (limits.max_pending_auth_per_ip)"
    )]
    PerIp,
}

/// A place among the pending connections, given back when dropped.
pub struct PendingSlot {
    registry: Arc<PendingAuth>,
    ip: IpAddr,
}

impl PendingAuth {
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<PendingSlot, PendingLimit> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= max_total {
            return Err(PendingLimit::Total);
        }
        let from_ip = counts.by_ip.entry(ip).or_default();
        if *from_ip >= max_per_ip {
            return Err(PendingLimit::PerIp);
        }
        *from_ip += 1;
        counts.total += 1;
        metrics::gauge!("herald_pending_auth_connections").set(counts.total as f64);
        Ok(PendingSlot {
            registry: self.clone(),
            ip,
        })
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut counts = self
            .registry
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        if let Some(from_ip) = counts.by_ip.get_mut(&self.ip) {
            *from_ip -= 1;
            if *from_ip == 0 {
                counts.by_ip.remove(&self.ip);
            }
        }
        metrics::gauge!("herald_pending_auth_connections").set(counts.total as f64);
    }
}

/// Reads frames until a valid `auth` arrives. Returns `None` when the connection ended first
/// (closed by the peer, timed out, or out of attempts).
pub async fn authenticate<S>(
    stream: &mut S,
    node: &Node,
    reply: &ConnHandle,
    control: &ConnControl,
) -> Option<Identity>
where
    S: Stream<Item = Frame> + Unpin,
{
    let mut failures = 0;
    let mut refused = 0;
    loop {
        let frame = tokio::select! {
            biased;
            _ = control.closed(Side::Reader) => return None,
            // A connection not registered yet: shutdown reaches it here, not through the hub.
            _ = node.shutdown().cancelled() => {
                control.close(CloseReason::Send(CloseCode::GOING_AWAY));
                return None;
            }
            frame = stream.next() => frame,
        };
        let Some(frame) = frame else {
            flush_library_close(stream).await;
            control.close(CloseReason::PeerGone);
            return None;
        };
        control.touch();
        let request = match frame.opcode() {
            OpCode::Text => parse_text(frame.payload()),
            OpCode::Binary => Err(herald_protocol::ProtocolError::new(
                ErrorCode::Unauthenticated,
                "authenticate first",
                None,
            )),
            OpCode::Close => {
                flush_library_close(stream).await;
                control.close(CloseReason::PeerGone);
                return None;
            }
            _ => continue,
        };
        let (id, refusal) = match request {
            Ok(Request {
                id,
                body: RequestBody::Auth { token },
            }) => match node.auth().verify(&token) {
                Ok(identity) => return Some(identity),
                Err(error) => {
                    failures += 1;
                    (id, error.to_string())
                }
            },
            Ok(Request { id, body }) => {
                refused += 1;
                (
                    id,
                    format!(
                        "\"{}\" before authentication: send {{\"type\":\"auth\",\"token\":…}} first",
                        body.kind()
                    ),
                )
            }
            Err(error) => {
                refused += 1;
                (error.id, format!("authenticate first ({})", error.message))
            }
        };
        let event = ServerEvent::Error(ErrorEvent {
            code: ErrorCode::Unauthenticated,
            message: refusal,
            reference: id,
        });
        reply.offer(OutFrame::Text(event.encode()));
        let max_attempts = node.config().auth.max_attempts;
        if failures >= max_attempts {
            control.close(CloseReason::Send(CloseCode::AUTH_FAILED));
            return None;
        }
        if refused >= max_attempts {
            tracing::debug!(refused, "pending connection closed: frames other than auth");
            control.close(CloseReason::Send(CloseCode::POLICY_VIOLATION));
            return None;
        }
    }
}
