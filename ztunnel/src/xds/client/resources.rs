//! What the xDS client holds, per type and resource name, and how a delta response changes
//! it. No I/O here: the connection loop feeds responses in and sends back what this says.

use std::collections::{BTreeMap, HashMap};

use crate::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::state::{NamespacedHostname, ProxyState, StateStore};
use crate::xds::convert::{decode_address, decode_authorization, AddressResource};

/// The resource types the client subscribes to, in subscription order.
pub const TYPE_URLS: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];

/// NACK messages are logged and shown on the admin page: keep them readable.
const MAX_NACK_DETAIL: usize = 4096;

/// Where a resource landed in the state. Remembered per resource name because a removal
/// carries only the name, and an `Address` name may be a workload uid or a service key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Workload(String),
    Service(NamespacedHostname),
    Policy(String),
}

#[derive(Debug, Clone)]
struct Held {
    version: String,
    key: Key,
}

/// The resources received and applied, by type URL then name.
#[derive(Debug, Default)]
pub struct Resources {
    by_type: BTreeMap<&'static str, HashMap<String, Held>>,
}

/// The result of applying one response.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub updated: usize,
    pub removed: usize,
    /// `(resource name, why)`; non-empty means the response is NACKed.
    pub rejected: Vec<(String, String)>,
}

impl Outcome {
    /// The NACK's `error_detail` message, if anything was rejected.
    pub fn nack_detail(&self) -> Option<String> {
        if self.rejected.is_empty() {
            return None;
        }
        let mut msg = format!("rejected {} resource(s): ", self.rejected.len());
        for (i, (name, why)) in self.rejected.iter().enumerate() {
            if i > 0 {
                msg.push_str("; ");
            }
            msg.push_str(&format!("{name}: {why}"));
            if msg.len() > MAX_NACK_DETAIL {
                let mut cut = MAX_NACK_DETAIL;
                while !msg.is_char_boundary(cut) {
                    cut -= 1;
                }
                msg.truncate(cut);
                msg.push_str("...");
                break;
            }
        }
        Some(msg)
    }
}

/// A resource decoded and converted, ready to apply.
#[allow(clippy::large_enum_variant)] // short-lived, one per resource
enum Item {
    Address(AddressResource),
    Policy(crate::policy::Authorization),
}

impl Resources {
    /// `name → version` of what is held for `type_url`: the `initial_resource_versions` of
    /// a new stream, so the server sends only what changed while we were away.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.by_type
            .get(type_url)
            .map(|m| {
                m.iter()
                    .map(|(n, h)| (n.clone(), h.version.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn count(&self, type_url: &str) -> usize {
        self.by_type.get(type_url).map_or(0, HashMap::len)
    }

    /// Applies a delta response to `store` in one state update. Valid resources and all
    /// removals are applied; an invalid resource is rejected and whatever was held under
    /// its name before stays, so one bad resource does not hold back the others.
    pub fn apply(&mut self, store: &StateStore, resp: &DeltaDiscoveryResponse) -> Outcome {
        let mut out = Outcome::default();
        let Some(type_url) = TYPE_URLS.into_iter().find(|t| *t == resp.type_url) else {
            out.rejected.push((
                String::new(),
                format!("not subscribed to type {:?}", resp.type_url),
            ));
            return out;
        };
        let mut items = Vec::with_capacity(resp.resources.len());
        for r in &resp.resources {
            if r.name.is_empty() {
                out.rejected
                    .push(("<unnamed>".into(), "resource without a name".into()));
                continue;
            }
            let Some(any) = &r.resource else {
                out.rejected
                    .push((r.name.clone(), "resource without a body".into()));
                continue;
            };
            let item = if type_url == ADDRESS_TYPE_URL {
                decode_address(any).map(Item::Address)
            } else {
                decode_authorization(any).map(Item::Policy)
            };
            match item {
                Ok(item) => items.push((r.name.clone(), r.version.clone(), item)),
                Err(e) => out.rejected.push((r.name.clone(), e.to_string())),
            }
        }
        if resp.removed_resources.is_empty() && items.is_empty() {
            return out;
        }
        let held = self.by_type.entry(type_url).or_default();
        store.update(|state| {
            for name in &resp.removed_resources {
                if let Some(old) = held.remove(name) {
                    remove_key(state, &old.key);
                    out.removed += 1;
                }
            }
            for (name, version, item) in items {
                let key = upsert(state, item);
                if let Some(old) = held.get(&name).filter(|old| old.key != key) {
                    // The name now means something else (a new uid): drop what it meant.
                    remove_key(state, &old.key);
                }
                held.insert(name, Held { version, key });
                out.updated += 1;
            }
        });
        out
    }
}

fn upsert(state: &mut ProxyState, item: Item) -> Key {
    match item {
        Item::Address(AddressResource::Workload(w)) => {
            let key = Key::Workload(w.uid.clone());
            state.upsert_workload(w);
            key
        }
        Item::Address(AddressResource::Service(s)) => {
            let key = Key::Service(s.key());
            state.upsert_service(s);
            key
        }
        Item::Policy(p) => {
            let key = Key::Policy(p.key());
            state.policies.insert(p);
            key
        }
    }
}

fn remove_key(state: &mut ProxyState, key: &Key) {
    match key {
        Key::Workload(uid) => {
            state.remove_workload(uid);
        }
        Key::Service(k) => {
            state.remove_service(k);
        }
        Key::Policy(k) => {
            state.policies.remove(k);
        }
    }
}
