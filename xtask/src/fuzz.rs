//! `cargo xtask fuzz`: runs every fuzz target in `fuzz/` (cargo-fuzz, libFuzzer) for a
//! bounded time and fails if any finds a panic, a hang (`-timeout`) or runaway memory
//! (`-rss_limit_mb`). Not part of `cargo xtask test`: the unit tests replay the seed corpora
//! instead, which is fast and deterministic.
//!
//! Toolchain: cargo-fuzz needs unstable rustc flags. By default Debian's rustc (installed by
//! `cargo xtask setup`, so present on every build machine) with `RUSTC_BOOTSTRAP=1`. It
//! ships no sanitizer runtimes, so the targets run with `-s none`: panics, hangs and memory
//! limits are still caught; only silent memory corruption in unsafe or C code (ring) would
//! go unnoticed. `--sanitizer address` (or `auto`, which picks it when available) uses a
//! rustup nightly that has the AddressSanitizer runtime instead: a second full build (about
//! an hour on a busy 2-core machine) and roughly half the executions per second.
//!
//! Corpus: the seeds in `fuzz/corpus/<target>/` are in git; what libFuzzer discovers goes to
//! `fuzz/corpus-generated/<target>/` (kept between runs, ignored by git); crashing inputs
//! to `fuzz/artifacts/<target>/`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::run;

/// Per-input limits, far above what any seed needs: reaching them is a finding.
const INPUT_TIMEOUT_SECS: u32 = 10;
const RSS_LIMIT_MB: u32 = 2048;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// How long each target runs, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only this target (repeatable); default: all of `cargo fuzz list`.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// `address` needs a rustup nightly with sanitizer runtimes; `auto` uses it when present.
    #[arg(long, value_enum, default_value_t = Sanitizer::None)]
    sanitizer: Sanitizer,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Sanitizer {
    Auto,
    Address,
    None,
}

/// Which compiler builds the targets.
enum Toolchain {
    /// `rustup run nightly`, with AddressSanitizer.
    Nightly,
    /// `/usr/bin/rustc` with `RUSTC_BOOTSTRAP=1`, no sanitizer.
    Debian,
}

impl Toolchain {
    fn pick(wanted: Sanitizer) -> anyhow::Result<(Toolchain, &'static str)> {
        let nightly_asan = nightly_has_asan();
        match (wanted, nightly_asan) {
            (Sanitizer::Auto | Sanitizer::Address, true) => Ok((Toolchain::Nightly, "address")),
            (Sanitizer::Address, false) => {
                bail!("--sanitizer address needs a rustup nightly toolchain with its sanitizer runtimes (`rustup toolchain install nightly`)")
            }
            (Sanitizer::Auto | Sanitizer::None, _) => Ok((Toolchain::Debian, "none")),
        }
    }

    /// `cargo fuzz` under this toolchain.
    fn cargo_fuzz(&self) -> Command {
        let mut c = self.bare_cargo_fuzz();
        // `cargo xtask` is `cargo run`, which gives this process the xtask package's
        // CARGO_PKG_* / CARGO_MANIFEST_* variables. Build scripts (ring's) watch some of
        // them, so passing them on would make every build differ from a plain `cargo fuzz`
        // one and rebuild most of the dependency tree.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let from_cargo_run = [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_BIN_",
                "CARGO_CRATE_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || key == "CARGO_PRIMARY_PACKAGE";
            if from_cargo_run {
                c.env_remove(key.as_ref());
            }
        }
        c
    }

    fn bare_cargo_fuzz(&self) -> Command {
        match self {
            Toolchain::Nightly => {
                let mut c = Command::new("rustup");
                c.args(["run", "nightly", "cargo", "fuzz"]);
                c
            }
            Toolchain::Debian => {
                let mut c = Command::new("cargo");
                c.arg("fuzz")
                    .env("RUSTC", "/usr/bin/rustc")
                    .env("RUSTC_BOOTSTRAP", "1");
                c
            }
        }
    }
}

/// True when `rustup run nightly` works and its target libraries include the ASan runtime.
fn nightly_has_asan() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "target-libdir"])
        .stderr(Stdio::null())
        .output()
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let libdir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::read_dir(Path::new(&libdir))
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().contains("rt.asan"))
        })
        .unwrap_or(false)
}

