//! A [`CaClient`] over Istio's gRPC CA API (`istio.v1.auth.IstioCertificateService`), as
//! served by istiod on 15012 or by `ztunnel controlplane`.
//!
//! Like upstream's node proxy, it asks on behalf of each workload: the workload's SPIFFE URI
//! goes into the request's metadata as `ImpersonatedIdentity`, and the caller proves who *it*
//! is with a bearer token (a Kubernetes projected service-account token in a cluster).
//! A proxy that is itself the workload (a waypoint, a dedicated-mode proxy) asks instead for
//! its own identity, with no `ImpersonatedIdentity`: [`GrpcCaClient::for_own_identity`].

use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use prost_types::{value::Kind, Struct, Value};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use super::manager::{CaClient, CaClientError};
use super::Identity;
use crate::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::istio::v1::auth::IstioCertificateRequest;

/// Metadata key naming the identity a node proxy asks a certificate for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct GrpcCaClient {
    address: String,
    client: IstioCertificateServiceClient<Channel>,
    token_file: Option<PathBuf>,
    /// Whether requests name the identity as `ImpersonatedIdentity` (a node proxy asking for
    /// its workloads) or leave it to the CSR alone (a proxy asking for itself).
    impersonate: bool,
    /// Extra request headers (Istio's `CA_HEADER_*`), checked when read.
    headers: Vec<(
        tonic::metadata::AsciiMetadataKey,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
}

/// How to reach the CA besides its address, root and token.
#[derive(Debug, Clone, Default)]
pub struct CaDialOptions {
    /// The name the CA's certificate must carry, when not the address's host.
    pub tls_name: Option<String>,
    /// Extra request headers, as `(name, value)`.
    pub headers: Vec<(String, String)>,
}

impl GrpcCaClient {
    /// `address` is a URL, `https://HOST:PORT` (upstream's `CA_ADDRESS`); the CA's
    /// certificate must chain to the PEM root(s) in `root_cert_pem_path` (a file, `SYSTEM`
    /// or the PEM text: see [`super::roots`]) and name HOST.
    /// `token_file`, if given, is read at every request (projected tokens rotate) and sent as
    /// `authorization: Bearer <token>`. No connection is made until the first request, so a
    /// CA that is down at start is not an error here. Must be called within a tokio runtime
    /// (the channel spawns its worker task).
    pub fn new(
        address: &str,
        root_cert_pem_path: impl AsRef<Path>,
        token_file: Option<impl AsRef<Path>>,
    ) -> anyhow::Result<Self> {
        Self::with_options(
            address,
            root_cert_pem_path,
            token_file,
            CaDialOptions::default(),
        )
    }

