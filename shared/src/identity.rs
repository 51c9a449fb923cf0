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

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    abi::{ID_CIDR_MIN, ID_HOST, ID_LOCAL_MIN, ID_WORLD},
    policy::{Labels, NamedPort, Protocol},
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
    /// An address of another node of the cluster (a Node object's): never
    /// an endpoint, so no pod or namespace selector matches it, while
    /// ipBlocks do exactly as for any address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node: bool,
}

impl IdentityKey {
    pub fn is_endpoint(&self) -> bool {
        self.namespace.is_some()
    }

    /// How a named port is recorded in `ports`: `name/PROTO=port`.
    pub fn port_tag(np: &NamedPort) -> String {
        format!("{}/{}={}", np.name, np.protocol.as_str(), np.port)
    }

    /// The number a named port has on the addresses of this identity (only
    /// names that egress rules use are recorded).
    pub fn named_port(&self, name: &str, proto: Protocol) -> Option<u16> {
        let prefix = format!("{name}/{}=", proto.as_str());
        self.ports
            .iter()
            .find_map(|t| t.strip_prefix(&prefix).and_then(|p| p.parse().ok()))
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
            None if self.node => "node".to_owned(),
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

/// The persisted identity table: numbers by key and keys by number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "TableWire", into = "TableWire")]
pub struct IdentityTable {
    /// Each key is held once, by both indexes.
    by_key: BTreeMap<Arc<IdentityKey>, u32>,
    by_id: BTreeMap<u32, Arc<IdentityKey>>,
    next_local: u32,
    next_cidr: u32,
}

/// The table as `state.json` held it (and as it is still serialised).
#[derive(Serialize, Deserialize)]
struct TableWire {
    entries: Vec<(IdentityKey, u32)>,
    next_local: u32,
    next_cidr: u32,
}

impl From<TableWire> for IdentityTable {
    fn from(w: TableWire) -> Self {
        let mut t = IdentityTable {
            next_local: w.next_local,
            next_cidr: w.next_cidr,
            ..Default::default()
        };
        for (key, id) in w.entries {
            t.insert(id, key);
        }
        t
    }
}

impl From<IdentityTable> for TableWire {
    fn from(t: IdentityTable) -> Self {
        TableWire {
            entries: t
                .by_id
                .into_iter()
                .map(|(id, k)| (Arc::unwrap_or_clone(k), id))
                .collect(),
            next_local: t.next_local,
            next_cidr: t.next_cidr,
        }
    }
}

impl Default for IdentityTable {
    fn default() -> Self {
        Self {
            by_key: BTreeMap::new(),
            by_id: BTreeMap::new(),
            next_local: ID_LOCAL_MIN,
            next_cidr: ID_CIDR_MIN,
        }
    }
}

impl IdentityTable {
    /// A table from stored parts: the next numbers to hand out, then
    /// [`IdentityTable::insert`] for every stored identity.
    pub fn with_counters(next_local: u32, next_cidr: u32) -> Self {
        Self {
            next_local: next_local.max(ID_LOCAL_MIN),
            next_cidr: next_cidr.max(ID_CIDR_MIN),
            ..Default::default()
        }
    }

    /// The next numbers to hand out (local, CIDR), for storing.
    pub fn counters(&self) -> (u32, u32) {
        (self.next_local, self.next_cidr)
    }

    /// Record a stored identity.
    pub fn insert(&mut self, id: u32, key: IdentityKey) {
        let key = Arc::new(key);
        if let Some(old) = self.by_id.insert(id, Arc::clone(&key)) {
            self.by_key.remove(&old);
        }
        self.by_key.insert(key, id);
    }

    /// The identity of `key`, allocating a new number if it has none.
    pub fn get_or_allocate(&mut self, key: &IdentityKey) -> u32 {
        self.allocate(key).0
    }

    /// The identity of `key` and whether it was allocated just now.
    /// Addresses that no policy block covers are the world, never allocated.
    pub fn allocate(&mut self, key: &IdentityKey) -> (u32, bool) {
        if let Some(id) = self.by_key.get(key) {
            return (*id, false);
        }
        // An ipBlock region no policy block covers is simply the world.
        if !key.is_endpoint() && !key.node && key.blocks.is_empty() {
            return (ID_WORLD, false);
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
        self.insert(id, key.clone());
        (id, true)
    }

    fn first_free(&self, local: bool) -> u32 {
        let (lo, hi) = if local {
            (ID_LOCAL_MIN, ID_CIDR_MIN)
        } else {
            (ID_CIDR_MIN, u32::MAX)
        };
        (lo..hi).find(|i| !self.by_id.contains_key(i)).unwrap_or(lo)
    }

    /// Forget one identity.
    pub fn remove(&mut self, id: u32) -> Option<IdentityKey> {
        let key = self.by_id.remove(&id)?;
        self.by_key.remove(&key);
        Some(Arc::unwrap_or_clone(key))
    }

    /// Forget identities no address uses any more.
    pub fn retain_used(&mut self, used: &BTreeSet<u32>) {
        let gone: Vec<u32> = self
            .by_id
            .keys()
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.remove(id);
        }
    }

    /// Every identity, by number.
    pub fn iter(&self) -> impl Iterator<Item = (&IdentityKey, u32)> {
        self.by_id.iter().map(|(id, k)| (&**k, *id))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn key_of(&self, id: u32) -> Option<&IdentityKey> {
        self.by_id.get(&id).map(|k| &**k)
    }

    /// The number of `key`, if it has one.
    pub fn id_of(&self, key: &IdentityKey) -> Option<u32> {
        self.by_key.get(key).copied()
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
        // Another node's address is never the world, inside a block or not.
        let node = IdentityKey {
            node: true,
            ..Default::default()
        };
        let n = t.get_or_allocate(&node);
        assert!(n > ID_CIDR_MIN, "a number of its own, not the world: {n}");
        assert_eq!(t.key_of(n).map(|k| k.describe()), Some("node".to_owned()));
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
