//! The standalone configuration file (`LOCAL_XDS_PATH`): workloads, services and
//! authorization policies in upstream Istio ztunnel's local YAML format, so that files
//! written for upstream load here unchanged.
//!
//! ```yaml
//! workloads:
//! - uid: cluster1//Pod/default/sleep
//!   name: sleep
//!   namespace: default
//!   serviceAccount: sleep          # default: "default"
//!   trustDomain: cluster.local     # default
//!   workloadIps: ["10.0.1.5"]
//!   protocol: HBONE                # or TCP (default): outside the mesh
//!   node: node-a
//!   status: Healthy                # or Unhealthy
//!   services:
//!     default/echo.default.svc.cluster.local: {80: 8080}
//!   authorizationPolicies: [default/allow-sleep]
//! services:
//! - name: echo
//!   namespace: default
//!   hostname: echo.default.svc.cluster.local
//!   vips: ["/10.96.0.10"]          # network/ip
//!   ports: {80: 8080}
//! policies:
//! - name: allow-sleep
//!   namespace: default
//!   scope: WorkloadSelector        # Global | Namespace | WorkloadSelector
//!   action: Allow                  # Allow | Deny
//!   rules:                         # rules (OR) > clauses (AND) > matches (OR)
//!   - - - principals: ["cluster.local/ns/default/sa/sleep"]
//!   - - - serviceAccounts: [{namespace: default, serviceAccount: curl}]   # or: a 2nd rule
//! ```
//!
//! Upstream's older form, a bare list of workloads with a single `workloadIp`, is accepted
//! too. Errors name the line, column and field.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::yaml::locate;
use crate::policy::Authorization;
use crate::state::{
    NamespacedHostname, NetworkAddress, Service, StateStore, Workload, DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_TRUST_DOMAIN,
};

/// A validated local configuration, already in the state's types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalConfig {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<Authorization>,
    /// Things accepted but worth telling (ignored upstream fields, dangling references).
    pub warnings: Vec<String>,
}

/// A config that cannot be used. `Display` names the file, line, column and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    /// 1-based, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Includes the field path and position, e.g.
    /// `workloads[1].workloadIps[0]: "10.0.0.x" is not an IP address at line 7 column 5`.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(p) => write!(f, "invalid local config {}: {}", p.display(), self.message),
            None => write!(f, "invalid local config: {}", self.message),
        }
    }
}

impl LocalConfig {
    /// Parses and validates a config.
    pub fn from_yaml(src: &str) -> Result<LocalConfig, ConfigError> {
        let root: Option<Root> = serde_yaml::from_str(src).map_err(|e| {
            let loc = e.location();
            let mut message = e.to_string();
            // serde_yaml leaves the position out of some messages (e.g. top-level ones).
            if let Some(l) = loc.as_ref().filter(|_| !message.contains(" at line ")) {
                message.push_str(&format!(" at line {} column {}", l.line(), l.column()));
            }
            ConfigError {
                file: None,
                line: loc.as_ref().map(|l| l.line()),
                column: loc.as_ref().map(|l| l.column()),
                message,
            }
        })?;
        Validator::new(src, root.unwrap_or_default()).run()
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<LocalConfig, ConfigError> {
        let path = path.as_ref();
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            line: None,
            column: None,
            message: format!("cannot read: {e}"),
        })?;
        LocalConfig::from_yaml(&src).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            ..e
        })
    }

    /// Replaces the store's whole content with this config.
    pub fn apply_to(&self, store: &StateStore) {
        store.replace_all(
            self.workloads.iter().cloned(),
            self.services.iter().cloned(),
            self.policies.iter().cloned(),
        );
    }
}

// ---- the file's shape ----

#[derive(Default)]
struct Root {
    file: LocalFile,
    /// Upstream's older form: the file is a list of workloads.
    legacy_list: bool,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalFile {
    #[serde(default)]
    workloads: Vec<LocalWorkload>,
    #[serde(default)]
    services: Vec<LocalService>,
    #[serde(default)]
    policies: Vec<Authorization>,
}

impl<'de> Deserialize<'de> for Root {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Root;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map with workloads, services and policies (or a list of workloads)")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Root, A::Error> {
                let file = LocalFile::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Root {
                    file,
                    legacy_list: false,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Root, A::Error> {
                let workloads = Vec::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Root {
                    file: LocalFile {
                        workloads,
                        ..Default::default()
                    },
                    legacy_list: true,
                })
            }
        }
        d.deserialize_any(V)
    }
}

mod schema;
use schema::{LocalService, LocalWorkload};

// ---- checks across resources, and conversion ----

struct Validator<'a> {
    src: &'a str,
    root: Root,
    warnings: Vec<String>,
}

impl<'a> Validator<'a> {
    fn new(src: &'a str, root: Root) -> Self {
        Validator {
            src,
            root,
            warnings: Vec::new(),
        }
    }

