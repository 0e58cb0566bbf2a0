//! Istio's ztunnel settings that are more than a new name for one of ours: worker threads
//! from the pod's CPU limit, extra headers for the control plane, keepalive switches, and
//! the settings this proxy cannot honour — refused at start where ignoring them would
//! weaken security (revocation lists, a compliance policy), warned about otherwise.

/// What `istio_names::istio_overrides` adds for these settings.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Extra {
    pub set: Vec<(String, String)>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

pub fn read(get: &impl Fn(&str) -> Option<String>) -> Extra {
    let mut out = Extra::default();
    match worker_threads(get) {
        Ok(Some(n)) => out
            .set
            .push(("ZTUNNEL_WORKER_THREADS".into(), n.to_string())),
        Ok(None) => {}
        Err(e) => out.errors.push(e),
    }
    let is_true = |k: &str| get(k).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let is_false = |k: &str| get(k).is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
    // Upstream's keepalive switch; the idle time is KEEPALIVE_TIME (an alias).
    if is_false("KEEPALIVE_ENABLED") && get("HBONE_TCP_KEEPALIVE").is_none() {
        out.set.push(("HBONE_TCP_KEEPALIVE".into(), "0s".into()));
    }
    let nonempty = |k: &str| get(k).filter(|v| !v.trim().is_empty());
    if let Some(p) = nonempty("CRL_PATH") {
        out.errors.push(format!(
            "CRL_PATH={p}: certificate revocation lists are not supported by this proxy; \
             refusing to start rather than accept certificates the list revokes"
        ));
    }
    if let Some(p) = nonempty("COMPLIANCE_POLICY") {
        out.errors.push(format!(
            "COMPLIANCE_POLICY={p}: compliance policies (FIPS cipher restrictions) are not \
             supported by this proxy (TLS 1.3 with AES-GCM only, ring)"
        ));
    }
    if is_false("ENABLE_PROXY") {
        out.errors.push(
            "ENABLE_PROXY=false: this ztunnel is its node's proxy and has no mode without it"
                .into(),
        );
    }
    // Istio's DNS switch and address (proxy metadata): the DNS proxy runs, and takes the
    // enrolled pods' DNS (captured unless DNS_CAPTURE=false).
    let dns_addr = get("ISTIO_META_DNS_PROXY_ADDR").filter(|v| !v.trim().is_empty());
    if get("DNS_PROXY_ADDR").is_none() {
        match dns_addr {
            Some(a) => out.set.push(("DNS_PROXY_ADDR".into(), a)),
            None if is_true("ISTIO_META_DNS_CAPTURE") => out
                .set
                .push(("DNS_PROXY_ADDR".into(), "127.0.0.1:15053".into())),
            None => {}
        }
    }
    let ignored: [(&str, bool, &str); 3] = [
        (
            "TLS12_ENABLED=true",
            is_true("TLS12_ENABLED"),
            "HBONE stays TLS 1.3 only (Istio's proxies all speak it)",
        ),
        (
            "UNSTABLE_ENABLE_SOCKS5=true",
            is_true("UNSTABLE_ENABLE_SOCKS5"),
            "there is no SOCKS5 listener",
        ),
        (
            "ENABLE_RESPONSE_BAGGAGE=true",
            is_true("ENABLE_RESPONSE_BAGGAGE"),
            "HBONE responses carry no baggage header",
        ),
    ];
    for (what, set, why) in ignored {
        if set {
            out.warnings.push(format!("{what} is ignored: {why}"));
        }
    }
    out
}

