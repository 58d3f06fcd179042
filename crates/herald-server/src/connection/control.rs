//! The control block a connection's reader, writer and hub handle share: the one-shot close
//! request with its reason, the time of the last frame received (for the heartbeat), and the
//! traffic counters the server API reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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

pub struct ConnControl {
    /// A child of the node's shutdown token: shutdown cancels every connection at once, and a
    /// cancel with no reason set means exactly that (close 1001).
    token: CancellationToken,
    reason: OnceLock<CloseReason>,
    started: Instant,
    /// Milliseconds after `started` when the last frame arrived.
    last_seen_ms: AtomicU64,
    pub stats: ConnStats,
}

impl ConnControl {
    pub fn new(token: CancellationToken) -> Self {
        ConnControl {
            token,
            reason: OnceLock::new(),
            started: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
            stats: ConnStats::new(),
        }
    }

    /// Asks the connection to close. The first reason wins; returns whether this call set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        self.token.cancel();
        first
    }

    pub fn reason(&self) -> Option<CloseReason> {
        self.reason.get().cloned()
    }

    /// Resolves once the connection is asked to close, with the reason.
    pub async fn closed(&self) -> CloseReason {
        self.token.cancelled().await;
        self.reason
            .get()
            .cloned()
            .unwrap_or(CloseReason::Send(CloseCode::GOING_AWAY))
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
