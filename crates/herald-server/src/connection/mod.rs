//! One client connection after the upgrade: a reader task (this one) and a writer task.
//!
//! ```text
//! socket ─▶ reader ─▶ session ─▶ node ─▶ broker ─▶ node ─▶ hub ─▶ outbox ─▶ writer ─▶ socket
//! ```
//!
//! The reader owns the [`session::Session`]; the writer owns the sending half and the heartbeat
//! deadline; they share a [`control::ConnControl`] through which either side (or the hub, for a
//! slow consumer, or the node, at shutdown) ends the connection. Cleanup (rooms, presence, hub)
//! runs once, in the reader, after the writer has sent its Close frame.

pub mod control;
pub mod outbox;
pub mod pending;
pub mod session;
pub mod writer;

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::{SplitSink, SplitStream};
use herald_protocol::{CloseCode, ServerEvent, Welcome};
use yawc::{Frame, OpCode};

use crate::auth::Identity;
use crate::delivery::OutFrame;
use crate::hub::ConnHandle;
use crate::node::{ConnectError, Node};
use crate::transport::Socket;
use control::{CloseReason, ConnControl, Expiry, ExpiryKind, unix_ms};
use pending::PendingSlot;
use session::{Flow, Session};

/// How a connection got in at the handshake.
pub enum Admission {
    /// With a valid token (or as an anonymous development user).
    Authenticated(Identity),
    /// Without a token: the first message must authenticate.
    Pending(PendingSlot),
}

/// Serves an upgraded WebSocket until it closes.
///
/// An idle connection's task holds this future for its whole life, and a future reserves room
/// for the largest of its await points all along, and for its arguments too, even once they
/// are moved out. So the WebSocket is split (moved behind the halves' shared pointer) before
/// the async body, the arguments arrive in one box, and the rarely running awaits
/// (authentication, connecting, joining, requests, cleanup) are boxed, allocated only while
/// they run.
pub fn serve(
    ws: Socket,
    node: Arc<Node>,
    admission: Admission,
    rooms: Vec<String>,
) -> impl Future<Output = ()> + Send {
    let (sink, stream) = ws.split();
    serve_split(Box::new(Start {
        sink,
        stream,
        node,
        admission,
        rooms,
    }))
}

/// What a connection starts with.
struct Start {
    sink: SplitSink<Socket, Frame>,
    stream: SplitStream<Socket>,
    node: Arc<Node>,
    admission: Admission,
    rooms: Vec<String>,
}

async fn serve_split(start: Box<Start>) {
    let Start {
        sink,
        mut stream,
        node,
        admission,
        rooms,
    } = *start;
    let control = Arc::new(ConnControl::new(node.shutdown.child_token()));
    let outbox = Arc::new(outbox::Outbox::new(node.config.limits.send_queue));
    let conn_id = node.next_conn_id();
    let timing = writer::Timing {
        heartbeat: node.config.heartbeat.interval,
        refresh_notice: node.config.auth.refresh_notice,
    };
    let writer = tokio::spawn(writer::run(sink, outbox.clone(), control.clone(), timing));

    let identity = match admission {
        Admission::Authenticated(identity) => identity,
        Admission::Pending(slot) => {
            let deadline = unix_ms() + node.config.auth.timeout.as_millis() as u64;
            control.set_expiry(Some(Expiry {
                at_unix_ms: deadline,
                kind: ExpiryKind::AuthDeadline,
            }));
            let anonymous =
                ConnHandle::new(conn_id, Arc::from(""), outbox.clone(), control.clone());
            let identity = Box::pin(pending::authenticate(
                &mut stream,
                &node,
                &anonymous,
                &control,
            ))
            .await;
            drop(slot);
            match identity {
                Some(identity) => identity,
                None => {
                    let _ = writer.await;
                    return;
                }
            }
        }
    };
    control.set_expiry(token_expiry(&identity));
    let handle = ConnHandle::new(conn_id, identity.user.clone(), outbox, control.clone());

    // The welcome goes first: the outbox is empty until the connection is registered.
    handle.offer(OutFrame::Text(
        ServerEvent::Welcome(Welcome {
            conn: handle.id().to_string(),
            user: identity.user.to_string(),
            node: node.id.to_string(),
            heartbeat: timing.heartbeat.as_secs().max(1),
        })
        .encode(),
    ));
    if let Err(error) = Box::pin(node.connect(&handle)).await {
        let code = match error {
            ConnectError::Limit(_) => CloseCode::TRY_AGAIN_LATER,
            ConnectError::Engine(_) => CloseCode::INTERNAL_ERROR,
        };
        tracing::info!(user = %identity.user, %error, "connection refused after upgrade");
        control.close(CloseReason::Send(code));
        let _ = writer.await;
        return;
    }
    tracing::debug!(conn = %handle.id(), user = %identity.user, "connected");
    metrics::counter!("herald_connects_total").increment(1);

    let mut session = Session::new(node.clone(), handle.clone(), identity, control.clone());
    Box::pin(session.join_initial(rooms)).await;

    loop {
        let frame = tokio::select! {
            biased;
            _ = control.closed() => break,
            frame = stream.next() => frame,
        };
        let Some(frame) = frame else {
            // A protocol error: the library queued its Close frame (1002, 1007, 1009, …).
            Box::pin(flush_library_close(&mut stream)).await;
            control.close(CloseReason::PeerGone);
            break;
        };
        control.touch();
        if matches!(frame.opcode(), OpCode::Text | OpCode::Binary) {
            control.stats.received(frame.payload().len());
            crate::metrics::HOT
                .received_bytes
                .increment(frame.payload().len() as u64);
        }
        let flow = match frame.opcode() {
            OpCode::Text => Box::pin(session.on_text(frame.payload())).await,
            OpCode::Binary => Box::pin(session.on_binary(frame.payload())).await,
            OpCode::Close => {
                // The library queued the echo of the peer's Close frame.
                Box::pin(flush_library_close(&mut stream)).await;
                control.close(CloseReason::PeerGone);
                break;
            }
            // Ping is answered by the library; Pong only proves liveness (touched above).
            _ => Flow::Continue,
        };
        if let Flow::Close(code) = flow {
            control.close(CloseReason::Send(code));
            break;
        }
    }

    let reason = control.reason();
    let _ = writer.await;
    Box::pin(session.finish()).await;
    let reason_label = match reason {
        Some(CloseReason::Send(code)) => code.reason,
        // The application's own reason text could be anything: keep the label set bounded.
        Some(CloseReason::Kicked { .. }) => CloseCode::KICKED.reason,
        Some(CloseReason::PeerGone) | None => "peer closed",
    };
    metrics::counter!("herald_disconnects_total", "reason" => reason_label).increment(1);
    tracing::debug!(conn = %handle.id(), reason = reason_label, "disconnected");
}

/// The token's `exp` as the connection's expiry (none for anonymous development users).
pub fn token_expiry(identity: &Identity) -> Option<Expiry> {
    identity.expires_at.map(|exp| Expiry {
        at_unix_ms: exp.saturating_mul(1000),
        kind: ExpiryKind::TokenExpiry,
    })
}

/// Polls the stream once more after it ended: the library writes the Close frame it queued (its
/// answer to a protocol error, or the echo of the peer's Close) only while being read.
pub(crate) async fn flush_library_close<S: futures::Stream + Unpin>(stream: &mut S) {
    let _ = tokio::time::timeout(writer::CLOSE_WAIT, stream.next()).await;
}
