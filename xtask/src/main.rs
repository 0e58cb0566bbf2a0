//! Developer and CI commands. `cargo xtask --help` lists them.

mod fuzz;
mod istio_compare;
mod kernels;
mod layouts;
mod setup;

use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "ztunnel developer commands", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks: Debian's Rust toolchain for eBPF, bpf-linker.
    Setup,
    /// The one test command: setup, build, unit tests, end-to-end tests (as root).
    Test {
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Two nodes, pods on each, ztunnel on both: shows traffic crossing the mesh.
    Demo,
    /// Release build, then direct vs mesh on the testbed (throughput, latency, connection
    /// rate, ztunnel CPU and memory) into target/bench/results.{json,md}. Not part of `test`.
    Bench,
    /// Release build, then the long reliability runs on the testbed: 10,000 concurrent
    /// connections, a 5-minute soak with RSS sampled, upgrades under load; into
    /// target/soak/results.{json,md}; fails if anything was lost or leaked. Not part of `test`.
    Soak,
    /// Release build, then every listener under hostile load on the testbed (slow headers,
    /// idle and reset floods, unauthenticated and oversized control-plane calls, a bad
    /// token edit, a dead peer), each bounded; RSS before / peak / after and a mesh echo
    /// beside each, into target/load/results.{json,md}. Not part of `test`.
    Load,
    /// Runs each fuzz target (fuzz/) for a bounded time; fails on any crash. Not part of `test`.
    Fuzz(fuzz::FuzzArgs),
    /// Boots Debian's 5.10, 6.1 and 6.12 kernels under QEMU and runs the end-to-end suites
    /// inside each, legacy tc and TCX; one line per kernel and suite. CI runs `--smoke`.
    Kernels(kernels::KernelsArgs),
    /// Runs the end-to-end suites once per testbed layout (routed, ptp, bridge, VXLAN,
    /// IPIP) and attachment mode on this machine's kernel; one line per layout and suite.
    /// Not part of `test`.
    Layouts(layouts::LayoutsArgs),
    /// Our ztunnel and Istio's (built by hand: --istio-ztunnel PATH or ISTIO_ZTUNNEL) side by
    /// side on one workload file and the same traffic: `/config_dump` keys and types, access
    /// log fields, metric names and labels. Skips in one line without the binary.
    IstioCompare(istio_compare::IstioCompareArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::env::set_current_dir(workspace_root()).context("entering the workspace root")?;
    match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => demo(),
        Cmd::Bench => release_run("bench", "the benchmark"),
        Cmd::Soak => release_run("soak", "the soak"),
        Cmd::Load => release_run("load", "the load suite"),
        Cmd::Fuzz(args) => fuzz::fuzz(&args),
        Cmd::Kernels(args) => kernels::kernels(&args),
        Cmd::Layouts(args) => layouts::layouts(&args),
        Cmd::IstioCompare(args) => istio_compare::istio_compare(&args),
    }
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup::setup()?;
    if !is_root() {
        bail!("the end-to-end tests need root (network namespaces, eBPF): run `sudo -E cargo xtask test`");
    }
    run(Command::new("cargo").args(["build", "--workspace", "--bins"]))?;
    let bin = workspace_root().join("target/debug/ztunnel");
    let all = run(Command::new("cargo")
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(args)
        .env("ZTUNNEL_BIN", &bin));
    // The capture suites once more with legacy tc filters instead of TCX links, as on
    // kernels before 6.6 (`TC_ATTACH` reaches every ztunnel the tests start).
    println!("\n== the capture suites again with --tc-attach legacy ==\n");
    let legacy = run(Command::new("cargo")
        // --workspace, as above: with -p the features of shared dependencies differ and
        // every test executable would be built again.
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(LEGACY_SUITES.iter().flat_map(|s| ["--test", s]))
        .args(args)
        .env("ZTUNNEL_BIN", &bin)
        .env("TC_ATTACH", "legacy"));
    all.and(legacy)
}

/// The end-to-end suites that exercise capture, run in both attachment modes.
const LEGACY_SUITES: &[&str] = &[
    "capture",
    "mesh",
    "faults",
    "node_proxy",
    "cni",
    "sockmap",
    "enrollment",
    "unparsed",
    "bypass",
    "dns",
];

fn demo() -> anyhow::Result<()> {
    setup::setup()?;
    if !is_root() {
        bail!("the demo needs root (network namespaces, eBPF): run `sudo -E cargo xtask demo`");
    }
    run(Command::new("cargo").args(["build", "--workspace", "--bins"]))?;
    run(Command::new(workspace_root().join("target/debug/demo"))
        .env("ZTUNNEL_BIN", workspace_root().join("target/debug/ztunnel")))
}

/// Builds in release and runs the testbed binary `bin` against the release ztunnel.
fn release_run(bin: &str, what: &str) -> anyhow::Result<()> {
    setup::setup()?;
    if !is_root() {
        bail!("{what} needs root (network namespaces, eBPF): run `sudo -E cargo xtask {bin}`");
    }
    run(Command::new("cargo").args(["build", "--release", "--workspace", "--bins"]))?;
    // Honour CARGO_TARGET_DIR, as cargo itself did for the build above.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| workspace_root().join(d))
        .unwrap_or_else(|| workspace_root().join("target"));
    run(Command::new(target.join("release").join(bin))
        .env("ZTUNNEL_BIN", target.join("release/ztunnel")))
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
