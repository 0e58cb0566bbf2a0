//! The HBONE server (`hbone::serve_connection`) fed arbitrary bytes as the client side of
//! the connection, over an in-memory duplex: what an authenticated but hostile mesh peer
//! can send after the mTLS handshake.
//!
//! Oracle: no panic, and the server finishes once the client has sent everything and
//! closed its side (a server that keeps waiting is a hang). Memory is bounded by
//! libFuzzer's `-rss_limit_mb`. The same inputs are replayed by the unit test
//! `hbone::bad_input_tests::fuzz_corpus_replays` — keep the two in step.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncWriteExt, DuplexStream};
use ztunnel::hbone::{serve_connection, InboundRequest};
use ztunnel::identity::Identity;

/// Far longer than any input of a few KiB takes; reaching it means the server waits for
/// something that will never come.
const HANG_LIMIT: Duration = Duration::from_secs(5);
/// Large enough that neither side blocks on the pipe for typical input sizes.
const PIPE_BYTES: usize = 64 * 1024;

thread_local! {
    // One runtime for all runs: building one per input would dominate the run time.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.with(|rt| rt.block_on(run(data)));
});

async fn run(data: &[u8]) {
    let (client, server) = tokio::io::duplex(PIPE_BYTES);
    let peer = Identity::new("cluster.local", "default", "fuzz");
    // Dropping the request answers it 503: the handler's decision is not under test here.
    let serve = serve_connection(server, peer, |req: InboundRequest| async move { drop(req) });
    let session = async { tokio::join!(send_then_close(client, data), serve) };
    if tokio::time::timeout(HANG_LIMIT, session).await.is_err() {
        panic!("HBONE server still running {HANG_LIMIT:?} after the client closed: hang");
    }
}

/// Writes `data`, closes the write side, and reads (and drops) everything the server
/// answers until it closes: an unread answer would block the server's writes.
async fn send_then_close(client: DuplexStream, data: &[u8]) {
    let (mut rd, mut wr) = tokio::io::split(client);
    let write = async {
        // The server may close first (e.g. a bad preface): the write then fails, fine.
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
    };
    let mut sink = tokio::io::sink();
    let drain = tokio::io::copy(&mut rd, &mut sink);
    let _ = tokio::join!(write, drain);
}
