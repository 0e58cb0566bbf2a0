//! The fake CNI's TCX program: counts packets by IP protocol and passes them on
//! (`TCX_NEXT`), loaded and attached with raw `bpf(2)` calls and hand-assembled
//! instructions (`cni/sys.rs`), plus queries of what runs at an interface's TCX hook and
//! in which order.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use anyhow::{bail, Context};

use super::sys::*;
use super::{ifindex, Hook};
use crate::netns::Netns;

/// IP protocol numbers, the counter's slots.
pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMPV6: u8 = 58;
/// The slot of packets that are neither IPv4 nor IPv6 (ARP, …) or too short to read.
pub const OTHER: u8 = 255;
/// The counter program's name (as `bpf_prog_info.name` shows it).
pub const COUNTER_NAME: &str = "cni_counter";

/// Where a program goes in an interface's TCX chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// First (`BPF_F_BEFORE`, no relative): runs before everything attached so far.
    Head,
    /// Last (no flags: append): runs after everything attached so far.
    Tail,
    /// Right before the program with this id (`BPF_F_BEFORE | BPF_F_ID`).
    Before(u32),
    /// Right after the program with this id (`BPF_F_AFTER | BPF_F_ID`).
    After(u32),
}

fn attach_type(hook: Hook) -> u32 {
    match hook {
        Hook::Ingress => BPF_TCX_INGRESS,
        Hook::Egress => BPF_TCX_EGRESS,
    }
}

/// Pins a new array map (`key_size` 4) with values of `value_size` bytes at `path`: what an
/// older build may have left where ztunnel pins its maps.
pub fn pin_array_map(
    path: &std::path::Path,
    value_size: u32,
    max_entries: u32,
) -> anyhow::Result<()> {
    let mut a = attr();
    a.map_create = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size,
        max_entries,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name: name16("stale"),
    };
    let map = bpf(BPF_MAP_CREATE, &mut a)
        .map(fd)
        .context("creating the map")?;
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut a = attr();
    a.obj_pin = ObjPin {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: map.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut a).with_context(|| format!("pinning {}", path.display()))?;
    Ok(())
}

/// Whether this kernel has TCX links (6.6 and later): before, a CNI's programs are tc
/// filters only, and the fake CNI's TCX counters have nothing to attach to.
pub fn tcx_supported() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut v = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}

/// A TCX program of the fake CNI on one interface: counts every packet by IP protocol
/// (IPv4 protocol, IPv6 first next header; [`OTHER`] for the rest) in a 256-slot array
/// and returns `TCX_NEXT`, so the chain (and legacy tc filters) carry on. Dropping it
/// closes the link (detaching the program) and the map.
pub struct TcxCounter {
    // Fields drop in order: the link (detach) first.
    link: OwnedFd,
    prog: OwnedFd,
    map: OwnedFd,
    prog_id: u32,
    ifindex: u32,
    hook: Hook,
}

impl TcxCounter {
    /// Loads a new counter and attaches it at `hook` of `ifname` inside `ns`, at `pos`.
    pub fn attach(ns: &Netns, ifname: &str, hook: Hook, pos: Position) -> anyhow::Result<Self> {
        let map = create_map()?;
        let prog = load_counter(map.as_raw_fd())?;
        let prog_id = prog_info(prog.as_raw_fd())?.0;
        let ifindex = ifindex(ns, ifname)?;
        let (flags, relative) = match pos {
            Position::Head => (BPF_F_BEFORE, 0),
            Position::Tail => (0, 0),
            Position::Before(id) => (BPF_F_BEFORE | BPF_F_ID, id),
            Position::After(id) => (BPF_F_AFTER | BPF_F_ID, id),
        };
        let prog_fd = prog.as_raw_fd() as u32;
        // The target ifindex is resolved in the caller's network namespace.
        let link = ns
            .run(move || {
                let mut a = attr();
                a.link_create = LinkCreate {
                    prog_fd,
                    target_ifindex: ifindex,
                    attach_type: attach_type(hook),
                    flags,
                    relative,
                    _pad: 0,
                    expected_revision: 0,
                };
                bpf(BPF_LINK_CREATE, &mut a).map(fd)
            })
            .with_context(|| format!("attaching the counter at tcx {hook:?} of {ifname}"))?;
        Ok(TcxCounter {
            link,
            prog,
            map,
            prog_id,
            ifindex,
            hook,
        })
    }

