//! Istio's ztunnel settings read under Istio's names, so its DaemonSet's environment works
//! unchanged. Where a setting of ours has the same meaning under another name, Istio's
//! name is an alias: [`istio_overrides`] turns what the environment says in Istio's terms
//! into our variables before the command line is parsed. Ours win where both are set,
//! except `ISTIO_META_CLUSTER_ID`, which wins over `CLUSTER_ID` as it does upstream.
//! Istio's settings that do not apply here are listed in the README with why.

/// Istio's name → ours, for settings that mean the same.
pub const ALIASES: &[(&str, &str)] = &[
    // The mark on ztunnel's own sockets (upstream's default 1337 is ours too).
    ("PACKET_MARK", "PROXY_MARK"),
    // The validity asked of the CA for workload certificates.
    ("SECRET_TTL", "WORKLOAD_CERT_TTL"),
    // How long live connections get to finish once ztunnel is told to stop.
    ("CONNECTION_TERMINATION_DEADLINE", "DRAIN_TIMEOUT"),
    // The file of the bearer token for the CA and xDS.
    ("AUTH_TOKEN", "CA_TOKEN_FILE"),
    // TCP keepalive idle time of HBONE connections (180 s either way).
    ("KEEPALIVE_TIME", "HBONE_TCP_KEEPALIVE"),
];

/// The Istio release this proxy stands in for: `ISTIO_META_ISTIO_VERSION` when the
/// deployment sets it (Istio's chart does; it is also what istiod is told), else our own
/// version. For `istio_build` and `/config_dump`.
pub fn istio_version() -> String {
    std::env::var("ISTIO_META_ISTIO_VERSION").unwrap_or_else(|_| env!("CARGO_PKG_VERSION").into())
}

/// What to do to the environment before parsing, and what to warn about once logging is up.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Our variables to set, with their values.
    pub set: Vec<(String, String)>,
    pub warnings: Vec<String>,
    /// Settings that cannot be read: the start fails with these.
    pub errors: Vec<String>,
}

/// The fields of Istio's `ProxyConfig` (`PROXY_CONFIG`, YAML or JSON) that Istio's ztunnel
/// reads; others are ignored, as there.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyConfig {
    discovery_address: Option<String>,
    proxy_admin_port: Option<u16>,
    stats_port: Option<u16>,
    concurrency: Option<u16>,
    #[serde(default)]
    proxy_metadata: std::collections::BTreeMap<String, String>,
}

/// Reads Istio's names through `get` (the environment) and says which of ours to set.
pub fn istio_overrides(get: impl Fn(&str) -> Option<String>) -> Overrides {
    let mut out = Overrides::default();
    let set = |ours: &str, value: String, out: &mut Overrides| {
        if get(ours).is_none() {
            out.set.push((ours.to_string(), value));
        }
    };
    for (istio, ours) in ALIASES {
        if let Some(v) = get(istio) {
            set(ours, v, &mut out);
        }
    }
    // Upstream's drain deadline from the pod's grace period when no deadline is given: a
    // few seconds short of it, so ztunnel ends its connections itself before the kubelet
    // kills it.
    if get("CONNECTION_TERMINATION_DEADLINE").is_none() {
        if let Some(v) = get("TERMINATION_GRACE_PERIOD_SECONDS") {
            match v.trim().parse::<u64>() {
                Ok(secs) => {
                    let deadline = if secs > 10 {
                        secs - 5
                    } else {
                        secs.saturating_sub(1)
                    };
                    set("DRAIN_TIMEOUT", format!("{}s", deadline.max(1)), &mut out);
                }
                Err(_) => out.warnings.push(format!(
                    "TERMINATION_GRACE_PERIOD_SECONDS={v:?} is not a number of seconds: ignored"
                )),
            }
        }
    }
    if let Some(id) = get("ISTIO_META_CLUSTER_ID") {
        out.set.retain(|(k, _)| k != "CLUSTER_ID");
        out.set.push(("CLUSTER_ID".to_string(), id));
    }
    if let Some(text) = get("PROXY_CONFIG").filter(|t| !t.trim().is_empty()) {
        match serde_yaml::from_str::<ProxyConfig>(&text) {
            Ok(pc) => proxy_config(pc, &set, &mut out),
            Err(e) => out.errors.push(format!(
                "PROXY_CONFIG is not a ProxyConfig (YAML or JSON): {e}"
            )),
        }
    }
    let extra = super::istio_settings::read(&get);
    out.set.extend(extra.set);
    out.warnings.extend(extra.warnings);
    out.errors.extend(extra.errors);
    if get("XDS_ON_DEMAND").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        out.warnings.push(
            "XDS_ON_DEMAND=true: on-demand xDS is not implemented; every workload and service \
             is subscribed to, as with false"
                .to_string(),
        );
    }
    out
}