    /// An error about `section[index]`, at `needle` within it if found.
    fn error(
        &self,
        section: &str,
        index: usize,
        field: &str,
        needle: Option<&str>,
        msg: String,
    ) -> ConfigError {
        let key = (!self.root.legacy_list || section != "workloads").then_some(section);
        let loc = locate(self.src, key, index, needle);
        let place = match key {
            Some(s) => format!("{s}[{index}]"),
            None => format!("[{index}]"),
        };
        let at = loc
            .map(|(l, c)| format!(" at line {l} column {c}"))
            .unwrap_or_default();
        ConfigError {
            file: None,
            line: loc.map(|l| l.0),
            column: loc.map(|l| l.1),
            message: format!("{place}.{field}: {msg}{at}"),
        }
    }

    fn run(mut self) -> Result<LocalConfig, ConfigError> {
        let file = std::mem::take(&mut self.root.file);
        let workloads = self.workloads(file.workloads)?;
        let services = self.services(file.services)?;
        let policies = self.policies(file.policies)?;

        // Dangling references are legal over xDS (resources arrive in any order), so they
        // are warnings here, not errors.
        let svc_keys: Vec<_> = services.iter().map(Service::key).collect();
        let pol_keys: Vec<_> = policies.iter().map(Authorization::key).collect();
        for w in &workloads {
            for s in w.services.keys().filter(|s| !svc_keys.contains(s)) {
                self.warnings
                    .push(format!("workload {}: service {s} is not defined", w.uid));
            }
            for p in w
                .authorization_policies
                .iter()
                .filter(|p| !pol_keys.contains(p))
            {
                self.warnings
                    .push(format!("workload {}: policy {p} is not defined", w.uid));
            }
        }
        self.check_waypoints(&workloads, &services);
        Ok(LocalConfig {
            workloads,
            services,
            policies,
            warnings: self.warnings,
        })
    }

    /// A waypoint the file cannot send traffic to refuses that traffic at run time: say so
    /// now (a warning, like any dangling reference).
    fn check_waypoints(&mut self, workloads: &[Workload], services: &[Service]) {
        // Resolving needs a state built from a copy of the file: only when there is a
        // waypoint to resolve, not on every load of a large file without any.
        let any = workloads.iter().any(|w| w.waypoint.is_some())
            || services.iter().any(|s| s.waypoint.is_some());
        if !any {
            return;
        }
        let store = StateStore::default();
        store.replace_all(workloads.iter().cloned(), services.iter().cloned(), []);
        let state = store.snapshot();
        let named = workloads
            .iter()
            .map(|w| (format!("workload {}", w.uid), &w.waypoint))
            .chain(
                services
                    .iter()
                    .map(|s| (format!("service {}", s.key()), &s.waypoint)),
            );
        for (owner, gw) in named {
            let unspecified = IpAddr::from([0, 0, 0, 0]);
            if let Some(Err(e)) = gw.as_ref().map(|gw| state.waypoint(gw, unspecified)) {
                self.warnings.push(format!("{owner}: {e}"));
            }
        }
    }

