//! How a script's request reaches Redis: sent at once, in call order, and completed in a task
//! of its own; and which failures a retry can help.

use std::task::Poll;

use futures::FutureExt;
use futures::future::BoxFuture;
use redis::{ScriptInvocation, Value};
use tokio::sync::OwnedSemaphorePermit;

use super::{Connection, RedisStore};
use crate::engine::store::{Committing, OnCommit, StoreError};

impl RedisStore {
    pub(super) async fn start(
        &self,
        invocation: ScriptInvocation<'static>,
    ) -> BoxFuture<'static, redis::RedisResult<Value>> {
        start(&self.connection, invocation).await
    }
}

/// Runs the rest of an append (waiting for Redis's replies) in a task of its own, which holds
/// the append's place in the queue until Redis has answered, then calls `then`. Tied to the
/// caller's polling instead, a caller waiting for room in the queue while it holds unpolled
/// appends (a pipelining session) would never free it.
pub(super) fn spawned(permit: OwnedSemaphorePermit, work: Committing, then: OnCommit) {
    tokio::spawn(async move {
        let result = work.await;
        drop(permit);
        then.call(result);
    });
}

/// Sends a script's request now: see [`started`].
pub(super) async fn start(
    connection: &Connection,
    invocation: ScriptInvocation<'static>,
) -> BoxFuture<'static, redis::RedisResult<Value>> {
    let mut connection = connection.clone();
    started(async move { invocation.invoke_async(&mut connection).await }.boxed()).await
}

/// Polls `future` once, here, and hands it back to be awaited later. A Redis request enters
/// the connection's queue at its first poll (the queue never fills: see `PIPELINE_BUFFER` in
/// `engine/redis/mod.rs`), and a lock's waiter its fair queue, so what is started in call
/// order reaches Redis in call order, while the caller decides when to wait for the replies. That first poll runs outside tokio's cooperative
/// budget: once a task has spent it, channels and locks answer `Pending` without queueing,
/// and the request would be queued at a later poll, out of order.
pub(super) async fn started<T: Send + 'static>(
    mut future: BoxFuture<'static, T>,
) -> BoxFuture<'static, T> {
    let first = tokio::task::unconstrained(futures::future::poll_fn(|cx| {
        Poll::Ready(future.as_mut().poll(cx))
    }))
    .await;
    match first {
        Poll::Ready(output) => futures::future::ready(output).boxed(),
        Poll::Pending => future,
    }
}

/// A failed command: `Unavailable` when the connection or a timeout caused it (the write may
/// or may not have happened; a retry of a direct message is safe), `Backend` otherwise.
pub(super) fn failed(operation: &'static str) -> impl Fn(redis::RedisError) -> StoreError {
    move |error| {
        let temporary = error.is_io_error()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_cluster_error();
        if temporary {
            StoreError::Unavailable {
                operation,
                reason: error.to_string(),
            }
        } else {
            StoreError::Backend {
                operation,
                reason: error.to_string(),
            }
        }
    }
}
