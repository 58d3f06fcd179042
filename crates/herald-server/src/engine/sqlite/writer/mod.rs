//! The writer: one thread owns the only writing connection and commits in groups.
//!
//! It blocks for the first queued command, then takes every command already queued (up to
//! [`MAX_BATCH`]) into one transaction, commits once, and only then hands the batch's appends,
//! in queue order, to the publishing task in one message (one wake-up per commit, not one per
//! message). Under load a commit carries hundreds of messages, so the cost of
//! a commit (an fsync with `synchronous = FULL`) is shared by all of them; with one message
//! waiting it commits at once, so an idle server adds no latency. Under load, commits start at
//! most every `store.commit_spacing` ([`DEFAULT_COMMIT_SPACING`]), so that a fast disk's fsync,
//! or none with `synchronous = "normal"`, does not leave each commit a few messages.
//!
//! Pruning runs here too, as small steps (each its own short transaction) taken only while no
//! command waits: an append never waits for more than one step.
//!
//! Direct messages' conversation and inbox entries are staged, and merged into their tables in
//! slices between batches (`staging.rs`).
//!
//! This file holds the loop (batching, commit pacing, WAL restarts, merges, the hand-off);
//! [`batch`] the statements of one transaction, [`streams`] the cached stream states they
//! read and advance, and [`prune`] the retention passes' steps.
//!
//! # Invariants
//! - `streams` holds, for the streams it caches, what the committed file and the staged
//!   entries say (a conversation's or an inbox's newest offset is its newest entry's, see
//!   `schema.rs`), except during a batch; a failed batch clears it, so it is reloaded.
//! - A stream's row (and so its id) is created by the first batch that touches it; message rows
//!   refer to that id.
//! - Offsets are assigned here ([`Batch::bump`]) and nowhere else, one stream at a time, each
//!   exactly once.

mod batch;
mod prune;
mod streams;

use std::collections::VecDeque;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::UnackedInboxes;
use super::checkpoint::Checkpoints;
use super::schema::inbox_name;
use super::staging::{Merger, Unmerged};
use crate::engine::fanout::{AwaitingCommit, CommitBatch, Committed};
use crate::engine::store::{
    Append, Appended, Offset, PruneReport, Retention, StoreError, StoreLimits,
};
use batch::Batch;
use prune::{PruneJob, prune_some};
use streams::Streams;

/// Most commands in one transaction.
const MAX_BATCH: usize = 4096;

/// Streams whose state is cached. Past this, all but the [`KEPT_STREAMS`] most recently used
/// are dropped between two batches (a dropped stream's state is read back from the file when a
/// message next touches it): a conversation per pair of users who ever wrote to each other
/// would otherwise stay in memory for the life of the process.
const MAX_CACHED_STREAMS: usize = 10_000;
const KEPT_STREAMS: usize = MAX_CACHED_STREAMS / 2;

/// How often the writer restarts the WAL between two batches (see `checkpoint.rs`).
const WAL_RESTART_INTERVAL: Duration = Duration::from_secs(1);

/// How long the writer waits for the checkpointer to catch up before restarting anyway: the
/// WAL must not grow without bound behind a checkpointer held up by a slow disk.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(5);

/// Under load, the least time between the starts of two commits unless the configuration says
/// otherwise (`store.commit_spacing`, see [`Writer::pace_commits`]). 5 ms, not 2: at 2 ms a
/// commit in rooms of ten at 2,000 messages/s carried 4 messages, and its fsync was a fifth of
/// the server's CPU; at 5 ms it carries 10, for a third less CPU per delivery there (6–14% per
/// direct message at 10–40k/s) and 2 ms more at p50 (docs/benchmarks.md). Kafka's producers
/// came to the same default (`linger.ms` = 5).
pub const DEFAULT_COMMIT_SPACING: Duration = Duration::from_millis(5);

pub enum Command {
    Append(Append, AwaitingCommit),
    Ack {
        user: String,
        device: Option<String>,
        offset: Offset,
        reply: oneshot::Sender<Result<Offset, StoreError>>,
    },
    Prune {
        retention: Retention,
        now_ms: u64,
        reply: oneshot::Sender<Result<PruneReport, StoreError>>,
    },
    Close(oneshot::Sender<()>),
}

