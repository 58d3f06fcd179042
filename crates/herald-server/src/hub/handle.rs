//! The hub's handle on one connection ([`ConnHandle`]): its outbox, its close signal, and the
//! streams it is catching up on, whose live frames it holds until the replay has drained them
//! (the hub's module doc says how a frame is delivered once across that switch).

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::delivery::{ConnId, OutFrame, Outgoing};
use crate::hub::control::{CloseReason, ConnControl, ConnStats};
use crate::hub::outbox::{Outbox, Refused};
use herald_protocol::CloseCode;

/// The hub's handle on one connection: its outbox and its close signal. Cheap to clone.
#[derive(Clone)]
pub struct ConnHandle {
    pub(super) inner: Arc<HandleInner>,
}

pub(super) struct HandleInner {
    id: ConnId,
    user: Arc<str>,
    /// The client's address, as resolved at the handshake (behind trusted proxies).
    addr: IpAddr,
    outbox: Arc<Outbox>,
    pub(super) control: Arc<ConnControl>,
    /// Streams being caught up on, with their held live frames. std Mutex: held to push or
    /// take frames only, never across an `.await`.
    catching_up: Mutex<Vec<CatchUp>>,
    /// `catching_up.len()`, read without the lock on the delivery path.
    catching_up_count: AtomicUsize,
}

/// Frees the list's memory once no stream is caught up on: every connection catches up on its
/// inbox at connect, and an idle connection should not keep that list's capacity.
fn release_if_empty(catching_up: &mut Vec<CatchUp>) {
    if catching_up.is_empty() {
        *catching_up = Vec::new();
    }
}

/// A stream a connection can catch up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamKey {
    /// The user's inbox (direct messages), replayed at connect.
    Inbox,
    /// A room joined with `since`.
    Room(Arc<str>),
}

/// Live frames held while a stream is replayed: (offset in the stream, frame with the moment
/// it reached the hub).
pub type HeldFrames = Vec<(Option<u64>, Outgoing)>;

struct CatchUp {
    key: StreamKey,
    held: HeldFrames,
    /// The bytes of `held`, bounded like the outbox's.
    held_bytes: usize,
    /// Set when the stream went live: frames at or below this offset were replayed already.
    live_above: Option<u64>,
    /// Set while the replay is more than a page behind: frames with an offset are dropped
    /// (the replay reads them from the store later), frames without one pass.
    skipping: bool,
}

impl ConnHandle {
    pub fn new(
        id: ConnId,
        user: Arc<str>,
        addr: IpAddr,
        outbox: Arc<Outbox>,
        control: Arc<ConnControl>,
    ) -> Self {
        ConnHandle {
            inner: Arc::new(HandleInner {
                id,
                user,
                addr,
                outbox,
                control,
                catching_up: Mutex::new(Vec::new()),
                catching_up_count: AtomicUsize::new(0),
            }),
        }
    }

    pub fn id(&self) -> ConnId {
        self.inner.id
    }

    pub fn user(&self) -> &Arc<str> {
        &self.inner.user
    }

    pub fn addr(&self) -> IpAddr {
        self.inner.addr
    }

    /// Most bytes the connection's outbox holds (`limits.send_queue_bytes`).
    pub fn byte_budget(&self) -> usize {
        self.inner.outbox.byte_capacity()
    }

    /// The connection's lifecycle and counters, shared with its reader and writer.
    pub fn control(&self) -> &Arc<ConnControl> {
        &self.inner.control
    }

    pub fn stats(&self) -> &ConnStats {
        &self.inner.control.stats
    }

    /// Queues a frame without waiting. Returns false when the connection is gone or was cut off
    /// because its outbox is full.
    pub fn offer(&self, frame: OutFrame) -> bool {
        self.offer_accepted_at(frame, Instant::now())
    }

    /// Like [`offer`](Self::offer), for a frame whose message was accepted at `accepted` (one
    /// clock read per message, not per recipient).
    pub fn offer_accepted_at(&self, frame: OutFrame, accepted: Instant) -> bool {
        self.offer_outgoing(Outgoing::single(frame, accepted))
    }

    /// Queues a frame without waiting, as [`offer`](Self::offer) does.
    pub(super) fn offer_outgoing(&self, outgoing: Outgoing) -> bool {
        match self.inner.outbox.push(outgoing) {
            Ok(()) => true,
            Err((Refused::Full, _)) => {
                self.cut_off_slow();
                false
            }
            Err((Refused::Closed, _)) => false,
        }
    }

    pub fn close(&self, reason: CloseReason) {
        self.inner.control.close(reason);
    }

    /// Queues a frame, waiting up to `wait` for room in the outbox (replays send more than an
    /// outbox holds). Returns false when the connection is gone or was cut off as too slow.
    pub async fn send(&self, frame: Outgoing, wait: Duration) -> bool {
        match self.inner.outbox.push_waiting(frame, wait).await {
            Ok(()) => true,
            Err(Refused::Full) => {
                self.cut_off_slow();
                false
            }
            Err(Refused::Closed) => false,
        }
    }

    fn cut_off_slow(&self) {
        if self
            .inner
            .control
            .close(CloseReason::Send(CloseCode::SLOW_CONSUMER))
        {
            metrics::counter!("herald_slow_consumers_total").increment(1);
            tracing::info!(conn = %self.inner.id, user = %self.inner.user, "slow consumer cut off");
        }
    }

