//! The control plane's xDS endpoint: Istio's delta ADS
//! (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`)
//! serving the workload file's workloads, services (`istio.workload.Address`) and policies
//! (`istio.security.Authorization`) to proxies, as istiod serves them to ztunnel.
//!
//! - Callers authenticate with the same bearer tokens as the CA, node and identity tokens
//!   alike; a stream whose token is removed from the tokens file (or given to another
//!   caller) is closed.
//! - Every caller gets every resource: a node proxy needs the destinations' identities too,
//!   and so does a waypoint or a dedicated-mode proxy (they resolve any destination and
//!   enforce policies the same way). Nothing in these resources is secret from a member of
//!   the mesh; subscriptions are wildcard, as upstream ztunnel's are.
//! - A resource's version is a hash of its encoded bytes, so a reconnecting client's
//!   `initial_resource_versions` tell exactly what it lacks, even across a control plane
//!   restart; on each file change only changed resources and removals are pushed.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;

use futures::channel::mpsc;
use futures::{SinkExt, Stream};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::guard::{self, Authenticate, Authenticated};
use super::tokens::{Caller, Digest, Tokens};
use crate::config::ControlplaneLimits;
use crate::limits::{KeyPermit, PerKey};
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::xds::convert::{address_to_any, authorization_to_any, AddressResource};
use crate::xds::LocalConfig;

/// The gRPC service. Tokens and the workload file are live views.
#[derive(Clone)]
pub struct XdsService {
    tokens: watch::Receiver<Arc<Tokens>>,
    config: watch::Receiver<Arc<LocalConfig>>,
    auth: Authenticate,
    /// Streams per token.
    streams: PerKey<Digest>,
    max_initial_resources: usize,
    snapshots: SnapshotCache,
}

impl XdsService {
    pub fn new(
        tokens: watch::Receiver<Arc<Tokens>>,
        config: watch::Receiver<Arc<LocalConfig>>,
    ) -> Self {
        Self::with_limits(tokens, config, &ControlplaneLimits::default())
    }

    pub fn with_limits(
        tokens: watch::Receiver<Arc<Tokens>>,
        config: watch::Receiver<Arc<LocalConfig>>,
        limits: &ControlplaneLimits,
    ) -> Self {
        XdsService {
            auth: Authenticate::new(tokens.clone()),
            tokens,
            config,
            streams: PerKey::new("xds_streams_per_token", limits.max_xds_streams_per_token),
            max_initial_resources: limits.max_initial_resources,
            snapshots: SnapshotCache::default(),
        }
    }

    /// The tonic service to add to a server (`Server::builder().add_service(..)`). Responses
    /// are not bounded (a full push of a large mesh exceeds tonic's 4 MiB); requests are.
    pub fn into_server(
        self,
        limits: &ControlplaneLimits,
    ) -> AggregatedDiscoveryServiceServer<XdsService> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(limits.max_xds_request_bytes)
            .max_encoding_message_size(usize::MAX)
    }
}

/// The snapshot of the current workload file, built once per version of it and shared by
/// every stream (not once per stream: a thousand streams would hold a thousand copies).
#[derive(Clone, Default)]
struct SnapshotCache(Arc<std::sync::Mutex<Option<Cached>>>);

/// A workload file version and its snapshot.
type Cached = (Arc<LocalConfig>, Arc<Snapshot>);

