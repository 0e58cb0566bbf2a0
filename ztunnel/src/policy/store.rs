//! The set of known policies, indexed so that finding those that apply to a workload does
//! not scan them all.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Authorization, Scope};
use crate::state::Workload;

/// Istio's default root namespace: policies there apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone)]
pub struct PolicyStore {
    root_namespace: String,
    /// `namespace/name` → policy.
    by_key: BTreeMap<String, Arc<Authorization>>,
    /// Namespace → keys of NAMESPACE-scoped policies in it.
    by_namespace: BTreeMap<String, BTreeSet<String>>,
    /// Keys of GLOBAL-scoped policies.
    global: BTreeSet<String>,
}

impl Default for PolicyStore {
    fn default() -> Self {
        PolicyStore::new(DEFAULT_ROOT_NAMESPACE)
    }
}

impl PolicyStore {
    pub fn new(root_namespace: &str) -> Self {
        PolicyStore {
            root_namespace: root_namespace.to_string(),
            by_key: BTreeMap::new(),
            by_namespace: BTreeMap::new(),
            global: BTreeSet::new(),
        }
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Adds or replaces the policy with the same `namespace/name`.
    pub fn insert(&mut self, policy: Authorization) {
        let key = policy.key();
        self.remove(&key);
        // istiod already sends root-namespace policies as GLOBAL; a hand-written
        // NAMESPACE-scoped one there means the same thing in Istio.
        let global = policy.scope == Scope::Global
            || (policy.scope == Scope::Namespace && policy.namespace == self.root_namespace);
        if global {
            self.global.insert(key.clone());
        } else if policy.scope == Scope::Namespace {
            self.by_namespace
                .entry(policy.namespace.clone())
                .or_default()
                .insert(key.clone());
        }
        self.by_key.insert(key, Arc::new(policy));
    }

    /// Removes a policy by `namespace/name`; returns it if it was there.
    pub fn remove(&mut self, key: &str) -> Option<Arc<Authorization>> {
        let old = self.by_key.remove(key)?;
        self.global.remove(key);
        if let Some(set) = self.by_namespace.get_mut(&old.namespace) {
            set.remove(key);
            if set.is_empty() {
                self.by_namespace.remove(&old.namespace);
            }
        }
        Some(old)
    }

    pub fn clear(&mut self) {
        self.by_key.clear();
        self.by_namespace.clear();
        self.global.clear();
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Authorization>> {
        self.by_key.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.by_key.values()
    }

    /// The policies that apply to `workload`: global ones, its namespace's, and the
    /// WORKLOAD_SELECTOR ones it lists (the control plane did the label selection).
    /// Each policy once, in key order.
    pub fn applicable<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Arc<Authorization>> {
        let namespaced = self
            .by_namespace
            .get(&workload.namespace)
            .into_iter()
            .flatten();
        // Like upstream, the workload's list is authoritative whatever the listed policy's
        // scope; unknown keys (policy not received yet) are skipped below.
        let selected = workload.authorization_policies.iter();
        let keys: BTreeSet<&String> = self
            .global
            .iter()
            .chain(namespaced)
            .chain(selected)
            .collect();
        keys.into_iter().filter_map(|k| self.by_key.get(k))
    }
}
