//! The HBONE client side: an HTTP/2 connection over mTLS, and CONNECT streams on it.

use std::net::SocketAddr;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderValue, Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use super::keepalive::Keepalive;
use super::{authority, client_builder, forwarded_value, H2Stream, HboneError};
use super::{HEADER_BAGGAGE, HEADER_FORWARDED, HEADER_SOURCE_PORT, HEADER_TRACEPARENT};

/// What to tunnel: the original destination and the context that travels with it.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    pub target: SocketAddr,
    /// The original client's address: the IP sent as `forwarded: for=<ip>`, the port
    /// (unless 0) as `ztunnel-source-port`.
    pub source: Option<SocketAddr>,
    pub baggage: Option<String>,
    pub traceparent: Option<String>,
}

impl ConnectRequest {
    pub fn new(target: SocketAddr) -> Self {
        ConnectRequest {
            target,
            source: None,
            baggage: None,
            traceparent: None,
        }
    }

    fn to_http(&self) -> Result<Request<()>, HboneError> {
        let bad = |e: &dyn std::fmt::Display| HboneError::Request(e.to_string());
        let mut req = Request::builder()
            .method(Method::CONNECT)
            // An authority-form URI: h2 then sends only `:method` and `:authority`.
            .uri(authority(self.target))
            .body(())
            .map_err(|e| bad(&e))?;
        let headers = req.headers_mut();
        if let Some(src) = self.source {
            headers.insert(HEADER_FORWARDED, forwarded_value(src.ip()));
            if src.port() != 0 {
                headers.insert(HEADER_SOURCE_PORT, HeaderValue::from(src.port()));
            }
        }
        if let Some(b) = &self.baggage {
            headers.insert(
                HEADER_BAGGAGE,
                HeaderValue::from_str(b).map_err(|e| bad(&e))?,
            );
        }
        if let Some(t) = &self.traceparent {
            headers.insert(
                HEADER_TRACEPARENT,
                HeaderValue::from_str(t).map_err(|e| bad(&e))?,
            );
        }
        Ok(req)
    }
}

/// HTTP/2 client handshake over an established (mTLS) stream. The connection is driven by a
/// spawned task, which ends when the connection does; the `JoinHandle` tells when.
pub async fn handshake<IO>(
    io: IO,
) -> Result<(SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    handshake_with(io, None).await
}

/// [`handshake`], PINGing the peer per `keepalive`: when a PING goes unanswered the
/// connection is closed and the driver ends (so a pool sees it dead).
pub async fn handshake_with<IO>(
    io: IO,
    keepalive: Option<Keepalive>,
) -> Result<(SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut conn) = client_builder().handshake(io).await?;
    let pings = keepalive.and_then(|k| Some((conn.ping_pong()?, k)));
    let driver = tokio::spawn(async move {
        let dead = async move {
            match pings {
                Some((pp, k)) => super::keepalive::unanswered(pp, k).await,
                None => std::future::pending().await,
            }
        };
        let r = tokio::select! {
            r = conn => r,
            why = dead => {
                tracing::debug!(%why, "HBONE client connection closed");
                Ok(())
            }
        };
        if let Err(e) = &r {
            tracing::debug!(error = %e, "HBONE client connection ended with error");
        }
        r
    });
    Ok((send, driver))
}

/// Opens one tunnelled TCP connection. Succeeds once the peer answers 200.
pub async fn connect_stream(
    send: &SendRequest<Bytes>,
    req: &ConnectRequest,
) -> Result<H2Stream, HboneError> {
    connect_stream_with_data(send, req, &Bytes::new()).await
}

/// [`connect_stream`], sending `early` — bytes the client already sent — right behind the
/// CONNECT instead of a round trip later: the peer buffers them (within the stream window)
/// until its upstream is connected. Were the request refused, they are dropped with the stream, as bytes
/// written into a connection that is then closed are; a caller retrying on another
/// connection sends them again.
pub async fn connect_stream_with_data(
    send: &SendRequest<Bytes>,
    req: &ConnectRequest,
    early: &Bytes,
) -> Result<H2Stream, HboneError> {
    let request = req.to_http()?;
    let mut send = send.clone().ready().await?;
    let (response, mut stream) = send.send_request(request, false)?;
    if !early.is_empty() {
        // Queued beyond the send window if need be; h2 sends it as the window allows.
        stream.send_data(early.clone(), false)?;
    }
    let response = response.await?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status(response.status()));
    }
    Ok(H2Stream::new(stream, response.into_body()))
}
