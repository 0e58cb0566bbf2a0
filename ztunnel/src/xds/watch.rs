//! Reloading the local config file when it changes.
//!
//! Polling (read the file every second, compare with the last contents) is used rather than
//! inotify: it sees edits through symlink swaps (Kubernetes ConfigMap volumes), atomic
//! renames and in-place writes alike, at the cost of reading a small file once a second.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch as channel;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::local::{ConfigError, LocalConfig};
use crate::state::StateStore;

/// How often [`watch`] looks at the file.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Loads `path` and keeps the returned receiver updated with every valid new version of it.
/// An invalid edit is logged (with its line and field) and the last good config is kept.
/// Fails if the first load fails. Polling stops when every receiver is dropped.
/// Must be called within a tokio runtime.
pub fn watch(path: impl Into<PathBuf>) -> Result<channel::Receiver<Arc<LocalConfig>>, ConfigError> {
    watch_every(path, POLL_INTERVAL)
}

/// [`watch`] with a chosen polling interval.
pub fn watch_every(
    path: impl Into<PathBuf>,
    interval: Duration,
) -> Result<channel::Receiver<Arc<LocalConfig>>, ConfigError> {
    let path = path.into();
    let mut last = std::fs::read(&path).ok();
    let initial = LocalConfig::load(&path)?;
    log_loaded(&path, &initial);
    let (tx, rx) = channel::channel(Arc::new(initial));
    tokio::spawn(async move {
        let mut read_failed = false;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let bytes = match tokio::fs::read(&path).await {
                Ok(b) => b,
                Err(e) => {
                    // Editors and ConfigMap updates can briefly remove the file: say it
                    // once, keep serving the last config.
                    if !read_failed {
                        warn!(path = %path.display(), error = %e, "cannot read local config; keeping the last good one");
                    }
                    read_failed = true;
                    continue;
                }
            };
            read_failed = false;
            if last.as_deref() == Some(bytes.as_slice()) {
                continue;
            }
            last = Some(bytes.clone());
            let parsed = String::from_utf8(bytes)
                .map_err(|_| ConfigError {
                    file: Some(path.clone()),
                    line: None,
                    column: None,
                    message: "the file is not UTF-8".to_string(),
                })
                .and_then(|s| {
                    LocalConfig::from_yaml(&s).map_err(|e| ConfigError {
                        file: Some(path.clone()),
                        ..e
                    })
                });
            match parsed {
                Ok(cfg) => {
                    log_loaded(&path, &cfg);
                    tx.send_if_modified(|cur| {
                        let changed = **cur != cfg;
                        if changed {
                            *cur = Arc::new(cfg);
                        }
                        changed
                    });
                }
                Err(e) => error!("{e}; keeping the last good config"),
            }
        }
    });
    Ok(rx)
}

/// Watches `path` and applies every valid version to `store` (the standalone mode of the
/// proxy). The task ends when it is aborted.
pub fn follow(
    path: impl Into<PathBuf>,
    store: Arc<StateStore>,
) -> Result<JoinHandle<()>, ConfigError> {
    let mut rx = watch(path)?;
    rx.borrow_and_update().apply_to(&store);
    Ok(tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let cfg = rx.borrow_and_update().clone();
            cfg.apply_to(&store);
        }
    }))
}

fn log_loaded(path: &std::path::Path, cfg: &LocalConfig) {
    info!(
        path = %path.display(),
        workloads = cfg.workloads.len(),
        services = cfg.services.len(),
        policies = cfg.policies.len(),
        "local config loaded"
    );
    for w in &cfg.warnings {
        warn!(path = %path.display(), "local config: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ztunnel-watch-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.yaml");
        std::fs::write(&p, contents).unwrap();
        p
    }

    const V1: &str = "workloads:\n- name: a\n  namespace: default\n  workloadIps: [10.0.0.1]\n";
    const V2: &str = "workloads:\n- name: a\n  namespace: default\n  workloadIps: [10.0.0.2]\n";
    const BAD: &str = "workloads:\n- name: a\n  namespace: default\n  workloadIps: [10.0.0.x]\n";

    /// The next published config, if one comes within `wait`.
    async fn next_within(
        rx: &mut channel::Receiver<Arc<LocalConfig>>,
        wait: Duration,
    ) -> Option<Arc<LocalConfig>> {
        tokio::time::timeout(wait, rx.changed())
            .await
            .ok()
            .map(|_| rx.borrow_and_update().clone())
    }

    #[tokio::test]
    async fn applies_valid_edits_and_keeps_last_good_on_invalid_ones() {
        let path = temp_file("edits", V1);
        let mut rx = watch_every(&path, Duration::from_millis(20)).unwrap();
        assert_eq!(
            rx.borrow().workloads[0].workload_ips[0].to_string(),
            "10.0.0.1"
        );

        std::fs::write(&path, V2).unwrap();
        let cfg = next_within(&mut rx, Duration::from_secs(2))
            .await
            .expect("valid edit applied");
        assert_eq!(cfg.workloads[0].workload_ips[0].to_string(), "10.0.0.2");

        std::fs::write(&path, BAD).unwrap();
        assert!(
            next_within(&mut rx, Duration::from_millis(300))
                .await
                .is_none(),
            "invalid edit must not be published"
        );
        assert_eq!(
            rx.borrow().workloads[0].workload_ips[0].to_string(),
            "10.0.0.2"
        );

        std::fs::remove_file(&path).unwrap();
        assert!(
            next_within(&mut rx, Duration::from_millis(300))
                .await
                .is_none(),
            "missing file keeps the config"
        );

        std::fs::write(&path, V1).unwrap();
        let cfg = next_within(&mut rx, Duration::from_secs(2))
            .await
            .expect("recovers after the fix");
        assert_eq!(cfg.workloads[0].workload_ips[0].to_string(), "10.0.0.1");
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }

    #[tokio::test]
    async fn first_load_must_be_valid() {
        let path = temp_file("first", BAD);
        let err = watch_every(&path, Duration::from_millis(20)).unwrap_err();
        assert_eq!(err.line, Some(4));
        assert!(err.to_string().contains("config.yaml"), "{err}");
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }

    #[tokio::test]
    async fn follow_updates_the_store() {
        let path = temp_file("follow", V1);
        let store = Arc::new(StateStore::default());
        let mut versions = store.subscribe();
        let task = follow(&path, store.clone()).unwrap();
        let ip = |s: &str| s.parse().unwrap();
        assert!(store.snapshot().workload_by_ip(ip("10.0.0.1")).is_some());
        // mtime granularity does not matter: contents are compared.
        versions.borrow_and_update();
        std::fs::write(&path, V2).unwrap();
        tokio::time::timeout(Duration::from_secs(2), versions.changed())
            .await
            .unwrap()
            .unwrap();
        let snap = store.snapshot();
        assert!(snap.workload_by_ip(ip("10.0.0.1")).is_none());
        assert!(snap.workload_by_ip(ip("10.0.0.2")).is_some());
        task.abort();
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }
}
