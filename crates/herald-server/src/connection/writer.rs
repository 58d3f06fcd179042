//! The writer task: the only owner of the socket's sending half.
//!
//! It drains the bounded outbox, feeding everything already queued (up to [`MAX_BATCH`]) into
//! the WebSocket's write buffer before one flush, so a burst costs one syscall rather than one
//! per message. It also owns the connection's single deadline: the next Ping, or the moment the
//! peer has been silent for two heartbeat intervals. Whatever ends the connection, the writer
//! sends the Close frame with its code, under a bounded wait. After each flush it records the
//! traffic (connection stats, metrics) and each frame's delivery latency, once per batch.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use futures::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use yawc::{Frame, WebSocketError};

use super::control::{CloseReason, ConnControl};
use crate::delivery::{OutFrame, Outgoing};
use crate::metrics::HOT;
use herald_protocol::CloseCode;

/// Most frames written between two flushes.
const MAX_BATCH: usize = 256;

/// How long a Close frame may take to go out before the socket is simply dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

pub async fn run<S>(
    mut sink: S,
    mut outbox: mpsc::Receiver<Outgoing>,
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
                    written = write_batch(&mut sink, frame, &mut outbox, &control) => written,
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
    control.close(reason.clone());
    let _ = timeout(CLOSE_WAIT, close(&mut sink, reason)).await;
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

async fn close<S>(sink: &mut S, reason: CloseReason) -> Result<(), WebSocketError>
where
    S: Sink<Frame, Error = WebSocketError> + Unpin,
{
    match reason {
        CloseReason::Send(code) => {
            sink.send(Frame::close(
                yawc::close::CloseCode::from(code.code),
                code.reason,
            ))
            .await?;
        }
        CloseReason::Kicked { code, reason } => {
            sink.send(Frame::close(yawc::close::CloseCode::from(code), &*reason))
                .await?;
        }
        // The peer's Close may still wait in the library's queue for its echo: flush it.
        CloseReason::PeerGone => sink.flush().await?,
    }
    sink.close().await
}
