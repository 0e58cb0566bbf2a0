//! The last hop (`ztunnel_ebpf_common::last_hop`): the egress program on enrolled pods'
//! interfaces, its verdict cache, its questions and its counters.
//!
//! The program drops a forwarded SYN into an enrolled pod until ztunnel has cached a
//! verdict for its (source, pod, port); it asks by writing an event to a ring buffer.
//! [`Questions`] reads them and [`Answers`] writes the verdicts; the proxy's side
//! (`proxy::last_hop`) decides them with the pod's policy.

#[cfg(test)]
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::SchedClassifier;
use aya::Ebpf;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use ztunnel_ebpf_common::last_hop::{
    LastHopEvent, LAST_HOP_ALLOW, LAST_HOP_ALLOWED, LAST_HOP_ASKED, LAST_HOP_DENIED, LAST_HOP_DENY,
    LAST_HOP_FROM_NODE, LAST_HOP_WAITING,
};
use ztunnel_ebpf_common::{maps, FlowKey, LAST_HOP_PROGRAM};

use super::links::{self, AttachMode, AttachOutcome, Hook, Links};

/// The last-hop program's attachments and maps.
pub struct LastHop {
    links: Links,
    answers: Answers,
    counters: PerCpuArray<MapData, u64>,
    questions: Option<Questions>,
}

/// SYNs the last-hop program judged, summed over CPUs (since its maps were created).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastHopCounters {
    /// Forwarded connections let through by a cached allow.
    pub allowed: u64,
    /// The node's own connections, let through by the host rule.
    pub from_node: u64,
    /// Dropped by a cached deny.
    pub denied: u64,
    /// Dropped while ztunnel was asked (one per question).
    pub asked: u64,
    /// Dropped while waiting for an answer already asked for (or while the queue was full).
    pub waiting: u64,
}

impl LastHop {
    /// Loads the program and takes its maps out of `ebpf`. What an earlier ztunnel cached
    /// is cleared: policies may have changed since.
    pub fn start(
        ebpf: &mut Ebpf,
        dir: &std::path::Path,
        mode: AttachMode,
        netlink: rtnetlink::Handle,
        spare: links::Spare,
    ) -> anyhow::Result<LastHop> {
        program(ebpf)?
            .load()
            .context("loading the last-hop program (verifier)")?;
        let verdicts: BpfHashMap<MapData, FlowKey, u8> = BpfHashMap::try_from(
            ebpf.take_map(maps::LAST_HOP)
                .with_context(|| format!("map {} missing", maps::LAST_HOP))?,
        )?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(maps::LAST_HOP_COUNT)
                .with_context(|| format!("map {} missing", maps::LAST_HOP_COUNT))?,
        )?;
        let ring = RingBuf::try_from(
            ebpf.take_map(maps::LAST_HOP_EVENTS)
                .with_context(|| format!("map {} missing", maps::LAST_HOP_EVENTS))?,
        )?;
        let answers = Answers(Arc::new(Mutex::new((verdicts, 0))));
        answers.clear();
        // SAFETY: the ring buffer owns its fd and keeps it open while registered.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .context("polling the last hop's ring buffer")?;
        Ok(LastHop {
            links: Links::new(dir, Hook::LastHop, mode, netlink, spare)?,
            answers,
            counters,
            questions: Some(Questions { ring }),
        })
    }

    /// Attaches the program at the egress of an enrolled pod's interface.
    pub async fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        ifname: &str,
        ifindex: u32,
    ) -> anyhow::Result<AttachOutcome> {
        self.links.attach(program(ebpf)?, ifname, ifindex).await
    }

    pub fn links(&mut self) -> &mut Links {
        &mut self.links
    }

    /// The questions, for the one task that answers them (`None` once taken).
    pub fn take_questions(&mut self) -> Option<Questions> {
        self.questions.take()
    }

    pub fn answers(&self) -> Answers {
        self.answers.clone()
    }

    pub fn counters(&self) -> LastHopCounters {
        let sum = |i: u32| {
            self.counters
                .get(&i, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        LastHopCounters {
            allowed: sum(LAST_HOP_ALLOWED),
            from_node: sum(LAST_HOP_FROM_NODE),
            denied: sum(LAST_HOP_DENIED),
            asked: sum(LAST_HOP_ASKED),
            waiting: sum(LAST_HOP_WAITING),
        }
    }
}

fn program(ebpf: &mut Ebpf) -> anyhow::Result<&mut SchedClassifier> {
    Ok(ebpf
        .program_mut(LAST_HOP_PROGRAM)
        .context("last-hop program missing from the object")?
        .try_into()?)
}

/// One question of the program: may `src` connect to `dst` (an enrolled pod)?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Question {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl Question {
    fn of(e: &LastHopEvent) -> Question {
        Question {
            src: SocketAddr::new(super::addr(pod_key(e.saddr)), u16::from_be(e.sport)),
            dst: SocketAddr::new(super::addr(pod_key(e.daddr)), u16::from_be(e.dport)),
        }
    }

    fn key(&self) -> FlowKey {
        FlowKey {
            saddr: super::key(self.src.ip()).addr,
            daddr: super::key(self.dst.ip()).addr,
            sport: 0,
            dport: self.dst.port().to_be(),
        }
    }
}

