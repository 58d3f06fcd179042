//! The writer task: the only owner of the socket's sending half.
//!
//! It drains the bounded outbox, feeding everything already queued into the WebSocket's write
//! buffer before one flush, so a burst costs one syscall rather than one per message (the
//! buffer itself flushes early past yawc's backpressure boundary). It also owns the connection's single deadline, the earliest of: the next Ping,
//! the moment the peer has been silent for two heartbeat intervals, the refresh notice before the
//! token expires, and the expiry itself (the token's `exp`, or a pending connection's auth
//! deadline). Whatever ends the connection, the writer sends the Close frame with its code,
//! under a bounded wait. After each write it records the traffic (connection stats, metrics)
//! and each frame's delivery latency, once per batch. A write during which the socket takes no
//! byte for `limits.write_timeout` ends the connection as a slow consumer (4001): a peer that
//! stops reading cannot hold the connection's memory for longer than that.

use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant as StdInstant};

use futures::{Sink, SinkExt};
use tokio::time::{Instant, sleep_until, timeout};
use yawc::{Frame, WebSocketError};

use crate::deflate::SharedDeflate;
use crate::delivery::{OutFrame, Outgoing};
use crate::hub::control::{CloseReason, ConnControl, Expiry, ExpiryKind, Side, instant_at};
use crate::hub::outbox::Outbox;
use crate::metrics::HOT;
use crate::transport::{Outbound, WriteProgress};
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
    /// How long a write may go without the socket taking a byte before the connection is cut
    /// off as a slow consumer.
    pub write_timeout: Duration,
}