/// `ZTUNNEL_WORKER_THREADS` as Istio reads it: a count, or a percentage of the CPUs
/// (`50%`, rounded up). Unset, the pod's CPU limit (`ZTUNNEL_RESOURCE_CPU_LIMIT`, a
/// Kubernetes quantity such as `1500m`, raised to the request) decides. `None`: nothing to
/// change (a plain count, or nothing set).
fn worker_threads(get: &impl Fn(&str) -> Option<String>) -> Result<Option<usize>, String> {
    let request = cpu_quantity(get, "ZTUNNEL_RESOURCE_CPU_REQUEST")?.unwrap_or(0);
    match get("ZTUNNEL_WORKER_THREADS") {
        Some(v) => {
            let Some(pct) = v.trim().strip_suffix('%') else {
                return Ok(None);
            };
            let pct: f64 = pct
                .trim()
                .parse()
                .ok()
                .filter(|p| *p > 0.0 && *p <= 100.0)
                .ok_or_else(|| {
                    format!("ZTUNNEL_WORKER_THREADS={v:?}: a percentage must be above 0 and at most 100")
                })?;
            let cpus = cpu_count(get)?;
            Ok(Some(((cpus as f64 * pct / 100.0).ceil() as usize).max(1)))
        }
        None => Ok(cpu_quantity(get, "ZTUNNEL_RESOURCE_CPU_LIMIT")?.map(|l| l.max(request))),
    }
}

