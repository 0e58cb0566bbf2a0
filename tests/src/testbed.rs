//! A cluster in network namespaces: nodes on one switched segment, pods behind veths.
//!
//! Addressing (every testbed has its own namespaces, so all testbeds reuse it):
//! - node `i` (1-based): `192.168.0.i/24`, `fd00:ff::i/64` on `eth0`, plugged into a
//!   bridge in a separate `switch` namespace;
//! - pod `k` (2-based) on node `i`: `10.i.0.k` and `fd00:i::k` on its `eth0`; the host
//!   side of its veth is `p<k>` in the node namespace;
//! - how pods are attached and how nodes reach each other's pod ranges (`10.j.0.0/16`,
//!   `fd00:j::/64`) is the testbed's [`Layout`], chosen at creation. The default
//!   ([`Testbed::new`]): pods have `/32` and `/128` addresses, default routes via
//!   `169.254.1.1` / `fe80::1`, addresses every host-side veth carries, a route per pod
//!   in the node; pod ranges routed over the wire to the other node's address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::layout::{self, Layout};
use crate::netns::Netns;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Testbed {
    prefix: String,
    switch: Arc<Netns>,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    layout: Layout,
    processes: Mutex<Vec<Child>>,
    /// Per-node ztunnel binaries, when not the shared one (see `Testbed::own_binaries`).
    pub(crate) binaries: Mutex<std::collections::HashMap<String, std::path::PathBuf>>,
    /// The nodes' IPIP tunnel endpoints, in an IPIP layout.
    tunnels: Vec<crate::tunnel::Relay>,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub index: u8,
    pub netns: Arc<Netns>,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The testbed's layout (the same for every node).
    pub layout: Layout,
    pods: Arc<AtomicU32>,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub netns: Arc<Netns>,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Host side of the pod's veth, in the node namespace (also in a bridged layout,
    /// where it is a port of the bridge).
    pub host_if: String,
    /// The index of the pod's node (`1` for the first node).
    pub node_index: u8,
    /// The testbed's layout.
    pub layout: Layout,
}

impl Testbed {
    /// A new, empty testbed whose namespaces are named `zt<pid>-<n>-…`, in the layout
    /// `TESTBED_LAYOUT` names ([`Layout::from_env`]; `cargo xtask layouts` sets it), by
    /// default [`Layout::ROUTED`] (routed pods, direct routes between nodes).
    pub fn new() -> anyhow::Result<Testbed> {
        Testbed::with_layout(Layout::from_env())
    }

