//! The L4 authorization policy model, shaped after Istio's `istio.security.Authorization`
//! xDS resource so a delta-xDS client can convert protos field by field:
//!
//! | proto (authorization.proto)                     | here                          |
//! |-------------------------------------------------|-------------------------------|
//! | `Authorization{name=1, namespace=2, scope=3, action=4, rules=5}` | [`Authorization`] |
//! | `Rule{clauses=1}` (older protos: `Group{rules=1}`)               | [`Rule`]          |
//! | `Clause{matches=2}` (older protos: `Rules{matches=2}`)           | [`Clause`]        |
//! | `Match{namespaces=1, not_namespaces=2, principals=3, not_principals=4, source_ips=5, not_source_ips=6, destination_ips=7, not_destination_ips=8, destination_ports=9, not_destination_ports=10, service_accounts=11, not_service_accounts=12}` | [`Match`] |
//! | `ServiceAccountMatch{namespace=1, serviceAccount=2}` | [`ServiceAccountMatch`] |
//! | `StringMatch{exact=1, prefix=2, suffix=3, presence=4}` | [`StringMatch`]        |
//! | `Address{address=1 (bytes), length=2}`          | `ipnet::IpNet`                |
//!
//! Semantics (Istio's): rules are OR-ed, clauses in a rule AND-ed, matches in a clause
//! OR-ed, and within a match the field kinds are AND-ed while the values of one kind are
//! OR-ed; a `not_*` list matches when none of its values does.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::Connection;
use crate::xds::yaml::deserialize_via_str;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    /// ALLOW when omitted, as in the proto.
    #[serde(default)]
    pub action: Action,
    /// Older protos called this field `groups`; the YAML accepts both names.
    #[serde(default, alias = "groups")]
    pub rules: Vec<Rule>,
    /// Evaluated and logged, never enforced.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Applies to every workload (istiod sends root-namespace policies with this scope).
    #[default]
    #[serde(alias = "GLOBAL")]
    Global,
    /// Applies to the workloads in the policy's namespace.
    #[serde(alias = "NAMESPACE")]
    Namespace,
    /// Applies to the workloads that list the policy in `authorizationPolicies`.
    #[serde(alias = "WORKLOAD_SELECTOR")]
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    #[default]
    #[serde(alias = "ALLOW")]
    Allow,
    #[serde(alias = "DENY")]
    Deny,
}

/// Matches when all its clauses match (so a rule without clauses matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// Matches when any of its non-empty matches matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Clause {
    pub matches: Vec<Match>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    /// Source identities by namespace and service account (istiod writes an
    /// AuthorizationPolicy's `serviceAccounts` source field here).
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Source identities written without `spiffe://`, as Istio writes them
    /// (`cluster.local/ns/default/sa/sleep`).
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    #[serde(with = "cidr_list")]
    pub source_ips: Vec<IpNet>,
    #[serde(with = "cidr_list")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(with = "cidr_list")]
    pub destination_ips: Vec<IpNet>,
    #[serde(with = "cidr_list")]
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// One service account, matched as Istio matches it: exactly the namespace and the name
/// of the source's identity, whatever its trust domain. A source without an identity
/// (plaintext) matches no service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

impl ServiceAccountMatch {
    pub fn matches(&self, id: Option<&crate::identity::Identity>) -> bool {
        id.is_some_and(|id| {
            id.namespace == self.namespace && id.service_account == self.service_account
        })
    }
}

/// String matcher. In YAML either upstream's tagged form (`{Exact: x}`, `{Prefix: x}`,
/// `{Suffix: x}`, `{Presence: {}}`) or Istio's wildcard shorthand: `*` (any non-empty),
/// `x*` (prefix), `*x` (suffix), anything else exact.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    /// Istio's wildcard syntax (`AuthorizationPolicy` principals and namespaces).
    pub fn from_wildcard(s: &str) -> StringMatch {
        if s == "*" {
            StringMatch::Presence
        } else if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            StringMatch::Suffix(p.to_string())
        } else {
            StringMatch::Exact(s.to_string())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(e) => value == e,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }

    /// Matches a principal pattern against an identity given without `spiffe://`.
    /// Patterns written with the scheme are tolerated: it is stripped from them too.
    fn matches_principal(&self, principal: &str) -> bool {
        let strip = |s: &str| s.strip_prefix("spiffe://").unwrap_or(s).to_string();
        match self {
            StringMatch::Exact(e) => principal == strip(e),
            StringMatch::Prefix(p) => principal.starts_with(&strip(p)),
            other => other.matches(principal),
        }
    }
}

