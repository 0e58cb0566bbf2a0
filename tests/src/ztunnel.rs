//! Running the real `ztunnel` binary on testbed nodes, with a workload file written
//! from the testbed's pods.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::testbed::{Node, Pod, Testbed};

/// The binary under test: `$ZTUNNEL_BIN`, else `target/debug/ztunnel` of this workspace.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ZTUNNEL_BIN") {
        return p.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ztunnel")
}

/// What a production node logs (ztunnel's own default filter, `logging::DEFAULT_FILTER`):
/// for runs that measure, which should not pay for debug lines.
pub const PRODUCTION_LOG: &str = "info";

/// `GLIBC_TUNABLES` as deployed: the value the container image sets (the Dockerfile's
/// `ENV`, which `deploy/daemonset.yaml` repeats), so what the testbed, the bench and the
/// soak measure is the process as it runs on a node. `ZTUNNEL_GLIBC_TUNABLES` overrides it
/// (empty: glibc's defaults), e.g. to measure without.
pub fn glibc_tunables() -> String {
    if let Ok(v) = std::env::var("ZTUNNEL_GLIBC_TUNABLES") {
        return v;
    }
    deployed_glibc_tunables().to_string()
}

/// The Dockerfile's `ENV GLIBC_TUNABLES=...`.
pub fn deployed_glibc_tunables() -> &'static str {
    include_str!("../../Dockerfile")
        .lines()
        .find_map(|l| l.trim().strip_prefix("ENV GLIBC_TUNABLES="))
        .expect("the Dockerfile sets GLIBC_TUNABLES")
        .trim()
}

/// A workload of the standalone config.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub pod: Pod,
    pub namespace: String,
    pub service_account: String,
    /// HBONE (in the mesh) or TCP (outside it).
    pub hbone: bool,
    /// More fields of the workload, as YAML lines indented for it (e.g. `  waypoint: …\n`).
    pub extra: String,
}

impl WorkloadSpec {
    pub fn mesh(pod: &Pod, namespace: &str, sa: &str) -> Self {
        WorkloadSpec {
            pod: pod.clone(),
            namespace: namespace.into(),
            service_account: sa.into(),
            hbone: true,
            extra: String::new(),
        }
    }
    pub fn plain(pod: &Pod, namespace: &str) -> Self {
        WorkloadSpec {
            pod: pod.clone(),
            namespace: namespace.into(),
            service_account: "default".into(),
            hbone: false,
            extra: String::new(),
        }
    }

    /// The same workload with more YAML fields (indented two spaces).
    pub fn with(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        self
    }
}

/// Renders upstream ztunnel's local YAML for these workloads (plus `extra`, appended
/// verbatim, e.g. `services:` or `policies:` sections).
pub fn local_config(workloads: &[WorkloadSpec], extra: &str) -> String {
    let mut y = String::from("workloads:\n");
    for w in workloads {
        let p = &w.pod;
        let _ = write!(
            y,
            "- uid: cluster1//Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {sa}\n  \
             workloadIps: [\"{ip}\", \"{ip6}\"]\n  protocol: {proto}\n  node: {node}\n",
            ns = w.namespace,
            name = p.name,
            sa = w.service_account,
            ip = p.ip,
            ip6 = p.ip6,
            proto = if w.hbone { "HBONE" } else { "TCP" },
            node = p.node,
        );
        y.push_str(&w.extra);
    }
    y.push_str(extra);
    y
}

/// A running ztunnel.
pub struct Ztunnel {
    pub pid: u32,
    pub node: Node,
    pub log: PathBuf,
}

