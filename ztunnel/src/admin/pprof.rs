//! Profiles on the admin port, where Istio's ztunnel serves them and in Go's pprof
//! protobuf, so `go tool pprof http://localhost:15000/debug/pprof/profile` works as it
//! does against upstream.
//!
//! - `/debug/pprof/profile?seconds=N&frequency=HZ`: a CPU profile of the whole process
//!   (every thread, sampled on `SIGPROF`), `seconds` 1-300 (default 10), `frequency`
//!   1-1000 Hz (default 100, Go's rate: higher rates lose samples when many threads are
//!   busy, as the signals coalesce). One at a time: the profiler is process-wide.
//! - `/debug/pprof/heap`: the live heap as jemalloc's sampling profiler saw it (gzipped
//!   pprof protobuf), in builds with the `heap-profiling` feature, once
//!   `/debug/pprof/heap/profiling?activate=true` started sampling (allocations made
//!   before are not in it; `?activate=false` stops; no parameter says whether it runs).
//!   Default builds allocate with glibc's malloc, which has no such profiler, and both
//!   paths answer 501 saying so.

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

/// A query parameter in `range`, `default` when absent; else why it is refused.
fn param<T>(
    req: &Req,
    name: &str,
    range: std::ops::RangeInclusive<T>,
    default: T,
) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Some(v) = req.param(name) else {
        return Ok(default);
    };
    match v.parse::<T>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "invalid {name} {v:?}: expected an integer from {} to {}\n",
            range.start(),
            range.end()
        )),
    }
}

/// `GET /debug/pprof/profile`.
pub async fn cpu(req: &Req) -> Response<Body> {
    let params = param(req, "seconds", SECONDS, DEFAULT_SECONDS)
        .and_then(|s| param(req, "frequency", FREQUENCY, DEFAULT_FREQUENCY).map(|f| (s, f)));
    let (seconds, frequency) = match params {
        Ok(p) => p,
        Err(why) => return text(StatusCode::BAD_REQUEST, why),
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
#[cfg(not(feature = "heap-profiling"))]
pub const NO_HEAP: &str = "heap profiling is not available in this build: heap profiles \
come from jemalloc's sampling profiler (as in Istio's ztunnel), and this build allocates \
with glibc's malloc, which has none; build with `--features heap-profiling` to have it\n";

/// `GET /debug/pprof/heap` and `/debug/pprof/heap/profiling`.
#[cfg(not(feature = "heap-profiling"))]
pub async fn heap(_req: &Req, _toggle: bool) -> Response<Body> {
    text(StatusCode::NOT_IMPLEMENTED, NO_HEAP)
}

/// `GET /debug/pprof/heap` (`toggle` false): the sampled live heap; and
/// `/debug/pprof/heap/profiling` (`toggle` true): `?activate=true|false` starts or stops
/// sampling, and says whether it runs.
#[cfg(feature = "heap-profiling")]
pub async fn heap(req: &Req, toggle: bool) -> Response<Body> {
    let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
        // jemalloc was built with its profiler but did not enable it (malloc_conf).
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "jemalloc's heap profiler is not enabled in this process\n",
        );
    };
    let mut ctl = ctl.clone().lock_owned().await;
    if toggle {
        let changed = match req.param("activate") {
            None => Ok(()),
            Some("true") => ctl.activate(),
            Some("false") => ctl.deactivate(),
            Some(v) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("invalid activate {v:?}: expected true or false\n"),
                )
            }
        };
        return match changed {
            Ok(()) => text(
                StatusCode::OK,
                format!("heap profiling active: {}\n", ctl.activated()),
            ),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        };
    }
    if !ctl.activated() {
        return text(
            StatusCode::CONFLICT,
            "heap profiling is not active: start it with \
             /debug/pprof/heap/profiling?activate=true, then take the profile\n",
        );
    }
    // Dumping writes, reads and symbolizes jemalloc's dump file: off the runtime's thread
    // (the admin endpoint shares the control plane's).
    let dumped = tokio::task::spawn_blocking(move || ctl.dump_pprof())
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")));
    match dumped {
        // Gzipped, as Go serves heap profiles (the body is the .pb.gz file, not an
        // encoding of the transfer).
        Ok(body) => Response::builder()
            .header("content-type", "application/octet-stream")
            .header("content-disposition", "attachment; filename=\"heap.pb.gz\"")
            .body(Full::new(Bytes::from(body)))
            .expect("valid response"),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("heap profile failed: {e:#}\n"),
        ),
    }
}

#[cfg(test)]
#[path = "pprof_tests.rs"]
mod tests;
