//! How a session answers its requests: at once (a large reply within the connection's byte
//! budget), or, for stored messages, queued in order until each commits, with a retry answered
//! by its first attempt's ack.

use std::future::Future;
use std::time::Instant;

use herald_protocol::{Ack, ErrorCode, ErrorEvent, Payload, ProtocolError, ServerEvent};

use super::Session;
use crate::delivery::{OutFrame, Outgoing};
use crate::engine::EngineError;
use crate::hub::ConnHandle;
use crate::idempotency::{Claim, Recorder, Target};

/// Most stored messages one connection may have waiting for their commit; past this the
/// reader stops reading until one commits.
const MAX_PIPELINED: usize = 256;

impl Session {
    /// True while stored messages wait for their commit.
    pub fn is_committing(&self) -> bool {
        !self.committing.is_empty()
    }

    /// Whether the reader may take another request: not while [`MAX_PIPELINED`] messages wait.
    pub fn may_read(&self) -> bool {
        self.committing.len() < MAX_PIPELINED
    }

    /// Waits for the oldest queued message to commit and answers it. Messages commit in the
    /// order they were queued, so waiting on the oldest is waiting on the next.
    pub async fn next_commit(&mut self) {
        if let Some(answer) = self.committing.front_mut() {
            answer.await;
            self.committing.pop_front();
        }
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
                Err(error) if error.limit_exceeded => answer_error(
                    &handle,
                    ProtocolError::new(ErrorCode::LimitExceeded, error.message, id),
                ),
                Err(error) => answer_error(&handle, internal(error, &id)),
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

pub(super) fn internal(error: EngineError, id: &Option<String>) -> ProtocolError {
    tracing::error!(%error, "engine failure while serving a request");
    ProtocolError::new(
        ErrorCode::Internal,
        "the server could not complete the request",
        id.clone(),
    )
}
