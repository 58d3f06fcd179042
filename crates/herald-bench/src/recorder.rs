//! Where connection tasks report what they see: deliveries with their latency, refusals, lost
//! connections.
//!
//! Thousands of tasks on several worker threads record at once, so the state is split in
//! shards (one mutex each, chosen by connection index): a record is an uncontended lock and
//! a histogram increment. Latency is recorded only inside the measurement window; deliveries
//! are counted always, so the tool can tell when the servers' queues have drained.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hdrhistogram::Histogram;

/// Latency is kept in microseconds, from 1 µs to 100 s, with 3 significant digits.
const MAX_LATENCY_US: u64 = 100_000_000;
const SHARDS: usize = 64;
/// Refusal texts kept for the report (the first ones; the rest are only counted).
const KEPT_REFUSALS: usize = 5;

struct Shard {
    latency_us: Histogram<u64>,
    delivered_total: u64,
    delivered_in_window: u64,
}

impl Shard {
    fn new() -> Self {
        Shard {
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("static histogram bounds are valid"),
            delivered_total: 0,
            delivered_in_window: 0,
        }
    }
}

pub struct Recorder {
    shards: Vec<Mutex<Shard>>,
    measuring: AtomicBool,
    refused: AtomicU64,
    lost_connections: AtomicU64,
    refusal_texts: Mutex<Vec<String>>,
}

/// What one measurement window saw.
#[derive(Debug, Clone)]
pub struct Window {
    pub latency_us: Histogram<u64>,
    pub delivered: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::new())).collect(),
            measuring: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            lost_connections: AtomicU64::new(0),
            refusal_texts: Mutex::new(Vec::new()),
        }
    }

    fn shard(&self, conn: usize) -> std::sync::MutexGuard<'_, Shard> {
        // A poisoned shard only means a recording thread panicked; its counts are still valid.
        self.shards[conn % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A delivery to connection `conn`, `latency_ns` after it was scheduled.
    pub fn delivery(&self, conn: usize, latency_ns: u64) {
        let measuring = self.measuring.load(Ordering::Relaxed);
        let mut shard = self.shard(conn);
        shard.delivered_total += 1;
        if measuring {
            shard.delivered_in_window += 1;
            let us = (latency_ns / 1_000).clamp(1, MAX_LATENCY_US);
            shard.latency_us.saturating_record(us);
        }
    }

    /// A latency sample that is not a delivery (a handshake's duration).
    pub fn sample(&self, conn: usize, latency_ns: u64) {
        self.delivery(conn, latency_ns);
    }

    pub fn refused(&self, text: String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut kept = self
            .refusal_texts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if kept.len() < KEPT_REFUSALS {
            kept.push(text);
        }
    }

    pub fn lost_connection(&self) {
        self.lost_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused_count(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn lost_connections(&self) -> u64 {
        self.lost_connections.load(Ordering::Relaxed)
    }

    pub fn refusal_texts(&self) -> Vec<String> {
        self.refusal_texts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Deliveries since the start, inside a window or not.
    pub fn delivered_total(&self) -> u64 {
        (0..SHARDS).map(|i| self.shard(i).delivered_total).sum()
    }

    /// Clears the window's histogram and count and starts recording latency.
    pub fn open_window(&self) {
        for i in 0..SHARDS {
            let mut shard = self.shard(i);
            shard.latency_us.reset();
            shard.delivered_in_window = 0;
        }
        self.measuring.store(true, Ordering::Relaxed);
    }

    /// Stops recording latency and returns what the window saw.
    pub fn close_window(&self) -> Window {
        self.measuring.store(false, Ordering::Relaxed);
        let mut window = Window {
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("static histogram bounds are valid"),
            delivered: 0,
        };
        for i in 0..SHARDS {
            let shard = self.shard(i);
            // Same bounds on both sides: adding cannot fail.
            let _ = window.latency_us.add(&shard.latency_us);
            window.delivered += shard.delivered_in_window;
        }
        window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_counts_only_inside_the_window_deliveries_always() {
        let recorder = Recorder::new();
        recorder.delivery(0, 5_000_000);
        recorder.open_window();
        for conn in 0..100 {
            recorder.delivery(conn, 2_000_000);
        }
        let window = recorder.close_window();
        recorder.delivery(1, 9_000_000);
        assert_eq!(window.delivered, 100);
        assert_eq!(window.latency_us.len(), 100);
        assert_eq!(window.latency_us.value_at_quantile(0.99) / 1000, 2);
        assert_eq!(recorder.delivered_total(), 102);
    }
}
