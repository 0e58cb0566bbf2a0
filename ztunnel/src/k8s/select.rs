//! Which pods are enrolled: the facts of a pod that matter, and the rule.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use super::{
    DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE, REDIRECTION_ANNOTATION,
    REDIRECTION_ENABLED, SIDECAR_STATUS_ANNOTATION,
};

/// What enrollment needs of a pod. Kept instead of the whole object: small, and a
/// pod update that changes none of it (most of them) changes nothing here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    /// The Kubernetes uid: a recreated pod of the same name is another pod.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Value of `istio.io/dataplane-mode` on the pod.
    pub mode: Option<String>,
    pub sidecar: bool,
    pub host_network: bool,
    pub running: bool,
    /// All pod IPs (IPv4 and IPv6), in the API's order.
    pub ips: Vec<IpAddr>,
    /// Carries `ambient.istio.io/redirection: enabled`.
    pub annotated: bool,
}

/// Why a pod of this node is not enrolled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    NotAmbient,
    OptedOut,
    Sidecar,
    HostNetwork,
    NotRunning,
    NoAddress,
}

impl PodFacts {
    /// `None` for objects without identity (never sent by a real API server).
    pub fn of(pod: &Pod) -> Option<PodFacts> {
        let meta = &pod.metadata;
        let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k)).cloned();
        let annotation = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k)).cloned();
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = vec![];
        let listed = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|p| p.ip.as_str());
        // `podIP` is the first of `podIPs`; older API servers send only it.
        let single = status.and_then(|s| s.pod_ip.as_deref());
        for ip in listed.chain(single).filter_map(|s| s.parse().ok()) {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        Some(PodFacts {
            uid: meta.uid.clone()?,
            name: meta.name.clone()?,
            namespace: meta.namespace.clone()?,
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            mode: label(DATAPLANE_MODE_LABEL),
            sidecar: annotation(SIDECAR_STATUS_ANNOTATION).is_some(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            running: status.and_then(|s| s.phase.as_deref()) == Some("Running"),
            ips,
            annotated: annotation(REDIRECTION_ANNOTATION).as_deref() == Some(REDIRECTION_ENABLED),
        })
    }

    /// Istio's rule. `ns_labels` is `None` when the namespace is not known (yet).
    pub fn decide(&self, ns_labels: Option<&BTreeMap<String, String>>) -> Result<(), Skip> {
        let ns_ambient = ns_labels
            .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
            .map(String::as_str)
            == Some(DATAPLANE_MODE_AMBIENT);
        match self.mode.as_deref() {
            Some(DATAPLANE_MODE_NONE) => return Err(Skip::OptedOut),
            // A pod may opt in by itself, as in Istio.
            Some(DATAPLANE_MODE_AMBIENT) => {}
            _ if !ns_ambient => return Err(Skip::NotAmbient),
            _ => {}
        }
        if self.sidecar {
            return Err(Skip::Sidecar); // its sidecar already does mTLS
        }
        if self.host_network {
            return Err(Skip::HostNetwork); // its addresses are the node's
        }
        if !self.running {
            return Err(Skip::NotRunning);
        }
        if self.ips.is_empty() {
            return Err(Skip::NoAddress);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> PodFacts {
        PodFacts::of(&serde_json::from_value(json).unwrap()).unwrap()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "a", "namespace": "ns", "uid": "u1"},
            "spec": {"containers": [{"name": "c"}], "nodeName": "n"},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
        })
    }

    fn ambient() -> BTreeMap<String, String> {
        [(DATAPLANE_MODE_LABEL.to_string(), "ambient".to_string())].into()
    }

    #[test]
    fn k8s_rule_follows_istio() {
        let p = pod(base());
        assert_eq!(
            p.ips,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(p.service_account, "default");
        assert_eq!(p.decide(Some(&ambient())), Ok(()));
        assert_eq!(p.decide(Some(&BTreeMap::new())), Err(Skip::NotAmbient));
        assert_eq!(p.decide(None), Err(Skip::NotAmbient));

        let mut j = base();
        j["metadata"]["labels"] = serde_json::json!({DATAPLANE_MODE_LABEL: "none"});
        assert_eq!(pod(j.clone()).decide(Some(&ambient())), Err(Skip::OptedOut));
        j["metadata"]["labels"] = serde_json::json!({DATAPLANE_MODE_LABEL: "ambient"});
        assert_eq!(
            pod(j).decide(Some(&BTreeMap::new())),
            Ok(()),
            "pod-level opt-in"
        );

        let mut j = base();
        j["spec"]["hostNetwork"] = true.into();
        assert_eq!(pod(j).decide(Some(&ambient())), Err(Skip::HostNetwork));
        let mut j = base();
        j["status"]["phase"] = "Pending".into();
        assert_eq!(pod(j).decide(Some(&ambient())), Err(Skip::NotRunning));
        let mut j = base();
        j["status"] = serde_json::json!({"phase": "Running"});
        assert_eq!(pod(j).decide(Some(&ambient())), Err(Skip::NoAddress));
        let mut j = base();
        j["metadata"]["annotations"] =
            serde_json::json!({SIDECAR_STATUS_ANNOTATION: "{}", REDIRECTION_ANNOTATION: "enabled"});
        j["spec"]["serviceAccountName"] = "sa1".into();
        let p = pod(j);
        assert_eq!(p.decide(Some(&ambient())), Err(Skip::Sidecar));
        assert!(p.annotated);
        assert_eq!(p.service_account, "sa1");
    }

    #[test]
    fn k8s_single_pod_ip_of_older_servers() {
        let mut j = base();
        j["status"] = serde_json::json!({"phase": "Running", "podIP": "10.0.0.7"});
        assert_eq!(pod(j).ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
    }
}