impl SnapshotCache {
    fn of(&self, cfg: &Arc<LocalConfig>) -> Arc<Snapshot> {
        let mut cached = self.0.lock().expect("poisoned");
        if let Some((c, s)) = cached.as_ref() {
            if Arc::ptr_eq(c, cfg) {
                return s.clone();
            }
        }
        let s = Arc::new(Snapshot::of(cfg));
        *cached = Some((cfg.clone(), s.clone()));
        s
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let Authenticated { caller, token } = guard::caller(&request, &self.auth)?;
        let permit = self.streams.admit(token, &caller).ok_or_else(|| {
            Status::resource_exhausted(
                "this token already holds the most xDS streams allowed at once",
            )
        })?;
        // One response waiting beside the one being sent: a client that does not read
        // holds two pushes, not a queue of them.
        let (tx, rx) = mpsc::channel(1);
        let conn = Connection {
            caller,
            token,
            _permit: permit,
            max_initial_resources: self.max_initial_resources,
            snapshots: self.snapshots.clone(),
            tokens: self.tokens.clone(),
            config: self.config.clone(),
            tx,
            subscribed: BTreeMap::new(),
            nonce: 0,
            snapshot: Arc::new(Snapshot::default()),
        };
        tokio::spawn(conn.run(request.into_inner()));
        Ok(Response::new(Box::pin(rx)))
    }
}

/// Everything served, by type URL then resource name: `(version, body)`.
#[derive(Default)]
struct Snapshot {
    by_type: BTreeMap<&'static str, BTreeMap<String, (String, prost_types::Any)>>,
}

impl Snapshot {
    fn of(cfg: &LocalConfig) -> Snapshot {
        let mut s = Snapshot::default();
        let mut put = |type_url: &'static str, name: String, any: prost_types::Any| {
            let version = format!("{:016x}", hash(&any.value));
            s.by_type
                .entry(type_url)
                .or_default()
                .insert(name, (version, any));
        };
        // Resource names as istiod names them: uid, namespace/hostname, namespace/name.
        for w in &cfg.workloads {
            let any = address_to_any(&AddressResource::Workload(w.clone()));
            put(ADDRESS_TYPE_URL, w.uid.clone(), any);
        }
        for svc in &cfg.services {
            let any = address_to_any(&AddressResource::Service(svc.clone()));
            put(ADDRESS_TYPE_URL, svc.key().to_string(), any);
        }
        for p in &cfg.policies {
            put(AUTHORIZATION_TYPE_URL, p.key(), authorization_to_any(p));
        }
        s
    }

    fn resources(
        &self,
        type_url: &str,
    ) -> impl Iterator<Item = (&String, &(String, prost_types::Any))> {
        self.by_type.get(type_url).into_iter().flatten()
    }

    /// Names the `system_version_info` of a type: a hash over all its versions.
    fn type_version(&self, type_url: &str) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (name, (version, _)) in self.resources(type_url) {
            name.hash(&mut h);
            version.hash(&mut h);
        }
        format!("{:016x}", h.finish())
    }
}

/// Stable within a build (SipHash with fixed keys); a different build at worst resends.
fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// One client stream.
struct Connection {
    caller: Caller,
    token: Digest,
    _permit: KeyPermit<Digest>,
    max_initial_resources: usize,
    snapshots: SnapshotCache,
    tokens: watch::Receiver<Arc<Tokens>>,
    config: watch::Receiver<Arc<LocalConfig>>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    /// Subscribed type → `name → version` the client has (as far as we know).
    subscribed: BTreeMap<&'static str, HashMap<String, String>>,
    nonce: u64,
    snapshot: Arc<Snapshot>,
}

