//! The control plane's CA endpoint: Istio's `IstioCertificateService/CreateCertificate` over
//! TLS, signing with the built-in [`CertificateAuthority`].
//!
//! Who may have what, by the caller its bearer token names (see [`super::tokens`]):
//! - a node asks on behalf of a workload by naming the workload's SPIFFE URI as
//!   `ImpersonatedIdentity`; it gets that identity only if the workload file places a
//!   workload with that identity on that node. So a compromised node can mint the identities
//!   of its own workloads, and no others.
//! - a token given to a SPIFFE identity (a waypoint, gateway, sidecar or dedicated-mode
//!   proxy) gets that identity and no other: its CSR's SAN must be that identity, and an
//!   `ImpersonatedIdentity`, if sent at all, must name it too. The workload file is not
//!   consulted: the operator granted the identity by writing the line.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::guard::{capped_incoming, Authenticate};
use super::tokens::{Caller, Tokens};
use crate::config::ControlplaneLimits;
use crate::identity::ca::{requested_sans, CaError, CertificateAuthority, ServerCertPem};
use crate::identity::ca_client::{impersonated_identity, IMPERSONATED_IDENTITY};
use crate::identity::Identity;
use crate::limits::Cap;
use crate::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use crate::xds::LocalConfig;

/// The gRPC service. Tokens and workloads are live views: edits to their files apply to the
/// next request.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    auth: Authenticate,
    workloads: watch::Receiver<Arc<LocalConfig>>,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        tokens: watch::Receiver<Arc<Tokens>>,
        workloads: watch::Receiver<Arc<LocalConfig>>,
    ) -> Self {
        CaService {
            ca,
            auth: Authenticate::new(tokens),
            workloads,
        }
    }

    /// The identity `caller` may be issued for `req`, or why none.
    fn identity_for(
        &self,
        caller: &Caller,
        req: &IstioCertificateRequest,
    ) -> Result<Identity, Status> {
        let impersonated = impersonated(req)?;
        match (caller, impersonated) {
            (Caller::Node(node), Some(identity)) => {
                self.authorize(node, &identity)?;
                Ok(identity)
            }
            (Caller::Node(node), None) => Err(Status::permission_denied(format!(
                "node {node} asked for a certificate{} without {IMPERSONATED_IDENTITY}: a node \
                 token obtains only its workloads' certificates, each named as \
                 {IMPERSONATED_IDENTITY} in the request metadata; a proxy asking for its own \
                 identity (waypoint, gateway, sidecar, dedicated mode) needs a token given to \
                 that identity in the tokens file: `<token> spiffe://{}/ns/<ns>/sa/<sa>`",
                requested_sans(&req.csr)
                    .map(|sans| format!(" for {}", sans.join(", ")))
                    .unwrap_or_default(),
                self.ca.trust_domain(),
            ))),
            (Caller::Identity(own), Some(other)) if other != *own => {
                Err(Status::permission_denied(format!(
                    "the token of {own} obtains only that identity, not {other} \
                     ({IMPERSONATED_IDENTITY}): only node tokens may impersonate"
                )))
            }
            // Naming itself as ImpersonatedIdentity changes nothing, so it is allowed.
            (Caller::Identity(own), _) => Ok(own.clone()),
        }
    }

    /// A node may obtain an identity only if one of the workloads on it has that identity.
    fn authorize(&self, node: &str, identity: &Identity) -> Result<(), Status> {
        let config = self.workloads.borrow().clone();
        let mut elsewhere = BTreeSet::new();
        for w in config
            .workloads
            .iter()
            .filter(|w| w.identity() == *identity)
        {
            if w.node == node {
                return Ok(());
            }
            elsewhere.insert(if w.node.is_empty() {
                "<no node>"
            } else {
                w.node.as_str()
            });
        }
        let why = if elsewhere.is_empty() {
            "no workload in the workload file has that identity".to_string()
        } else {
            let nodes: Vec<&str> = elsewhere.into_iter().collect();
            format!("its workloads are on node(s) {}", nodes.join(", "))
        };
        Err(Status::permission_denied(format!(
            "node {node} may not obtain a certificate for {identity}: {why}"
        )))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = super::guard::caller(&request, &self.auth)?.caller;
        let req = request.into_inner();
        let identity = self.identity_for(&caller, &req).inspect_err(
            |s| warn!(%caller, reason = %s.message(), "certificate request refused"),
        )?;
        let ttl = u64::try_from(req.validity_duration).map_err(|_| {
            Status::invalid_argument(format!(
                "validity_duration must not be negative, got {}",
                req.validity_duration
            ))
        })?;
        let chain = self
            .ca
            .sign_csr(&req.csr, &identity, Duration::from_secs(ttl))
            .map_err(|e| {
                let status = ca_error_status(&caller, &e);
                warn!(%caller, %identity, error = %e, "certificate request refused");
                status
            })?;
        info!(%caller, %identity, requested_ttl_secs = ttl, "certificate issued");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// The request's `ImpersonatedIdentity`, if it has one.
fn impersonated(req: &IstioCertificateRequest) -> Result<Option<Identity>, Status> {
    impersonated_identity(req.metadata.as_ref())
        .map(|uri| {
            uri.parse()
                .map_err(|e| Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}")))
        })
        .transpose()
}

fn ca_error_status(caller: &Caller, e: &CaError) -> Status {
    match e {
        // For a node the CSR merely disagrees with its own ImpersonatedIdentity; an identity
        // token's holder is asking for an identity it was not given.
        CaError::IdentityMismatch { .. } | CaError::ForeignTrustDomain { .. }
            if matches!(caller, Caller::Identity(_)) =>
        {
            Status::permission_denied(format!(
                "the token of {caller} obtains only that identity: {e}"
            ))
        }
        CaError::MalformedCsr(_)
        | CaError::BadCsrSignature
        | CaError::IdentityMismatch { .. }
        | CaError::ForeignTrustDomain { .. } => Status::invalid_argument(e.to_string()),
        CaError::Storage { .. } | CaError::Signing(_) => Status::internal(e.to_string()),
    }
}

/// The addresses the serving certificate must name for a listener on `listen`: that address,
/// or, for a wildcard listener, every address of this host (a client may use any of them).
pub fn serving_ips(listen: SocketAddr) -> Vec<IpAddr> {
    let ip = listen.ip();
    if !ip.is_unspecified() {
        return vec![ip];
    }
    let mut ips: BTreeSet<IpAddr> = [IpAddr::from([127, 0, 0, 1])].into();
    if listen.is_ipv6() {
        ips.insert(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]));
    }
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => {
            for a in addrs {
                let Some(sa) = a.address else { continue };
                if let Some(v4) = sa.as_sockaddr_in() {
                    ips.insert(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    // Link-local addresses need a zone to be dialled: no client uses them.
                    let v6 = v6.ip();
                    if listen.is_ipv6() && (v6.segments()[0] & 0xffc0) != 0xfe80 {
                        ips.insert(IpAddr::V6(v6));
                    }
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot list this host's addresses; the CA certificate names loopback only")
        }
    }
    ips.into_iter().collect()
}

/// A running CA server.
pub struct RunningCaServer {
    local_addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningCaServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight requests finish, and closes the listener.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        self.task
            .await
            .context("CA server task")?
            .context("CA server")
    }
}

