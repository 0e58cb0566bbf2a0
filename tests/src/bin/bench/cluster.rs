//! The benchmark cluster: two nodes, each running ztunnel, with one pod pair in the mesh
//! and one outside it for every path (cross-node and same-node), so direct and mesh rounds
//! alternate on the same nodes and processes without restarting anything.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use ztunnel_tests::http;
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{Pod, Testbed};

use crate::load::Servers;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Pods outside the mesh (`protocol: TCP`): ztunnel's program passes their packets.
    Direct,
    /// Enrolled pods: capture, HBONE, mTLS.
    Mesh,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Mesh => "mesh",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    CrossNode,
    SameNode,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::CrossNode => "cross-node",
            Path::SameNode => "same-node",
        }
    }
}

pub struct Pair {
    pub client: Pod,
    pub server: Pod,
}

impl Pair {
    pub fn dst(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.server.ip), port)
    }
}

pub struct Cluster {
    /// Dropped last: tears down namespaces and stops the ztunnels.
    _tb: Testbed,
    pub ztunnels: Vec<Ztunnel>,
    pairs: Vec<(Mode, Path, Pair)>,
}

impl Cluster {
    pub fn start() -> anyhow::Result<Cluster> {
        let mut tb = Testbed::new()?;
        let a = tb.add_node("node-a")?;
        let b = tb.add_node("node-b")?;
        let mut pairs = Vec::new();
        let mut specs = Vec::new();
        for mode in [Mode::Direct, Mode::Mesh] {
            let m = &mode.name()[..1];
            let client = tb.add_pod(&a, &format!("{m}-client"))?;
            let remote = tb.add_pod(&b, &format!("{m}-server"))?;
            let local = tb.add_pod(&a, &format!("{m}-local"))?;
            for pod in [&client, &remote, &local] {
                pod.allow_fast_reconnects()?;
                specs.push(match mode {
                    Mode::Mesh => WorkloadSpec::mesh(pod, "bench", &pod.name),
                    Mode::Direct => WorkloadSpec::plain(pod, "bench"),
                });
            }
            Servers::start(&remote.netns)?;
            Servers::start(&local.netns)?;
            pairs.push((
                mode,
                Path::CrossNode,
                Pair {
                    client: client.clone(),
                    server: remote,
                },
            ));
            pairs.push((
                mode,
                Path::SameNode,
                Pair {
                    client,
                    server: local,
                },
            ));
        }
        let config = tb.write_config("workloads.yaml", &local_config(&specs, ""))?;
        tb.own_binaries()?;
        let mut ztunnels = Vec::new();
        for node in [&a, &b] {
            let z = tb.start_ztunnel(node, &config, &[])?;
            wait_ready(&z)?;
            ztunnels.push(z);
        }
        Ok(Cluster {
            _tb: tb,
            ztunnels,
            pairs,
        })
    }

    pub fn pair(&self, mode: Mode, path: Path) -> &Pair {
        &self
            .pairs
            .iter()
            .find(|(m, p, _)| *m == mode && *p == path)
            .expect("every pair exists")
            .2
    }

    pub fn pids(&self) -> Vec<u32> {
        self.ztunnels.iter().map(|z| z.pid).collect()
    }

    /// Fails if a ztunnel died during a run (its numbers would be meaningless).
    pub fn check_alive(&self) -> anyhow::Result<()> {
        for z in &self.ztunnels {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", z.pid)).unwrap_or_default();
            if stat.is_empty()
                || stat
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            {
                bail!("ztunnel on {} died; log: {}", z.node.name, z.log.display());
            }
        }
        Ok(())
    }
}

fn wait_ready(z: &Ztunnel) -> anyhow::Result<()> {
    let ready = SocketAddr::from(([127, 0, 0, 1], 15021));
    for _ in 0..200 {
        if matches!(
            http::get(&z.node.netns, ready, "/healthz/ready"),
            Ok((200, _))
        ) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = http::get(&z.node.netns, ready, "/healthz/ready");
    Err(anyhow::anyhow!("{last:?}"))
        .with_context(|| format!("ztunnel on {} never ready", z.node.name))
}
