//! The writer task: the only owner of the socket's sending half.
//!
//! It drains the bounded outbox, feeding everything already queued (up to [`MAX_BATCH`]) into
//! the WebSocket's write buffer before one flush, so a burst costs one syscall rather than one
//! per message. It also owns the connection's single deadline, the earliest of: the next Ping,
//! the moment the peer has been silent for two heartbeat intervals, the refresh notice before the
//! token expires, and the expiry itself (the token's `exp`, or a pending connection's auth
//! deadline). Whatever ends the connection, the writer sends the Close frame with its code,
//! under a bounded wait. After each write it records the traffic (connection stats, metrics)
//! and each frame's delivery latency, once per batch.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use futures::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use yawc::{Frame, WebSocketError};

use super::control::{CloseReason, ConnControl, ExpiryKind, instant_at};
use crate::delivery::{OutFrame, Outgoing};
use crate::metrics::HOT;
use herald_protocol::{CloseCode, RefreshNotice, ServerEvent};

/// Most frames written between two flushes.
const MAX_BATCH: usize = 256;

/// How long a Close frame may take to go out before the socket is simply dropped.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The writer's clock settings.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Interval between Pings; twice this without a frame from the peer closes the connection.
    pub heartbeat: Duration,
    /// How long before the token's expiry the client is asked to refresh it.
    pub refresh_notice: Duration,
}

pub async fn run<S>(
    mut sink: S,
    mut outbox: mpsc::Receiver<Outgoing>,
    control: Arc<ConnControl>,
    timing: Timing,
) where
    S: Sink<Frame, Error = WebSocketError> + Unpin,
{
    let silence_limit = timing.heartbeat * 2;
    let mut next_ping = Instant::now() + timing.heartbeat;
    // The token expiry a refresh notice was already sent for.
    let mut noticed_expiry = None;
    // Both futures live across iterations: creating them per message registered a
    // cancellation waiter and a timer, then removed both, for every frame sent (about 5% of
    // the server's CPU in a fan-out profile).
    let closed = control.closed();
    tokio::pin!(closed);
    let wake = sleep_until(next_ping);
    tokio::pin!(wake);
    let reason = loop {
        let silent_until = control.last_seen() + silence_limit;
        let expiry = control.expiry();
        let expires_at = expiry.map(|e| instant_at(e.at_unix_ms));
        let notice_at = match expiry {
            Some(e) if e.kind == ExpiryKind::TokenExpiry && noticed_expiry != Some(e) => {
                expires_at.map(|at| at.checked_sub(timing.refresh_notice).unwrap_or(at))
            }
            _ => None,
        };
        let deadline = [Some(next_ping), Some(silent_until), expires_at, notice_at]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_ping);
        if wake.deadline() != deadline {
            wake.as_mut().reset(deadline);
        }
        tokio::select! {
            biased;
            reason = &mut closed => break reason,
            frame = outbox.recv() => {
                let Some(frame) = frame else { break CloseReason::PeerGone };
                let written = tokio::select! {
                    written = write_batch(&mut sink, frame, &mut outbox, &control) => written,
                    // The socket is not draining and someone asked to close: give up on it.
                    _ = &mut closed => return,
                };
                if written.is_err() {
                    break CloseReason::PeerGone;
                }
            }
            _ = &mut wake => {
                let now = Instant::now();
                if now >= control.last_seen() + silence_limit {
                    break CloseReason::Send(CloseCode::HEARTBEAT_TIMEOUT);
                }
                if let (Some(expiry), Some(at)) = (expiry, expires_at)
                    && now >= at
                    && control.expiry() == Some(expiry)
                {
                    break CloseReason::Send(match expiry.kind {
                        ExpiryKind::AuthDeadline => CloseCode::AUTH_TIMEOUT,
                        ExpiryKind::TokenExpiry => CloseCode::TOKEN_EXPIRED,
                    });
                }
                let frame = if notice_at.is_some_and(|at| now >= at) {
                    noticed_expiry = expiry;
                    let expires_in = expires_at.map_or(0, |at| at.saturating_duration_since(now).as_secs());
                    Frame::text(ServerEvent::Refresh(RefreshNotice { expires_in }).encode())
                } else if now >= next_ping {
                    next_ping = now + timing.heartbeat;
                    Frame::ping(bytes::Bytes::new())
                } else {
                    // The expiry moved (a refresh): recompute the deadline.
                    continue;
                };
                let sent = tokio::select! {
                    sent = sink.send(frame) => sent,
                    _ = &mut closed => return,
                };
                if sent.is_err() {
                    break CloseReason::PeerGone;
                }
            }
        }
    };
    // Tell the reader (and the hub) too, in case the writer decided.
    control.close(reason.clone());
    let _ = timeout(CLOSE_WAIT, close(&mut sink, &mut outbox, reason)).await;
}

