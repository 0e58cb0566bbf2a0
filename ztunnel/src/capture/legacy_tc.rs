//! Legacy tc attachment (kernels before TCX, 6.6): a `clsact` qdisc and a direct-action
//! `cls_bpf` filter at a fixed priority and handle.
//!
//! Unlike a TCX link, a filter belongs to the interface, not to a file descriptor: it
//! stays when ztunnel dies, which keeps capture failing closed with nothing pinned. A
//! restarting ztunnel finds its filter by priority, handle and program name and swaps in
//! its own program in place (a filter change without `NLM_F_CREATE`: the kernel replaces
//! the program atomically). The qdisc is shared with whoever else filters on the
//! interface (a CNI): ztunnel adds it only if missing, and removes it only if it added
//! it and no filter is left on it.

use anyhow::Context;
use futures::StreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::Handle;

/// The handle of ztunnel's filter within its priority ("zt").
pub const FILTER_HANDLE: u32 = 0x7a74;

/// A filter on an interface's ingress or egress hook.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// `bpf`, `u32`, …
    pub kind: String,
    /// The program name of a `bpf` filter.
    pub name: Option<String>,
}

impl Filter {
    /// The capture program's filter, left by this or an earlier ztunnel.
    pub fn is_ours(&self, priority: u16, program: &str) -> bool {
        self.priority == priority
            && self.handle == FILTER_HANDLE
            && self.kind == "bpf"
            && self
                .name
                .as_deref()
                .is_some_and(|n| n == program || n.starts_with(&format!("{program}:")))
    }
}

/// The filters of `ifindex`'s clsact hook (`egress: false` = ingress), in the order the
/// kernel runs them (priority, then position). Empty when there is no clsact qdisc.
pub async fn filters(handle: &Handle, ifindex: u32, egress: bool) -> anyhow::Result<Vec<Filter>> {
    let mut msg = TcMessage::default();
    msg.header.index = ifindex as i32;
    msg.header.parent = TcHandle {
        major: 0xffff,
        minor: if egress {
            TcHandle::MIN_EGRESS
        } else {
            TcHandle::MIN_INGRESS
        },
    };
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetTrafficFilter(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut responses = handle.clone().request(req).context("dumping tc filters")?;
    let mut out = vec![];
    while let Some(msg) = responses.next().await {
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) => {
                // The first message of each priority describes the classifier itself
                // (handle 0); the filters follow.
                if m.header.handle == TcHandle::UNSPEC {
                    continue;
                }
                out.push(filter_of(&m));
            }
            // No clsact qdisc: no hook to list.
            NetlinkPayload::Error(e) if e.raw_code() == -libc::EINVAL => return Ok(vec![]),
            NetlinkPayload::Error(e) => {
                return Err(std::io::Error::from_raw_os_error(-e.raw_code()))
                    .context("dumping tc filters")
            }
            _ => {}
        }
    }
    Ok(out)
}

fn filter_of(m: &TcMessage) -> Filter {
    let mut f = Filter {
        priority: (m.header.info >> 16) as u16,
        handle: u32::from(m.header.handle.major) << 16 | u32::from(m.header.handle.minor),
        kind: String::new(),
        name: None,
    };
    for a in &m.attributes {
        match a {
            TcAttribute::Kind(k) => f.kind = k.clone(),
            TcAttribute::Options(opts) => {
                for o in opts {
                    // `TCA_BPF_NAME`: the name cls_bpf reports for its program.
                    if let TcOption::Bpf(TcFilterBpfOption::ProgName(n)) = o {
                        f.name = f.name.take().or_else(|| Some(bpf_name(n)));
                    }
                }
            }
            _ => {}
        }
    }
    f
}

/// The program name of a cls_bpf filter, up to its first NUL (the crate drops only a
/// trailing one).
fn bpf_name(name: &str) -> String {
    name.split('\0').next().unwrap_or_default().to_string()
}

/// Removes the clsact qdisc of `ifindex` if nothing filters on it any more.
pub async fn remove_qdisc_if_unused(handle: &Handle, ifindex: u32) -> anyhow::Result<bool> {
    if !filters(handle, ifindex, false).await?.is_empty()
        || !filters(handle, ifindex, true).await?.is_empty()
    {
        return Ok(false);
    }
    let mut req = handle.clone().qdisc().del(ifindex as i32);
    req.message_mut().header.parent = TcHandle::CLSACT;
    req.message_mut().header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    req.message_mut()
        .attributes
        .push(TcAttribute::Kind("clsact".into()));
    req.execute().await.context("removing the clsact qdisc")?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_filter_is_known_by_priority_handle_and_program() {
        let f = |prio, handle, kind: &str, name: Option<&str>| Filter {
            priority: prio,
            handle,
            kind: kind.into(),
            name: name.map(str::to_string),
        };
        assert!(f(1, FILTER_HANDLE, "bpf", Some("zt_capture")).is_ours(1, "zt_capture"));
        // Kernels report the program as "<name>:[<id>]" in some versions.
        assert!(f(1, FILTER_HANDLE, "bpf", Some("zt_capture:[42]")).is_ours(1, "zt_capture"));
        assert!(!f(2, FILTER_HANDLE, "bpf", Some("zt_capture")).is_ours(1, "zt_capture"));
        assert!(!f(1, 1, "bpf", Some("zt_capture")).is_ours(1, "zt_capture"));
        assert!(!f(1, FILTER_HANDLE, "u32", None).is_ours(1, "zt_capture"));
        assert!(!f(1, FILTER_HANDLE, "bpf", Some("cil_from_container")).is_ours(1, "zt_capture"));
    }

    /// Appends one netlink attribute (padded to 4 bytes).
    fn nla(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
        buf.extend(((4 + value.len()) as u16).to_ne_bytes());
        buf.extend(kind.to_ne_bytes());
        buf.extend(value);
        buf.resize(buf.len().next_multiple_of(4), 0);
    }

    #[test]
    fn a_cls_bpf_filter_is_read_with_its_program_name() {
        use netlink_packet_core::Parseable;
        // What the kernel reports for the capture filter on ingress (tcmsg, then
        // TCA_KIND and cls_bpf's nested TCA_OPTIONS).
        let mut m = vec![0u8; 4]; // family, padding
        m.extend(7i32.to_ne_bytes()); // ifindex
        m.extend(FILTER_HANDLE.to_ne_bytes());
        m.extend(0xffff_fff2u32.to_ne_bytes()); // parent: clsact ingress
        m.extend((1u32 << 16 | 0x0300).to_ne_bytes()); // priority 1, ETH_P_ALL
        nla(&mut m, 1, b"bpf\0");
        let mut opts = vec![];
        nla(&mut opts, 11, &42u32.to_ne_bytes()); // TCA_BPF_ID
        nla(&mut opts, 7, b"zt_capture:[42]\0"); // TCA_BPF_NAME
        nla(&mut opts, 10, &[1, 2, 3, 4, 5, 6, 7, 8]); // TCA_BPF_TAG
        nla(&mut opts, 8, &1u32.to_ne_bytes()); // TCA_BPF_FLAGS: direct action
        nla(&mut m, 2, &opts);
        let msg = TcMessage::parse(&m[..]).unwrap();
        assert_eq!(
            filter_of(&msg),
            Filter {
                priority: 1,
                handle: FILTER_HANDLE,
                kind: "bpf".into(),
                name: Some("zt_capture:[42]".into()),
            }
        );
    }
}
