//! TC attachments of the capture program, pinned in bpffs.
//!
//! A TCX link lives as long as a file descriptor or a pin refers to it. Pinning is what
//! makes capture fail closed: when ztunnel is killed, the program stays attached and
//! keeps dropping enrolled pods' new connections instead of letting them out in
//! plaintext. A restarting ztunnel adopts each pinned link and atomically swaps in its
//! freshly loaded program (`bpf_link_update`), so there is never a moment without one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use tracing::{info, warn};

struct Attached {
    link: FdLink,
    pin: PathBuf,
    ifindex: u32,
}

/// The interfaces the capture program is attached to (ingress).
pub struct Links {
    dir: PathBuf,
    attached: HashMap<String, Attached>,
}

/// How an interface came to be captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachOutcome {
    AlreadyAttached,
    Attached,
    /// A pinned link left by an earlier ztunnel now runs this process's program.
    Adopted,
}

impl Links {
    pub fn new(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Links {
            dir,
            attached: HashMap::new(),
        })
    }

    pub fn attach(
        &mut self,
        prog: &mut SchedClassifier,
        ifname: &str,
        ifindex: u32,
    ) -> anyhow::Result<AttachOutcome> {
        if let Some(a) = self.attached.get(ifname) {
            if a.ifindex == ifindex {
                return Ok(AttachOutcome::AlreadyAttached);
            }
            // Same name, new interface (a pod was replaced): the old link is defunct.
            self.detach(ifname);
        }
        let pin = self.dir.join(ifname);
        if pin.exists() {
            match adopt(prog, &pin) {
                Ok(link) => {
                    info!(interface = ifname, "adopted pinned capture link");
                    self.attached
                        .insert(ifname.to_string(), Attached { link, pin, ifindex });
                    return Ok(AttachOutcome::Adopted);
                }
                Err(e) => {
                    warn!(
                        interface = ifname,
                        "pinned capture link unusable, replacing it: {e:#}"
                    );
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let id = prog
            .attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| format!("attaching the capture program to {ifname}"))?;
        let link = prog.take_link(id)?;
        let link = FdLink::try_from(link).context("capture link is not a TCX link")?;
        let pinned = link
            .pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        self.attached.insert(
            ifname.to_string(),
            Attached {
                link: pinned.into(),
                pin,
                ifindex,
            },
        );
        Ok(AttachOutcome::Attached)
    }

    /// Detaches from `ifname` (removing its pin drops the last reference).
    pub fn detach(&mut self, ifname: &str) {
        if let Some(a) = self.attached.remove(ifname) {
            let _ = std::fs::remove_file(&a.pin);
            drop(a.link);
        }
    }

    pub fn detach_all(&mut self) {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for n in names {
            self.detach(&n);
        }
    }

    /// Lets go of the links without detaching them: their pins keep capture in place
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

    /// Pins left from an earlier run whose interface no longer exists.
    pub fn stale_pins(&self, existing: &[(String, u32)]) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return vec![];
        };
        rd.filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                !existing.iter().any(|(n, _)| *n == name)
            })
            .map(|e| e.path())
            .collect()
    }
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