async fn write_batch<S>(
    sink: &mut S,
    first: Outgoing,
    outbox: &mut mpsc::Receiver<Outgoing>,
    control: &ConnControl,
) -> Result<(), WebSocketError>
where
    S: Sink<Frame, Error = WebSocketError> + Unpin,
{
    // Acceptance times of the frames in this write, for the latency histogram after the flush.
    let mut accepted: Vec<StdInstant> = Vec::with_capacity(outbox.len().min(MAX_BATCH) + 1);
    let (mut text, mut binary, mut bytes) = (0u64, 0u64, 0usize);
    let mut next = Some(first);
    while let Some(item) = next.take() {
        accepted.push(item.accepted);
        bytes += item.frame.len();
        match item.frame {
            OutFrame::Text(_) => text += 1,
            OutFrame::Binary(_) => binary += 1,
        }
        sink.feed(to_frame(item.frame)).await?;
        if accepted.len() < MAX_BATCH {
            next = outbox.try_recv().ok();
        }
    }
    // Counted before the flush: whoever has read these frames finds them in the stats.
    control.stats.sent(accepted.len(), bytes);
    sink.flush().await?;
    let flushed = StdInstant::now();
    for moment in &accepted {
        HOT.delivery_latency
            .record(flushed.saturating_duration_since(*moment).as_secs_f64());
    }
    HOT.text_out.increment(text);
    HOT.binary_out.increment(binary);
    HOT.sent_bytes.increment(bytes as u64);
    Ok(())
}

fn to_frame(frame: OutFrame) -> Frame {
    match frame {
        OutFrame::Text(bytes) => Frame::text(bytes),
        OutFrame::Binary(bytes) => Frame::binary(bytes),
    }
}

/// Ends the connection: what is already queued goes out first (the errors that explain a
/// policy close, say), except for a slow consumer, whose backlog is the problem.
async fn close<S>(
    sink: &mut S,
    outbox: &mut mpsc::Receiver<Outgoing>,
    reason: CloseReason,
) -> Result<(), WebSocketError>
where
    S: Sink<Frame, Error = WebSocketError> + Unpin,
{
    match reason {
        CloseReason::Send(code) => {
            if code != CloseCode::SLOW_CONSUMER {
                while let Ok(queued) = outbox.try_recv() {
                    sink.feed(to_frame(queued.frame)).await?;
                }
            }
            sink.send(Frame::close(
                yawc::close::CloseCode::from(code.code),
                code.reason,
            ))
            .await?;
        }
        CloseReason::Kicked { code, reason } => {
            // What was queued before the disconnect (a "you are banned" notice) goes first.
            while let Ok(queued) = outbox.try_recv() {
                sink.feed(to_frame(queued.frame)).await?;
            }
            sink.send(Frame::close(yawc::close::CloseCode::from(code), &*reason))
                .await?;
        }
        // The reader already let the library answer the peer; just end the stream.
        CloseReason::PeerGone => sink.flush().await?,
    }
    sink.close().await
}
