//! A minimal HTTP/1 server (hyper) for the admin, metrics and readiness ports: request
//! bodies bounded ([`MAX_BODY`]), accept failures backed off ([`ACCEPT_BACKOFF`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::config::HttpLimits;
use crate::limits::Cap;

pub type Body = Full<Bytes>;

/// A request reduced to what the handlers use.
pub struct Req {
    pub method: hyper::Method,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Bytes,
}

impl Req {
    pub fn param(&self, k: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.into())))
        .expect("valid response")
}

pub fn json(value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value)
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

/// The largest request body any endpoint takes (413 beyond). None needs one at all —
/// parameters travel in the query — and metrics and readiness listen on every address of
/// the node, so a body is never read into memory unbounded.
pub const MAX_BODY: usize = 64 * 1024;

/// Pause after a failed accept (EMFILE, ENFILE, ENOBUFS, ...): the condition rarely clears
/// at once, and retrying at full speed would spin the main thread's runtime, which also
/// runs xDS, certificates and enrollment.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Waits for the next connection from `accept`, backing off [`ACCEPT_BACKOFF`] after each
/// failure.
pub async fn accept_with_backoff<T, F, Fut>(what: &str, mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                warn!("{what}: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves `handler` on `listener` until the task is dropped, within `limits`: at most
/// `http_max_connections` at once (one past it is closed as soon as accepted), each
/// closed when its next request's headers (or, once they are in, its body) take longer
/// than `http_header_timeout` — which also closes a kept-alive connection left idle that
/// long — with a read buffer of `http_max_buffer_bytes`.
pub async fn serve<H, F>(listener: TcpListener, handler: Arc<H>, limits: HttpLimits)
where
    H: Fn(Req) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let what = match listener.local_addr() {
        Ok(a) => format!("HTTP endpoint {a}"),
        Err(_) => "HTTP endpoint".to_string(),
    };
    let cap = Cap::new("http_connections", limits.http_max_connections);
    let mut conn = hyper::server::conn::http1::Builder::new();
    conn.timer(TokioTimer::new())
        .header_read_timeout(limits.http_header_timeout)
        // hyper refuses less than 8 KiB.
        .max_buf_size(limits.http_max_buffer_bytes.max(8192));
    let body_timeout = limits.http_header_timeout;
    loop {
        let (stream, _) = accept_with_backoff(&what, || listener.accept()).await;
        let Some(permit) = cap.admit() else {
            continue; // dropped: closed at once, nothing read
        };
        let handler = handler.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let read = tokio::time::timeout(body_timeout, read_body(&parts.headers, body));
                    let body = match read.await {
                        Ok(Ok(body)) => body,
                        Ok(Err(refusal)) => return Ok::<_, Infallible>(refusal),
                        Err(_) => return Ok(body_too_slow()),
                    };
                    let query = parts
                        .uri
                        .query()
                        .map(|q| {
                            q.split('&')
                                .filter(|s| !s.is_empty())
                                .map(|kv| match kv.split_once('=') {
                                    Some((k, v)) => (k.to_string(), v.to_string()),
                                    None => (kv.to_string(), String::new()),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let req = Req {
                        method: parts.method,
                        path: parts.uri.path().to_string(),
                        query,
                        body,
                    };
                    Ok::<_, Infallible>(handler(req).await)
                }
            });
            if let Err(e) = conn.serve_connection(TokioIo::new(stream), svc).await {
                debug!("admin connection error: {e}");
            }
        });
    }
}

/// 408 for a body not sent within the header timeout; closes the connection.
fn body_too_slow() -> Response<Body> {
    let mut r = text(StatusCode::REQUEST_TIMEOUT, "request body too slow\n");
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The request's body, at most [`MAX_BODY`] bytes; else the answer to send instead: 413
/// (declared or found too large), 400 (unreadable). Either closes the connection, whose
/// unread rest could not be told from a next request.
async fn read_body(headers: &HeaderMap, body: Incoming) -> Result<Bytes, Response<Body>> {
    let too_large = || {
        let mut r = text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY} bytes\n"),
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    };
    // Refuse what announces itself as too large without reading any of it.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(e) => {
            debug!("reading a request body failed: {e}");
            let mut r = text(StatusCode::BAD_REQUEST, "unreadable request body\n");
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(r)
        }
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
