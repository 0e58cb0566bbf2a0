//! A fake Kubernetes API server on a real TCP socket, speaking the REST protocol the
//! real kube client uses: LIST with a collection resourceVersion, WATCH as a stream of
//! JSON lines (`ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK`/`ERROR`) resumed from a
//! resourceVersion, `410 Gone` for versions older than the last compaction (as an ERROR
//! event, or as the HTTP answer to the watch request), field selectors on
//! `spec.nodeName`, and JSON merge patches with a uid precondition.
//!
//! Only what the k8s source uses: namespaces (cluster-wide) and pods (all namespaces).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, Infallible>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Namespace,
    Pod,
}

struct Logged {
    rv: u64,
    kind: Kind,
    node: Option<String>,
    line: Bytes,
}

struct Watch {
    kind: Kind,
    node: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    uids: u64,
    namespaces: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    log: Vec<Logged>,
    /// Watches from a version older than this get 410 Gone.
    compacted: u64,
    watches: Vec<Watch>,
    /// Events are logged but not streamed: a stuck connection.
    frozen: bool,
    gone_next_watch: Option<Kind>,
    failing_lists: Option<Kind>,
    requests: Vec<String>,
    patches: Vec<(String, String, Value)>,
}

pub struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            ..Default::default()
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let io = hyper_util::rt::TokioIo::new(conn);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        FakeApi { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let mut s = self.state.lock().unwrap();
        let labels: BTreeMap<_, _> = labels.iter().copied().collect();
        let existing = s.namespaces.get(name).cloned();
        let mut obj = existing.clone().unwrap_or_else(|| {
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "uid": format!("ns-{name}")}})
        });
        obj["metadata"]["labels"] = json!(labels);
        let typ = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.emit(Kind::Namespace, typ, obj);
    }

    /// Creates a Running pod; its uid.
    pub fn create_pod(&self, ns: &str, name: &str, node: &str, ips: &[&str]) -> String {
        let mut s = self.state.lock().unwrap();
        s.uids += 1;
        let uid = format!("uid-{name}-{}", s.uids);
        let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        let obj = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": uid},
            "spec": {"nodeName": node, "serviceAccountName": format!("sa-{name}"),
                     "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": "Running", "podIP": ips.first(), "podIPs": pod_ips},
        });
        s.emit(Kind::Pod, "ADDED", obj);
        uid
    }

    pub fn edit_pod(&self, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut s = self.state.lock().unwrap();
        let mut obj = s.pods[&(ns.to_string(), name.to_string())].clone();
        f(&mut obj);
        s.emit(Kind::Pod, "MODIFIED", obj);
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        let obj = s.pods[&(ns.to_string(), name.to_string())].clone();
        s.emit(Kind::Pod, "DELETED", obj);
    }

    pub fn pod_annotation(&self, ns: &str, name: &str, key: &str) -> Option<String> {
        let s = self.state.lock().unwrap();
        let pod = s.pods.get(&(ns.to_string(), name.to_string()))?;
        pod["metadata"]["annotations"][key]
            .as_str()
            .map(String::from)
    }

    /// Ends every open watch (the client resumes from its last resourceVersion).
    pub fn disconnect_watches(&self) {
        let mut s = self.state.lock().unwrap();
        s.watches.clear();
        s.frozen = false;
    }

    /// Stops streaming events (they are still logged), as a hung connection would.
    pub fn freeze_watches(&self) {
        self.state.lock().unwrap().frozen = true;
    }

    /// Forgets history: resuming from an older version is `410 Gone`.
    pub fn compact(&self) {
        let mut s = self.state.lock().unwrap();
        s.compacted = s.rv;
        let keep = s.rv;
        s.log.retain(|l| l.rv > keep);
    }

    /// The next watch request of this kind is answered `410 Gone` (HTTP status).
    pub fn gone_on_next_watch(&self, kind: Kind) {
        self.state.lock().unwrap().gone_next_watch = Some(kind);
    }

    /// A `gone_on_next_watch` not yet consumed by a watch request.
    pub fn gone_pending(&self) -> bool {
        self.state.lock().unwrap().gone_next_watch.is_some()
    }

    pub fn fail_lists(&self, kind: Option<Kind>) {
        self.state.lock().unwrap().failing_lists = kind;
    }

    /// Sends a BOOKMARK with the current version to every open watch; that version.
    pub fn bookmark(&self) -> u64 {
        let s = self.state.lock().unwrap();
        for w in &s.watches {
            let kind = if w.kind == Kind::Pod {
                "Pod"
            } else {
                "Namespace"
            };
            let obj = json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": s.rv.to_string()}});
            let _ = w.tx.send(line("BOOKMARK", &obj));
        }
        s.rv
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn patches(&self) -> Vec<(String, String, Value)> {
        self.state.lock().unwrap().patches.clone()
    }
}

