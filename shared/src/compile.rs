//! The policy compiler: Kubernetes objects and endpoints in, the exact set
//! of datapath map entries out. Pure: it takes data and returns data.
//!
//! Per endpoint and direction it emits one policy-trie entry per (peer
//! identity, protocol, port prefix) that some rule of some selecting policy
//! allows. Port ranges become a handful of prefixes, never one entry per
//! port; peers that mean "anyone" become the `ID_ANY` wildcard.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use ipnetwork::IpNetwork;

use crate::{
    abi::{
        self, Direction, EndpointValue, ID_ANY, ID_HOST, IpcacheValue, POLICY_PREFIX_ANY_PORT,
        POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, PolicyKeyData, PolicyValue, SrcguardKey,
        TIER_NETPOL, Verdict,
    },
    identity::{IdentityKey, IdentityTable},
    policy::{
        HttpRule, IpBlock, Labels, Mode, NamedPort, NamespaceInfo, NamespaceMap, NamespaceScope,
        Peer, Policy, PortMatch, PortRule, Protocol, Rule, tier::TierPolicy,
    },
    tiers,
};

/// An endpoint as the compiler sees it: effective labels (runtime labels
/// overlaid by the Pod object's), named ports and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    pub ep_id: u32,
    pub ifindex: u32,
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ports: Vec<NamedPort>,
    pub addresses: Vec<IpAddr>,
    /// Extra `PAL_EP_*` flags to set (audit modes).
    pub extra_flags: u32,
    /// A pod on another node: a peer only (see `EndpointInput::remote`).
    pub remote: bool,
}

/// What to compile.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub namespaces: &'a NamespaceMap,
    /// Policies with their stable numeric ids.
    pub policies: &'a [(u32, Policy)],
    pub endpoints: &'a [EndpointView],
    /// Addresses of the node itself.
    pub host_addresses: &'a [IpAddr],
    /// Addresses of the cluster's other nodes (Node objects), with the
    /// labels of the node each belongs to.
    pub node_addresses: &'a [(IpAddr, Labels)],
    /// AdminNetworkPolicy, BaselineAdminNetworkPolicy and
    /// ClusterNetworkPolicy objects with their ids, modes resolved.
    pub tier_policies: &'a [(u32, TierPolicy)],
}

/// Other nodes' addresses with the labels of the node that names each,
/// from nodes given in name order (an address two nodes name takes the
/// first one's labels).
pub fn node_address_labels<'a>(
    nodes: impl IntoIterator<Item = (&'a BTreeSet<IpAddr>, Labels)>,
) -> Vec<(IpAddr, Labels)> {
    let mut out: BTreeMap<IpAddr, Labels> = BTreeMap::new();
    for (addrs, labels) in nodes {
        for a in addrs {
            out.entry(*a).or_insert_with(|| labels.clone());
        }
    }
    out.into_iter().collect()
}

/// An ipcache prefix in the 16-byte address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub len: u32,
    pub addr: [u8; 16],
}

impl Prefix {
    pub fn host(ip: IpAddr) -> Self {
        Self {
            len: 128,
            addr: abi::addr16(ip),
        }
    }

    pub fn from_net(net: IpNetwork) -> Self {
        Self {
            len: abi::prefix16(net.network(), net.prefix()),
            addr: abi::addr16(net.network()),
        }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match abi::ip_from16(self.addr) {
            IpAddr::V4(v4) if self.len >= 96 => write!(f, "{v4}/{}", self.len - 96),
            _ => write!(f, "{}/{}", std::net::Ipv6Addr::from(self.addr), self.len),
        }
    }
}

/// A policy entry's key: prefix length plus match.
pub use crate::abi::PolicyKey;

/// The complete desired content of the datapath's configuration maps.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    /// By host veth ifindex.
    pub endpoints: BTreeMap<u32, EndpointValue>,
    pub ipcache: BTreeMap<Prefix, IpcacheValue>,
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    /// The addresses each endpoint may send from (anti-spoofing).
    pub srcguard: BTreeSet<SrcguardKey>,
}

/// Result of a compilation.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    pub desired: Desired,
    /// Identity of each endpoint (by ep_id), for display and events.
    pub endpoint_identities: BTreeMap<u32, u32>,
    /// Every identity some address currently has.
    pub used_identities: BTreeSet<u32>,
    /// Things a user should know (e.g. an address claimed twice).
    pub warnings: Vec<String>,
}

/// What a rule's peers are matched against: one address's identity facts.
#[derive(Debug, Clone)]
pub struct PeerFacts<'a> {
    /// `Some` for pods, with their namespace's labels.
    pub pod: Option<(&'a str, &'a Labels, &'a Labels)>,
    /// Canonical ipBlocks the address falls in.
    pub blocks: &'a BTreeSet<String>,
    /// `Some` for another node's address, with the Node's labels.
    pub node: Option<&'a Labels>,
}

/// Whether one peer of a rule in a policy of namespace `policy_ns` matches.
pub fn peer_matches(peer: &Peer, policy_ns: &str, facts: &PeerFacts<'_>) -> bool {
    match peer {
        Peer::IpBlock(b) => facts.blocks.contains(&b.canonical()),
        Peer::Pods { namespaces, pods } => {
            let Some((ns, ns_labels, labels)) = facts.pod else {
                return false;
            };
            let ns_ok = match namespaces {
                NamespaceScope::Own => ns == policy_ns,
                NamespaceScope::Matching(sel) => sel.matches(ns_labels),
            };
            ns_ok && pods.matches(labels)
        }
    }
}

/// Whether a rule's port list lets (protocol, port) through to a
/// destination whose named ports are `dest_ports`. ICMP and other
/// protocols without ports only pass rules without a port list.
pub fn ports_match(rule: &Rule, proto: u8, port: u16, dest_ports: &[NamedPort]) -> Option<String> {
    if rule.ports.is_empty() {
        return Some("all ports and protocols".into());
    }
    rule.ports
        .iter()
        .find(|p| port_entry_hits(p, proto, port, dest_ports))
        .map(ToString::to_string)
}

/// Whether one port entry lets (protocol, port) through to a destination
/// whose named ports are `dest_ports`.
fn port_entry_hits(p: &PortRule, proto: u8, port: u16, dest_ports: &[NamedPort]) -> bool {
    p.protocol.number() == proto
        && match &p.port {
            PortMatch::All => true,
            PortMatch::Range(a, b) => (*a..=*b).contains(&port),
            PortMatch::Named(n) => dest_ports
                .iter()
                .any(|np| &np.name == n && np.protocol == p.protocol && np.port == port),
        }
}

/// The HTTP rules a rule's matching port entries carry for (protocol,
/// port): `None` when no entry matches, an empty list when one without
/// HTTP rules does (every request is allowed), else all of their rules.
pub fn http_rules_of<'r>(
    rule: &'r Rule,
    proto: u8,
    port: u16,
    dest_ports: &[NamedPort],
) -> Option<Vec<&'r HttpRule>> {
    if rule.ports.is_empty() {
        return Some(Vec::new());
    }
    let mut out: Option<Vec<&HttpRule>> = None;
    for p in &rule.ports {
        if !port_entry_hits(p, proto, port, dest_ports) {
            continue;
        }
        if p.http.is_empty() {
            return Some(Vec::new());
        }
        out.get_or_insert_with(Vec::new).extend(&p.http);
    }
    out
}

/// Split an inclusive port range into (first port, prefix bits) pairs of
/// the 16-bit port space: at most 30 of them for any range.
pub fn port_prefixes(start: u16, end: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let mut cur = u32::from(start);
    let end = u32::from(end);
    while cur <= end {
        // Largest aligned block starting at cur that stays within the range.
        let mut size = if cur == 0 {
            1 << 16
        } else {
            1u32 << cur.trailing_zeros().min(16)
        };
        while cur + size - 1 > end {
            size >>= 1;
        }
        out.push((cur as u16, 16 - size.trailing_zeros()));
        cur += size;
    }
    out
}

