//! `cargo xtask setup`: what a fresh Debian 12 machine lacks to build and test.
//!
//! The eBPF programs build with Debian's Rust (`rustc-web`: sysroot `/usr`, with the
//! `core` sources `-Z build-std` needs) and bpf-linker, which must be built against the
//! same LLVM major as that rustc. Every step checks first, so a second run is quick.

use std::process::Command;

use anyhow::{bail, Context};

use crate::run;

/// Debian packages: the eBPF toolchain, and iproute2 and nftables (the bridge layouts'
/// FORWARD rules, as kube-proxy and flannel write them) for the testbed.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "iproute2",
    "nftables",
    "procps",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_MAJOR: &str = "22";

pub fn setup() -> anyhow::Result<()> {
    step("Debian packages", install_packages)?;
    step("bpf-linker", install_bpf_linker)?;
    step("LLVM versions", check_llvm_match)?;
    eprintln!("setup: ok");
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    f().with_context(|| format!("setup step '{name}' failed"))
}

fn install_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    if !crate::is_root() {
        bail!("packages {missing:?} are missing and installing them needs root");
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

pub(crate) fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = current {
        if String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (a few minutes)"
    );
    run(Command::new("cargo")
        .args([
            "install",
            "--locked",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ])
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")))
}

/// rustc emits LLVM bitcode that bpf-linker's LLVM must read: their majors must match.
/// A Debian update can move one without the other.
fn check_llvm_match() -> anyhow::Result<()> {
    let out = Command::new("/usr/bin/rustc")
        .arg("-vV")
        .output()
        .context("running /usr/bin/rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rustc_llvm = text
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no LLVM version in `/usr/bin/rustc -vV`")?
        .to_string();
    let linker =
        which("bpf-linker").context("bpf-linker not on PATH (is ~/.cargo/bin in PATH?)")?;
    let ldd = Command::new("ldd")
        .arg(&linker)
        .output()
        .context("running ldd on bpf-linker")?;
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    let linker_llvm = ldd
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix("libLLVM.so.")
                .or_else(|| w.strip_prefix("libLLVM-"))
        })
        .and_then(|v| v.split(['.', '-']).next())
        .map(str::to_string);
    match linker_llvm {
        Some(l) if l == rustc_llvm => Ok(()),
        Some(l) => bail!(
            "Debian's rustc uses LLVM {rustc_llvm} but bpf-linker is built for LLVM {l}: \
             install llvm-{rustc_llvm}-dev and rebuild bpf-linker with \
             `LLVM_PREFIX=/usr/lib/llvm-{rustc_llvm} cargo install --force --locked bpf-linker@{BPF_LINKER_VERSION} \
             --no-default-features --features llvm-{rustc_llvm}` (and update LLVM_MAJOR in xtask/src/setup.rs)"
        ),
        None => bail!("cannot tell which LLVM {} links (ldd shows no libLLVM)", linker.display()),
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file())
}
