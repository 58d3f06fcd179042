//! The accept loop and graceful shutdown.
//!
//! `run` takes a bound listener and a shutdown future (the seams tests use). Each accepted
//! socket is served by hyper in its own tracked task, with a deadline on the request head; the
//! accept loop never awaits a handshake. On shutdown the listener closes, every WebSocket gets
//! Close 1001 from its own writer, and `run` waits (at most `server.shutdown_grace`) for the
//! connection tasks to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::http;
use crate::node::Node;

/// Pending connections the kernel may queue: tokio's default of 128 stalls connection storms.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the server socket with a deep accept queue.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

pub async fn run(listener: TcpListener, node: Arc<Node>, shutdown: impl Future<Output = ()>) {
    let router = http::app(node.clone());
    let http_tasks = TaskTracker::new();
    let handshake_timeout = node.config.server.handshake_timeout;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Handlers see the peer address (per-IP limits) through axum's `ConnectInfo`.
        let router = router.clone();
        let service = service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request)
        });
        let stop = node.shutdown.clone();
        http_tasks.spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    tracing::info!(
        connections = node.hub.connection_count(),
        "shutting down: closing every connection with 1001"
    );
    node.shutdown.cancel();
    node.tasks.close();
    http_tasks.close();
    let grace = node.config.server.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        node.tasks.wait().await;
        http_tasks.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            "shutdown grace period over; dropping remaining connections"
        );
    }
}
