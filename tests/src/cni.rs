//! A fake CNI's own packet programs, on the interfaces ztunnel also uses, so tests can
//! prove the two coexist: legacy tc `u32` filters under a `clsact` qdisc ([`U32Filter`])
//! and a TCX program that counts packets by IP protocol and passes them on
//! ([`TcxCounter`], in `cni/tcx.rs`), plus ways to list what is attached to an interface
//! ([`tc_filters`], [`tcx_prog_ids`], [`tcx_programs`]).
//!
//! This kernel has no `gact` (no `action drop`) and no `police`; a filter "drops" by
//! redirecting to a sink (a veth in the same namespace whose peer is down, where
//! anything sent is discarded) and "counts" by mirroring a copy there.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};

use crate::layout::run;
use crate::netns::Netns;

mod sys;
mod tcx;

pub use tcx::{
    pin_array_map, prog_name, tcx_prog_ids, tcx_programs, tcx_supported, Position, TcxCounter,
    COUNTER_NAME, ICMP, ICMPV6, OTHER, TCP, UDP,
};

static SINKS: AtomicU32 = AtomicU32::new(0);
/// (namespace, device) whose `clsact` qdisc a [`U32Filter`] added: the last filter
/// removed from it takes the qdisc away too, if nothing else is left under it.
static OUR_QDISCS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// A traffic-control hook of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn tc(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

/// What a [`U32Filter`] matches: one IP family, an IP protocol (IPv6: the first next
/// header) and optionally the TCP/UDP destination port. Assumes no IPv4 options and no
/// IPv6 extension headers (as `u32`'s `ip dport` / `ip6 dport` do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct U32Match {
    pub v6: bool,
    pub proto: u8,
    pub dport: Option<u16>,
}

impl U32Match {
    pub fn tcp_dport(v6: bool, port: u16) -> U32Match {
        U32Match {
            v6,
            proto: TCP,
            dport: Some(port),
        }
    }

    pub fn udp_dport(v6: bool, port: u16) -> U32Match {
        U32Match {
            v6,
            proto: UDP,
            dport: Some(port),
        }
    }

    /// Every packet of IP protocol `proto`.
    pub fn proto(v6: bool, proto: u8) -> U32Match {
        U32Match {
            v6,
            proto,
            dport: None,
        }
    }
}

/// What a [`U32Filter`] does with a matching packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterAction {
    /// Discards it (`mirred egress redirect` to the sink).
    Drop,
    /// Counts it and lets it continue (`mirred egress mirror` of a copy to the sink).
    Count,
}

/// A legacy tc `u32` filter the fake CNI owns, at one priority of one hook of an
/// interface. Removed on drop: the filter, its sink, and the `clsact` qdisc if a
/// `U32Filter` added it and no filter at all (ours or anyone's) is left under it.
pub struct U32Filter {
    ns: Arc<Netns>,
    dev: String,
    hook: Hook,
    prio: u16,
    sink: String,
    added_qdisc: bool,
    removed: bool,
}

impl U32Filter {
    /// Adds a `clsact` qdisc to `dev` (inside `ns`) if it has none, then a `u32` filter
    /// at `hook`, priority `prio` (which must be free: the filter owns the priority),
    /// matching `m`, doing `action`.
    pub fn install(
        ns: &Arc<Netns>,
        dev: &str,
        hook: Hook,
        prio: u16,
        m: U32Match,
        action: FilterAction,
    ) -> anyhow::Result<U32Filter> {
        if tc_filters(ns, dev, hook)?
            .iter()
            .any(|f| f.prio == u32::from(prio))
        {
            bail!("{dev} {} already has filters at priority {prio}", hook.tc());
        }
        let added_qdisc = if has_clsact(ns, dev)? {
            false
        } else {
            run(ns, "tc", &["qdisc", "add", "dev", dev, "clsact"])?;
            OUR_QDISCS
                .lock()
                .unwrap()
                .push((ns.name().to_string(), dev.to_string()));
            true
        };
        let n = SINKS.fetch_add(1, Ordering::SeqCst);
        let sink = format!("ztsink{n}");
        let filter = U32Filter {
            ns: ns.clone(),
            dev: dev.to_string(),
            hook,
            prio,
            sink: sink.clone(),
            added_qdisc,
            removed: false,
        };
        // From here on, drop undoes whatever was done.
        let peer = format!("ztsinkp{n}");
        ns.ip(&["link", "add", &sink, "type", "veth", "peer", "name", &peer])?;
        ns.ip(&["link", "set", &sink, "up"])?;
        let (protocol, sel) = if m.v6 { ("ipv6", "ip6") } else { ("ip", "ip") };
        let prio_s = prio.to_string();
        let proto_s = m.proto.to_string();
        let mut args = vec![
            "filter",
            "add",
            "dev",
            dev,
            hook.tc(),
            "prio",
            &prio_s,
            "protocol",
            protocol,
            "u32",
            "match",
            sel,
            "protocol",
            &proto_s,
            "0xff",
        ];
        let port_s = m.dport.map(|p| p.to_string());
        if let Some(p) = &port_s {
            args.extend(["match", sel, "dport", p, "0xffff"]);
        }
        let how = match action {
            FilterAction::Drop => "redirect",
            FilterAction::Count => "mirror",
        };
        args.extend(["action", "mirred", "egress", how, "dev", &sink]);
        run(ns, "tc", &args)?;
        Ok(filter)
    }

