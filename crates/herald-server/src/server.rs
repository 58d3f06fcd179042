//! The accept loop and graceful shutdown.
//!
//! `run` (plain) and `run_tls` take a bound listener and a shutdown future (the seams tests
//! use). Each accepted socket is served by hyper in its own tracked task, with a deadline on the
//! TLS handshake and on the request head; the accept loop never awaits a handshake. On
//! shutdown `/ready` starts answering 503; after `server.shutdown_delay` the listener closes,
//! every WebSocket gets Close 1001 from its own writer, and `run` waits (at most
//! `server.shutdown_grace`) for the connection tasks to finish, then closes the node's store.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::http;
use crate::node::Node;
use crate::tls::ServerTls;

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

/// Serves plain HTTP and WebSocket on `listener` until `shutdown` resolves.
pub async fn run(listener: TcpListener, node: Arc<Node>, shutdown: impl Future<Output = ()>) {
    serve(listener, node, None, shutdown).await;
}

/// Serves HTTPS and secure WebSocket on `listener` until `shutdown` resolves, reloading the
/// certificate on SIGHUP and when its files change.
pub async fn run_tls(
    listener: TcpListener,
    node: Arc<Node>,
    tls: Arc<ServerTls>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::spawn(
        tls.clone()
            .watch(node.config.tls.watch_interval, node.shutdown.clone()),
    );
    serve(listener, node, Some(tls), shutdown).await;
}

async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl Future<Output = ()>,
) {
    let router = http::app(node.clone());
    let http_tasks = TaskTracker::new();
    let handshake_timeout = node.config.server.handshake_timeout;
    let shutdown_delay = node.config.server.shutdown_delay;
    // Set once shutdown begins with a delay: the listener stays open until then.
    let mut draining_until: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown, if draining_until.is_none() => {
                node.start_draining();
                if shutdown_delay.is_zero() {
                    break;
                }
                tracing::info!(
                    ?shutdown_delay,
                    "shutting down: /ready answers 503 while load balancers catch up"
                );
                draining_until = Some(Instant::now() + shutdown_delay);
                continue;
            }
            _ = sleep_until_some(draining_until) => break,
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
        let router = router.clone();
        let stop = node.shutdown.clone();
        let tls = tls.clone();
        http_tasks.spawn(async move {
            match tls {
                None => serve_http(stream, router, peer, handshake_timeout, stop).await,
                Some(tls) => {
                    // The TLS handshake runs here, in the connection's own task, under the
                    // same deadline as the request head: a slow client stalls only itself.
                    let accepted =
                        tokio::time::timeout(handshake_timeout, tls.acceptor().accept(stream))
                            .await;
                    match accepted {
                        Ok(Ok(stream)) => {
                            serve_http(stream, router, peer, handshake_timeout, stop).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!(
        connections = node.hub.connection_count(),
        "shutting down: closing every connection with 1001"
    );
    node.shut_down();
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
    node.close().await;
}

/// Serves HTTP/1.1 (with upgrades) on one connection until it ends or the node stops.
async fn serve_http<I>(
    io: I,
    router: Router,
    peer: SocketAddr,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Handlers see the peer address (per-IP limits) through axum's `ConnectInfo`.
    let service = service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().oneshot(request)
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