/// Installs cargo-fuzz unless a working one is on the PATH.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// What one target's run reported (libFuzzer's `-print_final_stats`).
#[derive(Default)]
struct Outcome {
    ok: bool,
    execs: Option<u64>,
    execs_per_sec: Option<u64>,
    new_units: Option<u64>,
    peak_rss_mb: Option<u64>,
}

pub fn fuzz(args: &FuzzArgs) -> anyhow::Result<()> {
    // Debian's toolchain and bpf-linker: ztunnel's build script needs them in any case.
    crate::setup::setup()?;
    ensure_cargo_fuzz()?;
    let (toolchain, sanitizer) = Toolchain::pick(args.sanitizer)?;
    eprintln!("fuzz: sanitizer {sanitizer}");
    let targets = if args.targets.is_empty() {
        list_targets(&toolchain)?
    } else {
        args.targets.clone()
    };
    // One build for all targets, with the flags `run` uses (so `run` does not rebuild):
    // a broken build is reported as such, and the time budget goes to fuzzing.
    run(toolchain
        .cargo_fuzz()
        .args(["build", "--debug-assertions", "-s", sanitizer]))?;
    let mut results = Vec::new();
    for target in &targets {
        let outcome = run_target(&toolchain, sanitizer, target, args.seconds)?;
        results.push((target.clone(), outcome));
    }
    print_summary(&results, args.seconds);
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, o)| !o.ok)
        .map(|(t, _)| t.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("fuzz targets failed: {failed:?} (inputs in fuzz/artifacts/<target>/; reproduce with `cargo fuzz run <target> <file>`)");
    }
    Ok(())
}

fn list_targets(toolchain: &Toolchain) -> anyhow::Result<Vec<String>> {
    let out = toolchain
        .cargo_fuzz()
        .arg("list")
        .output()
        .context("running cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn run_target(
    toolchain: &Toolchain,
    sanitizer: &str,
    target: &str,
    seconds: u64,
) -> anyhow::Result<Outcome> {
    // libFuzzer writes new inputs to the first directory and only reads the others.
    let generated = format!("fuzz/corpus-generated/{target}");
    let seeds = format!("fuzz/corpus/{target}");
    for dir in [&generated, &seeds] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
    }
    eprintln!("fuzz: {target} for {seconds} s");
    let mut child = toolchain
        .cargo_fuzz()
        .args(["run", "--debug-assertions", "-s", sanitizer, target])
        .args([&generated, &seeds])
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    // Pass libFuzzer's output through, keeping the final statistics for the summary.
    let mut outcome = Outcome::default();
    let stderr = child.stderr.take().expect("piped");
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading cargo fuzz output")?;
        eprintln!("{line}");
        let stat = |name: &str| {
            line.strip_prefix(name)
                .and_then(|v| v.trim().trim_start_matches(':').trim().parse().ok())
        };
        outcome.execs = outcome.execs.or(stat("stat::number_of_executed_units"));
        outcome.execs_per_sec = outcome.execs_per_sec.or(stat("stat::average_exec_per_sec"));
        outcome.new_units = outcome.new_units.or(stat("stat::new_units_added"));
        outcome.peak_rss_mb = outcome.peak_rss_mb.or(stat("stat::peak_rss_mb"));
    }
    outcome.ok = child.wait().context("waiting for cargo fuzz")?.success();
    Ok(outcome)
}

fn print_summary(results: &[(String, Outcome)], seconds: u64) {
    let show = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    eprintln!("\nfuzz summary ({seconds} s per target):");
    eprintln!(
        "{:<18} {:>6} {:>12} {:>9} {:>9} {:>8}",
        "target", "result", "executions", "exec/s", "new", "rss MB"
    );
    for (target, o) in results {
        eprintln!(
            "{:<18} {:>6} {:>12} {:>9} {:>9} {:>8}",
            target,
            if o.ok { "ok" } else { "FAILED" },
            show(o.execs),
            show(o.execs_per_sec),
            show(o.new_units),
            show(o.peak_rss_mb)
        );
    }
}
