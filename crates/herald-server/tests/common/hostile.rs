//! A WebSocket client that writes whatever bytes a test wants: frames built by hand (any
//! opcode, reserved bits, masked or not, any length), written in any pieces, and the server's
//! frames read back one by one. What a hostile client sends, without a library that refuses to.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::EVENT_TIMEOUT;

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// The first header byte: FIN, RSV1-3 and the opcode.
pub const FIN: u8 = 0x80;
pub const RSV1: u8 = 0x40;

/// The masking key of every masked frame built here (RFC 6455 §5.3 allows any).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame: `first` is the whole first header byte (FIN, reserved bits, opcode).
pub fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => out.push(mask_bit | len as u8),
        len @ 126..=65535 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A whole masked message of one frame.
pub fn message(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(FIN | opcode, payload, true)
}

/// A masked Close frame with a code and a reason.
pub fn close(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    message(CLOSE, &payload)
}

/// A frame from the server: the first header byte and the payload.
#[derive(Debug)]
pub struct ServerFrame {
    pub first: u8,
    pub payload: Vec<u8>,
}

impl ServerFrame {
    pub fn opcode(&self) -> u8 {
        self.first & 0x0F
    }

    /// The code of a Close frame (1005 when it has none).
    pub fn close_code(&self) -> u16 {
        match self.payload.as_slice() {
            [high, low, ..] => u16::from_be_bytes([*high, *low]),
            _ => 1005,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A TCP connection that has completed the WebSocket handshake, and nothing more.
pub struct RawSocket {
    pub stream: TcpStream,
}

impl RawSocket {
    /// Opens `path_and_query` (e.g. `/ws?token=…`) and checks for 101 Switching Protocols.
    pub async fn connect(addr: SocketAddr, path_and_query: &str) -> RawSocket {
        Self::connect_with_headers(addr, path_and_query, "").await
    }

    /// Like [`connect`](Self::connect) with extra header lines (each ending in `\r\n`).
    pub async fn connect_with_headers(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &str,
    ) -> RawSocket {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        stream
            .write_all(upgrade_request(addr, path_and_query, headers).as_bytes())
            .await
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        // Byte by byte, so not one byte of the first frame is taken with the response head.
        while !head.ends_with(b"\r\n\r\n") {
            tokio::time::timeout(EVENT_TIMEOUT, stream.read_exact(&mut byte))
                .await
                .expect("timed out waiting for the handshake response")
                .expect("the handshake response");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        RawSocket { stream }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Writes `bytes` in pieces of `piece` bytes, each its own write (and TCP segment).
    pub async fn send_in_pieces(&mut self, bytes: &[u8], piece: usize) -> std::io::Result<()> {
        for chunk in bytes.chunks(piece) {
            self.stream.write_all(chunk).await?;
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// The next frame from the server, or `None` once the connection has ended.
    pub async fn read_frame(&mut self) -> Option<ServerFrame> {
        tokio::time::timeout(EVENT_TIMEOUT, self.read_frame_untimed())
            .await
            .expect("timed out waiting for a frame from the server")
    }

    async fn read_frame_untimed(&mut self) -> Option<ServerFrame> {
        read_frame_from(&mut self.stream).await
    }

    /// Reads until the server's Close frame and returns its code; `None` if the connection
    /// ended without one.
    pub async fn close_code(&mut self) -> Option<u16> {
        tokio::time::timeout(EVENT_TIMEOUT, close_code_from(&mut self.stream))
            .await
            .expect("timed out waiting for the server's Close")
    }

    /// Writes `bytes` while reading, and returns the code of the server's Close. Reading all
    /// along matters when the server closes before it has read everything: the kernel then
    /// resets the connection, and a Close still unread on this side would be lost with it.
    pub async fn close_code_while_sending(&mut self, bytes: &[u8]) -> Option<u16> {
        let (mut reader, mut writer) = self.stream.split();
        let sending = async {
            // A write failing once the server has closed is expected.
            let _ = writer.write_all(bytes).await;
            std::future::pending::<()>().await
        };
        tokio::time::timeout(EVENT_TIMEOUT, async {
            tokio::select! {
                code = close_code_from(&mut reader) => code,
                () = sending => unreachable!(),
            }
        })
        .await
        .expect("timed out waiting for the server's Close")
    }

    /// Reads until a text frame that satisfies `wanted`.
    pub async fn text_matching(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        loop {
            let frame = self.read_frame().await.expect("connection ended");
            if frame.opcode() == TEXT && wanted(&frame.text()) {
                return frame.text();
            }
            assert_ne!(frame.opcode(), CLOSE, "closed with {}", frame.close_code());
        }
    }
}

async fn read_frame_from<R: AsyncRead + Unpin>(stream: &mut R) -> Option<ServerFrame> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.ok()?;
    assert_eq!(head[1] & 0x80, 0, "the server masked a frame");
    let len = match head[1] & 0x7F {
        126 => {
            let mut extended = [0u8; 2];
            stream.read_exact(&mut extended).await.ok()?;
            u64::from(u16::from_be_bytes(extended))
        }
        127 => {
            let mut extended = [0u8; 8];
            stream.read_exact(&mut extended).await.ok()?;
            u64::from_be_bytes(extended)
        }
        short => u64::from(short),
    };
    let mut payload = vec![0u8; usize::try_from(len).unwrap()];
    stream.read_exact(&mut payload).await.ok()?;
    Some(ServerFrame {
        first: head[0],
        payload,
    })
}

async fn close_code_from<R: AsyncRead + Unpin>(stream: &mut R) -> Option<u16> {
    while let Some(frame) = read_frame_from(stream).await {
        if frame.opcode() == CLOSE {
            return Some(frame.close_code());
        }
    }
    None
}

/// The HTTP request that opens a WebSocket.
pub fn upgrade_request(addr: SocketAddr, path_and_query: &str, headers: &str) -> String {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{headers}\r\n"
    )
}