    /// [`GrpcCaClient::new`] with a TLS name and extra headers.
    pub fn with_options(
        address: &str,
        root_cert_pem_path: impl AsRef<Path>,
        token_file: Option<impl AsRef<Path>>,
        opts: CaDialOptions,
    ) -> anyhow::Result<Self> {
        let root = super::roots::root_pem(root_cert_pem_path.as_ref(), "CA root certificate")?;
        let uri: http::Uri = address
            .parse()
            .with_context(|| format!("CA address {address:?} is not a URL"))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            anyhow::bail!("CA address {address:?} must look like https://HOST:PORT");
        }
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root));
        if let Some(name) = opts.tls_name {
            tls = tls.domain_name(name);
        }
        let mut headers = Vec::with_capacity(opts.headers.len());
        for (k, v) in &opts.headers {
            let key = k
                .parse()
                .with_context(|| format!("{k:?} is not a header name"))?;
            let value = v.parse().with_context(|| {
                format!("the value of header {k:?} is not a valid header value")
            })?;
            headers.push((key, value));
        }
        let endpoint = Endpoint::from(uri)
            .tls_config(tls)
            .with_context(|| format!("TLS settings for CA {address}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        // Lazy: connects on first use and reconnects after the CA restarts.
        let client = IstioCertificateServiceClient::new(endpoint.connect_lazy());
        Ok(GrpcCaClient {
            address: address.to_string(),
            client,
            token_file: token_file.map(|p| p.as_ref().to_path_buf()),
            impersonate: true,
            headers,
        })
    }

    /// Asks for the caller's own identity: requests carry no `ImpersonatedIdentity`, only
    /// the CSR's SAN, as a waypoint, gateway, sidecar or dedicated-mode proxy asks. The
    /// identity passed to [`CaClient::sign`] must then be the one the bearer token was
    /// given (`ztunnel controlplane`: a `<token> spiffe://...` line; istiod: the token's
    /// service account), or the CA refuses.
    pub fn for_own_identity(mut self) -> Self {
        self.impersonate = false;
        self
    }

    async fn bearer(&self) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>, CaClientError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        // A missing or empty token is retried later: the kubelet may not have written it yet.
        let token = tokio::fs::read_to_string(path).await.map_err(|e| {
            CaClientError::Unavailable(format!("cannot read CA token file {}: {e}", path.display()))
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(CaClientError::Unavailable(format!(
                "CA token file {} is empty",
                path.display()
            )));
        }
        let value = format!("Bearer {token}").parse().map_err(|_| {
            CaClientError::Rejected(format!(
                "CA token file {} holds characters not allowed in a header",
                path.display()
            ))
        })?;
        Ok(Some(value))
    }

    fn describe(&self, status: &Status) -> CaClientError {
        describe_status(&self.address, status)
    }
}

#[async_trait]
impl CaClient for GrpcCaClient {
    async fn sign(
        &self,
        csr_pem: String,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaClientError> {
        let metadata = self.impersonate.then(|| Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                Value {
                    kind: Some(Kind::StringValue(identity.to_string())),
                },
            )]
            .into_iter()
            .collect(),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        for (k, v) in &self.headers {
            request.metadata_mut().insert(k.clone(), v.clone());
        }
        if let Some(bearer) = self.bearer().await? {
            request.metadata_mut().insert("authorization", bearer);
        }
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|s| self.describe(&s))?
            .into_inner();
        if response.cert_chain.is_empty() {
            return Err(CaClientError::Unavailable(format!(
                "CA {} returned an empty certificate chain",
                self.address
            )));
        }
        Ok(response.cert_chain)
    }
}

/// Turns a gRPC status into an error that says what went wrong in plain words: the CA
/// could not be reached, the TLS handshake failed (and why), or the CA said no (and why).
fn describe_status(address: &str, status: &Status) -> CaClientError {
    // hyper and tonic wrap errors in layers that repeat each other: keep each text once.
    let mut causes = vec![status.message().to_string()];
    let mut tls_failure = None;
    let mut source = status.source();
    while let Some(err) = source {
        let text = err.to_string();
        if !causes.contains(&text) {
            causes.push(text);
        }
        if let Some(e) = as_rustls_error(err) {
            tls_failure = Some(e.to_string());
        }
        source = err.source();
    }
    causes.retain(|c| !c.is_empty());
    let detail = causes.join(": ");
    if let Some(tls) = tls_failure {
        return CaClientError::Unavailable(format!(
            "TLS handshake with CA {address} failed: {tls}"
        ));
    }
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
            CaClientError::Unavailable(format!("cannot reach CA {address}: {detail}"))
        }
        Code::Internal | Code::Unknown | Code::ResourceExhausted | Code::DataLoss => {
            CaClientError::Unavailable(format!(
                "CA {address} failed ({:?}): {detail}",
                status.code()
            ))
        }
        code => CaClientError::Rejected(format!("CA {address} refused ({code:?}): {detail}")),
    }
}

/// rustls errors arrive wrapped in `io::Error`s somewhere in the chain.
fn as_rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(e) = err.downcast_ref::<rustls::Error>() {
        return Some(e);
    }
    err.downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// The `ImpersonatedIdentity` of a request's metadata, if any (for servers).
pub fn impersonated_identity(metadata: Option<&Struct>) -> Option<&str> {
    match metadata?.fields.get(IMPERSONATED_IDENTITY)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s),
        _ => None,
    }
}
