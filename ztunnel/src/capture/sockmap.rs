//! Sockmap acceleration of the plaintext pod ↔ ztunnel hops (`--sockmap`): loads the
//! object's `zt_skmsg` onto the pinned `ZT_SOCKS` map and attaches `zt_sockops` to the
//! cgroup v2 root, so the kernel moves bytes between a pod's socket and ztunnel's without
//! either TCP stack. `ztunnel_ebpf_common::sockmap` says which sockets and why.
//!
//! Every step is optional: a kernel without what it needs, no cgroup v2, or an attach
//! that fails leaves acceleration off (said once in the log and in `/debug/capture`), and
//! every connection takes the normal path. Acceleration is per connection too: a socket
//! whose peer is not in the map at its first send stays on TCP.
//!
//! Lifetimes: the `sk_msg` program is attached to the pinned map and stays with it, so
//! accelerated connections keep working across a restart or handover (each socket keeps
//! the program it was inserted with). The sock_ops link is this process's: when ztunnel
//! dies new connections are simply not accelerated until the next one attaches its own.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::Context;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, SockHash};
use aya::programs::{CgroupAttachMode, ProgramType, SkMsg, SockOps};
use aya::sys::{is_map_supported, is_program_supported};
use aya::Ebpf;
use tracing::{info, warn};
use ztunnel_ebpf_common::sockmap::{SockKey, SockmapCounters, SockmapSettings, SOCKMAP_ENABLED};
use ztunnel_ebpf_common::{maps, SKMSG_PROGRAM, SOCKOPS_PROGRAM};

/// What the loader is asked for.
#[derive(Clone, Debug, Default)]
pub struct SockmapConfig {
    /// `--sockmap`: accelerate where the kernel can.
    pub enabled: bool,
    /// `--sockmap-cgroup`: the cgroup v2 directory whose sockets (and descendants') are
    /// considered; the cgroup2 mount (the root) when not given.
    pub cgroup: Option<PathBuf>,
    /// `--sockmap-exclude-ports`: ports (either end) never accelerated, for pods whose
    /// programs read sockets with `splice()` (which does not see redirected data).
    pub excluded_ports: Vec<u16>,
}

/// Whether acceleration is on, and what it did, for `/debug/capture` and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SockmapView {
    pub enabled: bool,
    /// Why it is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_because: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    pub excluded_ports: Vec<u16>,
    pub counters: SockmapTotals,
}

/// [`SockmapCounters`] summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SockmapTotals {
    /// Accelerated hops: pod sockets put in the map with a ztunnel peer.
    pub accelerated_connections: u64,
    pub ztunnel_sockets: u64,
    pub redirected_sockets: u64,
    pub fallback_sockets: u64,
    pub peer_gone_sends: u64,
    pub insert_failed: u64,
}

/// The loaded acceleration (or why there is none).
pub struct Sockmap {
    view: SockmapView,
    counters: Option<PerCpuArray<MapData, SockmapCounters>>,
}

impl Sockmap {
    /// Turns acceleration on as asked and possible; never fails capture.
    pub fn start(ebpf: &mut Ebpf, cfg: &SockmapConfig) -> Sockmap {
        let mut view = SockmapView {
            excluded_ports: cfg.excluded_ports.clone(),
            ..Default::default()
        };
        // The settings map is pinned: a previous run's "on" must be overwritten either way.
        let mut settings: Option<Array<MapData, SockmapSettings>> = ebpf
            .take_map(maps::SOCK_CFG)
            .and_then(|m| Array::try_from(m).ok());
        let counters = ebpf
            .take_map(maps::SOCK_COUNTERS)
            .and_then(|m| PerCpuArray::try_from(m).ok());
        let result = if cfg.enabled {
            load(ebpf, cfg).map(Some)
        } else {
            Ok(None)
        };
        let written = match &result {
            Ok(Some((cookie, cgroup))) => {
                view.enabled = true;
                view.cgroup = Some(cgroup.display().to_string());
                SockmapSettings {
                    netns_cookie: *cookie,
                    flags: SOCKMAP_ENABLED,
                    _pad: 0,
                }
            }
            Ok(None) => {
                view.off_because = Some("not asked for (--sockmap=true turns it on)".into());
                SockmapSettings::default()
            }
            Err(e) => {
                warn!("sockmap acceleration off: {e:#}");
                view.off_because = Some(format!("{e:#}"));
                SockmapSettings::default()
            }
        };
        if let Some(Err(e)) = settings.as_mut().map(|s| s.set(0, written, 0)) {
            warn!("writing the sockmap settings failed: {e}");
            view.enabled = false;
            view.off_because = Some(format!("writing its settings failed: {e}"));
        }
        if view.enabled {
            info!(cgroup = ?view.cgroup, "sockmap acceleration on");
        }
        Sockmap { view, counters }
    }

