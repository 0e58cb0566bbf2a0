//! Istio's ztunnel as its own tests run it: a dedicated proxy inside a pod's network
//! namespace, the pod's outbound TCP redirected to it (here with an nftables rule equal
//! to its iptables recipe), certificates from its built-in test CA (`FAKE_CA`, so the two
//! proxies trust each other), workloads from the same local file as ours.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ztunnel_tests::{Pod, Testbed};

/// Istio's default mark for its own sockets (`PACKET_MARK`): they are not redirected.
const PACKET_MARK: u32 = 1337;

pub struct IstioProxy {
    pub pid: u32,
    pub log: PathBuf,
}

/// Sends the pod's outbound TCP, except over loopback and Istio's own, to 15001.
pub fn redirect_outbound(tb: &Testbed, pod: &Pod) -> anyhow::Result<()> {
    let rules = format!(
        "table inet istio_compare {{\n  chain output {{\n    \
         type nat hook output priority -100; policy accept;\n    \
         oifname \"lo\" return\n    \
         meta mark & 0xfff == {PACKET_MARK:#x} return\n    \
         meta l4proto tcp redirect to :15001\n  }}\n}}\n"
    );
    let file = tb.write_config(&format!("redirect-{}.nft", pod.name), &rules)?;
    let out = pod
        .netns
        .command("nft")?
        .arg("-f")
        .arg(&file)
        .output()
        .context("running nft")?;
    if !out.status.success() {
        bail!(
            "nft -f {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Starts Istio's ztunnel for `pod` (service account `sa`) and waits until it is ready.
pub fn start(
    tb: &Testbed,
    bin: &Path,
    pod: &Pod,
    sa: &str,
    config: &Path,
    json: bool,
) -> anyhow::Result<IstioProxy> {
    let log = tb.dir().join(format!(
        "istio-{}-{}.log",
        pod.name,
        if json { "json" } else { "text" }
    ));
    let file = std::fs::File::create(&log)?;
    let mut cmd = pod.netns.command(bin)?;
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", format!("default/{}/{sa}", pod.name))
        .env("PACKET_MARK", PACKET_MARK.to_string())
        .env("ENABLE_ORIG_SRC", "false")
        .env("NODE_NAME", &pod.node)
        .env("LOCAL_XDS_PATH", config)
        // Empty: the local file only, no istiod.
        .env("XDS_ADDRESS", "")
        .env("FAKE_CA", "true")
        // "connection opened" is a debug line in both proxies.
        .env("RUST_LOG", "info,access=debug")
        .env("LOG_FORMAT", if json { "json" } else { "plain" })
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let pid = tb.spawn(cmd)?;
    let proxy = IstioProxy { pid, log };
    let ready = SocketAddr::from(([127, 0, 0, 1], 15021));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = ztunnel_tests::http::get(&pod.netns, ready, "/healthz/ready");
        if matches!(got, Ok((200, _))) {
            return Ok(proxy);
        }
        if Instant::now() > deadline || exited(pid) {
            let got = got.map_err(|e| format!("{e:#}"));
            bail!(
                "Istio's ztunnel in {} never ready ({got:?}); log:\n{}",
                pod.name,
                proxy.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Gone, or a zombie the testbed has not reaped yet.
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

impl IstioProxy {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
