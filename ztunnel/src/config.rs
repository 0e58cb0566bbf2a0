//! The command line: one typed clap struct per subcommand, every flag also read from an
//! environment variable (named as upstream Istio ztunnel names it where it has one).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

pub mod istio_names;
pub mod istio_settings;
pub mod limits;
pub use limits::{ControlplaneLimits, HboneLimits, HttpLimits};

#[derive(Parser, Debug)]
#[command(
    name = "ztunnel",
    version,
    about = "eBPF-native per-node service-mesh proxy: captures enrolled pods' TCP with eBPF and \
             carries it between nodes in HBONE (HTTP/2 CONNECT over mutual TLS 1.3)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node proxy (needs root: loads eBPF programs, installs policy routing).
    Run(Box<RunArgs>),
    /// Run a minimal control plane: Istio's CA API (gRPC over TLS) for the node proxies,
    /// signing the identities of the workloads the workload file places on each node.
    Controlplane(Box<ControlplaneArgs>),
    /// Show what a running ztunnel on this node knows, as tables (or JSON), from its admin
    /// endpoint.
    Debug(DebugArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct DebugArgs {
    /// What to show.
    #[arg(value_enum)]
    pub what: DebugView,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: DebugOutput,
    /// The ztunnel's admin endpoint.
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DebugView {
    /// Workloads known to this node (all nodes'), with protocol, waypoint and enrollment.
    Workloads,
    /// Services known to this node: VIPs, ports, waypoint.
    Services,
    /// Workload certificates held by this node.
    Certs,
    /// eBPF capture: interfaces, enrolled addresses, per-pod counters.
    Capture,
    /// Live connections with identities and bytes.
    Connections,
    /// The names the DNS proxy answers from the mesh, with their addresses.
    Dns,
    /// The whole config dump.
    Config,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DebugOutput {
    Table,
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ControlplaneArgs {
    /// Workload file (upstream ztunnel's local YAML, as for `run --local-xds-path`): a node
    /// may obtain only the identities of workloads it places on that node. Reloaded when it
    /// changes.
    #[arg(long, env = "CONTROLPLANE_CONFIG", value_name = "FILE")]
    pub config: PathBuf,

    /// CA directory: `root-cert.pem` and `root-key.pem`, created if absent. Give
    /// `<DIR>/root-cert.pem` to the node proxies (their `--ca-root-cert`).
    #[arg(long, env = "CA_DIR", value_name = "DIR")]
    pub ca_dir: PathBuf,

    /// Address of the gRPC endpoint (istiod serves xDS and the CA on 15012).
    #[arg(
        long,
        env = "CONTROLPLANE_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:15012"
    )]
    pub listen: SocketAddr,

    /// Callers' bearer tokens, one per line: `<token> <node-name>` for a node proxy (it gets,
    /// naming each as ImpersonatedIdentity, the identities of the workloads the workload file
    /// puts on that node), or `<token> spiffe://<trust-domain>/ns/<ns>/sa/<sa>` for a proxy
    /// that asks for its own identity (waypoint, gateway, dedicated mode: it gets exactly
    /// that one). Both read all of xDS. `#` comments and blank lines allowed. Reloaded when
    /// it changes.
    #[arg(long, env = "TOKENS_FILE", value_name = "FILE")]
    pub tokens_file: PathBuf,

    /// Trust domain of the identities this CA signs.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Longest validity granted to a workload certificate (e.g. `24h`, `90m`, `3600s`, `3600`).
    #[arg(long, env = "MAX_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub max_cert_ttl: Duration,

    /// Prometheus metrics (`/metrics`: refusals by limit); not served unless given.
    #[arg(long, env = "CONTROLPLANE_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    #[command(flatten)]
    pub limits: ControlplaneLimits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (`plain`, Istio's ztunnel's name for it, is the same).
    #[value(alias = "plain")]
    Text,
    Json,
}

/// Where the pods to enroll come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EnrollmentSource {
    /// `kubernetes` when running in a pod (`KUBERNETES_SERVICE_HOST` set) without
    /// `--local-xds-path`, else `state`.
    Auto,
    /// The API server: pods of this node in namespaces labelled
    /// `istio.io/dataplane-mode=ambient` (pod opt-out `istio.io/dataplane-mode=none`).
    Kubernetes,
    /// The workloads the state (workload file or xDS) places on this node, in the mesh.
    State,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Name of this node: the workloads whose `node` is this name are served here.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Standalone configuration: workloads, services and policies in upstream ztunnel's
    /// local YAML format; reloaded when the file changes.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub local_xds_path: Option<PathBuf>,

    /// The same configuration given inline, as YAML text (read once). Instead of
    /// `--local-xds-path`.
    #[arg(long, env = "LOCAL_XDS", value_name = "YAML", conflicts_with_all = ["local_xds_path", "xds_address"])]
    pub local_xds: Option<String>,

    /// Control plane to get workloads, services and policies from over Istio delta xDS, as
    /// a URL: `https://HOST:PORT` (istiod: https://istiod.istio-system.svc:15012, or a
    /// `ztunnel controlplane`). Its certificate must chain to `--xds-root-cert`; the bearer
    /// token is the one in `--ca-token-file`. Instead of `--local-xds-path`.
    #[arg(
        long,
        env = "XDS_ADDRESS",
        value_name = "URL",
        value_parser = parse_url,
        conflicts_with = "local_xds_path"
    )]
    pub xds_address: Option<String>,

    /// PEM root certificate(s) the xDS server's certificate must chain to: a file, `SYSTEM`
    /// (the node's trust store) or the PEM text itself; defaults to `--ca-root-cert`
    /// (istiod serves xDS and the CA with one certificate).
    #[arg(long, env = "XDS_ROOT_CA", value_name = "FILE|SYSTEM|PEM")]
    pub xds_root_cert: Option<PathBuf>,

    /// The name the xDS server's certificate must carry, when not the host of
    /// `--xds-address` (e.g. istiod reached through a load balancer's address).
    #[arg(long, env = "ALT_XDS_HOSTNAME", value_name = "NAME")]
    pub xds_tls_name: Option<String>,

    /// Of several services sharing a VIP, prefer the one in this namespace when none is in
    /// the client's namespace and none is canonical (Istio's deprecated
    /// `PREFERED_SERVICE_NAMESPACE`, spelled as there).
    #[arg(long, env = "PREFERED_SERVICE_NAMESPACE", value_name = "NAMESPACE")]
    pub preferred_service_namespace: Option<String>,

    /// Serve the DNS proxy on this address (UDP and TCP; Istio's port is 15053): mesh
    /// hostnames answered for the pod that asks, the rest relayed to `--dns-upstream`.
    /// Enrolled pods' DNS (UDP and TCP, port 53 of any address but the node's) is captured to it
    /// (`--dns-capture`); with capture on, its UDP socket is bound to the wildcard
    /// addresses of this port, and answers on other addresses only captured questions.
    #[arg(long, env = "DNS_PROXY_ADDR", value_name = "ADDR")]
    pub dns_proxy_addr: Option<std::net::SocketAddr>,

    /// With the DNS proxy running: enrolled pods' DNS (UDP and TCP, port 53 of any
    /// address but the node's own) goes to it, answered as if from the server they asked. While ztunnel is
    /// down their DNS goes where they sent it (fails open; their connections stay
    /// captured and fail closed).
    #[arg(long, env = "DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_capture: bool,

    /// The resolv.conf whose nameservers get the questions the mesh does not answer, and
    /// the lookups of endpoints known by hostname only (at connect time).
    #[arg(long, env = "DNS_UPSTREAM", default_value = "/etc/resolv.conf")]
    pub dns_upstream: PathBuf,

    /// Log every authorization decision at info level, not only at debug.
    #[arg(long, env = "AUTHZ_POLICY_INFO_LOGGING", default_value_t = false, action = clap::ArgAction::Set)]
    pub authz_policy_info_logging: bool,

    /// Which pods to enroll: from the Kubernetes API server (namespace label
    /// `istio.io/dataplane-mode=ambient`; needs NODE_NAME to be the Kubernetes node name),
    /// or from the state's workloads of this node.
    #[arg(long, env = "ENROLLMENT_SOURCE", value_enum, default_value = "auto")]
    pub enrollment_source: EnrollmentSource,

    /// Istio cluster id: Kubernetes pods are named `<cluster-id>//Pod/<ns>/<name>`, as by
    /// istiod, and xDS sends it as the node's `CLUSTER_ID`.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// This ztunnel's own pod name (the downward API's `metadata.name`): part of the node
    /// id istiod knows it by.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,

    /// This ztunnel's own namespace (`metadata.namespace`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,

    /// This ztunnel's own addresses (`status.podIPs`, comma separated): xDS node id and
    /// `INSTANCE_IPS`.
    #[arg(long, env = "INSTANCE_IP", value_delimiter = ',')]
    pub instance_ip: Vec<std::net::IpAddr>,

    /// The cluster's DNS domain, for the xDS node id.
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// The network this node is on (Istio's `global.network`, which istiod writes on every
    /// workload). Addresses without a network (a pod's, an original destination's) are
    /// looked up on it; a service whose endpoints are all on other networks is refused,
    /// naming them (network gateways are not supported).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,

    /// Extra xDS node metadata: every `ISTIO_META_<NAME>` environment variable, as
    /// upstream's DaemonSet passes them (read once, at start).
    #[arg(skip = istio_meta_from_env())]
    pub istio_meta: std::collections::BTreeMap<String, String>,

    /// Names this ztunnel's pinned eBPF state (`<bpffs>/ztunnel/<instance>`); a restart
    /// with the same instance adopts it. Defaults to the node name.
    #[arg(long, env = "ZTUNNEL_INSTANCE")]
    pub instance: Option<String>,

    /// Where bpffs is (mounted there if it is not).
    #[arg(long, env = "BPFFS_ROOT", default_value = "/sys/fs/bpf")]
    pub bpffs_root: PathBuf,

    /// Packet mark the capture program sets on packets it hands to ztunnel; an `ip rule`
    /// routes packets with this mark locally. Must be a bit nothing else on the node sets:
    /// not kube-proxy's 0x4000 (masquerade) or 0x8000 (drop), Calico's and Cilium's
    /// 0xffff0000, Cilium's 0x0f00, the AWS VPC CNI's 0x80, nor the proxy mark.
    #[arg(long, env = "CAPTURE_MARK", default_value = "0x1000", value_parser = parse_u32)]
    pub capture_mark: u32,

    /// SO_MARK of ztunnel's own sockets (upstream's 1337); must not overlap the capture mark.
    #[arg(long, env = "PROXY_MARK", default_value = "0x539", value_parser = parse_u32)]
    pub proxy_mark: u32,

    /// Routing table whose `local default dev lo` route delivers captured packets.
    #[arg(long, env = "CAPTURE_ROUTE_TABLE", default_value_t = 15010)]
    pub route_table: u32,

    /// Priority of the `fwmark` rule pointing at that table.
    #[arg(long, env = "CAPTURE_RULE_PRIORITY", default_value_t = 100)]
    pub rule_priority: u32,

    /// Destination ports never captured (comma separated).
    #[arg(long, env = "EXCLUDE_PORTS", value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,

    /// Outbound capture listener (pods' outgoing connections).
    #[arg(long, env = "OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,

    /// Inbound plaintext capture listener.
    #[arg(long, env = "INBOUND_PLAINTEXT_PORT", default_value_t = 15006)]
    pub inbound_plaintext_port: u16,

    /// Inbound HBONE listener (mTLS, on the destination pod's address).
    #[arg(long, env = "INBOUND_HBONE_PORT", default_value_t = 15008)]
    pub inbound_hbone_port: u16,

    /// On exit, leave the eBPF programs attached (enrolled pods stay fail-closed) for the
    /// next ztunnel to adopt: use for upgrades. Otherwise everything is removed.
    #[arg(long, env = "RETAIN_CAPTURE_ON_EXIT")]
    pub retain_capture_on_exit: bool,

    /// How often to look for new interfaces, retry pods whose interface is missing, and
    /// apply a changed log filter to the capture program (its per-flow debug records).
    #[arg(long, env = "RESCAN_INTERVAL_MS", default_value_t = 1000)]
    pub rescan_interval_ms: u64,

    /// How the capture program is attached to interfaces: `auto` uses TCX links where the
    /// kernel has them (Linux 6.6 and later) and legacy tc otherwise (a clsact qdisc and a
    /// direct-action cls_bpf filter, any kernel from 5.10); `tcx` or `legacy` force one.
    /// Either way ztunnel runs before the CNI's programs and passes on what it does not take.
    #[arg(long, env = "TC_ATTACH", value_enum, default_value = "auto")]
    pub tc_attach: crate::capture::TcAttach,

    /// Priority of the legacy tc filter (lower numbers run first). 1 puts ztunnel before
    /// the CNI's filters; a CNI filter at the same priority shares it, and then the kernel
    /// runs the newest first.
    #[arg(long, env = "TC_PRIORITY", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub tc_priority: u16,

    /// New connections from the node's own sockets (kubelet's probes, hostNetwork pods)
    /// to enrolled pods, at the last hop into the pod: `exempt` lets them in without
    /// policy (Istio exempts them too, SNATing them to 169.254.7.127); `policy` judges them
    /// by the pod's policy like any other source outside the mesh, the node's address as
    /// their source (probes then need a policy that allows it).
    #[arg(long, env = "HOST_PROBES", value_enum, default_value = "exempt")]
    pub host_probes: HostProbes,

    /// Sockmap acceleration: the kernel moves bytes between an enrolled pod's socket and
    /// ztunnel's (the plaintext hops: outbound capture, delivery, the same-node path)
    /// without either TCP stack, where the kernel supports it (sock_ops, sk_msg, sockhash
    /// and socket storage, cgroup v2). Off unless asked for (`--sockmap=true`): on an
    /// accelerated socket a *blocking* read woken without data (after the pod's own
    /// half-close, or while another thread writes) returns EAGAIN, which event-driven
    /// programs absorb and blocking ones may not; and the kernel gives redirected bytes no
    /// flow control, so a sender faster than its receiver (ztunnel's TLS relay, under bulk
    /// load) queues kernel memory up to the node's TCP limit (ARCHITECTURE.md, "Sockmap").
    #[arg(long, env = "SOCKMAP", default_value_t = false, action = clap::ArgAction::Set)]
    pub sockmap: bool,

    /// The cgroup v2 directory whose sockets sockmap considers (pods' and ztunnel's must
    /// be below it); the cgroup v2 mount's root when not given.
    #[arg(long, env = "SOCKMAP_CGROUP", value_name = "DIR")]
    pub sockmap_cgroup: Option<PathBuf>,

    /// Ports (either end of a connection, comma separated) never accelerated: for
    /// applications that read their sockets with `splice()`, which does not see data the
    /// kernel redirected into them.
    #[arg(long, env = "SOCKMAP_EXCLUDE_PORTS", value_delimiter = ',')]
    pub sockmap_exclude_ports: Vec<u16>,

    /// Log format (levels come from RUST_LOG, default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Istio CA to get workload certificates from, as a URL: `https://HOST:PORT`
    /// (e.g. https://istiod.istio-system.svc:15012). Without it the built-in CA is used.
    #[arg(long, env = "CA_ADDRESS", value_name = "URL", value_parser = parse_url)]
    pub ca_address: Option<String>,

    /// PEM root certificate(s) the CA's TLS certificate must chain to: a file, `SYSTEM`
    /// (the node's trust store) or the PEM text itself.
    #[arg(long, env = "CA_ROOT_CA", value_name = "FILE|SYSTEM|PEM")]
    pub ca_root_cert: Option<PathBuf>,

    /// The name the CA's certificate must carry, when not the host of `--ca-address`.
    #[arg(long, env = "ALT_CA_HOSTNAME", value_name = "NAME")]
    pub ca_tls_name: Option<String>,

    /// File holding the bearer token presented to the CA; re-read at every request
    /// (Kubernetes projected tokens rotate).
    #[arg(long, env = "CA_TOKEN_FILE", value_name = "FILE")]
    pub ca_token_file: Option<PathBuf>,

    /// Built-in CA (when no CA_ADDRESS): directory of its root (`root-cert.pem`,
    /// `root-key.pem`), created if absent. Nodes that must trust each other share it;
    /// without it each ztunnel makes an in-memory root only its own node trusts.
    #[arg(long, env = "LOCAL_CA_DIR", value_name = "DIR")]
    pub local_ca_dir: Option<PathBuf>,

    /// Trust domain of the workload identities.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Validity asked of the CA for workload certificates; renewed at about half of it.
    #[arg(long, env = "WORKLOAD_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub workload_cert_ttl: Duration,

    /// Admin endpoint; loopback addresses only (it shows and changes everything).
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:15000", value_parser = parse_loopback)]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics (`/metrics`, `/stats/prometheus`).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness (`/healthz/ready`).
    #[arg(long, env = "READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// On SIGTERM, /quitquitquit or a handover to a new ztunnel, how long live
    /// connections get to finish.
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Data-path threads (0: one per core). Each serves every listener with its own
    /// single-threaded runtime and connection pool; a connection stays on the thread that
    /// accepted it. Control-plane work runs on the main thread.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,

    /// Once ready, hand the start-up's pages of the executable back to the kernel: page out
    /// its read-only mappings (MADV_PAGEOUT), drop its page-cache pages nothing maps and
    /// mark its read-only data MADV_RANDOM, so code only the start-up ran (argument parsing,
    /// eBPF loading, first configuration) does not stay resident. Measured idle RSS (README,
    /// Performance, "Idle RSS"): 14.9 MiB without, 11.9-13.3 MiB with the page-out alone,
    /// 10.9-12.0 MiB with all of it (anonymous memory ~2 MiB throughout). Costs a read from
    /// the page cache or disk the first time a code path runs after that.
    #[arg(long, env = "RELEASE_STARTUP_PAGES", default_value_t = true, action = clap::ArgAction::Set)]
    pub release_startup_pages: bool,

    /// How often to hand memory freed by closed connections back to the kernel (glibc's
    /// malloc_trim); 0 never. glibc keeps freed memory in its arenas: measured (cargo xtask
    /// soak), without it RSS stayed at its peak after a burst of 10,000 connections; with
    /// it RSS came back from that burst's 145 / 113 MiB (the two nodes) to 13.7 / 13.6 MiB
    /// under the steady load that followed. Cheap when there is nothing to hand back.
    #[arg(long, env = "MALLOC_TRIM_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub malloc_trim_interval: Duration,

    /// How long an inbound HBONE client gets to complete its mTLS handshake.
    #[arg(long, env = "TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// How long a connection from or to an enrolled pod waits for the pod's workload
    /// record (Kubernetes enrollment can run ahead of xDS) before it is refused, logged and
    /// counted (`unknown_source_workload`, `not_local_workload`); it is never passed in
    /// plaintext meanwhile. 0 refuses at once. Istio's ztunnel waits 5 s.
    #[arg(long, env = "WORKLOAD_WAIT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub workload_wait_timeout: Duration,

    /// Streams (tunnelled connections) a pooled HBONE connection carries before the pool
    /// opens another to the same peer (Istio's ztunnel: 100).
    #[arg(long, env = "POOL_MAX_STREAMS_PER_CONNECTION", default_value_t = 100,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub pool_max_streams_per_connection: u16,

    /// A pooled HBONE connection that carried nothing this long is closed (Istio's
    /// ztunnel: 5 minutes; here 1 minute, sooner giving back a peer's resources).
    #[arg(long, env = "POOL_UNUSED_RELEASE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub pool_unused_release_timeout: Duration,

    /// Upgrades: if a ztunnel of this instance is running, take its listening sockets
    /// (no connection is refused or reset) once ready, and let it drain. `false`: refuse to
    /// start while another ztunnel of this instance runs.
    #[arg(long, env = "TAKEOVER", default_value_t = true, action = clap::ArgAction::Set)]
    pub takeover: bool,

    /// Directory of the handover socket (`<dir>/<instance>/handover.sock`) through which
    /// a new ztunnel takes over; root-only. On Kubernetes a hostPath both pods mount.
    #[arg(long, env = "HANDOVER_DIR", default_value = "/var/run/ztunnel")]
    pub handover_dir: PathBuf,

    /// How long a new ztunnel waits to be ready (configuration, certificates) before
    /// taking over from the running one anyway.
    #[arg(long, env = "TAKEOVER_READY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub takeover_ready_timeout: Duration,

    #[command(flatten)]
    pub http_limits: HttpLimits,

    #[command(flatten)]
    pub hbone_limits: HboneLimits,
}

