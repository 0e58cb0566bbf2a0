//! Traffic capture: the eBPF programs that steer enrolled pods' TCP into ztunnel.
//!
//! This module loads the capture program (`ebpf/`), pins its maps and links under
//! `<bpffs>/ztunnel/<instance>/`, installs the policy routing that delivers captured
//! packets locally, and keeps the map of enrolled pods. See `ARCHITECTURE.md` for the
//! mechanism; `ztunnel_ebpf_common::decide` documents the per-packet decision.

mod bpffs;
pub mod features;
mod iface_infos;
pub mod interfaces;
pub mod last_hop;
pub mod legacy_tc;
mod links;
mod logs;
#[cfg(test)]
mod object_tests;
mod pinning;
pub mod program_stats;
pub mod routing;
pub mod sockmap;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};
use ztunnel_ebpf_common::{
    maps, IfaceInfo, PodCounters, PodInfo, PodKey, Settings, CAPTURE_PROGRAM, DROP_UNPARSED,
    POD_FLAG_HELD, POD_FLAG_INBOUND, POD_FLAG_OUTBOUND, SETTINGS_ENABLED,
    SETTINGS_HOST_UNDER_POLICY, SETTINGS_LOG_FLOWS,
};

use iface_infos::iface_infos;
use logs::{flow_log_flag, spawn_log_forwarder};

pub use interfaces::{PodInterfaces, Role};
pub use links::{AttachMode, AttachOutcome};
pub use routing::RoutingConfig;

/// The compiled capture program, built by `build.rs`.
static CAPTURE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel-capture"));

/// The `log` target of the program's records (its crate name).
pub const PROGRAM_LOG_TARGET: &str = "ztunnel_capture";

/// Everything the loader needs to know.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Names the pin directory, so several ztunnels (one per node netns in the testbed)
    /// and restarts of one keep their state apart / find it again.
    pub instance: String,
    pub bpffs_root: PathBuf,
    pub routing: RoutingConfig,
    /// `SO_MARK` of ztunnel's own sockets; must not overlap `routing.mark`.
    pub proxy_mark: u32,
    pub outbound_port: u16,
    pub inbound_plain_port: u16,
    pub inbound_hbone_port: u16,
    /// Destination ports never captured (e.g. a node-local agent's).
    pub excluded_ports: Vec<u16>,
    /// How to attach the program to interfaces.
    pub attach: TcAttach,
    /// Priority of the legacy tc filter (lower runs earlier).
    pub tc_priority: u16,
    /// Sockmap acceleration of the pod ↔ ztunnel hops.
    pub sockmap: sockmap::SockmapConfig,
    /// The node's own connections to enrolled pods meet their policy at the last hop,
    /// instead of being exempt (`--host-probes policy`).
    pub host_under_policy: bool,
    /// The port of the DNS proxy's transparent UDP socket that enrolled pods' DNS questions
    /// over UDP are assigned to; 0: not captured.
    pub dns_port: u16,
}

/// The attachment asked for (`--tc-attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TcAttach {
    /// TCX where the kernel has it (6.6 and later), legacy tc filters otherwise.
    Auto,
    /// TCX links; fails on kernels without TCX.
    Tcx,
    /// A clsact qdisc and a cls_bpf filter, on any kernel.
    Legacy,
}

/// An interface of the node and what capture does with it, for the admin endpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InterfaceView {
    pub name: String,
    pub ifindex: u32,
    pub kind: Option<String>,
    pub role: Role,
    pub attached: bool,
    /// The bridge this interface is a port of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

/// Per-pod counters summed over CPUs, as shown by the admin endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub outbound_flows: u64,
    pub inbound_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub dropped_no_proxy: u64,
    pub dropped_spoofed: u64,
    pub dropped_socket_gone: u64,
    pub dns_captured: u64,
    pub dns_passed: u64,
}

