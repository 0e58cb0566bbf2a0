//! `deploy/`: every manifest parses as the real Kubernetes types without losing a field
//! (a misspelt key would be dropped by the typed round trip), and the Helm chart, whose
//! templates are those manifests with plain `{{ .Values.x }}` substitutions, renders to
//! exactly them with its default values.
//!
//! No helm binary here, and no Go-template engine is written: a template using anything
//! but a value or `.Release.Namespace` fails this test, which keeps the chart simple
//! enough to be checked this way.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The documents of a multi-document YAML text, as JSON values.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Value {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc:#}"));
    serde_json::to_value(typed).unwrap()
}

fn check(doc: &Value) {
    let kind = doc["kind"].as_str().expect("kind");
    let again = match kind {
        "DaemonSet" => round_trip::<DaemonSet>(doc),
        "ServiceAccount" => round_trip::<ServiceAccount>(doc),
        "ClusterRole" => round_trip::<ClusterRole>(doc),
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(doc),
        "ConfigMap" => round_trip::<ConfigMap>(doc),
        other => panic!("no type for kind {other}: add it here"),
    };
    assert_eq!(
        &again, doc,
        "{kind} lost or changed fields in the typed round trip"
    );
}

fn all_manifests() -> Vec<Value> {
    yaml_files(&deploy_dir())
        .iter()
        .flat_map(|f| documents(&std::fs::read_to_string(f).unwrap()))
        .collect()
}

#[test]
fn k8s_manifests_parse_as_kubernetes_types() {
    let docs = all_manifests();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for want in [
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
    ] {
        assert!(kinds.contains(&want), "deploy/ has no {want}");
    }
    docs.iter().for_each(check);

    let ds: DaemonSet = serde_json::from_value(
        docs.iter()
            .find(|d| d["kind"] == "DaemonSet")
            .unwrap()
            .clone(),
    )
    .unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let c = &pod.containers[0];
    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_ne!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert_eq!(
        env,
        [
            "NODE_NAME",
            "POD_NAME",
            "POD_NAMESPACE",
            "INSTANCE_IP",
            "GLIBC_TUNABLES"
        ]
    );
    // The process tuning the image sets is the DaemonSet's too.
    let tunables = c.env.iter().flatten().find(|e| e.name == "GLIBC_TUNABLES");
    assert_eq!(
        tunables.and_then(|e| e.value.as_deref()),
        Some(dockerfile_env("GLIBC_TUNABLES").as_str()),
        "GLIBC_TUNABLES differs between deploy/daemonset.yaml and the Dockerfile"
    );
    let mounts: Vec<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/var/run/secrets/tokens"));
}

/// The value of `ENV <name>=<value>` in the repository's Dockerfile.
fn dockerfile_env(name: &str) -> String {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("../Dockerfile")).unwrap();
    let prefix = format!("ENV {name}=");
    dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no `{prefix}` line in the Dockerfile"))
        .trim()
        .to_string()
}

/// The configuration keys are flags `ztunnel run` knows.
#[test]
fn k8s_configmap_keys_are_run_flags() {
    use clap::CommandFactory;
    let cmd = crate::config::Cli::command();
    let run = cmd.find_subcommand("run").unwrap();
    let envs: Vec<String> = run
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().to_string())
        .collect();
    let cm = all_manifests()
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap")
        .unwrap();
    for key in cm["data"].as_object().unwrap().keys() {
        assert!(
            key == "RUST_LOG" || envs.contains(key),
            "ConfigMap key {key} is no `ztunnel run` environment variable"
        );
    }
}

/// Plain substitution: `{{ .Values.a.b }}` and `{{ .Release.Namespace }}` only.
fn render(template: &str, values: &Value) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("unclosed {{") + start;
        let expr = rest[start + 2..end].trim();
        let value = if expr == ".Release.Namespace" {
            Value::String("istio-system".into())
        } else {
            let path = expr
                .strip_prefix(".Values.")
                .unwrap_or_else(|| panic!("not a plain substitution: {expr}"));
            path.split('.').fold(values, |v, k| &v[k]).clone()
        };
        match value {
            Value::String(s) => out.push_str(&s),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::Bool(b) => out.push_str(&b.to_string()),
            other => panic!("{expr} is {other}: only scalars are substituted"),
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

#[test]
fn k8s_helm_chart_renders_the_manifests() {
    let chart = deploy_dir().join("helm/ztunnel");
    let values = documents(&std::fs::read_to_string(chart.join("values.yaml")).unwrap()).remove(0);
    let chart_meta =
        documents(&std::fs::read_to_string(chart.join("Chart.yaml")).unwrap()).remove(0);
    assert_eq!(chart_meta["apiVersion"], "v2");
    let templates = yaml_files(&chart.join("templates"));
    let names = |files: &[PathBuf]| -> Vec<String> {
        files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().to_string())
            .collect()
    };
    assert_eq!(
        names(&templates),
        names(&yaml_files(&deploy_dir())),
        "a template per manifest"
    );
    for t in &templates {
        let rendered = documents(&render(&std::fs::read_to_string(t).unwrap(), &values));
        let plain =
            documents(&std::fs::read_to_string(deploy_dir().join(t.file_name().unwrap())).unwrap());
        assert_eq!(
            rendered,
            plain,
            "{} with default values differs from deploy/",
            t.display()
        );
    }
    // And other values do land where they should.
    let mut other = values.clone();
    other["image"]["tag"] = "9.9".into();
    let ds = std::fs::read_to_string(chart.join("templates/daemonset.yaml")).unwrap();
    assert!(render(&ds, &other).contains("image: \"ztunnel-ebpf:9.9\""));
}
