//! The node's life after start: retention passes, draining and shutdown, readiness.

use super::*;

impl Node {
    /// Runs one retention pass now (the background task runs one every
    /// `store.prune_interval`).
    pub async fn prune(&self) -> Result<PruneReport, EngineError> {
        let report = self
            .store
            .prune(self.config.store.retention(), unix_millis())
            .await?;
        metrics::counter!("herald_store_pruned_total").increment(report.total());
        if report.total() > 0 {
            tracing::debug!(?report, "retention pass");
        }
        self.pruned.send_replace(report);
        Ok(report)
    }

    /// The last retention pass's report, updated after every pass.
    pub fn pruned(&self) -> watch::Receiver<PruneReport> {
        self.pruned.subscribe()
    }

    /// Stops the background tasks, sends the pending presence diffs (the connections' leaves
    /// among them), then flushes and closes the store, removes this node's presence entries
    /// and closes the broker. Called once the connections are gone. In that order, a retention
    /// pass never meets a closed store, and the last diffs still have engines to go through.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.background.close();
        self.background.wait().await;
        self.presence_window.close().await;
        self.store.close().await;
        self.presence.close().await;
        self.broker.close().await;
    }

    /// Begins shutdown: every connection is asked to close with 1001 (reconnect elsewhere).
    /// Connections registering meanwhile are refused with the same code (see `attach`), and
    /// those still authenticating watch [`Node::shutdown`] themselves.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
        for handle in self.hub.snapshot() {
            handle.close(CloseReason::Send(CloseCode::GOING_AWAY));
        }
    }

    /// Marks the node as shutting down: it stays up, but `/ready` fails.
    pub fn start_draining(&self) {
        self.draining.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled() || self.shutdown.is_cancelled()
    }

    /// Resolves once shutdown has begun.
    pub async fn draining(&self) {
        self.draining.cancelled().await;
    }

    /// Whether every engine answers and the node is not shutting down.
    pub async fn ready(&self) -> bool {
        !self.is_draining()
            && self.broker.ready().await
            && self.presence.ready().await
            && self.store.ready().await
    }
}

/// Runs a retention pass every `interval` until shutdown; a pass under way when shutdown
/// begins is abandoned (the next start prunes what it left).
pub(super) async fn prune_periodically(
    node: std::sync::Weak<Node>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: let the server start first.
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(node) = node.upgrade() else { return };
        let pass = tokio::select! {
            _ = shutdown.cancelled() => return,
            pass = node.prune() => pass,
        };
        if let Err(error) = pass {
            tracing::warn!(%error, "retention pass failed");
        }
    }
}
