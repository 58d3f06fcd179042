//! How a session answers its requests: at once (a large reply within the connection's byte
//! budget), or, for stored messages, queued in order until each commits, with a retry answered
//! by its first attempt's ack; stored messages without `id`, which get no answer, are only
//! counted.

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Instant;

use futures::task::AtomicWaker;

use herald_protocol::{Ack, ErrorCode, ErrorEvent, Payload, ProtocolError, ServerEvent};

use super::Session;
use crate::delivery::{OutFrame, Outgoing};
use crate::engine::EngineError;
use crate::hub::ConnHandle;
use crate::idempotency::{Claim, Recorder, Target};

/// Most stored messages one connection may have waiting for their commit; past this the
/// reader stops reading until one commits.
const MAX_PIPELINED: usize = 256;

/// Stored messages sent without `id`, still committing. Such a request gets no ack, so the
/// session only counts them and their commits do not wake it (a wake and a poll of the whole
/// connection per message). The store reports each outcome here, from its side; a failure is
/// answered from there, with an error frame.
pub(super) struct Unanswered {
    handle: ConnHandle,
    in_flight: AtomicUsize,
    /// The session's task while it waits for the count to fall.
    waiting: AtomicWaker,
}

impl Unanswered {
    fn settle(&self, outcome: Result<(), EngineError>) {
        if let Err(error) = outcome {
            answer_failure(&self.handle, error, None);
        }
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.waiting.wake();
    }

