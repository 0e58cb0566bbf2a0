//! Istio delta xDS client: keeps a [`StateStore`] in step with istiod (or `ztunnel
//! controlplane`) over `envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`, subscribed to workloads/services
//! (`istio.workload.Address`) and L4 policies (`istio.security.Authorization`), as istiod
//! serves them to ztunnel.
//!
//! - Every response is answered: ACK (its nonce), or NACK (its nonce and an `error_detail`
//!   naming each rejected resource and why). Valid resources of a NACKed response are still
//!   applied; rejected ones keep their previous version (see [`resources`]).
//! - When the stream breaks, the state is left as it is (the data path keeps working on the
//!   last good view) and the client reconnects with exponential backoff and jitter. The new
//!   stream carries `initial_resource_versions`, so the server sends only what changed and
//!   the removals it missed.
//! - Each connection re-reads the bearer token (projected tokens rotate) and the root
//!   certificate (a ConfigMap may be updated).

mod resources;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use futures::channel::mpsc;
use prost_types::{value::Kind, Struct, Value};
use serde::Serialize;
use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

pub use resources::{Outcome, Resources, TYPE_URLS};

use crate::metrics::xds::{Termination, XdsMetrics};
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use crate::proto::google::rpc::Status as RpcStatus;
use crate::state::StateStore;

/// gRPC code sent in NACKs (`google.rpc.Code.INVALID_ARGUMENT`).
const INVALID_ARGUMENT: i32 = 3;

/// How long the server may take to accept a new stream (istiod answers at once).
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Who this proxy is and where its control plane is.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// `https://HOST:PORT` (upstream's `XDS_ADDRESS`, e.g.
    /// `https://istiod.istio-system.svc:15012`); `http://` for tests only.
    pub address: String,
    /// PEM root(s) the server's certificate must chain to; required for `https://`.
    pub root_cert: Option<PathBuf>,
    /// Bearer token sent as `authorization: Bearer <token>`, re-read per connection.
    pub token_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when not the address's host.
    pub tls_name: Option<String>,
    /// Extra request headers (Istio's `XDS_HEADER_*`).
    pub headers: Vec<(String, String)>,
    /// The Kubernetes node this proxy serves (metadata `NODE_NAME`).
    pub node_name: String,
    /// This ztunnel's own pod (node id and metadata `NAME`/`NAMESPACE`).
    pub pod_name: String,
    pub pod_namespace: String,
    /// The pod's IPs (node id and metadata `INSTANCE_IPS`).
    pub instance_ips: Vec<IpAddr>,
    /// Metadata `CLUSTER_ID` (istiod's multi-cluster key), default `Kubernetes`.
    pub cluster_id: String,
    /// DNS domain of the cluster, for the node id, default `cluster.local`.
    pub cluster_domain: String,
    /// Extra metadata (upstream passes its `ISTIO_META_*` variables, prefix stripped).
    pub metadata: BTreeMap<String, String>,
    /// First reconnect delay; doubles per failed attempt up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
}