impl Ztunnel {
    /// Waits until readiness (15021 in the node's namespace) answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let ready = std::net::SocketAddr::from(([127, 0, 0, 1], 15021));
        let deadline = Instant::now() + timeout;
        loop {
            let got = crate::http::get(&self.node.netns, ready, "/healthz/ready");
            if matches!(got, Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!("ztunnel on {} never ready: {got:?}", self.node.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; fails early if the process died.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for_line(&[needle], timeout).map(|_| ())
    }

    /// Waits for a log line containing every one of `needles`, and returns it.
    pub fn wait_for_line(&self, needles: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + crate::scaled(timeout);
        let needle = needles.join(" + ");
        let find = || {
            self.log_text()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string)
        };
        while Instant::now() < deadline {
            if let Some(l) = find() {
                return Ok(l);
            }
            if !Path::new(&format!("/proc/{}", self.pid)).exists() || is_zombie(self.pid) {
                // Its last words may have landed between the read and the exit.
                if let Some(l) = find() {
                    return Ok(l);
                }
                bail!(
                    "ztunnel on {} exited; log:\n{}",
                    self.node.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "timed out waiting for {needle:?} from ztunnel on {}; log:\n{}",
            self.node.name,
            self.log_text()
        )
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

impl Testbed {
    /// A directory for this testbed's files (configs, logs); kept under /tmp after the
    /// run for post-mortems, named after the testbed.
    pub fn dir(&self) -> PathBuf {
        let d = std::env::temp_dir().join(self.prefix());
        let _ = std::fs::create_dir_all(&d);
        d
    }

    /// Gives every node its own copy of the ztunnel binary, as real nodes have: two
    /// processes of one file share its page-cache pages, so each one's resident memory
    /// would depend on what the other has touched (and the kernel will not page out a page
    /// another process maps). Copies live under `dir()/bin` until the testbed is dropped.
    pub fn own_binaries(&self) -> anyhow::Result<()> {
        let mut map = self.binaries.lock().unwrap();
        for node in self.nodes() {
            let dir = self.dir().join("bin").join(&node.name);
            std::fs::create_dir_all(&dir)?;
            let copy = dir.join("ztunnel");
            std::fs::copy(binary(), &copy)
                .with_context(|| format!("copying {} to {}", binary().display(), copy.display()))?;
            // Written back, as an installed binary is: the kernel cannot page out dirty
            // page-cache pages, so a fresh copy would keep ztunnel's start-up code resident.
            std::fs::File::open(&copy)?.sync_all()?;
            map.insert(node.name.clone(), copy);
        }
        Ok(())
    }

    /// Deletes the copies made by [`Self::own_binaries`] (they are large; logs stay).
    pub fn remove_binaries(&self) {
        self.binaries.lock().unwrap().clear();
        let _ = std::fs::remove_dir_all(self.dir().join("bin"));
    }

    fn binary_for(&self, node: &Node) -> PathBuf {
        let map = self.binaries.lock().unwrap();
        map.get(&node.name).cloned().unwrap_or_else(binary)
    }

    pub fn write_config(&self, name: &str, yaml: &str) -> anyhow::Result<PathBuf> {
        let p = self.dir().join(name);
        std::fs::write(&p, yaml).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }

    /// Starts ztunnel on `node` with the workload file `config` (standalone) and waits
    /// until it reports ready.
    pub fn start_ztunnel(
        &self,
        node: &Node,
        config: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Ztunnel> {
        let config = config.display().to_string();
        let mut args = vec!["--local-xds-path", config.as_str()];
        args.extend_from_slice(extra);
        self.start_ztunnel_with(node, &args)
    }

    /// Starts ztunnel on `node` with exactly these extra flags (e.g. `--xds-address`).
    pub fn start_ztunnel_with(&self, node: &Node, extra: &[&str]) -> anyhow::Result<Ztunnel> {
        let log = self.dir().join(format!("ztunnel-{}.log", node.name));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = node.netns.command(self.binary_for(node))?;
        cmd.arg("run")
            .args(["--node-name", &node.name, "--instance", node.netns.name()])
            .args(["--rescan-interval-ms", "200"])
            // One built-in CA root for the whole testbed, so nodes trust each other.
            .arg("--local-ca-dir")
            .arg(self.dir().join("ca"))
            // Handover sockets with the testbed's files, not in the host's /var/run.
            .arg("--handover-dir")
            .arg(self.dir().join("run"))
            .args(extra)
            .env("GLIBC_TUNABLES", glibc_tunables())
            .env(
                "RUST_LOG",
                std::env::var("ZTUNNEL_LOG").unwrap_or_else(|_| "info,ztunnel=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let pid = self.spawn(cmd)?;
        let z = Ztunnel {
            pid,
            node: node.clone(),
            log,
        };
        // Only a "ready" written by this run counts.
        let deadline = Instant::now() + crate::scaled(Duration::from_secs(30));
        loop {
            let text = z.log_text();
            if text
                .get(start as usize..)
                .is_some_and(|t| t.contains("ztunnel ready"))
            {
                return Ok(z);
            }
            if is_zombie(pid) || Instant::now() > deadline {
                bail!(
                    "ztunnel on {} did not become ready; log:\n{}",
                    node.name,
                    text
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A running `ztunnel controlplane` (the built-in CA over gRPC).
pub struct ControlPlane {
    pub pid: u32,
    pub url: String,
    pub ca_dir: PathBuf,
    pub log: PathBuf,
    dir: PathBuf,
}

impl ControlPlane {
    /// `run` flags that make a node's ztunnel use this CA with its own token.
    pub fn node_args(&self, node: &Node) -> Vec<String> {
        let token = self.dir.join(format!("token-{}", node.name));
        let _ = std::fs::write(&token, format!("token-{}", node.name));
        vec![
            "--ca-address".into(),
            self.url.clone(),
            "--ca-root-cert".into(),
            self.ca_dir.join("root-cert.pem").display().to_string(),
            "--ca-token-file".into(),
            token.display().to_string(),
        ]
    }
}

impl Testbed {
    /// Starts the control plane on `node` (port 15012), trusting a token per testbed node
    /// (`token-<node>`), and waits until it serves.
    pub fn start_controlplane(
        &self,
        node: &Node,
        config: &Path,
        extra: &[&str],
    ) -> anyhow::Result<ControlPlane> {
        self.start_controlplane_with_identities(node, config, extra, &[])
    }

    /// [`start_controlplane`](Self::start_controlplane) that also gives each `(token,
    /// SPIFFE URI)` exactly that identity (a waypoint's, a dedicated proxy's).
    pub fn start_controlplane_with_identities(
        &self,
        node: &Node,
        config: &Path,
        extra: &[&str],
        identities: &[(&str, &str)],
    ) -> anyhow::Result<ControlPlane> {
        let dir = self.dir();
        let mut tokens: String = self
            .nodes()
            .iter()
            .map(|n| format!("token-{0} {0}\n", n.name))
            .collect();
        for (token, identity) in identities {
            let _ = writeln!(tokens, "{token} {identity}");
        }
        let tokens_file = self.write_config("tokens", &tokens)?;
        let ca_dir = dir.join("controlplane-ca");
        let log = dir.join("controlplane.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as usize;
        let mut cmd = node.netns.command(binary())?;
        cmd.arg("controlplane")
            .arg("--config")
            .arg(config)
            .arg("--ca-dir")
            .arg(&ca_dir)
            .arg("--tokens-file")
            .arg(&tokens_file)
            .args(["--listen", &format!("{}:15012", node.ip)])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let pid = self.spawn(cmd)?;
        let deadline = Instant::now() + crate::scaled(Duration::from_secs(30));
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.get(start..).is_some_and(|t| t.contains("serving")) {
                break;
            }
            if is_zombie(pid) || Instant::now() > deadline {
                bail!("control plane did not start; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(ControlPlane {
            pid,
            url: format!("https://{}:15012", node.ip),
            ca_dir,
            log,
            dir,
        })
    }
}

/// A metric of the ztunnel on `node` (15020), summed over the lines that start with
/// `prefix` (`ztunnel_last_hop_syns{result="denied"}`, or a name for all its labels).
pub fn metric(node: &Node, prefix: &str) -> u64 {
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], 15020));
    let (_, body) = crate::http::get(&node.netns, metrics, "/metrics").unwrap();
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// A per-pod capture counter (`/debug/capture`, e.g. `dropped_no_proxy`: SYNs dropped for
/// want of a listener) as the ztunnel on `node` reports it. The counters live in pinned
/// maps, so they outlive ztunnel processes (restarts, handovers).
pub fn capture_counter(node: &Node, pod: &Pod, field: &str) -> anyhow::Result<u64> {
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], 15000));
    let (_, body) = crate::http::get(&node.netns, admin, "/debug/capture")?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v["counters"][pod.ip.to_string()][field]
        .as_u64()
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn deployed_tunables_are_read_from_the_dockerfile() {
        let t = super::deployed_glibc_tunables();
        assert!(
            t.starts_with("glibc.") && !t.contains(char::is_whitespace),
            "{t:?}"
        );
    }

    #[test]
    fn production_log_is_ztunnels_default() {
        assert_eq!(super::PRODUCTION_LOG, ztunnel::logging::DEFAULT_FILTER);
    }
}