/// Every distinct ipBlock in the policies.
pub(crate) fn collect_blocks(policies: &[(u32, Policy)]) -> Vec<IpBlock> {
    let mut set = BTreeSet::new();
    for (_, p) in policies {
        for r in p.ingress.iter().chain(&p.egress) {
            for peer in &r.peers {
                if let Peer::IpBlock(b) = peer {
                    set.insert(b.clone());
                }
            }
        }
    }
    set.into_iter().collect()
}

/// Named ports (name, protocol) that egress rules resolve on peers.
pub(crate) fn egress_port_names(policies: &[(u32, Policy)]) -> BTreeSet<(String, Protocol)> {
    let mut set = BTreeSet::new();
    for (_, p) in policies {
        for r in &p.egress {
            for port in &r.ports {
                if let PortMatch::Named(n) = &port.port {
                    set.insert((n.clone(), port.protocol));
                }
            }
        }
    }
    set
}

/// Whether `inner` lies entirely inside `outer`.
fn within(inner: &IpNetwork, outer: &IpNetwork) -> bool {
    inner.is_ipv4() == outer.is_ipv4()
        && inner.prefix() >= outer.prefix()
        && outer.contains(inner.network())
}

/// The network `len` bits long that contains `addr`.
fn supernet(addr: IpAddr, len: u8) -> Option<IpNetwork> {
    let net = IpNetwork::new(addr, len).ok()?;
    IpNetwork::new(net.network(), len).ok()
}

/// The policy ipBlocks indexed by CIDR, so that finding the blocks around
/// an address costs one lookup per distinct prefix length, not one test per
/// block: 100,000 blocks must not make every address cost 100,000 tests.
/// Blocks come and go one at a time (the incremental engine keeps one).
#[derive(Debug, Clone, Default)]
pub(crate) struct BlockIndex {
    by_cidr: HashMap<IpNetwork, Vec<IpBlock>>,
    /// Prefix lengths in use, with how many blocks use each.
    v4_lens: BTreeMap<u8, usize>,
    v6_lens: BTreeMap<u8, usize>,
}

impl BlockIndex {
    pub(crate) fn new(blocks: &[IpBlock]) -> Self {
        let mut idx = BlockIndex::default();
        for b in blocks {
            idx.insert(b.clone());
        }
        idx
    }

    fn lens_mut(&mut self, key: &IpNetwork) -> &mut BTreeMap<u8, usize> {
        if key.is_ipv4() {
            &mut self.v4_lens
        } else {
            &mut self.v6_lens
        }
    }

    pub(crate) fn insert(&mut self, b: IpBlock) {
        let Some(key) = supernet(b.cidr.ip(), b.cidr.prefix()) else {
            return;
        };
        *self.lens_mut(&key).entry(key.prefix()).or_default() += 1;
        self.by_cidr.entry(key).or_default().push(b);
    }

    pub(crate) fn remove(&mut self, b: &IpBlock) {
        let Some(key) = supernet(b.cidr.ip(), b.cidr.prefix()) else {
            return;
        };
        let Some(list) = self.by_cidr.get_mut(&key) else {
            return;
        };
        let Some(pos) = list.iter().position(|x| x == b) else {
            return;
        };
        list.swap_remove(pos);
        if list.is_empty() {
            self.by_cidr.remove(&key);
        }
        let lens = self.lens_mut(&key);
        if let Some(n) = lens.get_mut(&key.prefix()) {
            *n -= 1;
            if *n == 0 {
                lens.remove(&key.prefix());
            }
        }
    }

    /// Which blocks contain the whole prefix `net`: it lies inside the CIDR
    /// and inside none of its exceptions. Every CIDR and exception is
    /// inserted as its own ipcache prefix, so this is exact for every
    /// address whose longest match is `net`.
    pub(crate) fn of_prefix(&self, net: &IpNetwork) -> BTreeSet<String> {
        let lens = if net.is_ipv4() {
            &self.v4_lens
        } else {
            &self.v6_lens
        };
        let mut out = BTreeSet::new();
        for &len in lens.range(..=net.prefix()).map(|(l, _)| l) {
            let Some(outer) = supernet(net.ip(), len) else {
                continue;
            };
            for b in self.by_cidr.get(&outer).into_iter().flatten() {
                if within(net, &b.cidr) && !b.except.iter().any(|e| within(net, e)) {
                    out.insert(b.canonical());
                }
            }
        }
        out
    }

    /// Which blocks contain the address.
    pub(crate) fn of_addr(&self, addr: IpAddr) -> BTreeSet<String> {
        self.of_prefix(&IpNetwork::from(addr))
    }
}

/// Which identities each rule peer can match, so that a rule naming one
/// ipBlock finds its identities by lookup instead of testing every one.
struct PeerIndex {
    /// Canonical block → identities whose addresses lie in it.
    by_block: HashMap<String, Vec<u32>>,
    /// Identities of endpoints, the only ones pod selectors match.
    pods: Vec<u32>,
}

impl PeerIndex {
    fn new(facts: &BTreeMap<u32, IdentityFacts>) -> Self {
        let mut by_block: HashMap<String, Vec<u32>> = HashMap::new();
        let mut pods = Vec::new();
        for (id, f) in facts {
            for b in &f.key.blocks {
                by_block.entry(b.clone()).or_default().push(*id);
            }
            if f.key.is_endpoint() {
                pods.push(*id);
            }
        }
        PeerIndex { by_block, pods }
    }
}

/// Facts about one identity, for matching rules.
#[derive(Debug)]
struct IdentityFacts {
    key: IdentityKey,
    ns_labels: Labels,
}

impl IdentityFacts {
    fn facts(&self) -> PeerFacts<'_> {
        PeerFacts {
            pod: self
                .key
                .namespace
                .as_deref()
                .map(|ns| (ns, &self.ns_labels, &self.key.labels)),
            blocks: &self.key.blocks,
            node: self.key.node.then_some(&self.key.labels),
        }
    }

    fn named_port(&self, name: &str, proto: Protocol) -> Option<u16> {
        self.key.named_port(name, proto)
    }
}

/// A rule whose peers have been resolved to identities.
struct ResolvedRule<'a> {
    policy_id: u32,
    /// `None`: any peer.
    peers: Option<BTreeSet<u32>>,
    ports: &'a [PortRule],
}

