//! The k8s source and the real Enroller driven by the real kube client against a fake
//! API server; the capture side is in memory, so no root is needed.

mod fake_api;
mod manifests;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use fake_api::{FakeApi, Kind};
use serde_json::json;

use super::{KubeOptions, KubeSource, DATAPLANE_MODE_LABEL, REDIRECTION_ANNOTATION};
use crate::enroll::tests::FakeTarget;
use crate::enroll::Enroller;

const NODE: &str = "node-a";
const AMBIENT: &[(&str, &str)] = &[(DATAPLANE_MODE_LABEL, "ambient")];

struct Harness {
    api: FakeApi,
    target: Arc<FakeTarget>,
    enroller: Arc<Enroller>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// What app.rs does in Kubernetes mode, with an in-memory capture: reconcile on every
/// change and periodically (retries).
fn harness(api: FakeApi, target: Arc<FakeTarget>) -> Harness {
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let opts = KubeOptions {
        node_name: NODE.into(),
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
    };
    let source = KubeSource::start(client, opts);
    let enroller = Arc::new(Enroller::with_source(source, target.clone()));
    let e = enroller.clone();
    let driver = tokio::spawn(async move {
        let mut changes = e.changes();
        loop {
            e.reconcile().await;
            let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
        }
    });
    Harness {
        api,
        target,
        enroller,
        driver,
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = list.iter().map(|s| s.parse().unwrap()).collect();
    v.sort();
    v
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Harness {
    async fn until_enrolled(&self, want: &[&str]) {
        let want = ips(want);
        until(&format!("enrolled = {want:?}"), || {
            self.target.enrolled_ips() == want
        })
        .await;
    }

    async fn until_annotated(&self, ns: &str, name: &str, on: bool) {
        let want = on.then(|| "enabled".to_string());
        until(&format!("{ns}/{name} annotated = {on}"), || {
            self.api.pod_annotation(ns, name, REDIRECTION_ANNOTATION) == want
        })
        .await;
    }

    fn routes(&self, list: &[(&str, &str)]) {
        for (ip, iface) in list {
            self.target.route(ip.parse().unwrap(), iface);
        }
    }

    fn lists(&self, path: &str) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|r| r.starts_with(&format!("GET {path}")) && !r.contains("watch="))
            .count()
    }
}

#[tokio::test]
async fn k8s_enroll_follows_namespace_and_pod_labels() {
    let api = FakeApi::start().await;
    api.set_namespace("mesh", AMBIENT);
    api.set_namespace("plain", &[]);
    api.create_pod("mesh", "a", NODE, &["10.1.0.1", "fd00:1::1"]);
    let b = api.create_pod("mesh", "b", NODE, &["10.1.0.2"]);
    api.edit_pod("mesh", "b", |p| {
        p["metadata"]["labels"] = json!({DATAPLANE_MODE_LABEL: "none"})
    });
    api.create_pod("mesh", "c", NODE, &["192.168.0.1"]);
    api.edit_pod("mesh", "c", |p| p["spec"]["hostNetwork"] = true.into());
    api.create_pod("mesh", "d", NODE, &["10.1.0.4"]);
    api.edit_pod("mesh", "d", |p| p["status"]["phase"] = "Pending".into());
    api.create_pod("plain", "e", NODE, &["10.1.0.5"]);
    api.create_pod("mesh", "f", "node-b", &["10.2.0.1"]);
    let h = harness(api, Arc::default());
    h.routes(&[
        ("10.1.0.1", "veth-a"),
        ("10.1.0.2", "veth-b"),
        ("192.168.0.1", "eth0"),
        ("10.1.0.4", "veth-d"),
        ("10.1.0.5", "veth-e"),
        ("10.2.0.1", "veth-f"),
    ]);

    // Only a: b opted out, c is host-network, d not running, e's namespace is not
    // ambient, f is another node's.
    h.until_enrolled(&["10.1.0.1", "fd00:1::1"]).await;
    h.until_annotated("mesh", "a", true).await;
    let ids: BTreeSet<String> = h
        .enroller
        .identities()
        .unwrap()
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from(["spiffe://cluster.local/ns/mesh/sa/sa-a".to_string()])
    );
    let st = h.enroller.status();
    assert_eq!(
        st.enrolled.keys().collect::<Vec<_>>(),
        vec!["Kubernetes//Pod/mesh/a"]
    );
    let patched: Vec<String> = h
        .api
        .patches()
        .iter()
        .map(|(ns, n, _)| format!("{ns}/{n}"))
        .collect();
    assert_eq!(patched, vec!["mesh/a"], "only enrolled pods are annotated");

