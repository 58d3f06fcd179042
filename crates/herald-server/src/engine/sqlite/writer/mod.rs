//! The writer: one thread owns the only writing connection and commits in groups.
//!
//! It blocks for the first queued command, then takes every command already queued (up to
//! [`MAX_BATCH`]) into one transaction, commits once, and only then hands the batch's appends,
//! in queue order, to the publishing task in one message (one wake-up per commit, not one per
//! message). Under load a commit carries hundreds of messages, so the cost of
//! a commit (an fsync with `synchronous = FULL`) is shared by all of them; with one message
//! waiting it commits at once, so an idle server adds no latency. With `synchronous = "normal"`,
//! under load, commits start at most every [`COMMIT_SPACING`], so that without an fsync to wait
//! for they still carry many messages.
//!
//! Pruning runs here too, as small steps (each its own short transaction) taken only while no
//! command waits: an append never waits for more than one step.
//!
//! # Invariants
//! - `streams` mirrors the committed `streams` table for the streams it holds, except during a
//!   batch; a failed batch clears it, so it is reloaded from the file.
//! - A stream's row (and so its id) is created by the first batch that touches it; message rows
//!   refer to that id.
//! - Offsets are assigned here and nowhere else, one stream at a time, each exactly once.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald_protocol::Payload;
use rusqlite::{
    CachedStatement, Connection, OptionalExtension, Transaction, TransactionBehavior, params,
};
use tokio::sync::{mpsc, oneshot};

use super::UnackedInboxes;
use super::checkpoint::Checkpoints;
use super::schema::{FLOOR, Synchronous, conversation_name, inbox_name, room_name};
use crate::engine::fanout::{AwaitingCommit, CommitBatch, Committed};
use crate::engine::store::{
    Append, Appended, Epoch, Offset, PruneReport, Retention, StoreError, StoreLimits,
    StreamPosition,
};

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

/// With `synchronous = "normal"`, under load, the least time between the starts of two commits
/// (see [`Writer::pace_commits`]).
const COMMIT_SPACING: Duration = Duration::from_millis(2);

/// Most rows one pruning step deletes, and most streams it looks at.
const PRUNE_STEP_ROWS: u64 = 1000;
const PRUNE_STEP_STREAMS: i64 = 64;

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
}

struct StreamState {
    /// The stream's row in `streams`, which message rows refer to.
    id: i64,
    epoch: String,
    last: u64,
    acked: u64,
    /// Inboxes: the lowest device mark, if any device has one.
    lowest_device_mark: Option<u64>,
    /// The last batch that touched the stream ([`Streams::batch`]).
    used: u64,
}

impl StreamState {
    /// Entries at or below this were acknowledged by every reader (see the store contract).
    fn floor(&self) -> u64 {
        self.lowest_device_mark
            .map_or(self.acked, |lowest| lowest.min(self.acked))
    }
}

/// The streams the writer has touched, by name. States sit in a vector so a batch can list the
/// ones it changed by index.
#[derive(Default)]
struct Streams {
    slots: HashMap<String, usize>,
    states: Vec<StreamState>,
    /// Batches written so far: how recently a stream was used.
    batch: u64,
}

impl Streams {
    fn insert(&mut self, name: String, mut state: StreamState) -> usize {
        state.used = self.batch;
        let slot = self.states.len();
        self.states.push(state);
        self.slots.insert(name, slot);
        slot
    }

    /// Called between batches (slots are only held within one): keeps the `keep` most recently
    /// used streams, and drops states whose stream pruning removed.
    fn keep_recent(&mut self, keep: usize) {
        let mut states: Vec<Option<StreamState>> = std::mem::take(&mut self.states)
            .into_iter()
            .map(Some)
            .collect();
        let mut named: Vec<(String, usize)> = self.slots.drain().collect();
        named.sort_unstable_by_key(|(_, slot)| {
            std::cmp::Reverse(states[*slot].as_ref().map_or(0, |state| state.used))
        });
        named.truncate(keep);
        for (name, slot) in named {
            if let Some(state) = states[slot].take() {
                let used = state.used;
                let slot = self.insert(name, state);
                self.states[slot].used = used;
            }
        }
    }
}