impl RunArgs {
    pub fn instance(&self) -> String {
        self.instance
            .clone()
            .unwrap_or_else(|| self.node_name.clone())
    }

    pub fn handover_socket(&self) -> PathBuf {
        crate::handover::socket_path(&self.handover_dir, &self.instance())
    }

    /// Whether pods are enrolled from the Kubernetes API server.
    pub fn kubernetes_enrollment(&self) -> bool {
        match self.enrollment_source {
            EnrollmentSource::Kubernetes => true,
            EnrollmentSource::State => false,
            EnrollmentSource::Auto => crate::k8s::in_cluster() && self.local_xds_path.is_none(),
        }
    }

    /// In Kubernetes, what is not given defaults to upstream ztunnel's setup: istiod for
    /// the CA and xDS, the projected `istio-ca` token and Istio's root certificate
    /// (unless a workload file is the state source).
    pub fn apply_kubernetes_defaults(&mut self) {
        use crate::k8s::{ISTIOD_ADDRESS, ISTIO_ROOT_CERT_PATH, ISTIO_TOKEN_PATH};
        self.ca_address.get_or_insert_with(|| ISTIOD_ADDRESS.into());
        self.ca_root_cert
            .get_or_insert_with(|| ISTIO_ROOT_CERT_PATH.into());
        self.ca_token_file
            .get_or_insert_with(|| ISTIO_TOKEN_PATH.into());
        if self.local_xds_path.is_none() {
            self.xds_address
                .get_or_insert_with(|| ISTIOD_ADDRESS.into());
        }
    }

