//! Addresses learned from DNS answers, and how `toFQDNs` rules become L3
//! rules.
//!
//! The node's DNS proxy records, for each name it saw answered, the
//! addresses of the answer and until when they hold (max(TTL, the minimum
//! TTL setting) plus a grace period). A PalisadeNetworkPolicy's `toFQDNs`
//! rule allows exactly the learned addresses of the names it matches: it
//! is handed to the engine as a NetworkPolicy rule whose peers are those
//! addresses (one /32 or /128 ipBlock each). So a learned address costs
//! what an ipBlock costs, the per-packet path does not change, and the full
//! compile (the engine's oracle) sees the same rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::policy::{
    IpBlock, NamespaceScope, Peer, Policy, Selector,
    palisade::{FqdnSelector, PalisadePolicy, normalize},
    tier::{TierPeer, TierPolicy},
};

/// The learned addresses: name → address → expiry (Unix seconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnCache {
    names: BTreeMap<String, BTreeMap<IpAddr, u64>>,
}

/// One learned address, as stored and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    pub name: String,
    pub address: IpAddr,
    /// Unix seconds.
    pub expires: u64,
}

impl FqdnCache {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn len(&self) -> usize {
        self.names.values().map(BTreeMap::len).sum()
    }

    /// Record that `name` resolved to `addr` until `expires`. An address
    /// already known keeps the later expiry. At most `cap` addresses per
    /// name: the one expiring first makes room. Whether the set of
    /// addresses of the name changed (a rule may need rewriting).
    pub fn learn(&mut self, name: &str, addr: IpAddr, expires: u64, cap: usize) -> bool {
        let set = self.names.entry(normalize(name)).or_default();
        if let Some(e) = set.get_mut(&addr) {
            *e = (*e).max(expires);
            return false;
        }
        set.insert(addr, expires);
        while set.len() > cap.max(1) {
            let first = set
                .iter()
                .min_by_key(|(a, e)| (**e, **a))
                .map(|(a, _)| *a)
                .expect("not empty");
            set.remove(&first);
        }
        true
    }

    /// Forget what expired before `now`, except addresses in `keep` (an
    /// open connection still uses them). The names whose addresses
    /// changed.
    pub fn expire(&mut self, now: u64, keep: &BTreeSet<IpAddr>) -> Vec<String> {
        let mut changed = Vec::new();
        self.names.retain(|name, set| {
            let before = set.len();
            set.retain(|a, e| *e >= now || keep.contains(a));
            if set.len() != before {
                changed.push(name.clone());
            }
            !set.is_empty()
        });
        changed
    }

    /// The addresses of every name any of `sels` matches.
    pub fn addresses(&self, sels: &[FqdnSelector]) -> BTreeSet<IpAddr> {
        self.names
            .iter()
            .filter(|(n, _)| sels.iter().any(|s| s.matches(n)))
            .flat_map(|(_, set)| set.keys().copied())
            .collect()
    }

    /// The names that resolved to `addr` (for flows and explain).
    pub fn names_of(&self, addr: IpAddr) -> Vec<String> {
        self.names
            .iter()
            .filter(|(_, set)| set.contains_key(&addr))
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn entries(&self) -> impl Iterator<Item = Learned> + '_ {
        self.names.iter().flat_map(|(name, set)| {
            set.iter().map(move |(a, e)| Learned {
                name: name.clone(),
                address: *a,
                expires: *e,
            })
        })
    }

    pub fn insert_entry(&mut self, l: &Learned) {
        self.names
            .entry(l.name.clone())
            .or_default()
            .insert(l.address, l.expires);
    }
}

/// The L3/L4 policy a PalisadeNetworkPolicy means now: each `toFQDNs` rule
/// gets the learned addresses of its names as ipBlock peers, or, when none
/// is known, a peer that matches nothing (the rule keeps its index, and a
/// rule without peers would allow every peer).
pub fn expand(p: &PalisadePolicy, cache: &FqdnCache) -> Policy {
    let mut base = p.base.clone();
    for (rule, sels) in base.egress.iter_mut().zip(&p.egress_fqdns) {
        if sels.is_empty() {
            continue;
        }
        rule.peers = cache
            .addresses(sels)
            .into_iter()
            .map(|a| {
                Peer::IpBlock(IpBlock {
                    cidr: IpNetwork::from(a),
                    except: Vec::new(),
                })
            })
            .collect();
        if rule.peers.is_empty() {
            rule.peers.push(Peer::Pods {
                namespaces: NamespaceScope::Own,
                pods: Selector::nothing(),
            });
        }
    }
    base
}

