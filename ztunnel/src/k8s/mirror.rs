//! A local copy of one watched collection, fed by kube's watcher events.
//!
//! Why not kube's reflector store: we keep only the facts enrollment needs, and we need
//! "synced" to be explicit so nothing is decided from a half-listed collection.

use std::collections::BTreeMap;

use kube::runtime::watcher::Event;

pub struct Mirror<T> {
    live: BTreeMap<String, T>,
    /// Objects of a (re-)list in progress; swapped in whole at `InitDone`, so a re-list
    /// after a watch error never shows a half-empty collection, and objects deleted
    /// while the watch was down disappear.
    listing: Option<BTreeMap<String, T>>,
    synced: bool,
}

impl<T> Default for Mirror<T> {
    fn default() -> Self {
        Mirror {
            live: BTreeMap::new(),
            listing: None,
            synced: false,
        }
    }
}

impl<T> Mirror<T> {
    /// Applies one watcher event; `facts` gives an object's key and what to keep of it
    /// (`None`: ignore the object).
    pub fn apply<K>(&mut self, event: Event<K>, facts: impl Fn(&K) -> Option<(String, T)>) {
        match event {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(obj) => {
                if let Some((key, value)) = facts(&obj) {
                    self.listing
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key, value);
                }
            }
            Event::InitDone => {
                self.live = self.listing.take().unwrap_or_default();
                self.synced = true;
            }
            Event::Apply(obj) => {
                if let Some((key, value)) = facts(&obj) {
                    self.live.insert(key, value);
                }
            }
            Event::Delete(obj) => {
                if let Some((key, _)) = facts(&obj) {
                    self.live.remove(&key);
                }
            }
        }
    }

    /// Listed completely at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn get(&self, key: &str) -> Option<&T> {
        self.live.get(key)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut T> {
        self.live.get_mut(key)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.live.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(s: &&str) -> Option<(String, usize)> {
        Some((s.to_string(), s.len()))
    }

    #[test]
    fn k8s_relist_replaces_atomically() {
        let mut m: Mirror<usize> = Mirror::default();
        assert!(!m.synced());
        for e in [
            Event::Init,
            Event::InitApply("a"),
            Event::InitApply("bb"),
            Event::InitDone,
        ] {
            m.apply(e, facts);
        }
        assert!(m.synced());
        m.apply(Event::Apply("ccc"), facts);
        m.apply(Event::Delete("a"), facts);
        assert_eq!(m.values().copied().collect::<Vec<_>>(), vec![2, 3]);
        // A re-list: the old content stays visible until it is complete.
        m.apply(Event::Init, facts);
        m.apply(Event::InitApply("dddd"), facts);
        assert_eq!(m.values().count(), 2);
        m.apply(Event::InitDone, facts);
        assert_eq!(m.values().copied().collect::<Vec<_>>(), vec![4]);
    }
}
