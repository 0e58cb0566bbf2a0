//! `config.dnsResolverCfg` and `config.dnsResolverOpts`: the resolver settings upstream's
//! DNS proxy forwards with (hickory's, read from `/etc/resolv.conf`). This proxy has no
//! DNS proxy (`config.dnsProxy` is false); it shows the system resolver the same way,
//! with the options upstream would use, so the dump reads alike.

use serde_json::{json, Value};

/// What `/etc/resolv.conf` says that hickory takes from it.
#[derive(Debug, Default, PartialEq, Eq)]
struct ResolvConf {
    name_servers: Vec<std::net::IpAddr>,
    search: Vec<String>,
    domain: Option<String>,
    ndots: u64,
    timeout: u64,
    attempts: u64,
}

fn parse(text: &str) -> ResolvConf {
    // resolv.conf(5)'s defaults.
    let mut c = ResolvConf {
        ndots: 1,
        timeout: 5,
        attempts: 2,
        ..Default::default()
    };
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => c.name_servers.extend(
                words
                    .next()
                    .and_then(|w| w.parse::<std::net::IpAddr>().ok()),
            ),
            Some("search") => c.search = words.map(str::to_string).collect(),
            Some("domain") => c.domain = words.next().map(str::to_string),
            Some("options") => {
                for opt in words {
                    let num = |key: &str| opt.strip_prefix(key).and_then(|v| v.parse().ok());
                    if let Some(n) = num("ndots:") {
                        c.ndots = n;
                    } else if let Some(n) = num("timeout:") {
                        c.timeout = n;
                    } else if let Some(n) = num("attempts:") {
                        c.attempts = n;
                    }
                }
            }
            _ => {}
        }
    }
    c
}

/// (`dnsResolverCfg`, `dnsResolverOpts`).
pub fn resolver() -> (Value, Value) {
    render(&parse(
        &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    ))
}

fn render(c: &ResolvConf) -> (Value, Value) {
    let servers: Vec<Value> = c
        .name_servers
        .iter()
        .map(|ip| {
            let conn =
                |proto: &str| json!({"bind_addr": null, "port": 53, "protocol": {"type": proto}});
            json!({
                "connections": [conn("udp"), conn("tcp")],
                "ip": ip,
                "trust_negative_responses": true,
            })
        })
        .collect();
    let cfg = json!({"domain": c.domain, "name_servers": servers, "search": c.search});
    // hickory's defaults, with upstream's two changes (cache size, both families).
    let opts = json!({
        "allow_answers": [],
        "attempts": c.attempts,
        "avoid_local_udp_ports": [],
        "cache_size": 4096,
        "case_randomization": false,
        "deny_answers": [],
        "edns0": false,
        "edns_payload_len": 1232,
        "ip_strategy": "Ipv4AndIpv6",
        "max_active_requests": 32,
        "ndots": c.ndots,
        "negative_max_ttl": null,
        "negative_min_ttl": null,
        "num_concurrent_reqs": 2,
        "os_port_selection": false,
        "positive_max_ttl": null,
        "positive_min_ttl": null,
        "preserve_intermediates": true,
        "recursion_desired": true,
        "server_ordering_strategy": "QueryStatistics",
        "timeout": c.timeout,
        "trust_anchor": null,
        "try_tcp_on_error": false,
        "use_hosts_file": "Auto",
    });
    (cfg, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_resolv_conf_as_hickory_does() {
        let c = parse(
            "# comment\nnameserver 10.96.0.10\nnameserver fd00::a\nsearch a.svc b.svc\n\
             options ndots:5 timeout:2\n",
        );
        assert_eq!(c.name_servers.len(), 2);
        assert_eq!(c.search, ["a.svc", "b.svc"]);
        assert_eq!((c.ndots, c.timeout, c.attempts), (5, 2, 2));
        let (cfg, opts) = render(&c);
        assert_eq!(cfg["name_servers"][1]["ip"], "fd00::a");
        assert_eq!(
            cfg["name_servers"][0]["connections"][1]["protocol"]["type"],
            "tcp"
        );
        assert_eq!(cfg["domain"], Value::Null);
        assert_eq!(opts["ndots"], 5);
    }
}
