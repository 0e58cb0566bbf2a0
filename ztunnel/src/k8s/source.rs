//! [`KubeSource`]: the wanted set from the API server, as a
//! [`WorkloadSource`](crate::enroll::WorkloadSource).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::mirror::Mirror;
use super::select::PodFacts;
use crate::enroll::{EnrollmentStatus, Wanted, WorkloadSource};
use crate::identity::Identity;

#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// Only pods with this `spec.nodeName` are watched.
    pub node_name: String,
    pub trust_domain: String,
    /// Istio's cluster id (`CLUSTER_ID`, default `Kubernetes`): workload uids are
    /// `<cluster>//Pod/<namespace>/<name>` like istiod's, so enrollment status and the
    /// xDS state name a pod alike.
    pub cluster_id: String,
}

/// Watches namespaces and this node's pods; the pods to enroll follow label changes,
/// pod churn and watch outages.
pub struct KubeSource {
    shared: Arc<Shared>,
    tasks: Vec<AbortHandle>,
}

/// State shared by the watch tasks, the annotator and the Enroller.
pub(crate) struct Shared {
    pub opts: KubeOptions,
    pub view: Mutex<View>,
    changes: watch::Sender<u64>,
    /// Workload uids the Enroller enrolled in its last pass; `None` before its first
    /// pass, when the annotator must not touch anything yet.
    pub enrolled: watch::Sender<Option<BTreeSet<String>>>,
}

#[derive(Default)]
pub(crate) struct View {
    /// namespace name → labels
    pub namespaces: Mirror<BTreeMap<String, String>>,
    /// pod uid → facts
    pub pods: Mirror<PodFacts>,
    last: Option<Digest>,
}

/// What the Enroller and the annotator react to; a change of anything else (most pod
/// status updates) wakes nobody.
#[derive(PartialEq)]
struct Digest {
    wanted: Option<Vec<Wanted>>,
    annotated: Vec<(String, bool)>,
}

impl KubeSource {
    /// Starts watching (and annotating); stops when dropped.
    pub fn start(client: Client, opts: KubeOptions) -> Arc<KubeSource> {
        let shared = Arc::new(Shared {
            opts: opts.clone(),
            view: Mutex::new(View::default()),
            changes: watch::channel(0).0,
            enrolled: watch::channel(None).0,
        });
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let pods: Api<Pod> = Api::all(client.clone());
        let on_node =
            watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node_name));
        let tasks = vec![
            tokio::spawn(follow(
                namespaces,
                watcher::Config::default(),
                shared.clone(),
                "namespaces",
                |v, e| {
                    v.namespaces.apply(e, |ns: &Namespace| {
                        Some((
                            ns.metadata.name.clone()?,
                            ns.metadata.labels.clone().unwrap_or_default(),
                        ))
                    })
                },
            ))
            .abort_handle(),
            tokio::spawn(follow(pods, on_node, shared.clone(), "pods", |v, e| {
                v.pods
                    .apply(e, |p: &Pod| PodFacts::of(p).map(|f| (f.uid.clone(), f)))
            }))
            .abort_handle(),
            tokio::spawn(super::annotate::run(client, shared.clone())).abort_handle(),
        ];
        info!(node = %opts.node_name, "watching namespaces and this node's pods");
        Arc::new(KubeSource { shared, tasks })
    }

    /// Listed both namespaces and pods at least once.
    pub fn synced(&self) -> bool {
        let v = self.shared.view.lock().unwrap();
        v.namespaces.synced() && v.pods.synced()
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.tasks.iter().for_each(AbortHandle::abort);
    }
}

impl WorkloadSource for KubeSource {
    fn wanted(&self) -> Option<Vec<Wanted>> {
        self.shared.wanted(&self.shared.view.lock().unwrap())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    fn report(&self, status: &EnrollmentStatus) {
        let now: BTreeSet<String> = status.enrolled.keys().cloned().collect();
        self.shared.enrolled.send_if_modified(|last| {
            let changed = last.as_ref() != Some(&now);
            *last = Some(now);
            changed
        });
    }
}

impl Shared {
    pub fn workload_uid(&self, pod: &PodFacts) -> String {
        format!(
            "{}//Pod/{}/{}",
            self.opts.cluster_id, pod.namespace, pod.name
        )
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn wanted(&self, view: &View) -> Option<Vec<Wanted>> {
        if !view.namespaces.synced() || !view.pods.synced() {
            return None;
        }
        let wanted = view
            .pods
            .values()
            .filter(|p| p.decide(view.namespaces.get(&p.namespace)).is_ok())
            .map(|p| Wanted {
                uid: self.workload_uid(p),
                ips: p.ips.clone(),
                identity: Identity::new(&self.opts.trust_domain, &p.namespace, &p.service_account),
            })
            .collect();
        Some(wanted)
    }

    /// Changes the view; wakes the Enroller and the annotator if that changed anything
    /// they act on.
    pub fn update(&self, f: impl FnOnce(&mut View)) {
        let mut view = self.view.lock().unwrap();
        f(&mut view);
        let digest = Digest {
            wanted: self.wanted(&view),
            annotated: view
                .pods
                .values()
                .map(|p| (p.uid.clone(), p.annotated))
                .collect(),
        };
        if view.last.as_ref() != Some(&digest) {
            view.last = Some(digest);
            drop(view);
            self.changes.send_modify(|n| *n += 1);
        }
    }
}

/// Keeps one mirror in line with the API server, forever.
///
/// kube's watcher lists, then watches from the list's resourceVersion, resumes the
/// watch from the last seen version (events or BOOKMARKs) when the stream ends, and
/// re-lists on a `410 Gone` ERROR event (checked in kube-runtime 5.0's watcher). One
/// gap handled here: an API server answering the watch *request* itself with 410 makes
/// that watcher retry the same expired version forever, so we start a new watcher, which
/// lists first.
async fn follow<K>(
    api: Api<K>,
    cfg: watcher::Config,
    shared: Arc<Shared>,
    what: &'static str,
    apply: fn(&mut View, Event<K>),
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    loop {
        let mut events = watcher(api.clone(), cfg.clone()).default_backoff().boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    if matches!(event, Event::InitDone) {
                        debug!(what, "listed");
                    }
                    shared.update(|view| apply(view, event));
                }
                Err(watcher::Error::WatchStartFailed(kube::Error::Api(status)))
                    if status.code == 410 =>
                {
                    warn!(what, "watch refused with 410 Gone: listing again");
                    break;
                }
                Err(e) => warn!(
                    what,
                    "watch failed: {e}; retrying (kept state stays until a new list replaces it)"
                ),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