    fn count(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl Session {
    /// True while stored messages with an answer to send wait for their commit.
    pub fn is_answering(&self) -> bool {
        !self.committing.is_empty()
    }

    /// Whether the reader may take another request: not while [`MAX_PIPELINED`] messages wait.
    pub fn may_read(&self) -> bool {
        self.committing.len() + self.unanswered_count() < MAX_PIPELINED
    }

    /// Waits for the oldest queued answer and sends it; with none queued, for one of the
    /// unanswered messages to commit. Messages commit in the order they were queued, so waiting
    /// on the oldest is waiting on the next.
    pub async fn next_commit(&mut self) {
        if let Some(answer) = self.committing.front_mut() {
            answer.await;
            self.committing.pop_front();
            return;
        }
        let in_flight = self.unanswered_count();
        if in_flight > 0 {
            // Boxed, as it is rare: every idle connection's future holds this one's state
            // (`an_idle_connection_future_fits_its_memory_budget`).
            Box::pin(self.unanswered_below(in_flight)).await;
        }
    }

    /// Waits until every stored message queued so far has committed, and sends their answers.
    pub async fn all_committed(&mut self) {
        while let Some(answer) = self.committing.front_mut() {
            answer.await;
            self.committing.pop_front();
        }
        self.unanswered_below(1).await;
    }

    /// What the store calls with the outcome of a stored message sent without `id` (see
    /// [`Unanswered`]), counted from now.
    pub(super) fn unanswered(&mut self) -> impl FnOnce(Result<(), EngineError>) + Send + 'static {
        let handle = &self.handle;
        let unanswered = self
            .unanswered
            .get_or_insert_with(|| {
                Arc::new(Unanswered {
                    handle: handle.clone(),
                    in_flight: AtomicUsize::new(0),
                    waiting: AtomicWaker::new(),
                })
            })
            .clone();
        unanswered.in_flight.fetch_add(1, Ordering::AcqRel);
        move |outcome| unanswered.settle(outcome)
    }

    fn unanswered_count(&self) -> usize {
        self.unanswered
            .as_ref()
            .map_or(0, |unanswered| unanswered.count())
    }

    async fn unanswered_below(&mut self, count: usize) {
        let Some(unanswered) = &self.unanswered else {
            return;
        };
        poll_fn(|cx| {
            if unanswered.count() < count {
                return Poll::Ready(());
            }
            unanswered.waiting.register(cx.waker());
            if unanswered.count() < count {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Queues the answer to a stored message's request: `ack` once it has committed (when the
    /// request has an `id`, also remembered for retries), or the error. Answered in order by
    /// [`next_commit`](Self::next_commit).
    pub(super) fn answer_when_committed<T>(
        &mut self,
        committing: impl Future<Output = Result<T, EngineError>> + Send + 'static,
        id: Option<String>,
        recorder: Option<Recorder>,
        ack: impl FnOnce(T) -> Ack + Send + 'static,
    ) {
        let handle = self.handle.clone();
        self.committing.push_back(Box::pin(async move {
            match committing.await {
                Ok(done) => {
                    if let Some(reference) = id {
                        let mut ack = ack(done);
                        if let Some(recorder) = recorder {
                            recorder.record(&ack);
                        }
                        ack.reference = Some(reference);
                        answer(&handle, &ServerEvent::Ack(ack));
                    }
                }
                Err(error) => answer_failure(&handle, error, id),
            }
        }));
    }

    /// Looks a stored message's request up among the recent ones. A retry is answered (in
    /// order, like the others) with the first attempt's ack and yields `Err`; a new request
    /// yields what records its ack.
    pub(super) fn claim(
        &mut self,
        id: &Option<String>,
        kind: &str,
        target: Target<'_>,
        content: &Payload,
    ) -> Result<Option<Recorder>, ()> {
        let Some(reference) = id else {
            return Ok(None);
        };
        let claim =
            self.node
                .idempotency()
                .claim(&self.identity.user, reference, kind, target, content);
        match claim {
            None => Ok(None),
            Some(Claim::New(recorder)) => Ok(Some(recorder)),
            Some(Claim::Retry(mut first)) => {
                let handle = self.handle.clone();
                let reference = reference.clone();
                self.committing.push_back(Box::pin(async move {
                    let ack = first
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|a| a.clone());
                    match ack {
                        Some(mut ack) => {
                            ack.reference = Some(reference);
                            answer(&handle, &ServerEvent::Ack(ack));
                        }
                        None => answer_error(
                            &handle,
                            ProtocolError::new(
                                ErrorCode::Internal,
                                "the first attempt with this id failed: send it again",
                                Some(reference),
                            ),
                        ),
                    }
                }));
                Err(())
            }
        }
    }

    pub(super) fn reply(&self, event: &ServerEvent) {
        answer(&self.handle, event);
    }

    /// Answers a request whose reply may be large (a page of `history`, the `members` of a big
    /// room). One larger than the connection's whole byte budget (`limits.send_queue_bytes`)
    /// is refused with `limit_exceeded`; one larger than what is left waits for the writer to
    /// make room, up to `limits.write_timeout`, then the connection is cut off as a slow
    /// consumer, as a full outbox is.
    pub(super) async fn reply_within_budget(&mut self, event: &ServerEvent) {
        let frame = event.encode();
        let budget = self.handle.byte_budget();
        if frame.len() > budget {
            let reference = match event {
                ServerEvent::History(history) => history.reference.clone(),
                ServerEvent::Members(members) => members.reference.clone(),
                _ => None,
            };
            self.reply_error(ProtocolError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the reply would be {} bytes, over limits.send_queue_bytes ({budget}); \
                     ask for less (a smaller \"limit\")",
                    frame.len()
                ),
                reference,
            ));
            return;
        }
        let outgoing = Outgoing::single(OutFrame::Text(frame), Instant::now());
        self.handle
            .send(outgoing, self.node.config().limits.write_timeout)
            .await;
    }

    pub(super) fn reply_error(&self, error: ProtocolError) {
        answer_error(&self.handle, error);
    }
}

fn answer(handle: &ConnHandle, event: &ServerEvent) {
    handle.offer(OutFrame::Text(event.encode()));
}

fn answer_error(handle: &ConnHandle, error: ProtocolError) {
    metrics::counter!("herald_request_errors_total", "code" => error.code.as_str()).increment(1);
    answer(
        handle,
        &ServerEvent::Error(ErrorEvent {
            code: error.code,
            message: error.message,
            reference: error.id,
        }),
    );
}

/// Answers a stored message that failed: a full inbox as `limit_exceeded`, anything else as
/// `internal`.
fn answer_failure(handle: &ConnHandle, error: EngineError, id: Option<String>) {
    let error = if error.limit_exceeded {
        ProtocolError::new(ErrorCode::LimitExceeded, error.message, id)
    } else {
        internal(error, &id)
    };
    answer_error(handle, error);
}

pub(super) fn internal(error: EngineError, id: &Option<String>) -> ProtocolError {
    tracing::error!(%error, "engine failure while serving a request");
    ProtocolError::new(
        ErrorCode::Internal,
        "the server could not complete the request",
        id.clone(),
    )
}
