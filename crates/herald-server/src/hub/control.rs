//! The control block a connection's reader, writer and hub handle share: the one-shot close
//! request with its reason (and the wakers of the reader and writer waiting for it), the time
//! of the last frame received (for the heartbeat), the connection's expiry (the auth deadline
//! of a pending connection, or its token's `exp`), and the traffic counters the server API
//! reports. The writer turns the times into its one deadline.

use std::future::{Future, poll_fn};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::task::AtomicWaker;
use tokio::time::Instant;

use herald_protocol::CloseCode;

/// Why a connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The server closes it: the writer sends a Close frame with this code.
    Send(CloseCode),
    /// The application disconnects it through the server API, with its own code and text.
    Kicked { code: u16, reason: Arc<str> },
    /// The peer closed it or the socket failed: nothing more to send.
    PeerGone,
}

/// Traffic of one connection, for the server API. Data frames only (text and binary), payload
/// bytes as on the wire; updated with relaxed atomics (once per frame in, once per write out).
pub struct ConnStats {
    pub connected_at: SystemTime,
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
}

/// A copy of [`ConnStats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub connected_at: SystemTime,
    pub messages_in: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
    pub bytes_out: u64,
}

impl ConnStats {
    fn new() -> Self {
        ConnStats {
            connected_at: SystemTime::now(),
            messages_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }

    pub fn received(&self, bytes: usize) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn sent(&self, messages: usize, bytes: usize) {
        self.messages_out
            .fetch_add(messages as u64, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            connected_at: self.connected_at,
            messages_in: self.messages_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }
}

/// What happens when the connection's expiry passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryKind {
    /// A pending connection did not authenticate in time (4101).
    AuthDeadline,
    /// The token expired without a refresh (4100); a refresh notice precedes it.
    TokenExpiry,
}

/// The connection's expiry: when, in Unix milliseconds, and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub at_unix_ms: u64,
    pub kind: ExpiryKind,
}

/// Which side of the connection waits for its close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Reader,
    Writer,
}

pub struct ConnControl {
    reason: OnceLock<CloseReason>,
    /// Woken when the close is asked, one per [`Side`]. Two wakers rather than a cancellation
    /// token: a token's waiter future (96 bytes) would live in every idle reader and writer,
    /// and a child of the node's token costs an allocation and a lock on the parent per
    /// connection. Shutdown instead closes every registered connection (`Node::shut_down`).
    wakers: [AtomicWaker; 2],
    started: Instant,
    /// Milliseconds after `started` when the last frame arrived.
    last_seen_ms: AtomicU64,
    pub stats: ConnStats,
    /// The expiry packed in one word so the writer never reads a time with the wrong kind:
    /// the kind in the top two bits (0 none, 1 auth deadline, 2 token expiry), Unix
    /// milliseconds below. Written by the reader, read by the writer.
    expiry: AtomicU64,
}

const KIND_SHIFT: u32 = 62;
const MS_MASK: u64 = (1 << KIND_SHIFT) - 1;

impl Default for ConnControl {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnControl {
    pub fn new() -> Self {
        ConnControl {
            reason: OnceLock::new(),
            wakers: [AtomicWaker::new(), AtomicWaker::new()],
            started: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
            stats: ConnStats::new(),
            expiry: AtomicU64::new(0),
        }
    }

    /// Sets (or, with `None`, clears) the connection's expiry. The writer reads it on its next
    /// wake-up: an expiry moved later (a refresh) needs no wake-up; one set earlier is only ever
    /// the first one, set before the writer's first deadline is computed.
    pub fn set_expiry(&self, expiry: Option<Expiry>) {
        let packed = match expiry {
            None => 0,
            Some(Expiry { at_unix_ms, kind }) => {
                let kind: u64 = match kind {
                    ExpiryKind::AuthDeadline => 1,
                    ExpiryKind::TokenExpiry => 2,
                };
                (kind << KIND_SHIFT) | (at_unix_ms & MS_MASK)
            }
        };
        self.expiry.store(packed, Ordering::Release);
    }

    pub fn expiry(&self) -> Option<Expiry> {
        let packed = self.expiry.load(Ordering::Acquire);
        let kind = match packed >> KIND_SHIFT {
            1 => ExpiryKind::AuthDeadline,
            2 => ExpiryKind::TokenExpiry,
            _ => return None,
        };
        Some(Expiry {
            at_unix_ms: packed & MS_MASK,
            kind,
        })
    }

    /// Asks the connection to close. The first reason wins; returns whether this call set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        if first {
            self.wakers.iter().for_each(AtomicWaker::wake);
        }
        first
    }

    pub fn reason(&self) -> Option<CloseReason> {
        self.reason.get().cloned()
    }

    /// Resolves once the connection is asked to close, with the reason. One waiter per side:
    /// a second waiter on the same side would take the first one's place.
    pub fn closed(&self, side: Side) -> impl Future<Output = CloseReason> + '_ {
        poll_fn(move |cx| self.poll_closed(side, cx))
    }

    fn poll_closed(&self, side: Side, cx: &mut Context<'_>) -> Poll<CloseReason> {
        if let Some(reason) = self.reason.get() {
            return Poll::Ready(reason.clone());
        }
        self.wakers[side as usize].register(cx.waker());
        // Checked again: a close between the first check and the registration woke no one.
        match self.reason.get() {
            Some(reason) => Poll::Ready(reason.clone()),
            None => Poll::Pending,
        }
    }

    /// Records that a frame arrived.
    pub fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_seen_ms.store(now, Ordering::Relaxed);
    }

    /// When the last frame arrived (the connection's start if none has).
    pub fn last_seen(&self) -> Instant {
        self.started + Duration::from_millis(self.last_seen_ms.load(Ordering::Relaxed))
    }
}

/// Milliseconds since the Unix epoch, the clock tokens' `exp` is read on.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The monotonic instant matching a Unix-milliseconds time, given the monotonic `now`: `now`
/// itself once that time has passed, so a caller comparing with its `now` sees it due.
pub fn instant_at(now: Instant, unix_ms_then: u64) -> Instant {
    now + Duration::from_millis(unix_ms_then.saturating_sub(unix_ms()))
}
