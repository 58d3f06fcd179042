//! Room presence, coalesced: joins and leaves are gathered per room for `presence.window` and
//! go out as one `presence_diff` frame, so a room that N users join costs about one frame per
//! member per window instead of N frames per member.
//!
//! One task owns every room's pending changes; connection tasks message it with each user who
//! entered or left a room (the presence engine says who did). When a room's window ends the
//! task encodes the diff once and publishes it on the room's channel through the broker, like
//! any room frame, so it reaches members on every node whichever broker carries it.
//!
//! Invariants:
//! - a user is listed at most once per diff, with where they were at the end of the window
//!   (the last change received wins);
//! - a room's window opens at its first pending change and is never extended, so no change
//!   waits longer than `presence.window` (plus the time to drain the queue), or
//!   `presence.count_window` in a room whose last diff carried only the count (a big room,
//!   where each diff is a frame to every member; plus the claim's round trip and
//!   [`CLAIM_MARGIN`]);
//! - a count-only room's window is claimed through the presence engine
//!   ([`Presence::claim_count`]), so that one node per window sends the count: the node that
//!   wins reads the count [`CLAIM_MARGIN`] after its claim ends; a node that finds the claim
//!   held drops its changes until the claim ends, since that count covers them;
//! - `count` is read from the presence engine when the diff is built, so it is never older
//!   than the changes listed (changes still in the queue then go in the next diff);
//! - at shutdown ([`PresenceWindow::close`], before the engines close) every pending change
//!   goes out at once: members on other nodes learn that this node's users left.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use globset::GlobSet;
use herald_protocol::{PresenceDiff, ServerEvent};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::PresenceConfig;
use crate::delivery::{Channel, Delivery, OutFrame};
use crate::engine::EngineError;
use crate::engine::broker::Broker;
use crate::engine::presence::{CountClaim, Presence};

/// Changes waiting for the task; a full queue makes joins and leaves wait for room.
const CHANGE_QUEUE: usize = 8192;

/// Changes taken from the queue per wakeup.
const DRAIN_BATCH: usize = 512;

/// How long after its claim ends the node that won a count window reads the count: a change
/// another node made just before the claim ended (and dropped, as covered) is then in it.
const CLAIM_MARGIN: Duration = Duration::from_millis(10);

/// A user entering or leaving a room, as the presence engine reported it.
#[derive(Debug)]
pub struct RoomChange {
    pub room: Arc<str>,
    pub user: Arc<str>,
    /// Whether the user is in the room after this change.
    pub present: bool,
}