/// Compile the desired datapath state. Allocates identities in `ids`.
pub fn compile<'a>(input: &Input<'a>, ids: &mut IdentityTable) -> Compiled {
    let mut out = Compiled::default();
    let mut blocks = collect_blocks(input.policies);
    let mut egress_names = egress_port_names(input.policies);
    for (_, t) in input.tier_policies {
        blocks.extend(tiers::blocks(t));
        egress_names.extend(tiers::egress_names(t));
    }
    blocks.sort();
    blocks.dedup();
    let block_index = BlockIndex::new(&blocks);
    let mut tier_refs: Vec<tiers::TierRef<'_>> = input
        .tier_policies
        .iter()
        .map(|(id, p)| tiers::TierRef::new(*id, p, Mode::Enforce))
        .collect();
    tiers::sort(&mut tier_refs);
    let ns_labels = |ns: &str| -> Labels {
        input
            .namespaces
            .get(ns)
            .cloned()
            .unwrap_or_else(|| NamespaceInfo::new(ns, None))
            .labels
    };

    // 1. Identities of endpoint addresses. Oldest first: when two
    // endpoints claim one address (a stale one whose DEL was lost, and the
    // container IPAM gave it to since), the newest registration wins; a
    // local endpoint wins over remote pods.
    let mut facts: BTreeMap<u32, IdentityFacts> = BTreeMap::new();
    let mut owner: BTreeMap<IpAddr, (bool, &str)> = BTreeMap::new();
    let mut by_age: Vec<&EndpointView> = input.endpoints.iter().collect();
    by_age.sort_by_key(|e| (!e.remote, e.ep_id));
    for ep in by_age {
        let ports: BTreeSet<String> = ep
            .ports
            .iter()
            .filter(|np| egress_names.contains(&(np.name.clone(), np.protocol)))
            .map(IdentityKey::port_tag)
            .collect();
        let base = IdentityKey {
            namespace: Some(ep.namespace.clone()),
            labels: ep.labels.clone(),
            blocks: BTreeSet::new(),
            ports: ports.clone(),
            node: false,
        };
        let mut own_identity = None;
        for addr in &ep.addresses {
            let key = IdentityKey {
                blocks: block_index.of_addr(*addr),
                ..base.clone()
            };
            let id = ids.get_or_allocate(&key);
            own_identity.get_or_insert(id);
            if let Some((true, prev)) = owner.insert(*addr, (!ep.remote, &ep.name))
                && !ep.remote
            {
                out.warnings.push(format!(
                    "address {addr} is claimed by endpoints {prev} and {}; the newer one ({}) wins",
                    ep.name, ep.name
                ));
            }
            if !ep.remote {
                out.desired.srcguard.insert(SrcguardKey {
                    ep_id: ep.ep_id,
                    addr: abi::addr16(*addr),
                });
            }
            out.desired.ipcache.insert(
                Prefix::host(*addr),
                IpcacheValue {
                    identity: id,
                    flags: 0,
                },
            );
            facts.entry(id).or_insert_with(|| IdentityFacts {
                ns_labels: ns_labels(&ep.namespace),
                key,
            });
        }
        if ep.remote {
            continue;
        }
        let own = own_identity.unwrap_or_else(|| ids.get_or_allocate(&base));
        out.endpoint_identities.insert(ep.ep_id, own);
        out.used_identities.insert(own);
    }

    // 2. The node's own addresses.
    for addr in input.host_addresses {
        if !owner.contains_key(addr) {
            out.desired.ipcache.insert(
                Prefix::host(*addr),
                IpcacheValue {
                    identity: ID_HOST,
                    flags: 0,
                },
            );
        }
    }

    // 2b. Other nodes' addresses: the node identity, refined by the
    // ipBlocks they fall in (no pod or namespace selector matches it).
    for (addr, labels) in input.node_addresses {
        if owner.contains_key(addr) || input.host_addresses.contains(addr) {
            continue;
        }
        let key = IdentityKey {
            node: true,
            labels: labels.clone(),
            blocks: block_index.of_addr(*addr),
            ..Default::default()
        };
        let id = ids.get_or_allocate(&key);
        out.desired.ipcache.insert(
            Prefix::host(*addr),
            IpcacheValue {
                identity: id,
                flags: 0,
            },
        );
        facts.entry(id).or_insert_with(|| IdentityFacts {
            key,
            ns_labels: Labels::new(),
        });
    }

    // 3. ipBlock regions. The IPv4 /0 prefix is always present so that
    // IPv4-mapped lookups never fall through to an IPv6 block like ::/0.
    let mut prefixes: BTreeSet<IpNetwork> = BTreeSet::new();
    prefixes.insert(IpNetwork::V4(
        ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::UNSPECIFIED, 0).expect("/0"),
    ));
    for b in &blocks {
        prefixes.insert(b.cidr);
        prefixes.extend(b.except.iter().copied());
    }
    for net in prefixes {
        let key = IdentityKey {
            blocks: block_index.of_prefix(&net),
            ..Default::default()
        };
        let id = ids.get_or_allocate(&key);
        out.desired
            .ipcache
            .entry(Prefix::from_net(net))
            .or_insert(IpcacheValue {
                identity: id,
                flags: 0,
            });
        if key.blocks.is_empty() {
            continue;
        }
        facts.entry(id).or_insert_with(|| IdentityFacts {
            key,
            ns_labels: Labels::new(),
        });
    }
    out.used_identities.extend(facts.keys().copied());

    // 4. Resolve every rule's peers once, for all endpoints it applies to.
    let peer_index = PeerIndex::new(&facts);
    let resolve = |policy_id: u32, p: &Policy, r: &'a Rule| {
        resolve_rule(policy_id, p, r, &facts, &peer_index)
    };
    struct PolicyRules<'a> {
        policy: &'a Policy,
        ingress: Vec<ResolvedRule<'a>>,
        egress: Vec<ResolvedRule<'a>>,
    }
    let mut sorted: Vec<&'a (u32, Policy)> = input.policies.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.1.namespace, &a.1.name, a.1.kind).cmp(&(&b.1.namespace, &b.1.name, b.1.kind))
    });
    let resolved: Vec<PolicyRules<'a>> = sorted
        .iter()
        .map(|(id, p)| PolicyRules {
            policy: p,
            ingress: if p.ingress_isolation {
                p.ingress.iter().map(|r| resolve(*id, p, r)).collect()
            } else {
                Vec::new()
            },
            egress: if p.egress_isolation {
                p.egress.iter().map(|r| resolve(*id, p, r)).collect()
            } else {
                Vec::new()
            },
        })
        .collect();

    // 5. Per endpoint: isolation flags and allow entries. Oldest first, so
    // that of two endpoints claiming one veth the newest is programmed.
    let mut by_age: Vec<&EndpointView> = input.endpoints.iter().filter(|e| !e.remote).collect();
    by_age.sort_by_key(|e| e.ep_id);
    for ep in by_age {
        let mut flags = ep.extra_flags;
        let mut range_lens = 0;
        // Audit: allow rules of every policy count, but a direction that
        // only audited policies isolate reports what it would drop instead
        // of dropping it.
        let (mut enforced_in, mut enforced_eg) = (false, false);
        for pr in &resolved {
            if !pr.policy.selects(&ep.namespace, &ep.labels) {
                continue;
            }
            let enforced = pr.policy.mode.unwrap_or_default() == Mode::Enforce;
            if pr.policy.dns_proxy {
                flags |= abi::EP_DNS_PROXY;
            }
            if pr.policy.ingress_isolation {
                flags |= abi::EP_ISOLATE_INGRESS;
                enforced_in |= enforced;
            }
            if pr.policy.egress_isolation {
                flags |= abi::EP_ISOLATE_EGRESS;
                enforced_eg |= enforced;
            }
            for r in &pr.ingress {
                let (f, lens) = emit(&mut out.desired.policy, ep, Direction::Ingress, r, &facts);
                flags |= f;
                range_lens |= lens;
            }
            for r in &pr.egress {
                let (f, lens) = emit(&mut out.desired.policy, ep, Direction::Egress, r, &facts);
                flags |= f;
                range_lens |= lens;
            }
        }
        // The admin and baseline tiers: one cell per direction, tier and
        // peer identity, for the tier policies that select the endpoint.
        let ep_ns_labels = ns_labels(&ep.namespace);
        let pols: Vec<tiers::TierRef<'_>> = tier_refs
            .iter()
            .filter(|t| tiers::selects(t.policy, &ep_ns_labels, &ep.labels))
            .copied()
            .collect();
        if pols.iter().any(|t| t.policy.uses_dns_proxy()) {
            flags |= abi::EP_DNS_PROXY;
        }
        if !pols.is_empty() {
            for (id, f) in &facts {
                let peer = f.facts();
                for dir in Direction::ALL {
                    for (tier, tier_no) in tiers::TIERS {
                        let rules =
                            tiers::cell_rules(&pols, tier, dir, &ep.ports, &peer, &|n, p| {
                                f.named_port(n, p)
                            });
                        for (k, v) in tiers::cell_entries(ep.ep_id, dir, tier_no, *id, &rules) {
                            let (f, lens) = abi::ep_shape(dir as u8, k.prefixlen);
                            flags |= f | tiers::ep_flag(tier_no, dir as u8);
                            range_lens |= lens;
                            out.desired.policy.insert(k, v);
                        }
                    }
                }
            }
        }
        if flags & abi::EP_ISOLATE_INGRESS != 0 && !enforced_in {
            flags |= abi::EP_AUDIT_INGRESS;
        }
        if flags & abi::EP_ISOLATE_EGRESS != 0 && !enforced_eg {
            flags |= abi::EP_AUDIT_EGRESS;
        }
        out.desired.endpoints.insert(
            ep.ifindex,
            EndpointValue {
                ep_id: ep.ep_id,
                identity: out.endpoint_identities.get(&ep.ep_id).copied().unwrap_or(0),
                flags,
                range_lens,
            },
        );
    }
    l7_cover_pass(&mut out.desired.policy);
    l7_egress_flags(&mut out.desired);
    out
}