    // The namespace label enrolls e live; removing b's opt-out enrolls b.
    h.api.set_namespace("plain", AMBIENT);
    h.until_enrolled(&["10.1.0.1", "fd00:1::1", "10.1.0.5"])
        .await;
    h.until_annotated("plain", "e", true).await;
    h.api
        .edit_pod("mesh", "b", |p| p["metadata"]["labels"] = json!({}));
    h.until_enrolled(&["10.1.0.1", "fd00:1::1", "10.1.0.2", "10.1.0.5"])
        .await;
    h.until_annotated("mesh", "b", true).await;
    let last_b = h
        .api
        .patches()
        .into_iter()
        .rfind(|(_, n, _)| n == "b")
        .unwrap()
        .2;
    assert_eq!(
        last_b["metadata"]["uid"],
        b.as_str(),
        "patches carry the uid precondition"
    );

    // Opt-out on a pod, then the namespace label goes: released and de-annotated.
    h.api.edit_pod("plain", "e", |p| {
        p["metadata"]["labels"] = json!({DATAPLANE_MODE_LABEL: "none"})
    });
    h.until_enrolled(&["10.1.0.1", "fd00:1::1", "10.1.0.2"])
        .await;
    h.until_annotated("plain", "e", false).await;
    h.api.set_namespace("mesh", &[]);
    h.until_enrolled(&[]).await;
    h.until_annotated("mesh", "a", false).await;
    h.until_annotated("mesh", "b", false).await;
    assert!(h.enroller.identities().unwrap().is_empty());
}

#[tokio::test]
async fn k8s_pod_churn_and_late_interface() {
    let api = FakeApi::start().await;
    api.set_namespace("mesh", AMBIENT);
    api.create_pod("mesh", "a", NODE, &["10.1.0.1"]);
    let h = harness(api, Arc::default());
    h.routes(&[("10.1.0.1", "veth-a")]);
    h.until_enrolled(&["10.1.0.1"]).await;
    h.until_annotated("mesh", "a", true).await;

    // Deleted: released, and nothing to patch on a pod that is gone.
    let patches = h.api.patches().len();
    h.api.delete_pod("mesh", "a");
    h.until_enrolled(&[]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.api.patches().len(), patches);

    // Recreated under the same name with a new address whose veth is not there yet:
    // pending (readiness says why), enrolled once the interface appears.
    let uid = h.api.create_pod("mesh", "a", NODE, &["10.1.0.9"]);
    until("pending", || {
        h.enroller
            .status()
            .pending
            .contains_key("Kubernetes//Pod/mesh/a")
    })
    .await;
    assert!(h.target.enrolled_ips().is_empty());
    assert_eq!(
        h.api.pod_annotation("mesh", "a", REDIRECTION_ANNOTATION),
        None,
        "not annotated before capture"
    );
    h.routes(&[("10.1.0.9", "veth-a2")]);
    h.until_enrolled(&["10.1.0.9"]).await;
    h.until_annotated("mesh", "a", true).await;
    assert_eq!(
        h.api.patches().last().unwrap().2["metadata"]["uid"],
        uid.as_str()
    );
}

