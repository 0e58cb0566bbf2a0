# ztunnel (eBPF-native) container image.
#
#   docker build -t ztunnel-ebpf:0.1.0 .
#
# Build stage: the same toolchain `cargo xtask setup` installs on a developer machine —
# Debian 12's rustc-web/cargo-web (sysroot /usr, with the core sources the eBPF build's
# `-Z build-std` needs), llvm-22-dev, and bpf-linker built against that same LLVM major
# (rustc emits LLVM bitcode that bpf-linker must read). Keep the versions in step with
# xtask/src/setup.rs.
FROM debian:bookworm AS build
ARG BPF_LINKER_VERSION=0.13.0
ARG LLVM_MAJOR=22
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends \
      rustc-web cargo-web rust-web-src llvm-${LLVM_MAJOR}-dev \
      iproute2 procps build-essential pkg-config zlib1g-dev libzstd-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
# Its own layer: rebuilt only when the toolchain changes, not with every source change.
RUN LLVM_PREFIX=/usr/lib/llvm-${LLVM_MAJOR} cargo install --locked "bpf-linker@${BPF_LINKER_VERSION}" \
      --no-default-features --features "llvm-${LLVM_MAJOR}"
WORKDIR /src
COPY . .
# Checks what it would install (nothing by now) and that rustc's and bpf-linker's LLVM match.
RUN cargo xtask setup
# ztunnel/build.rs builds the eBPF object (ebpf/) and embeds it in the binary.
RUN cargo build --release --locked -p ztunnel --bin ztunnel \
 && cp target/release/ztunnel /usr/local/bin/ztunnel

# Runtime: glibc, CA roots (for an API server/istiod reached by a public name), nothing
# else. No shell tools are needed: probes are HTTP/TCP.
FROM debian:bookworm-slim
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/ztunnel /usr/local/bin/ztunnel
# glibc copies up to 4 MiB with its vector loop instead of `rep movsb`, which AMD's Zen
# cores run slowly for misaligned copies — every record rustls copies out of its read
# buffer on TLS receive. Measured on AMD EPYC (README, Performance; A/B pairs, without →
# with): throughput of 1 stream 0.31/0.27/0.35× → 0.36/0.39/0.40× of direct, the
# server-side ztunnel's CPU per GB 1.37/1.48/0.97 → 0.77/1.03/0.84 s. Not measured on
# Intel; other architectures ignore it. deploy/daemonset.yaml sets the same value (keep
# them equal: a test compares them, and the testbed's harness runs ztunnel with it).
ENV GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=4194304
# metrics, readiness, inbound HBONE (the node's network: these are host ports).
EXPOSE 15008 15020 15021
ENTRYPOINT ["/usr/local/bin/ztunnel"]
CMD ["run"]
