//! The benchmark cluster: two nodes, each running ztunnel, with one pod pair in the mesh
//! and one outside it for every path (cross-node and same-node), so direct and mesh rounds
//! alternate on the same nodes and processes without restarting anything.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use ztunnel_tests::http;
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{Pod, Testbed};

use crate::load::{server_ports, Servers};
use crate::relay;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Pods outside the mesh (`protocol: TCP`): ztunnel's program passes their packets.
    Direct,
    /// The direct pods through plain TCP relays on the nodes (see `relay`).
    Relay,
    /// Enrolled pods: capture, HBONE, mTLS (sockmap off: their ports are excluded).
    Mesh,
    /// The same enrolled pods on other ports, with sockmap acceleration of the pod ↔
    /// ztunnel hops (same ztunnels, same run).
    Sockmap,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Relay => "relay",
            Mode::Mesh => "mesh",
            Mode::Sockmap => "sockmap",
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
    /// The client's node's relay, and the offset its ports have from the server's.
    via: Option<(IpAddr, u16)>,
    /// Without a relay: the offset of the server's ports (the sockmap set).
    offset: u16,
}

impl Pair {
    pub fn dst(&self, port: u16) -> SocketAddr {
        match self.via {
            Some((relay, offset)) => SocketAddr::new(relay, port + offset),
            None => SocketAddr::new(IpAddr::V4(self.server.ip), port + self.offset),
        }
    }
}

/// Same-node relay ports: the server's plus this, clear of ztunnel's 150xx.
const SAME_NODE_RELAY_OFFSET: u16 = 20_000;
/// The mesh pods' second set of servers, accelerated with sockmap: the first set's ports
/// plus this (7001, 7002, 8000–8063), clear of both other sets.
const SOCKMAP_OFFSET: u16 = 2_000;

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
                    _ => WorkloadSpec::plain(pod, "bench"),
                });
            }
            Servers::start(&remote.netns)?;
            Servers::start(&local.netns)?;
            if mode == Mode::Mesh {
                Servers::start_at(&remote.netns, SOCKMAP_OFFSET)?;
                Servers::start_at(&local.netns, SOCKMAP_OFFSET)?;
                for (path, server) in [(Path::CrossNode, &remote), (Path::SameNode, &local)] {
                    pairs.push((
                        Mode::Sockmap,
                        path,
                        Pair {
                            client: client.clone(),
                            server: server.clone(),
                            via: None,
                            offset: SOCKMAP_OFFSET,
                        },
                    ));
                }
            }
            if mode == Mode::Direct {
                // The relays carry the direct pods' connections.
                let ports = server_ports();
                let (a_ip, b_ip) = (IpAddr::V4(a.ip), IpAddr::V4(b.ip));
                relay::start(&a.netns, a_ip, 0, &ports, b_ip)?;
                relay::start(&b.netns, b_ip, 0, &ports, IpAddr::V4(remote.ip))?;
                relay::start(
                    &a.netns,
                    a_ip,
                    SAME_NODE_RELAY_OFFSET,
                    &ports,
                    IpAddr::V4(local.ip),
                )?;
                for (path, server, via) in [
                    (Path::CrossNode, &remote, (a_ip, 0)),
                    (Path::SameNode, &local, (a_ip, SAME_NODE_RELAY_OFFSET)),
                ] {
                    pairs.push((
                        Mode::Relay,
                        path,
                        Pair {
                            client: client.clone(),
                            server: server.clone(),
                            via: Some(via),
                            offset: 0,
                        },
                    ));
                }
            }
            pairs.push((
                mode,
                Path::CrossNode,
                Pair {
                    client: client.clone(),
                    server: remote,
                    via: None,
                    offset: 0,
                },
            ));
            pairs.push((
                mode,
                Path::SameNode,
                Pair {
                    client,
                    server: local,
                    via: None,
                    offset: 0,
                },
            ));
        }
        let config = tb.write_config("workloads.yaml", &local_config(&specs, ""))?;
        tb.own_binaries()?;
        // Sockmap on, but not for the plain mesh pairs' ports: one run measures the mesh
        // with and without it on the same processes.
        let excluded: Vec<String> = server_ports().iter().map(u16::to_string).collect();
        let excluded = excluded.join(",");
        let args = ["--sockmap=true", "--sockmap-exclude-ports", &excluded];
        let mut ztunnels = Vec::new();
        for node in [&a, &b] {
            let z = tb.start_ztunnel(node, &config, &args)?;
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
