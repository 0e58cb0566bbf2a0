//! One HBONE stream as a byte stream: tokio `AsyncRead` + `AsyncWrite` over an HTTP/2
//! send/receive pair.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes asked of the send window per write: large enough to fill a frame or a few,
/// small enough not to make one writer hog the connection window.
const WRITE_CHUNK: usize = 256 * 1024;

pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Data received but not yet read by the user. Its flow-control capacity is released
    /// only as the user reads it, so a slow reader pushes back on its own stream only.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    /// Kept alive as long as the stream (e.g. the pool's count of active streams).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            _guard: None,
        }
    }

    /// Attaches a value dropped together with the stream.
    pub fn with_guard(mut self, guard: Box<dyn Send + Sync>) -> Self {
        self._guard = Some(guard);
        self
    }

    /// Aborts the stream (RST_STREAM), e.g. when the upstream connection failed.
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().expect("is_io");
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => {
                    // A reset with NO_ERROR after the peer finished is a normal close.
                    if e.reason() == Some(Reason::NO_ERROR) {
                        this.read_eof = true;
                        continue;
                    }
                    return Poll::Ready(Err(h2_to_io(e)));
                }
                None => this.read_eof = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        // Give the window back for exactly what the user consumed.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stream shut down",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(poll_send_capacity(&mut this.send, cx, buf.len()))?;
        let n = this.send.capacity().min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes queued frames out; there is nothing to wait for here.
        Poll::Ready(Ok(()))
    }

    /// Half-close: END_STREAM on our side, the peer may keep sending.
    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.write_closed {
            this.write_closed = true;
            this.send.reserve_capacity(0);
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Waits until `send` may carry at least one byte of a `want`-byte write (asking for up to
/// [`WRITE_CHUNK`]), failing if the peer reset the stream meanwhile.
fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    send.reserve_capacity(want.min(WRITE_CHUNK));
    loop {
        if send.capacity() > 0 {
            // Capacity may be granted yet the peer may have reset us meanwhile.
            if let Poll::Ready(r) = send.poll_reset(cx) {
                return Poll::Ready(Err(match r {
                    Ok(reason) => io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("stream reset by peer: {reason}"),
                    ),
                    Err(e) => h2_to_io(e),
                }));
            }
            return Poll::Ready(Ok(send.capacity()));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            None => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "stream closed",
                )))
            }
        }
    }
}

/// The sending half of a tunnel, for relays that hand over whole buffers (no copy).
pub struct SendHalf {
    send: SendStream<Bytes>,
    _guard: Option<Box<dyn Send + Sync>>,
}

/// The receiving half of a tunnel, yielding the received buffers themselves.
pub struct RecvHalf {
    recv: RecvStream,
}

impl H2Stream {
    /// Splits the stream so each direction can be driven on its own with whole buffers.
    /// Data already buffered by `poll_read` must have been consumed.
    pub fn into_halves(self) -> (SendHalf, RecvHalf) {
        debug_assert!(self.pending.is_empty());
        (
            SendHalf {
                send: self.send,
                _guard: self._guard,
            },
            RecvHalf { recv: self.recv },
        )
    }
}

impl SendHalf {
    /// Sends all of `data` as DATA frames, waiting for flow-control capacity.
    pub async fn send_all(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            let want = data.len();
            let cap =
                std::future::poll_fn(|cx| poll_send_capacity(&mut self.send, cx, want)).await?;
            let chunk = data.split_to(cap.min(data.len()));
            self.send.send_data(chunk, false).map_err(h2_to_io)?;
        }
        Ok(())
    }

    /// Half-close: END_STREAM.
    pub fn finish(&mut self) -> io::Result<()> {
        self.send.reserve_capacity(0);
        self.send.send_data(Bytes::new(), true).map_err(h2_to_io)
    }
}

impl RecvHalf {
    /// The next received buffer; `None` at the end of the stream. Its flow-control
    /// capacity stays taken until [`release`](Self::release).
    pub async fn next(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match std::future::poll_fn(|cx| self.recv.poll_data(cx)).await {
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => return Ok(Some(data)),
                // A reset with NO_ERROR after the peer finished is a normal close.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Ok(None),
                Some(Err(e)) => return Err(h2_to_io(e)),
                None => return Ok(None),
            }
        }
    }

    /// Returns `n` consumed bytes to the peer's send window.
    pub fn release(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }
}