/// Whether a change of `name`'s addresses changes what `p` means.
pub fn uses_name(p: &PalisadePolicy, name: &str) -> bool {
    p.fqdn_selectors().any(|s| s.matches(name))
}

/// A ClusterNetworkPolicy as it means now: each rule's `domainNames` add
/// the learned addresses of their names to its peers (a rule with only
/// domain names and nothing learned matches nothing).
pub fn expand_tier(p: &TierPolicy, cache: &FqdnCache) -> TierPolicy {
    let mut out = p.clone();
    for rule in out.egress.iter_mut().filter(|r| !r.domains.is_empty()) {
        rule.peers
            .extend(cache.addresses(&rule.domains).into_iter().map(|a| {
                TierPeer::Peer(Peer::IpBlock(IpBlock {
                    cidr: IpNetwork::from(a),
                    except: Vec::new(),
                }))
            }));
    }
    out
}

/// Whether a change of `name`'s addresses changes what `p` means.
pub fn tier_uses_name(p: &TierPolicy, name: &str) -> bool {
    p.egress
        .iter()
        .flat_map(|r| &r.domains)
        .any(|s| s.matches(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn learning_keeps_the_later_expiry_and_caps_each_name() {
        let mut c = FqdnCache::default();
        assert!(c.learn("A.example.com.", ip("192.0.2.1"), 100, 2));
        assert!(!c.learn("a.example.com", ip("192.0.2.1"), 50, 2));
        assert!(c.learn("a.example.com", ip("192.0.2.2"), 60, 2));
        assert!(c.learn("a.example.com", ip("2001:db8::3"), 70, 2));
        // The cap dropped the address expiring first (.2 at 60).
        let all: Vec<Learned> = c.entries().collect();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(
            all.iter()
                .any(|l| l.address == ip("192.0.2.1") && l.expires == 100)
        );
        assert!(all.iter().any(|l| l.address == ip("2001:db8::3")));
        assert_eq!(c.names_of(ip("192.0.2.1")), vec!["a.example.com"]);
    }

    #[test]
    fn expiry_spares_addresses_in_use() {
        let mut c = FqdnCache::default();
        c.learn("a.test", ip("192.0.2.1"), 10, 8);
        c.learn("a.test", ip("192.0.2.2"), 10, 8);
        c.learn("b.test", ip("192.0.2.3"), 30, 8);
        let keep = BTreeSet::from([ip("192.0.2.2")]);
        assert_eq!(c.expire(20, &keep), vec!["a.test".to_string()]);
        assert_eq!(c.len(), 2);
        assert_eq!(c.expire(40, &BTreeSet::new()).len(), 2);
        assert!(c.is_empty());
    }

    #[test]
    fn a_fqdn_rule_allows_learned_addresses_and_nothing_before() {
        let yaml = "apiVersion: palisade.io/v1alpha1\nkind: PalisadeNetworkPolicy\nmetadata: {name: p, namespace: app}\nspec:\n  egress:\n  - toFQDNs: [{matchPattern: '*.example.com'}]\n    ports: [{port: 443}]\n  - to: [{ipBlock: {cidr: 10.0.0.0/8}}]\n";
        let v: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        let crate::policy::Object::PalisadePolicy(p) = crate::policy::decode_object(v).unwrap()
        else {
            panic!()
        };
        let mut c = FqdnCache::default();
        let none = expand(&p.value, &c);
        assert_eq!(none.egress.len(), 2);
        assert!(
            matches!(&none.egress[0].peers[..], [Peer::Pods { pods, .. }] if !pods.matches(&Default::default())),
            "{:?}",
            none.egress[0]
        );
        c.learn("api.example.com", ip("192.0.2.7"), 99, 8);
        c.learn("example.com", ip("192.0.2.8"), 99, 8);
        assert!(uses_name(&p.value, "api.example.com"));
        assert!(!uses_name(&p.value, "example.com"));
        let some = expand(&p.value, &c);
        assert_eq!(
            some.egress[0].peers,
            vec![Peer::IpBlock(IpBlock {
                cidr: "192.0.2.7/32".parse().unwrap(),
                except: vec![]
            })]
        );
        assert_eq!(some.egress[1], p.value.base.egress[1]);
    }
}