    /// Packets of IP protocol `proto` seen so far (or of slot [`OTHER`]).
    pub fn count(&self, proto: u8) -> u64 {
        let key = u32::from(proto);
        let mut value = 0u64;
        let mut a = attr();
        a.elem = MapElem {
            map_fd: self.map.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &mut value as *mut u64 as u64,
            flags: 0,
        };
        bpf(BPF_MAP_LOOKUP_ELEM, &mut a).expect("reading the counter map");
        value
    }

    /// The program's id (as [`tcx_prog_ids`] lists it).
    pub fn prog_id(&self) -> u32 {
        self.prog_id
    }

    /// The index of the interface it is attached to (in its namespace).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn hook(&self) -> Hook {
        self.hook
    }

    /// Detaches and unloads (the same as dropping it).
    pub fn detach(self) {}
}

impl std::fmt::Debug for TcxCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcxCounter")
            .field("prog_id", &self.prog_id)
            .field("ifindex", &self.ifindex)
            .field("hook", &self.hook)
            .field("link_fd", &self.link.as_raw_fd())
            .field("prog_fd", &self.prog.as_raw_fd())
            .finish()
    }
}

fn create_map() -> anyhow::Result<OwnedFd> {
    let mut a = attr();
    a.map_create = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 8,
        max_entries: 256,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name: name16("cni_counts"),
    };
    bpf(BPF_MAP_CREATE, &mut a)
        .map(fd)
        .context("creating the counter map")
}

/// The counter. `bpf_skb_load_bytes` rather than `LD_ABS`: a short packet then lands in
/// [`OTHER`] instead of ending the program with verdict 0 (which would end the chain).
fn counter_insns(map_fd: RawFd) -> Vec<Insn> {
    vec![
        i(MOV64_REG, 6, 1, 0, 0),                     // 0: r6 = skb
        i(MOV64_IMM, 7, 0, 0, OTHER as i32),          // 1: r7 = slot OTHER
        i(LDX_W, 2, 6, 16, 0),                        // 2: r2 = skb->protocol (network order)
        i(TO_BE, 2, 0, 0, 16),                        // 3: r2 = ntohs(r2)
        i(MOV64_IMM, 3, 0, 0, 14 + 9),                // 4: r3 = IPv4 protocol offset
        i(JEQ_IMM, 2, 0, 3, 0x0800),                  // 5: IPv4 -> 9
        i(MOV64_IMM, 3, 0, 0, 14 + 6),                // 6: r3 = IPv6 next header offset
        i(JEQ_IMM, 2, 0, 1, 0x86dd),                  // 7: IPv6 -> 9
        i(JA, 0, 0, 9, 0),                            // 8: other -> 18
        i(ST_DW, 10, 0, -8, 0),                       // 9: *(u64 *)(fp - 8) = 0
        i(MOV64_REG, 1, 6, 0, 0),                     // 10: r1 = skb
        i(MOV64_REG, 2, 3, 0, 0),                     // 11: r2 = offset
        i(MOV64_REG, 3, 10, 0, 0),                    // 12: r3 = fp
        i(ADD64_IMM, 3, 0, 0, -8),                    // 13: r3 = fp - 8
        i(MOV64_IMM, 4, 0, 0, 1),                     // 14: r4 = 1 byte
        i(CALL, 0, 0, 0, FN_SKB_LOAD_BYTES),          // 15
        i(JSLT_IMM, 0, 0, 1, 0),                      // 16: failed -> 18
        i(LDX_B, 7, 10, -8, 0),                       // 17: r7 = the protocol byte
        i(STX_W, 10, 7, -4, 0),                       // 18: *(u32 *)(fp - 4) = r7 (the key)
        i(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, map_fd), // 19: r1 = map
        i(0, 0, 0, 0, 0),                             // 20: (second half of the 64-bit load)
        i(MOV64_REG, 2, 10, 0, 0),                    // 21: r2 = fp
        i(ADD64_IMM, 2, 0, 0, -4),                    // 22: r2 = &key
        i(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM),         // 23: r0 = &slot or NULL
        i(JEQ_IMM, 0, 0, 2, 0),                       // 24: NULL -> 27
        i(MOV64_IMM, 1, 0, 0, 1),                     // 25: r1 = 1
        i(ATOMIC_DW, 0, 1, 0, 0),                     // 26: lock *(u64 *)r0 += r1 (imm BPF_ADD)
        i(MOV64_IMM, 0, 0, 0, -1),                    // 27: r0 = TCX_NEXT
        i(EXIT, 0, 0, 0, 0),                          // 28
    ]
}

