//! Logging: `tracing` to stderr as text or JSON in Istio ztunnel's line formats
//! ([`format`]), with levels changeable at runtime (the admin endpoint's `/logging`).
//! `log` records — including the eBPF programs' aya-log output — are bridged into it.

pub mod format;

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// The filter when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str = "info";

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
static CURRENT: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

pub fn init(format: LogFormat) {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| DEFAULT_FILTER.to_string());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("ztunnel: ignoring invalid RUST_LOG {spec:?}: {e}");
        EnvFilter::new(DEFAULT_FILTER)
    });
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let base = fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry
            .with(
                base.event_format(format::IstioText)
                    .fmt_fields(format::IstioText),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                base.event_format(format::IstioJson)
                    .fmt_fields(format::json_fields()),
            )
            .try_init(),
    };
    let _ = HANDLE.set(handle);
    *CURRENT.lock().unwrap() = spec;
}

/// The filter in force, in `RUST_LOG` syntax.
pub fn current() -> String {
    CURRENT.lock().unwrap().clone()
}

/// Whether a `log` record of this target and level would be printed under the filter in
/// force (the eBPF program's records arrive through `log`).
pub fn shows(target: &str, level: log::Level) -> bool {
    let meta = log::Metadata::builder().target(target).level(level).build();
    log::logger().enabled(&meta)
}

/// Replaces the filter, e.g. `info,ztunnel::proxy=debug`. Invalid specs are refused and
/// the old filter stays.
pub fn set(spec: &str) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(spec).map_err(|e| format!("invalid log filter {spec:?}: {e}"))?;
    let handle = HANDLE.get().ok_or("logging not initialised")?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    *CURRENT.lock().unwrap() = spec.to_string();
    Ok(())
}
