//! Numeric identities. An identity stands for every address that no policy
//! can tell apart: pods of one namespace with the same labels share one, as
//! do the addresses of one ipBlock region.
//!
//! Two refinements keep NetworkPolicy exact while rules stay keyed by
//! identity: an address's identity also records which policy ipBlocks it
//! falls in (so a pod inside an ipBlock matches it while a same-labelled pod
//! outside does not), and which port numbers its named ports resolve to, for
//! the names egress rules use (named ports resolve per destination pod).
//! Allocation is pure; the store persists the table so numbers are stable.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{
    abi::{ID_CIDR_MIN, ID_HOST, ID_LOCAL_MIN, ID_WORLD},
    policy::Labels,
};

/// Everything that distinguishes one identity from another.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct IdentityKey {
    /// The endpoint's namespace; `None` for addresses that are not
    /// endpoints (ipBlock regions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Canonical forms of the policy ipBlocks the addresses fall in.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub blocks: BTreeSet<String>,
    /// `name/PROTO=port` for named ports that egress rules refer to.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub ports: BTreeSet<String>,
}

impl IdentityKey {
    pub fn is_endpoint(&self) -> bool {
        self.namespace.is_some()
    }

    /// Short human form: `ns:shop app=web [in 10.0.0.0/8]`.
    pub fn describe(&self) -> String {
        let mut s = match &self.namespace {
            Some(ns) => {
                let labels: Vec<String> = self
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                if labels.is_empty() {
                    format!("{ns} (no labels)")
                } else {
                    format!("{ns} {}", labels.join(","))
                }
            }
            None => "cidr".to_owned(),
        };
        if !self.blocks.is_empty() {
            s.push_str(&format!(
                " in [{}]",
                self.blocks.iter().cloned().collect::<Vec<_>>().join(" ")
            ));
        }
        if !self.ports.is_empty() {
            s.push_str(&format!(
                " ports [{}]",
                self.ports.iter().cloned().collect::<Vec<_>>().join(" ")
            ));
        }
        s
    }
}

/// The persisted identity table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityTable {
    entries: Vec<(IdentityKey, u32)>,
    next_local: u32,
    next_cidr: u32,
    #[serde(skip)]
    index: BTreeMap<IdentityKey, u32>,
    /// Number → position in `entries`.
    #[serde(skip)]
    by_id: BTreeMap<u32, usize>,
}

impl Default for IdentityTable {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            next_local: ID_LOCAL_MIN,
            next_cidr: ID_CIDR_MIN,
            index: BTreeMap::new(),
            by_id: BTreeMap::new(),
        }
    }
}

impl IdentityTable {
    /// Rebuild the lookup index after deserialising.
    pub fn reindex(&mut self) {
        self.index = self.entries.iter().cloned().collect();
        self.by_id = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (_, id))| (*id, i))
            .collect();
    }

    /// The identity of `key`, allocating a new number if it has none.
    pub fn get_or_allocate(&mut self, key: &IdentityKey) -> u32 {
        if let Some(id) = self.index.get(key) {
            return *id;
        }
        // An ipBlock region no policy block covers is simply the world.
        if !key.is_endpoint() && key.blocks.is_empty() {
            return ID_WORLD;
        }
        let id = if key.is_endpoint() {
            let id = self.next_local;
            self.next_local = if id + 1 >= ID_CIDR_MIN {
                ID_LOCAL_MIN
            } else {
                id + 1
            };
            id
        } else {
            let id = self.next_cidr;
            self.next_cidr = id.checked_add(1).unwrap_or(ID_CIDR_MIN);
            id
        };
        // Numbers wrap only after 16 million allocations; skip any still held.
        let id = if self.by_id.contains_key(&id) {
            self.first_free(key.is_endpoint())
        } else {
            id
        };
        self.index.insert(key.clone(), id);
        self.by_id.insert(id, self.entries.len());
        self.entries.push((key.clone(), id));
        id
    }

    fn first_free(&self, local: bool) -> u32 {
        let (lo, hi) = if local {
            (ID_LOCAL_MIN, ID_CIDR_MIN)
        } else {
            (ID_CIDR_MIN, u32::MAX)
        };
        (lo..hi).find(|i| !self.by_id.contains_key(i)).unwrap_or(lo)
    }

    /// Forget identities no address uses any more.
    pub fn retain_used(&mut self, used: &BTreeSet<u32>) {
        self.entries.retain(|(_, id)| used.contains(id));
        self.reindex();
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IdentityKey, u32)> {
        self.entries.iter().map(|(k, id)| (k, *id))
    }

    pub fn key_of(&self, id: u32) -> Option<&IdentityKey> {
        self.by_id.get(&id).map(|&i| &self.entries[i].0)
    }
}

/// A human name for any identity number, reserved ones included.
pub fn reserved_name(id: u32) -> Option<&'static str> {
    match id {
        0 => Some("any"),
        ID_HOST => Some("host"),
        ID_WORLD => Some("world"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ns: &str, app: &str) -> IdentityKey {
        IdentityKey {
            namespace: Some(ns.into()),
            labels: [("app".to_string(), app.to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn same_key_same_number_and_numbers_survive_serialisation() {
        let mut t = IdentityTable::default();
        let a = t.get_or_allocate(&ep("x", "a"));
        let b = t.get_or_allocate(&ep("x", "b"));
        assert_eq!(a, ID_LOCAL_MIN);
        assert_ne!(a, b);
        assert_eq!(t.get_or_allocate(&ep("x", "a")), a);

        let json = serde_json::to_string(&t).unwrap();
        let mut back: IdentityTable = serde_json::from_str(&json).unwrap();
        back.reindex();
        assert_eq!(back.get_or_allocate(&ep("x", "b")), b);
        assert!(back.get_or_allocate(&ep("y", "a")) > b);
    }

    #[test]
    fn cidr_regions_get_cidr_numbers_and_uncovered_regions_are_world() {
        let mut t = IdentityTable::default();
        let key = IdentityKey {
            blocks: ["10.0.0.0/8".to_string()].into(),
            ..Default::default()
        };
        assert_eq!(t.get_or_allocate(&key), ID_CIDR_MIN);
        assert_eq!(t.get_or_allocate(&IdentityKey::default()), ID_WORLD);
    }

    #[test]
    fn released_identities_are_forgotten() {
        let mut t = IdentityTable::default();
        let a = t.get_or_allocate(&ep("x", "a"));
        let b = t.get_or_allocate(&ep("x", "b"));
        t.retain_used(&[b].into());
        assert!(t.key_of(a).is_none());
        assert_eq!(t.key_of(b), Some(&ep("x", "b")));
    }
}