/// Counters for measuring where the writer's time goes.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    pub appends: AtomicU64,
    /// Nanoseconds spent executing statements (inserts, stream updates).
    pub statement_ns: AtomicU64,
    /// Nanoseconds spent in COMMIT (the WAL write and, with FULL, the fsync).
    pub commit_ns: AtomicU64,
    /// Nanoseconds spent handing a commit's results over: its appends to the publishing task
    /// (waiting, too, while that queue is full) and its acks' replies.
    pub handoff_ns: AtomicU64,
    /// Batches handed to the publishing task: one per commit that held appends.
    pub handoffs: AtomicU64,
    /// Pruning steps taken (each one short transaction).
    pub prune_steps: AtomicU64,
    /// Nanoseconds spent restarting the WAL.
    pub wal_restart_ns: AtomicU64,
    /// WAL restarts, and among them those made without waiting for the checkpointer to catch
    /// up (it took longer than [`CATCH_UP_LIMIT`], or had stopped).
    pub wal_restarts: AtomicU64,
    pub wal_restarts_unprepared: AtomicU64,
    /// Merges of the staged entries finished, and the nanoseconds their steps took.
    pub merges: AtomicU64,
    pub merge_ns: AtomicU64,
}

/// An ack waiting for its batch: the user, the device, the offset, and where the mark after
/// goes.
type PendingAck = (
    String,
    Option<String>,
    Offset,
    oneshot::Sender<Result<Offset, StoreError>>,
);

pub struct Writer {
    conn: Connection,
    /// Held for the writer's life: a second herald on the same data folder is refused.
    _lock: File,
    streams: Streams,
    prune: VecDeque<PruneJob>,
    stats: Arc<WriterStats>,
    /// The publishing task's queue: each commit's appends go there as one batch.
    committed: mpsc::Sender<CommitBatch>,
    checkpoints: Checkpoints,
    last_wal_restart: Instant,
    /// When the writer asked the checkpointer to catch up for the next restart.
    restart_asked: Option<Instant>,
    /// The least time between the starts of two commits under load; zero: no pacing.
    commit_spacing: Duration,
    /// When the last batch was taken, and how many commands it held (see
    /// [`Writer::pace_commits`]).
    last_batch_taken: Instant,
    last_batch_len: usize,
    /// Users whose inbox holds unacknowledged entries, kept in step with each commit.
    unacked: Arc<UnackedInboxes>,
    /// The staged entries, and their merges (see `staging.rs`).
    merger: Merger,
    /// Set when a merge step failed, until the next batch: the writer then waits for commands
    /// instead of retrying while idle.
    merge_failed: bool,
    limits: StoreLimits,
}

impl Writer {
    /// A writer that stages direct messages' entries and merges them with `merger` (whose
    /// index the readers share, see `staging.rs`).
    pub fn new(
        conn: Connection,
        lock: File,
        committed: mpsc::Sender<CommitBatch>,
        checkpoints: Checkpoints,
        unacked: Arc<UnackedInboxes>,
        merger: Merger,
        limits: StoreLimits,
    ) -> Writer {
        Writer {
            conn,
            _lock: lock,
            streams: Streams::default(),
            prune: VecDeque::new(),
            stats: Arc::default(),
            committed,
            checkpoints,
            last_wal_restart: Instant::now(),
            restart_asked: None,
            commit_spacing: DEFAULT_COMMIT_SPACING,
            last_batch_taken: Instant::now(),
            last_batch_len: 0,
            unacked,
            merger,
            merge_failed: false,
            limits,
        }
    }

    /// Under load, starts commits at most every `spacing` (zero: as soon as the previous one is
    /// done; see [`Writer::pace_commits`]).
    pub fn with_commit_spacing(mut self, spacing: Duration) -> Writer {
        self.commit_spacing = spacing;
        self
    }