    /// Packets that matched so far (the `mirred` action's packet counter).
    pub fn hits(&self) -> anyhow::Result<u64> {
        let out = run(
            &self.ns,
            "tc",
            &[
                "-s",
                "-j",
                "filter",
                "show",
                "dev",
                &self.dev,
                self.hook.tc(),
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out).context("tc -j output")?;
        let mut hits = 0;
        for f in v.as_array().into_iter().flatten() {
            if f["pref"].as_u64() != Some(u64::from(self.prio)) {
                continue;
            }
            for a in f["options"]["actions"].as_array().into_iter().flatten() {
                if a["to_dev"].as_str() == Some(self.sink.as_str()) {
                    hits += a["stats"]["packets"].as_u64().unwrap_or(0);
                }
            }
        }
        Ok(hits)
    }

    pub fn prio(&self) -> u16 {
        self.prio
    }

    /// Whether installing this filter added the `clsact` qdisc (else it was there).
    pub fn added_qdisc(&self) -> bool {
        self.added_qdisc
    }

    /// The sink device (`ztsink<n>`) the filter redirects or mirrors to.
    pub fn sink(&self) -> &str {
        &self.sink
    }

    /// Removes the filter, its sink, and the qdisc if a `U32Filter` added it and it is
    /// now empty; reports what failed (dropping does the same, silently).
    pub fn remove(mut self) -> anyhow::Result<()> {
        self.cleanup()
    }

    fn cleanup(&mut self) -> anyhow::Result<()> {
        if std::mem::replace(&mut self.removed, true) {
            return Ok(());
        }
        let (ns, dev, prio) = (&self.ns, self.dev.as_str(), self.prio.to_string());
        let mine = tc_filters(ns, dev, self.hook)?
            .iter()
            .any(|f| f.prio == u32::from(self.prio));
        let mut result = Ok(());
        if mine {
            result = run(
                ns,
                "tc",
                &["filter", "del", "dev", dev, self.hook.tc(), "prio", &prio],
            )
            .map(|_| ());
        }
        let _ = ns.ip(&["link", "del", &self.sink]);
        let key = (ns.name().to_string(), dev.to_string());
        let ours = OUR_QDISCS.lock().unwrap().contains(&key);
        if ours
            && tc_filters(ns, dev, Hook::Ingress)?.is_empty()
            && tc_filters(ns, dev, Hook::Egress)?.is_empty()
        {
            OUR_QDISCS.lock().unwrap().retain(|k| *k != key);
            if has_clsact(ns, dev)? {
                run(ns, "tc", &["qdisc", "del", "dev", dev, "clsact"])?;
            }
        }
        result
    }
}

impl Drop for U32Filter {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            // The namespace or the device may be gone already: nothing left to remove.
            if !std::thread::panicking() && self.ns.path().exists() {
                eprintln!("removing u32 filter on {}: {e:#}", self.dev);
            }
        }
    }
}

/// One legacy tc filter (a `tcf_proto`: one kind and protocol at one priority) on an
/// interface's hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcFilter {
    pub prio: u32,
    /// `ip`, `ipv6`, `all`, ….
    pub protocol: String,
    /// `u32`, `bpf`, ….
    pub kind: String,
    /// For `bpf` filters, the program's name as tc shows it (`bpf_name`); for filters
    /// with a `mirred` action, `mirred:<device>`.
    pub name: Option<String>,
}

/// The legacy tc filters at `hook` of `dev` inside `ns`, in priority order (empty when
/// the interface has no `clsact` qdisc).
pub fn tc_filters(ns: &Netns, dev: &str, hook: Hook) -> anyhow::Result<Vec<TcFilter>> {
    let out = run(ns, "tc", &["-j", "filter", "show", "dev", dev, hook.tc()])?;
    if out.trim().is_empty() {
        return Ok(vec![]);
    }
    let v: serde_json::Value = serde_json::from_str(&out).context("tc -j output")?;
    let mut filters: Vec<TcFilter> = vec![];
    for f in v.as_array().into_iter().flatten() {
        let prio = f["pref"].as_u64().unwrap_or(0) as u32;
        let protocol = f["protocol"].as_str().unwrap_or("").to_string();
        let kind = f["kind"].as_str().unwrap_or("").to_string();
        let opts = &f["options"];
        let name = opts["bpf_name"].as_str().map(str::to_string).or_else(|| {
            opts["actions"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|a| a["to_dev"].as_str().map(|d| format!("mirred:{d}")))
        });
        match filters
            .iter_mut()
            .find(|x| x.prio == prio && x.protocol == protocol && x.kind == kind)
        {
            Some(x) => {
                if x.name.is_none() {
                    x.name = name;
                }
            }
            None => filters.push(TcFilter {
                prio,
                protocol,
                kind,
                name,
            }),
        }
    }
    Ok(filters)
}

/// Whether `dev` inside `ns` has a `clsact` qdisc.
pub fn has_clsact(ns: &Netns, dev: &str) -> anyhow::Result<bool> {
    let out = run(ns, "tc", &["-j", "qdisc", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("tc -j output")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .any(|q| q["kind"].as_str() == Some("clsact")))
}

/// The index of interface `ifname` inside `ns`.
pub fn ifindex(ns: &Netns, ifname: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(ifname)?;
    let ifname = ifname.to_string();
    ns.run(move || {
        // SAFETY: if_nametoindex reads a valid C string.
        let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if idx == 0 {
            bail!("no interface {ifname}: {}", std::io::Error::last_os_error());
        }
        Ok(idx)
    })
}
