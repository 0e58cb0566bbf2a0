//! Configuration sources for the proxy's state: the standalone local file today; Istio
//! delta xDS (ADS) later, converting into the same `state` and `policy` types.

pub mod client;
pub mod convert;
pub mod local;
pub mod watch;
pub(crate) mod yaml;

pub use local::{ConfigError, LocalConfig};
pub use watch::{follow, watch, watch_every};