impl XdsConfig {
    /// Defaults for everything but the address and the node.
    pub fn new(address: impl Into<String>, node_name: impl Into<String>) -> Self {
        XdsConfig {
            address: address.into(),
            root_cert: None,
            token_file: None,
            tls_name: None,
            headers: Vec::new(),
            node_name: node_name.into(),
            pod_name: String::new(),
            pod_namespace: String::new(),
            instance_ips: Vec::new(),
            cluster_id: "Kubernetes".into(),
            cluster_domain: "cluster.local".into(),
            metadata: BTreeMap::new(),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// [`XdsConfig::new`] plus the pod facts of `ztunnel run`'s configuration (flags or
    /// the environment variables upstream's DaemonSet sets: `POD_NAME`, `POD_NAMESPACE`,
    /// `INSTANCE_IP`, `CLUSTER_ID`, `CLUSTER_DOMAIN` and every `ISTIO_META_*`).
    pub fn for_run(address: impl Into<String>, args: &crate::config::RunArgs) -> Self {
        let mut c = XdsConfig::new(address, args.node_name.clone());
        c.pod_name = args.pod_name.clone();
        c.pod_namespace = args.pod_namespace.clone();
        c.instance_ips = args.instance_ip.clone();
        c.cluster_id = args.cluster_id.clone();
        c.cluster_domain = args.cluster_domain.clone();
        c.metadata = args.istio_meta.clone();
        c
    }

    /// The node as istiod expects a ztunnel to describe itself: id
    /// `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.<domain>` and string metadata.
    pub fn node(&self) -> Node {
        let ip = self
            .instance_ips
            .first()
            .map_or_else(|| "0.0.0.0".to_string(), IpAddr::to_string);
        let ns = &self.pod_namespace;
        let ips: Vec<String> = self.instance_ips.iter().map(IpAddr::to_string).collect();
        let mut fields: BTreeMap<String, String> = self.metadata.clone();
        for (k, v) in [
            ("NAME", self.pod_name.clone()),
            ("NAMESPACE", ns.clone()),
            ("INSTANCE_IPS", ips.join(",")),
            ("NODE_NAME", self.node_name.clone()),
            ("CLUSTER_ID", self.cluster_id.clone()),
        ] {
            fields.insert(k.to_string(), v);
        }
        // The version istiod sees: `ISTIO_META_ISTIO_VERSION` when the deployment sets it
        // (Istio's chart does), so istiod treats us as the Istio release it was installed
        // with; else ours.
        fields
            .entry("ISTIO_VERSION".to_string())
            .or_insert_with(|| env!("CARGO_PKG_VERSION").to_string());
        Node {
            id: format!(
                "ztunnel~{ip}~{}.{ns}~{ns}.svc.{}",
                self.pod_name, self.cluster_domain
            ),
            metadata: Some(Struct {
                fields: fields
                    .into_iter()
                    .map(|(k, v)| {
                        let v = Value {
                            kind: Some(Kind::StringValue(v)),
                        };
                        (k, v)
                    })
                    .collect(),
            }),
            user_agent_name: "ztunnel-ebpf".into(),
            ..Default::default()
        }
    }
}

/// What the admin page shows about the xDS connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsStatus {
    pub address: String,
    pub connected: bool,
    /// Streams opened since start (reconnects + 1).
    pub connections: u64,
    /// Every type has had its first response since start: the state is a real view.
    pub synced: bool,
    /// Why the last connection attempt or stream failed.
    pub last_error: Option<String>,
    /// Per type URL.
    pub types: BTreeMap<String, TypeStatus>,
    pub last_nack: Option<NackStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// Resources held.
    pub resources: usize,
    /// `system_version_info` and nonce of the last ACKed response.
    pub last_ack_version: String,
    pub last_ack_nonce: String,
    /// Unix seconds of the last ACK.
    pub last_ack_at: u64,
    pub acks: u64,
    pub nacks: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NackStatus {
    pub type_url: String,
    pub nonce: String,
    pub error: String,
}

pub struct XdsClient {
    config: XdsConfig,
    uri: http::Uri,
    status: watch::Sender<XdsStatus>,
    /// `istio_xds_*` (unregistered, so uncounted, unless given with `with_metrics`).
    metrics: XdsMetrics,
}

/// How a stream ended: the error for the log and status, the `reason` for
/// `istio_xds_connection_terminations`.
struct Ended {
    reason: Termination,
    error: anyhow::Error,
}

trait EndedAs<T> {
    fn ended_as(self, reason: Termination) -> Result<T, Ended>;
}

impl<T> EndedAs<T> for anyhow::Result<T> {
    fn ended_as(self, reason: Termination) -> Result<T, Ended> {
        self.map_err(|error| Ended { reason, error })
    }
}

/// A failed stream's status, judged as upstream judges it: the codes servers end
/// healthy streams with (istiod's `MaxConnectionAge`, a GOAWAY, a cancelled or expired
/// stream) are a reconnect, anything else an error.
fn stream_failure(s: &tonic::Status) -> Termination {
    use tonic::Code;
    let closing = s.message().contains("transport is closing")
        || s.message().contains("received prior goaway");
    match s.code() {
        Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => Termination::Reconnect,
        Code::Unavailable if closing => Termination::Reconnect,
        _ => Termination::Error,
    }
}

impl XdsClient {
    /// Checks the address and, for `https://`, that a root certificate file is given. No
    /// connection is made until [`XdsClient::run`].
    pub fn new(config: XdsConfig) -> anyhow::Result<XdsClient> {
        let uri: http::Uri = config
            .address
            .parse()
            .with_context(|| format!("xDS address {:?} is not a URL", config.address))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("https"), Some(_)) if config.root_cert.is_none() => anyhow::bail!(
                "xDS address {:?} is https: a root certificate to verify it is required",
                config.address
            ),
            (Some("https" | "http"), Some(_)) => {}
            _ => anyhow::bail!(
                "xDS address {:?} must look like https://HOST:PORT",
                config.address
            ),
        }
        let status = watch::Sender::new(XdsStatus {
            address: config.address.clone(),
            ..Default::default()
        });
        Ok(XdsClient {
            config,
            uri,
            status,
            metrics: XdsMetrics::default(),
        })
    }

