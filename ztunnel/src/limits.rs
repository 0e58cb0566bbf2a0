//! Bounds on what a peer can make this process hold (connections, pending handshakes,
//! streams per caller), and what happens when one is reached: the new work is refused,
//! the counter `ztunnel_limit_hits_total{limit="<name>"}` counts it, and a warning names
//! the limit — at most one line a second per limit, with how many were refused since, so
//! that a flood hitting a limit cannot flood the log as well.
//!
//! The README's "Limits" table lists every limit by these names with its flag.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: String,
}

/// Refusals by limit, registered in every registry that serves metrics
/// ([`crate::metrics::Metrics`], the control plane's).
pub static HITS: LazyLock<Family<LimitLabels, Counter>> = LazyLock::new(Family::default);

/// How often one limit may log.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Per limit: when it last logged, and refusals not logged since.
static LOGGED: LazyLock<Mutex<HashMap<&'static str, (Instant, u64)>>> =
    LazyLock::new(Default::default);

/// Records that `limit` refused something; `what` says what and the bound.
pub fn hit(limit: &'static str, what: std::fmt::Arguments<'_>) {
    HITS.get_or_create(&LimitLabels {
        limit: limit.to_string(),
    })
    .inc();
    let mut logged = LOGGED.lock().expect("poisoned");
    let now = Instant::now();
    match logged.get_mut(limit) {
        Some((at, quiet)) if now.duration_since(*at) < LOG_EVERY => *quiet += 1,
        entry => {
            let since = entry.map(|(_, quiet)| *quiet).unwrap_or(0);
            warn!(
                limit,
                refused_since_last_line = since,
                "limit reached: {what}"
            );
            logged.insert(limit, (now, 0));
        }
    }
}

/// Refusals `limit` has counted (tests, the load suite's report).
pub fn hits(limit: &str) -> u64 {
    HITS.get_or_create(&LimitLabels {
        limit: limit.to_string(),
    })
    .get()
}

/// At most `max` of something at once (connections of a listener): a permit per item,
/// given back when it is dropped.
#[derive(Clone, Debug)]
pub struct Cap {
    name: &'static str,
    max: usize,
    sem: Arc<Semaphore>,
}

impl Cap {
    pub fn new(name: &'static str, max: usize) -> Cap {
        Cap {
            name,
            max,
            sem: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// A permit, or `None` (counted and logged) when `max` are out.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.sem.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                hit(
                    self.name,
                    format_args!("{}: {} at once, the most allowed", self.name, self.max),
                );
                None
            }
        }
    }

    pub fn in_use(&self) -> usize {
        self.max.min(Semaphore::MAX_PERMITS) - self.sem.available_permits()
    }
}

/// At most `max` of something per key (pending handshakes per source address, xDS streams
/// per token). Keys with nothing outstanding are forgotten, so the map holds only keys in
/// use: its size is bounded by what the permits themselves are bounded by.
pub struct PerKey<K> {
    name: &'static str,
    max: usize,
    counts: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K> Clone for PerKey<K> {
    fn clone(&self) -> Self {
        PerKey {
            name: self.name,
            max: self.max,
            counts: self.counts.clone(),
        }
    }
}

/// One unit of a [`PerKey`] limit, given back when dropped.
pub struct KeyPermit<K: Hash + Eq> {
    counts: Arc<Mutex<HashMap<K, usize>>>,
    key: Option<K>,
}

impl<K: Hash + Eq> Drop for KeyPermit<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut counts = self.counts.lock().expect("poisoned");
        if let Some(n) = counts.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&key);
            }
        }
    }
}

impl<K: Hash + Eq + Clone> PerKey<K> {
    pub fn new(name: &'static str, max: usize) -> Self {
        PerKey {
            name,
            max,
            counts: Default::default(),
        }
    }

    /// A permit for `key`, or `None` (counted and logged, naming `who`, never the key
    /// itself, which may be a secret) when it already holds `max`.
    pub fn admit(&self, key: K, who: &dyn std::fmt::Display) -> Option<KeyPermit<K>> {
        let mut counts = self.counts.lock().expect("poisoned");
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            drop(counts);
            hit(
                self.name,
                format_args!("{}: {who} already holds {}", self.name, self.max),
            );
            return None;
        }
        *n += 1;
        Some(KeyPermit {
            counts: self.counts.clone(),
            key: Some(key),
        })
    }

    /// Keys holding at least one permit.
    pub fn keys(&self) -> usize {
        self.counts.lock().expect("poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_refuses_past_max_and_counts_it() {
        let cap = Cap::new("test_cap", 2);
        let a = cap.admit().unwrap();
        let _b = cap.admit().unwrap();
        let before = hits("test_cap");
        assert!(cap.admit().is_none());
        assert_eq!(hits("test_cap"), before + 1);
        drop(a);
        assert!(cap.admit().is_some(), "a returned permit is reusable");
    }

    #[test]
    fn per_key_limits_each_key_and_forgets_idle_keys() {
        let l = PerKey::new("test_per_key", 1);
        let a = l.admit("a", &"a").unwrap();
        let before = hits("test_per_key");
        assert!(l.admit("a", &"a").is_none());
        assert_eq!(hits("test_per_key"), before + 1);
        let b = l.admit("b", &"b").unwrap();
        assert_eq!(l.keys(), 2);
        drop(a);
        drop(b);
        assert_eq!(l.keys(), 0, "keys with nothing outstanding are not kept");
        assert!(l.admit("a", &"a").is_some());
    }
}
