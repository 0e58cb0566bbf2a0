//! The JSON documents of the admin endpoint that are ours alone (`/certs`,
//! `/debug/capture`), and readiness. `/config_dump`, in upstream's shape, is in
//! `config_dump/`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::AdminState;
use crate::identity::manager::CertState;

pub fn certs(s: &AdminState) -> Value {
    json!(s.certs.snapshot())
}

pub async fn capture(s: &AdminState) -> Value {
    let cap = s.capture.lock().await;
    let counters: BTreeMap<String, _> = cap
        .counters()
        .into_iter()
        .map(|(ip, c)| (ip.to_string(), c))
        .collect();
    let cfg = cap.config();
    let status = s.enroller.status();
    let attach = match cap.attach_mode() {
        crate::capture::AttachMode::Tcx => json!({"mode": "tcx", "position": "first"}),
        crate::capture::AttachMode::Legacy { priority } => json!({
            "mode": "legacy",
            "priority": priority,
            "handle": format!("{:#x}", crate::capture::legacy_tc::FILTER_HANDLE),
        }),
    };
    json!({
        "program": ztunnel_ebpf_common::CAPTURE_PROGRAM,
        "attach": attach,
        "requestedAttach": cfg.attach,
        "kernel": cap.features(),
        "pinDir": cap.pin_dir().display().to_string(),
        "interfaces": cap.inventory(),
        // Pods this node should capture but cannot, with why: held (never open).
        "pendingPods": status.pending,
        // Addresses more than one pod interface claims: who keeps each, who was refused.
        "addressConflicts": status.conflicts,
        "claimsRefused": s.enroller.claims_refused(),
        "settings": {
            "captureMark": format!("{:#x}", cfg.routing.mark),
            "proxyMark": format!("{:#x}", cfg.proxy_mark),
            "routeTable": cfg.routing.table,
            "rulePriority": cfg.routing.priority,
            "outboundPort": cfg.outbound_port,
            "inboundPlaintextPort": cfg.inbound_plain_port,
            "inboundHbonePort": cfg.inbound_hbone_port,
            "excludedPorts": cfg.excluded_ports,
            "hostProbes": if cfg.host_under_policy { "policy" } else { "exempt" },
        },
        "enrolled": cap.enrolled(),
        "counters": counters,
        "sockmap": cap.sockmap(),
        "droppedUnparsed": cap.dropped_unparsed(),
        // Connections into enrolled pods judged after the node's NAT (VIP, NodePort).
        "lastHop": {
            "syns": cap.last_hop_counters(),
            "cachedVerdicts": cap.last_hop_cached(),
        },
        // Runs and time per program; counted only while kernel.bpf_stats_enabled=1.
        "programStats": crate::capture::program_stats::program_stats(),
    })
}

/// Why this ztunnel is not ready; empty when it is.
pub fn not_ready(s: &AdminState) -> Vec<String> {
    let mut reasons = vec![];
    if s.config_expected && *s.store.subscribe().borrow() == 0 {
        reasons.push("workload configuration not loaded yet".to_string());
    }
    if let Some(x) = &s.xds {
        if !x.borrow().synced {
            reasons.push("xDS not synced yet".to_string());
        }
    }
    let status = s.enroller.status();
    for (uid, why) in &status.pending {
        reasons.push(format!(
            "workload {uid} not enrolled (held: its traffic is dropped): {why}"
        ));
    }
    let certs: BTreeMap<String, CertState> = s
        .certs
        .snapshot()
        .into_iter()
        .map(|c| (c.identity, c.state))
        .collect();
    let state = s.store.snapshot();
    for uid in status.enrolled.keys() {
        let Some(w) = state.workload_by_uid(uid) else {
            continue;
        };
        let id = w.identity().to_string();
        match certs.get(&id) {
            Some(CertState::Ready) | Some(CertState::Renewing) => {}
            Some(other) => reasons.push(format!("certificate for {id} is {other:?}")),
            None => reasons.push(format!("no certificate for {id} yet")),
        }
    }
    reasons
}
