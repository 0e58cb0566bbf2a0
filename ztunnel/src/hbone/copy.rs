//! Splicing a tunnel to a TCP connection.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::H2Stream;

/// Per-direction copy buffer. Bigger than tokio's 8 KiB default so one read fills an HBONE
/// DATA frame (256 KiB) and a TCP segment train: fewer syscalls, frames and TLS writes per
/// byte. Measured with `cargo xtask bench` on 2 cores against 64 KiB: ztunnel CPU per GB
/// carried −10–14 % (1 stream), new connections/s unchanged, RSS with 1,000 idle
/// connections +6 MiB (pages are touched only as data flows).
const COPY_BUFFER: usize = 256 * 1024;

/// Copies both ways until both directions finish. When one side ends its writes (EOF), the
/// other side is shut down for writing (TCP FIN / HTTP/2 END_STREAM) and the opposite
/// direction keeps flowing: a half-close, as TCP applications expect.
/// Returns (bytes a→b, bytes b→a).
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}

/// Below this much free space the read buffer is replaced rather than grown: the frozen
/// chunks handed to HTTP/2 still share the old one until they are sent.
const MIN_READ_SPACE: usize = 16 * 1024;

/// [`copy_bidirectional`] between a TCP-like stream and a tunnel, without the copy in
/// between: bytes read from `tcp` go to HTTP/2 as the very buffer they were read into, and
/// received DATA frames are written to `tcp` straight from h2's buffers. Same half-close
/// semantics. Returns (bytes tcp→tunnel, bytes tunnel→tcp).
pub async fn relay_tunnel<T>(tcp: T, tunnel: H2Stream) -> io::Result<(u64, u64)>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut send, mut recv) = tunnel.into_halves();
    let (mut r, mut w) = tokio::io::split(tcp);
    let to_tunnel = async {
        let mut buf = BytesMut::with_capacity(COPY_BUFFER);
        let mut total = 0u64;
        loop {
            if buf.capacity() < MIN_READ_SPACE {
                buf = BytesMut::with_capacity(COPY_BUFFER);
            }
            let n = r.read_buf(&mut buf).await?;
            if n == 0 {
                send.finish()?;
                return Ok::<_, io::Error>(total);
            }
            total += n as u64;
            send.send_all(buf.split().freeze()).await?;
        }
    };
    let from_tunnel = async {
        let mut total = 0u64;
        while let Some(data) = recv.next().await? {
            w.write_all(&data).await?;
            recv.release(data.len());
            total += data.len() as u64;
        }
        w.shutdown().await?;
        Ok(total)
    };
    tokio::try_join!(to_tunnel, from_tunnel)
}
