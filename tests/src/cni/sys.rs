//! The raw `bpf(2)` interface the fake CNI's TCX counter needs: commands, the parts of
//! `union bpf_attr` it uses, and eBPF instruction encoding. Layouts follow the kernel's
//! uapi `linux/bpf.h` (offsets asserted below, as the 6.18-era header has them).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub(super) const BPF_MAP_CREATE: u32 = 0;
pub(super) const BPF_MAP_LOOKUP_ELEM: u32 = 1;
pub(super) const BPF_PROG_LOAD: u32 = 5;
pub(super) const BPF_PROG_GET_FD_BY_ID: u32 = 13;
pub(super) const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
pub(super) const BPF_PROG_QUERY: u32 = 16;
pub(super) const BPF_LINK_CREATE: u32 = 28;
pub(super) const BPF_OBJ_PIN: u32 = 6;
pub(super) const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub(super) const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub(super) const BPF_TCX_INGRESS: u32 = 46;
pub(super) const BPF_TCX_EGRESS: u32 = 47;
pub(super) const BPF_F_BEFORE: u32 = 1 << 3;
pub(super) const BPF_F_AFTER: u32 = 1 << 4;
pub(super) const BPF_F_ID: u32 = 1 << 5;

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct MapCreate {
    pub(super) map_type: u32,
    pub(super) key_size: u32,
    pub(super) value_size: u32,
    pub(super) max_entries: u32,
    pub(super) map_flags: u32,
    pub(super) inner_map_fd: u32,
    pub(super) numa_node: u32,
    pub(super) map_name: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct MapElem {
    pub(super) map_fd: u32,
    pub(super) _pad: u32,
    pub(super) key: u64,
    pub(super) value: u64,
    pub(super) flags: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct ProgLoad {
    pub(super) prog_type: u32,
    pub(super) insn_cnt: u32,
    pub(super) insns: u64,
    pub(super) license: u64,
    pub(super) log_level: u32,
    pub(super) log_size: u32,
    pub(super) log_buf: u64,
    pub(super) kern_version: u32,
    pub(super) prog_flags: u32,
    pub(super) prog_name: [u8; 16],
    pub(super) prog_ifindex: u32,
    pub(super) expected_attach_type: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct GetFdById {
    pub(super) id: u32,
    pub(super) next_id: u32,
    pub(super) open_flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct InfoByFd {
    pub(super) bpf_fd: u32,
    pub(super) info_len: u32,
    pub(super) info: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Query {
    pub(super) target_ifindex: u32,
    pub(super) attach_type: u32,
    pub(super) query_flags: u32,
    pub(super) attach_flags: u32,
    pub(super) prog_ids: u64,
    pub(super) count: u32,
    pub(super) _pad: u32,
    pub(super) prog_attach_flags: u64,
    pub(super) link_ids: u64,
    pub(super) link_attach_flags: u64,
    pub(super) revision: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct LinkCreate {
    pub(super) prog_fd: u32,
    pub(super) target_ifindex: u32,
    pub(super) attach_type: u32,
    pub(super) flags: u32,
    /// `tcx.relative_fd` / `tcx.relative_id`.
    pub(super) relative: u32,
    pub(super) _pad: u32,
    pub(super) expected_revision: u64,
}

/// `union bpf_attr` (168 bytes on 6.18; the rest stays zero, which the kernel accepts).
#[repr(C)]
pub(super) union Attr {
    pub(super) map_create: MapCreate,
    pub(super) elem: MapElem,
    pub(super) prog_load: ProgLoad,
    pub(super) get_fd: GetFdById,
    pub(super) info: InfoByFd,
    pub(super) query: Query,
    pub(super) link_create: LinkCreate,
    pub(super) obj_pin: ObjPin,
    pub(super) _size: [u64; 32],
}

/// `BPF_OBJ_PIN`'s part of `union bpf_attr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct ObjPin {
    pub(super) pathname: u64,
    pub(super) bpf_fd: u32,
    pub(super) file_flags: u32,
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(offset_of!(MapCreate, map_name) == 28);
    assert!(offset_of!(MapElem, key) == 8 && offset_of!(MapElem, value) == 16);
    assert!(offset_of!(ProgLoad, log_buf) == 32 && offset_of!(ProgLoad, kern_version) == 40);
    assert!(offset_of!(ProgLoad, prog_name) == 48);
    assert!(offset_of!(ProgLoad, expected_attach_type) == 68);
    assert!(offset_of!(GetFdById, open_flags) == 8);
    assert!(offset_of!(InfoByFd, info) == 8);
    assert!(offset_of!(Query, prog_ids) == 16 && offset_of!(Query, count) == 24);
    assert!(offset_of!(Query, link_ids) == 40 && offset_of!(Query, revision) == 56);
    assert!(offset_of!(LinkCreate, flags) == 12 && offset_of!(LinkCreate, relative) == 16);
    assert!(offset_of!(LinkCreate, expected_revision) == 24);
    assert!(size_of::<Attr>() >= 168);
};

pub(super) fn attr() -> Attr {
    Attr { _size: [0; 32] }
}

pub(super) fn bpf(cmd: u32, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: bpf(2) with a zero-initialised attr of a size the kernel accepts; every
    // pointer inside it points to memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(super) fn fd(r: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new fd; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

pub(super) fn name16(s: &str) -> [u8; 16] {
    let mut n = [0u8; 16];
    n[..s.len().min(15)].copy_from_slice(&s.as_bytes()[..s.len().min(15)]);
    n
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Insn {
    pub(super) code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    pub(super) regs: u8,
    pub(super) off: i16,
    pub(super) imm: i32,
}

pub(super) fn i(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Opcodes (class | size/op | mode/source).
pub(super) const MOV64_IMM: u8 = 0x07 | 0xb0; // BPF_ALU64 | BPF_MOV | BPF_K
pub(super) const MOV64_REG: u8 = 0x07 | 0xb0 | 0x08; // BPF_ALU64 | BPF_MOV | BPF_X
pub(super) const ADD64_IMM: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
pub(super) const TO_BE: u8 = 0x04 | 0xd0 | 0x08; // BPF_ALU | BPF_END | BPF_TO_BE
pub(super) const LDX_W: u8 = 0x01 | 0x60; // BPF_LDX | BPF_MEM | BPF_W
pub(super) const LDX_B: u8 = 0x01 | 0x60 | 0x10; // BPF_LDX | BPF_MEM | BPF_B
pub(super) const ST_DW: u8 = 0x02 | 0x60 | 0x18; // BPF_ST | BPF_MEM | BPF_DW
pub(super) const STX_W: u8 = 0x03 | 0x60; // BPF_STX | BPF_MEM | BPF_W
pub(super) const ATOMIC_DW: u8 = 0x03 | 0xc0 | 0x18; // BPF_STX | BPF_ATOMIC | BPF_DW
pub(super) const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW
pub(super) const JA: u8 = 0x05; // BPF_JMP | BPF_JA
pub(super) const JEQ_IMM: u8 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
pub(super) const JSLT_IMM: u8 = 0x05 | 0xc0; // BPF_JMP | BPF_JSLT | BPF_K
pub(super) const CALL: u8 = 0x05 | 0x80; // BPF_JMP | BPF_CALL
pub(super) const EXIT: u8 = 0x05 | 0x90; // BPF_JMP | BPF_EXIT
pub(super) const BPF_PSEUDO_MAP_FD: u8 = 1;
pub(super) const FN_MAP_LOOKUP_ELEM: i32 = 1;
pub(super) const FN_SKB_LOAD_BYTES: i32 = 26;