fn load_counter(map_fd: RawFd) -> anyhow::Result<OwnedFd> {
    let insns = counter_insns(map_fd);
    let license = b"GPL\0";
    let load = |log: &mut [u8]| {
        let mut a = attr();
        a.prog_load = ProgLoad {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: log.len() as u32,
            log_buf: if log.is_empty() {
                0
            } else {
                log.as_mut_ptr() as u64
            },
            kern_version: 0,
            prog_flags: 0,
            prog_name: name16(COUNTER_NAME),
            prog_ifindex: 0,
            expected_attach_type: 0,
        };
        bpf(BPF_PROG_LOAD, &mut a).map(fd)
    };
    load(&mut []).or_else(|e| {
        let mut log = vec![0u8; 1 << 16];
        let again = load(&mut log);
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        again.with_context(|| {
            format!(
                "loading the counter: {e}; verifier: {}",
                String::from_utf8_lossy(&log[..end])
            )
        })
    })
}

/// (id, name) of the program behind `prog_fd`, from `bpf_prog_info`.
fn prog_info(prog_fd: RawFd) -> anyhow::Result<(u32, String)> {
    // struct bpf_prog_info: id at 4, name[16] at 64; 232 bytes on 6.18.
    let mut info = [0u64; 29];
    let mut a = attr();
    a.info = InfoByFd {
        bpf_fd: prog_fd as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).context("BPF_OBJ_GET_INFO_BY_FD")?;
    // SAFETY: reading the plain bytes of an initialised u64 array.
    let bytes: &[u8] = unsafe {
        std::slice::from_raw_parts(info.as_ptr() as *const u8, std::mem::size_of_val(&info))
    };
    let id = u32::from_ne_bytes(bytes[4..8].try_into().unwrap());
    let name = &bytes[64..80];
    let end = name.iter().position(|b| *b == 0).unwrap_or(16);
    Ok((id, String::from_utf8_lossy(&name[..end]).into_owned()))
}

/// The name (`bpf_prog_info.name`, at most 15 bytes) of the loaded program `id`.
pub fn prog_name(id: u32) -> anyhow::Result<String> {
    let mut a = attr();
    a.get_fd = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    let prog = bpf(BPF_PROG_GET_FD_BY_ID, &mut a)
        .map(fd)
        .with_context(|| format!("no program with id {id}"))?;
    Ok(prog_info(prog.as_raw_fd())?.1)
}

/// The ids of the programs attached at TCX `hook` of `ifname` inside `ns`, in the order
/// they run (empty when there are none).
pub fn tcx_prog_ids(ns: &Netns, ifname: &str, hook: Hook) -> anyhow::Result<Vec<u32>> {
    let ifindex = ifindex(ns, ifname)?;
    ns.run(move || {
        let mut cap = 64usize;
        loop {
            let mut ids = vec![0u32; cap];
            let mut a = attr();
            a.query = Query {
                target_ifindex: ifindex,
                attach_type: attach_type(hook),
                query_flags: 0,
                attach_flags: 0,
                prog_ids: ids.as_mut_ptr() as u64,
                count: cap as u32,
                _pad: 0,
                prog_attach_flags: 0,
                link_ids: 0,
                link_attach_flags: 0,
                revision: 0,
            };
            match bpf(BPF_PROG_QUERY, &mut a) {
                Ok(_) => {
                    // SAFETY: the kernel filled in the query's output fields.
                    let n = unsafe { a.query.count } as usize;
                    ids.truncate(n);
                    return Ok(ids);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => cap *= 4,
                Err(e) => bail!("BPF_PROG_QUERY tcx {hook:?} of ifindex {ifindex}: {e}"),
            }
        }
    })
}

/// (id, name) of the programs at TCX `hook` of `ifname` inside `ns`, in chain order.
pub fn tcx_programs(ns: &Netns, ifname: &str, hook: Hook) -> anyhow::Result<Vec<(u32, String)>> {
    tcx_prog_ids(ns, ifname, hook)?
        .into_iter()
        .map(|id| Ok((id, prog_name(id)?)))
        .collect()
}
