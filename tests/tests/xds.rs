//! Config over the real protocol: `ztunnel controlplane` serves delta xDS (and the CA)
//! from its workload file; node ztunnels get workloads and policies from it, live.

use std::net::SocketAddr;
use std::time::Duration;

use ztunnel_tests::traffic::{echoes, eventually, EchoServer};
use ztunnel_tests::ztunnel::{local_config, metric, WorkloadSpec};
use ztunnel_tests::{require_root, Testbed};

const T: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn nodes_follow_the_control_plane_over_xds() {
    require_root!();
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let cp_node = tb.add_node("cp").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let echo = EchoServer::start(&server.netns, 8080).unwrap();
    let workloads = [
        WorkloadSpec::mesh(&client, "default", "client"),
        WorkloadSpec::mesh(&server, "default", "server"),
    ];
    let config = tb
        .write_config("workloads.yaml", &local_config(&workloads, ""))
        .unwrap();
    let cp = tb.start_controlplane(&cp_node, &config, &[]).unwrap();
    let mut zs = vec![];
    for n in [&a, &b] {
        let mut args = cp.node_args(n);
        args.extend(["--xds-address".to_string(), cp.url.clone()]);
        zs.push(
            tb.start_ztunnel_with(n, &args.iter().map(String::as_str).collect::<Vec<_>>())
                .unwrap(),
        );
    }
    for z in &zs {
        z.wait_for_log("workload enrolled", Duration::from_secs(15))
            .unwrap();
    }
    let dst = SocketAddr::new(server.ip.into(), 8080);
    eventually("traffic through the mesh", WAIT, || {
        echoes(&client.netns, dst)
    });

    // A DENY policy added to the control plane's file reaches node-b and is enforced.
    let deny = "policies:\n- name: deny-client\n  namespace: default\n  scope: Namespace\n  action: Deny\n  \
                rules:\n  - - - principals: [\"cluster.local/ns/default/sa/client\"]\n";
    std::fs::write(&config, local_config(&workloads, deny)).unwrap();
    eventually("deny policy enforced", WAIT, || !echoes(&client.netns, dst));
    // The attempt that first failed may have been in flight when the policy arrived, and
    // closed by live enforcement instead: a new one is denied at the door.
    assert!(!echoes(&client.netns, dst));
    zs[1]
        .wait_for_log("connection denied by policy", T)
        .unwrap();
    // Removing it is honoured too.
    std::fs::write(&config, local_config(&workloads, "")).unwrap();
    eventually("policy removal honoured", WAIT, || {
        echoes(&client.netns, dst)
    });

    // A new pod appears in the file: node-a learns it over xDS and enrolls it.
    let late = tb.add_pod(&a, "late").unwrap();
    let mut more = workloads.to_vec();
    more.push(WorkloadSpec::mesh(&late, "default", "late"));
    std::fs::write(&config, local_config(&more, "")).unwrap();
    zs[0]
        .wait_for_log(
            "workload=cluster1//Pod/default/late",
            Duration::from_secs(15),
        )
        .unwrap();
    eventually("the new pod's traffic goes through the mesh", WAIT, || {
        echoes(&late.netns, dst)
    });
    zs[0]
        .wait_for_line(&["connection complete", "sa/late"], T)
        .unwrap();

    // A DENY on `serviceAccounts` (AuthorizationPolicy's source field, istiod's
    // ServiceAccountMatch) crosses xDS and is enforced: the client's account is refused,
    // another account of the same namespace is not. Before the field was carried, the rule
    // arrived empty and was never enforced.
    let denied_before = metric(&b, "ztunnel_authorization_decisions_total{result=\"deny\"}");
    let deny_sa = "policies:\n- name: deny-client-sa\n  namespace: default\n  scope: Namespace\n  \
                   action: Deny\n  rules:\n  - - - serviceAccounts: \
                   [{namespace: default, serviceAccount: client}]\n";
    std::fs::write(&config, local_config(&more, deny_sa)).unwrap();
    eventually("serviceAccounts DENY enforced", WAIT, || {
        !echoes(&client.netns, dst)
    });
    echo.drain();
    assert!(!echoes(&client.netns, dst));
    assert!(
        echo.drain().is_empty(),
        "the server saw a connection the policy denies"
    );
    assert!(
        echoes(&late.netns, dst),
        "another service account is not denied"
    );
    zs[1]
        .wait_for_line(&["connection denied by policy", "sa/client"], T)
        .unwrap();
    assert!(
        metric(&b, "ztunnel_authorization_decisions_total{result=\"deny\"}") > denied_before,
        "the refusal is counted"
    );
}