    /// Counts into `metrics` (the node's registered `istio_xds_*`).
    pub fn with_metrics(mut self, metrics: XdsMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// A live view of the connection's status (for the admin page and readiness).
    pub fn status(&self) -> watch::Receiver<XdsStatus> {
        self.status.subscribe()
    }

    /// Connects, applies every push to `store`, and reconnects forever. Abort the task to
    /// stop it.
    pub async fn run(self, store: Arc<StateStore>) {
        let mut held = Resources::default();
        let mut delay = self.config.backoff_initial;
        loop {
            let mut got_response = false;
            let result = self.session(&store, &mut held, &mut got_response).await;
            let why = match result {
                Ok(()) => {
                    self.metrics.terminated(Termination::Complete);
                    "the server closed the stream".to_string()
                }
                Err(e) => {
                    self.metrics.terminated(e.reason);
                    format!("{:#}", e.error)
                }
            };
            if got_response {
                // The server was healthy for a while: start the backoff over.
                delay = self.config.backoff_initial;
            }
            warn!(address = %self.config.address, error = %why, retry_in = ?delay, "xDS connection lost; keeping the last state");
            self.status.send_modify(|s| {
                s.connected = false;
                s.last_error = Some(why);
            });
            // Full-range jitter in [delay/2, delay]: nodes that lost istiod together do not
            // come back in lockstep.
            tokio::time::sleep(delay.mul_f64(0.5 + rand::random::<f64>() / 2.0)).await;
            delay = (delay * 2).min(self.config.backoff_max);
        }
    }

    /// A failure to read the root certificate is an `Error`, one to reach the server a
    /// `ConnectionError`.
    async fn connect(&self) -> Result<Channel, Ended> {
        let mut endpoint = Endpoint::from(self.uri.clone())
            .connect_timeout(self.config.connect_timeout)
            // Detect a silently dead connection (node reboot, NAT drop) within ~40 s.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if let Some(path) = &self.config.root_cert {
            let pem = crate::identity::roots::root_pem(path, "xDS root certificate")
                .ended_as(Termination::Error)?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(name) = &self.config.tls_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .context("xDS TLS settings")
                .ended_as(Termination::Error)?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot connect to {}: {}", self.config.address, chain(&e))
            })
            .ended_as(Termination::ConnectionError)
    }

    async fn bearer(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.config.token_file else {
            return Ok(None);
        };
        let token = tokio::fs::read_to_string(path)
            .await
            .with_context(|| format!("reading the xDS token file {}", path.display()))?;
        let token = token.trim();
        if token.is_empty() {
            anyhow::bail!("xDS token file {} is empty", path.display());
        }
        Ok(Some(format!("Bearer {token}")))
    }

    /// One stream, from connect to its end. Returns `Ok` when the server ends it cleanly.
    async fn session(
        &self,
        store: &StateStore,
        held: &mut Resources,
        got_response: &mut bool,
    ) -> Result<(), Ended> {
        let bearer = self.bearer().await.ended_as(Termination::Error)?;
        let channel = self.connect().await?;
        let (tx, rx) = mpsc::unbounded::<DeltaDiscoveryRequest>();
        let node = self.config.node();
        for type_url in TYPE_URLS {
            // Empty subscribe list = wildcard: everything of that type (not on-demand).
            let _ = tx.unbounded_send(DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: type_url.to_string(),
                initial_resource_versions: held.versions(type_url),
                ..Default::default()
            });
        }
        let mut request = tonic::Request::new(rx);
        for (k, v) in &self.config.headers {
            // Checked when read (`config::istio_settings::headers`).
            if let (Ok(k), Ok(v)) = (
                k.parse::<tonic::metadata::AsciiMetadataKey>(),
                v.parse::<tonic::metadata::AsciiMetadataValue>(),
            ) {
                request.metadata_mut().insert(k, v);
            }
        }
        if let Some(b) = bearer {
            let value = b
                .parse()
                .context("the xDS token holds characters not allowed in a header")
                .ended_as(Termination::Error)?;
            request.metadata_mut().insert("authorization", value);
            // istiod's multi-cluster token check reads the caller's cluster from here.
            if let Ok(v) = self.config.cluster_id.parse() {
                request.metadata_mut().insert("clusterid", v);
            }
        }
        let mut ads =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let open = ads.delta_aggregated_resources(request);
        // A server that accepts but never answers must not park the client forever.
        let mut stream = tokio::time::timeout(STREAM_OPEN_TIMEOUT, open)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the server did not answer the xDS stream within {STREAM_OPEN_TIMEOUT:?}"
                )
            })
            .and_then(|r| {
                r.map_err(|s| anyhow::anyhow!("opening the xDS stream: {}", describe(&s)))
            })
            .ended_as(Termination::ConnectionError)?
            .into_inner();
        info!(address = %self.config.address, node = %node.id, "xDS stream open");
        self.status.send_modify(|s| {
            s.connected = true;
            s.connections += 1;
            s.last_error = None;
        });
        let mut seen: Vec<String> = Vec::new();
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(s) => {
                    return Err(anyhow::anyhow!("xDS stream failed: {}", describe(&s)))
                        .ended_as(stream_failure(&s))
                }
            };
            *got_response = true;
            let bytes = resp.resources.iter().filter_map(|r| r.resource.as_ref());
            self.metrics.received(
                &resp.type_url,
                bytes.map(|any| any.value.len() as u64).sum(),
            );
            let outcome = held.apply(store, &resp);
            let nack = outcome.nack_detail();
            tx.unbounded_send(answer(&resp, nack.clone()))
                .context("the request stream closed")
                .ended_as(Termination::Error)?;
            if !seen.contains(&resp.type_url) {
                seen.push(resp.type_url.clone());
            }
            self.record(&resp, &outcome, nack, held, &seen);
        }
    }

    fn record(
        &self,
        resp: &DeltaDiscoveryResponse,
        outcome: &Outcome,
        nack: Option<String>,
        held: &Resources,
        seen: &[String],
    ) {
        match &nack {
            Some(e) => {
                warn!(type_url = %resp.type_url, nonce = %resp.nonce, error = %e, "xDS response NACKed")
            }
            None => debug!(
                type_url = %resp.type_url,
                version = %resp.system_version_info,
                updated = outcome.updated,
                removed = outcome.removed,
                "xDS response ACKed"
            ),
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.status.send_modify(|s| {
            let t = s.types.entry(resp.type_url.clone()).or_default();
            t.resources = held.count(&resp.type_url);
            match nack {
                Some(error) => {
                    t.nacks += 1;
                    s.last_nack = Some(NackStatus {
                        type_url: resp.type_url.clone(),
                        nonce: resp.nonce.clone(),
                        error,
                    });
                }
                None => {
                    t.acks += 1;
                    t.last_ack_version = resp.system_version_info.clone();
                    t.last_ack_nonce = resp.nonce.clone();
                    t.last_ack_at = now;
                }
            }
            if !s.synced && TYPE_URLS.iter().all(|t| seen.iter().any(|s| s == t)) {
                info!("xDS initial sync complete");
                s.synced = true;
            }
        });
    }
}

