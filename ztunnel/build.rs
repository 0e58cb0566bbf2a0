//! Builds the eBPF capture object (`ebpf/`) for `bpfel-unknown-none` with Debian's Rust
//! toolchain (sysroot `/usr`, which ships the `core` sources `-Z build-std` needs) and
//! bpf-linker. `cargo xtask setup` installs both.

fn main() -> anyhow::Result<()> {
    // Debian's rustc is a stable compiler; build-std needs unstable flags.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../ebpf");
    let ebpf_dir = ebpf_dir.to_str().expect("utf-8 path");
    println!("cargo:rerun-if-changed=../ebpf-common/src");
    // The eBPF crate is its own workspace (its own target and Cargo.lock): run its
    // cargo from there.
    std::env::set_current_dir(ebpf_dir)?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "ztunnel-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::Custom("/usr"),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             (run `cargo xtask setup` to install Debian's rustc-web, rust-web-src and bpf-linker)"
        )
    })
}