fn pod_key(addr: [u8; 16]) -> ztunnel_ebpf_common::PodKey {
    ztunnel_ebpf_common::PodKey { addr }
}

/// The program's questions, as they arrive.
pub struct Questions {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl Questions {
    /// The next batch of questions (at least one), waiting for them.
    pub async fn next(&mut self) -> std::io::Result<Vec<Question>> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let mut out = Vec::new();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<LastHopEvent>() {
                    // SAFETY: the program writes whole LastHopEvents (plain data); the
                    // length was checked and read_unaligned needs no alignment.
                    let e =
                        unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<LastHopEvent>()) };
                    out.push(Question::of(&e));
                }
            }
            guard.clear_ready();
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

/// Writes verdicts into the program's cache. Beside the map, the number of times it was
/// cleared: a verdict is written only if no clear came between the start of its judging
/// and its writing, so one decided from the old state never outlives the clear.
#[derive(Clone)]
pub struct Answers(Arc<Mutex<(Verdicts, u64)>>);

/// The program's verdict cache (`ZT_LAST_HOP`).
type Verdicts = BpfHashMap<MapData, FlowKey, u8>;

impl Answers {
    /// The clears so far; pass it to [`Answers::answer`] with a verdict judged after.
    pub fn generation(&self) -> u64 {
        self.0.lock().unwrap().1
    }

    /// Caches the verdict for `q`'s (source address, destination, port), unless the cache
    /// was cleared since `generation` (the verdict is then dropped: the client's next SYN
    /// asks again). True if it was written.
    pub fn answer(&self, q: &Question, allow: bool, generation: u64) -> anyhow::Result<bool> {
        let v = if allow { LAST_HOP_ALLOW } else { LAST_HOP_DENY };
        let mut m = self.0.lock().unwrap();
        if m.1 != generation {
            return Ok(false);
        }
        m.0.insert(q.key(), v, 0)
            .context("writing a last-hop verdict")?;
        Ok(true)
    }

    /// Forgets every verdict (the policies or the workloads changed): each key is asked
    /// again on its next SYN.
    pub fn clear(&self) {
        let mut m = self.0.lock().unwrap();
        m.1 += 1;
        let keys: Vec<FlowKey> = m.0.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = m.0.remove(&k);
        }
    }

    /// How many verdicts are cached (for the admin view; walks the map).
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().0.keys().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_addr(ip: IpAddr) -> [u8; 16] {
        crate::capture::key(ip).addr
    }

    #[test]
    fn a_question_reads_back_from_its_event() {
        let e = LastHopEvent {
            saddr: key_addr("10.1.0.3".parse().unwrap()),
            daddr: key_addr("fd00:1::2".parse().unwrap()),
            sport: 40000u16.to_be(),
            dport: 8080u16.to_be(),
        };
        let q = Question::of(&e);
        assert_eq!(q.src, "10.1.0.3:40000".parse().unwrap());
        assert_eq!(q.dst, "[fd00:1::2]:8080".parse().unwrap());
        // The cache key leaves the source port out.
        let k = q.key();
        assert_eq!((k.sport, u16::from_be(k.dport)), (0, 8080));
        assert_eq!(k.saddr, e.saddr);
    }
}