/// The handle the node records changes through.
pub struct PresenceWindow {
    changes: mpsc::Sender<RoomChange>,
    /// Rooms that send no presence events (`presence.off`).
    off: GlobSet,
    /// Tells the task to send every pending diff now and end (see [`PresenceWindow::close`]).
    closing: CancellationToken,
    /// The task, awaited by `close`. std Mutex: taken once, never across an `.await`.
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl PresenceWindow {
    /// Starts the task; it ends with [`PresenceWindow::close`], or once the handle is dropped
    /// and the queue is drained.
    /// `presence.off` is checked when the configuration loads; a configuration built in code
    /// with an invalid pattern gets presence in every room.
    pub fn start(
        config: &PresenceConfig,
        broker: Arc<dyn Broker>,
        presence: Arc<dyn Presence>,
    ) -> PresenceWindow {
        let off = config.off_matcher().unwrap_or_else(|error| {
            tracing::warn!(%error, "presence.off ignored");
            GlobSet::empty()
        });
        let (changes, queue) = mpsc::channel(CHANGE_QUEUE);
        let rooms = PendingRooms {
            window: config.window,
            count_window: config.count_window,
            max_listed: config.max_members_listed,
            rooms: HashMap::new(),
            due: BinaryHeap::new(),
            counted: HashMap::new(),
        };
        let closing = CancellationToken::new();
        let task = tokio::spawn(rooms.run(queue, closing.clone(), broker, presence));
        PresenceWindow {
            changes,
            off,
            closing,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Sends every pending diff now, the changes already queued included, and ends the task.
    /// Called at shutdown once the connections are gone and before the engines close: their
    /// leaves are the last changes, and members on other nodes must see them now rather than
    /// never (a diff after the broker closed is lost). Changes recorded afterwards are dropped.
    pub async fn close(&self) {
        self.closing.cancel();
        let task = self
            .task
            .lock()
            .expect("never poisoned: no panic while held")
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Whether the room sends presence events at all.
    pub fn is_on(&self, room: &str) -> bool {
        !self.off.is_match(room)
    }

    /// Queues a change for its room's next diff (nothing for rooms with presence off).
    pub async fn record(&self, change: RoomChange) {
        if !self.is_on(&change.room) {
            return;
        }
        // Fails only once the task is gone, with the node: nobody is left to tell.
        let _ = self.changes.send(change).await;
    }
}

/// One room's changes since its last diff.
struct Pending {
    /// user → whether they are in the room after their last change.
    users: HashMap<Arc<str>, bool>,
}

struct PendingRooms {
    window: Duration,
    count_window: Duration,
    max_listed: u64,
    rooms: HashMap<Arc<str>, Pending>,
    /// Rooms by when their windows end, soonest first (windows have two lengths, so the order
    /// they opened in is not the order they end in). A count-only room's is pushed once it is
    /// claimed: a pending room without one is waiting for its claim's answer.
    due: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    /// Rooms whose last diff carried only the count: their next window is `count_window`, and
    /// claimed. With the time until which another node's claim covers this node's changes.
    counted: HashMap<Arc<str>, Option<Instant>>,
}

impl PendingRooms {
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<RoomChange>,
        closing: CancellationToken,
        broker: Arc<dyn Broker>,
        presence: Arc<dyn Presence>,
    ) {
        let engines = Engines {
            broker: broker.as_ref(),
            presence: presence.as_ref(),
        };
        let mut batch = Vec::with_capacity(DRAIN_BATCH);
        // Claims are answered beside the queue, never holding it: under load a claim's round
        // trip can take seconds, and a full queue holds every join and leave of the node.
        let mut claims = FuturesUnordered::new();
        loop {
            let next_due = self.next_due();
            tokio::select! {
                received = queue.recv_many(&mut batch, DRAIN_BATCH) => {
                    if received == 0 {
                        break;
                    }
                    let now = Instant::now();
                    for change in batch.drain(..) {
                        if let Some(room) = self.add(change, now) {
                            claims.push(ask_claim(engines.presence, room, self.count_window));
                        }
                    }
                }
                Some((room, asked, claim)) = claims.next(), if !claims.is_empty() => {
                    self.settle(room, asked, claim);
                }
                () = sleep_until(next_due), if next_due.is_some() => {}
                () = closing.cancelled() => {
                    let now = Instant::now();
                    while let Ok(change) = queue.try_recv() {
                        self.add(change, now);
                    }
                    // Closing: every pending change goes out now, claimed or not.
                    self.schedule_unclaimed(now);
                    break;
                }
            }
            let now = Instant::now();
            while let Some(room) = self.pop_due(Some(now)) {
                self.flush(room, &engines).await;
            }
        }
        while let Some(room) = self.pop_due(None) {
            self.flush(room, &engines).await;
        }
    }

    /// When the next window ends.
    fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    /// The room whose window ends first, if it ends by `now` (any, with `None`).
    fn pop_due(&mut self, now: Option<Instant>) -> Option<Arc<str>> {
        let due = self.next_due()?;
        if now.is_some_and(|now| due > now) {
            return None;
        }
        self.due.pop().map(|Reverse((_, room))| room)
    }

    /// Adds a change to its room's window; returns the room when this opened a count window,
    /// whose claim is to be asked.
    fn add(&mut self, change: RoomChange, now: Instant) -> Option<Arc<str>> {
        let counted = self.counted.get(&change.room).copied();
        if counted
            .flatten()
            .is_some_and(|covered_until| now < covered_until)
        {
            // Another node's count, read after its claim ends, covers this change.
            return None;
        }
        let mut opened = None;
        let pending = match self.rooms.entry(change.room) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let room = entry.key().clone();
                if counted.is_some() {
                    opened = Some(room);
                } else {
                    self.due.push(Reverse((now + self.window, room)));
                }
                entry.insert(Pending {
                    users: HashMap::new(),
                })
            }
        };
        pending.users.insert(change.user, change.present);
        opened
    }

    /// Acts on a count window's claim, asked at `asked`: a room this node won (or could not
    /// ask about: a duplicate count is harmless, a missing one is not) is sent after its
    /// window; a room another node holds drops its changes, which that node's count covers.
    fn settle(&mut self, room: Arc<str>, asked: Instant, claim: Result<CountClaim, EngineError>) {
        match claim {
            Ok(CountClaim::HeldFor(left)) if left > CLAIM_MARGIN => {
                self.counted.insert(room.clone(), Some(asked + left));
                self.rooms.remove(&room);
            }
            Ok(_) => self.schedule(room, Instant::now() + CLAIM_MARGIN),
            Err(error) => {
                tracing::warn!(%room, %error, "count window not claimed: sending it anyway");
                self.schedule(room, Instant::now() + CLAIM_MARGIN);
            }
        }
    }

    /// Ends a count-only room's window `count_window` after `from`.
    fn schedule(&mut self, room: Arc<str>, from: Instant) {
        self.due.push(Reverse((from + self.count_window, room)));
    }

    /// Schedules the pending rooms still waiting for their claim's answer (those with no
    /// window end yet), at shutdown.
    fn schedule_unclaimed(&mut self, from: Instant) {
        let scheduled: HashSet<&Arc<str>> =
            self.due.iter().map(|Reverse((_, room))| room).collect();
        let unclaimed: Vec<Arc<str>> = self
            .rooms
            .keys()
            .filter(|room| !scheduled.contains(room))
            .cloned()
            .collect();
        for room in unclaimed {
            self.schedule(room, from);
        }
    }

    async fn flush(&mut self, room: Arc<str>, engines: &Engines<'_>) {
        let Some(pending) = self.rooms.remove(&room) else {
            return;
        };
        let count = match engines.presence.count(&room).await {
            Ok(count) => count,
            Err(error) => {
                tracing::warn!(%room, %error, "presence diff dropped: no member count");
                return;
            }
        };
        let (joined, left) = if count > self.max_listed {
            self.counted.insert(room.clone(), None);
            (None, None)
        } else {
            self.counted.remove(&room);
            let mut joined = Vec::new();
            let mut left = Vec::new();
            for (user, present) in pending.users {
                let list = if present { &mut joined } else { &mut left };
                list.push(user.to_string());
            }
            joined.sort_unstable();
            left.sort_unstable();
            (Some(joined), Some(left))
        };
        let event = ServerEvent::PresenceDiff(PresenceDiff {
            room: room.to_string(),
            joined,
            left,
            count,
        });
        let channel = Channel::Room(room);
        let delivery = Delivery {
            frame: OutFrame::Text(event.encode()),
            except: None,
            offset: None,
        };
        if let Err(error) = engines.broker.publish(&channel, delivery).await {
            tracing::warn!(%channel, %error, "presence diff not published");
        }
    }
}

/// Asks for `room`'s count window; answers with when it was asked.
async fn ask_claim(
    presence: &dyn Presence,
    room: Arc<str>,
    window: Duration,
) -> (Arc<str>, Instant, Result<CountClaim, EngineError>) {
    let asked = Instant::now();
    let claim = presence.claim_count(&room, window).await;
    (room, asked, claim)
}

struct Engines<'a> {
    broker: &'a dyn Broker,
    presence: &'a dyn Presence,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