/// Serves `service` on `listener` over TLS with `cert` (leaf first, then the root).
pub fn serve(
    service: CaService,
    listener: TcpListener,
    cert: &ServerCertPem,
) -> anyhow::Result<RunningCaServer> {
    serve_with_xds(service, None, listener, cert)
}

/// [`serve`], plus delta xDS on the same port when given (istiod serves both on 15012).
pub fn serve_with_xds(
    service: CaService,
    xds: Option<super::xds_server::XdsService>,
    listener: TcpListener,
    cert: &ServerCertPem,
) -> anyhow::Result<RunningCaServer> {
    serve_with_limits(service, xds, listener, cert, &ControlplaneLimits::default())
}

/// [`serve_with_xds`] within `limits`. Every call is authenticated by an interceptor
/// before its body is read; each service decodes messages only up to its own size.
pub fn serve_with_limits(
    service: CaService,
    xds: Option<super::xds_server::XdsService>,
    listener: TcpListener,
    cert: &ServerCertPem,
    limits: &ControlplaneLimits,
) -> anyhow::Result<RunningCaServer> {
    let local_addr = listener.local_addr()?;
    let identity = tonic::transport::Identity::from_pem(cert.chain.concat(), &cert.key);
    let tls = ServerTlsConfig::new()
        .identity(identity)
        .timeout(limits.tls_handshake_timeout);
    let mut builder = Server::builder()
        .tls_config(tls)
        .context("CA server TLS settings")?
        .max_concurrent_streams(limits.max_streams_per_connection)
        .timeout(limits.request_timeout)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .http2_max_pending_accept_reset_streams(Some(limits.max_pending_resets))
        .http2_max_local_error_reset_streams(Some(limits.max_local_resets))
        .http2_max_header_list_size(limits.max_header_bytes);
    let auth = service.auth.clone();
    let ca =
        IstioCertificateServiceServer::new(service).max_decoding_message_size(limits.max_csr_bytes);
    let xds = xds.map(|x| {
        tonic::service::interceptor::InterceptedService::new(x.into_server(limits), auth.clone())
    });
    let router = builder
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ca,
            auth.clone(),
        ))
        .add_optional_service(xds);
    let (tx, rx) = oneshot::channel::<()>();
    let cap = Cap::new("controlplane_connections", limits.max_connections);
    let incoming = capped_incoming(listener, cap);
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
    });
    Ok(RunningCaServer {
        local_addr,
        shutdown: tx,
        task,
    })
}
