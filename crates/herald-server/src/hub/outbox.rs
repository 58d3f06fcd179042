//! A connection's outbox: the bounded queue between everyone who sends to the connection (the
//! hub, the session, catch-up replays) and its writer.
//!
//! Why not tokio's `mpsc`: its channel allocates its first block of 32 slots (1.9 KiB for
//! [`Outgoing`]) up front plus a 512-byte shared state, and most connections are idle most of
//! the time. This queue holds nothing while empty: the writer takes the whole `VecDeque` at
//! once, leaving an empty one in its place, so an idle connection keeps only this struct
//! (about 160 bytes). The writer takes everything queued under one short lock, rather than
//! one lock per frame.
//!
//! Two bounds hold: frames queued (`limits.send_queue`) and bytes (`limits.send_queue_bytes`).
//! The bytes of a batch the writer has taken count until it reports them written, so what one
//! connection holds in memory for sending stays within the byte bound however large its frames
//! (a page of history can be megabytes). A frame larger than the whole byte bound gets in only
//! while nothing else is counted; replies that large are refused before they get here.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::sync::Notify;

use crate::delivery::Outgoing;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds its capacity: the connection does not read fast enough.
    Full,
    /// The writer has finished; nothing will be sent any more.
    Closed,
}

pub struct Outbox {
    /// std Mutex: held to push one frame or to swap the queue out, never across an `.await`.
    queue: Mutex<Queue>,
    capacity: usize,
    byte_capacity: usize,
    /// The writer, woken when a frame lands in an empty queue.
    writer: AtomicWaker,
    /// Senders waiting for room ([`Outbox::push_waiting`]), woken when the writer takes frames.
    room: Notify,
}

struct Queue {
    frames: VecDeque<Outgoing>,
    closed: bool,
    /// The writer takes nothing while set (see [`Outbox::hold`]).
    held: bool,
    /// Bytes queued, plus those the writer took and has not reported written.
    bytes: usize,
}

