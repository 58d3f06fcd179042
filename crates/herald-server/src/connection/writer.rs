//! The writer task: the only owner of the socket's sending half.
//!
//! It drains the bounded outbox, feeding everything already queued into the WebSocket's write
//! buffer before one flush, so a burst costs one syscall rather than one per message (the
//! buffer itself flushes early past yawc's backpressure boundary). It also owns the connection's single deadline, the earliest of: the next Ping,
//! the moment the peer has been silent for two heartbeat intervals, the refresh notice before the
//! token expires, and the expiry itself (the token's `exp`, or a pending connection's auth
//! deadline). Whatever ends the connection, the writer sends the Close frame with its code,
//! under a bounded wait. After each write it records the traffic (connection stats, metrics)
//! and each frame's delivery latency, once per batch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use futures::{Sink, SinkExt};
use tokio::time::{Instant, sleep_until, timeout};
use yawc::{Frame, WebSocketError};

use super::control::{CloseReason, ConnControl, ExpiryKind, instant_at};
use super::outbox::Outbox;
use crate::delivery::{OutFrame, Outgoing};
use crate::metrics::HOT;
use herald_protocol::{CloseCode, RefreshNotice, ServerEvent};

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

pub async fn run<S>(mut sink: S, outbox: Arc<Outbox>, control: Arc<ConnControl>, timing: Timing)
where
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
            frames = outbox.take() => {
                if frames.is_empty() {
                    break CloseReason::PeerGone; // the outbox was closed
                }
                // Boxed, like the Ping below: an allocation per batch written, so that an idle
                // writer's future does not keep room for a write in progress.
                let written = tokio::select! {
                    written = Box::pin(write_batch(&mut sink, frames, &control)) => written,
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
                    sent = Box::pin(sink.send(frame)) => sent,
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
    // Boxed: it runs once, at the end, and would otherwise add its size to every idle writer.
    let _ = Box::pin(timeout(CLOSE_WAIT, close(&mut sink, &outbox, reason))).await;
    outbox.close();
}

async fn write_batch<S>(
    sink: &mut S,
    mut frames: VecDeque<Outgoing>,
    control: &ConnControl,
) -> Result<(), WebSocketError>
where
    S: Sink<Frame, Error = WebSocketError> + Unpin,
{
    let (mut text, mut binary, mut bytes) = (0u64, 0u64, 0usize);
    for item in &mut frames {
        bytes += item.frame.len();
        // The frame moves to the socket; its acceptance time stays for the latency histogram.
        let frame = std::mem::replace(&mut item.frame, OutFrame::Text(bytes::Bytes::new()));
        match &frame {
            OutFrame::Text(_) => text += 1,
            OutFrame::Binary(_) => binary += 1,
        }
        sink.feed(to_frame(frame)).await?;
    }
    // Counted before the flush: whoever has read these frames finds them in the stats.
    control.stats.sent(frames.len(), bytes);
    sink.flush().await?;
    let flushed = StdInstant::now();
    for item in &frames {
        HOT.delivery_latency.record(
            flushed
                .saturating_duration_since(item.accepted)
                .as_secs_f64(),
        );
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
async fn close<S>(sink: &mut S, outbox: &Outbox, reason: CloseReason) -> Result<(), WebSocketError>
where
    S: Sink<Frame, Error = WebSocketError> + Unpin,
{
    match reason {
        CloseReason::Send(code) => {
            if code != CloseCode::SLOW_CONSUMER {
                for queued in outbox.take_now() {
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
            for queued in outbox.take_now() {
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
