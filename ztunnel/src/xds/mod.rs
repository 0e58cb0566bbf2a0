//! Configuration sources for the proxy's state: the standalone local file (`local`,
//! `watch`) or Istio delta xDS (`client`), both converting into the same `state` and
//! `policy` types (`convert` maps the protos both ways).

pub mod client;
pub mod convert;
pub mod ignored;
pub mod local;
pub mod watch;
pub(crate) mod yaml;

pub use local::{ConfigError, LocalConfig};
pub use watch::{follow, watch, watch_every};

#[cfg(test)]
mod corpus_tests;
#[cfg(test)]
mod hostname_tests;
