//! The control block a connection's reader, writer and hub handle share: the one-shot close
//! request with its reason, and the time of the last frame received (for the heartbeat).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use herald_protocol::CloseCode;

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The server closes it: the writer sends a Close frame with this code.
    Send(CloseCode),
    /// The peer closed it or the socket failed: nothing more to send.
    PeerGone,
}

pub struct ConnControl {
    /// A child of the node's shutdown token: shutdown cancels every connection at once, and a
    /// cancel with no reason set means exactly that (close 1001).
    token: CancellationToken,
    reason: OnceLock<CloseReason>,
    started: Instant,
    /// Milliseconds after `started` when the last frame arrived.
    last_seen_ms: AtomicU64,
}

impl ConnControl {
    pub fn new(token: CancellationToken) -> Self {
        ConnControl {
            token,
            reason: OnceLock::new(),
            started: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
        }
    }

    /// Asks the connection to close. The first reason wins; returns whether this call set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        self.token.cancel();
        first
    }

    pub fn reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }

    /// Resolves once the connection is asked to close, with the reason.
    pub async fn closed(&self) -> CloseReason {
        self.token.cancelled().await;
        self.reason
            .get()
            .copied()
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
