//! One client connection after the upgrade: one task running a reader and a writer, two
//! futures joined.
//!
//! ```text
//! socket ─▶ reader ─▶ session ─▶ node ─▶ broker ─▶ node ─▶ hub ─▶ outbox ─▶ writer ─▶ socket
//! ```
//!
//! The reader owns the [`session::Session`]; the writer owns the sending half and the heartbeat
//! deadline; they share a [`ConnControl`](crate::hub::control::ConnControl) through which either side (or the hub, for a
//! slow consumer, or the node, at shutdown) ends the connection. Cleanup (rooms, presence, hub)
//! runs once, after the writer has sent its Close frame. A panic anywhere in the connection's
//! future is caught at its top and the same cleanup runs from what the hub knows, so a bug
//! reached by one client never leaves its user online or in a room.

pub mod pending;
pub mod session;
pub mod writer;

use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::future::{self, Either};
use futures::stream::SplitStream;
use futures::{FutureExt, StreamExt};
use herald_protocol::{CloseCode, ServerEvent, Welcome};
use yawc::OpCode;

use crate::auth::Identity;
use crate::delivery::OutFrame;
use crate::hub::ConnHandle;
use crate::hub::control::{CloseReason, ConnControl, Expiry, ExpiryKind, Side, unix_ms};
use crate::hub::outbox::Outbox;
use crate::node::{ConnectError, Node};
use crate::transport::Socket;
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
/// One task runs the connection: the reader (authentication, then requests) and the writer
/// (the outbox, heartbeats, the Close frame) are two futures joined in it, so they progress
/// concurrently (the writer keeps sending while a request waits for the store) for the cost of
/// one task. Cleanup runs once both have ended.
///
/// An idle connection's task holds this future for its whole life, and a future reserves room
/// for the largest of its await points all along, and for its arguments too, even once they
/// are moved out. So the WebSocket is split (moved behind the halves' shared pointer) before
/// any async body, the stages are chained as combinators (an `async` block would keep both
/// halves twice, as captures and as the joined future), admission (authentication,
/// registration, the initial joins) runs once in its own box before the request loop, and the
/// rarely running awaits of the loop (requests, cleanup) are boxed, allocated only while they
/// run.
pub fn serve(
    ws: Socket,
    node: Arc<Node>,
    admission: Admission,
    rooms: Vec<String>,
    client: IpAddr,
    device: Option<Arc<str>>,
) -> impl Future<Output = ()> + Send {
    let progress = ws.write_progress();
    let (sink, stream) = ws.split();
    let control = Arc::new(ConnControl::new());
    let limits = &node.config().limits;
    let outbox = Arc::new(Outbox::new(limits.send_queue, limits.send_queue_bytes));
    let timing = writer::Timing {
        heartbeat: node.config().heartbeat.interval,
        refresh_notice: node.config().auth.refresh_notice,
        write_timeout: limits.write_timeout,
    };
    let writer = writer::run(sink, outbox.clone(), control.clone(), progress, timing);
    // Kept outside the connection's future: what a cleanup after a panic starts from.
    let after_panic = (node.clone(), control.clone());
    // Admission runs once, boxed: the idle connection keeps only the request loop's state.
    let admitted = Box::pin(admit(Box::new(Start {
        stream,
        node,
        admission,
        rooms,
        client,
        device,
        control,
        outbox,
        timing,
    })));
    let reader = admitted.then(|admitted| match admitted {
        Some((stream, control, session)) => Either::Left(read_requests(stream, control, session)),
        None => Either::Right(future::ready(None)),
    });
    let served = future::join(reader, writer).then(|(session, ())| async move {
        if let Some(session) = session {
            Box::pin(finish(session)).await;
        }
    });
    // Unwind safety: after a panic nothing of the connection's own state is used again; the
    // cleanup reads the hub and the engines, which never hold a lock across a call into it.
    AssertUnwindSafe(served)
        .catch_unwind()
        .then(move |served| match served {
            Ok(()) => Either::Left(future::ready(())),
            Err(_) => {
                let (node, control) = after_panic;
                Either::Right(Box::pin(clean_up_after_panic(node, control)))
            }
        })
}

