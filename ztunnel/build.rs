//! Builds the eBPF capture object (`ebpf/`) for `bpfel-unknown-none` with Debian's Rust
//! toolchain (sysroot `/usr`, which ships the `core` sources `-Z build-std` needs) and
//! bpf-linker. `cargo xtask setup` installs both.
//!
//! Also generates the gRPC/protobuf code (CA API, delta xDS) from `proto/`: `protox` parses
//! the .proto files in pure Rust (there is no `protoc` on the build machines) and
//! `tonic-prost-build` turns the descriptor set into Rust in `$OUT_DIR`.

fn main() -> anyhow::Result<()> {
    compile_protos()?;
    rustc_version();
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
        [aya_build::Package {
            name: "ztunnel-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("/usr"),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             (run `cargo xtask setup` to install Debian's rustc-web, rust-web-src and bpf-linker)"
        )
    })
}

/// The .proto files, relative to `proto/` (which is also the import root).
const PROTOS: &[&str] = &[
    "istio/ca.proto",
    "istio/workload.proto",
    "istio/authorization.proto",
    "envoy/discovery.proto",
];

fn compile_protos() -> anyhow::Result<()> {
    let root = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile(PROTOS, [&root])
        .map_err(|e| anyhow::anyhow!("compiling the .proto files: {e:?}"))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .map_err(|e| anyhow::anyhow!("generating Rust from the .proto files: {e}"))
}

/// The compiler's version for `/config_dump`'s `version.rustVersion` (upstream reports it).
fn rustc_version() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let v = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ZTUNNEL_RUSTC_VERSION={v}");
}