/// `EP_L7_EGRESS` on the endpoints that keep an egress entry only HTTP
/// rules allow (after [`l7_cover_pass`]).
fn l7_egress_flags(desired: &mut Desired) {
    let eps: BTreeSet<u32> = desired
        .policy
        .iter()
        .filter(|(k, v)| is_l7_egress(k, v))
        .map(|(k, _)| k.data.ep_id)
        .collect();
    for v in desired.endpoints.values_mut() {
        if eps.contains(&v.ep_id) {
            v.flags |= abi::EP_L7_EGRESS;
        }
    }
}

/// A NetworkPolicy-tier egress entry with the L7 flag.
pub(crate) fn is_l7_egress(k: &PolicyKey, v: &PolicyValue) -> bool {
    k.data.tier == TIER_NETPOL
        && k.data.direction == Direction::Egress as u8
        && v.flags & abi::POLICY_F_L7 != 0
}

/// The keys of entries that, for the traffic of the NetworkPolicy entry
/// `key`, the datapath finds before it or instead of it: the same peer's
/// shorter shapes, and the "any peer" entries (after the exact peer's).
pub(crate) fn covering_keys(key: &PolicyKey) -> Vec<PolicyKey> {
    let d = key.data;
    let port = u16::from_be(d.dport_be);
    let mut out = Vec::new();
    let mut peers = vec![d.peer_id];
    if d.peer_id != ID_ANY {
        peers.push(ID_ANY);
    }
    for peer in peers {
        let with = |prefixlen: u32, protocol: u8, port: u16| PolicyKey {
            prefixlen,
            data: PolicyKeyData {
                peer_id: peer,
                protocol,
                dport_be: port.to_be(),
                ..d
            },
        };
        if peer != d.peer_id && key.prefixlen == POLICY_PREFIX_FULL {
            out.push(with(POLICY_PREFIX_FULL, d.protocol, port));
        }
        let own_bits = key.prefixlen.saturating_sub(POLICY_PREFIX_ANY_PORT);
        for bits in 1..=15u32 {
            if peer == d.peer_id && bits >= own_bits {
                continue;
            }
            let mask = 0xffffu16 << (16 - bits);
            out.push(with(POLICY_PREFIX_ANY_PORT + bits, d.protocol, port & mask));
        }
        if !(peer == d.peer_id && key.prefixlen <= POLICY_PREFIX_ANY_PORT) {
            out.push(with(POLICY_PREFIX_ANY_PORT, d.protocol, 0));
        }
        if !(peer == d.peer_id && key.prefixlen <= POLICY_PREFIX_ANY_PROTO) {
            out.push(with(POLICY_PREFIX_ANY_PROTO, 0, 0));
        }
    }
    out
}

/// The flag an L7 entry keeps: none when an entry without HTTP rules also
/// allows its traffic (an L3/L4 rule allows every request), which the
/// datapath may find first.
pub(crate) fn l7_flag_of(policy: &BTreeMap<PolicyKey, PolicyValue>, key: &PolicyKey) -> u8 {
    let plain_covers = covering_keys(key).iter().any(|k| {
        policy
            .get(k)
            .is_some_and(|v| v.flags & abi::POLICY_F_L7 == 0)
    });
    if plain_covers { 0 } else { abi::POLICY_F_L7 }
}

fn l7_cover_pass(policy: &mut BTreeMap<PolicyKey, PolicyValue>) {
    let l7: Vec<PolicyKey> = policy
        .iter()
        .filter(|(k, v)| k.data.tier == TIER_NETPOL && v.flags & abi::POLICY_F_L7 != 0)
        .map(|(k, _)| *k)
        .collect();
    let cleared: Vec<PolicyKey> = l7
        .into_iter()
        .filter(|k| l7_flag_of(policy, k) == 0)
        .collect();
    for k in cleared {
        if let Some(v) = policy.get_mut(&k) {
            v.flags &= !abi::POLICY_F_L7;
        }
    }
}

fn resolve_rule<'r>(
    policy_id: u32,
    p: &Policy,
    r: &'r Rule,
    facts: &BTreeMap<u32, IdentityFacts>,
    index: &PeerIndex,
) -> ResolvedRule<'r> {
    let peers = if r.peers.is_empty() {
        None
    } else {
        let mut ids = BTreeSet::new();
        for peer in &r.peers {
            match peer {
                Peer::IpBlock(b) => {
                    ids.extend(index.by_block.get(&b.canonical()).into_iter().flatten());
                }
                Peer::Pods { .. } => ids.extend(index.pods.iter().copied().filter(|id| {
                    facts
                        .get(id)
                        .is_some_and(|f| peer_matches(peer, &p.namespace, &f.facts()))
                })),
            }
        }
        Some(ids)
    };
    ResolvedRule {
        policy_id,
        peers,
        ports: &r.ports,
    }
}