/// `PROXY_CONFIG`'s fields as our settings: the xDS address (`https://` added to a bare
/// `host:port`, as istiod writes it), the admin and metrics ports, the worker threads, and
/// `proxyMetadata` as `ISTIO_META_*` (the prefix added where it is missing, as upstream
/// strips it), all where the environment does not say otherwise.
fn proxy_config(pc: ProxyConfig, set: &impl Fn(&str, String, &mut Overrides), out: &mut Overrides) {
    if let Some(a) = pc.discovery_address.filter(|a| !a.is_empty()) {
        let url = if a.contains("://") {
            a
        } else {
            format!("https://{a}")
        };
        set("XDS_ADDRESS", url, out);
    }
    if let Some(p) = pc.proxy_admin_port {
        set("ADMIN_ADDR", format!("127.0.0.1:{p}"), out);
    }
    if let Some(p) = pc.stats_port {
        set("METRICS_ADDR", format!("0.0.0.0:{p}"), out);
    }
    if let Some(n) = pc.concurrency.filter(|n| *n > 0) {
        set("ZTUNNEL_WORKER_THREADS", n.to_string(), out);
    }
    for (k, v) in pc.proxy_metadata {
        let name = k.strip_prefix("ISTIO_META_").unwrap_or(&k).to_string();
        set(&format!("ISTIO_META_{name}"), v, out);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn run(env: &[(&str, &str)]) -> Overrides {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        istio_overrides(|k| env.get(k).cloned())
    }

    fn set(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn istio_names_set_ours() {
        let o = run(&[
            ("PACKET_MARK", "1337"),
            ("SECRET_TTL", "12h"),
            ("CONNECTION_TERMINATION_DEADLINE", "7s"),
        ]);
        assert_eq!(
            o.set,
            set(&[
                ("PROXY_MARK", "1337"),
                ("WORKLOAD_CERT_TTL", "12h"),
                ("DRAIN_TIMEOUT", "7s"),
            ])
        );
        assert!(o.warnings.is_empty());
    }

    #[test]
    fn ours_win_where_both_are_set() {
        let o = run(&[("PACKET_MARK", "1337"), ("PROXY_MARK", "0x539")]);
        assert!(o.set.is_empty(), "{o:?}");
    }

    /// Upstream's rule: 5 s short of a grace period over 10 s, else 1 s short, at least 1 s;
    /// an explicit deadline wins.
    #[test]
    fn the_grace_period_gives_the_drain_deadline() {
        for (grace, want) in [
            ("30", "25s"),
            ("11", "6s"),
            ("10", "9s"),
            ("1", "1s"),
            ("0", "1s"),
        ] {
            let o = run(&[("TERMINATION_GRACE_PERIOD_SECONDS", grace)]);
            assert_eq!(o.set, set(&[("DRAIN_TIMEOUT", want)]), "grace {grace}");
        }
        let o = run(&[
            ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
            ("CONNECTION_TERMINATION_DEADLINE", "3s"),
        ]);
        assert_eq!(o.set, set(&[("DRAIN_TIMEOUT", "3s")]));
        let o = run(&[("TERMINATION_GRACE_PERIOD_SECONDS", "soon")]);
        assert!(o.set.is_empty());
        assert_eq!(o.warnings.len(), 1);
    }

    #[test]
    fn istio_meta_cluster_id_wins() {
        let o = run(&[("ISTIO_META_CLUSTER_ID", "east"), ("CLUSTER_ID", "west")]);
        assert_eq!(o.set, set(&[("CLUSTER_ID", "east")]));
    }

    #[test]
    fn on_demand_xds_is_warned_about() {
        assert_eq!(run(&[("XDS_ON_DEMAND", "true")]).warnings.len(), 1);
        assert!(run(&[("XDS_ON_DEMAND", "false")]).warnings.is_empty());
    }

    #[test]
    fn proxy_config_fields_become_settings() {
        let o = run(&[(
            "PROXY_CONFIG",
            "discoveryAddress: istiod.istio-system.svc:15012\nproxyAdminPort: 15100\n\
             statsPort: 15120\nconcurrency: 4\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n  \
             FOO: bar\nholdApplicationUntilProxyStarts: true\n",
        )]);
        assert!(o.errors.is_empty(), "{o:?}");
        let got: HashMap<_, _> = o.set.into_iter().collect();
        assert_eq!(got["XDS_ADDRESS"], "https://istiod.istio-system.svc:15012");
        assert_eq!(got["ADMIN_ADDR"], "127.0.0.1:15100");
        assert_eq!(got["METRICS_ADDR"], "0.0.0.0:15120");
        assert_eq!(got["ZTUNNEL_WORKER_THREADS"], "4");
        assert_eq!(got["ISTIO_META_DNS_CAPTURE"], "true");
        assert_eq!(got["ISTIO_META_FOO"], "bar");
    }

    #[test]
    fn the_environment_wins_and_json_reads_too() {
        let o = run(&[
            (
                "PROXY_CONFIG",
                r#"{"discoveryAddress": "https://cp:15012", "statsPort": 9}"#,
            ),
            ("XDS_ADDRESS", "https://other:15012"),
        ]);
        assert_eq!(
            o.set,
            vec![("METRICS_ADDR".to_string(), "0.0.0.0:9".to_string())]
        );
    }

    #[test]
    fn a_bad_proxy_config_stops_the_start() {
        let o = run(&[("PROXY_CONFIG", "statsPort: [not a port")]);
        assert_eq!(o.errors.len(), 1, "{o:?}");
        assert!(run(&[("PROXY_CONFIG", "  ")]).errors.is_empty());
    }
}