/// An enrolled pod address, as read back from the kernel map.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EnrolledPod {
    pub address: IpAddr,
    pub ifindex: u32,
    pub outbound: bool,
    pub inbound: bool,
    /// Held: should be enrolled, cannot be; every packet from or to it is dropped.
    pub held: bool,
}

/// The loaded and attached capture programs of this node.
pub struct Capture {
    cfg: CaptureConfig,
    dir: PathBuf,
    ebpf: Ebpf,
    features: features::Features,
    links: links::Links,
    ifaces: BpfHashMap<MapData, u32, IfaceInfo>,
    drops: PerCpuArray<MapData, u64>,
    /// The node's interfaces at the last refresh.
    inventory: Vec<InterfaceView>,
    /// Links whose peer holds a pod this node enrolls (the last enrollment pass): their
    /// role is `pod`.
    pod_links: BTreeSet<u32>,
    /// Enrolled addresses on a bridge port whose MAC this process pinned.
    pins: BTreeMap<IpAddr, pinning::Pin>,
    /// A netlink connection with strict dump checking, to read pods' namespaces.
    strict_netlink: rtnetlink::Handle,
    pods: BpfHashMap<MapData, PodKey, PodInfo>,
    node_addrs: BpfHashMap<MapData, PodKey, u8>,
    counters: PerCpuHashMap<MapData, PodKey, PodCounters>,
    settings: Array<MapData, Settings>,
    /// What `settings` holds.
    written: Settings,
    netlink: rtnetlink::Handle,
    sockmap: sockmap::Sockmap,
    last_hop: last_hop::LastHop,
}

impl Capture {
    /// Loads the programs (adopting the pinned state of an earlier run of this
    /// instance), installs routing, and attaches to every non-loopback link, so that
    /// connections entering the node for enrolled pods are captured.
    pub async fn start(cfg: CaptureConfig) -> anyhow::Result<Capture> {
        if cfg.routing.mark & cfg.proxy_mark != 0 {
            anyhow::bail!(
                "capture mark {:#x} overlaps the proxy mark {:#x}: captured replies would be misrouted",
                cfg.routing.mark,
                cfg.proxy_mark
            );
        }
        let features = features::check()?;
        let mode = match (cfg.attach, features.tcx) {
            (TcAttach::Auto | TcAttach::Tcx, true) => AttachMode::Tcx,
            (TcAttach::Tcx, false) => anyhow::bail!(
                "--tc-attach tcx: this kernel ({}) has no TCX (Linux 6.6); use auto or legacy",
                features.kernel
            ),
            (TcAttach::Auto | TcAttach::Legacy, _) => AttachMode::Legacy {
                priority: cfg.tc_priority,
            },
        };
        info!(kernel = %features.kernel, requested = ?cfg.attach, mode = ?mode, "capture attachment chosen");
        bpffs::ensure_mounted(&cfg.bpffs_root)?;
        let dir = cfg.bpffs_root.join("ztunnel").join(&cfg.instance);
        let map_dir = dir.join("maps");
        std::fs::create_dir_all(&map_dir)
            .with_context(|| format!("creating {}", map_dir.display()))?;

        drop_incompatible_pins(&map_dir)?;
        let mut ebpf = match load(&map_dir) {
            Ok(e) => e,
            Err(e) => {
                // Maps pinned by an incompatible build: start over rather than refuse.
                warn!("pinned capture maps unusable ({e:#}); replacing them");
                std::fs::remove_dir_all(&map_dir).ok();
                std::fs::create_dir_all(&map_dir)?;
                load(&map_dir)?
            }
        };
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_forwarder(logger),
            Err(e) => warn!("eBPF logs unavailable: {e}"),
        }
        let prog: &mut SchedClassifier = ebpf
            .program_mut(CAPTURE_PROGRAM)
            .context("capture program missing from the object")?
            .try_into()?;
        prog.load()
            .context("loading the capture program (verifier)")?;
        let spare_dir = map_dir.clone();
        let netlink = routing::connect()?;
        let last_hop = last_hop::LastHop::start(
            &mut ebpf,
            &dir,
            mode,
            netlink.clone(),
            Box::new(move || load(&spare_dir)),
        )?;

