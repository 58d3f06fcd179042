//! The writer task: the only owner of the socket's sending half.
//!
//! It drains the bounded outbox, feeding everything already queued (up to [`MAX_BATCH`]) into
//! the WebSocket's write buffer before one flush, so a burst costs one syscall rather than one
//! per message. It also owns the connection's single deadline: the next Ping, or the moment the
//! peer has been silent for two heartbeat intervals. Whatever ends the connection, the writer
//! sends the Close frame with its code, under a bounded wait.

use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use yawc::{Frame, WebSocketError};

use super::control::{CloseReason, ConnControl};
use crate::delivery::OutFrame;
use herald_protocol::CloseCode;

/// Most frames written between two flushes.
const MAX_BATCH: usize = 256;

/// How long a Close frame may take to go out before the socket is simply dropped.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

pub async fn run<S>(
    mut sink: S,
    mut outbox: mpsc::Receiver<OutFrame>,
    control: Arc<ConnControl>,
    heartbeat: Duration,
) where
    S: Sink<Frame, Error = WebSocketError> + Unpin,
{
    let silence_limit = heartbeat * 2;
    let mut next_ping = Instant::now() + heartbeat;
    let reason = loop {
        let silent_until = control.last_seen() + silence_limit;
        let deadline = next_ping.min(silent_until);
        tokio::select! {
            biased;
            reason = control.closed() => break reason,
            frame = outbox.recv() => {
                let Some(frame) = frame else { break CloseReason::PeerGone };
                let written = tokio::select! {
                    written = write_batch(&mut sink, frame, &mut outbox) => written,
                    // The socket is not draining and someone asked to close: give up on it.
                    _ = control.closed() => return,
                };
                if written.is_err() {
                    break CloseReason::PeerGone;
                }
            }
            _ = sleep_until(deadline) => {
                if Instant::now() >= control.last_seen() + silence_limit {
                    break CloseReason::Send(CloseCode::HEARTBEAT_TIMEOUT);
                }
                next_ping = Instant::now() + heartbeat;
                let sent = tokio::select! {
                    sent = sink.send(Frame::ping(bytes::Bytes::new())) => sent,
                    _ = control.closed() => return,
                };
                if sent.is_err() {
                    break CloseReason::PeerGone;
                }
            }
        }
    };
    // Tell the reader (and the hub) too, in case the writer decided.
    control.close(reason);
    let _ = timeout(CLOSE_WAIT, close(&mut sink, &mut outbox, reason)).await;
}

async fn write_batch<S>(
    sink: &mut S,
    first: OutFrame,
    outbox: &mut mpsc::Receiver<OutFrame>,
) -> Result<(), WebSocketError>
where
    S: Sink<Frame, Error = WebSocketError> + Unpin,
{
    let mut written = 1;
    sink.feed(to_frame(first)).await?;
    while written < MAX_BATCH {
        let Ok(frame) = outbox.try_recv() else { break };
        sink.feed(to_frame(frame)).await?;
        written += 1;
    }
    sink.flush().await?;
    metrics::counter!("herald_frames_sent_total").increment(written as u64);
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
    outbox: &mut mpsc::Receiver<OutFrame>,
    reason: CloseReason,
) -> Result<(), WebSocketError>
where
    S: Sink<Frame, Error = WebSocketError> + Unpin,
{
    match reason {
        CloseReason::Send(code) => {
            if code != CloseCode::SLOW_CONSUMER {
                while let Ok(frame) = outbox.try_recv() {
                    sink.feed(to_frame(frame)).await?;
                }
            }
            sink.send(Frame::close(
                yawc::close::CloseCode::from(code.code),
                code.reason,
            ))
            .await?;
        }
        // The reader already let the library answer the peer; just end the stream.
        CloseReason::PeerGone => sink.flush().await?,
    }
    sink.close().await
}
