//! The node-local admin endpoint (127.0.0.1:15000 only), metrics (15020) and readiness
//! (15021): what a person on call needs to see what this node's ztunnel knows and does.

mod cert_dump;
pub mod config_dump;
pub mod http;
mod pprof;
mod views;
pub use views::not_ready;

use std::sync::Arc;

use hyper::{Method, Response, StatusCode};
use tokio::sync::Mutex;

use crate::capture::Capture;
use crate::connections::ConnectionTracker;
use crate::enroll::Enroller;
use crate::identity::manager::SecretManager;
use crate::metrics::Metrics;
use crate::state::StateStore;
use http::{json, text, Body, Req};

/// Everything the endpoints report on.
pub struct AdminState {
    pub node: String,
    pub store: Arc<StateStore>,
    pub capture: Arc<Mutex<Capture>>,
    pub enroller: Arc<Enroller>,
    pub metrics: Arc<Metrics>,
    pub connections: Arc<ConnectionTracker>,
    pub certs: Arc<SecretManager>,
    /// Set when a local config is expected; readiness waits for it.
    pub config_expected: bool,
    /// The xDS client's status, when config comes over xDS.
    pub xds: Option<tokio::sync::watch::Receiver<crate::xds::client::XdsStatus>>,
    /// `/config_dump`'s `config` (upstream's settings, see [`config_dump::config`]).
    pub config: serde_json::Value,
    /// The local config (file or text), echoed in `/config_dump`'s `staticConfig`.
    pub local_config: Option<config_dump::LocalSource>,
    /// `/quitquitquit` notifies this.
    pub quit: Arc<tokio::sync::Notify>,
}

const INDEX: &[(&str, &str)] = &[
    ("/", "this index"),
    (
        "/config_dump",
        "workloads, services, policies, certificates, enrolled pods (JSON)",
    ),
    ("/certs", "workload certificates held by this node"),
    (
        "/logging",
        "GET: current log filter; POST ?level=<RUST_LOG spec>: change it",
    ),
    (
        "/debug/capture",
        "eBPF programs, interfaces, enrolled pods, per-pod counters",
    ),
    (
        "/debug/connections",
        "live connections: source, destination, identities, bytes, age",
    ),
    (
        "/debug/pprof/profile",
        "CPU profile, pprof protobuf; ?seconds=1-300 (10), ?frequency=1-1000 Hz (100)",
    ),
    (
        "/debug/pprof/heap",
        "heap profile, gzipped pprof protobuf (builds with the heap-profiling feature)",
    ),
    (
        "/debug/pprof/heap/profiling",
        "?activate=true|false: start or stop heap sampling; says whether it runs",
    ),
    ("/quitquitquit", "POST: drain and exit"),
];

pub async fn admin(state: Arc<AdminState>, req: Req) -> Response<Body> {
    match (req.method.clone(), req.path.as_str()) {
        (Method::GET, "/") => {
            let mut s = String::from("ztunnel admin\n\n");
            for (p, what) in INDEX {
                s.push_str(&format!("{p:<28} {what}\n"));
            }
            text(StatusCode::OK, s)
        }
        (Method::GET, "/config_dump") => json(&config_dump::config_dump(&state).await),
        (Method::GET, "/certs") => json(&views::certs(&state)),
        (Method::GET, "/debug/capture") => json(&views::capture(&state).await),
        (Method::GET, "/debug/connections") => json(&state.connections.list()),
        (Method::GET, "/debug/pprof/profile") => pprof::cpu(&req).await,
        (Method::GET, "/debug/pprof/heap") => pprof::heap(&req, false).await,
        (Method::GET, "/debug/pprof/heap/profiling") => pprof::heap(&req, true).await,
        (Method::GET, "/logging") => {
            text(StatusCode::OK, format!("{}\n", crate::logging::current()))
        }
        (Method::POST, "/logging") => {
            let Some(spec) = req.param("level").map(|s| {
                s.replace("%3D", "=")
                    .replace("%2C", ",")
                    .replace("%3A", ":")
            }) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "usage: POST /logging?level=<RUST_LOG filter>\n",
                );
            };
            match crate::logging::set(&spec) {
                Ok(()) => text(StatusCode::OK, format!("{spec}\n")),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (Method::POST, "/quitquitquit") => {
            state.quit.notify_one();
            text(StatusCode::OK, "draining, then exiting\n")
        }
        (_, p) if INDEX.iter().any(|(i, _)| *i == p) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; GET / lists the endpoints\n",
        ),
    }
}

pub async fn metrics(state: Arc<AdminState>, req: Req) -> Response<Body> {
    match req.path.as_str() {
        "/metrics" | "/stats/prometheus" => {
            let (counters, sockmap, unparsed, last_hop) = {
                let cap = state.capture.lock().await;
                let v = (cap.counters(), cap.sockmap(), cap.dropped_unparsed());
                (v.0, v.1, v.2, cap.last_hop_counters())
            };
            state.metrics.set_last_hop(&last_hop);
            state.metrics.set_capture(&counters);
            state.metrics.capture_unparsed.set(unparsed as i64);
            state.metrics.set_sockmap(&sockmap);
            state
                .metrics
                .set_enrollment(&state.enroller.status(), state.enroller.claims_refused());
            Response::builder()
                .header(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    state.metrics.encode(),
                )))
                .expect("valid response")
        }
        _ => text(StatusCode::NOT_FOUND, "try /metrics or /stats/prometheus\n"),
    }
}

pub async fn readiness(state: Arc<AdminState>, req: Req) -> Response<Body> {
    if req.path != "/healthz/ready" {
        return text(StatusCode::NOT_FOUND, "try /healthz/ready\n");
    }
    match views::not_ready(&state) {
        reasons if reasons.is_empty() => text(StatusCode::OK, "ready\n"),
        reasons => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", reasons.join("\n")),
        ),
    }
}