impl Connection {
    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) {
        self.snapshot = self.snapshots.of(&self.config.borrow_and_update());
        info!(caller = %self.caller, "xDS stream open");
        let why = loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if let Err(e) = self.on_request(req).await {
                            break e;
                        }
                    }
                    Ok(None) => break "the client closed the stream".to_string(),
                    // Mostly a client killed or a network gone, not a bug of either side.
                    Err(s) => {
                        // A message refused (too large, undecodable) is told to the client;
                        // a client gone cannot hear it, which costs nothing.
                        let _ = self.tx.try_send(Err(s.clone()));
                        break format!("the stream failed ({})", s.message());
                    }
                },
                changed = self.config.changed() => {
                    if changed.is_err() {
                        break "the workload file watcher stopped".to_string();
                    }
                    self.snapshot = self.snapshots.of(&self.config.borrow_and_update());
                    if let Err(e) = self.push_all().await {
                        break e;
                    }
                }
                changed = self.tokens.changed() => {
                    let revoked = changed.is_err()
                        || self.tokens.borrow_and_update().caller_of_digest(&self.token) != Some(&self.caller);
                    if revoked {
                        let _ = self.tx.send(Err(Status::unauthenticated("bearer token revoked"))).await;
                        break "its token was revoked".to_string();
                    }
                }
            }
        };
        info!(caller = %self.caller, reason = %why, "xDS stream closed");
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), String> {
        let Some(type_url) = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]
            .into_iter()
            .find(|t| *t == req.type_url)
        else {
            warn!(caller = %self.caller, type_url = %req.type_url, "xDS request for an unsupported type, ignored");
            return Ok(());
        };
        if !req.response_nonce.is_empty() {
            match &req.error_detail {
                Some(e) => {
                    warn!(caller = %self.caller, %type_url, nonce = %req.response_nonce, error = %e.message, "NACKed")
                }
                None => {
                    debug!(caller = %self.caller, %type_url, nonce = %req.response_nonce, "ACKed")
                }
            }
            return Ok(());
        }
        // A (re)subscription: the client tells what it already has. Always answer, even
        // with nothing, so it knows it is in sync.
        debug!(caller = %self.caller, %type_url, known = req.initial_resource_versions.len(), "xDS subscribe");
        // What the client says it has is kept only until it is answered, and names this
        // server never had are answered as removed once: bounded by this and by the
        // request size limit.
        if req.initial_resource_versions.len() > self.max_initial_resources {
            crate::limits::hit(
                "xds_initial_resources",
                format_args!(
                    "{} sent {} initial_resource_versions, more than {}: stream closed",
                    self.caller,
                    req.initial_resource_versions.len(),
                    self.max_initial_resources
                ),
            );
            let _ = self
                .tx
                .send(Err(Status::resource_exhausted(format!(
                    "more than {} initial_resource_versions",
                    self.max_initial_resources
                ))))
                .await;
            return Err("too many initial_resource_versions".to_string());
        }
        self.subscribed
            .insert(type_url, req.initial_resource_versions);
        self.push(type_url, true).await
    }

    async fn push_all(&mut self) -> Result<(), String> {
        let types: Vec<&'static str> = self.subscribed.keys().copied().collect();
        for t in types {
            self.push(t, false).await?;
        }
        Ok(())
    }

    /// Sends what the client lacks of `type_url` and the names it holds that are gone.
    async fn push(&mut self, type_url: &'static str, always: bool) -> Result<(), String> {
        let snapshot = self.snapshot.clone();
        let Some(known) = self.subscribed.get_mut(type_url) else {
            return Ok(());
        };
        let mut resources = Vec::new();
        for (name, (version, any)) in snapshot.resources(type_url) {
            if known.get(name) != Some(version) {
                resources.push(Resource {
                    name: name.clone(),
                    version: version.clone(),
                    resource: Some(any.clone()),
                    ..Default::default()
                });
            }
        }
        let current = snapshot.by_type.get(type_url);
        let mut removed: Vec<String> = known
            .keys()
            .filter(|n| current.is_none_or(|c| !c.contains_key(*n)))
            .cloned()
            .collect();
        removed.sort();
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        *known = snapshot
            .resources(type_url)
            .map(|(n, (v, _))| (n.clone(), v.clone()))
            .collect();
        self.nonce += 1;
        let resp = DeltaDiscoveryResponse {
            system_version_info: snapshot.type_version(type_url),
            type_url: type_url.to_string(),
            nonce: self.nonce.to_string(),
            removed_resources: removed,
            resources,
        };
        debug!(caller = %self.caller, %type_url, nonce = %resp.nonce, updated = resp.resources.len(), removed = resp.removed_resources.len(), "xDS push");
        self.tx
            .send(Ok(resp))
            .await
            .map_err(|_| "the client went away".to_string())
    }
}

#[cfg(test)]
mod tests;
