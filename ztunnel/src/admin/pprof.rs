//! Profiles on the admin port, where Istio's ztunnel serves them and in Go's pprof
//! protobuf, so `go tool pprof http://localhost:15000/debug/pprof/profile` works as it
//! does against upstream.
//!
//! - `/debug/pprof/profile?seconds=N&frequency=HZ`: a CPU profile of the whole process
//!   (every thread, sampled on `SIGPROF`), `seconds` 1-300 (default 10), `frequency`
//!   1-1000 Hz (default 100, Go's rate: higher rates lose samples when many threads are
//!   busy, as the signals coalesce). One at a time: the profiler is process-wide.
//! - `/debug/pprof/heap`: not available (501, saying why): heap profiles come from
//!   jemalloc's sampling profiler, and this build allocates with glibc's malloc, whose
//!   arenas `--malloc-trim-interval` hands back to the node (`memory.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use super::http::{text, Body, Req};

pub const SECONDS: std::ops::RangeInclusive<u64> = 1..=300;
pub const DEFAULT_SECONDS: u64 = 10;
pub const FREQUENCY: std::ops::RangeInclusive<i32> = 1..=1000;
pub const DEFAULT_FREQUENCY: i32 = 100;

/// Set while a CPU profile is being taken.
static PROFILING: AtomicBool = AtomicBool::new(false);

/// Cleared when the profile is done, however it ends.
struct Busy;

impl Busy {
    fn claim() -> Option<Busy> {
        (!PROFILING.swap(true, Ordering::AcqRel)).then_some(Busy)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        PROFILING.store(false, Ordering::Release);
    }
}

/// A query parameter in `range`, `default` when absent; else the 400 to send.
fn param<T>(
    req: &Req,
    name: &str,
    range: std::ops::RangeInclusive<T>,
    default: T,
) -> Result<T, Response<Body>>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Some(v) = req.param(name) else {
        return Ok(default);
    };
    match v.parse::<T>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(text(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid {name} {v:?}: expected an integer from {} to {}\n",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// `GET /debug/pprof/profile`.
pub async fn cpu(req: &Req) -> Response<Body> {
    let seconds = match param(req, "seconds", SECONDS, DEFAULT_SECONDS) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let frequency = match param(req, "frequency", FREQUENCY, DEFAULT_FREQUENCY) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let Some(busy) = Busy::claim() else {
        return text(
            StatusCode::CONFLICT,
            "a CPU profile is being taken already; try again when it is done\n",
        );
    };
    // The profiler's guard is not meant to cross threads: it lives on a blocking thread
    // for the profile's length, away from the runtime's workers.
    let taken = tokio::task::spawn_blocking(move || {
        let _busy = busy;
        profile(Duration::from_secs(seconds), frequency)
    })
    .await;
    match taken {
        Ok(Ok(body)) => Response::builder()
            .header("content-type", "application/octet-stream")
            .header("content-disposition", "attachment; filename=\"profile\"")
            .body(Full::new(Bytes::from(body)))
            .expect("valid response"),
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CPU profile failed: {e}\n"),
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CPU profile failed: {e}\n"),
        ),
    }
}

/// Samples every thread for `length`, then encodes the profile (pprof protobuf).
fn profile(length: Duration, frequency: i32) -> Result<Vec<u8>, pprof::Error> {
    use pprof::protos::Message;
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(frequency)
        // Unwinding from a signal handler through these can deadlock (pprof-rs's advice).
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()?;
    std::thread::sleep(length);
    let profile = guard.report().build()?.pprof()?;
    let mut body = Vec::with_capacity(profile.encoded_len());
    profile
        .encode(&mut body)
        .map_err(|e| pprof::Error::IoError(std::io::Error::other(e)))?;
    Ok(body)
}

/// Why there is no heap profile in this build.
pub const NO_HEAP: &str = "heap profiling is not available in this build: heap profiles \
come from jemalloc's sampling profiler (as in Istio's ztunnel), and ztunnel allocates with \
glibc's malloc, which has none (its free memory is handed back to the node with \
malloc_trim, --malloc-trim-interval)\n";

/// `GET /debug/pprof/heap`.
pub fn heap() -> Response<Body> {
    text(StatusCode::NOT_IMPLEMENTED, NO_HEAP)
}

#[cfg(test)]
#[path = "pprof_tests.rs"]
mod tests;