/// Emit a rule's entries; returns the endpoint flags and range lengths they
/// need (`abi::ep_shape`).
fn emit(
    map: &mut BTreeMap<PolicyKey, PolicyValue>,
    ep: &EndpointView,
    dir: Direction,
    rule: &ResolvedRule<'_>,
    facts: &BTreeMap<u32, IdentityFacts>,
) -> (u32, u32) {
    let mut shapes = (0, 0);
    let mut put = |peer: u32, proto: u8, port: u16, prefixlen: u32, l7: bool| {
        let value = PolicyValue {
            policy_id: rule.policy_id,
            verdict: Verdict::Allow as u8,
            flags: if l7 { abi::POLICY_F_L7 } else { 0 },
            pad: 0,
        };
        let key = PolicyKey {
            prefixlen,
            data: PolicyKeyData {
                ep_id: ep.ep_id,
                direction: dir as u8,
                tier: TIER_NETPOL,
                pad1: 0,
                peer_id: peer,
                pad2: 0,
                protocol: proto,
                dport_be: port.to_be(),
            },
        };
        // Policies are visited in name order: the first one that allows a
        // key is the one events and explain report. The entry goes through
        // the L7 proxy only if every rule producing it has HTTP rules.
        map.entry(key)
            .and_modify(|v| v.flags &= value.flags)
            .or_insert(value);
        let (f, lens) = abi::ep_shape(dir as u8, prefixlen);
        shapes.0 |= f;
        shapes.1 |= lens;
    };
    let peers: Vec<u32> = match &rule.peers {
        None => vec![ID_ANY],
        Some(set) => set.iter().copied().collect(),
    };
    if rule.ports.is_empty() {
        for &peer in &peers {
            put(peer, 0, 0, POLICY_PREFIX_ANY_PROTO, false);
        }
        return shapes;
    }
    for port in rule.ports {
        let proto = port.protocol.number();
        let l7 = !port.http.is_empty();
        match &port.port {
            PortMatch::All => {
                for &peer in &peers {
                    put(peer, proto, 0, POLICY_PREFIX_ANY_PORT, l7);
                }
            }
            PortMatch::Range(a, b) => {
                for (start, bits) in port_prefixes(*a, *b) {
                    for &peer in &peers {
                        put(peer, proto, start, POLICY_PREFIX_ANY_PORT + bits, l7);
                    }
                }
            }
            PortMatch::Named(name) => match dir {
                // Ingress: the destination is this endpoint.
                Direction::Ingress => {
                    for np in ep
                        .ports
                        .iter()
                        .filter(|np| &np.name == name && np.protocol == port.protocol)
                    {
                        for &peer in &peers {
                            put(peer, proto, np.port, POLICY_PREFIX_FULL, l7);
                        }
                    }
                }
                // Egress: the destination is the peer; only pods have
                // named ports, each resolved on its own identity.
                Direction::Egress => {
                    let candidates: Vec<u32> = match &rule.peers {
                        None => facts.keys().copied().collect(),
                        Some(set) => set.iter().copied().collect(),
                    };
                    for peer in candidates {
                        if let Some(num) = facts
                            .get(&peer)
                            .and_then(|f| f.named_port(name, port.protocol))
                        {
                            put(peer, proto, num, POLICY_PREFIX_FULL, l7);
                        }
                    }
                }
            },
        }
    }
    shapes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        abi::{EP_ISOLATE_EGRESS, EP_ISOLATE_INGRESS, ID_WORLD, PROTO_TCP, PROTO_UDP},
        policy::{Object, parse_documents},
    };

    fn policies(yaml: &str) -> Vec<(u32, Policy)> {
        parse_documents(yaml, "test")
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, o)| match o {
                Object::NetworkPolicy(np) => (i as u32 + 1, np.value),
                Object::PalisadePolicy(p) => (i as u32 + 1, p.value.base),
                other => panic!("not a policy: {other:?}"),
            })
            .collect()
    }

    fn ep(id: u32, ns: &str, name: &str, labels: &[(&str, &str)], addr: &str) -> EndpointView {
        EndpointView {
            ep_id: id,
            ifindex: 100 + id,
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: Vec::new(),
            addresses: vec![addr.parse().unwrap()],
            extra_flags: 0,
            remote: false,
        }
    }

    fn run(pols: &[(u32, Policy)], eps: &[EndpointView]) -> (Compiled, IdentityTable) {
        let mut ids = IdentityTable::default();
        let ns = NamespaceMap::new();
        let c = compile(
            &Input {
                namespaces: &ns,
                policies: pols,
                endpoints: eps,
                host_addresses: &["10.0.0.1".parse().unwrap()],
                node_addresses: &[],
                tier_policies: &[],
            },
            &mut ids,
        );
        (c, ids)
    }

    /// The datapath's decision, done in user space on the compiled maps:
    /// longest-prefix match on the ipcache and the policy trie.
    fn allowed(
        c: &Compiled,
        ep: &EndpointView,
        dir: Direction,
        peer: &str,
        proto: u8,
        port: u16,
    ) -> bool {
        let flags = c.desired.endpoints[&ep.ifindex].flags;
        let iso = if dir == Direction::Ingress {
            EP_ISOLATE_INGRESS
        } else {
            EP_ISOLATE_EGRESS
        };
        if flags & iso == 0 {
            return true;
        }
        let peer_id = lpm_identity(c, peer.parse().unwrap());
        [peer_id, ID_ANY].iter().any(|&pid| {
            c.desired.policy.iter().any(|(k, _)| {
                let d = &k.data;
                d.ep_id == ep.ep_id
                    && d.direction == dir as u8
                    && d.peer_id == pid
                    && (k.prefixlen == POLICY_PREFIX_ANY_PROTO
                        || (d.protocol == proto && {
                            let bits = k.prefixlen - POLICY_PREFIX_ANY_PORT;
                            let mask = if bits == 0 {
                                0
                            } else {
                                u16::MAX << (16 - bits)
                            };
                            (u16::from_be(d.dport_be) & mask) == (port & mask)
                        }))
            })
        })
    }

    fn lpm_identity(c: &Compiled, ip: IpAddr) -> u32 {
        let a = abi::addr16(ip);
        c.desired
            .ipcache
            .iter()
            .filter(|(p, _)| {
                let bits = p.len as usize;
                (0..bits)
                    .all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (p.addr[i / 8] >> (7 - i % 8)) & 1)
            })
            .max_by_key(|(p, _)| p.len)
            .map(|(_, v)| v.identity)
            .unwrap_or(ID_WORLD)
    }

    /// The L7 flag of the one NetworkPolicy entry for `ep`'s ingress from
    /// `peer` on TCP `port` (None: no such entry).
    fn l7_entry(c: &Compiled, ep: &EndpointView, peer_id: u32, port: u16) -> Option<bool> {
        c.desired
            .policy
            .iter()
            .find(|(k, _)| {
                k.data.ep_id == ep.ep_id
                    && k.data.direction == Direction::Ingress as u8
                    && k.data.peer_id == peer_id
                    && k.prefixlen == POLICY_PREFIX_FULL
                    && u16::from_be(k.data.dport_be) == port
            })
            .map(|(_, v)| v.flags & abi::POLICY_F_L7 != 0)
    }

    /// The entry the datapath finds for `ep`'s ingress from `peer_id` on
    /// TCP `port`: the exact peer's shapes, longest first, then any peer's.
    fn datapath_entry(c: &Compiled, ep: u32, peer_id: u32, port: u16) -> Option<PolicyValue> {
        for pid in [peer_id, ID_ANY] {
            let key = |prefixlen: u32, protocol: u8, p: u16| PolicyKey {
                prefixlen,
                data: PolicyKeyData {
                    ep_id: ep,
                    direction: Direction::Ingress as u8,
                    tier: TIER_NETPOL,
                    pad1: 0,
                    peer_id: pid,
                    pad2: 0,
                    protocol,
                    dport_be: p.to_be(),
                },
            };
            let mut shapes = vec![key(POLICY_PREFIX_FULL, PROTO_TCP, port)];
            for bits in (1..16u32).rev() {
                let mask = u16::MAX << (16 - bits);
                shapes.push(key(POLICY_PREFIX_ANY_PORT + bits, PROTO_TCP, port & mask));
            }
            shapes.push(key(POLICY_PREFIX_ANY_PORT, PROTO_TCP, 0));
            shapes.push(key(POLICY_PREFIX_ANY_PROTO, 0, 0));
            if let Some(v) = shapes.iter().find_map(|k| c.desired.policy.get(k)) {
                return Some(*v);
            }
        }
        None
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PALISADE_PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
            .. proptest::prelude::ProptestConfig::default()
        })]

        /// Whatever the mix of rules with and without HTTP rules (any
        /// peer, one peer; one port, a named port, a range, every port,
        /// every protocol), the entry the datapath finds for a connection
        /// is an L7 one exactly when every rule allowing it has HTTP rules.
        #[test]
        fn the_entry_the_datapath_finds_is_l7_exactly_when_only_http_rules_allow(
            pols in proptest::collection::vec(
                (
                    proptest::bool::ANY,
                    proptest::collection::vec(
                        (0usize..3, proptest::collection::vec(0usize..8, 0..3)),
                        1..3,
                    ),
                ),
                1..4,
            )
        ) {
            const PEERS: [&str; 3] = [
                "",
                "from: [{podSelector: {matchLabels: {app: web}}}]",
                "from: [{podSelector: {matchLabels: {app: other}}}]",
            ];
            // (YAML, carries HTTP rules)
            const PORTS: [(&str, bool); 8] = [
                ("{port: 80, rules: {http: [{method: GET}]}}", true),
                ("{port: 80}", false),
                ("{port: http, rules: {http: [{path: /x}]}}", true),
                ("{port: http}", false),
                ("{port: 70, endPort: 90}", false),
                ("{protocol: TCP}", false),
                ("{port: 81, rules: {http: [{}]}}", true),
                ("{port: 81}", false),
            ];
            let mut yaml = String::new();
            for (i, (palisade, rules)) in pols.iter().enumerate() {
                let (api, kind) = if *palisade {
                    ("palisade.io/v1alpha1", "PalisadeNetworkPolicy")
                } else {
                    ("networking.k8s.io/v1", "NetworkPolicy")
                };
                yaml += &format!("---\napiVersion: {api}\nkind: {kind}\nmetadata: {{name: p{i}}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  ingress:\n");
                for (peer, ports) in rules {
                    let ports: Vec<&str> = ports
                        .iter()
                        .map(|&p| PORTS[p])
                        .filter(|(_, http)| *palisade || !http)
                        .map(|(y, _)| y)
                        .collect();
                    let mut rule = String::from("  - {");
                    rule += PEERS[*peer];
                    if !ports.is_empty() {
                        if *peer != 0 {
                            rule += ", ";
                        }
                        rule += &format!("ports: [{}]", ports.join(", "));
                    }
                    rule += "}\n";
                    yaml += &rule;
                }
            }
            let pols = policies(&yaml);
            let mut server = ep(1, "default", "api", &[("app", "api")], "10.0.0.10");
            server.ports = vec![NamedPort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }];
            let web = ep(2, "default", "web", &[("app", "web")], "10.0.0.11");
            let other = ep(3, "default", "other", &[("app", "other")], "10.0.0.12");
            let (c, _) = run(&pols, &[server.clone(), web.clone(), other.clone()]);
            let no_labels = Labels::new();
            for client in [&web, &other] {
                let peer_id = lpm_identity(&c, client.addresses[0]);
                let blocks = BTreeSet::new();
                let facts = PeerFacts {
                    pod: Some(("default", &no_labels, &client.labels)),
                    blocks: &blocks,
                    node: None,
                };
                for port in [80u16, 81, 85] {
                    // What the rules say: none allows; one without HTTP
                    // rules allows (every request); only HTTP rules.
                    let mut allowed = false;
                    let mut plain = false;
                    for (_, p) in &pols {
                        for r in &p.ingress {
                            if !r.peers.is_empty()
                                && !r.peers.iter().any(|x| peer_matches(x, &p.namespace, &facts))
                            {
                                continue;
                            }
                            match http_rules_of(r, PROTO_TCP, port, &server.ports) {
                                None => {}
                                Some(h) if h.is_empty() => {
                                    allowed = true;
                                    plain = true;
                                }
                                Some(_) => allowed = true,
                            }
                        }
                    }
                    let found = datapath_entry(&c, server.ep_id, peer_id, port);
                    proptest::prop_assert_eq!(
                        found.is_some(), allowed,
                        "{} -> api:{}\n{}", client.name, port, yaml
                    );
                    if let Some(v) = found {
                        proptest::prop_assert_eq!(
                            v.flags & abi::POLICY_F_L7 != 0, !plain,
                            "{} -> api:{} L7 flag\n{}", client.name, port, yaml
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn l7_entries_are_flagged_unless_a_rule_without_http_rules_also_allows() {
        let server = ep(1, "default", "api", &[("app", "api")], "10.0.0.10");
        let client = ep(2, "default", "web", &[("app", "web")], "10.0.0.11");
        let l7 = "apiVersion: palisade.io/v1alpha1\nkind: PalisadeNetworkPolicy\nmetadata: {name: l7}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 80, rules: {http: [{method: GET}]}}, {port: 81}]\n";
        let (c, _) = run(&policies(l7), &[server.clone(), client.clone()]);
        let web = lpm_identity(&c, "10.0.0.11".parse().unwrap());
        assert_eq!(l7_entry(&c, &server, web, 80), Some(true));
        assert_eq!(l7_entry(&c, &server, web, 81), Some(false));

        // The same port allowed without HTTP rules by another policy, for
        // the same peer: every request is allowed, no proxy.
        let plain_same = format!(
            "{l7}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: plain}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]\n    ports: [{{port: 80}}]\n"
        );
        let (c, _) = run(&policies(&plain_same), &[server.clone(), client.clone()]);
        assert_eq!(l7_entry(&c, &server, web, 80), Some(false));

        // A wider rule (every peer, ports 1-1023) the datapath would find
        // after the exact peer's entry: the flag goes too.
        let plain_wide = format!(
            "{l7}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: plain}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  ingress:\n  - ports: [{{port: 1, endPort: 1023}}]\n"
        );
        let (c, _) = run(&policies(&plain_wide), &[server.clone(), client.clone()]);
        assert_eq!(l7_entry(&c, &server, web, 80), Some(false));

        // A plain rule for another port leaves it.
        let plain_other = format!(
            "{l7}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: plain}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  ingress:\n  - ports: [{{port: 8080}}]\n"
        );
        let (c, _) = run(&policies(&plain_other), &[server.clone(), client]);
        assert_eq!(l7_entry(&c, &server, web, 80), Some(true));
    }

    #[test]
    fn port_ranges_split_into_few_prefixes() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(1024, 2047), vec![(1024, 6)]);
        let p = port_prefixes(1, 65535);
        assert!(p.len() <= 30, "{p:?}");
        // Every port in the range is covered exactly once, none outside.
        for (a, b) in [
            (1u16, 65535u16),
            (3000, 3005),
            (81, 81),
            (1000, 2000),
            (65534, 65535),
        ] {
            let pre = port_prefixes(a, b);
            for port in [
                0u32, 1, 79, 80, 81, 999, 1000, 1500, 2000, 2001, 2999, 3000, 3005, 3006, 65534,
                65535,
            ] {
                let hits = pre
                    .iter()
                    .filter(|(s, bits)| {
                        let mask = if *bits == 0 {
                            0
                        } else {
                            u16::MAX << (16 - bits)
                        };
                        (port as u16 & mask) == (*s & mask)
                    })
                    .count();
                let want = usize::from((a as u32..=b as u32).contains(&port));
                assert_eq!(hits, want, "range {a}-{b} port {port} prefixes {pre:?}");
            }
        }
    }

    #[test]
    fn endpoint_flags_name_the_entry_shapes_the_datapath_must_look_up() {
        let pols = policies(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: shapes, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{protocol: TCP, port: 80}]
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{protocol: UDP, port: 1024, endPort: 1279}, {protocol: UDP, port: 2000, endPort: 2001}]
  egress:
  - to: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{protocol: SCTP}]
  - to: [{podSelector: {matchLabels: {pod: b}}}]
"#,
        );
        let a = ep(1, "x", "a", &[("pod", "a")], "10.0.0.2");
        let b = ep(2, "x", "b", &[("pod", "b")], "10.0.0.3");
        let (c, _) = run(&pols, &[a.clone(), b.clone()]);
        let va = c.desired.endpoints[&a.ifindex];
        assert_eq!(
            va.flags,
            EP_ISOLATE_INGRESS
                | EP_ISOLATE_EGRESS
                | abi::EP_HAS_ANY_PORT_EGRESS
                | abi::EP_HAS_ANY_PROTO_EGRESS
        );
        // 1024-1279: one block of 256 ports (prefix of 8 bits); 2000-2001:
        // one block of 2 (15 bits).
        assert_eq!(va.range_lens, (1 << 7) | (1 << 14));
        assert_eq!(c.desired.endpoints[&b.ifindex].flags, 0);
        assert_eq!(c.desired.endpoints[&b.ifindex].range_lens, 0);
        // Every entry is one the flags let the datapath find.
        for k in c.desired.policy.keys() {
            let (flag, lens) = abi::ep_shape(k.data.direction, k.prefixlen);
            assert_eq!(va.flags & flag, flag, "{k:?}");
            assert_eq!(va.range_lens & lens, lens, "{k:?}");
        }
        for (port, want) in [(80, true), (81, false)] {
            assert_eq!(
                allowed(&c, &a, Direction::Ingress, "10.0.0.3", PROTO_TCP, port),
                want
            );
        }
        for (port, want) in [
            (1023, false),
            (1024, true),
            (1279, true),
            (1280, false),
            (1999, false),
            (2000, true),
            (2001, true),
            (2002, false),
        ] {
            assert_eq!(
                allowed(&c, &a, Direction::Ingress, "10.0.0.3", PROTO_UDP, port),
                want,
                "udp {port}"
            );
        }
        assert!(allowed(
            &c,
            &a,
            Direction::Egress,
            "10.0.0.3",
            PROTO_UDP,
            53
        ));
    }

    #[test]
    fn default_deny_isolates_without_entries_and_unselected_pods_stay_open() {
        let pols = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n",
        );
        let a = ep(1, "x", "a", &[("pod", "a")], "10.0.0.2");
        let b = ep(2, "x", "b", &[("pod", "b")], "10.0.0.3");
        let (c, _) = run(&pols, &[a.clone(), b.clone()]);
        assert_eq!(c.desired.endpoints[&a.ifindex].flags, EP_ISOLATE_INGRESS);
        assert_eq!(c.desired.endpoints[&b.ifindex].flags, 0);
        assert!(c.desired.policy.is_empty());
        assert!(!allowed(
            &c,
            &a,
            Direction::Ingress,
            "10.0.0.3",
            PROTO_TCP,
            80
        ));
        assert!(allowed(
            &c,
            &a,
            Direction::Egress,
            "10.0.0.3",
            PROTO_TCP,
            80
        ));
        assert!(allowed(
            &c,
            &b,
            Direction::Ingress,
            "10.0.0.2",
            PROTO_TCP,
            80
        ));
    }

    #[test]
    fn pod_and_namespace_selectors_and_vs_or() {
        let pols = policies(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: and, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
      podSelector: {matchLabels: {pod: b}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: or, namespace: x}
spec:
  podSelector: {matchLabels: {pod: c}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
    - podSelector: {matchLabels: {pod: b}}
"#,
        );
        let xa = ep(1, "x", "a", &[("pod", "a")], "10.0.0.2");
        let xb = ep(2, "x", "b", &[("pod", "b")], "10.0.0.3");
        let xc = ep(3, "x", "c", &[("pod", "c")], "10.0.0.4");
        let ya = ep(4, "y", "a", &[("pod", "a")], "10.0.0.5");
        let yb = ep(5, "y", "b", &[("pod", "b")], "10.0.0.6");
        let (c, _) = run(&pols, &[xa.clone(), xb, xc.clone(), ya, yb]);
        // AND: only y/b may reach x/a.
        assert!(allowed(
            &c,
            &xa,
            Direction::Ingress,
            "10.0.0.6",
            PROTO_TCP,
            80
        ));
        assert!(!allowed(
            &c,
            &xa,
            Direction::Ingress,
            "10.0.0.5",
            PROTO_TCP,
            80
        ));
        assert!(!allowed(
            &c,
            &xa,
            Direction::Ingress,
            "10.0.0.3",
            PROTO_TCP,
            80
        ));
        // OR: all of y, and x/b.
        assert!(allowed(
            &c,
            &xc,
            Direction::Ingress,
            "10.0.0.5",
            PROTO_TCP,
            80
        ));
        assert!(allowed(
            &c,
            &xc,
            Direction::Ingress,
            "10.0.0.6",
            PROTO_TCP,
            80
        ));
        assert!(allowed(
            &c,
            &xc,
            Direction::Ingress,
            "10.0.0.3",
            PROTO_TCP,
            80
        ));
        assert!(!allowed(
            &c,
            &xc,
            Direction::Ingress,
            "10.0.0.2",
            PROTO_TCP,
            80
        ));
        // The world is nobody's pod.
        assert!(!allowed(
            &c,
            &xc,
            Direction::Ingress,
            "192.0.2.1",
            PROTO_TCP,
            80
        ));
    }

    #[test]
    fn ip_block_with_except_matches_pods_inside_but_not_same_labelled_pods_outside() {
        let pols = policies(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.4/32]}
"#,
        );
        let a = ep(1, "x", "a", &[("pod", "a")], "10.0.0.2");
        let inside = ep(2, "x", "b1", &[("pod", "b")], "10.0.0.3");
        let excepted = ep(3, "x", "b2", &[("pod", "b")], "10.0.0.4");
        let outside = ep(4, "x", "b3", &[("pod", "b")], "10.0.1.3");
        let (c, _) = run(&pols, &[a.clone(), inside, excepted, outside]);
        assert!(allowed(
            &c,
            &a,
            Direction::Egress,
            "10.0.0.3",
            PROTO_TCP,
            80
        ));
        assert!(!allowed(
            &c,
            &a,
            Direction::Egress,
            "10.0.0.4",
            PROTO_TCP,
            80
        ));
        assert!(!allowed(
            &c,
            &a,
            Direction::Egress,
            "10.0.1.3",
            PROTO_TCP,
            80
        ));
        // Non-pod addresses: the CIDR minus the exception.
        assert!(allowed(
            &c,
            &a,
            Direction::Egress,
            "10.0.0.200",
            PROTO_UDP,
            53
        ));
        assert!(!allowed(
            &c,
            &a,
            Direction::Egress,
            "192.0.2.1",
            PROTO_UDP,
            53
        ));
        // Same labels, different identities (inside vs outside the block).
        let ids: BTreeSet<u32> = ["10.0.0.3", "10.0.0.4", "10.0.1.3"]
            .iter()
            .map(|a| lpm_identity(&c, a.parse().unwrap()))
            .collect();
        assert_eq!(
            ids.len(),
            2,
            "10.0.0.4 and 10.0.1.3 share the not-in-block identity"
        );
    }

    #[test]
    fn ipv6_blocks_never_match_ipv4_addresses() {
        let pols = policies(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: v6, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: "::/0"}}]
