//! The accept loop and graceful shutdown.
//!
//! `run` (plain) and `run_tls` take a bound listener and a shutdown future (the seams tests
//! use). Each accepted socket is served by hyper in its own tracked task, with a deadline on the
//! TLS handshake and on the request head; the accept loop never awaits a handshake. On
//! shutdown `/ready` starts answering 503; after `server.shutdown_delay` the listener closes,
//! every WebSocket gets Close 1001 from its own writer, and `run` waits (at most
//! `server.shutdown_grace`) for the connection tasks to finish, then closes the node's store.
//!
//! Open sockets are capped (`server.max_sockets`): the accept loop takes a permit before it
//! accepts, and the permit travels with the socket (into hyper, then into the upgraded
//! WebSocket's task), so it is returned when the socket closes, whatever it turned into. At the
//! cap the loop waits and the kernel's accept queue holds newcomers; the server never runs out
//! of file descriptors for the store or for sockets already open.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::http;
use crate::node::Node;
use crate::tls::ServerTls;

/// Pending connections the kernel may queue: tokio's default of 128 stalls connection storms.
const LISTEN_BACKLOG: u32 = 4096;

/// File descriptors kept free for everything but sockets (the store, logs, certificates) when
/// `server.max_sockets` is derived from the open-file limit.
const RESERVED_FDS: u64 = 64;

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
            .watch(node.config().tls.watch_interval, node.shutdown().clone()),
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
    let handshake_timeout = node.config().server.handshake_timeout;
    let shutdown_delay = node.config().server.shutdown_delay;
    let sockets = Arc::new(Semaphore::new(max_sockets(
        node.config().server.max_sockets,
    )));
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
            accepted = accept(&listener, &sockets) => accepted,
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
        let router = router.clone();
        let stop = node.shutdown().clone();
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
        connections = node.hub().connection_count(),
        "shutting down: closing every connection with 1001"
    );
    node.shut_down();
    node.tasks().close();
    http_tasks.close();
    let grace = node.config().server.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        node.tasks().wait().await;
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

/// The socket cap: `configured`, or with 0 the open-file limit less [`RESERVED_FDS`].
fn max_sockets(configured: usize) -> usize {
    let limit = if configured > 0 {
        configured
    } else {
        match rlimit::Resource::NOFILE.get() {
            Ok((soft, _)) => {
                usize::try_from(soft.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX)
            }
            Err(error) => {
                tracing::warn!(%error, "open-file limit unknown; sockets are not capped");
                usize::MAX
            }
        }
    };
    limit.clamp(1, Semaphore::MAX_PERMITS)
}

/// Waits for room under the socket cap, then accepts one connection holding that room.
async fn accept(
    listener: &TcpListener,
    sockets: &Arc<Semaphore>,
) -> io::Result<(Counted<TcpStream>, SocketAddr)> {
    let Ok(permit) = sockets.clone().acquire_owned().await else {
        // The semaphore is never closed.
        return std::future::pending().await;
    };
    let (stream, peer) = listener.accept().await?;
    let _ = stream.set_nodelay(true);
    Ok((
        Counted {
            io: stream,
            _permit: permit,
        },
        peer,
    ))
}

/// A socket holding its place under `server.max_sockets` until it is dropped.
struct Counted<I> {
    io: I,
    _permit: OwnedSemaphorePermit,
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
