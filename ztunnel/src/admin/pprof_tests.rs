//! The profile endpoints in process: a real (short) CPU profile decoded as pprof's
//! protobuf, the parameters' bounds, one profile at a time, the heap's 501.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use pprof::protos::Message;

use super::*;

fn req(query: &[(&str, &str)]) -> Req {
    Req {
        method: hyper::Method::GET,
        path: "/debug/pprof/profile".into(),
        query: query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: Bytes::new(),
    }
}

async fn body(r: Response<Body>) -> Bytes {
    r.into_body().collect().await.unwrap().to_bytes()
}

/// Keeps a core busy until dropped, so the profile has samples to show.
struct Spin(Arc<AtomicBool>);

impl Spin {
    fn start() -> Spin {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut x = 0u64;
            while !s.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        });
        Spin(stop)
    }
}

impl Drop for Spin {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_profile_is_a_pprof_protobuf_with_samples() {
    let _spin = Spin::start();
    let started = Instant::now();
    let r = cpu(&req(&[("seconds", "1"), ("frequency", "250")])).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let bytes = body(r).await;
    let took = started.elapsed();
    let p = pprof::protos::Profile::decode(&bytes[..]).expect("a pprof protobuf");
    assert!(!p.sample_type.is_empty(), "{p:?}");
    assert!(!p.sample.is_empty(), "no samples in 1 s of a busy thread");
    assert!(!p.function.is_empty() && !p.string_table.is_empty());
    assert_eq!(p.period, 1_000_000_000 / 250, "period in ns at 250 Hz");
    let hits: i64 = p.sample.iter().map(|s| s.value[0]).sum();
    eprintln!(
        "CPU profile: {} bytes, {} stacks, {hits} samples, {} functions, {took:?}",
        bytes.len(),
        p.sample.len(),
        p.function.len()
    );
}

#[tokio::test]
async fn bad_parameters_are_refused_with_the_range() {
    for (k, v) in [
        ("seconds", "0"),
        ("seconds", "301"),
        ("seconds", "ten"),
        ("frequency", "0"),
        ("frequency", "1001"),
    ] {
        let r = cpu(&req(&[(k, v)])).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{k}={v}");
        let text = String::from_utf8(body(r).await.to_vec()).unwrap();
        assert!(text.contains(&format!("invalid {k}")), "{text}");
    }
}

#[tokio::test]
async fn one_profile_at_a_time() {
    // The CPU profile test may hold the profiler: wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        if let Some(b) = Busy::claim() {
            break b;
        }
        assert!(Instant::now() < deadline, "the profiler stays busy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = cpu(&req(&[("seconds", "1")])).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    drop(held);
    assert!(Busy::claim().is_some(), "free again once done");
}

#[cfg(not(feature = "heap-profiling"))]
#[tokio::test]
async fn without_jemalloc_the_heap_profile_says_why_it_is_missing() {
    for toggle in [false, true] {
        let r = heap(&req(&[]), toggle).await;
        assert_eq!(r.status(), StatusCode::NOT_IMPLEMENTED);
        let text = String::from_utf8(body(r).await.to_vec()).unwrap();
        assert!(
            text.contains("jemalloc") && text.contains("glibc"),
            "{text}"
        );
    }
}

#[cfg(feature = "heap-profiling")]
#[tokio::test]
async fn a_heap_profile_is_a_gzipped_pprof_protobuf() {
    use std::io::Read;
    let before = heap(&req(&[]), false).await;
    assert_eq!(before.status(), StatusCode::CONFLICT, "not active yet");
    let r = heap(&req(&[("activate", "true")]), true).await;
    assert_eq!(body(r).await, "heap profiling active: true\n");
    // Something for the sampler to see: 64 MiB in 1 MiB blocks, kept while dumping.
    let kept: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 1 << 20]).collect();
    let started = Instant::now();
    let r = heap(&req(&[]), false).await;
    assert_eq!(r.status(), StatusCode::OK);
    let gz = body(r).await;
    let took = started.elapsed();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .expect("gzip");
    let p = pprof::protos::Profile::decode(&raw[..]).expect("a pprof protobuf");
    let types: Vec<&str> = p
        .sample_type
        .iter()
        .map(|t| p.string_table[t.ty as usize].as_str())
        .collect();
    assert!(types.contains(&"inuse_space"), "{types:?}");
    assert!(!p.sample.is_empty(), "64 MiB allocated, nothing sampled");
    eprintln!(
        "heap profile: {} bytes gzipped, {} samples, {took:?}",
        gz.len(),
        p.sample.len()
    );
    drop(kept);
    let r = heap(&req(&[("activate", "false")]), true).await;
    assert_eq!(body(r).await, "heap profiling active: false\n");
}