    /// Where the writer's time goes, shared with the store.
    pub fn stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    /// Runs until a `Close` command or until every sender is gone.
    pub fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut closed_by = None;
        let depth = crate::metrics::gauge("herald_store_writer_queue_depth");
        let cached = crate::metrics::gauge("herald_store_cached_streams");
        'serve: loop {
            // Work taken only while no command waits: the rest of a merge, then pruning.
            let merging = self.merger.due() && !self.merge_failed;
            let first = if self.prune.is_empty() && !merging {
                match commands.blocking_recv() {
                    Some(command) => command,
                    None => break,
                }
            } else {
                match commands.try_recv() {
                    Ok(command) => command,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if merging {
                            self.merge_step();
                        } else {
                            self.prune_step();
                        }
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            };
            self.pace_commits();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.last_batch_len = batch.len();
            depth.set(commands.len() as f64);
            let mut writes = Vec::with_capacity(batch.len());
            for command in batch {
                match command {
                    Command::Prune {
                        retention,
                        now_ms,
                        reply,
                    } => self.prune.push_back(PruneJob {
                        retention,
                        now_ms,
                        cursor: 0,
                        report: PruneReport::default(),
                        reply,
                    }),
                    Command::Close(reply) => closed_by = Some(reply),
                    write => writes.push(write),
                }
            }
            if !writes.is_empty() {
                self.write_batch(writes);
                cached.set(self.streams.slots.len() as f64);
                self.merge_failed = false;
            }
            self.merge_step();
            self.restart_wal_when_due();
            if closed_by.is_some() {
                self.merge_all();
                break 'serve;
            }
        }
        // Queued commands fail with `Closed` when their reply channels drop with the receiver.
        drop(commands);
        drop(self);
        if let Some(reply) = closed_by {
            let _ = reply.send(());
        }
    }

    /// Under load, waits before taking a batch until the commit spacing has passed since the
    /// previous one was taken. A commit's own cost (the fsync with `synchronous = "full"`, a WAL
    /// frame and checksum for every page it dirties, the wake-ups) is then shared by more
    /// messages. Without it, commits follow the disk: with no fsync to wait for (`normal`),
    /// commits carried 6–8 messages at 20k direct messages/s, and pacing saves about 15% of the
    /// server's CPU there; with `full` on a disk that syncs in 0.2 ms, commits carried 2 messages
    /// in rooms of ten at 2,000 messages/s and 8–18 at 10–30k direct messages/s; spaced 2 ms
    /// they took 12–27% less CPU, and 5 ms (the default) takes a third off what was left in
    /// rooms (docs/benchmarks.md). Load is read from the previous batch: one that held a single
    /// command says the writer keeps up, so a message after a quiet spell never waits.
    fn pace_commits(&mut self) {
        if self.commit_spacing.is_zero() {
            return;
        }
        let since_previous = self.last_batch_taken.elapsed();
        if let Some(wait) = linger(self.commit_spacing, self.last_batch_len, since_previous) {
            std::thread::sleep(wait);
        }
        self.last_batch_taken = Instant::now();
    }

    /// Between two batches: once [`WAL_RESTART_INTERVAL`] has passed, asks the checkpointer to
    /// catch up, and restarts the WAL at the first batch boundary after it has, so that the
    /// restart, which holds every append, only copies and fsyncs the last few milliseconds of
    /// commits (see `checkpoint.rs`).
    fn restart_wal_when_due(&mut self) {
        if self.last_wal_restart.elapsed() < WAL_RESTART_INTERVAL {
            return;
        }
        let prepared = match self.restart_asked {
            None if self.checkpoints.ask() => {
                self.restart_asked = Some(Instant::now());
                return;
            }
            None => false,
            Some(_) if self.checkpoints.caught_up() => true,
            Some(asked) if asked.elapsed() < CATCH_UP_LIMIT => return,
            Some(_) => false,
        };
        let started = Instant::now();
        super::checkpoint::checkpoint(&self.conn, "RESTART");
        let took = add_elapsed(&self.stats.wal_restart_ns, started);
        metrics::histogram!("herald_store_wal_restart_seconds").record(took);
        self.stats.wal_restarts.fetch_add(1, Ordering::Relaxed);
        if !prepared {
            self.stats
                .wal_restarts_unprepared
                .fetch_add(1, Ordering::Relaxed);
        }
        self.last_wal_restart = Instant::now();
        self.restart_asked = None;
    }

    fn write_batch(&mut self, writes: Vec<Command>) {
        self.streams.batch += 1;
        if self.streams.states.len() > MAX_CACHED_STREAMS {
            self.streams.keep_recent(KEPT_STREAMS);
        }
        let mut appends = Vec::new();
        let mut waiting = Vec::new();
        let mut acks = Vec::new();
        for write in writes {
            match write {
                Command::Append(append, awaiting) => {
                    appends.push(append);
                    waiting.push(awaiting);
                }
                Command::Ack {
                    user,
                    device,
                    offset,
                    reply,
                } => acks.push((user, device, offset, reply)),
                Command::Prune { .. } | Command::Close(_) => {}
            }
        }
        let started = Instant::now();
        let outcome = self.transact(appends, &acks);
        match outcome {
            Ok((appended, acked, staged)) => {
                // Before anything is answered or delivered: a reader must find these entries.
                self.merger.committed(staged);
                // Before the callbacks: a message's fan-out must not overtake its user's mark.
                self.mark_unacked(appended.iter().flatten(), &acks);
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .appends
                    .fetch_add(appended.len() as u64, Ordering::Relaxed);
                let handoff_started = Instant::now();
                self.hand_off(waiting, appended.into_iter());
                for ((_, _, _, reply), result) in acks.into_iter().zip(acked) {
                    let _ = reply.send(result);
                }
                add_elapsed(&self.stats.handoff_ns, handoff_started);
            }
            Err(error) => {
                // Whatever the batch assigned was rolled back: forget it.
                self.streams = Streams::default();
                tracing::error!(%error, "store write failed; the batch was rolled back");
                let error = StoreError::Backend {
                    operation: "write",
                    reason: error.to_string(),
                };
                let failed = std::iter::repeat_with(|| Err(error.clone()));
                self.hand_off(waiting, failed);
                for (_, _, _, reply) in acks {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
        metrics::histogram!("herald_store_commit_seconds").record(started.elapsed());
    }

    /// Hands a commit's appends with their results to the publishing task, in queue order, as
    /// one batch. Its queue's backpressure slows the writer and never reorders it; the queue is
    /// closed only when the runtime is gone, and the appends' waiters with it.
    fn hand_off(
        &self,
        waiting: Vec<AwaitingCommit>,
        results: impl Iterator<Item = Result<Appended, StoreError>>,
    ) {
        if waiting.is_empty() {
            return;
        }
        let batch: CommitBatch = waiting
            .into_iter()
            .zip(results)
            .map(|(waiting, result)| Committed { result, waiting })
            .collect();
        self.stats.handoffs.fetch_add(1, Ordering::Relaxed);
        let _ = self.committed.blocking_send(batch);
    }

    /// Updates [`UnackedInboxes`] for every inbox the committed batch touched, from the
    /// streams' states after it (appends run before acks in a batch).
    fn mark_unacked<'a>(&self, appended: impl Iterator<Item = &'a Appended>, acks: &[PendingAck]) {
        let recipients = appended
            .flat_map(|appended| match appended {
                Appended::Direct { inbox, .. } => inbox.as_slice(),
                Appended::Room { .. } => &[],
            })
            .map(|(user, _)| user.as_str());
        let mut name = String::new();
        let streams = &self.streams;
        self.unacked.set(
            recipients
                .chain(acks.iter().map(|(user, _, _, _)| user.as_str()))
                .filter_map(|user| {
                    inbox_name(&mut name, user);
                    let state = &streams.states[*streams.slots.get(&name)?];
                    Some((user, state.last > state.floor()))
                }),
        );
    }

    /// One transaction for the whole batch. SQL errors abort it; an invalid ack, or a direct
    /// message to a full inbox, only fails itself.
    #[allow(clippy::type_complexity)]
    fn transact(
        &mut self,
        appends: Vec<Append>,
        acks: &[PendingAck],
    ) -> rusqlite::Result<(
        Vec<Result<Appended, StoreError>>,
        Vec<Result<Offset, StoreError>>,
        Vec<(String, Unmerged)>,
    )> {
        let started = Instant::now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut batch = Batch::new(&tx, &mut self.streams, self.merger.staged(), self.limits)?;
        let mut appended = Vec::with_capacity(appends.len());
        for append in appends {
            appended.push(batch.append(append)?);
        }
        let mut acked = Vec::with_capacity(acks.len());
        for (user, device, offset, _) in acks {
            acked.push(batch.ack(user, device.as_deref(), *offset)?);
        }
        batch.flush()?;
        let staged = std::mem::take(&mut batch.staged);
        drop(batch);
        add_elapsed(&self.stats.statement_ns, started);
        let committing = Instant::now();
        tx.commit()?;
        add_elapsed(&self.stats.commit_ns, committing);
        Ok((appended, acked, staged))
    }

    /// Takes one step of the merge under way or due, if any (see `staging.rs`).
    fn merge_step(&mut self) {
        if !self.merger.due() {
            return;
        }
        let started = Instant::now();
        match self.merger.step(&mut self.conn) {
            Ok(None) => {}
            Ok(Some(finished)) => {
                let took = add_elapsed(&self.stats.merge_ns, started);
                metrics::histogram!("herald_store_merge_step_seconds").record(took);
                if finished {
                    self.stats.merges.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(error) => {
                self.merge_failed = true;
                tracing::error!(%error, "merging staged entries failed; will retry");
            }
        }
    }

    /// Merges every staged entry at once (before pruning, and at close).
    fn merge_all(&mut self) {
        let started = Instant::now();
        match self.merger.merge_all(&mut self.conn) {
            Ok(0) => {}
            Ok(_) => {
                add_elapsed(&self.stats.merge_ns, started);
                self.stats.merges.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::error!(%error, "merging staged entries failed; they stay staged");
            }
        }
    }

    fn prune_step(&mut self) {
        if self.prune.is_empty() {
            return;
        }
        // Pruning reads and deletes entries in their tables, and may remove a stream: none of
        // them may wait in staging.
        self.merge_all();
        let Some(job) = self.prune.front_mut() else {
            return;
        };
        self.stats.prune_steps.fetch_add(1, Ordering::Relaxed);
        let mut removed = Vec::new();
        let outcome = prune_some(&mut self.conn, job, &mut removed);
        if outcome.is_ok() {
            // Committed: forget the removed streams, so a later message creates them afresh.
            for name in &removed {
                self.streams.slots.remove(name);
            }
            self.unacked.set(
                removed
                    .iter()
                    .filter_map(|name| name.strip_prefix("u/"))
                    .map(|user| (user, false)),
            );
        }
        match outcome {
            Ok(false) => {}
            Ok(true) => {
                if let Some(job) = self.prune.pop_front() {
                    let _ = job.reply.send(Ok(job.report));
                }
            }
            Err(error) => {
                tracing::warn!(%error, "pruning failed; will retry at the next pass");
                if let Some(job) = self.prune.pop_front() {
                    let _ = job.reply.send(Err(StoreError::Backend {
                        operation: "prune",
                        reason: error.to_string(),
                    }));
                }
            }
        }
    }
}

/// How long the writer waits before taking its next batch, given the size of the previous one
/// and the time since it was taken (see [`Writer::pace_commits`]).
fn linger(spacing: Duration, previous_batch: usize, since_previous: Duration) -> Option<Duration> {
    if previous_batch <= 1 {
        return None;
    }
    spacing
        .checked_sub(since_previous)
        .filter(|wait| !wait.is_zero())
}

/// Adds the time since `since` to `counter`, and returns it.
fn add_elapsed(counter: &AtomicU64, since: Instant) -> Duration {
    let elapsed = since.elapsed();
    counter.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    elapsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_lingers_only_after_a_batch_of_several_and_never_past_the_spacing() {
        // A single command last time: the writer keeps up, a new message is taken at once.
        let spacing = DEFAULT_COMMIT_SPACING;
        assert_eq!(linger(spacing, 0, Duration::ZERO), None);
        assert_eq!(linger(spacing, 1, Duration::from_micros(100)), None);
        // Under load: wait out the rest of the spacing, and nothing once it has passed.
        assert_eq!(
            linger(spacing, 40, Duration::from_micros(500)),
            Some(spacing - Duration::from_micros(500))
        );
        assert_eq!(linger(spacing, 40, spacing), None);
        assert_eq!(linger(spacing, 40, spacing * 2), None);
        // No spacing: never.
        assert_eq!(linger(Duration::ZERO, 40, Duration::ZERO), None);
    }
}