struct PruneJob {
    retention: Retention,
    now_ms: u64,
    /// The id of the last stream fully pruned in this pass.
    cursor: i64,
    report: PruneReport,
    reply: oneshot::Sender<Result<PruneReport, StoreError>>,
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
    /// Whether commits are paced: only when they do not wait for an fsync, which spaces them
    /// by itself (pacing `full` commits as well only added latency: p50 1.9 → 3.5 ms at 20k
    /// direct messages/s, for no CPU saved).
    paced: bool,
    /// When the last batch was taken, and how many commands it held (see
    /// [`Writer::pace_commits`]).
    last_batch_taken: Instant,
    last_batch_len: usize,
    /// Users whose inbox holds unacknowledged entries, kept in step with each commit.
    unacked: Arc<UnackedInboxes>,
    limits: StoreLimits,
}

impl Writer {
    pub fn new(
        conn: Connection,
        lock: File,
        stats: Arc<WriterStats>,
        committed: mpsc::Sender<CommitBatch>,
        checkpoints: Checkpoints,
        unacked: Arc<UnackedInboxes>,
        limits: StoreLimits,
    ) -> Writer {
        Writer {
            conn,
            _lock: lock,
            streams: Streams::default(),
            prune: VecDeque::new(),
            stats,
            committed,
            checkpoints,
            last_wal_restart: Instant::now(),
            restart_asked: None,
            paced: false,
            last_batch_taken: Instant::now(),
            last_batch_len: 0,
            unacked,
            limits,
        }
    }

    /// Paces commits under load when they do not wait for an fsync (see
    /// [`Writer::pace_commits`]).
    pub fn paced_for(mut self, synchronous: Synchronous) -> Writer {
        self.paced = synchronous == Synchronous::Normal;
        self
    }