impl Outbox {
    /// An outbox of at most `capacity` frames and `byte_capacity` bytes.
    pub fn new(capacity: usize, byte_capacity: usize) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue {
                frames: VecDeque::new(),
                closed: false,
                held: false,
                bytes: 0,
            }),
            capacity: capacity.max(1),
            byte_capacity: byte_capacity.max(1),
            writer: AtomicWaker::new(),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent (each critical
        // section is a single push or swap), so a poisoned lock is still usable.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a frame without waiting.
    pub fn push(&self, frame: Outgoing) -> Result<(), (Refused, Outgoing)> {
        let mut queue = self.lock();
        if queue.closed {
            return Err((Refused::Closed, frame));
        }
        let bytes = queue.bytes + frame.frame.len();
        if queue.frames.len() >= self.capacity || (bytes > self.byte_capacity && queue.bytes > 0) {
            return Err((Refused::Full, frame));
        }
        let was_empty = queue.frames.is_empty();
        queue.bytes = bytes;
        queue.frames.push_back(frame);
        drop(queue);
        // The writer only sleeps after finding the queue empty (under the same lock), so only
        // the frame that ends the emptiness needs to wake it.
        if was_empty {
            self.writer.wake();
        }
        Ok(())
    }

    /// Queues a frame, waiting up to `wait` for room.
    pub async fn push_waiting(&self, frame: Outgoing, wait: Duration) -> Result<(), Refused> {
        // Usually there is room: no waiter registered, no clock read.
        let mut frame = match self.push(frame) {
            Ok(()) => return Ok(()),
            Err((Refused::Closed, _)) => return Err(Refused::Closed),
            Err((Refused::Full, back)) => back,
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the attempt, so room made in between is not missed.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.push(frame) {
                Ok(()) => return Ok(()),
                Err((Refused::Closed, _)) => return Err(Refused::Closed),
                Err((Refused::Full, back)) => frame = back,
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(Refused::Full);
            }
        }
    }

    /// Most frames the queue holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Most bytes the queue and the writer's batch hold together.
    pub fn byte_capacity(&self) -> usize {
        self.byte_capacity
    }

    /// The writer has written `bytes` of what it took: room for as many more.
    pub fn written(&self, bytes: usize) {
        let mut queue = self.lock();
        queue.bytes = queue.bytes.saturating_sub(bytes);
        drop(queue);
        self.room.notify_waiters();
    }

    /// The writer's side: everything queued, or `Pending` until something is. An empty queue is
    /// returned only once the outbox is closed.
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<VecDeque<Outgoing>> {
        self.writer.register(cx.waker());
        let mut queue = self.lock();
        if queue.held || (queue.frames.is_empty() && !queue.closed) {
            return Poll::Pending;
        }
        let frames = std::mem::take(&mut queue.frames);
        drop(queue);
        self.room.notify_waiters();
        Poll::Ready(frames)
    }

    /// Waits for frames; see [`poll_take`](Self::poll_take).
    pub async fn take(&self) -> VecDeque<Outgoing> {
        std::future::poll_fn(|cx| self.poll_take(cx)).await
    }

    /// Everything queued, without waiting (possibly nothing).
    pub fn take_now(&self) -> VecDeque<Outgoing> {
        let frames = {
            let mut queue = self.lock();
            let frames = std::mem::take(&mut queue.frames);
            let taken: usize = frames.iter().map(|f| f.frame.len()).sum();
            queue.bytes = queue.bytes.saturating_sub(taken);
            frames
        };
        self.room.notify_waiters();
        frames
    }

    /// The oldest queued frame (tests look at frames one by one).
    #[cfg(test)]
    pub fn pop(&self) -> Option<Outgoing> {
        self.lock().frames.pop_front()
    }

    /// How many frames are queued.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().frames.len()
    }

    /// Keeps the writer from taking frames until [`release`](Self::release): what is queued
    /// meanwhile can still be withdrawn with [`take_now`](Self::take_now).
    pub fn hold(&self) {
        self.lock().held = true;
    }

    pub fn release(&self) {
        self.lock().held = false;
        self.writer.wake();
    }

    /// Refuses every later frame and drops the queued ones; wakes whoever waits.
    pub fn close(&self) {
        let dropped = {
            let mut queue = self.lock();
            queue.closed = true;
            queue.bytes = 0;
            std::mem::take(&mut queue.frames)
        };
        drop(dropped);
        self.room.notify_waiters();
        self.writer.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::OutFrame;
    use std::sync::Arc;
    use std::time::Instant;

    fn frame(text: &'static str) -> Outgoing {
        Outgoing::single(
            OutFrame::Text(bytes::Bytes::from_static(text.as_bytes())),
            Instant::now(),
        )
    }

    fn texts(frames: VecDeque<Outgoing>) -> Vec<String> {
        frames
            .into_iter()
            .map(|f| match f.frame {
                OutFrame::Text(b) | OutFrame::Binary(b) => String::from_utf8(b.to_vec()).unwrap(),
            })
            .collect()
    }

    #[test]
    fn holds_no_memory_while_empty_and_gives_everything_in_order() {
        let outbox = Outbox::new(8, 1 << 20);
        outbox.push(frame("a")).unwrap();
        outbox.push(frame("b")).unwrap();
        assert_eq!(outbox.len(), 2);
        assert_eq!(texts(outbox.take_now()), ["a", "b"]);
        assert_eq!(outbox.lock().frames.capacity(), 0);
    }

    #[test]
    fn refuses_past_capacity_and_after_close() {
        let outbox = Outbox::new(2, 1 << 20);
        outbox.push(frame("a")).unwrap();
        outbox.push(frame("b")).unwrap();
        assert_eq!(outbox.push(frame("c")).unwrap_err().0, Refused::Full);
        outbox.close();
        assert_eq!(outbox.len(), 0, "close drops what was queued");
        assert_eq!(outbox.push(frame("d")).unwrap_err().0, Refused::Closed);
    }

    #[tokio::test]
    async fn the_writer_wakes_for_a_frame_and_for_close() {
        let outbox = Arc::new(Outbox::new(4, 1 << 20));
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { texts(outbox.take().await) }
        });
        tokio::task::yield_now().await;
        outbox.push(frame("x")).unwrap();
        assert_eq!(writer.await.unwrap(), ["x"]);

        let writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.take().await.len() }
        });
        tokio::task::yield_now().await;
        outbox.close();
        assert_eq!(writer.await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_held_outbox_gives_the_writer_nothing_until_released() {
        let outbox = Arc::new(Outbox::new(4, 1 << 20));
        outbox.hold();
        outbox.push(frame("welcome")).unwrap();
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { texts(outbox.take().await) }
        });
        tokio::task::yield_now().await;
        assert!(!writer.is_finished());
        assert_eq!(outbox.len(), 1, "still there to be withdrawn");
        outbox.release();
        assert_eq!(writer.await.unwrap(), ["welcome"]);
    }

    #[tokio::test]
    async fn a_waiting_push_gets_in_once_the_writer_takes_and_gives_up_after_its_wait() {
        let outbox = Arc::new(Outbox::new(1, 1 << 20));
        outbox.push(frame("first")).unwrap();
        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move {
                outbox
                    .push_waiting(frame("second"), Duration::from_secs(5))
                    .await
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(texts(outbox.take_now()), ["first"]);
        assert_eq!(waiting.await.unwrap(), Ok(()));

        let refused = outbox
            .push_waiting(frame("third"), Duration::from_millis(20))
            .await;
        assert_eq!(refused, Err(Refused::Full));
    }

    #[tokio::test]
    async fn bytes_count_until_written_and_bound_what_is_queued() {
        let outbox = Outbox::new(100, 10);
        outbox.push(frame("12345")).unwrap();
        outbox.push(frame("6789")).unwrap();
        assert_eq!(outbox.push(frame("ab")).unwrap_err().0, Refused::Full);
        let taken = outbox.take().await;
        assert_eq!(texts(taken), ["12345", "6789"]);
        assert_eq!(
            outbox.push(frame("ab")).unwrap_err().0,
            Refused::Full,
            "a batch being written still counts"
        );
        outbox.written(9);
        outbox.push(frame("ab")).unwrap();
    }

    #[test]
    fn a_frame_over_the_byte_bound_gets_in_only_alone() {
        let outbox = Outbox::new(100, 4);
        outbox.push(frame("abcdef")).unwrap();
        assert_eq!(outbox.push(frame("g")).unwrap_err().0, Refused::Full);
        assert_eq!(texts(outbox.take_now()), ["abcdef"]);
        outbox.push(frame("g")).unwrap();
        assert_eq!(outbox.push(frame("hijklm")).unwrap_err().0, Refused::Full);
    }
}