/// Runs the writer until the connection has closed.
///
/// A function returning an `async` block rather than an `async fn`: an `async fn` keeps its
/// arguments twice for its whole life (as arguments and as the locals they move into), and
/// this future is what an idle connection holds.
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub fn run<S>(
    mut sink: S,
    outbox: Arc<Outbox>,
    control: Arc<ConnControl>,
    progress: WriteProgress,
    timing: Timing,
) -> impl Future<Output = ()> + Send
where
    S: Sink<Outbound, Error = WebSocketError> + Unpin + Send,
{
    // Made here, not in the block: a value moved from a capture to a local keeps both slots.
    let mut clock = Clock::new(timing);
    async move {
        // Both futures live across iterations: creating them per message registered a
        // cancellation waiter and a timer, then removed both, for every frame sent (about 5% of
        // the server's CPU in a fan-out profile).
        let closed = control.closed(Side::Writer);
        tokio::pin!(closed);
        let wake = sleep_until(clock.next_ping);
        tokio::pin!(wake);
        let reason = loop {
            {
                let deadline = clock.deadline(&control);
                if wake.deadline() != deadline {
                    wake.as_mut().reset(deadline);
                }
            }
            tokio::select! {
                biased;
                reason = &mut closed => break reason,
                frames = outbox.take() => {
                    if frames.is_empty() {
                        break CloseReason::PeerGone; // the outbox was closed
                    }
                    // Boxed, like the Ping below: an allocation per batch written, so that an idle
                    // writer's future does not keep room for a write in progress (and its timer).
                    let write = write_batch(&mut sink, frames, &outbox, &control);
                    let stall = clock.timing.write_timeout;
                    let written = tokio::select! {
                        written = Box::pin(unless_stalled(write, &progress, stall)) => written,
                        // The socket is not draining and someone asked to close: give up on it.
                        _ = &mut closed => return,
                    };
                    match written {
                        Some(Ok(())) => {}
                        Some(Err(_)) => break CloseReason::PeerGone,
                        None => break stalled(&control),
                    }
                }
                _ = &mut wake => {
                    let frame = match clock.due(&control, Instant::now()) {
                        Due::Close(code) => break CloseReason::Send(code),
                        Due::Send(frame) => frame,
                        // The expiry moved (a refresh): recompute the deadline.
                        Due::Nothing => continue,
                    };
                    let send = sink.send(frame.into());
                    let stall = clock.timing.write_timeout;
                    let sent = tokio::select! {
                        sent = Box::pin(unless_stalled(send, &progress, stall)) => sent,
                        _ = &mut closed => return,
                    };
                    match sent {
                        Some(Ok(())) => {}
                        Some(Err(_)) => break CloseReason::PeerGone,
                        None => break stalled(&control),
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
}

/// Runs `write` to its end, or gives up (`None`) once the socket has taken no byte for `stall`.
async fn unless_stalled<F: Future>(
    write: F,
    progress: &WriteProgress,
    stall: Duration,
) -> Option<F::Output> {
    tokio::pin!(write);
    // Most writes finish at once: they never start a timer.
    if let Poll::Ready(done) = futures::poll!(write.as_mut()) {
        return Some(done);
    }
    let mut seen = progress.bytes();
    loop {
        if let Ok(done) = timeout(stall, write.as_mut()).await {
            return Some(done);
        }
        let now = progress.bytes();
        if now == seen {
            return None;
        }
        seen = now;
    }
}

/// The reason a connection whose socket stopped taking bytes ends with.
fn stalled(control: &ConnControl) -> CloseReason {
    let reason = CloseReason::Send(CloseCode::SLOW_CONSUMER);
    if control.close(reason.clone()) {
        metrics::counter!("herald_slow_consumers_total").increment(1);
        tracing::info!("slow consumer cut off: its socket took nothing for limits.write_timeout");
    }
    reason
}

/// The writer's timekeeping: when to ping, when the peer's silence, the token's expiry or its
/// refresh notice is due. Everything else is read from the [`ConnControl`] at each wake-up, so
/// an idle writer keeps only this across its await.
struct Clock {
    timing: Timing,
    next_ping: Instant,
    /// The token expiry (unix ms) a refresh notice was already sent for. Only token expiries
    /// get a notice, so the instant alone tells them apart; 8 bytes where an `Option<Expiry>`
    /// takes 16, in a struct every idle connection holds.
    noticed_expiry: Option<NonZeroU64>,
}

/// What a wake-up of the writer's deadline calls for.
enum Due {
    Close(CloseCode),
    Send(Frame),
    Nothing,
}

impl Clock {
    fn new(timing: Timing) -> Self {
        Clock {
            timing,
            next_ping: Instant::now() + timing.heartbeat,
            noticed_expiry: None,
        }
    }

    fn silent_until(&self, control: &ConnControl) -> Instant {
        control.last_seen() + self.timing.heartbeat * 2
    }

    /// The connection's expiry with its instant, and when its refresh notice is due (none once
    /// sent, and none for an auth deadline).
    fn expiry(
        &self,
        control: &ConnControl,
        now: Instant,
    ) -> Option<(Expiry, Instant, Option<Instant>)> {
        let expiry = control.expiry()?;
        let at = instant_at(now, expiry.at_unix_ms);
        let notice_at = (expiry.kind == ExpiryKind::TokenExpiry
            && self.noticed_expiry != NonZeroU64::new(expiry.at_unix_ms))
        .then(|| at.checked_sub(self.timing.refresh_notice).unwrap_or(at));
        Some((expiry, at, notice_at))
    }

    /// The earliest moment something is due.
    fn deadline(&self, control: &ConnControl) -> Instant {
        let mut deadline = self.next_ping.min(self.silent_until(control));
        if let Some((_, at, notice_at)) = self.expiry(control, Instant::now()) {
            // A notice is never due after the expiry it announces.
            deadline = deadline.min(notice_at.unwrap_or(at));
        }
        deadline
    }

    /// What is due at `now`; a Ping or a refresh notice counts as sent.
    fn due(&mut self, control: &ConnControl, now: Instant) -> Due {
        if now >= self.silent_until(control) {
            return Due::Close(CloseCode::HEARTBEAT_TIMEOUT);
        }
        let expiry = self.expiry(control, now);
        if let Some((expiry, at, notice_at)) = expiry {
            if now >= at {
                return Due::Close(match expiry.kind {
                    ExpiryKind::AuthDeadline => CloseCode::AUTH_TIMEOUT,
                    ExpiryKind::TokenExpiry => CloseCode::TOKEN_EXPIRED,
                });
            }
            if notice_at.is_some_and(|notice_at| now >= notice_at) {
                self.noticed_expiry = NonZeroU64::new(expiry.at_unix_ms);
                let expires_in = at.saturating_duration_since(now).as_secs();
                return Due::Send(Frame::text(
                    ServerEvent::Refresh(RefreshNotice { expires_in }).encode(),
                ));
            }
        }
        if now >= self.next_ping {
            self.next_ping = now + self.timing.heartbeat;
            return Due::Send(Frame::ping(bytes::Bytes::new()));
        }
        Due::Nothing
    }
}

async fn write_batch<S>(
    sink: &mut S,
    mut frames: VecDeque<Outgoing>,
    outbox: &Outbox,
    control: &ConnControl,
) -> Result<(), WebSocketError>
where
    S: Sink<Outbound, Error = WebSocketError> + Unpin,
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
        sink.feed(to_outbound(frame, item.deflate.take())).await?;
    }
    // Counted before the flush: whoever has read these frames finds them in the stats.
    control.stats.sent(frames.len(), bytes);
    sink.flush().await?;
    outbox.written(bytes);
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

fn to_outbound(frame: OutFrame, deflate: Option<Arc<SharedDeflate>>) -> Outbound {
    let frame = match frame {
        OutFrame::Text(bytes) => Frame::text(bytes),
        OutFrame::Binary(bytes) => Frame::binary(bytes),
    };
    Outbound::new(frame, deflate)
}

/// Ends the connection: what is already queued goes out first (the errors that explain a
/// policy close, say), except for a slow consumer, whose backlog is the problem.
async fn close<S>(sink: &mut S, outbox: &Outbox, reason: CloseReason) -> Result<(), WebSocketError>
where
    S: Sink<Outbound, Error = WebSocketError> + Unpin,
{
    match reason {
        CloseReason::Send(code) => {
            // A slow consumer's queue is what it could not take; after an interrupted
            // fan-out the queue may follow missed frames, and the client recovers from the
            // last offset it got, so neither is flushed.
            if code != CloseCode::SLOW_CONSUMER && code != CloseCode::SERVICE_RESTART {
                for queued in outbox.take_now() {
                    sink.feed(to_outbound(queued.frame, queued.deflate)).await?;
                }
            }
            sink.send(Frame::close(yawc::close::CloseCode::from(code.code), code.reason).into())
                .await?;
        }
        CloseReason::Kicked { code, reason } => {
            // What was queued before the disconnect (a "you are banned" notice) goes first.
            for queued in outbox.take_now() {
                sink.feed(to_outbound(queued.frame, queued.deflate)).await?;
            }
            sink.send(Frame::close(yawc::close::CloseCode::from(code), &*reason).into())
                .await?;
        }
        // The reader already let the library answer the peer; just end the stream.
        CloseReason::PeerGone => sink.flush().await?,
    }
    sink.close().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::control::unix_ms;

    const TIMING: Timing = Timing {
        heartbeat: Duration::from_secs(25),
        refresh_notice: Duration::from_secs(30),
        write_timeout: Duration::from_secs(10),
    };

    fn expiring(kind: ExpiryKind, at_unix_ms: u64) -> ConnControl {
        let control = ConnControl::new();
        control.set_expiry(Some(Expiry { at_unix_ms, kind }));
        control
    }

    fn closes_with(due: Due) -> Option<CloseCode> {
        match due {
            Due::Close(code) => Some(code),
            _ => None,
        }
    }

    #[test]
    fn an_auth_deadline_just_past_closes_with_4101() {
        let control = expiring(ExpiryKind::AuthDeadline, unix_ms());
        let mut clock = Clock::new(TIMING);
        let now = Instant::now();
        assert!(clock.deadline(&control) <= now + Duration::from_millis(1));
        assert_eq!(
            closes_with(clock.due(&control, now)),
            Some(CloseCode::AUTH_TIMEOUT)
        );
    }

    #[test]
    fn a_token_gets_one_refresh_notice_then_expires_with_4100() {
        let control = expiring(ExpiryKind::TokenExpiry, unix_ms() + 10_000);
        let mut clock = Clock::new(TIMING);
        let now = Instant::now();
        // Within `refresh_notice` of the expiry: the notice is due at once, and only once.
        assert!(
            matches!(clock.due(&control, now), Due::Send(frame) if frame.opcode() == yawc::OpCode::Text)
        );
        assert!(matches!(clock.due(&control, now), Due::Nothing));
        assert!(clock.deadline(&control) > now + Duration::from_secs(9));
        control.set_expiry(Some(Expiry {
            at_unix_ms: unix_ms(),
            kind: ExpiryKind::TokenExpiry,
        }));
        assert_eq!(
            closes_with(clock.due(&control, Instant::now())),
            Some(CloseCode::TOKEN_EXPIRED)
        );
    }

    #[test]
    fn pings_follow_the_heartbeat_and_silence_closes_with_4000() {
        let control = ConnControl::new();
        let start = Instant::now();
        let mut clock = Clock::new(TIMING);
        assert!(matches!(clock.due(&control, start), Due::Nothing));
        let ping_at = clock.deadline(&control);
        assert!(ping_at >= start + TIMING.heartbeat);
        assert!(
            matches!(clock.due(&control, ping_at), Due::Send(frame) if frame.opcode() == yawc::OpCode::Ping)
        );
        assert_eq!(
            closes_with(clock.due(&control, start + TIMING.heartbeat * 2)),
            Some(CloseCode::HEARTBEAT_TIMEOUT)
        );
    }
}