#[tokio::test]
async fn k8s_watch_disconnect_resumes_and_410_relists() {
    let api = FakeApi::start().await;
    api.set_namespace("mesh", AMBIENT);
    api.create_pod("mesh", "a", NODE, &["10.1.0.1"]);
    api.create_pod("mesh", "b", NODE, &["10.1.0.2"]);
    let h = harness(api, Arc::default());
    h.routes(&[
        ("10.1.0.1", "a"),
        ("10.1.0.2", "b"),
        ("10.1.0.3", "c"),
        ("10.1.0.4", "d"),
    ]);
    h.until_enrolled(&["10.1.0.1", "10.1.0.2"]).await;
    let pod_lists = h.lists("/api/v1/pods");
    assert_eq!(pod_lists, 1);

    // A dropped watch resumes from the last version: what happened meanwhile arrives,
    // without a new list.
    h.api.freeze_watches();
    h.api.delete_pod("mesh", "b");
    h.api.create_pod("mesh", "c", NODE, &["10.1.0.3"]);
    h.api.disconnect_watches();
    h.until_enrolled(&["10.1.0.1", "10.1.0.3"]).await;
    assert_eq!(h.lists("/api/v1/pods"), pod_lists, "resumed, not re-listed");

    // History compacted while the watch hung: resuming gets a 410 ERROR event, the
    // watcher re-lists, and the pod deleted in the gap is gone (no stale state).
    h.api.freeze_watches();
    h.api.delete_pod("mesh", "a");
    h.api.compact();
    h.api.disconnect_watches();
    h.until_enrolled(&["10.1.0.3"]).await;
    assert!(h.lists("/api/v1/pods") > pod_lists, "re-listed after 410");

    // The watch request itself answered 410 (HTTP status): a fresh list as well.
    let pod_lists = h.lists("/api/v1/pods");
    h.api.freeze_watches();
    h.api.delete_pod("mesh", "c");
    h.api.create_pod("mesh", "d", NODE, &["10.1.0.4"]);
    h.api.compact();
    h.api.gone_on_next_watch(Kind::Pod);
    h.api.disconnect_watches();
    h.until_enrolled(&["10.1.0.4"]).await;
    assert!(!h.api.gone_pending(), "the watch request was answered 410");
    assert!(
        h.lists("/api/v1/pods") > pod_lists,
        "re-listed after an HTTP 410"
    );
    h.until_annotated("mesh", "d", true).await;
}

#[tokio::test]
async fn k8s_bookmarks_move_the_resume_point() {
    let api = FakeApi::start().await;
    api.set_namespace("mesh", AMBIENT);
    api.create_pod("mesh", "a", NODE, &["10.1.0.1"]);
    let h = harness(api, Arc::default());
    h.routes(&[("10.1.0.1", "a")]);
    h.until_enrolled(&["10.1.0.1"]).await;
    h.until_annotated("mesh", "a", true).await;
    // Other nodes' churn moves the version on; this node's pod watch sees none of it.
    h.api.create_pod("mesh", "x", "node-b", &["10.2.0.1"]);
    h.api.create_pod("mesh", "y", "node-b", &["10.2.0.2"]);
    let mark = h.api.bookmark();
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.api.compact();
    let pod_lists = h.lists("/api/v1/pods");
    h.api.disconnect_watches();
    let resumed = format!("resourceVersion={mark}");
    until("pod watch resumed at the bookmark", || {
        h.api.requests().iter().any(|r| {
            r.starts_with("GET /api/v1/pods") && r.contains("watch=") && r.contains(&resumed)
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.lists("/api/v1/pods"),
        pod_lists,
        "no 410, no re-list: the bookmark was past the compaction"
    );
    let watch = h
        .api
        .requests()
        .into_iter()
        .find(|r| r.contains("/api/v1/pods") && r.contains("watch="))
        .unwrap();
    assert!(
        watch.contains("allowWatchBookmarks=true")
            && watch.contains("fieldSelector=spec.nodeName%3Dnode-a"),
        "{watch}"
    );
}

#[tokio::test]
async fn k8s_nothing_is_decided_before_the_first_list() {
    let api = FakeApi::start().await;
    api.set_namespace("mesh", AMBIENT);
    api.create_pod("mesh", "a", NODE, &["10.1.0.1"]);
    api.fail_lists(Some(Kind::Pod));
    // Left enrolled by the previous ztunnel (pinned map).
    let target = Arc::new(FakeTarget::default());
    target
        .enrolled
        .lock()
        .unwrap()
        .insert("10.1.0.77".parse().unwrap(), ("old".into(), 3));
    let h = harness(api, target);
    h.routes(&[("10.1.0.1", "a")]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        h.target.enrolled_ips(),
        ips(&["10.1.0.77"]),
        "unsynced: the pinned pod stays"
    );
    assert!(h.enroller.identities().is_none());
    h.api.fail_lists(None);
    h.until_enrolled(&["10.1.0.1"]).await;
}