    /// A new, empty testbed in `layout` (see [`crate::layout`]).
    pub fn with_layout(layout: Layout) -> anyhow::Result<Testbed> {
        crate::cleanup::init();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{}{}-{}", crate::cleanup::PREFIX, std::process::id(), n);
        let switch = Arc::new(Netns::create(&format!("{prefix}-switch"))?);
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        Ok(Testbed {
            prefix,
            switch,
            nodes: vec![],
            pods: vec![],
            layout,
            processes: Mutex::new(vec![]),
            binaries: Mutex::default(),
            tunnels: vec![],
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn add_node(&mut self, name: &str) -> anyhow::Result<Node> {
        let index = self.nodes.len() as u8 + 1;
        let netns = Arc::new(Netns::create(&format!("{}-{name}", self.prefix))?);
        let ip = Ipv4Addr::new(192, 168, 0, index);
        let ip6: Ipv6Addr = format!("fd00:ff::{index}").parse()?;
        let sw = format!("n{index}");
        self.switch.ip(&[
            "link",
            "add",
            &sw,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        self.switch
            .ip(&["link", "set", &sw, "master", "br0", "up"])?;
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.sysctl("net.ipv4.ip_forward", "1")?;
        netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        layout::prepare_node(&netns, index, self.layout)?;
        self.tunnels
            .extend(layout::start_tunnel(&netns, index, self.layout)?);
        // Routes to and from the nodes that already exist.
        for other in &self.nodes {
            layout::route_pods(&netns, other.index, other.ip, other.ip6, self.layout)?;
            layout::route_pods(&other.netns, index, ip, ip6, self.layout)?;
        }
        let node = Node {
            name: name.to_string(),
            index,
            netns,
            ip,
            ip6,
            layout: self.layout,
            pods: Arc::new(AtomicU32::new(1)),
        };
        self.nodes.push(node.clone());
        Ok(node)
    }

    pub fn add_pod(&mut self, node: &Node, name: &str) -> anyhow::Result<Pod> {
        let k = node.pods.fetch_add(1, Ordering::SeqCst) + 1;
        let netns = Arc::new(Netns::create(&format!(
            "{}-{}-{name}",
            self.prefix, node.name
        ))?);
        let ip = Ipv4Addr::new(10, node.index, 0, k as u8);
        let ip6: Ipv6Addr = format!("fd00:{}::{k}", node.index).parse()?;
        let host_if = format!("p{k}");
        node.netns.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        layout::attach_pod(
            &node.netns,
            &netns,
            &host_if,
            node.index,
            ip,
            ip6,
            self.layout,
        )?;
        let pod = Pod {
            name: name.to_string(),
            node: node.name.clone(),
            netns,
            ip,
            ip6,
            host_if,
            node_index: node.index,
            layout: self.layout,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Starts a process inside `netns`; it is stopped (SIGTERM, then SIGKILL) when the
    /// testbed is dropped, unless it was stopped before.
    pub fn spawn(&self, mut cmd: Command) -> anyhow::Result<u32> {
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let pid = child.id();
        crate::cleanup::register_child(pid);
        self.processes.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Stops a process started with [`Testbed::spawn`]: SIGTERM and up to `grace` to
    /// exit, else SIGKILL. Returns its exit status.
    pub fn stop(&self, pid: u32, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut procs = self.processes.lock().unwrap();
        let pos = procs.iter().position(|c| c.id() == pid)?;
        let mut child = procs.remove(pos);
        crate::cleanup::unregister_child(pid);
        stop_child(&mut child, grace)
    }

    /// Kills a process outright (SIGKILL), as a crash would.
    pub fn kill(&self, pid: u32) {
        self.stop(pid, Duration::ZERO);
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for mut child in self.processes.lock().unwrap().drain(..) {
            crate::cleanup::unregister_child(child.id());
            stop_child(&mut child, Duration::from_secs(5));
        }
        if !self.binaries.lock().unwrap().is_empty() {
            self.remove_binaries();
        }
        // Pins of ztunnels that were killed: removing them detaches their programs.
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/ztunnel/{}", node.netns.name()));
        }
        // The tunnels' fds hold their namespaces: closed before the namespaces go.
        self.tunnels.clear();
        self.pods.clear();
        self.nodes.clear();
    }
}

fn stop_child(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    let pid = child.id() as i32;
    if grace.is_zero() {
        let _ = child.kill();
        return child.wait().ok();
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + crate::scaled(grace);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

impl Node {
    /// The node's interface on the wire (`eth0`).
    pub fn uplink(&self) -> &'static str {
        self.layout.uplink()
    }

    /// The pods' bridge (`cni0`) in a bridged layout.
    pub fn bridge(&self) -> Option<&'static str> {
        self.layout.bridge()
    }

    /// The VXLAN device (`flannel.1`) in an overlay layout.
    pub fn vxlan(&self) -> Option<&'static str> {
        self.layout.vxlan()
    }

    /// The L3 tunnel device (`tunl0`) in an IPIP layout.
    pub fn tunnel(&self) -> Option<&'static str> {
        self.layout.tunnel()
    }
}

impl Pod {
    /// For a pod that opens connections to one server faster than Linux's defaults allow
    /// (28,232 ephemeral ports, each held a minute in TIME_WAIT by the side that closes
    /// first: ~470 connections/s to one address and port, mesh or not): the whole port
    /// range, and reuse of its own TIME_WAIT ports. The pod's own choice, as a real
    /// client's would be; ztunnel's sockets are untouched.
    pub fn allow_fast_reconnects(&self) -> anyhow::Result<()> {
        self.netns
            .sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        self.netns.sysctl("net.ipv4.tcp_tw_reuse", "1")
    }

    /// The pod's default gateway (`169.254.1.1` / `fe80::1` routed; the bridge's
    /// `10.i.0.1` / `fd00:i::1` bridged).
    pub fn gateway(&self, v6: bool) -> IpAddr {
        self.layout.pod_gateway(self.node_index, v6)
    }

    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ip6)
        } else {
            IpAddr::V4(self.ip)
        }
    }
}
