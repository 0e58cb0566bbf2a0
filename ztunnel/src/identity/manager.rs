//! The node's Citadel Agent: fetches, caches and rotates the certificates of the workloads
//! on this node.
//!
//! Each identity in use has one background task that owns its lifecycle: request a
//! certificate, publish it, sleep until about half its lifetime (with jitter, so a node's
//! workloads don't all hit the CA at once), renew; on CA failure retry with exponential
//! backoff while the previous certificate keeps being served until it expires. Callers
//! observe the task through a `watch` channel, so concurrent first uses share one CA request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::ca::{CaError, CertificateAuthority};
use super::cert::{unix_seconds, WorkloadCertificate};
use super::{csr, Identity};
use crate::metrics::ResultLabels;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CaClientError {
    /// The CA answered and said no (bad CSR, identity not allowed...).
    #[error("CA rejected the request: {0}")]
    Rejected(String),
    /// The CA could not be reached or failed internally.
    #[error("CA unavailable: {0}")]
    Unavailable(String),
}

impl From<CaError> for CaClientError {
    fn from(e: CaError) -> Self {
        match e {
            CaError::Storage { .. } | CaError::Signing(_) => {
                CaClientError::Unavailable(e.to_string())
            }
            _ => CaClientError::Rejected(e.to_string()),
        }
    }
}

/// Something that signs CSRs: the built-in CA ([`LocalCaClient`]), or Istio's CA API over
/// gRPC (`GrpcCaClient`: istiod, `ztunnel controlplane`).
#[async_trait]
pub trait CaClient: Send + Sync {
    /// Returns the PEM chain, leaf first, root last.
    async fn sign(
        &self,
        csr_pem: String,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaClientError>;
}

/// A `CaClient` over the built-in CA (standalone mode and tests).
pub struct LocalCaClient {
    ca: Arc<CertificateAuthority>,
}

impl LocalCaClient {
    pub fn new(ca: Arc<CertificateAuthority>) -> Self {
        LocalCaClient { ca }
    }
}

#[async_trait]
impl CaClient for LocalCaClient {
    async fn sign(
        &self,
        csr_pem: String,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaClientError> {
        Ok(self.ca.sign_csr(&csr_pem, identity, ttl)?)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("no certificate for {identity}: {reason}")]
    Unavailable { identity: Identity, reason: String },
    #[error("certificate for {identity} expired and renewal failed: {reason}")]
    Expired { identity: Identity, reason: String },
    #[error("identity {0} was forgotten while waiting for its certificate")]
    Forgotten(Identity),
}

#[derive(Clone, Debug)]
pub struct SecretManagerOptions {
    /// Validity asked of the CA (it may grant less).
    pub requested_ttl: Duration,
    /// Renew at this fraction of the remaining lifetime at issuance...
    pub rotate_at: f64,
    /// ...plus or minus this fraction of it, chosen at random per certificate.
    pub rotate_jitter: f64,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Roots trusted in addition to the CA's own (e.g. during a root migration).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Counts every request sent to the CA by result, `ok` (a usable certificate came
    /// back) or `error` (`ztunnel_ca_requests`: `Metrics::ca_requests`); by default a
    /// family nobody reads.
    pub ca_requests: Family<ResultLabels, Counter>,
}

impl Default for SecretManagerOptions {
    fn default() -> Self {
        SecretManagerOptions {
            requested_ttl: Duration::from_secs(24 * 3600),
            rotate_at: 0.5,
            rotate_jitter: 0.1,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(60),
            extra_roots: Vec::new(),
            ca_requests: Family::default(),
        }
    }
}

/// What the admin page shows for one identity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertState {
    /// First request in flight.
    Initializing,
    Ready,
    /// A renewal request is in flight; the current certificate is still served.
    Renewing,
    /// The last request failed; retrying with backoff.
    Failing,
    /// The certificate expired and no new one could be had.
    Expired,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CertSnapshot {
    pub identity: String,
    pub state: CertState,
    pub serial: Option<String>,
    pub not_before_unix: Option<u64>,
    pub not_after_unix: Option<u64>,
    pub next_rotation_unix: Option<u64>,
    pub last_error: Option<String>,
}

/// What an identity's task publishes to its watchers.
#[derive(Clone, Default)]
struct Published {
    cert: Option<Arc<WorkloadCertificate>>,
    in_flight: bool,
    /// Count of failed requests, so a waiter can tell a failure that happened after it
    /// started waiting from an older one.
    failures: u64,
    last_error: Option<String>,
    next_rotation: Option<SystemTime>,
}

struct Entry {
    rx: watch::Receiver<Published>,
    task: AbortHandle,
}

/// Shared by the manager and its per-identity tasks (tasks hold no reference to the map, so
/// dropping the manager stops them all).
struct Shared {
    ca: Arc<dyn CaClient>,
    opts: SecretManagerOptions,
}

#[derive(Clone)]
pub struct SecretManager {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    entries: Mutex<HashMap<Identity, Entry>>,
    /// Where the per-identity tasks run: the runtime that made the manager (the control
    /// plane's), not whichever data-path thread first asks for an identity.
    runtime: Option<tokio::runtime::Handle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for entry in self.entries.get_mut().expect("poisoned").values() {
            entry.task.abort();
        }
    }
}

impl SecretManager {
    pub fn new(ca: Arc<dyn CaClient>, opts: SecretManagerOptions) -> Self {
        SecretManager {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared { ca, opts }),
                entries: Mutex::new(HashMap::new()),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// The identity's current certificate, requesting one if this is its first use. Waits
    /// for an in-flight request; fails (rather than hang) when the latest request failed and
    /// no unexpired certificate exists. Never returns an expired certificate.
    pub async fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, Error> {
        let mut rx = self.ensure(identity);
        let failures_at_start = rx.borrow().failures;
        loop {
            {
                let p = rx.borrow_and_update();
                if let Some(cert) = p.cert.as_ref().filter(|c| !c.is_expired()) {
                    return Ok(cert.clone());
                }
                let failed_meanwhile = p.failures > failures_at_start;
                // Nothing in flight and nothing valid: waiting would mean waiting for a
                // backoff timer, so fail now and let the caller decide.
                if failed_meanwhile || !p.in_flight {
                    let reason = p
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "renewal not yet due".to_string());
                    return Err(match p.cert {
                        Some(_) => Error::Expired {
                            identity: identity.clone(),
                            reason,
                        },
                        None => Error::Unavailable {
                            identity: identity.clone(),
                            reason,
                        },
                    });
                }
            }
            if rx.changed().await.is_err() {
                return Err(Error::Forgotten(identity.clone()));
            }
        }
    }