/// `ztunnel run`'s xDS source, from `--xds-address`, `--xds-root-cert` (default
/// `--ca-root-cert`), `--ca-token-file` and `--node-name`, plus the pod facts upstream's
/// DaemonSet passes (see [`XdsConfig::for_run`]). Spawns the client on
/// the current runtime; `None` without `--xds-address`. Abort the task to stop it.
pub fn spawn_for_run(
    args: &crate::config::RunArgs,
    store: Arc<StateStore>,
    metrics: &XdsMetrics,
) -> anyhow::Result<Option<(tokio::task::JoinHandle<()>, watch::Receiver<XdsStatus>)>> {
    let Some(address) = &args.xds_address else {
        return Ok(None);
    };
    let mut config = XdsConfig::for_run(address.clone(), args);
    config.root_cert = args
        .xds_root_cert
        .clone()
        .or_else(|| args.ca_root_cert.clone());
    config.token_file = args.ca_token_file.clone();
    config.tls_name = args.xds_tls_name.clone();
    config.headers = crate::config::istio_settings::headers("XDS_HEADER_", std::env::vars())
        .map_err(anyhow::Error::msg)?;
    let client = XdsClient::new(config)
        .context("--xds-address (XDS_ADDRESS)")?
        .with_metrics(metrics.clone());
    let status = client.status();
    info!(%address, node = %args.node_name, "getting workloads, services and policies over xDS");
    Ok(Some((tokio::spawn(client.run(store)), status)))
}

/// The ACK (no error) or NACK for a response.
fn answer(resp: &DeltaDiscoveryResponse, nack: Option<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        error_detail: nack.map(|message| RpcStatus {
            code: INVALID_ARGUMENT,
            message,
            details: Vec::new(),
        }),
        initial_resource_versions: HashMap::new(),
        ..Default::default()
    }
}

fn describe(s: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", s.code(), s.message());
    if let Some(src) = std::error::Error::source(s) {
        let more = chain(src);
        if !text.contains(&more) {
            text.push_str(&format!(" ({more})"));
        }
    }
    text
}

/// An error and its causes, each once (hyper and tonic repeat each other).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let t = err.to_string();
        if !t.is_empty() && !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_fake;
