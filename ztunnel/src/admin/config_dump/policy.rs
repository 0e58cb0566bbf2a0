//! Authorization policies as Istio's ztunnel writes them in `/config_dump`: rules as
//! nested lists (rules → clauses → matches), each match with only its non-empty fields,
//! string matches tagged by kind (`{"Exact": …}`, and `{"Presence": []}`).

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::policy::{Action, Authorization, Match, Scope, ServiceAccountMatch, StringMatch};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDump<'a> {
    name: &'a str,
    namespace: &'a str,
    scope: Scope,
    action: Action,
    rules: Vec<Vec<Vec<MatchDump<'a>>>>,
    dry_run: bool,
}

impl<'a> PolicyDump<'a> {
    pub fn new(p: &'a Authorization) -> Self {
        PolicyDump {
            name: &p.name,
            namespace: &p.namespace,
            scope: p.scope,
            action: p.action,
            rules: p
                .rules
                .iter()
                .map(|r| {
                    r.clauses
                        .iter()
                        .map(|c| c.matches.iter().map(MatchDump).collect())
                        .collect()
                })
                .collect(),
            dry_run: p.dry_run,
        }
    }
}

#[derive(Debug)]
struct MatchDump<'a>(&'a Match);

impl Serialize for MatchDump<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m = self.0;
        let mut out = s.serialize_map(None)?;
        let accounts = |v: &'_ [ServiceAccountMatch]| v.to_vec();
        let nets = |v: &[ipnet::IpNet]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        macro_rules! field {
            ($key:literal, $list:expr, $conv:expr) => {
                if !$list.is_empty() {
                    out.serialize_entry($key, &$conv(&$list))?;
                }
            };
        }
        field!("namespaces", m.namespaces, tagged);
        field!("notNamespaces", m.not_namespaces, tagged);
        field!("serviceAccounts", m.service_accounts, accounts);
        field!("notServiceAccounts", m.not_service_accounts, accounts);
        field!("principals", m.principals, tagged);
        field!("notPrincipals", m.not_principals, tagged);
        field!("sourceIps", m.source_ips, nets);
        field!("notSourceIps", m.not_source_ips, nets);
        field!("destinationIps", m.destination_ips, nets);
        field!("notDestinationIps", m.not_destination_ips, nets);
        field!("destinationPorts", m.destination_ports, <[u16]>::to_vec);
        field!(
            "notDestinationPorts",
            m.not_destination_ports,
            <[u16]>::to_vec
        );
        out.end()
    }
}

fn tagged(v: &[StringMatch]) -> Vec<Tagged<'_>> {
    v.iter().map(Tagged).collect()
}

/// Upstream's enum spelling: a one-key object; `Presence` carries an empty list.
#[derive(Debug)]
struct Tagged<'a>(&'a StringMatch);

impl Serialize for Tagged<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        match self.0 {
            StringMatch::Exact(v) => m.serialize_entry("Exact", v)?,
            StringMatch::Prefix(v) => m.serialize_entry("Prefix", v)?,
            StringMatch::Suffix(v) => m.serialize_entry("Suffix", v)?,
            StringMatch::Presence => m.serialize_entry("Presence", &[(); 0])?,
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Clause, Rule};
    use serde_json::json;

    #[test]
    fn only_the_fields_a_match_uses_in_upstream_spelling() {
        let p = Authorization {
            name: "allow".into(),
            namespace: "default".into(),
            scope: Scope::WorkloadSelector,
            action: Action::Allow,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        principals: vec![StringMatch::Exact("cluster.local/ns/a/sa/b".into())],
                        namespaces: vec![StringMatch::Presence],
                        source_ips: vec!["10.0.0.0/8".parse().unwrap()],
                        destination_ports: vec![8080],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: false,
        };
        assert_eq!(
            serde_json::to_value(PolicyDump::new(&p)).unwrap(),
            json!({
                "name": "allow",
                "namespace": "default",
                "scope": "WorkloadSelector",
                "action": "Allow",
                "rules": [[[{
                    "namespaces": [{"Presence": []}],
                    "principals": [{"Exact": "cluster.local/ns/a/sa/b"}],
                    "sourceIps": ["10.0.0.0/8"],
                    "destinationPorts": [8080],
                }]]],
                "dryRun": false,
            })
        );
    }
}
