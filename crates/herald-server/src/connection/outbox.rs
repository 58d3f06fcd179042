//! A connection's outbox: the bounded queue between everyone who sends to the connection (the
//! hub, the session, catch-up replays) and its writer.
//!
//! Why not tokio's `mpsc`: its channel allocates its first block of 32 slots (1.9 KiB for
//! [`Outgoing`]) up front plus a 512-byte shared state, and most connections are idle most of
//! the time. This queue holds nothing while empty: the writer takes the whole `VecDeque` at
//! once, leaving an empty one in its place, so an idle connection keeps only this struct
//! (about 150 bytes). The writer takes everything queued under one short lock, rather than
//! one lock per frame.

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
}

impl Outbox {
    pub fn new(capacity: usize) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue {
                frames: VecDeque::new(),
                closed: false,
                held: false,
            }),
            capacity: capacity.max(1),
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
        if queue.frames.len() >= self.capacity {
            return Err((Refused::Full, frame));
        }
        let was_empty = queue.frames.is_empty();
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
        let deadline = tokio::time::Instant::now() + wait;
        let mut frame = frame;
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
        let frames = std::mem::take(&mut self.lock().frames);
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
        Outgoing {
            frame: OutFrame::Text(bytes::Bytes::from_static(text.as_bytes())),
            accepted: Instant::now(),
        }
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
        let outbox = Outbox::new(8);
        outbox.push(frame("a")).unwrap();
        outbox.push(frame("b")).unwrap();
        assert_eq!(outbox.len(), 2);
        assert_eq!(texts(outbox.take_now()), ["a", "b"]);
        assert_eq!(outbox.lock().frames.capacity(), 0);
    }

    #[test]
    fn refuses_past_capacity_and_after_close() {
        let outbox = Outbox::new(2);
        outbox.push(frame("a")).unwrap();
        outbox.push(frame("b")).unwrap();
        assert_eq!(outbox.push(frame("c")).unwrap_err().0, Refused::Full);
        outbox.close();
        assert_eq!(outbox.len(), 0, "close drops what was queued");
        assert_eq!(outbox.push(frame("d")).unwrap_err().0, Refused::Closed);
    }

    #[tokio::test]
    async fn the_writer_wakes_for_a_frame_and_for_close() {
        let outbox = Arc::new(Outbox::new(4));
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
        let outbox = Arc::new(Outbox::new(4));
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
        let outbox = Arc::new(Outbox::new(1));
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
}
