//! The DNS proxy's handling of a question (`dns::decide`) on arbitrary bytes, for a pod
//! the state knows, with one service.
//!
//! Oracle: no panic; an answer is a DNS response whose id is the question's.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use ztunnel::dns::{decide, Reply};
use ztunnel::state::{ProxyState, Service, StateStore, Workload};

static STATE: LazyLock<std::sync::Arc<ProxyState>> = LazyLock::new(|| {
    let store = StateStore::default();
    store.replace_all(
        [Workload {
            uid: "c//Pod/default/client".into(),
            namespace: "default".into(),
            workload_ips: vec!["10.0.0.1".parse().expect("ip")],
            ..Default::default()
        }],
        [Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            vips: vec!["/10.96.0.10".parse().expect("vip")],
            ..Default::default()
        }],
        [],
    );
    store.snapshot()
});

fuzz_target!(|data: &[u8]| {
    let client = STATE.workload_by_uid("c//Pod/default/client");
    for max_udp in [Some(512), None] {
        let (reply, _) = decide(data, &STATE, client.as_deref(), "cluster.local", max_udp);
        if let Reply::Answer(bytes) = reply {
            assert!(bytes.len() >= 12, "a reply has a header");
            assert_eq!(bytes[..2], data[..2], "the reply keeps the question's id");
            assert!(bytes[2] & 0x80 != 0, "the reply is a response");
        }
    }
});