    /// State and counters now.
    pub fn view(&self) -> SockmapView {
        let mut v = self.view.clone();
        if let Some(c) = &self.counters {
            if let Ok(per_cpu) = c.get(&0, 0) {
                for x in per_cpu.iter() {
                    v.counters.accelerated_connections += x.pod_sockets;
                    v.counters.ztunnel_sockets += x.ztunnel_sockets;
                    v.counters.redirected_sockets += x.redirected;
                    v.counters.fallback_sockets += x.fallback;
                    v.counters.peer_gone_sends += x.peer_gone;
                    v.counters.insert_failed += x.insert_failed;
                }
            }
        }
        v
    }
}

/// Probes, loads and attaches; the netns cookie and cgroup on success.
fn load(ebpf: &mut Ebpf, cfg: &SockmapConfig) -> anyhow::Result<(u64, PathBuf)> {
    missing_features()?;
    let cookie = netns_cookie().context("reading ztunnel's network namespace cookie")?;
    let cgroup = match &cfg.cgroup {
        Some(c) => c.clone(),
        None => cgroup2_mount()?,
    };
    let mut excluded: BpfHashMap<MapData, u16, u8> = BpfHashMap::try_from(
        ebpf.take_map(maps::SOCK_EXCL)
            .context("sockmap port map missing")?,
    )?;
    super::set_ports(&mut excluded, &cfg.excluded_ports)?;
    let socks: SockHash<MapData, SockKey> =
        SockHash::try_from(ebpf.take_map(maps::SOCKS).context("socket map missing")?)?;
    let msg: &mut SkMsg = ebpf
        .program_mut(SKMSG_PROGRAM)
        .context("sk_msg program missing")?
        .try_into()?;
    msg.load()
        .context("loading the sk_msg program (verifier)")?;
    msg.attach(socks.fd())
        .context("attaching the sk_msg program to the socket map")?;
    let ops: &mut SockOps = ebpf
        .program_mut(SOCKOPS_PROGRAM)
        .context("sock_ops program missing")?
        .try_into()?;
    ops.load()
        .context("loading the sock_ops program (verifier)")?;
    let dir = std::fs::File::open(&cgroup)
        .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    // A bpf_link (aya uses one on 5.7+): links always share the cgroup with others (the
    // CNI's, a predecessor's during a handover) and take no flags; ALLOW_MULTI is EINVAL.
    ops.attach(&dir, CgroupAttachMode::Single)
        .with_context(|| format!("attaching sock_ops to {}", cgroup.display()))?;
    Ok((cookie, cgroup))
}

/// Names what the kernel lacks for acceleration (Linux 5.15 has it all).
fn missing_features() -> anyhow::Result<()> {
    use aya::maps::MapType;
    let mut missing = vec![];
    for (ok, what) in [
        (
            is_program_supported(ProgramType::SockOps).ok(),
            "sock_ops programs",
        ),
        (
            is_program_supported(ProgramType::SkMsg).ok(),
            "sk_msg programs",
        ),
        (is_map_supported(MapType::SockHash).ok(), "sockhash maps"),
        (
            is_map_supported(MapType::SkStorage).ok(),
            "socket storage maps",
        ),
    ] {
        if ok != Some(true) {
            missing.push(what);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("this kernel lacks {}", missing.join(", "))
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14) of a socket in ztunnel's namespace: how the programs
/// tell ztunnel's sockets from pods'.
fn netns_cookie() -> anyhow::Result<u64> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(cookie)
}

/// Where cgroup v2 is mounted (its root), from this process's mount table.
fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    cgroup2_in(&table).context(
        "no cgroup v2 mount (sock_ops attaches to a cgroup v2 directory; give --sockmap-cgroup)",
    )
}

fn cgroup2_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        // `id parent maj:min root mountpoint options [optional...] - fstype source ...`
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2").then(|| {
            left.split_whitespace()
                .nth(4)
                .map(Path::new)
                .map(Path::to_path_buf)
        })?
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "24 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      25 24 0:23 / /sys/fs/cgroup/unified rw,relatime shared:5 - cgroup2 cgroup2 rw\n\
                      26 24 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            super::cgroup2_in(hybrid).as_deref(),
            Some(std::path::Path::new("/sys/fs/cgroup/unified"))
        );
        let v1_only = "26 24 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(super::cgroup2_in(v1_only), None);
    }
}