    /// Runs until a `Close` command or until every sender is gone.
    pub fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut closed_by = None;
        let depth = crate::metrics::gauge("herald_store_writer_queue_depth");
        let cached = crate::metrics::gauge("herald_store_cached_streams");
        'serve: loop {
            let first = if self.prune.is_empty() {
                match commands.blocking_recv() {
                    Some(command) => command,
                    None => break,
                }
            } else {
                match commands.try_recv() {
                    Ok(command) => command,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        self.prune_step();
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
            }
            self.restart_wal_when_due();
            if closed_by.is_some() {
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

    /// With `synchronous = "normal"`, under load, waits before taking a batch until
    /// [`COMMIT_SPACING`] has passed since the previous one was taken. With no fsync to wait
    /// for, the writer would otherwise commit every few messages as they trickle in, and a
    /// commit's own cost (a WAL frame and checksum for every page it dirties, the wake-ups)
    /// would be shared by few: at 20k direct messages/s, commits carried 6–8, and pacing saves
    /// about 15% of the server's CPU there. Load is read from the previous batch: one that held
    /// a single command says the writer keeps up, so a message after a quiet spell never waits.
    fn pace_commits(&mut self) {
        if !self.paced {
            return;
        }
        if let Some(wait) = linger(self.last_batch_len, self.last_batch_taken.elapsed()) {
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
        add_elapsed(&self.stats.wal_restart_ns, started);
        metrics::histogram!("herald_store_wal_restart_seconds").record(started.elapsed());
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
            Ok((appended, acked)) => {
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
    )> {
        let started = Instant::now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut batch = Batch::new(&tx, &mut self.streams, self.limits)?;
        let mut appended = Vec::with_capacity(appends.len());
        for append in appends {
            appended.push(batch.append(append)?);
        }
        let mut acked = Vec::with_capacity(acks.len());
        for (user, device, offset, _) in acks {
            acked.push(batch.ack(user, device.as_deref(), *offset)?);
        }
        batch.flush()?;
        drop(batch);
        add_elapsed(&self.stats.statement_ns, started);
        let committing = Instant::now();
        tx.commit()?;
        add_elapsed(&self.stats.commit_ns, committing);
        Ok((appended, acked))
    }

    fn prune_step(&mut self) {
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
fn linger(previous_batch: usize, since_previous: Duration) -> Option<Duration> {
    if previous_batch <= 1 {
        return None;
    }
    COMMIT_SPACING
        .checked_sub(since_previous)
        .filter(|wait| !wait.is_zero())
}

fn add_elapsed(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// The writes of one transaction, with its statements prepared once.
struct Batch<'a> {
    streams: &'a mut Streams,
    limits: StoreLimits,
    /// Streams changed in this batch (indexes into `streams.states`), written back before the
    /// commit.
    dirty: Vec<usize>,
    /// The name of the stream being looked up, reused so lookups do not allocate.
    name: String,
    tx: &'a Transaction<'a>,
    select_stream: CachedStatement<'a>,
    insert_stream: CachedStatement<'a>,
    update_stream: CachedStatement<'a>,
    insert_room: CachedStatement<'a>,
    insert_direct: CachedStatement<'a>,
    insert_conversation: CachedStatement<'a>,
    insert_inbox: CachedStatement<'a>,
}

impl<'a> Batch<'a> {
    fn new(
        tx: &'a Transaction<'a>,
        streams: &'a mut Streams,
        limits: StoreLimits,
    ) -> rusqlite::Result<Batch<'a>> {
        Ok(Batch {
            streams,
            limits,
            dirty: Vec::new(),
            name: String::new(),
            tx,
            select_stream: tx.prepare_cached(
                "SELECT id, epoch, last_pos, acked,
                     (SELECT min(m.acked) FROM inbox_marks m WHERE m.stream = streams.id)
                 FROM streams WHERE name = ?1",
            )?,
            insert_stream: tx.prepare_cached(
                "INSERT INTO streams (name, epoch, last_pos, acked) VALUES (?1, ?2, 0, 0)",
            )?,
            update_stream: tx
                .prepare_cached("UPDATE streams SET last_pos = ?2, acked = ?3 WHERE id = ?1")?,
            insert_room: tx.prepare_cached(
                "INSERT INTO room_messages (stream, pos, id, sender, ts, is_binary, content)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?,
            insert_direct: tx.prepare_cached(
                "INSERT INTO direct_messages (id, sender, recipients, ts, is_binary, content)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?,
            insert_conversation: tx.prepare_cached(
                "INSERT INTO conversations (stream, pos, message) VALUES (?1, ?2, ?3)",
            )?,
            insert_inbox: tx
                .prepare_cached("INSERT INTO inbox (stream, pos, message) VALUES (?1, ?2, ?3)")?,
        })
    }

    /// The slot of the stream named `self.name`: cached, read from the file, or created.
    fn slot(&mut self) -> rusqlite::Result<usize> {
        if let Some(&slot) = self.streams.slots.get(self.name.as_str()) {
            self.streams.states[slot].used = self.streams.batch;
            return Ok(slot);
        }
        let stored = self
            .select_stream
            .query_row([self.name.as_str()], |row| {
                Ok(StreamState {
                    id: row.get(0)?,
                    epoch: row.get(1)?,
                    last: row.get::<_, i64>(2)? as u64,
                    acked: row.get::<_, i64>(3)? as u64,
                    lowest_device_mark: row.get::<_, Option<i64>>(4)?.map(|mark| mark as u64),
                    used: 0,
                })
            })
            .optional()?;
        let state = match stored {
            Some(state) => state,
            None => {
                let epoch = Epoch::random().0;
                self.insert_stream
                    .execute(params![self.name.as_str(), epoch])?;
                StreamState {
                    id: self.tx.last_insert_rowid(),
                    epoch,
                    last: 0,
                    acked: 0,
                    lowest_device_mark: None,
                    used: 0,
                }
            }
        };
        Ok(self.streams.insert(self.name.clone(), state))
    }

    /// Assigns the next offset of a stream; returns the stream's id and the offset.
    fn bump(&mut self, slot: usize) -> (i64, u64) {
        let state = &mut self.streams.states[slot];
        state.last += 1;
        self.dirty.push(slot);
        (state.id, state.last)
    }

    fn append(&mut self, append: Append) -> rusqlite::Result<Result<Appended, StoreError>> {
        match append {
            Append::Room { room, message } => {
                room_name(&mut self.name, &room);
                let slot = self.slot()?;
                let (stream, pos) = self.bump(slot);
                let (is_binary, content) = content_bytes(&message.content);
                self.insert_room.execute(params![
                    stream,
                    pos as i64,
                    message.id,
                    &*message.from,
                    message.ts as i64,
                    is_binary,
                    content
                ])?;
                Ok(Ok(Appended::Room {
                    room,
                    message,
                    position: StreamPosition {
                        offset: Offset(pos),
                        epoch: Epoch(self.streams.states[slot].epoch.clone()),
                    },
                }))
            }
            Append::Direct {
                to,
                recipients,
                message,
            } => {
                let mut inbox = Vec::with_capacity(recipients.len());
                if recipients.is_empty() {
                    return Ok(Ok(Appended::Direct { to, message, inbox }));
                }
                let full = self.full_inboxes(&recipients)?;
                if !full.is_empty() {
                    return Ok(Err(StoreError::InboxFull {
                        users: full,
                        limit: self.limits.max_inbox_messages,
                    }));
                }
                // Stored once; each conversation and inbox entry points at it.
                let (is_binary, content) = content_bytes(&message.content);
                self.insert_direct.execute(params![
                    message.id,
                    &*message.from,
                    // A list of plain strings always serializes.
                    serde_json::to_string(&to).unwrap_or_default(),
                    message.ts as i64,
                    is_binary,
                    content
                ])?;
                let seq = self.tx.last_insert_rowid();
                for recipient in recipients {
                    conversation_name(&mut self.name, &message.from, &recipient);
                    let slot = self.slot()?;
                    let (stream, pos) = self.bump(slot);
                    self.insert_conversation
                        .execute(params![stream, pos as i64, seq])?;
                    inbox_name(&mut self.name, &recipient);
                    let slot = self.slot()?;
                    let (stream, pos) = self.bump(slot);
                    self.insert_inbox
                        .execute(params![stream, pos as i64, seq])?;
                    inbox.push((recipient, Offset(pos)));
                }
                Ok(Ok(Appended::Direct { to, message, inbox }))
            }
        }
    }

    /// The recipients whose inbox already holds `max_inbox_messages` entries above its floor.
    fn full_inboxes(&mut self, recipients: &[String]) -> rusqlite::Result<Vec<String>> {
        let limit = self.limits.max_inbox_messages;
        let mut full = Vec::new();
        if limit == 0 {
            return Ok(full);
        }
        for recipient in recipients {
            inbox_name(&mut self.name, recipient);
            let slot = self.slot()?;
            let state = &self.streams.states[slot];
            if state.last - state.floor() >= limit {
                full.push(recipient.clone());
            }
        }
        Ok(full)
    }

    fn ack(
        &mut self,
        user: &str,
        device: Option<&str>,
        offset: Offset,
    ) -> rusqlite::Result<Result<Offset, StoreError>> {
        inbox_name(&mut self.name, user);
        let slot = self.slot()?;
        let state = &self.streams.states[slot];
        if offset.0 > state.last {
            return Ok(Err(StoreError::AckBeyondInbox {
                requested: offset.0,
                newest: state.last,
            }));
        }
        let device_mark = match device {
            Some(device) => Some(self.ack_device(slot, device, offset.0)?),
            None => None,
        };
        let state = &mut self.streams.states[slot];
        if offset.0 > state.acked {
            state.acked = offset.0;
            self.dirty.push(slot);
        }
        Ok(Ok(Offset(device_mark.unwrap_or(state.acked))))
    }

    /// Raises one device's mark to `offset` (from the inbox's floor for a device without
    /// one, evicting the least recently used mark when the user has the most allowed); returns
    /// the device's mark after.
    fn ack_device(&mut self, slot: usize, device: &str, offset: u64) -> rusqlite::Result<u64> {
        let state = &self.streams.states[slot];
        let (stream, floor) = (state.id, state.floor());
        let known: Option<i64> = self
            .tx
            .prepare_cached("SELECT acked FROM inbox_marks WHERE stream = ?1 AND device = ?2")?
            .query_row(params![stream, device], |row| row.get(0))
            .optional()?;
        if known.is_none() {
            let marks: i64 = self
                .tx
                .prepare_cached("SELECT count(*) FROM inbox_marks WHERE stream = ?1")?
                .query_row([stream], |row| row.get(0))?;
            if marks as usize >= self.limits.max_devices_per_user {
                let evicted: Option<String> = self
                    .tx
                    .prepare_cached(
                        "DELETE FROM inbox_marks WHERE stream = ?1 AND device =
                         (SELECT device FROM inbox_marks WHERE stream = ?1
                          ORDER BY used_ms, acked, device LIMIT 1)
                         RETURNING device",
                    )?
                    .query_row([stream], |row| row.get(0))
                    .optional()?;
                tracing::info!(
                    stream,
                    ?evicted,
                    "store.max_devices_per_user reached: the least recently used device mark was dropped"
                );
            }
        }
        let mark = (known.map_or(floor, |mark| mark as u64)).max(offset);
        self.tx
            .prepare_cached(
                "INSERT INTO inbox_marks (stream, device, acked, used_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (stream, device) DO UPDATE SET acked = ?3, used_ms = ?4",
            )?
            .execute(params![stream, device, mark as i64, unix_millis()])?;
        let lowest: Option<i64> = self
            .tx
            .prepare_cached("SELECT min(acked) FROM inbox_marks WHERE stream = ?1")?
            .query_row([stream], |row| row.get(0))?;
        self.streams.states[slot].lowest_device_mark = lowest.map(|mark| mark as u64);
        Ok(mark)
    }

    /// Writes every changed stream's state.
    fn flush(&mut self) -> rusqlite::Result<()> {
        self.dirty.sort_unstable();
        self.dirty.dedup();
        for &slot in &self.dirty {
            let state = &self.streams.states[slot];
            self.update_stream
                .execute(params![state.id, state.last as i64, state.acked as i64])?;
        }
        Ok(())
    }
}

fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

fn content_bytes(content: &Payload) -> (bool, &[u8]) {
    match content {
        Payload::Json(raw) => (false, raw.get().as_bytes()),
        Payload::Binary(bytes) => (true, &bytes[..]),
    }
}

/// One pruning step: looks at up to [`PRUNE_STEP_STREAMS`] streams after the job's cursor and
/// deletes at most [`PRUNE_STEP_ROWS`] rows, and the streams it left empty by age (their names
/// go to `removed`). Returns whether the pass is complete.
fn prune_some(
    conn: &mut Connection,
    job: &mut PruneJob,
    removed: &mut Vec<String>,
) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let streams: Vec<(i64, String, u64, u64)> = tx
        .prepare_cached(&format!(
            "SELECT id, name, last_pos, {FLOOR} FROM streams WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))?
        .query_map(params![job.cursor, PRUNE_STEP_STREAMS], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get::<_, i64>(2)? as u64,
                row.get::<_, i64>(3)? as u64,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if streams.is_empty() {
        // Every stream is done: the direct messages no entry keeps any more go last.
        let finished = prune_direct_messages(&tx, job)?;
        tx.commit()?;
        return Ok(finished);
    }
    let mut budget = PRUNE_STEP_ROWS;
    for (id, name, last, acked) in streams {
        let finished = prune_stream(&tx, job, id, &name, last, acked, &mut budget)?;
        if !finished {
            break;
        }
        if remove_if_expired(&tx, job, id, &name, last, acked)? {
            removed.push(name);
        }
        job.cursor = id;
        if budget == 0 {
            break;
        }
    }
    tx.commit()?;
    Ok(false)
}

/// Deletes the prefix of one stream that retention no longer covers, within `budget` rows.
/// Returns whether nothing more is left to delete in it.
fn prune_stream(
    tx: &Transaction<'_>,
    job: &mut PruneJob,
    id: i64,
    name: &str,
    last: u64,
    acked: u64,
    budget: &mut u64,
) -> rusqlite::Result<bool> {
    let retention = job.retention;
    let older_than = |age: Duration| {
        (!age.is_zero()).then(|| job.now_ms.saturating_sub(age.as_millis() as u64) as i64)
    };
    let (table, cut_by_rule, age_limit) = if name.starts_with("r/") {
        let by_count = if retention.room_max_messages > 0 {
            last.saturating_sub(retention.room_max_messages)
        } else {
            0
        };
        (
            "room_messages",
            by_count,
            older_than(retention.room_max_age),
        )
    } else if name.starts_with("u/") {
        // Acknowledged entries were delivered: the conversation keeps the message itself.
        ("inbox", acked, older_than(retention.inbox_max_age))
    } else if name.starts_with("c/") {
        ("conversations", 0, older_than(retention.inbox_max_age))
    } else {
        return Ok(true);
    };
    let mut cut = cut_by_rule;
    if let Some(limit) = age_limit {
        // Timestamps follow offsets (both come from the accepting node in order), so the old
        // messages are the oldest offsets: look at the oldest `budget` rows only. An entry whose
        // message is gone counts as old.
        let oldest = if table == "room_messages" {
            format!("SELECT pos, ts FROM {table} WHERE stream = ?1 ORDER BY pos LIMIT ?2")
        } else {
            format!(
                "SELECT e.pos, d.ts FROM (SELECT pos, message FROM {table} WHERE stream = ?1
                 ORDER BY pos LIMIT ?2) e LEFT JOIN direct_messages d ON d.seq = e.message"
            )
        };
        let by_age: Option<i64> = tx
            .prepare_cached(&format!(
                "SELECT max(pos) FROM ({oldest}) WHERE ts IS NULL OR ts < ?3"
            ))?
            .query_row(params![id, *budget as i64, limit], |row| row.get(0))?;
        cut = cut.max(by_age.unwrap_or(0) as u64);
    }
    if cut == 0 || *budget == 0 {
        return Ok(cut == 0);
    }
    let deleted = tx
        .prepare_cached(&format!(
            "DELETE FROM {table} WHERE stream = ?1 AND pos IN
             (SELECT pos FROM {table} WHERE stream = ?1 AND pos <= ?2 ORDER BY pos LIMIT ?3)"
        ))?
        .execute(params![id, cut as i64, *budget as i64])? as u64;
    *budget -= deleted;
    match table {
        "room_messages" => job.report.room_messages += deleted,
        "inbox" => job.report.inbox_entries += deleted,
        _ => job.report.direct_messages += deleted,
    }
    Ok(*budget > 0)
}

/// Removes an inbox or a conversation that retention emptied by age: its row (so its epoch and
/// offsets go; a later message starts a new epoch) and its device marks. Without this, every
/// name a direct message was ever sent to would keep rows forever. An inbox emptied because its
/// entries were acknowledged stays, and so do rooms: connected clients count on their offsets
/// going on.
fn remove_if_expired(
    tx: &Transaction<'_>,
    job: &mut PruneJob,
    id: i64,
    name: &str,
    last: u64,
    floor: u64,
) -> rusqlite::Result<bool> {
    let retention = job.retention;
    let (table, age) = if name.starts_with("u/") {
        if floor >= last {
            return Ok(false);
        }
        ("inbox", retention.inbox_max_age)
    } else if name.starts_with("c/") {
        ("conversations", retention.inbox_max_age)
    } else {
        return Ok(false);
    };
    if age.is_zero() || last == 0 {
        return Ok(false);
    }
    let holds_entries: bool = tx
        .prepare_cached(&format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE stream = ?1)"
        ))?
        .query_row([id], |row| row.get(0))?;
    if holds_entries {
        return Ok(false);
    }
    tx.prepare_cached("DELETE FROM inbox_marks WHERE stream = ?1")?
        .execute([id])?;
    tx.prepare_cached("DELETE FROM streams WHERE id = ?1")?
        .execute([id])?;
    job.report.empty_streams += 1;
    Ok(true)
}

/// Deletes up to [`PRUNE_STEP_ROWS`] of the oldest direct messages older than the inbox age
/// limit (their conversation and inbox entries went before them). The newest row always stays,
/// so `seq` numbers are never reused. Returns whether nothing more is left to delete.
fn prune_direct_messages(tx: &Transaction<'_>, job: &PruneJob) -> rusqlite::Result<bool> {
    let age = job.retention.inbox_max_age;
    if age.is_zero() {
        return Ok(true);
    }
    let limit = job.now_ms.saturating_sub(age.as_millis() as u64) as i64;
    let cut: Option<i64> = tx
        .prepare_cached(
            "SELECT max(seq) FROM (SELECT seq, ts FROM direct_messages
             WHERE seq < (SELECT max(seq) FROM direct_messages) ORDER BY seq LIMIT ?1)
             WHERE ts < ?2",
        )?
        .query_row(params![PRUNE_STEP_ROWS as i64, limit], |row| row.get(0))?;
    let Some(cut) = cut else {
        return Ok(true);
    };
    let deleted = tx
        .prepare_cached("DELETE FROM direct_messages WHERE seq <= ?1")?
        .execute([cut])? as u64;
    Ok(deleted < PRUNE_STEP_ROWS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: i64) -> StreamState {
        StreamState {
            id,
            epoch: String::new(),
            last: 0,
            acked: 0,
            lowest_device_mark: None,
            used: 0,
        }
    }

    #[test]
    fn the_writer_lingers_only_after_a_batch_of_several_and_never_past_the_spacing() {
        // A single command last time: the writer keeps up, a new message is taken at once.
        assert_eq!(linger(0, Duration::ZERO), None);
        assert_eq!(linger(1, Duration::from_micros(100)), None);
        // Under load: wait out the rest of the spacing, and nothing once it has passed.
        assert_eq!(
            linger(40, Duration::from_micros(500)),
            Some(COMMIT_SPACING - Duration::from_micros(500))
        );
        assert_eq!(linger(40, COMMIT_SPACING), None);
        assert_eq!(linger(40, COMMIT_SPACING * 2), None);
    }

    #[test]
    fn past_its_bound_the_stream_cache_keeps_the_most_recently_used_streams() {
        let mut streams = Streams::default();
        for id in 0..10 {
            streams.batch += 1;
            streams.insert(format!("c/{id}"), state(id));
        }
        // A stream touched again is recent, whenever it was created.
        let first = streams.slots["c/0"];
        streams.states[first].used = streams.batch;
        streams.keep_recent(4);
        assert_eq!(streams.slots.len(), 4);
        assert_eq!(streams.states.len(), 4, "no state left without its name");
        let mut kept: Vec<i64> = streams
            .slots
            .values()
            .map(|slot| streams.states[*slot].id)
            .collect();
        kept.sort_unstable();
        assert_eq!(kept, [0, 7, 8, 9]);
    }

    #[test]
    fn states_of_pruned_streams_go_with_the_next_trim() {
        let mut streams = Streams::default();
        for id in 0..3 {
            streams.insert(format!("c/{id}"), state(id));
        }
        streams.slots.remove("c/1");
        streams.keep_recent(10);
        assert_eq!(streams.states.len(), 2);
    }
}
