//! `config`: the settings this proxy runs with, under upstream's names and in upstream's
//! value shapes (durations as `{secs, nanos}`, addresses as `{"Localhost": [ipv6, port]}`
//! or `{"SocketAddr": "ip:port"}`, root certificates as `{"File": path}` or a variant
//! name). Where upstream has a setting this proxy has no use for, it shows the value that
//! says so (no in-pod socket, no SOCKS5; `dnsProxy` is whether `--dns-proxy-addr` is set). Built once at start.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::RunArgs;

pub fn config(args: &RunArgs) -> Value {
    let (dns_cfg, dns_opts) = super::dns::resolver();
    let listen = |port: u16| format!("[::]:{port}");
    let identity = (!args.pod_name.is_empty() && !args.pod_namespace.is_empty()).then(|| {
        let sa = std::env::var("SERVICE_ACCOUNT").unwrap_or_else(|_| "ztunnel".into());
        (
            format!(
                "spiffe://{}/ns/{}/sa/{sa}",
                args.trust_domain, args.pod_namespace
            ),
            json!({"name": args.pod_name, "namespace": args.pod_namespace, "serviceAccount": sa}),
        )
    });
    let tcp_keepalive = args.hbone_limits.hbone_tcp_keepalive;
    let mut c = json!({
        "proxy": true,
        "dnsProxy": args.dns_proxy_addr.is_some(),
        "windowSize": args.hbone_limits.http2_stream_window_size,
        "connectionWindowSize": args.hbone_limits.http2_connection_window_size,
        "frameSize": args.hbone_limits.http2_frame_size,
        "poolMaxStreamsPerConn": args.pool_max_streams_per_connection,
        "poolUnusedReleaseTimeout": duration(args.pool_unused_release_timeout),
        "socks5Addr": null,
        "adminAddr": address(args.admin_addr),
        "statsAddr": address(args.metrics_addr),
        "readinessAddr": address(args.readiness_addr),
        "inboundAddr": listen(args.inbound_hbone_port),
        "inboundPlaintextAddr": listen(args.inbound_plaintext_port),
        "outboundAddr": listen(args.outbound_port),
        // Upstream's default when no DNS proxy listens (`dnsProxy` false).
        "dnsProxyAddr": match args.dns_proxy_addr {
            Some(a) => json!(address(a)),
            None => json!({"Localhost": [false, 15053]}),
        },
        "illegalPorts": [args.inbound_plaintext_port, args.outbound_port, args.inbound_hbone_port],
        "network": args.network,
        "localNode": args.node_name,
        // One proxy for every pod of the node.
        "proxyMode": "Shared",
        "proxyWorkloadInformation": null,
        "clusterId": args.cluster_id,
        "clusterDomain": args.cluster_domain,
        "caAddress": args.ca_address,
        "caRootCert": root_cert(args.ca_root_cert.as_deref(), args.ca_address.is_some()),
        "altCaHostname": args.ca_tls_name,
        "xdsAddress": args.xds_address,
        "xdsRootCert": root_cert(args.xds_root_cert.as_deref(), args.xds_address.is_some()),
        "altXdsHostname": args.xds_tls_name,
        "preferedServiceNamespace": args.preferred_service_namespace,
    });
    let more = json!({
        "secretTtl": duration(args.workload_cert_ttl),
        "xdsOnDemand": false,
        "fakeCa": false,
        "fakeSelfInbound": false,
        "selfTerminationDeadline": duration(args.drain_timeout),
        "proxyMetadata": args.istio_meta,
        "numWorkerThreads": worker_threads(args.worker_threads),
        // Inbound connections reach the pod from the client's own address.
        "requireOriginalSource": true,
        "proxyArgs": std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        "dnsResolverCfg": dns_cfg,
        "dnsResolverOpts": dns_opts,
        // Pods are captured with eBPF, not handed over a socket by the CNI agent.
        "inpodUds": "",
        "inpodPortReuse": false,
        "packetMark": args.proxy_mark,
        "socketConfig": {
            "keepaliveTime": duration(tcp_keepalive),
            "keepaliveInterval": duration(args.hbone_limits.hbone_tcp_keepalive_interval),
            "keepaliveRetries": args.hbone_limits.hbone_tcp_keepalive_retries,
            "keepaliveEnabled": !tcp_keepalive.is_zero(),
            "userTimeoutEnabled": args.hbone_limits.hbone_tcp_user_timeout,
        },
        "xdsHeaders": headers("XDS_HEADER_"),
        "caHeaders": headers("CA_HEADER_"),
        // Application tunnels (PROXY protocol to the pod) are not implemented.
        "localhostAppTunnel": false,
        "ztunnelIdentity": identity.as_ref().map(|(id, _)| id),
        "ztunnelWorkload": identity.as_ref().map(|(_, w)| w),
        "ipv6Enabled": true,
        "crlPath": null,
        "enableEnhancedBaggage": true,
    });
    if let (Value::Object(c), Value::Object(more)) = (&mut c, more) {
        c.extend(more);
    }
    c
}

/// Upstream's `[name, value]` pairs of the extra headers sent to the control plane (read
/// from the environment as the clients read them; an invalid one stopped the start).
fn headers(prefix: &str) -> Value {
    json!(crate::config::istio_settings::headers(prefix, std::env::vars()).unwrap_or_default())
}

fn duration(d: Duration) -> Value {
    json!({"secs": d.as_secs(), "nanos": d.subsec_nanos()})
}

/// A loopback address is upstream's `Localhost` (with whether it is IPv6's too), any
/// other an explicit `SocketAddr`.
fn address(a: SocketAddr) -> Value {
    if a.ip().is_loopback() {
        json!({"Localhost": [a.is_ipv6(), a.port()]})
    } else {
        json!({"SocketAddr": a.to_string()})
    }
}

/// `{"File": path}` for a root given as a file; `Default` (the system's roots) for a
/// server given without one; `Static` where no server is asked (the built-in CA, or no
/// xDS), as upstream's built-in test CA shows.
fn root_cert(file: Option<&std::path::Path>, server: bool) -> Value {
    match file {
        Some(p) => json!({"File": p}),
        None if server => json!("Default"),
        None => json!("Static"),
    }
}

fn worker_threads(n: usize) -> usize {
    match n {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn upstream_names_and_shapes() {
        let cli = crate::config::Cli::try_parse_from([
            "ztunnel",
            "run",
            "--node-name",
            "node-a",
            "--ca-address",
            "https://istiod:15012",
            "--ca-root-cert",
            "/etc/root.pem",
        ])
        .unwrap();
        let crate::config::Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let c = config(&args);
        assert_eq!(c["localNode"], "node-a");
        assert_eq!(c["adminAddr"], json!({"Localhost": [false, 15000]}));
        assert_eq!(
            c["statsAddr"]["SocketAddr"]
                .as_str()
                .map(|s| s.ends_with(":15020")),
            Some(true)
        );
        assert_eq!(c["caRootCert"], json!({"File": "/etc/root.pem"}));
        assert_eq!(c["xdsRootCert"], "Static");
        assert_eq!(c["secretTtl"]["secs"], 86400);
        assert_eq!(c["proxyMode"], "Shared");
        assert!(c["dnsResolverOpts"]["ndots"].is_number());
        assert_eq!(c["illegalPorts"], json!([15006, 15001, 15008]));
    }
}