        let pods = take_hash(&mut ebpf, maps::PODS)?;
        let node_addrs = take_hash(&mut ebpf, maps::NODE_ADDRS)?;
        let ifaces = take_hash(&mut ebpf, maps::IFACES)?;
        let drops = PerCpuArray::try_from(
            ebpf.take_map(maps::DROPS)
                .with_context(|| format!("map {} missing", maps::DROPS))?,
        )?;
        let counters = PerCpuHashMap::try_from(
            ebpf.take_map(maps::COUNTERS)
                .context("counters map missing")?,
        )?;
        let mut excluded: BpfHashMap<MapData, u16, u8> =
            take_hash(&mut ebpf, maps::EXCLUDED_PORTS)?;
        let mut settings: Array<MapData, Settings> = Array::try_from(
            ebpf.take_map(maps::SETTINGS)
                .context("settings map missing")?,
        )?;

        set_ports(&mut excluded, &cfg.excluded_ports)?;
        let written = Settings {
            capture_mark: cfg.routing.mark,
            proxy_mark: cfg.proxy_mark,
            outbound_port: cfg.outbound_port,
            inbound_plain_port: cfg.inbound_plain_port,
            inbound_hbone_port: cfg.inbound_hbone_port,
            flags: SETTINGS_ENABLED
                | flow_log_flag()
                | if cfg.host_under_policy {
                    SETTINGS_HOST_UNDER_POLICY
                } else {
                    0
                },
            dns_port: cfg.dns_port,
            reserved: 0,
        };
        settings.set(0, written, 0)?;
        let sockmap = sockmap::Sockmap::start(&mut ebpf, &cfg.sockmap);