/// Ends a connection whose task panicked. Its session (the rooms it joined) went with the
/// unwound future, so the hub says where it was; then the usual leave and disconnect run, and
/// the other members see `left` as for any disconnect.
async fn clean_up_after_panic(node: Arc<Node>, control: Arc<ConnControl>) {
    control.close(CloseReason::Send(CloseCode::INTERNAL_ERROR));
    let Some(handle) = node.hub().find_by_control(&control) else {
        tracing::error!("a connection panicked before it was registered");
        return;
    };
    tracing::error!(conn = %handle.id(), user = %handle.user(), "a connection panicked; cleaning up");
    for room in node.hub().rooms_of(handle.id()) {
        if let Err(error) = node.leave(&handle, &room).await {
            tracing::warn!(conn = %handle.id(), %room, %error, "leave after a panic failed");
        }
    }
    node.disconnect(&handle).await;
    metrics::counter!("herald_disconnects_total", "reason" => CloseCode::INTERNAL_ERROR.reason)
        .increment(1);
}

/// A text frame that makes the connection panic, for the test of the cleanup above. Compiled
/// only with the `test-hooks` feature, which the crate's own tests turn on.
#[cfg(feature = "test-hooks")]
pub const PANIC_REQUEST: &str = "{\"type\":\"test-hook-panic\"}";

/// What the reader starts with.
struct Start {
    stream: SplitStream<Socket>,
    node: Arc<Node>,
    admission: Admission,
    rooms: Vec<String>,
    /// The client's address (behind trusted proxies, the one they name).
    client: IpAddr,
    /// `?device=`: the device whose inbox mark the connection reads and moves.
    device: Option<Arc<str>>,
    control: Arc<ConnControl>,
    outbox: Arc<Outbox>,
    timing: writer::Timing,
}

/// Authenticates and registers the connection and joins the rooms asked for at connect.
/// Returns what the request loop needs, or `None` when the connection did not get that far.
async fn admit(start: Box<Start>) -> Option<(SplitStream<Socket>, Arc<ConnControl>, Session)> {
    let Start {
        mut stream,
        node,
        admission,
        rooms,
        client,
        device,
        control,
        outbox,
        timing,
    } = *start;
    let conn_id = node.next_conn_id();

    let identity = match admission {
        Admission::Authenticated(identity) => identity,
        Admission::Pending(slot) => {
            let deadline = unix_ms() + node.config().auth.timeout.as_millis() as u64;
            control.set_expiry(Some(Expiry {
                at_unix_ms: deadline,
                kind: ExpiryKind::AuthDeadline,
            }));
            let anonymous = ConnHandle::new(
                conn_id,
                Arc::from(""),
                client,
                outbox.clone(),
                control.clone(),
            );
            let identity = Box::pin(pending::authenticate(
                &mut stream,
                &node,
                &anonymous,
                &control,
            ))
            .await;
            drop(slot);
            identity?
        }
    };
    let handle = ConnHandle::new(
        conn_id,
        identity.user.clone(),
        client,
        outbox.clone(),
        control.clone(),
    );

    // The welcome goes first: the outbox is empty until the connection is registered, and
    // held until then, so a connection refused by a limit reached meanwhile gets its Close
    // without a welcome before it. The writer's own frames wait too: no deadline is set until
    // the welcome is released (a refresh notice may be due at once for a short token).
    control.set_expiry(None);
    outbox.hold();
    handle.offer(OutFrame::Text(
        ServerEvent::Welcome(Welcome {
            conn: handle.id().to_string(),
            user: identity.user.to_string(),
            node: node.id().to_string(),
            heartbeat: timing.heartbeat.as_secs().max(1),
        })
        .encode(),
    ));
    if let Err(error) = Box::pin(node.connect(&handle, device.clone())).await {
        let code = match error {
            ConnectError::Limit(_) => CloseCode::TRY_AGAIN_LATER,
            ConnectError::Engine(_) => CloseCode::INTERNAL_ERROR,
            ConnectError::ShuttingDown => CloseCode::GOING_AWAY,
        };
        tracing::info!(user = %identity.user, %client, %error, "connection refused after upgrade");
        drop(outbox.take_now());
        control.close(CloseReason::Send(code));
        outbox.release();
        return None;
    }
    // Both before the writer runs again (this task, no await between): its next loop, after
    // writing the welcome, sees the token's expiry.
    outbox.release();
    control.set_expiry(token_expiry(&identity));
    tracing::debug!(conn = %handle.id(), user = %identity.user, %client, "connected");
    metrics::counter!("herald_connects_total").increment(1);

    let mut session = Session::new(node, handle, identity, device);
    session.join_initial(rooms).await;
    Some((stream, control, session))
}

