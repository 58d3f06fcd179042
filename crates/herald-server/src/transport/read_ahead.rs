//! [`ReadAhead`]: the socket under yawc read in full, even when yawc's buffer has little room.
//!
//! yawc's read buffer is small ([`super::READ_BUFFER_BYTES`], for idle memory) and is consumed a
//! frame at a time, each frame's payload keeping its part of the allocation. Once most of it
//! is consumed, a read can only fill the few bytes left, and the rest of the frame takes
//! another `recvfrom`: under load a third of 78-byte frames took two (1.35 system calls per
//! message, against 1.0 for node's `ws`). Below [`DIRECT_READ_ROOM`] bytes of room the socket
//! is read into a stack buffer instead, what fits is handed on, and the rest kept for the next read,
//! which the caller makes at once to finish its frame. The kept bytes live only between two
//! reads of a busy connection: an idle one holds nothing more.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};

/// Room in the caller's buffer from which the socket is read straight into it: a buffer grown
/// for a large frame is filled directly.
const DIRECT_READ_ROOM: usize = 1024;

/// The most one read through the stack buffer takes from the socket.
const READ_AHEAD_BYTES: usize = 4096;

/// The bytes read ahead of the caller, kept by the stream that reads through it
/// ([`super::ControlFrameGuard`]). One pointer while nothing is kept: it sits in every
/// connection's socket, whose allocation 32 bytes more moved to the next size class (idle
/// memory 4.18–4.20 → 4.40 KiB per connection).
#[derive(Default)]
pub(super) struct ReadAhead {
    kept: Option<Box<Kept>>,
}

/// Bytes read from the socket that the caller had no room for, from `from` on.
struct Kept {
    bytes: Vec<u8>,
    from: usize,
}

impl ReadAhead {
    /// Reads `inner` into `buf`: from what was kept, else straight into `buf` when it has
    /// room, else through a stack buffer, keeping what does not fit.
    pub(super) fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        inner: &mut S,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(kept) = &mut self.kept {
            let taken = (kept.bytes.len() - kept.from).min(buf.remaining());
            buf.put_slice(&kept.bytes[kept.from..kept.from + taken]);
            kept.from += taken;
            if kept.from == kept.bytes.len() {
                self.kept = None;
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 || buf.remaining() >= DIRECT_READ_ROOM {
            return Pin::new(inner).poll_read(cx, buf);
        }
        let mut ahead = [MaybeUninit::<u8>::uninit(); READ_AHEAD_BYTES];
        let mut ahead = ReadBuf::uninit(&mut ahead);
        ready!(Pin::new(inner).poll_read(cx, &mut ahead))?;
        let read = ahead.filled();
        let fits = read.len().min(buf.remaining());
        buf.put_slice(&read[..fits]);
        if fits < read.len() {
            self.kept = Some(Box::new(Kept {
                bytes: read[fits..].to_vec(),
                from: 0,
            }));
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that holds `pending` bytes and counts the reads made of it.
    struct CountingSocket {
        pending: Vec<u8>,
        reads: usize,
    }

    impl AsyncRead for CountingSocket {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            let taken = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending[..taken]);
            self.pending.drain(..taken);
            Poll::Ready(Ok(()))
        }
    }

    fn read_with_room(ahead: &mut ReadAhead, socket: &mut CountingSocket, room: usize) -> Vec<u8> {
        let mut storage = vec![0u8; room];
        let mut buf = ReadBuf::new(&mut storage);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let polled = ahead.poll_read(socket, &mut cx, &mut buf);
        assert!(matches!(polled, Poll::Ready(Ok(()))));
        buf.filled().to_vec()
    }

    #[test]
    fn a_frame_read_into_little_room_takes_one_read_of_the_socket() {
        let frame: Vec<u8> = (0..78).collect();
        let mut socket = CountingSocket {
            pending: frame.clone(),
            reads: 0,
        };
        let mut ahead = ReadAhead::default();
        let mut received = read_with_room(&mut ahead, &mut socket, 22);
        received.extend(read_with_room(&mut ahead, &mut socket, 256));
        assert_eq!(received, frame);
        assert_eq!(socket.reads, 1);
        assert!(ahead.kept.is_none(), "nothing kept once handed on");
    }

    #[test]
    fn bytes_come_out_in_order_whatever_the_room() {
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let mut socket = CountingSocket {
            pending: sent.clone(),
            reads: 0,
        };
        let mut ahead = ReadAhead::default();
        let mut received = Vec::new();
        for room in [1, 7, 22, 100, 255, 1023, 1024, 5000, 3].iter().cycle() {
            if received.len() == sent.len() {
                break;
            }
            received.extend(read_with_room(&mut ahead, &mut socket, *room));
        }
        assert_eq!(received, sent);
    }

    #[test]
    fn a_large_room_is_read_into_directly() {
        let mut socket = CountingSocket {
            pending: vec![7; 3000],
            reads: 0,
        };
        let mut ahead = ReadAhead::default();
        assert_eq!(read_with_room(&mut ahead, &mut socket, 2048).len(), 2048);
        assert!(ahead.kept.is_none());
    }
}