impl State {
    /// Stores the object's new version and streams the event to matching watches.
    fn emit(&mut self, kind: Kind, typ: &str, mut obj: Value) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let node = obj["spec"]["nodeName"].as_str().map(String::from);
        match (kind, typ) {
            (Kind::Namespace, "DELETED") => drop(self.namespaces.remove(&name)),
            (Kind::Namespace, _) => drop(self.namespaces.insert(name, obj.clone())),
            (Kind::Pod, t) => {
                let key = (
                    obj["metadata"]["namespace"].as_str().unwrap().to_string(),
                    name,
                );
                if t == "DELETED" {
                    self.pods.remove(&key);
                } else {
                    self.pods.insert(key, obj.clone());
                }
            }
        }
        let line = line(typ, &obj);
        self.log.push(Logged {
            rv: self.rv,
            kind,
            node: node.clone(),
            line: line.clone(),
        });
        if !self.frozen {
            self.watches.retain(|w| {
                !matches(w.kind, &w.node, kind, &node) || w.tx.send(line.clone()).is_ok()
            });
        }
    }
}

fn matches(want: Kind, want_node: &Option<String>, kind: Kind, node: &Option<String>) -> bool {
    want == kind && (want_node.is_none() || want_node == node)
}

fn line(typ: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": typ, "object": obj})).unwrap();
    v.push(b'\n');
    Bytes::from(v)
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code.as_u16()})
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

/// `a=b&c=d` with percent-decoding (field selectors arrive as `spec.nodeName%3Dn`).
fn query(q: &str) -> BTreeMap<String, String> {
    let decode = |s: &str| {
        let b = s.as_bytes();
        let mut out = vec![];
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' if i + 2 < b.len() => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).to_string()
    };
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let q = query(req.uri().query().unwrap_or(""));
    state
        .lock()
        .unwrap()
        .requests
        .push(format!("{} {}", req.method(), req.uri()));
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let resp = match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["api", "v1", "namespaces"]) => collection(&state, Kind::Namespace, &q),
        (Method::GET, ["api", "v1", "pods"]) => collection(&state, Kind::Pod, &q),
        (Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let (ns, name) = (ns.to_string(), name.to_string());
            let merge = req
                .headers()
                .get("content-type")
                .is_some_and(|c| c == "application/merge-patch+json");
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            match serde_json::from_slice::<Value>(&body) {
                Ok(patch) if merge => patch_pod(&state, &ns, &name, patch),
                _ => respond(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    &status(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        "want a JSON merge patch",
                    ),
                ),
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            &status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route {path}"),
            ),
        ),
    };
    Ok(resp)
}

fn collection(state: &Mutex<State>, kind: Kind, q: &BTreeMap<String, String>) -> Response<Body> {
    let node = q
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .map(String::from);
    let mut s = state.lock().unwrap();
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watching {
        if s.failing_lists == Some(kind) {
            return respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                &status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "etcd is sad",
                ),
            );
        }
        let items: Vec<Value> = match kind {
            Kind::Namespace => s.namespaces.values().cloned().collect(),
            Kind::Pod => s
                .pods
                .values()
                .filter(|p| node.is_none() || p["spec"]["nodeName"].as_str() == node.as_deref())
                .cloned()
                .collect(),
        };
        let list_kind = if kind == Kind::Pod {
            "PodList"
        } else {
            "NamespaceList"
        };
        let body = json!({"apiVersion": "v1", "kind": list_kind,
                          "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
        return respond(StatusCode::OK, &body);
    }
    if s.gone_next_watch == Some(kind) {
        s.gone_next_watch = None;
        return respond(
            StatusCode::GONE,
            &status(StatusCode::GONE, "Expired", "too old resource version"),
        );
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(s.rv);
    if from < s.compacted {
        let msg = format!("too old resource version: {from} ({})", s.compacted);
        let err = line("ERROR", &status(StatusCode::GONE, "Expired", &msg));
        return Response::new(Full::new(err).boxed());
    }
    let backlog: Vec<Bytes> = s
        .log
        .iter()
        .filter(|l| l.rv > from && matches(kind, &node, l.kind, &l.node))
        .map(|l| l.line.clone())
        .collect();
    let (tx, rx) = mpsc::unbounded_channel();
    s.watches.push(Watch { kind, node, tx });
    let live =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    let frames = futures::stream::iter(backlog)
        .chain(live)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Response::builder()
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap()
}

fn patch_pod(state: &Mutex<State>, ns: &str, name: &str, patch: Value) -> Response<Body> {
    let mut s = state.lock().unwrap();
    s.patches
        .push((ns.to_string(), name.to_string(), patch.clone()));
    let Some(mut pod) = s.pods.get(&(ns.to_string(), name.to_string())).cloned() else {
        return respond(
            StatusCode::NOT_FOUND,
            &status(StatusCode::NOT_FOUND, "NotFound", "pod not found"),
        );
    };
    if let Some(uid) = patch["metadata"]["uid"].as_str() {
        if pod["metadata"]["uid"] != uid {
            let msg = format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                pod["metadata"]["uid"]
            );
            return respond(
                StatusCode::CONFLICT,
                &status(StatusCode::CONFLICT, "Conflict", &msg),
            );
        }
    }
    merge(&mut pod, &patch);
    s.emit(Kind::Pod, "MODIFIED", pod);
    let stored = s.pods[&(ns.to_string(), name.to_string())].clone();
    respond(StatusCode::OK, &stored)
}

/// RFC 7386: objects merge recursively, `null` removes a key, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}