/// Reads requests until the connection is closing; returns the session to clean up.
///
/// A function returning an `async` block rather than an `async fn`: an `async fn` keeps its
/// arguments twice for its whole life (as arguments and as the locals they move into), and
/// this future is what an idle connection holds.
#[allow(clippy::manual_async_fn)] // on purpose, see above
fn read_requests(
    mut stream: SplitStream<Socket>,
    control: Arc<ConnControl>,
    mut session: Session,
) -> impl Future<Output = Option<Session>> + Send {
    async move {
        loop {
            let frame = tokio::select! {
                biased;
                _ = control.closed(Side::Reader) => break,
                () = session.next_commit(), if session.is_answering() || !session.may_read() => {
                    continue
                }
                frame = stream.next(), if session.may_read() => frame,
            };
            let Some(frame) = frame else {
                // A protocol error: the library queued its Close frame (1002, 1007, 1009, …).
                Box::pin(flush_library_close(&mut stream)).await;
                control.close(CloseReason::PeerGone);
                break;
            };
            control.touch();
            #[cfg(feature = "test-hooks")]
            if frame.payload().as_ref() == PANIC_REQUEST.as_bytes() {
                panic!("test hook: a request that panics");
            }
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
                // The library answers a Ping; either kind costs the rate limit like a request,
                // or Pings alone could keep the server writing Pongs at any rate.
                OpCode::Ping | OpCode::Pong => session.on_control(),
                _ => Flow::Continue,
            };
            if let Flow::Close(code) = flow {
                control.close(CloseReason::Send(code));
                Box::pin(drain_until_closed(&mut stream)).await;
                break;
            }
        }
        Some(session)
    }
}

/// Leaves the rooms and detaches the connection, once the writer has sent its Close frame.
async fn finish(session: Session) {
    let conn = session.handle().id();
    let reason = session.control().reason();
    session.finish().await;
    let reason_label = match reason {
        Some(CloseReason::Send(code)) => code.reason,
        // The application's own reason text could be anything: keep the label set bounded.
        Some(CloseReason::Kicked { .. }) => CloseCode::KICKED.reason,
        Some(CloseReason::PeerGone) | None => crate::metrics::PEER_CLOSED,
    };
    metrics::counter!("herald_disconnects_total", "reason" => reason_label).increment(1);
    tracing::debug!(%conn, reason = reason_label, "disconnected");
}

/// The token's `exp` as the connection's expiry (none for anonymous development users).
pub fn token_expiry(identity: &Identity) -> Option<Expiry> {
    identity.expires_at.map(|exp| Expiry {
        at_unix_ms: exp.saturating_mul(1000),
        kind: ExpiryKind::TokenExpiry,
    })
}

/// Reads and drops what the peer still sends, until it closes or [`writer::CLOSE_WAIT`] passes.
/// A socket closed with unread input is reset by the kernel, and a reset can destroy data the
/// peer has not read yet: a client that was sending fast (the flood that got it closed) would
/// lose the Close frame that says why.
async fn drain_until_closed<S: futures::Stream + Unpin>(stream: &mut S) {
    let _ = tokio::time::timeout(writer::CLOSE_WAIT, async {
        while stream.next().await.is_some() {}
    })
    .await;
}

/// Polls the stream once more after it ended: the library writes the Close frame it queued (its
/// answer to a protocol error, or the echo of the peer's Close) only while being read.
pub(crate) async fn flush_library_close<S: futures::Stream + Unpin>(stream: &mut S) {
    let _ = tokio::time::timeout(writer::CLOSE_WAIT, stream.next()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without running it.
    fn future_size<F: Future>(_: impl FnOnce() -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle connection holds this future in its task for its whole life, and tokio
    /// rounds a task up to a multiple of 128 bytes: past 896 bytes here the task of every
    /// connection grows from 1 KiB to 1.125 KiB (`docs/benchmarks.md`, idle memory).
    #[test]
    #[allow(unreachable_code)]
    fn an_idle_connection_future_fits_its_memory_budget() {
        let serving = future_size(|| serve(todo!(), todo!(), todo!(), todo!(), todo!(), todo!()));
        assert!(
            serving <= 896,
            "the connection future takes {serving} bytes"
        );
    }
}