        routing::install(&netlink, cfg.routing).await?;
        let spare_dir = map_dir.clone();
        let spare: links::Spare = Box::new(move || load(&spare_dir));
        let links = links::Links::new(&dir, links::Hook::Capture, mode, netlink.clone(), spare)?;
        let mut capture = Capture {
            cfg,
            dir,
            ebpf,
            features,
            links,
            ifaces,
            drops,
            inventory: vec![],
            pod_links: BTreeSet::new(),
            pins: BTreeMap::new(),
            strict_netlink: interfaces::strict_connection()?,
            pods,
            node_addrs,
            counters,
            settings,
            written,
            netlink,
            sockmap,
            last_hop,
        };
        capture.refresh().await?;
        info!(dir = %capture.dir.display(), "capture programs loaded");
        Ok(capture)
    }

    /// Attaches to interfaces that appeared since the last call (those whose role needs
    /// the program: pods' interfaces and the node's links, see [`Role`]), forgets ones that
    /// went away, and refreshes the node's own addresses. Cheap; called periodically.
    pub async fn refresh(&mut self) -> anyhow::Result<()> {
        let interfaces::Scan { links, addresses } =
            routing::retry_busy(|| interfaces::scan(&self.netlink)).await?;
        let existing: Vec<(String, u32)> =
            links.iter().map(|l| (l.name.clone(), l.index)).collect();
        for links in [&mut self.links, self.last_hop.links()] {
            links.remove_stale(&existing);
            for (name, idx) in links.interfaces() {
                if !existing.contains(&(name.clone(), idx)) {
                    links.forget(&name);
                }
            }
        }
        // Bridges and their ports in `ZT_IFACES` before anything is attached: on a bridge's
        // own device the program must know it is one (it only re-assigns there).
        self.sync_iface_infos(&iface_infos(&links))?;
        let mut inventory = vec![];
        for l in &links {
            let role = Role::of(l, &self.pod_links);
            let bridge = l
                .master
                .and_then(|m| links.iter().find(|b| b.index == m))
                .filter(|b| b.kind.as_deref() == Some("bridge"));
            if role.attached() {
                let outcome = self
                    .links
                    .attach(program(&mut self.ebpf)?, &l.name, l.index)
                    .await?;
                if outcome != AttachOutcome::AlreadyAttached {
                    info!(interface = %l.name, ?role, ?outcome, "capture attached");
                }
            }
            inventory.push(InterfaceView {
                name: l.name.clone(),
                ifindex: l.index,
                kind: l.kind.clone(),
                role,
                attached: role.attached(),
                bridge: bridge.map(|b| b.name.clone()),
            });
        }
        self.inventory = inventory;
        let keys: Vec<PodKey> = addresses.iter().map(|a| key(*a)).collect();
        let old: Vec<PodKey> = self.node_addrs.keys().filter_map(Result::ok).collect();
        for k in old.iter().filter(|k| !keys.contains(k)) {
            self.node_addrs.remove(k)?;
        }
        for k in keys.iter().filter(|k| !old.contains(k)) {
            self.node_addrs.insert(k, 1, 0)?;
        }
        self.follow_log_filter()
    }

    /// Brings `ZT_IFACES` in line with the interfaces found: ifindex → what the program
    /// must know of it (a bridge port's bridge MAC, no MAC header).
    fn sync_iface_infos(&mut self, infos: &BTreeMap<u32, IfaceInfo>) -> anyhow::Result<()> {
        let old: Vec<u32> = self.ifaces.keys().filter_map(Result::ok).collect();
        for i in old.iter().filter(|i| !infos.contains_key(i)) {
            self.ifaces.remove(i)?;
        }
        for (i, info) in infos {
            if self.ifaces.get(i, 0).ok() != Some(*info) {
                self.ifaces.insert(i, *info, 0)?;
            }
        }
        Ok(())
    }

    /// Where each pod of this node is: its address → the host side of its interface.
    pub async fn pod_interfaces(&self) -> anyhow::Result<PodInterfaces> {
        let links = routing::retry_busy(|| interfaces::links(&self.netlink)).await?;
        Ok(interfaces::pod_interfaces(&self.strict_netlink, &links).await)
    }

    /// The links whose peer holds a pod this node enrolls, as the last enrollment pass
    /// found them: they are shown as pods' interfaces.
    pub fn set_pod_links(&mut self, links: BTreeSet<u32>) {
        for i in &mut self.inventory {
            if matches!(i.role, Role::Pod | Role::Node) {
                i.role = if links.contains(&i.ifindex) && i.kind.as_deref() == Some("veth") {
                    Role::Pod
                } else {
                    Role::Node
                };
            }
        }
        self.pod_links = links;
    }

    /// Turns the program's per-flow log records on or off to match the log filter, which
    /// the admin endpoint may have changed since the last call.
    fn follow_log_filter(&mut self) -> anyhow::Result<()> {
        let flags = (self.written.flags & !SETTINGS_LOG_FLOWS) | flow_log_flag();
        if flags != self.written.flags {
            let wanted = Settings {
                flags,
                ..self.written
            };
            self.settings.set(0, wanted, 0)?;
            self.written = wanted;
            info!(
                on = flags & SETTINGS_LOG_FLOWS != 0,
                "capture program's flow log switched"
            );
        }
        Ok(())
    }

    /// Starts capturing a pod's connections (new ones: established flows finish on the
    /// direct path). `interface` is the host side of its interface (`ifindex`): the
    /// program believes the pod's addresses only on it.
    pub async fn enroll(
        &mut self,
        addresses: &[IpAddr],
        interface: &str,
        ifindex: u32,
    ) -> anyhow::Result<()> {
        self.links
            .attach(program(&mut self.ebpf)?, interface, ifindex)
            .await?;
        // The last hop before the address is enrolled: the moment the program at ingress
        // starts sending its new connections to ztunnel, the ones that arrive around it
        // (a Service VIP, a NodePort) are judged too.
        let outcome = self
            .last_hop
            .attach(&mut self.ebpf, interface, ifindex)
            .await?;
        if outcome != AttachOutcome::AlreadyAttached {
            debug!(interface, ?outcome, "last hop attached");
        }
        for a in addresses {
            let info = PodInfo {
                ifindex,
                flags: POD_FLAG_OUTBOUND | POD_FLAG_INBOUND,
            };
            self.pods
                .insert(key(*a), info, 0)
                .with_context(|| format!("enrolling {a}"))?;
            debug!(address = %a, interface, ifindex, "pod address enrolled");
        }
        if let Err(e) = self.pin_owner(addresses, ifindex).await {
            warn!(
                interface,
                "pinning the pod's MAC on its bridge failed: {e:#}"
            );
        }
        Ok(())
    }

    /// Holds a pod this node should enroll but cannot (its interface unknown, or its
    /// address claimed by several): never open, the program drops every TCP packet from
    /// it (but to the node's own addresses) and to it, on every interface it sees.
    pub fn hold(&mut self, addresses: &[IpAddr]) -> anyhow::Result<()> {
        let held = PodInfo {
            ifindex: 0,
            flags: POD_FLAG_HELD,
        };
        for a in addresses {
            if self.pods.get(&key(*a), 0).ok() != Some(held) {
                self.pods
                    .insert(key(*a), held, 0)
                    .with_context(|| format!("holding {a}"))?;
                info!(address = %a, "pod address held: its traffic is dropped until it is enrolled");
            }
        }
        Ok(())
    }

    /// Stops capturing new connections of these addresses; flows already going through
    /// ztunnel keep going through it until they close.
    pub fn unenroll(&mut self, addresses: &[IpAddr]) -> anyhow::Result<()> {
        for a in addresses {
            match self.pods.remove(&key(*a)) {
                Ok(()) => info!(address = %a, "pod unenrolled"),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).with_context(|| format!("unenrolling {a}")),
            }
            let _ = self.counters.remove(&key(*a));
        }
        Ok(())
    }

    pub fn enrolled(&self) -> Vec<EnrolledPod> {
        let mut v: Vec<EnrolledPod> = self
            .pods
            .iter()
            .filter_map(Result::ok)
            .map(|(k, info)| EnrolledPod {
                address: addr(k),
                ifindex: info.ifindex,
                outbound: info.flags & POD_FLAG_OUTBOUND != 0,
                inbound: info.flags & POD_FLAG_INBOUND != 0,
                held: info.flags & POD_FLAG_HELD != 0,
            })
            .collect();
        v.sort_by_key(|p| p.address);
        v
    }

    /// Per-pod counters, summed over CPUs.
    pub fn counters(&self) -> BTreeMap<IpAddr, Counters> {
        let mut out = BTreeMap::new();
        for (k, per_cpu) in self.counters.iter().filter_map(Result::ok) {
            let mut c = Counters::default();
            for v in per_cpu.iter() {
                c.outbound_flows += v.outbound_flows;
                c.inbound_flows += v.inbound_flows;
                c.packets += v.packets;
                c.bytes += v.bytes;
                c.dropped_no_proxy += v.dropped_no_proxy;
                c.dropped_spoofed += v.dropped_spoofed;
                c.dropped_socket_gone += v.dropped_socket_gone;
                c.dns_captured += v.dns_captured;
                c.dns_passed += v.dns_passed;
            }
            out.insert(addr(k), c);
        }
        out
    }

    /// Packets to or from enrolled pods dropped because their TCP header could not be
    /// read (`ZT_DROPS`), summed over CPUs.
    pub fn dropped_unparsed(&self) -> u64 {
        self.drops
            .get(&DROP_UNPARSED, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// The last hop's counters.
    pub fn last_hop_counters(&self) -> last_hop::LastHopCounters {
        self.last_hop.counters()
    }

    /// The last hop's questions, for the task that answers them, and where the answers go.
    pub fn last_hop_responder(&mut self) -> Option<(last_hop::Questions, last_hop::Answers)> {
        let answers = self.last_hop.answers();
        self.last_hop.take_questions().map(|q| (q, answers))
    }

    /// Verdicts the last hop holds now.
    pub fn last_hop_cached(&self) -> usize {
        self.last_hop.answers().len()
    }

    /// Sockmap acceleration: on or why not, and its counters.
    pub fn sockmap(&self) -> sockmap::SockmapView {
        self.sockmap.view()
    }

    /// Interfaces the program is attached to.
    pub fn interfaces(&self) -> Vec<(String, u32)> {
        self.links.interfaces()
    }

    /// Every interface of the node at the last refresh, with its role.
    pub fn inventory(&self) -> &[InterfaceView] {
        &self.inventory
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.links.mode()
    }

    pub fn features(&self) -> &features::Features {
        &self.features
    }

    pub fn pin_dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn netlink(&self) -> &rtnetlink::Handle {
        &self.netlink
    }

    pub fn config(&self) -> &CaptureConfig {
        &self.cfg
    }

    /// Removes everything this instance installed: links, routing, pinned maps.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        // The egress filters first: the ingress side removes a clsact qdisc it added
        // only once nothing filters on it.
        self.last_hop.links().detach_all().await;
        self.links.detach_all().await;
        routing::uninstall(&self.netlink, self.cfg.routing).await?;
        std::fs::remove_dir_all(&self.dir).ok();
        info!("capture removed");
        Ok(())
    }

    /// Exits leaving programs, maps and routing in place: enrolled pods stay captured
    /// (new connections wait, fail closed) until the next ztunnel adopts them.
    pub fn retain(mut self) {
        self.links.retain_all();
        self.last_hop.links().retain_all();
        info!(dir = %self.dir.display(), "capture retained for the next ztunnel");
    }
}

