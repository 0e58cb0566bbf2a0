//! A read-ahead buffer for the socket under TLS that exists only once it is worth having:
//! during the handshake reads go straight to the socket, and the [`READ_AHEAD`] buffer is
//! allocated when the handshake is done. A peer that opens connections and never finishes
//! a handshake (or never starts one) so costs no buffer.
//!
//! [`READ_AHEAD`]: super::READ_AHEAD

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct ReadAhead<IO> {
    io: IO,
    /// Empty until [`enable`](Self::enable).
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
}

impl<IO: std::fmt::Debug> std::fmt::Debug for ReadAhead<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("io", &self.io)
            .field("capacity", &self.buf.len())
            .field("buffered", &(self.filled - self.pos))
            .finish()
    }
}

impl<IO> ReadAhead<IO> {
    /// Unbuffered for now.
    pub fn new(io: IO) -> Self {
        ReadAhead {
            io,
            buf: Box::default(),
            pos: 0,
            filled: 0,
        }
    }

    /// From now on, reads take in up to `capacity` bytes at a time.
    pub fn enable(&mut self, capacity: usize) {
        if self.buf.is_empty() {
            self.buf = vec![0; capacity].into_boxed_slice();
        }
    }

    /// The buffer's size (0 until enabled).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadAhead<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.filled {
            // Nothing buffered: a read as large as the buffer (or no buffer yet) goes
            // straight to the socket.
            if this.buf.is_empty() || out.remaining() >= this.buf.len() {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            let mut fill = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut fill))?;
            this.filled = fill.filled().len();
            this.pos = 0;
        }
        let n = (this.filled - this.pos).min(out.remaining());
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadAhead<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn unbuffered_until_enabled_then_buffered_and_lossless() {
        let (mut w, r) = tokio::io::duplex(1 << 16);
        let mut ra = ReadAhead::new(r);
        assert_eq!(ra.capacity(), 0, "no buffer before the handshake");
        let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        w.write_all(&data[..100]).await.unwrap();
        let mut first = [0u8; 10];
        ra.read_exact(&mut first).await.unwrap();
        ra.enable(4096);
        assert_eq!(ra.capacity(), 4096);
        w.write_all(&data[100..]).await.unwrap();
        drop(w);
        let mut rest = Vec::new();
        let mut small = [0u8; 7];
        loop {
            let n = ra.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&small[..n]);
        }
        assert_eq!(&first[..], &data[..10]);
        assert_eq!(rest, &data[10..]);
    }
}
