//! `cargo xtask istio-compare`: runs our ztunnel and Istio's side by side (the testbed
//! binary `istio_compare` does the work; see its header). Istio's ztunnel is built by hand
//! outside this repository; without it the command says so in one line and succeeds, as
//! on CI, which never has it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::bail;

#[derive(clap::Args)]
pub struct IstioCompareArgs {
    /// Istio's ztunnel binary (`out/rust/release/ztunnel` of its checkout, built with
    /// `--features testing`).
    #[arg(long, env = "ISTIO_ZTUNNEL", value_name = "PATH")]
    istio_ztunnel: Option<PathBuf>,
}

pub fn istio_compare(args: &IstioCompareArgs) -> anyhow::Result<()> {
    let Some(bin) = args.istio_ztunnel.as_ref().filter(|p| p.is_file()) else {
        let why = match &args.istio_ztunnel {
            Some(p) => format!("{} is not a file", p.display()),
            None => "no --istio-ztunnel PATH or ISTIO_ZTUNNEL given".into(),
        };
        println!("istio-compare: skipped: {why}");
        return Ok(());
    };
    // Relative paths are taken from where the command was started, not the workspace.
    let bin = std::fs::canonicalize(bin)?;
    crate::setup::setup()?;
    if !crate::is_root() {
        bail!("istio-compare needs root (network namespaces, eBPF): run `sudo -E cargo xtask istio-compare`");
    }
    // --workspace, as `cargo xtask test` builds: the same features, nothing built twice.
    crate::run(Command::new("cargo").args(["build", "--workspace", "--bins"]))?;
    // Honour CARGO_TARGET_DIR, as cargo itself did for the build above.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| crate::workspace_root().join(d))
        .unwrap_or_else(|| crate::workspace_root().join("target"))
        .join("debug");
    crate::run(
        Command::new(target.join("istio_compare"))
            .env("ZTUNNEL_BIN", target.join("ztunnel"))
            .env("ISTIO_ZTUNNEL", bin),
    )
}