fn program(ebpf: &mut Ebpf) -> anyhow::Result<&mut SchedClassifier> {
    Ok(ebpf
        .program_mut(CAPTURE_PROGRAM)
        .context("capture program")?
        .try_into()?)
}

/// Removes pinned maps whose layout (key size, value size, entries) is not this build's.
/// aya reuses a pinned map as it finds it, so after an upgrade that changed a map, the
/// verifier would refuse the new program (an access past the old value's end) or its
/// user-space view would not fit. A replaced map starts empty: pods are enrolled again on
/// the next pass, counters start over.
fn drop_incompatible_pins(map_dir: &std::path::Path) -> anyhow::Result<()> {
    let obj = aya_obj::Object::parse(CAPTURE_OBJECT).context("parsing the capture object")?;
    for (name, def) in &obj.maps {
        let pin = map_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&pin) else {
            continue;
        };
        let pinned = (info.key_size(), info.value_size(), info.max_entries());
        let built = (def.key_size(), def.value_size(), def.max_entries());
        if pinned != built {
            warn!(map = %name, ?pinned, ?built, "pinned map has another layout (key, value, entries): replaced");
            std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        }
    }
    Ok(())
}

fn load(map_dir: &std::path::Path) -> anyhow::Result<Ebpf> {
    EbpfLoader::new()
        .default_map_pin_directory(map_dir)
        .load(CAPTURE_OBJECT)
        .context("loading the capture object")
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
) -> anyhow::Result<BpfHashMap<MapData, K, V>> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing"))?;
    Ok(BpfHashMap::try_from(map)?)
}

/// Makes the pinned port set `map` hold exactly `ports`: what a restart left in it goes, and
/// a port in both is never absent in between (the running programs read the map).
pub(crate) fn set_ports(
    map: &mut BpfHashMap<MapData, u16, u8>,
    ports: &[u16],
) -> anyhow::Result<()> {
    let old: Vec<u16> = map.keys().filter_map(Result::ok).collect();
    for p in old.iter().filter(|p| !ports.contains(p)) {
        map.remove(p)?;
    }
    for p in ports {
        map.insert(p, 1, 0)?;
    }
    Ok(())
}

pub fn key(ip: IpAddr) -> PodKey {
    match ip {
        IpAddr::V4(a) => PodKey::v4(a.octets()),
        IpAddr::V6(a) => PodKey::v6(a.octets()),
    }
}

pub fn addr(k: PodKey) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(k.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}
