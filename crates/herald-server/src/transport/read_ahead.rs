//! [`ReadAhead`]: the socket under yawc, read in full even when yawc's buffer has little room.
//!
//! yawc's read buffer is small ([`super::READ_BUFFER_BYTES`], for idle memory) and is consumed a
//! frame at a time, each frame's payload keeping its part of the allocation. Once most of it
//! is consumed, a read can only fill the few bytes left, and the rest of the frame takes
//! another `recvfrom`: under load a third of 78-byte frames took two (1.35 system calls per
//! message, against 1.0 for node's `ws`). Below [`DIRECT_READ_ROOM`] bytes of room this reads
//! into a stack buffer instead, hands on what fits, and keeps the rest for the next read,
//! which the caller makes at once to finish its frame. The kept bytes live only between two
//! reads of a busy connection: an idle one holds nothing more.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Room in the caller's buffer from which the socket is read straight into it: a buffer grown
/// for a large frame is filled directly.
const DIRECT_READ_ROOM: usize = 1024;

/// The most one read through the stack buffer takes from the socket.
const READ_AHEAD_BYTES: usize = 4096;

pub struct ReadAhead<S> {
    inner: S,
    /// Bytes read from the socket that the caller had no room for, from `kept_from` on.
    kept: Vec<u8>,
    kept_from: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            kept: Vec::new(),
            kept_from: 0,
        }
    }

    /// Hands on kept bytes, as many as fit; the allocation goes once they are all handed on.
    fn hand_on_kept(&mut self, buf: &mut ReadBuf<'_>) {
        let kept = &self.kept[self.kept_from..];
        let taken = kept.len().min(buf.remaining());
        buf.put_slice(&kept[..taken]);
        self.kept_from += taken;
        if self.kept_from == self.kept.len() {
            self.kept = Vec::new();
            self.kept_from = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.kept_from < this.kept.len() {
            this.hand_on_kept(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 || buf.remaining() >= DIRECT_READ_ROOM {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let mut ahead = [MaybeUninit::<u8>::uninit(); READ_AHEAD_BYTES];
        let mut ahead = ReadBuf::uninit(&mut ahead);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut ahead))?;
        let read = ahead.filled();
        let fits = read.len().min(buf.remaining());
        buf.put_slice(&read[..fits]);
        if fits < read.len() {
            this.kept = read[fits..].to_vec();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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

    fn read_with_room(stream: &mut ReadAhead<CountingSocket>, room: usize) -> Vec<u8> {
        let mut storage = vec![0u8; room];
        let mut buf = ReadBuf::new(&mut storage);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let polled = Pin::new(stream).poll_read(&mut cx, &mut buf);
        assert!(matches!(polled, Poll::Ready(Ok(()))));
        buf.filled().to_vec()
    }

    #[test]
    fn a_frame_read_into_little_room_takes_one_read_of_the_socket() {
        let frame: Vec<u8> = (0..78).collect();
        let mut stream = ReadAhead::new(CountingSocket {
            pending: frame.clone(),
            reads: 0,
        });
        let mut received = read_with_room(&mut stream, 22);
        received.extend(read_with_room(&mut stream, 256));
        assert_eq!(received, frame);
        assert_eq!(stream.inner.reads, 1);
        assert!(stream.kept.capacity() == 0, "nothing kept once handed on");
    }

    #[test]
    fn bytes_come_out_in_order_whatever_the_room() {
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let mut stream = ReadAhead::new(CountingSocket {
            pending: sent.clone(),
            reads: 0,
        });
        let mut received = Vec::new();
        for room in [1, 7, 22, 100, 255, 1023, 1024, 5000, 3].iter().cycle() {
            if received.len() == sent.len() {
                break;
            }
            received.extend(read_with_room(&mut stream, *room));
        }
        assert_eq!(received, sent);
    }

    #[test]
    fn a_large_room_is_read_into_directly() {
        let mut stream = ReadAhead::new(CountingSocket {
            pending: vec![7; 3000],
            reads: 0,
        });
        assert_eq!(read_with_room(&mut stream, 2048).len(), 2048);
        assert_eq!(stream.kept.len(), 0);
    }
}