"#,
        );
        let a = ep(1, "x", "a", &[], "10.0.0.2");
        let (c, _) = run(&pols, std::slice::from_ref(&a));
        assert!(allowed(
            &c,
            &a,
            Direction::Egress,
            "2001:db8::1",
            PROTO_TCP,
            80
        ));
        assert!(!allowed(
            &c,
            &a,
            Direction::Egress,
            "192.0.2.1",
            PROTO_TCP,
            80
        ));
    }

    #[test]
    fn named_ports_resolve_on_the_destination_pod() {
        let pols = policies(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: http}]
  egress:
  - ports: [{port: http}]
"#,
        );
        let http = |port| NamedPort {
            name: "http".into(),
            port,
            protocol: Protocol::Tcp,
        };
        let mut a = ep(1, "x", "a", &[("app", "web")], "10.0.0.2");
        a.ports = vec![http(80)];
        let mut b = ep(2, "x", "b", &[("app", "web")], "10.0.0.3");
        b.ports = vec![http(8080)];
        let (c, _) = run(&pols, &[a.clone(), b.clone()]);
        assert!(allowed(
            &c,
            &a,
            Direction::Ingress,
            "10.0.0.3",
            PROTO_TCP,
            80
        ));
        assert!(!allowed(
            &c,
            &a,
            Direction::Ingress,
            "10.0.0.3",
            PROTO_TCP,
            8080
        ));
        assert!(allowed(
            &c,
            &b,
            Direction::Ingress,
            "10.0.0.2",
            PROTO_TCP,
            8080
        ));
        // Same labels, different numbers: egress resolves per destination.
        assert!(allowed(
            &c,
            &a,
            Direction::Egress,
            "10.0.0.3",
            PROTO_TCP,
            8080
        ));
        assert!(!allowed(
            &c,
            &a,
            Direction::Egress,
            "10.0.0.3",
            PROTO_TCP,
            80
        ));
        assert!(allowed(
            &c,
            &b,
            Direction::Egress,
            "10.0.0.2",
            PROTO_TCP,
            80
        ));
        assert!(!allowed(
            &c,
            &b,
            Direction::Egress,
            "10.0.0.2",
            PROTO_TCP,
            8080
        ));
        // A named port never resolves on a non-pod address.
        assert!(!allowed(
            &c,
            &a,
            Direction::Egress,
            "192.0.2.1",
            PROTO_TCP,
            80
        ));
    }

    #[test]
    fn end_port_ranges_and_protocols() {
        let pols = policies(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: range, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: 80, endPort: 82, protocol: UDP}]
