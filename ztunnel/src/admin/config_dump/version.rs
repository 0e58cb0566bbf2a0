//! `version`: upstream's build information, filled with what this build knows.

use serde::Serialize;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildInfo {
    version: &'static str,
    /// `ZTUNNEL_GIT_REVISION` at build time (a release build sets it), else `unknown`.
    git_revision: &'static str,
    rust_version: &'static str,
    build_profile: &'static str,
    /// Upstream says whether the tree was `Clean` or `Modified`; a build here does not know.
    build_status: &'static str,
    istio_version: String,
    crypto_provider: &'static str,
}

pub fn build_info() -> BuildInfo {
    BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        git_revision: option_env!("ZTUNNEL_GIT_REVISION").unwrap_or("unknown"),
        rust_version: env!("ZTUNNEL_RUSTC_VERSION"),
        build_profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        build_status: "unknown",
        istio_version: crate::config::istio_names::istio_version(),
        // rustls with ring (see Cargo.toml: aws-lc-rs needs cmake to build).
        crypto_provider: "ring",
    }
}