    /// The port enrolled pods' DNS over UDP is captured to: the DNS proxy's, when it runs
    /// with `--dns-capture`.
    pub fn dns_capture_port(&self) -> Option<u16> {
        self.dns_proxy_addr
            .filter(|_| self.dns_capture)
            .map(|a| a.port())
    }

    pub fn listen_addrs(&self, port: u16) -> [SocketAddr; 2] {
        [
            SocketAddr::from(([0, 0, 0, 0], port)),
            SocketAddr::from(([0u16; 8], port)),
        ]
    }
}

fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !a.ip().is_loopback() {
        return Err(format!(
            "{a} is not a loopback address: the admin endpoint is node-local only"
        ));
    }
    Ok(a)
}

/// `24h`, `90m`, `30s`, `7d` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 24h, 90m, 30s"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// `ISTIO_META_<NAME>=<value>` variables as `<NAME>` → value.
fn istio_meta_from_env() -> std::collections::BTreeMap<String, String> {
    std::env::vars()
        .filter_map(|(k, v)| Some((k.strip_prefix("ISTIO_META_")?.to_string(), v)))
        .collect()
}

/// A control-plane address: an `http://` or `https://` URL with a host and a port
/// (checked here, so a typo stops `ztunnel run` with the flag's name, not a later dial).
fn parse_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("not a URL ({e}); e.g. https://istiod.istio-system.svc:15012"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("https" | "http"), Some(a)) if a.port_u16().is_some() => Ok(s.to_string()),
        (Some("https" | "http"), Some(_)) => Err("needs a port, e.g. :15012".into()),
        _ => Err("needs https://HOST:PORT, e.g. https://istiod.istio-system.svc:15012".into()),
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a number: {e}"))
}

#[cfg(test)]
mod tests;

/// `--host-probes`: what the last hop does with the node's own connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HostProbes {
    /// Let them in without policy.
    Exempt,
    /// Judge them by the pod's policy.
    Policy,
}
