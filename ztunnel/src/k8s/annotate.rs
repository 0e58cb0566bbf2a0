//! Keeps `ambient.istio.io/redirection: enabled` on exactly the pods the Enroller
//! enrolled. istiod reads it to mark a pod's workload as HBONE, so it must follow real
//! capture: added after a pod is enrolled, removed when it is released.
//!
//! Level-triggered: every wake compares what each pod of the mirror carries with what the
//! last enrollment pass says, and patches the difference. A failed patch is retried on
//! the next wake or after [`RETRY`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::select::PodFacts;
use super::source::Shared;
use super::{REDIRECTION_ANNOTATION, REDIRECTION_ENABLED};

pub const RETRY: Duration = Duration::from_secs(5);

pub(crate) async fn run(client: Client, shared: Arc<Shared>) {
    let mut enrolled = shared.enrolled.subscribe();
    let mut view_changes = shared.subscribe();
    // pod uid → when a patch last failed: no hammering while e.g. RBAC is wrong.
    let mut failed: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let set = enrolled.borrow_and_update().clone();
        if let Some(set) = set {
            failed.retain(|_, at| at.elapsed() < RETRY);
            for (pod, want) in work(&shared, &set) {
                if failed.contains_key(&pod.uid) {
                    continue;
                }
                match patch(&client, &pod, want).await {
                    Ok(_) => {
                        info!(pod = %format!("{}/{}", pod.namespace, pod.name), enabled = want, "redirection annotation updated");
                        // Until the watch echoes it: no second patch for the same change.
                        shared.update(|v| {
                            if let Some(p) = v.pods.get_mut(&pod.uid) {
                                p.annotated = want;
                            }
                        });
                    }
                    // Gone, or recreated under the same name (uid precondition): the
                    // watch brings the truth.
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
                        debug!(pod = %pod.name, "annotation patch skipped: {}", s.message)
                    }
                    Err(e) => {
                        warn!(pod = %format!("{}/{}", pod.namespace, pod.name), "annotation patch failed: {e}; will retry");
                        failed.insert(pod.uid.clone(), Instant::now());
                    }
                }
            }
        }
        tokio::select! {
            r = enrolled.changed() => if r.is_err() { return },
            _ = view_changes.changed() => {}
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Pods whose annotation differs from their enrollment, with the wanted value.
fn work(shared: &Shared, enrolled: &BTreeSet<String>) -> Vec<(PodFacts, bool)> {
    let view = shared.view.lock().unwrap();
    view.pods
        .values()
        .filter_map(|p| {
            let want = enrolled.contains(&shared.workload_uid(p));
            (want != p.annotated).then(|| (p.clone(), want))
        })
        .collect()
}

/// A JSON merge patch (null removes the key). The uid makes it a precondition: the API
/// server refuses (409) to patch a recreated pod of the same name.
pub fn patch_body(pod: &PodFacts, enabled: bool) -> Value {
    let value = if enabled {
        json!(REDIRECTION_ENABLED)
    } else {
        Value::Null
    };
    json!({"metadata": {"uid": pod.uid, "annotations": {REDIRECTION_ANNOTATION: value}}})
}

async fn patch(client: &Client, pod: &PodFacts, enabled: bool) -> kube::Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    api.patch(
        &pod.name,
        &PatchParams::default(),
        &Patch::Merge(patch_body(pod, enabled)),
    )
    .await
}
