use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::*;
use crate::identity::ca::CaOptions;

/// Wraps the local CA: counts calls, can fail the first `fail_first` calls or every call
/// after `succeed_only` successes, and can be slow.
struct TestCa {
    inner: LocalCaClient,
    calls: AtomicUsize,
    fail_first: usize,
    succeed_only: usize,
    delay: Duration,
}

impl TestCa {
    fn new(ttl: Duration) -> Self {
        let mut opts = CaOptions::new("cluster.local");
        opts.max_ttl = ttl;
        opts.backdate = Duration::ZERO;
        TestCa {
            inner: LocalCaClient::new(Arc::new(CertificateAuthority::new(opts).unwrap())),
            calls: AtomicUsize::new(0),
            fail_first: 0,
            succeed_only: usize::MAX,
            delay: Duration::ZERO,
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl CaClient for TestCa {
    async fn sign(
        &self,
        csr_pem: String,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaClientError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if n < self.fail_first || n >= self.fail_first.saturating_add(self.succeed_only) {
            return Err(CaClientError::Unavailable(format!("injected failure #{n}")));
        }
        self.inner.sign(csr_pem, identity, ttl).await
    }
}

fn fast_opts() -> SecretManagerOptions {
    SecretManagerOptions {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..Default::default()
    }
}

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa)
}

async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn concurrent_first_fetches_share_one_request() {
    let mut ca = TestCa::new(Duration::from_secs(3600));
    ca.delay = Duration::from_millis(100);
    let ca = Arc::new(ca);
    let mgr = SecretManager::new(ca.clone(), fast_opts());
    let fetches = (0..20).map(|_| {
        let mgr = mgr.clone();
        tokio::spawn(async move { mgr.fetch(&id("a")).await })
    });
    let certs: Vec<_> = futures::future::join_all(fetches)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(ca.calls(), 1);
    assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
    assert_eq!(certs[0].identity, id("a"));
    // Cached afterwards.
    mgr.fetch(&id("a")).await.unwrap();
    assert_eq!(ca.calls(), 1);
    let snap = mgr.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].state, CertState::Ready);
}

#[tokio::test]
async fn rotates_before_expiry() {
    let ca = Arc::new(TestCa::new(Duration::from_secs(3)));
    let mgr = SecretManager::new(ca.clone(), fast_opts());
    let first = mgr.fetch(&id("a")).await.unwrap();
    let mut second = first.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Arc::ptr_eq(&first, &second) {
        assert!(Instant::now() < deadline, "no rotation");
        tokio::time::sleep(Duration::from_millis(20)).await;
        second = mgr
            .fetch(&id("a"))
            .await
            .expect("a valid cert is always available");
    }
    // The renewal arrived while the first certificate was still valid.
    assert!(SystemTime::now() < first.not_after + Duration::from_millis(50));
    assert_ne!(first.serial(), second.serial());
    assert!(second.not_after >= first.not_after);
    assert!(ca.calls() >= 2);
}

#[tokio::test]
async fn retries_until_ca_recovers() {
    let mut ca = TestCa::new(Duration::from_secs(3600));
    ca.fail_first = 3;
    let ca = Arc::new(ca);
    let mgr = SecretManager::new(ca.clone(), fast_opts());
    // The first request fails: the caller hears about it instead of hanging.
    let err = mgr.fetch(&id("a")).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    let mut got = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.is_none() {
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
        got = mgr.fetch(&id("a")).await.ok();
    }
    assert_eq!(ca.calls(), 4);
    assert_eq!(mgr.snapshot()[0].state, CertState::Ready);
}

/// `ztunnel_ca_requests{result}` counts each request sent to the CA, failures apart.
#[tokio::test]
async fn ca_requests_are_counted_by_result() {
    let metrics = crate::metrics::Metrics::new();
    let mut ca = TestCa::new(Duration::from_secs(3600));
    ca.fail_first = 2;
    let ca = Arc::new(ca);
    let opts = SecretManagerOptions {
        ca_requests: metrics.ca_requests.clone(),
        ..fast_opts()
    };
    let mgr = SecretManager::new(ca.clone(), opts);
    let count = |result: &str| {
        metrics
            .ca_requests
            .get_or_create(&crate::metrics::ResultLabels {
                result: result.into(),
            })
            .get()
    };
    mgr.prefetch(&id("a"));
    eventually("a certificate after two failures", || count("ok") == 1).await;
    mgr.fetch(&id("a")).await.unwrap();
    assert_eq!((count("ok"), count("error")), (1, 2));
    assert_eq!(ca.calls(), 3);
    let text = metrics.encode();
    assert!(
        text.contains("ztunnel_ca_requests_total{result=\"error\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn forget_stops_rotation() {
    let ca = Arc::new(TestCa::new(Duration::from_secs(2)));
    let mgr = SecretManager::new(ca.clone(), fast_opts());
    mgr.fetch(&id("a")).await.unwrap();
    mgr.prefetch(&id("b"));
    eventually("b issued", || ca.calls() == 2).await;
    mgr.forget(&id("a"));
    mgr.forget(&id("b"));
    assert!(mgr.snapshot().is_empty());
    // Past the point where both would have rotated: no further CA calls.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ca.calls(), 2);
    // A later use starts afresh.
    mgr.fetch(&id("a")).await.unwrap();
    assert_eq!(ca.calls(), 3);
}

#[tokio::test]
async fn serves_cached_cert_while_ca_fails_but_never_an_expired_one() {
    let mut ca = TestCa::new(Duration::from_secs(3));
    ca.succeed_only = 1;
    let ca = Arc::new(ca);
    let mgr = SecretManager::new(ca.clone(), fast_opts());
    let first = mgr.fetch(&id("a")).await.unwrap();
    eventually("a failed renewal", || ca.calls() >= 2).await;
    // Renewal is failing, but the current certificate is still good: keep serving it.
    let before_expiry = first.not_after - Duration::from_millis(300);
    if SystemTime::now() < before_expiry {
        let again = mgr.fetch(&id("a")).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_ne!(mgr.snapshot()[0].state, CertState::Ready);
    }
    let wait = first
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    let err = mgr.fetch(&id("a")).await.unwrap_err();
    assert!(matches!(err, Error::Expired { .. }), "{err}");
    assert_eq!(mgr.snapshot()[0].state, CertState::Expired);
}

#[tokio::test]
async fn rotation_delay_is_jittered_around_half_life() {
    let ca = CertificateAuthority::new(CaOptions::new("cluster.local")).unwrap();
    let cert = ca
        .issue_workload_cert(&id("a"), Duration::from_secs(1000))
        .unwrap();
    let opts = SecretManagerOptions::default();
    let delays: Vec<f64> = (0..50)
        .map(|_| rotation_delay(&cert, &opts).as_secs_f64())
        .collect();
    assert!(
        delays.iter().all(|d| (390.0..=601.0).contains(d)),
        "{delays:?}"
    );
    assert!(
        delays.iter().any(|d| (d - delays[0]).abs() > 1.0),
        "no jitter"
    );
}
