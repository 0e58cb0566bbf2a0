//! `staticConfig`: the local workload file (or `LOCAL_XDS` text) as this proxy read it,
//! in upstream's shape (workloads with their service port maps, policies, services). Read
//! again at each dump, as upstream does, so it shows the file as it is now; empty without
//! a local config.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::{policy::PolicyDump, service::ServiceDump, workload::LocalWorkloadDump};
use crate::xds::local::LocalConfig;

/// Where the local config comes from.
#[derive(Debug, Clone)]
pub enum LocalSource {
    File(PathBuf),
    Inline(String),
}

pub fn static_config(source: Option<&LocalSource>) -> Value {
    let cfg = match source.map(|s| match s {
        LocalSource::File(p) => LocalConfig::load(p),
        LocalSource::Inline(text) => LocalConfig::from_yaml(text),
    }) {
        None => LocalConfig::default(),
        Some(Ok(cfg)) => cfg,
        Some(Err(e)) => {
            // Upstream logs and dumps the rest; the reload path has already logged it.
            tracing::debug!("staticConfig: {e}");
            LocalConfig::default()
        }
    };
    render(&cfg)
}

fn render(cfg: &LocalConfig) -> Value {
    json!({
        "workloads": cfg.workloads.iter().map(LocalWorkloadDump::new).collect::<Vec<_>>(),
        "policies": cfg.policies.iter().map(PolicyDump::new).collect::<Vec<_>>(),
        "services": cfg.services.iter().map(|s| ServiceDump::new(s, None)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_in_upstreams_shape() {
        let cfg = LocalConfig::from_yaml(
            "workloads:\n- uid: u1\n  name: a\n  namespace: default\n  workloadIps: [10.1.0.2]\n  \
             services: {default/echo.default.svc.cluster.local: {80: 8080}}\n\
             services:\n- name: echo\n  namespace: default\n  hostname: echo.default.svc.cluster.local\n  \
             vips: [/10.96.0.10]\n  ports: {80: 8080}\n\
             policies:\n- name: p\n  namespace: default\n  scope: Namespace\n  rules: []\n",
        )
        .unwrap();
        let v = render(&cfg);
        assert_eq!(
            v["workloads"][0]["services"],
            json!({"default/echo.default.svc.cluster.local": {"80": 8080}})
        );
        assert_eq!(v["workloads"][0]["capacity"], 1);
        assert_eq!(v["services"][0]["endpoints"], json!({}));
        assert_eq!(v["policies"][0]["rules"], json!([]));
        assert_eq!(
            static_config(None),
            json!({"workloads": [], "policies": [], "services": []})
        );
        let inline = LocalSource::Inline("workloads: []\npolicies: []\n".into());
        assert_eq!(static_config(Some(&inline))["workloads"], json!([]));
    }
}
