//! Opening a scenario's connections: at most `setup_concurrency` handshakes at once (a burst of
//! thousands overflows accept queues and measures SYN retries, not the server), each connection
//! authenticated and in its rooms before it reports in. Once set up, each connection's task goes
//! on serving it until the run's stop token fires.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Run, RunError};
use crate::client::ClientError;

/// Frames a sending connection may have queued before the pacer counts a client backlog.
const SEND_QUEUE: usize = 1024;

/// One connection to open: who it is, which endpoint it connects to, which rooms it joins.
pub struct ConnPlan {
    pub user: String,
    /// Index into the run's endpoints.
    pub endpoint: usize,
    pub rooms: Vec<String>,
}

pub struct Established {
    /// Each connection's send queue, by connection index.
    pub queues: Vec<mpsc::Sender<String>>,
    pub opened: usize,
    /// Connections that could not be set up, with why.
    pub failed: Vec<(usize, ClientError)>,
    pub seconds: f64,
    /// The connection tasks; they end after the stop token fires.
    pub tasks: JoinSet<()>,
}

pub async fn establish_all(
    run: &Run,
    plans: Vec<ConnPlan>,
    stop: &CancellationToken,
) -> Result<Established, RunError> {
    let started = Instant::now();
    let total = plans.len();
    let permits = Arc::new(Semaphore::new(run.options.setup_concurrency.max(1)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    let mut queues = Vec::with_capacity(total);
    for (index, plan) in plans.into_iter().enumerate() {
        let token = run.tokens.mint(&plan.user)?;
        let (queue, outgoing) = mpsc::channel(SEND_QUEUE);
        queues.push(queue);
        let env = run.env.clone();
        let permits = permits.clone();
        let done = done_tx.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let permit = permits.acquire_owned().await;
            let setup = async {
                let mut socket = env.open_ready(plan.endpoint, index as u64, &token).await?;
                env.join_rooms(&mut socket, index, &plan.rooms).await?;
                Ok::<_, ClientError>(socket)
            };
            let setup = tokio::select! {
                setup = setup => setup,
                _ = stop.cancelled() => return,
            };
            drop(permit);
            match setup {
                Ok(socket) => {
                    let _ = done.send((index, None));
                    drop(done);
                    env.serve(socket, index, outgoing, stop).await;
                }
                Err(error) => {
                    let _ = done.send((index, Some(error)));
                }
            }
        });
    }
    drop(done_tx);
    let mut opened = 0;
    let mut failed = Vec::new();
    // Every task reports exactly once; the serving ones keep running after that.
    while opened + failed.len() < total {
        let Some((index, error)) = done_rx.recv().await else {
            break;
        };
        match error {
            None => opened += 1,
            Some(error) => failed.push((index, error)),
        }
        let reported = opened + failed.len();
        if reported % 500 == 0 || reported == total {
            run.progress.phase(format!(
                "setting up {reported}/{total} connections ({} failed)",
                failed.len()
            ));
        }
    }
    Ok(Established {
        queues,
        opened,
        failed,
        seconds: started.elapsed().as_secs_f64(),
        tasks,
    })
}

/// Stops every connection task and waits (briefly) for their Close frames to go out.
pub async fn close_all(stop: &CancellationToken, mut tasks: JoinSet<()>) {
    stop.cancel();
    let drained = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
}
