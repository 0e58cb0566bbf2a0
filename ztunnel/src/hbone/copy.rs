//! Splicing a tunnel to a TCP connection.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

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
