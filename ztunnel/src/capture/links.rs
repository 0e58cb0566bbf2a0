//! Attachments of a TC program to interfaces: TCX links pinned in bpffs, or legacy tc
//! filters (kernels before 6.6, or `--tc-attach legacy`). Two sets of them ([`Hook`]): the
//! capture program at the ingress of pods' interfaces and the node's links, the last-hop
//! program at the egress of enrolled pods' interfaces.
//!
//! Either way the attachment outlives ztunnel: a TCX link through its pin, a filter
//! because it belongs to the interface. That is what makes capture fail closed: when
//! ztunnel is killed, the program stays attached and keeps dropping enrolled pods' new
//! connections instead of letting them out in plaintext. A restarting ztunnel adopts each
//! attachment and atomically swaps in its freshly loaded program (`bpf_link_update`, or a
//! filter change in place), so there is never a moment without one.
//!
//! Position: under TCX the program goes to the head of the chain and moves back there on
//! adoption if something was put in front of it; its neutral verdict lets everything it
//! does not take continue to the CNI's programs. A legacy filter runs at its priority
//! (`--tc-priority`): filters of lower priority numbers run first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType};
use tracing::{info, warn};
use ztunnel_ebpf_common::{CAPTURE_PROGRAM, LAST_HOP_PROGRAM};

use super::legacy_tc::{self, FILTER_HANDLE};

/// How the program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    /// TCX links (kernel ≥ 6.6), at the head of the chain.
    Tcx,
    /// A clsact qdisc and a direct-action cls_bpf filter at this priority.
    Legacy { priority: u16 },
}

/// Which program, on which side of the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// The capture program, at ingress.
    Capture,
    /// The last-hop program, at egress.
    LastHop,
}

impl Hook {
    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Capture => TcAttachType::Ingress,
            Hook::LastHop => TcAttachType::Egress,
        }
    }

    pub fn program(self) -> &'static str {
        match self {
            Hook::Capture => CAPTURE_PROGRAM,
            Hook::LastHop => LAST_HOP_PROGRAM,
        }
    }

    /// The pin directory's subdirectories: TCX links, markers of qdiscs ztunnel added.
    fn dirs(self) -> (&'static str, &'static str) {
        match self {
            Hook::Capture => ("links", "qdiscs"),
            Hook::LastHop => ("egress-links", "egress-qdiscs"),
        }
    }

    fn egress(self) -> bool {
        self == Hook::LastHop
    }
}

enum Attachment {
    Tcx {
        _link: FdLink,
    },
    /// The filter is the interface's; nothing to hold.
    Legacy,
}

struct Attached {
    _attachment: Attachment,
    ifindex: u32,
}

/// The interfaces one program is attached to.
pub struct Links {
    hook: Hook,
    mode: AttachMode,
    /// TCX pins, one per interface name.
    pins: PathBuf,
    /// Legacy mode: a directory per interface whose clsact qdisc ztunnel added (bpffs
    /// holds only directories and BPF objects), so that a later ztunnel knows it may
    /// remove it.
    qdiscs: PathBuf,
    netlink: rtnetlink::Handle,
    attached: HashMap<String, Attached>,
    /// Loads another instance of the capture object (sharing the pinned maps).
    spare: Spare,
}

/// Loads another instance of the object.
pub type Spare = Box<dyn Fn() -> anyhow::Result<aya::Ebpf> + Send + Sync>;

/// How an interface came to be captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachOutcome {
    AlreadyAttached,
    Attached,
    /// An attachment left by an earlier ztunnel now runs this process's program.
    Adopted,
}