    /// Starts obtaining the identity's certificate in the background (a workload arrived on
    /// the node). Must be called within a tokio runtime.
    pub fn prefetch(&self, identity: &Identity) {
        self.ensure(identity);
    }

    /// The workload left the node: drop its certificate and stop rotating it.
    pub fn forget(&self, identity: &Identity) {
        if let Some(entry) = self
            .inner
            .entries
            .lock()
            .expect("poisoned")
            .remove(identity)
        {
            entry.task.abort();
        }
    }

    pub fn identities(&self) -> Vec<Identity> {
        self.inner
            .entries
            .lock()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Every identity with its certificate (if any) and last error, sorted, for
    /// `/config_dump`.
    pub fn held(&self) -> Vec<(String, Option<Arc<WorkloadCertificate>>, Option<String>)> {
        let entries = self.inner.entries.lock().expect("poisoned");
        let mut out: Vec<_> = entries
            .iter()
            .map(|(id, entry)| {
                let p = entry.rx.borrow();
                (id.to_string(), p.cert.clone(), p.last_error.clone())
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every identity with its state and validity, sorted, for the admin page.
    pub fn snapshot(&self) -> Vec<CertSnapshot> {
        let entries = self.inner.entries.lock().expect("poisoned");
        let mut out: Vec<CertSnapshot> = entries
            .iter()
            .map(|(id, entry)| {
                let p = entry.rx.borrow();
                let cert = p.cert.as_ref();
                let state = match (cert, p.in_flight, &p.last_error) {
                    (None, true, _) => CertState::Initializing,
                    (Some(c), _, _) if c.is_expired() => CertState::Expired,
                    (Some(_), true, _) => CertState::Renewing,
                    (_, false, Some(_)) => CertState::Failing,
                    (Some(_), false, None) => CertState::Ready,
                    (None, false, None) => CertState::Initializing,
                };
                CertSnapshot {
                    identity: id.to_string(),
                    state,
                    serial: cert.map(|c| c.serial()),
                    not_before_unix: cert.map(|c| unix_seconds(c.not_before)),
                    not_after_unix: cert.map(|c| unix_seconds(c.not_after)),
                    next_rotation_unix: p.next_rotation.map(unix_seconds),
                    last_error: p.last_error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// The watch receiver for the identity, spawning its task on first use.
    fn ensure(&self, identity: &Identity) -> watch::Receiver<Published> {
        let mut entries = self.inner.entries.lock().expect("poisoned");
        if let Some(entry) = entries.get(identity) {
            // A task only ends by panicking (e.g. inside a CaClient); start a new one then.
            if !entry.task.is_finished() {
                return entry.rx.clone();
            }
        }
        let (tx, rx) = watch::channel(Published {
            in_flight: true,
            ..Default::default()
        });
        let task = run(self.inner.shared.clone(), identity.clone(), tx);
        let task = match &self.inner.runtime {
            Some(rt) => rt.spawn(task),
            None => tokio::spawn(task),
        };
        entries.insert(
            identity.clone(),
            Entry {
                rx: rx.clone(),
                task: task.abort_handle(),
            },
        );
        rx
    }
}

/// The lifecycle of one identity's certificate; runs until aborted by `forget` or drop.
async fn run(shared: Arc<Shared>, identity: Identity, tx: watch::Sender<Published>) {
    let opts = &shared.opts;
    let mut backoff = opts.initial_backoff;
    loop {
        tx.send_modify(|p| p.in_flight = true);
        match request(&shared, &identity).await {
            Ok(cert) => {
                let delay = rotation_delay(&cert, opts);
                let next = SystemTime::now() + delay;
                tracing::info!(%identity, serial = %cert.serial(), expires_in = ?cert.remaining(),
                    rotate_in = ?delay, "workload certificate issued");
                tx.send_modify(|p| {
                    p.cert = Some(Arc::new(cert));
                    p.in_flight = false;
                    p.last_error = None;
                    p.next_rotation = Some(next);
                });
                backoff = opts.initial_backoff;
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                tracing::warn!(%identity, error = %e, retry_in = ?backoff, "certificate request failed");
                let wait = jittered(backoff, 0.2);
                tx.send_modify(|p| {
                    p.in_flight = false;
                    p.failures += 1;
                    p.last_error = Some(e.to_string());
                    p.next_rotation = Some(SystemTime::now() + wait);
                });
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(opts.max_backoff);
            }
        }
    }
}

async fn request(shared: &Shared, identity: &Identity) -> Result<WorkloadCertificate, String> {
    // A new key each time: rotation is also key rotation.
    let req = csr::generate(identity).map_err(|e| e.to_string())?;
    let result = shared
        .ca
        .sign(req.csr_pem, identity, shared.opts.requested_ttl)
        .await
        .map_err(|e| e.to_string())
        .and_then(|chain| {
            WorkloadCertificate::from_ca_response(
                identity.clone(),
                &chain,
                req.key,
                &shared.opts.extra_roots,
            )
            .map_err(|e| format!("CA returned an unusable certificate: {e}"))
        });
    let label = ResultLabels {
        result: if result.is_ok() { "ok" } else { "error" }.into(),
    };
    shared.opts.ca_requests.get_or_create(&label).inc();
    result
}

/// How long to keep a fresh certificate before renewing it: a fraction of its remaining
/// lifetime (counted from now, not `notBefore`, which a CA may backdate), with jitter.
fn rotation_delay(cert: &WorkloadCertificate, opts: &SecretManagerOptions) -> Duration {
    let remaining = cert.remaining().as_secs_f64();
    let jitter = opts.rotate_jitter * (2.0 * rand::random::<f64>() - 1.0);
    let fraction = (opts.rotate_at + jitter).clamp(0.05, 0.95);
    Duration::from_secs_f64(remaining * fraction)
}

fn jittered(d: Duration, fraction: f64) -> Duration {
    d.mul_f64(1.0 + fraction * (2.0 * rand::random::<f64>() - 1.0))
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