/// The CPUs this pod may use: its limit, else `ZTUNNEL_CPU_LIMIT` (the downward API's
/// count), else the machine's.
fn cpu_count(get: &impl Fn(&str) -> Option<String>) -> Result<usize, String> {
    if let Some(l) = cpu_quantity(get, "ZTUNNEL_RESOURCE_CPU_LIMIT")? {
        return Ok(l);
    }
    match get("ZTUNNEL_CPU_LIMIT") {
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("ZTUNNEL_CPU_LIMIT={v:?} is not a number of CPUs")),
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

/// A Kubernetes CPU quantity (`2`, `1.5`, `500m`) as whole CPUs, rounded up.
fn cpu_quantity(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<usize>, String> {
    let Some(raw) = get(name).filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let v = raw.trim();
    let cores = match v.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().map(|m| m / 1000.0),
        None => v.parse::<f64>(),
    };
    match cores {
        Ok(c) if c.is_finite() && c > 0.0 => Ok(Some(c.ceil() as usize)),
        _ => Err(format!(
            "{name}={raw:?} is not a positive CPU quantity (e.g. 2, 1.5, 500m)"
        )),
    }
}

/// The extra metadata Istio sends to the control plane: every `<prefix>NAME=value`
/// variable becomes the header `name: value` (`XDS_HEADER_` for xDS, `CA_HEADER_` for the
/// CA). A name or value gRPC cannot carry is an error naming the variable.
pub fn headers(
    prefix: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (k, v) in vars {
        let Some(name) = k.strip_prefix(prefix) else {
            continue;
        };
        let name = name.to_ascii_lowercase();
        if name.parse::<tonic::metadata::AsciiMetadataKey>().is_err() {
            return Err(format!("{k}: {name:?} is not a header name"));
        }
        if v.parse::<tonic::metadata::AsciiMetadataValue>().is_err() {
            return Err(format!("{k}: the value is not a valid header value"));
        }
        out.push((name, v));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn run(env: &[(&str, &str)]) -> Extra {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        read(&|k: &str| env.get(k).cloned())
    }

    fn threads(env: &[(&str, &str)]) -> Option<String> {
        let e = run(env);
        assert!(e.errors.is_empty(), "{e:?}");
        e.set
            .into_iter()
            .find(|(k, _)| k == "ZTUNNEL_WORKER_THREADS")
            .map(|(_, v)| v)
    }

    #[test]
    fn worker_threads_follow_istios_rules() {
        type Env<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Env, Option<&str>)] = &[
            (&[("ZTUNNEL_WORKER_THREADS", "3")], None),
            (
                &[
                    ("ZTUNNEL_WORKER_THREADS", "50%"),
                    ("ZTUNNEL_CPU_LIMIT", "8"),
                ],
                Some("4"),
            ),
            (
                &[
                    ("ZTUNNEL_WORKER_THREADS", "10%"),
                    ("ZTUNNEL_CPU_LIMIT", "8"),
                ],
                Some("1"),
            ),
            (
                &[
                    ("ZTUNNEL_WORKER_THREADS", "50%"),
                    ("ZTUNNEL_RESOURCE_CPU_LIMIT", "1500m"),
                    ("ZTUNNEL_CPU_LIMIT", "64"),
                ],
                Some("1"),
            ),
            (&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "2500m")], Some("3")),
            (
                &[
                    ("ZTUNNEL_RESOURCE_CPU_LIMIT", "1"),
                    ("ZTUNNEL_RESOURCE_CPU_REQUEST", "2"),
                ],
                Some("2"),
            ),
            (&[], None),
        ];
        for (env, want) in cases {
            assert_eq!(threads(env).as_deref(), *want, "{env:?}");
        }
        for bad in [
            &[("ZTUNNEL_WORKER_THREADS", "0%")][..],
            &[("ZTUNNEL_WORKER_THREADS", "150%")],
            &[("ZTUNNEL_RESOURCE_CPU_LIMIT", "lots")],
            &[
                ("ZTUNNEL_WORKER_THREADS", "5%"),
                ("ZTUNNEL_CPU_LIMIT", "-1"),
            ],
        ] {
            let e = run(bad);
            assert_eq!(e.errors.len(), 1, "{bad:?}: {e:?}");
            assert!(e.errors[0].contains(bad[bad.len() - 1].0), "{e:?}");
        }
    }

    #[test]
    fn settings_that_cannot_be_honoured_stop_or_warn() {
        let e = run(&[
            ("CRL_PATH", "/etc/crl.pem"),
            ("COMPLIANCE_POLICY", "fips-140-2"),
        ]);
        assert_eq!(e.errors.len(), 2, "{e:?}");
        assert!(e.errors[0].contains("CRL_PATH") && e.errors[0].contains("refusing"));
        assert_eq!(run(&[("ENABLE_PROXY", "false")]).errors.len(), 1);
        assert!(run(&[("ENABLE_PROXY", "true"), ("CRL_PATH", "")])
            .errors
            .is_empty());
        let e = run(&[
            ("TLS12_ENABLED", "true"),
            ("ISTIO_META_DNS_CAPTURE", "true"),
        ]);
        assert_eq!(e.warnings.len(), 1, "{e:?}");
        assert!(e.errors.is_empty());
    }

    #[test]
    fn istios_dns_metadata_starts_the_dns_proxy() {
        let e = run(&[("ISTIO_META_DNS_CAPTURE", "true")]);
        assert_eq!(
            e.set,
            vec![("DNS_PROXY_ADDR".into(), "127.0.0.1:15053".into())]
        );
        assert!(e.warnings.is_empty(), "{e:?}");
        let e = run(&[
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_META_DNS_PROXY_ADDR", "127.0.0.1:15054"),
        ]);
        assert_eq!(
            e.set,
            vec![("DNS_PROXY_ADDR".into(), "127.0.0.1:15054".into())]
        );
        let e = run(&[
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("DNS_PROXY_ADDR", "0.0.0.0:53"),
        ]);
        assert!(e.set.is_empty());
        assert!(run(&[("ISTIO_META_DNS_CAPTURE", "false")]).set.is_empty());
    }

    #[test]
    fn keepalive_can_be_switched_off() {
        let e = run(&[("KEEPALIVE_ENABLED", "false")]);
        assert_eq!(e.set, vec![("HBONE_TCP_KEEPALIVE".into(), "0s".into())]);
        assert!(run(&[("KEEPALIVE_ENABLED", "true")]).set.is_empty());
    }

    #[test]
    fn headers_come_from_prefixed_variables() {
        let vars = [
            ("XDS_HEADER_X-Tenant".to_string(), "blue".to_string()),
            ("XDS_HEADER_AUTHORITY_HINT".into(), "a".into()),
            ("CA_HEADER_X-Other".into(), "no".into()),
        ];
        assert_eq!(
            headers("XDS_HEADER_", vars.clone()).unwrap(),
            vec![
                ("authority_hint".to_string(), "a".to_string()),
                ("x-tenant".into(), "blue".into())
            ]
        );
        let e = headers("XDS_HEADER_", [("XDS_HEADER_bad name".into(), "v".into())]).unwrap_err();
        assert!(e.contains("XDS_HEADER_bad name"), "{e}");
        let e = headers("CA_HEADER_", [("CA_HEADER_x".into(), "line\nbreak".into())]).unwrap_err();
        assert!(e.contains("CA_HEADER_x"), "{e}");
    }
}
