//! The open-loop schedule: message `k` of a step is due at `start + k / rate`, whatever the
//! server does. Every millisecond the pacer queues the messages that have come due, round-robin
//! over the senders, each stamped with the instant it was due. A sender whose queue is full
//! (its connection cannot write as fast as the schedule asks) loses the message and the loss is
//! counted as the client's, so an overloaded load tool shows in the results.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::adapter::Protocol;
use crate::stamp;

/// Where a sender's messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Room(String),
    User(String),
}

/// One connection that sends, and how many deliveries each of its messages should cause.
pub struct Sender {
    pub queue: mpsc::Sender<String>,
    pub destination: Destination,
    pub recipients: u64,
}

/// What the pacer did during one call of [`Pacer::run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Paced {
    /// Messages handed to a connection.
    pub sent: u64,
    /// Deliveries those messages should cause.
    pub expected: u64,
    /// Messages dropped because the sender's queue was full.
    pub client_backlog: u64,
}

pub struct Pacer {
    protocol: Arc<dyn Protocol>,
    senders: Vec<Sender>,
    padding: String,
    next_sender: usize,
}

impl Pacer {
    pub fn new(protocol: Arc<dyn Protocol>, senders: Vec<Sender>, padding: String) -> Self {
        Pacer {
            protocol,
            senders,
            padding,
            next_sender: 0,
        }
    }

    /// Deliveries one message causes, on average over the senders.
    pub fn mean_recipients(&self) -> f64 {
        if self.senders.is_empty() {
            return 0.0;
        }
        self.senders.iter().map(|s| s.recipients).sum::<u64>() as f64 / self.senders.len() as f64
    }

    /// Sends `rate` messages per second for `duration`.
    pub async fn run(&mut self, rate: f64, duration: Duration) -> Paced {
        let mut paced = Paced::default();
        if self.senders.is_empty() || rate <= 0.0 {
            tokio::time::sleep(duration).await;
            return paced;
        }
        let start = Instant::now();
        let start_ns = stamp::now_ns();
        let interval_ns = 1e9 / rate;
        let mut ticker = tokio::time::interval(Duration::from_millis(1));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let total = (duration.as_secs_f64() * rate).round() as u64;
        let mut due_so_far = 0;
        while due_so_far < total {
            ticker.tick().await;
            let now = start.elapsed().as_secs_f64();
            let due = ((now * rate) as u64 + 1).min(total);
            while due_so_far < due {
                let due_at = start_ns + (due_so_far as f64 * interval_ns) as u64;
                self.send_one(due_at, &mut paced);
                due_so_far += 1;
            }
        }
        // Keep the step's length exact even when the last message was due early.
        tokio::time::sleep_until(start + duration).await;
        paced
    }

    fn send_one(&mut self, due_at: u64, paced: &mut Paced) {
        let sender = &self.senders[self.next_sender];
        self.next_sender = (self.next_sender + 1) % self.senders.len();
        let content = stamp::content(due_at, &self.padding);
        let frame = match &sender.destination {
            Destination::Room(room) => self.protocol.publish(room, &content),
            Destination::User(user) => self.protocol.direct(user, &content),
        };
        match sender.queue.try_send(frame) {
            Ok(()) => {
                paced.sent += 1;
                paced.expected += sender.recipients;
            }
            Err(_) => paced.client_backlog += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::Herald;

    #[tokio::test(start_paused = true)]
    async fn the_schedule_sends_rate_times_duration_round_robin() {
        let (a_tx, mut a_rx) = mpsc::channel(1000);
        let (b_tx, mut b_rx) = mpsc::channel(1000);
        let senders = vec![
            Sender {
                queue: a_tx,
                destination: Destination::Room("r".into()),
                recipients: 9,
            },
            Sender {
                queue: b_tx,
                destination: Destination::User("u".into()),
                recipients: 1,
            },
        ];
        let mut pacer = Pacer::new(Arc::new(Herald), senders, String::new());
        assert_eq!(pacer.mean_recipients(), 5.0);
        let paced = pacer.run(200.0, Duration::from_secs(2)).await;
        assert_eq!(paced.sent, 400);
        assert_eq!(paced.expected, 200 * 9 + 200);
        assert_eq!(paced.client_backlog, 0);
        let mut a = 0;
        while let Ok(frame) = a_rx.try_recv() {
            assert!(frame.contains(r#""type":"publish""#) && stamp::find(&frame).is_some());
            a += 1;
        }
        let mut b = 0;
        while b_rx.try_recv().is_ok() {
            b += 1;
        }
        assert_eq!((a, b), (200, 200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_sender_queue_is_counted_as_client_backlog() {
        let (tx, _rx) = mpsc::channel(10);
        let senders = vec![Sender {
            queue: tx,
            destination: Destination::Room("r".into()),
            recipients: 1,
        }];
        let mut pacer = Pacer::new(Arc::new(Herald), senders, String::new());
        let paced = pacer.run(100.0, Duration::from_secs(1)).await;
        assert_eq!(paced.sent, 10);
        assert_eq!(paced.client_backlog, 90);
    }
}