"#,
        );
        let a = ep(1, "x", "a", &[], "10.0.0.2");
        let (c, _) = run(&pols, std::slice::from_ref(&a));
        for (port, want) in [(79, false), (80, true), (81, true), (82, true), (83, false)] {
            assert_eq!(
                allowed(&c, &a, Direction::Ingress, "10.0.0.9", PROTO_UDP, port),
                want,
                "udp {port}"
            );
        }
        assert!(!allowed(
            &c,
            &a,
            Direction::Ingress,
            "10.0.0.9",
            PROTO_TCP,
            80
        ));
        assert!(
            c.desired.policy.len() <= 2,
            "80-82 is two prefixes: {:?}",
            c.desired.policy
        );
    }

    #[test]
    fn union_of_policies_and_empty_rules_allow_everything() {
        let pols = policies(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{}]
"#,
        );
        let a = ep(1, "x", "a", &[("pod", "a")], "10.0.0.2");
        let b = ep(2, "x", "b", &[("pod", "b")], "10.0.0.3");
        let (c, _) = run(&pols, &[a.clone(), b.clone()]);
        assert!(allowed(&c, &a, Direction::Ingress, "192.0.2.1", 1, 0));
        assert!(!allowed(
            &c,
            &a,
            Direction::Egress,
            "10.0.0.3",
            PROTO_TCP,
            80
        ));
        assert!(!allowed(
            &c,
            &b,
            Direction::Ingress,
            "10.0.0.2",
            PROTO_TCP,
            80
        ));
        // The allow-all entry names its policy.
        let v = c.desired.policy.values().next().unwrap();
        assert_eq!(v.policy_id, 2);
    }

    #[test]
    fn the_newest_endpoint_wins_a_shared_address_and_each_owns_its_sources() {
        let stale = ep(7, "x", "old", &[("app", "db-client")], "10.0.0.5");
        let fresh = ep(9, "x", "new", &[("app", "web")], "10.0.0.5");
        // Whatever order the store lists them in.
        for eps in [
            vec![stale.clone(), fresh.clone()],
            vec![fresh.clone(), stale.clone()],
        ] {
            let (c, ids) = run(&[], &eps);
            let id = lpm_identity(&c, "10.0.0.5".parse().unwrap());
            let key = ids.key_of(id).unwrap();
            assert_eq!(
                key.labels.get("app").map(String::as_str),
                Some("web"),
                "{key:?}"
            );
            assert!(
                c.warnings.iter().any(|w| w.contains("newer one (new)")),
                "{:?}",
                c.warnings
            );
            assert!(c.desired.srcguard.contains(&SrcguardKey {
                ep_id: 9,
                addr: abi::addr16("10.0.0.5".parse().unwrap())
            }));
        }
    }

    #[test]
    fn audited_policies_report_instead_of_drop_unless_an_enforced_one_also_isolates() {
        let mut pols = policies(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: audited, namespace: x, annotations: {palisade.io/mode: audit}}
spec:
  podSelector: {}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
"#,
        );
        assert_eq!(pols[0].1.mode, Some(Mode::Audit));
        let a = ep(1, "x", "a", &[("pod", "a")], "10.0.0.2");
        let (c, _) = run(&pols, std::slice::from_ref(&a));
        let flags = c.desired.endpoints[&a.ifindex].flags;
        assert_eq!(flags, EP_ISOLATE_INGRESS | abi::EP_AUDIT_INGRESS);
        // An enforced policy isolating the same direction makes it enforce.
        pols.extend(policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: enforced, namespace: x}\nspec:\n  podSelector: {}\n",
        ).into_iter().map(|(_, p)| (9, p)));
        let b = ep(2, "x", "b", &[("pod", "b")], "10.0.0.3");
        let (c, _) = run(&pols, &[a.clone(), b]);
        assert_eq!(
            c.desired.endpoints[&a.ifindex].flags,
            EP_ISOLATE_INGRESS | abi::EP_HAS_ANY_PROTO_INGRESS
        );
        // The audited policy's allow rule still allows, the rest is denied.
        assert!(allowed(
            &c,
            &a,
            Direction::Ingress,
            "10.0.0.3",
            PROTO_TCP,
            80
        ));
        assert!(!allowed(
            &c,
            &a,
            Direction::Ingress,
            "10.0.0.9",
            PROTO_TCP,
            80
        ));
    }

    #[test]
    fn host_addresses_map_to_the_host_identity() {
        let (c, _) = run(&[], &[ep(1, "x", "a", &[], "10.0.0.2")]);
        assert_eq!(lpm_identity(&c, "10.0.0.1".parse().unwrap()), ID_HOST);
        assert_eq!(lpm_identity(&c, "192.0.2.7".parse().unwrap()), ID_WORLD);
    }

    #[test]
    fn the_block_index_agrees_with_testing_every_block() {
        let nets =
            |v: &[&str]| -> Vec<IpNetwork> { v.iter().map(|s| s.parse().unwrap()).collect() };
        let blocks = vec![
            IpBlock {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: nets(&["10.1.0.0/16", "10.2.3.0/24"]),
            },
            IpBlock {
                cidr: "10.1.0.0/16".parse().unwrap(),
                except: Vec::new(),
            },
            IpBlock {
                cidr: "10.1.2.3/32".parse().unwrap(),
                except: Vec::new(),
            },
            IpBlock {
                cidr: "0.0.0.0/0".parse().unwrap(),
                except: nets(&["10.0.0.0/8"]),
            },
            IpBlock {
                cidr: "fd00::/8".parse().unwrap(),
                except: nets(&["fd00:1::/32"]),
            },
            IpBlock {
                cidr: "::/0".parse().unwrap(),
                except: Vec::new(),
            },
        ];
        let index = BlockIndex::new(&blocks);
        let probes = [
            "10.0.0.1",
            "10.1.0.1",
            "10.1.2.3",
            "10.2.3.4",
            "10.2.4.4",
            "192.0.2.1",
            "fd00::1",
            "fd00:1::1",
            "2001:db8::1",
        ];
        for probe in probes {
            let addr: IpAddr = probe.parse().unwrap();
            let brute: BTreeSet<String> = blocks
                .iter()
                .filter(|b| b.contains(addr))
                .map(IpBlock::canonical)
                .collect();
            assert_eq!(index.of_addr(addr), brute, "{probe}");
        }
        // A prefix is in a block only when it is wholly inside it.
        let wide: IpNetwork = "10.0.0.0/8".parse().unwrap();
        assert_eq!(
            index.of_prefix(&wide),
            ["10.0.0.0/8!10.1.0.0/16!10.2.3.0/24".to_string()].into()
        );
        let except: IpNetwork = "10.1.0.0/16".parse().unwrap();
        assert_eq!(index.of_prefix(&except), ["10.1.0.0/16".to_string()].into());
    }
}
