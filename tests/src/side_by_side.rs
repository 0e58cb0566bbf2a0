//! The setup `cargo xtask istio-compare` runs both proxies on, shared with the test that
//! checks our `/config_dump` against upstream's recorded shape
//! (`tests/fixtures/istio-config_dump.shape`) on every run, without upstream's binary.

use crate::Pod;

/// The service's virtual IP (no interface has it: each proxy resolves it to the server).
pub const VIP: &str = "10.96.0.10";
pub const SERVICE_PORT: u16 = 80;
pub const SERVER_PORT: u16 = 8080;

/// Upstream's `/config_dump` shape for [`workload_file`], recorded by `cargo xtask
/// istio-compare` (it writes `istio-config_dump.shape` beside its report; copy it here
/// when upstream changes).
pub const UPSTREAM_CONFIG_DUMP_SHAPE: &str = include_str!("../fixtures/istio-config_dump.shape");

/// Upstream's local-file format with every field either proxy reads set to a value that is
/// not its default (upstream leaves defaults out of its dump, so only set fields show);
/// the second service (no traffic goes to it) carries the service fields the first lacks:
/// an address range, a waypoint and a weighted set, load balancing, IP families.
/// Upstream parses strictly: `services` and `dryRun` must be there, string matches take
/// YAML's tagged form (`!Exact …`).
pub fn workload_file(client: &Pod, server: &Pod) -> String {
    let workload = |p: &Pod, sa: &str, services: &str| {
        format!(
            "- uid: cluster1//Pod/default/{name}\n  name: {name}\n  namespace: default\n  \
             serviceAccount: {sa}\n  trustDomain: cluster.local\n  \
             workloadIps: [\"{ip}\", \"{ip6}\"]\n  protocol: HBONE\n  node: {node}\n  \
             workloadName: {name}\n  workloadType: deployment\n  canonicalName: {name}\n  \
             canonicalRevision: v1\n  clusterId: cluster1\n  status: Healthy\n  \
             locality: {{region: region-1, zone: zone-1, subzone: subzone-1}}\n  \
             authorizationPolicies: [default/allow-client]\n  services: {services}\n",
            name = p.name,
            ip = p.ip,
            ip6 = p.ip6,
            node = p.node,
        )
    };
    format!(
        "workloads:\n{client}{server}\
         services:\n\
         - name: server\n  namespace: default\n  hostname: server.default.svc.cluster.local\n  \
           vips: [\"/{VIP}\"]\n  ports: {{{SERVICE_PORT}: {SERVER_PORT}}}\n  \
           subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/server\"]\n\
         - name: extras\n  namespace: default\n  hostname: extras.default.svc.cluster.local\n  \
           vips: [\"/10.96.0.11\"]\n  cidrVips: [{{network: \"\", cidr: 10.97.0.0/16}}]\n  \
           ports: {{81: 8081}}\n  \
           waypoint: {{destination: default/waypoint.default.svc.cluster.local, hboneMtlsPort: 15008}}\n  \
           weightedWaypoints:\n  - {{destination: {{destination: default/waypoint.default.svc.cluster.local, \
           hboneMtlsPort: 15008}}, weight: 1}}\n  \
           loadBalancer: {{routingPreferences: [Zone, Node], mode: Failover, healthPolicy: AllowAll}}\n  \
           ipFamilies: IPv4\n  canonical: true\n  visibility: Namespace\n\
         policies:\n\
         - name: allow-client\n  namespace: default\n  scope: WorkloadSelector\n  action: Allow\n  \
           dryRun: false\n  rules:\n  - - - principals: [!Exact cluster.local/ns/default/sa/client]\n        \
           destinationPorts: [{SERVER_PORT}]\n",
        client = workload(client, "client", "{}"),
        server = workload(
            server,
            "server",
            &format!(
                "{{default/server.default.svc.cluster.local: {{{SERVICE_PORT}: {SERVER_PORT}}}}}"
            )
        ),
    )
}
