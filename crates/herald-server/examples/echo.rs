//! Echo server for the Autobahn conformance run (`docs/conformance.md`): every text and binary
//! message comes back unchanged, on any path.
//!
//! It goes through Herald's own transport, so the run tests what Herald's clients get: the same
//! upgrade and permessage-deflate negotiation, the same control-frame guard, codec and
//! buffers. Two settings differ from `herald serve`, as the suite needs: messages up to 16 MiB,
//! and no Ping frames (a server Ping in the middle of a case breaks the case's expectations).
//!
//! ```text
//! cargo run --release -p herald-server --example echo -- --listen 127.0.0.1:9001
//! /work/shared/conformance/run.sh ws://127.0.0.1:9001/
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use clap::Parser;
use futures::{SinkExt, StreamExt};
use herald_server::config::CompressionConfig;
use herald_server::transport::{self, Socket};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use yawc::{Frame, OpCode};

/// The largest message the suite sends (case group 9).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Echo server on Herald's WebSocket transport, for the Autobahn TestSuite.
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Decline permessage-deflate (the suite then reports 12.* and 13.* as unimplemented).
    #[arg(long)]
    no_deflate: bool,
    /// Messages under this many bytes are sent uncompressed.
    #[arg(long, default_value_t = CompressionConfig::default().threshold)]
    threshold: usize,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let compression = CompressionConfig {
        enabled: !args.no_deflate,
        threshold: args.threshold,
        ..CompressionConfig::default()
    };
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!("echo listening on ws://{}/", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let compression = compression.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, compression.clone()));
            let served = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
            if let Err(error) = served {
                eprintln!("connection: {error}");
            }
        });
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    mut request: Request<Incoming>,
    compression: CompressionConfig,
) -> Result<Response<Body>, Infallible> {
    let options = transport::server_options(MAX_MESSAGE_BYTES, &compression);
    match transport::upgrade(&mut request, options) {
        Ok((response, socket)) => {
            tokio::spawn(async move {
                match socket.await {
                    Ok(socket) => echo(socket).await,
                    Err(error) => eprintln!("upgrade: {error}"),
                }
            });
            Ok(response.map(|body| body.boxed()))
        }
        Err(error) => Ok(Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::from(format!("not a WebSocket upgrade: {error}\n")).boxed())
            .unwrap_or_default()),
    }
}

/// Sends every message back as it came; the library answers Ping and Close on its own.
async fn echo(mut socket: Socket) {
    while let Some(frame) = socket.next().await {
        let reply = match frame.opcode() {
            OpCode::Text => Frame::text(frame.into_payload()),
            OpCode::Binary => Frame::binary(frame.into_payload()),
            _ => continue,
        };
        if socket.send(reply.into()).await.is_err() {
            break;
        }
    }
    let _ = socket.close().await;
}