    /// From now on, live frames of `key` are held instead of queued (see the module doc).
    pub fn begin_catch_up(&self, key: StreamKey) {
        let mut catching_up = self.lock_catching_up();
        catching_up.retain(|c| c.key != key);
        // Usually the only entry (the inbox at connect, kept while live until a later frame
        // arrives): room for one, not the four a first push makes.
        catching_up.reserve_exact(1);
        catching_up.push(CatchUp {
            key,
            held: Vec::new(),
            held_bytes: 0,
            live_above: None,
            skipping: false,
        });
        self.inner
            .catching_up_count
            .store(catching_up.len(), Ordering::Release);
    }

    /// Takes the frames held for `key` so far. When none are held the stream goes live and
    /// this returns `None`: from then on its frames are queued directly, except late ones at or
    /// below `replayed`, the highest offset the connection already has.
    pub fn take_held(&self, key: &StreamKey, replayed: u64) -> Option<HeldFrames> {
        let mut catching_up = self.lock_catching_up();
        let catch_up = catching_up
            .iter_mut()
            .find(|c| &c.key == key && c.live_above.is_none())?;
        if catch_up.held.is_empty() {
            catch_up.live_above = Some(replayed);
            return None;
        }
        catch_up.held_bytes = 0;
        Some(std::mem::take(&mut catch_up.held))
    }

    /// While a replay is more than a page behind (see [`crate::hub::catch_up`]): from now on, live
    /// frames of `key` that carry an offset are dropped, since every one of them is committed
    /// and the replay reads it from the store later; frames without an offset (not part of
    /// the stream) are queued. Frames held so far are treated the same way. Holding starts
    /// again with [`begin_catch_up`](Self::begin_catch_up), before the replay's next read.
    pub fn skip_live(&self, key: &StreamKey) {
        let mut catching_up = self.lock_catching_up();
        let Some(catch_up) = catching_up
            .iter_mut()
            .find(|c| &c.key == key && c.live_above.is_none())
        else {
            return;
        };
        catch_up.skipping = true;
        catch_up.held_bytes = 0;
        let held = std::mem::take(&mut catch_up.held);
        drop(catching_up);
        for (offset, held) in held {
            if offset.is_none() && !self.offer_outgoing(held) {
                break;
            }
        }
    }

    /// Ends a catch-up that will not replay: queues whatever was held and goes live.
    pub fn end_catch_up(&self, key: &StreamKey) {
        let mut catching_up = self.lock_catching_up();
        let Some(index) = catching_up.iter().position(|c| &c.key == key) else {
            return;
        };
        let ended = catching_up.swap_remove(index);
        release_if_empty(&mut catching_up);
        self.inner
            .catching_up_count
            .store(catching_up.len(), Ordering::Release);
        for (_, held) in ended.held {
            if !self.offer_outgoing(held) {
                break;
            }
        }
    }

    /// Queues a live frame of one stream, or holds it while that stream is caught up on.
    pub(super) fn deliver(
        &self,
        key: StreamKeyRef<'_>,
        outgoing: &Outgoing,
        offset: Option<u64>,
    ) -> bool {
        if self.inner.catching_up_count.load(Ordering::Acquire) > 0 {
            let mut catching_up = self.lock_catching_up();
            if let Some(index) = catching_up.iter().position(|c| key.matches(&c.key)) {
                let catch_up = &mut catching_up[index];
                if let Some(replayed) = catch_up.live_above {
                    match offset {
                        // A late fan-out of a message the replay already sent.
                        Some(offset) if offset <= replayed => return false,
                        // Past the replayed range: nothing late can follow this one.
                        Some(_) => {
                            catching_up.swap_remove(index);
                            release_if_empty(&mut catching_up);
                            self.inner
                                .catching_up_count
                                .store(catching_up.len(), Ordering::Release);
                        }
                        None => {}
                    }
                    drop(catching_up);
                    return self.offer_outgoing(outgoing.clone());
                }
                if catch_up.skipping {
                    drop(catching_up);
                    return offset.is_none() && self.offer_outgoing(outgoing.clone());
                }
                // Held frames count against the same bounds as the outbox.
                let held_bytes = catch_up.held_bytes + outgoing.frame.len();
                if catch_up.held.len() >= self.inner.outbox.capacity()
                    || held_bytes > self.inner.outbox.byte_capacity()
                {
                    drop(catching_up);
                    self.cut_off_slow();
                    return false;
                }
                catch_up.held_bytes = held_bytes;
                catch_up.held.push((offset, outgoing.clone()));
                return true;
            }
        }
        self.offer_outgoing(outgoing.clone())
    }

    fn lock_catching_up(&self) -> std::sync::MutexGuard<'_, Vec<CatchUp>> {
        self.inner
            .catching_up
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A [`StreamKey`] borrowed from a delivery, so the hot path allocates nothing.
#[derive(Clone, Copy)]
pub(super) enum StreamKeyRef<'a> {
    Inbox,
    Room(&'a str),
}

impl StreamKeyRef<'_> {
    fn matches(self, key: &StreamKey) -> bool {
        match (self, key) {
            (StreamKeyRef::Inbox, StreamKey::Inbox) => true,
            (StreamKeyRef::Room(room), StreamKey::Room(held)) => room == &**held,
            _ => false,
        }
    }
}