impl Links {
    pub fn new(
        dir: &Path,
        hook: Hook,
        mode: AttachMode,
        netlink: rtnetlink::Handle,
        spare: Spare,
    ) -> anyhow::Result<Self> {
        let (pins, qdiscs) = hook.dirs();
        let (pins, qdiscs) = (dir.join(pins), dir.join(qdiscs));
        for d in [&pins, &qdiscs] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(Links {
            hook,
            mode,
            pins,
            qdiscs,
            netlink,
            attached: HashMap::new(),
            spare,
        })
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    pub async fn attach(
        &mut self,
        prog: &mut SchedClassifier,
        ifname: &str,
        ifindex: u32,
    ) -> anyhow::Result<AttachOutcome> {
        if let Some(a) = self.attached.get(ifname) {
            if a.ifindex == ifindex {
                return Ok(AttachOutcome::AlreadyAttached);
            }
            // Same name, new interface (a pod was replaced): the old one is gone, and its
            // attachment with it.
            self.attached.remove(ifname);
        }
        let (attachment, outcome) = match self.mode {
            AttachMode::Tcx => {
                let (link, outcome) = self.attach_tcx(prog, ifname)?;
                // Switched from legacy mode: the old filter goes once the link runs.
                self.remove_filter(ifname, ifindex, None).await;
                (Attachment::Tcx { _link: link }, outcome)
            }
            AttachMode::Legacy { priority } => {
                let outcome = self.attach_legacy(prog, ifname, ifindex, priority).await?;
                // Switched from TCX: the old link goes once the filter runs.
                let _ = std::fs::remove_file(self.pins.join(pin_name(ifname)));
                (Attachment::Legacy, outcome)
            }
        };
        self.attached.insert(
            ifname.to_string(),
            Attached {
                _attachment: attachment,
                ifindex,
            },
        );
        Ok(outcome)
    }

    fn attach_tcx(
        &mut self,
        prog: &mut SchedClassifier,
        ifname: &str,
    ) -> anyhow::Result<(FdLink, AttachOutcome)> {
        let pin = self.pins.join(pin_name(ifname));
        if pin.exists() {
            match adopt(prog, &pin) {
                Ok(link) => {
                    if is_first(prog, ifname, self.hook) {
                        info!(
                            interface = ifname,
                            program = self.hook.program(),
                            "adopted pinned link"
                        );
                        return Ok((link, AttachOutcome::Adopted));
                    }
                    warn!(
                        interface = ifname,
                        program = self.hook.program(),
                        "another program runs before ours; moving it to the head"
                    );
                    let pinned = self.move_to_head(prog, ifname, link, &pin)?;
                    return Ok((pinned, AttachOutcome::Adopted));
                }
                Err(e) => {
                    warn!(
                        interface = ifname,
                        program = self.hook.program(),
                        "pinned link unusable, replacing it: {e:#}"
                    );
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let link = attach_first(prog, ifname, self.hook)?;
        Ok((pin_link(link, &pin)?, AttachOutcome::Attached))
    }

    /// Something was attached ahead of ours since it was pinned. A chain holds a program
    /// once, and removing ours first would let packets through unseen, so a second
    /// instance of the program (same pinned maps) holds the head meanwhile:
    /// spare at head, old link gone, ours at head, spare gone. At every moment one of the
    /// two runs before anything else.
    fn move_to_head(
        &mut self,
        prog: &mut SchedClassifier,
        ifname: &str,
        old: FdLink,
        pin: &Path,
    ) -> anyhow::Result<FdLink> {
        let mut spare = (self.spare)().context("loading a second instance of the program")?;
        let spare_prog: &mut SchedClassifier = spare
            .program_mut(self.hook.program())
            .context("program missing from the object")?
            .try_into()?;
        spare_prog.load()?;
        let holder = attach_first(spare_prog, ifname, self.hook)?;
        let _ = std::fs::remove_file(pin);
        drop(old);
        let ours = attach_first(prog, ifname, self.hook)?;
        let pinned = pin_link(ours, pin)?;
        drop(holder);
        Ok(pinned)
    }

    async fn attach_legacy(
        &mut self,
        prog: &mut SchedClassifier,
        ifname: &str,
        ifindex: u32,
        priority: u16,
    ) -> anyhow::Result<AttachOutcome> {
        match aya::programs::tc::qdisc_add_clsact(ifname) {
            Ok(()) => {
                let marker = self.qdiscs.join(pin_name(ifname));
                std::fs::create_dir_all(&marker)
                    .with_context(|| format!("creating {}", marker.display()))?;
            }
            Err(aya::programs::tc::TcError::NetlinkError(e))
                if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).context(format!("adding a clsact qdisc to {ifname}")),
        }
        let existing = legacy_tc::filters(&self.netlink, ifindex, self.hook.egress()).await?;
        let ours = existing
            .iter()
            .find(|f| f.priority == priority && f.handle == FILTER_HANDLE);
        let outcome = match ours {
            Some(f) if f.is_ours(priority, self.hook.program()) => {
                let link = SchedClassifierLink::attached(
                    ifname,
                    self.hook.attach_type(),
                    priority,
                    TcHandle::from(FILTER_HANDLE),
                    None,
                )?;
                let id = prog
                    .attach_to_link(link)
                    .with_context(|| format!("replacing the program of the filter on {ifname}"))?;
                keep_filter(prog, id)?;
                info!(
                    interface = ifname,
                    priority,
                    program = self.hook.program(),
                    "adopted filter"
                );
                AttachOutcome::Adopted
            }
            Some(f) => bail!(
                "tc priority {priority} handle {FILTER_HANDLE:#x} on {ifname} holds another \
                 filter ({} {:?}): choose another --tc-priority",
                f.kind,
                f.name
            ),
            None => {
                if let Some(f) = existing
                    .iter()
                    .find(|f| f.priority == priority && f.kind != "bpf")
                {
                    bail!(
                        "tc priority {priority} on {ifname} holds a {} filter, and filters of \
                         one priority must be of one kind: choose another --tc-priority",
                        f.kind
                    );
                }
                let id = prog
                    .attach_with_options(
                        ifname,
                        self.hook.attach_type(),
                        TcAttachOptions::Netlink(NlOptions {
                            priority,
                            handle: TcHandle::from(FILTER_HANDLE),
                            classid: None,
                        }),
                    )
                    .with_context(|| {
                        format!("attaching the {} filter to {ifname}", self.hook.program())
                    })?;
                keep_filter(prog, id)?;
                AttachOutcome::Attached
            }
        };
        for f in existing.iter().filter(|f| f.priority < priority) {
            warn!(
                interface = ifname,
                "tc filter {} {:?} at priority {} runs before {}: packets it ends the chain \
                 for never reach it",
                f.kind,
                f.name,
                f.priority,
                self.hook.program()
            );
        }
        Ok(outcome)
    }

    /// Removes our legacy filter from `ifname` (and the clsact qdisc if we added it and
    /// nothing else filters there). `priority` `None`: whichever priority it was left at.
    async fn remove_filter(&self, ifname: &str, ifindex: u32, priority: Option<u16>) {
        let Ok(filters) = legacy_tc::filters(&self.netlink, ifindex, self.hook.egress()).await
        else {
            return;
        };
        for f in filters
            .iter()
            .filter(|f| f.is_ours(priority.unwrap_or(f.priority), self.hook.program()))
        {
            // A link value for an existing filter detaches it when dropped.
            match SchedClassifierLink::attached(
                ifname,
                self.hook.attach_type(),
                f.priority,
                TcHandle::from(f.handle),
                None,
            ) {
                Ok(link) => drop(link),
                Err(e) => warn!(
                    interface = ifname,
                    program = self.hook.program(),
                    "removing the filter: {e}"
                ),
            }
        }
        let marker = self.qdiscs.join(pin_name(ifname));
        if marker.exists() {
            match legacy_tc::remove_qdisc_if_unused(&self.netlink, ifindex).await {
                Ok(true) | Err(_) => {
                    let _ = std::fs::remove_dir(&marker);
                }
                Ok(false) => {
                    info!(
                        interface = ifname,
                        "clsact qdisc kept: other filters use it"
                    )
                }
            }
        }
    }

    /// Detaches from `ifname`.
    pub async fn detach(&mut self, ifname: &str) {
        let Some(a) = self.attached.remove(ifname) else {
            return;
        };
        match a._attachment {
            // Removing the pin drops the last reference but ours, which goes here.
            Attachment::Tcx { _link } => {
                let _ = std::fs::remove_file(self.pins.join(pin_name(ifname)));
            }
            Attachment::Legacy => {
                let priority = match self.mode {
                    AttachMode::Legacy { priority } => Some(priority),
                    AttachMode::Tcx => None,
                };
                self.remove_filter(ifname, a.ifindex, priority).await;
            }
        }
    }

    pub async fn detach_all(&mut self) {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for n in names {
            self.detach(&n).await;
        }
    }

    /// Forgets an interface that is gone (its attachment went with it).
    pub fn forget(&mut self, ifname: &str) {
        self.attached.remove(ifname);
        let _ = std::fs::remove_file(self.pins.join(pin_name(ifname)));
        let _ = std::fs::remove_dir(self.qdiscs.join(pin_name(ifname)));
    }

    /// Lets go of the attachments without detaching them: they keep capture in place
    /// (fail closed) for the next ztunnel to adopt.
    pub fn retain_all(&mut self) {
        self.attached.clear();
    }

    pub fn interfaces(&self) -> Vec<(String, u32)> {
        let mut v: Vec<_> = self
            .attached
            .iter()
            .map(|(n, a)| (n.clone(), a.ifindex))
            .collect();
        v.sort();
        v
    }

    /// Pins and qdisc markers left from an earlier run whose interface no longer exists.
    pub fn remove_stale(&self, existing: &[(String, u32)]) {
        for dir in [&self.pins, &self.qdiscs] {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in rd.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().to_string();
                if !existing.iter().any(|(n, _)| pin_name(n) == name) {
                    tracing::debug!(pin = %e.path().display(), "removing state of a vanished interface");
                    let _ = std::fs::remove_file(e.path());
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }
}

/// The name of an interface's entry in bpffs, which refuses names with a dot (VXLAN
/// devices are called `flannel.1`, VLANs `eth0.100`): `.` becomes `%2e`, `%` becomes `%25`.
fn pin_name(ifname: &str) -> String {
    ifname.replace('%', "%25").replace('.', "%2e")
}

fn attach_first(prog: &mut SchedClassifier, ifname: &str, hook: Hook) -> anyhow::Result<FdLink> {
    let id = prog
        .attach_with_options(
            ifname,
            hook.attach_type(),
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .with_context(|| format!("attaching {} to {ifname}", hook.program()))?;
    let link = prog.take_link(id)?;
    FdLink::try_from(link).context("the link is not a TCX link")
}

fn pin_link(link: FdLink, pin: &Path) -> anyhow::Result<FdLink> {
    let pinned = link
        .pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(pinned.into())
}

fn adopt(prog: &mut SchedClassifier, pin: &Path) -> anyhow::Result<FdLink> {
    let pinned = PinnedLink::from_pin(pin)?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned))?;
    let id = prog
        .attach_to_link(link)
        .context("replacing the program of a pinned link")?;
    let link = prog.take_link(id)?;
    Ok(FdLink::try_from(link)?)
}

/// Whether this process's program is the first of the interface's TCX chain of `hook`.
fn is_first(prog: &SchedClassifier, ifname: &str, hook: Hook) -> bool {
    let Ok(ours) = prog.info().map(|i| i.id()) else {
        return true;
    };
    match SchedClassifier::query_tcx(ifname, hook.attach_type()) {
        Ok((_, progs)) => progs.first().is_none_or(|p| p.id() == ours),
        Err(_) => true,
    }
}

/// Takes a legacy filter's link out of the program so that dropping the program (or
/// ztunnel exiting) never removes the filter: it is removed only by [`Links::detach`].
fn keep_filter(
    prog: &mut SchedClassifier,
    id: aya::programs::tc::SchedClassifierLinkId,
) -> anyhow::Result<()> {
    let link = prog.take_link(id)?;
    std::mem::forget(link);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pin_names_have_no_dots_and_stay_distinct() {
        assert_eq!(super::pin_name("flannel.1"), "flannel%2e1");
        assert_eq!(super::pin_name("eth0"), "eth0");
        assert_ne!(super::pin_name("a%2e1"), super::pin_name("a.1"));
    }
}