/// Always the tagged form (`{Exact: x}`), which reads back unambiguously.
impl Serialize for StringMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        match self {
            StringMatch::Exact(v) => m.serialize_entry("Exact", v)?,
            StringMatch::Prefix(v) => m.serialize_entry("Prefix", v)?,
            StringMatch::Suffix(v) => m.serialize_entry("Suffix", v)?,
            StringMatch::Presence => m.serialize_entry("Presence", &BTreeMap::<u8, u8>::new())?,
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringMatch;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string (with optional `*` wildcard) or one of {Exact|Prefix|Suffix|Presence: ...}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringMatch, E> {
                Ok(StringMatch::from_wildcard(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringMatch, A::Error> {
                let kind: String = map
                    .next_key()?
                    .ok_or_else(|| de::Error::custom("empty string match"))?;
                let m = match kind.as_str() {
                    "Exact" | "exact" => StringMatch::Exact(map.next_value()?),
                    "Prefix" | "prefix" => StringMatch::Prefix(map.next_value()?),
                    "Suffix" | "suffix" => StringMatch::Suffix(map.next_value()?),
                    "Presence" | "presence" => {
                        map.next_value::<de::IgnoredAny>()?;
                        StringMatch::Presence
                    }
                    other => {
                        return Err(de::Error::unknown_variant(
                            other,
                            &["Exact", "Prefix", "Suffix", "Presence"],
                        ))
                    }
                };
                if map.next_key::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("a string match has exactly one kind"));
                }
                Ok(m)
            }
            /// YAML's tagged form, which upstream's own files use: `!Exact x`,
            /// `!Presence []`.
            fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<StringMatch, A::Error> {
                use de::VariantAccess;
                let (kind, value): (String, _) = data.variant()?;
                Ok(match kind.as_str() {
                    "Exact" => StringMatch::Exact(value.newtype_variant()?),
                    "Prefix" => StringMatch::Prefix(value.newtype_variant()?),
                    "Suffix" => StringMatch::Suffix(value.newtype_variant()?),
                    "Presence" => {
                        value.newtype_variant::<de::IgnoredAny>()?;
                        StringMatch::Presence
                    }
                    other => {
                        return Err(de::Error::unknown_variant(
                            other,
                            &["Exact", "Prefix", "Suffix", "Presence"],
                        ))
                    }
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A CIDR, or a bare IP meaning the single address.
struct Cidr(IpNet);

deserialize_via_str!(Cidr, "an IP address or CIDR", |s: &str| {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map(Cidr)
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))
});

mod cidr_list {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|n| n.to_string()))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Ok(Vec::<Cidr>::deserialize(d)?
            .into_iter()
            .map(|c| c.0)
            .collect())
    }
}

impl Authorization {
    /// The key workloads use to name the policy in `authorizationPolicies`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the connection matches the policy's rules (whatever its action).
    /// A policy without rules matches nothing: an ALLOW policy with no rules denies all.
    pub fn matches(&self, conn: &Connection) -> bool {
        self.rules.iter().any(|rule| rule.matches(conn))
    }
}

impl Rule {
    fn matches(&self, conn: &Connection) -> bool {
        self.clauses.iter().all(|c| c.matches(conn))
    }
}

impl Clause {
    fn matches(&self, conn: &Connection) -> bool {
        // An empty clause constrains nothing; empty matches inside a clause are skipped
        // (they come from fields this proxy cannot evaluate, e.g. L7 ones).
        self.matches.is_empty()
            || self
                .matches
                .iter()
                .any(|m| !m.is_empty() && m.matches(conn))
    }
}

/// Positive list: any value matches (or the list is empty). Negative list: none matches.
fn check<T>(pos: &[T], neg: &[T], mut pred: impl FnMut(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&mut pred)) && !neg.iter().any(pred)
}

impl Match {
    pub fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    pub fn matches(&self, conn: &Connection) -> bool {
        // Without an identity (plaintext source) principal and namespace are "", which no
        // positive matcher accepts, and every negative matcher lets through.
        let principal = conn
            .src_identity
            .as_ref()
            .map(|id| id.to_string().trim_start_matches("spiffe://").to_string())
            .unwrap_or_default();
        let namespace = conn
            .src_identity
            .as_ref()
            .map(|id| id.namespace.as_str())
            .unwrap_or("");
        check(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == conn.dst_port
        }) && check(&self.source_ips, &self.not_source_ips, |n| {
            n.contains(&conn.src_ip)
        }) && check(&self.destination_ips, &self.not_destination_ips, |n| {
            n.contains(&conn.dst_ip)
        }) && check(&self.namespaces, &self.not_namespaces, |m| {
            m.matches(namespace)
        }) && check(&self.service_accounts, &self.not_service_accounts, |m| {
            m.matches(conn.src_identity.as_ref())
        }) && check(&self.principals, &self.not_principals, |m| {
            m.matches_principal(&principal)
        })
    }
}