    fn workloads(&mut self, raw: Vec<LocalWorkload>) -> Result<Vec<Workload>, ConfigError> {
        let mut by_uid: HashMap<String, usize> = HashMap::new();
        let mut by_addr: HashMap<NetworkAddress, usize> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, lw) in raw.into_iter().enumerate() {
            let w = self.workload(i, lw)?;
            if let Some(first) = by_uid.insert(w.uid.clone(), i) {
                let msg = format!("duplicate uid {:?} (also workloads[{first}])", w.uid);
                return Err(self.error("workloads", i, "uid", Some(&w.uid), msg));
            }
            for addr in w.network_addresses() {
                if let Some(first) = by_addr.insert(addr.clone(), i) {
                    let msg = format!("address {addr} is also used by workloads[{first}]");
                    let ip = addr.address.to_string();
                    return Err(self.error("workloads", i, "workloadIps", Some(&ip), msg));
                }
            }
            out.push(w);
        }
        Ok(out)
    }

    fn workload(&mut self, i: usize, lw: LocalWorkload) -> Result<Workload, ConfigError> {
        if lw.uid.is_empty() && lw.name.is_empty() {
            let msg = "a workload needs a uid or a name".to_string();
            return Err(self.error("workloads", i, "uid", None, msg));
        }
        let ignored = [
            ("networkGateway", lw.network_gateway.is_some()),
            ("applicationTunnel", lw.application_tunnel.is_some()),
            ("nativeTunnel", lw.native_tunnel.is_some()),
        ];
        self.warn_ignored("workloads", i, &ignored);
        for port in lw.services.values().flat_map(|m| m.keys()) {
            if *port == 0 {
                let msg = "service port 0 is not a port".to_string();
                return Err(self.error("workloads", i, "services", Some("0:"), msg));
            }
        }
        // A workload with no address is reached by looking this name up at connect time.
        if !lw.hostname.is_empty() {
            if let Err(msg) = crate::state::check_hostname(&lw.hostname) {
                return Err(self.error("workloads", i, "hostname", Some(&lw.hostname), msg));
            }
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in lw.workload_ip.into_iter().chain(lw.workload_ips) {
            if !ips.contains(&ip.0) {
                ips.push(ip.0);
            }
        }
        let namespace = lw.namespace.0;
        let cluster_id = if lw.cluster_id.is_empty() {
            "Kubernetes".to_string()
        } else {
            lw.cluster_id
        };
        // Upstream-style uid when none is given, so hand-written files can stay short.
        let uid = if lw.uid.is_empty() {
            format!("{cluster_id}//Pod/{namespace}/{}", lw.name)
        } else {
            lw.uid
        };
        Ok(Workload {
            uid,
            name: lw.name,
            namespace,
            trust_domain: lw
                .trust_domain
                .map_or(DEFAULT_TRUST_DOMAIN.to_string(), |t| t.0),
            service_account: lw
                .service_account
                .map_or(DEFAULT_SERVICE_ACCOUNT.to_string(), |s| s.0),
            workload_ips: ips,
            network: lw.network,
            protocol: lw.protocol,
            network_mode: lw.network_mode,
            node: lw.node,
            status: lw.status,
            authorization_policies: lw.authorization_policies.into_iter().map(|p| p.0).collect(),
            services: lw.services,
            waypoint: lw.waypoint,
            hostname: lw.hostname,
            workload_name: lw.workload_name,
            workload_type: lw.workload_type,
            canonical_name: lw.canonical_name,
            canonical_revision: lw.canonical_revision,
            cluster_id,
            locality: lw.locality.into(),
            capacity: lw.capacity,
            labels: Default::default(),
        })
    }

    fn services(&mut self, raw: Vec<LocalService>) -> Result<Vec<Service>, ConfigError> {
        let mut by_key: HashMap<NamespacedHostname, usize> = HashMap::new();
        let mut by_vip: HashMap<(NetworkAddress, String), usize> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, ls) in raw.into_iter().enumerate() {
            let ignored = [("endpoints", ls.endpoints.is_some())];
            self.warn_ignored("services", i, &ignored);
            if ls.ports.contains_key(&0) {
                let msg = "service port 0 is not a port".to_string();
                return Err(self.error("services", i, "ports", Some("0:"), msg));
            }
            let svc = Service {
                name: ls.name,
                namespace: ls.namespace.0,
                hostname: ls.hostname.0,
                vips: ls.vips,
                ports: ls.ports,
                subject_alt_names: ls.subject_alt_names,
                waypoint: ls.waypoint,
                weighted_waypoints: ls.weighted_waypoints,
                cidr_vips: ls.cidr_vips.into_iter().map(|c| c.0).collect(),
                load_balancing: ls.load_balancer.map(Into::into),
                ip_families: ls.ip_families.into(),
                canonical: ls.canonical,
                visibility: ls.visibility.into(),
            };
            if let Some(first) = by_key.insert(svc.key(), i) {
                let msg = format!("service {} is also defined by services[{first}]", svc.key());
                return Err(self.error("services", i, "hostname", Some(&svc.hostname), msg));
            }
            // Services of different namespaces may share a VIP (the client's namespace
            // picks); two of one namespace would be a coin toss.
            for vip in &svc.vips {
                if let Some(first) = by_vip.insert((vip.clone(), svc.namespace.clone()), i) {
                    let msg = format!(
                        "VIP {vip} is also used by services[{first}] of the same namespace"
                    );
                    let ip = vip.address.to_string();
                    return Err(self.error("services", i, "vips", Some(&ip), msg));
                }
            }
            out.push(svc);
        }
        Ok(out)
    }

    fn policies(&mut self, raw: Vec<Authorization>) -> Result<Vec<Authorization>, ConfigError> {
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for (i, p) in raw.iter().enumerate() {
            for (field, value) in [("name", &p.name), ("namespace", &p.namespace)] {
                if value.is_empty() || value.contains('/') {
                    let msg = format!("{value:?} is not a valid {field}");
                    return Err(self.error("policies", i, field, Some(&format!("{field}:")), msg));
                }
            }
            if let Some(first) = by_key.insert(p.key(), i) {
                let msg = format!("policy {} is also defined by policies[{first}]", p.key());
                return Err(self.error("policies", i, "name", Some(&p.name), msg));
            }
        }
        Ok(raw)
    }

    fn warn_ignored(&mut self, section: &str, i: usize, fields: &[(&str, bool)]) {
        for (field, _) in fields.iter().filter(|(_, present)| *present) {
            self.warnings.push(format!(
                "{section}[{i}].{field}: not supported by this proxy, ignored"
            ));
        }
    }
}

#[cfg(test)]
mod tests;
