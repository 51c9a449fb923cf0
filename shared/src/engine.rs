//! The incremental engine: the node's objects and endpoints held as indexes
//! (labels → identity, selector → matching identities and endpoints,
//! policy → rules, identity → the rules whose peers it is), so that one
//! event computes only the map entries it changes.
//!
//! It produces exactly what [`compile::compile`] produces from the same
//! inputs (the property test in this module checks it after random event
//! sequences); the full compile stays as that oracle and as the repair
//! path. Entries that several rules produce are reference-counted, and the
//! policy reported for an entry is the first in (namespace, name) order
//! among those that produce it, as in the full compile.
//!
//! Events change the in-memory state and the desired maps; [`Engine::finish`]
//! then returns the net difference (only entries whose value changed), the
//! identities allocated and released, and warnings.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

// The engine's maps are keyed by its own numbers and names: a fast hash,
// no need for one that resists chosen keys.
use rustc_hash::FxHashMap as HashMap;

use ipnetwork::IpNetwork;

use crate::{
    abi::{
        self, Direction, EndpointValue, ID_ANY, ID_HOST, ID_WORLD, IpcacheValue,
        POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, PolicyKey,
        PolicyKeyData, PolicyValue, SrcguardKey, TIER_NETPOL, Verdict,
    },
    compile::{
        self, BlockIndex, Desired, EndpointView, PeerFacts, Prefix, is_l7_egress, l7_flag_of,
        port_prefixes,
    },
    identity::{IdentityKey, IdentityTable},
    policy::{
        IpBlock, Labels, Mode, NamedPort, NamespaceInfo, NamespaceMap, NamespaceScope, Peer,
        PodInfo, Policy, PortMatch, PortRule, Protocol, Rule, Selector, effective_labels,
        effective_mode, tier::TierPolicy,
    },
    tiers,
};

/// What the engine needs of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInput {
    pub ep_id: u32,
    pub ifindex: u32,
    pub namespace: String,
    pub name: String,
    /// Labels the runtime gave (a Pod object's labels overlay them).
    pub labels: Labels,
    pub addresses: Vec<IpAddr>,
    /// A pod on another node (cluster mode): its addresses get its
    /// identity, so rules can name it as a peer, but nothing here enforces
    /// for it (no endpoint entry, no policy entries, no source guard).
    /// `ifindex` is 0. Where a local endpoint and a remote one claim the
    /// same address, the local one owns it.
    pub remote: bool,
}

/// Net changes to the datapath maps since the last [`Engine::finish`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub policy: Vec<(PolicyKey, Option<PolicyValue>)>,
    pub ipcache: Vec<(Prefix, Option<IpcacheValue>)>,
    /// By host veth ifindex.
    pub endpoints: Vec<(u32, Option<EndpointValue>)>,
    /// `true`: add, `false`: remove.
    pub srcguard: Vec<(SrcguardKey, bool)>,
    /// Something was taken away (an allow entry removed, an address's
    /// identity changed, isolation added): established flows must be
    /// checked again (the datapath's epoch).
    pub revokes: bool,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.policy.is_empty()
            && self.ipcache.is_empty()
            && self.endpoints.is_empty()
            && self.srcguard.is_empty()
    }

    pub fn len(&self) -> usize {
        self.policy.len() + self.ipcache.len() + self.endpoints.len() + self.srcguard.len()
    }
}

/// What one batch of events changed.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub delta: Delta,
    /// What writes the replaced values back (to undo `delta` when the
    /// store cannot take the change).
    pub undo: Delta,
    /// Identities allocated (and still used).
    pub identities_added: Vec<(u32, IdentityKey)>,
    /// Identities no address uses any more.
    pub identities_removed: Vec<u32>,
    pub warnings: Vec<String>,
}

/// A vector with stable indexes and reuse of freed slots.
#[derive(Debug)]
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, t: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(t);
                i
            }
            None => {
                self.items.push(Some(t));
                self.items.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) -> Option<T> {
        let t = self.items.get_mut(i)?.take();
        if t.is_some() {
            self.free.push(i);
        }
        t
    }

    fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (i, t)))
    }
}

impl<T> std::ops::Index<usize> for Slab<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        self.items[i].as_ref().expect("live slab entry")
    }
}

impl<T> std::ops::IndexMut<usize> for Slab<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        self.items[i].as_mut().expect("live slab entry")
    }
}

/// Shape slots per direction: the any-protocol entry, then port prefix
/// lengths 0 to 16 (`POLICY_PREFIX_ANY_PORT + bits`).
const SHAPE_SLOTS: usize = 18;

fn shape_slot(prefixlen: u32) -> usize {
    if prefixlen == POLICY_PREFIX_ANY_PROTO {
        0
    } else {
        1 + (prefixlen - POLICY_PREFIX_ANY_PORT) as usize
    }
}

fn slot_prefixlen(slot: usize) -> u32 {
    if slot == 0 {
        POLICY_PREFIX_ANY_PROTO
    } else {
        POLICY_PREFIX_ANY_PORT + (slot as u32 - 1)
    }
}

/// What an endpoint's map value is made of, counted so that each event
/// adjusts it by what it changes.
#[derive(Debug, Clone)]
struct EpOut {
    /// Selecting policies that isolate each direction.
    isolating: [u32; 2],
    /// ... of which enforce (the rest only audit).
    enforcing: [u32; 2],
    /// Distinct policy entries of this endpoint per direction and shape.
    shapes: [u32; 2 * SHAPE_SLOTS],
    /// Admin and baseline entries, by direction then tier (admin first).
    tiers: [u32; 4],
    /// Selecting policies that send the endpoint's DNS to the proxy.
    dns: u32,
    /// A selecting tier policy names domains (its DNS goes to the proxy).
    tier_dns: bool,
    /// NetworkPolicy egress entries with the L7 flag (`EP_L7_EGRESS`).
    l7_egress: u32,
}

impl Default for EpOut {
    fn default() -> Self {
        Self {
            isolating: [0; 2],
            enforcing: [0; 2],
            shapes: [0; 2 * SHAPE_SLOTS],
            tiers: [0; 4],
            dns: 0,
            tier_dns: false,
            l7_egress: 0,
        }
    }
}

#[derive(Debug)]
struct EpState {
    input: EndpointInput,
    /// Effective labels (the Pod object's over the runtime's); empty for
    /// remote pods, whose labels are their Pod object's (kept once, in
    /// `Engine::pods`: a cluster has many).
    labels: Labels,
    /// The Pod object's named ports.
    ports: Vec<NamedPort>,
    /// The identity of each address, in `input.addresses` order.
    addr_ids: Vec<u32>,
    /// The endpoint's own identity (its first address's).
    own: u32,
    /// Local endpoints only (a remote pod has no map value).
    out: Option<Box<EpOut>>,
}

#[derive(Debug, Default)]
struct AddrState {
    /// Endpoints that claim the address, as (local, id): a local one owns
    /// it over remote ones, and among equals the newest (highest id).
    claimants: BTreeSet<(bool, u32)>,
    /// One of the node's own addresses.
    host: bool,
    /// How many other nodes (Node objects) name the address.
    node: u32,
    /// The node identity the address holds while it is another node's and
    /// nothing before it (an endpoint, this node) owns it.
    node_id: Option<u32>,
}

#[derive(Debug)]
struct Region {
    net: IpNetwork,
    refs: u32,
    id: Option<u32>,
}

/// A distinct rule peer (peers are shared between the rules and policies
/// that write the same one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SelKey {
    /// A `from`/`to` entry; `policy_ns` is empty for ipBlocks (they do not
    /// depend on the policy's namespace).
    Peer { policy_ns: String, peer: Peer },
    /// Every identity (an egress rule without peers that names ports: the
    /// names resolve on every destination).
    All,
    /// Other nodes' addresses whose Node labels match (tier policies'
    /// `nodes` peers).
    Nodes(Selector),
}

#[derive(Debug)]
struct PeerSel {
    key: SelKey,
    users: u32,
    /// Uses by tier policies (a change of `matches` re-resolves cells).
    tier_users: u32,
    matches: BTreeSet<u32>,
    /// Rules that use it (a rule appears once per use).
    rules: Vec<usize>,
}

#[derive(Debug)]
struct SubjSel {
    namespace: String,
    selector: Selector,
    users: u32,
    matches: BTreeSet<u32>,
    policies: BTreeSet<usize>,
}

#[derive(Debug)]
struct RuleState {
    pol: usize,
    policy_id: u32,
    dir: Direction,
    /// No peers: every peer.
    any: bool,
    sels: Vec<usize>,
    ports: Vec<PortRule>,
    /// Peer identities, with how many of the rule's selectors match each
    /// (sorted by identity; usually a handful).
    peers: Vec<(u32, u32)>,
}

#[derive(Debug)]
struct PolState {
    id: u32,
    policy: Policy,
    /// Effective mode.
    mode: Mode,
    subj: usize,
    rules: Vec<usize>,
    blocks: Vec<IpBlock>,
    egress_names: Vec<(String, Protocol)>,
}

/// The policies in (namespace, name) order as numbers, so that comparing
/// two is one integer comparison. New names get a number between their
/// neighbours'; when there is no room, all are numbered again (in order,
/// so every comparison keeps its answer).
#[derive(Debug, Default)]
struct Ranks {
    by_name: BTreeMap<(String, String), u64>,
    /// Policy id → (rank, versions holding it, name).
    of: HashMap<u32, (u64, u32, (String, String))>,
}

const RANK_STEP: u64 = 1 << 32;

impl Ranks {
    fn add(&mut self, id: u32, name: (String, String)) {
        if let Some(r) = self.of.get_mut(&id) {
            r.1 += 1;
            return;
        }
        let lo = self
            .by_name
            .range(..name.clone())
            .next_back()
            .map(|(_, r)| *r);
        let hi = self
            .by_name
            .range((
                std::ops::Bound::Excluded(name.clone()),
                std::ops::Bound::Unbounded,
            ))
            .next()
            .map(|(_, r)| *r);
        let rank = match (lo, hi) {
            (None, None) => Some(u64::MAX / 2),
            (Some(l), None) => l.checked_add(RANK_STEP),
            (None, Some(h)) => h.checked_sub(RANK_STEP),
            (Some(l), Some(h)) => (h - l > 1).then(|| l + (h - l) / 2),
        };
        let rank = rank.unwrap_or_else(|| {
            self.by_name.insert(name.clone(), 0);
            self.renumber();
            self.by_name[&name]
        });
        self.by_name.insert(name.clone(), rank);
        let rank = self.by_name[&name];
        self.of.insert(id, (rank, 1, name));
    }

    fn renumber(&mut self) {
        let ids: HashMap<(String, String), u32> = self
            .of
            .iter()
            .map(|(id, (_, _, n))| (n.clone(), *id))
            .collect();
        for (i, (name, r)) in self.by_name.iter_mut().enumerate() {
            *r = (i as u64 + 1) * (u64::MAX / (ids.len() as u64 + 2));
            if let Some(id) = ids.get(name)
                && let Some(o) = self.of.get_mut(id)
            {
                o.0 = *r;
            }
        }
    }

    fn remove(&mut self, id: u32) {
        if let Some(r) = self.of.get_mut(&id) {
            r.1 -= 1;
            if r.1 == 0
                && let Some((_, _, name)) = self.of.remove(&id)
            {
                self.by_name.remove(&name);
            }
        }
    }

    fn get(&self, id: u32) -> u64 {
        self.of.get(&id).map_or(u64::from(id), |r| r.0)
    }
}

/// The policies that produce one entry, by id with how many of their rules
/// do, and the one the entry reports (the first by name).
#[derive(Debug, Default)]
struct Contribs {
    reported: u32,
    by_id: Vec<(u32, u32)>,
    /// Contributions from port entries without HTTP rules: while there are
    /// any, the entry is not an L7 one.
    plain: u32,
}

/// Old values of every map entry changed since the last `finish`.
#[derive(Debug, Default)]
struct Journal {
    enabled: bool,
    policy: HashMap<PolicyKey, Option<PolicyValue>>,
    ipcache: HashMap<Prefix, Option<IpcacheValue>>,
    endpoints: HashMap<u32, Option<EndpointValue>>,
    srcguard: HashMap<SrcguardKey, bool>,
}

#[derive(Clone, Copy)]
enum PeerRef {
    Any,
    Id(u32),
}

/// A tier policy and what it references.
#[derive(Debug)]
struct TierPolState {
    policy: TierPolicy,
    sels: Vec<usize>,
    blocks: Vec<IpBlock>,
    names: Vec<(String, Protocol)>,
}

/// A cell: direction, tier, peer identity (see [`crate::tiers`]).
type CellKey = (u8, u8, u32);

/// The engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    // Inputs.
    namespaces: HashMap<String, NamespaceInfo>,
    pods: HashMap<(String, String), PodInfo>,
    node_mode: Mode,
    host: BTreeSet<IpAddr>,
    /// Other nodes' addresses, by node name.
    nodes: HashMap<String, BTreeSet<IpAddr>>,
    /// Other nodes' labels (what `nodes` peers select), by node name.
    node_labels: HashMap<String, Labels>,
    /// The nodes that name each address (the first by name gives its
    /// labels to the address's identity).
    addr_nodes: HashMap<[u8; 16], BTreeSet<String>>,
    eps: BTreeMap<u32, EpState>,
    eps_by_ns: HashMap<String, BTreeSet<u32>>,
    eps_by_pod: HashMap<(String, String), BTreeSet<u32>>,
    eps_by_port: HashMap<(String, Protocol), BTreeSet<u32>>,
    ifindex_claims: HashMap<u32, BTreeSet<u32>>,

    // Identities: numbers, reference counts (all users, and those that
    // make the identity a peer rules can match), and indexes of the
    // visible ones.
    ids: IdentityTable,
    id_refs: HashMap<u32, (u32, u32)>,
    visible: BTreeSet<u32>,
    ids_by_ns: HashMap<String, BTreeSet<u32>>,
    ids_by_block: HashMap<String, BTreeSet<u32>>,
    gc: BTreeSet<u32>,
    /// Identity number → whether it existed before this batch.
    id_journal: BTreeMap<u32, bool>,

    // Addresses, ipBlocks and the prefixes they put in the ipcache.
    addrs: BTreeMap<[u8; 16], AddrState>,
    blocks: HashMap<String, (IpBlock, u32)>,
    block_index: BlockIndex,
    regions: BTreeMap<([u8; 16], u32), Region>,
    egress_names: HashMap<(String, Protocol), u32>,

    // Selectors, rules and policies.
    sels: Slab<PeerSel>,
    sel_index: HashMap<SelKey, usize>,
    sel_by_block: HashMap<String, usize>,
    pod_sels_own: HashMap<String, BTreeSet<usize>>,
    pod_sels_matching: BTreeSet<usize>,
    node_sels: BTreeSet<usize>,
    all_sel: Option<usize>,
    subjs: Slab<SubjSel>,
    subj_index: HashMap<(String, Selector), usize>,
    subj_by_ns: HashMap<String, BTreeSet<usize>>,
    rules: Slab<RuleState>,
    pols: Slab<PolState>,
    pol_by_id: HashMap<u32, usize>,
    pols_by_ns: HashMap<String, BTreeSet<usize>>,
    pol_rank: Ranks,

    // Tier policies (few): cells are re-resolved at `finish` for the
    // endpoints and identities events marked.
    tier_pols: BTreeMap<u32, TierPolState>,
    tier_cells: HashMap<u32, BTreeMap<CellKey, Vec<(PolicyKey, PolicyValue)>>>,
    tier_dirty_eps: BTreeSet<u32>,
    tier_dirty_ids: BTreeSet<u32>,
    tier_all: bool,
    /// Endpoints whose DNS a tier policy sends to the proxy.
    tier_dns_eps: usize,

    // Output.
    desired: Desired,
    /// Policy entry → the policies that produce it.
    contrib: HashMap<PolicyKey, Contribs>,
    /// Reused buffers (the hot paths allocate nothing per entry).
    scratch_keys: Vec<(PolicyKey, bool)>,
    /// Per endpoint, its NetworkPolicy entries that only HTTP rules produce
    /// (whether they keep the L7 flag depends on the entries covering
    /// them, settled at `finish`), and the endpoints to settle.
    l7_keys: HashMap<u32, BTreeSet<PolicyKey>>,
    l7_dirty: BTreeSet<u32>,
    scratch_ids: Vec<u32>,
    journal: Journal,
    dirty_ifindex: BTreeSet<u32>,
    warnings: Vec<String>,
}

/// The 16-byte address range a network spans.
fn range16(net: &IpNetwork) -> ([u8; 16], [u8; 16]) {
    let p = Prefix::from_net(*net);
    let mut hi = p.addr;
    for bit in p.len as usize..128 {
        hi[bit / 8] |= 0x80 >> (bit % 8);
    }
    (p.addr, hi)
}

fn host_prefix(addr: [u8; 16]) -> Prefix {
    Prefix { len: 128, addr }
}

impl Engine {
    /// An empty engine that numbers identities with `ids` (numbers already
    /// in it are kept for the same keys).
    pub fn new(ids: IdentityTable, node_mode: Mode) -> Self {
        let mut e = Engine {
            namespaces: HashMap::default(),
            pods: HashMap::default(),
            node_mode,
            host: BTreeSet::new(),
            nodes: HashMap::default(),
            node_labels: HashMap::default(),
            addr_nodes: HashMap::default(),
            eps: BTreeMap::new(),
            eps_by_ns: HashMap::default(),
            eps_by_pod: HashMap::default(),
            eps_by_port: HashMap::default(),
            ifindex_claims: HashMap::default(),
            ids,
            id_refs: HashMap::default(),
            visible: BTreeSet::new(),
            ids_by_ns: HashMap::default(),
            ids_by_block: HashMap::default(),
            gc: BTreeSet::new(),
            id_journal: BTreeMap::new(),
            addrs: BTreeMap::new(),
            blocks: HashMap::default(),
            block_index: BlockIndex::default(),
            regions: BTreeMap::new(),
            egress_names: HashMap::default(),
            sels: Slab::default(),
            sel_index: HashMap::default(),
            sel_by_block: HashMap::default(),
            pod_sels_own: HashMap::default(),
            pod_sels_matching: BTreeSet::new(),
            node_sels: BTreeSet::new(),
            all_sel: None,
            subjs: Slab::default(),
            subj_index: HashMap::default(),
            subj_by_ns: HashMap::default(),
            rules: Slab::default(),
            pols: Slab::default(),
            pol_by_id: HashMap::default(),
            pols_by_ns: HashMap::default(),
            pol_rank: Ranks::default(),
            tier_pols: BTreeMap::new(),
            tier_cells: HashMap::default(),
            tier_dirty_eps: BTreeSet::new(),
            tier_dirty_ids: BTreeSet::new(),
            tier_all: false,
            tier_dns_eps: 0,
            desired: Desired::default(),
            contrib: HashMap::default(),
            scratch_keys: Vec::new(),
            l7_keys: HashMap::default(),
            l7_dirty: BTreeSet::new(),
            scratch_ids: Vec::new(),
            journal: Journal {
                enabled: true,
                ..Default::default()
            },
            dirty_ifindex: BTreeSet::new(),
            warnings: Vec::new(),
        };
        // IPv4-mapped lookups must never fall through to an IPv6 block
        // such as ::/0: the IPv4 /0 is always a region.
        e.region_ref(
            IpNetwork::V4(
                ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::UNSPECIFIED, 0).expect("/0"),
            ),
            1,
        );
        e
    }

    /// Stop recording old values (while loading a whole state at once;
    /// the caller then syncs the maps from [`Engine::desired`]).
    pub fn begin_bulk(&mut self) {
        self.journal = Journal::default();
    }

    /// Record old values again; identities nothing uses are forgotten.
    pub fn end_bulk(&mut self) -> Changes {
        let unused: Vec<u32> = self
            .ids
            .iter()
            .map(|(_, id)| id)
            .filter(|id| !self.id_refs.contains_key(id))
            .collect();
        self.gc.extend(unused);
        let changes = self.finish();
        self.journal.enabled = true;
        changes
    }

    /// The complete desired content of the maps.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    pub fn identities(&self) -> &IdentityTable {
        &self.ids
    }

    /// An endpoint's own identity.
    pub fn endpoint_identity(&self, ep_id: u32) -> Option<u32> {
        self.eps
            .get(&ep_id)
            .filter(|e| !e.input.remote)
            .map(|e| e.own)
    }

    pub fn node_mode(&self) -> Mode {
        self.node_mode
    }

    // ----- events -------------------------------------------------------

    /// Create or replace a Namespace object.
    pub fn upsert_namespace(&mut self, info: NamespaceInfo) {
        let name = info.name.clone();
        let old = self.namespaces.insert(name.clone(), info);
        self.namespace_changed(&name, old);
    }

    /// Delete a Namespace object (the namespace stays, unlabelled).
    pub fn remove_namespace(&mut self, name: &str) {
        if let Some(old) = self.namespaces.remove(name) {
            self.namespace_changed(name, Some(old));
        }
    }

    pub fn upsert_pod(&mut self, pod: PodInfo) {
        let key = (pod.namespace.clone(), pod.name.clone());
        if self.pods.get(&key) == Some(&pod) {
            return;
        }
        let old = self.pods.insert(key.clone(), pod);
        self.pod_changed(&key, old.as_ref());
    }

    pub fn remove_pod(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(old) = self.pods.remove(&key) {
            self.pod_changed(&key, Some(&old));
        }
    }

    /// Create or replace the policy with this stable id.
    pub fn upsert_policy(&mut self, id: u32, policy: Policy) {
        let old = self.pol_by_id.get(&id).copied();
        if let Some(o) = old
            && self.pols[o].policy == policy
        {
            return;
        }
        // The new version first: what both versions share (ipBlocks,
        // selectors, entries) never drops to zero in between, so it keeps
        // its identities and its map entries are not rewritten.
        self.add_policy(id, policy);
        if let Some(o) = old {
            self.remove_policy_version(o);
        }
    }

    pub fn remove_policy(&mut self, id: u32) {
        if let Some(p) = self.pol_by_id.get(&id).copied() {
            self.remove_policy_version(p);
        }
    }

    /// Add an endpoint, or replace the one with the same `ep_id`.
    /// An AdminNetworkPolicy, BaselineAdminNetworkPolicy or
    /// ClusterNetworkPolicy, by its store id.
    pub fn upsert_tier_policy(&mut self, id: u32, policy: TierPolicy) {
        if self.tier_pols.get(&id).is_some_and(|t| t.policy == policy) {
            return;
        }
        self.remove_tier_policy(id);
        let blocks = tiers::blocks(&policy);
        let names = tiers::egress_names(&policy);
        for b in &blocks {
            self.block_ref(b, 1);
        }
        for n in &names {
            self.name_ref(n, 1);
        }
        let mut sels = Vec::new();
        for rule in policy.ingress.iter().chain(&policy.egress) {
            for peer in &rule.peers {
                let key = match peer {
                    crate::policy::tier::TierPeer::Peer(peer) => SelKey::Peer {
                        policy_ns: String::new(),
                        peer: peer.clone(),
                    },
                    crate::policy::tier::TierPeer::Nodes(sel) => SelKey::Nodes(sel.clone()),
                };
                let s = self.sel_ref(key);
                self.sels[s].tier_users += 1;
                sels.push(s);
            }
        }
        self.tier_pols.insert(
            id,
            TierPolState {
                policy,
                sels,
                blocks,
                names,
            },
        );
        self.tier_all = true;
    }

    pub fn remove_tier_policy(&mut self, id: u32) {
        let Some(t) = self.tier_pols.remove(&id) else {
            return;
        };
        for s in t.sels {
            self.sels[s].tier_users -= 1;
            self.sel_unref(s);
        }
        for n in &t.names {
            self.name_ref(n, -1);
        }
        for b in &t.blocks {
            self.block_ref(b, -1);
        }
        self.tier_all = true;
    }

    pub fn upsert_endpoint(&mut self, mut input: EndpointInput) {
        let mut seen = BTreeSet::new();
        input.addresses.retain(|a| seen.insert(*a));
        if let Some(e) = self.eps.get(&input.ep_id) {
            if e.input == input {
                return;
            }
            self.remove_ep(input.ep_id);
        }
        self.add_ep(input);
    }

    pub fn remove_endpoint(&mut self, ep_id: u32) {
        if self.eps.contains_key(&ep_id) {
            self.remove_ep(ep_id);
        }
    }

    /// The node's own addresses (they get the host identity).
    pub fn set_host_addresses(&mut self, addrs: &[IpAddr]) {
        let new: BTreeSet<IpAddr> = addrs.iter().copied().collect();
        let gone: Vec<IpAddr> = self.host.difference(&new).copied().collect();
        let added: Vec<IpAddr> = new.difference(&self.host).copied().collect();
        self.host = new;
        for (a, host) in gone
            .into_iter()
            .map(|a| (a, false))
            .chain(added.into_iter().map(|a| (a, true)))
        {
            let key = abi::addr16(a);
            self.addrs.entry(key).or_default().host = host;
            self.recompute_ipcache(host_prefix(key));
            self.tidy_addr(key);
        }
    }

    /// Another node of the cluster and its addresses (they get the node
    /// identity unless a pod or this node has them).
    pub fn upsert_node(&mut self, name: &str, addrs: &[IpAddr], labels: &Labels) {
        let new: BTreeSet<IpAddr> = addrs.iter().copied().collect();
        let old = self.nodes.insert(name.to_owned(), new.clone());
        let old = old.unwrap_or_default();
        let relabelled = self
            .node_labels
            .insert(name.to_owned(), labels.clone())
            .as_ref()
            != Some(labels);
        for a in old.difference(&new) {
            self.node_addr(*a, name, -1);
        }
        for a in new.difference(&old) {
            self.node_addr(*a, name, 1);
        }
        if relabelled {
            for a in old.intersection(&new) {
                self.recompute_ipcache(host_prefix(abi::addr16(*a)));
            }
        }
    }

    pub fn remove_node(&mut self, name: &str) {
        for a in self.nodes.remove(name).unwrap_or_default() {
            self.node_addr(a, name, -1);
        }
        self.node_labels.remove(name);
    }

    fn node_addr(&mut self, addr: IpAddr, name: &str, sign: i32) {
        let key = abi::addr16(addr);
        let names = self.addr_nodes.entry(key).or_default();
        if sign > 0 {
            names.insert(name.to_owned());
        } else {
            names.remove(name);
        }
        if names.is_empty() {
            self.addr_nodes.remove(&key);
        }
        let a = self.addrs.entry(key).or_default();
        a.node = a.node.saturating_add_signed(sign);
        // Also when another node still names it: the first node's labels
        // may now be another's.
        self.recompute_ipcache(host_prefix(key));
        self.tidy_addr(key);
    }

    /// The node's default mode (policies and namespaces without one).
    pub fn set_node_mode(&mut self, mode: Mode) {
        if self.node_mode == mode {
            return;
        }
        self.node_mode = mode;
        self.tier_all = true;
        let all: Vec<usize> = self.pols.iter().map(|(p, _)| p).collect();
        for p in all {
            self.refresh_mode(p);
        }
    }

    /// Everything that changed since the last call.
    pub fn finish(&mut self) -> Changes {
        self.refresh_tiers();
        self.settle_l7();
        for ifindex in std::mem::take(&mut self.dirty_ifindex) {
            let value = self
                .ifindex_claims
                .get(&ifindex)
                .and_then(|c| c.last())
                .map(|&ep| self.ep_value(ep));
            self.set_endpoint(ifindex, value);
        }
        for id in std::mem::take(&mut self.gc) {
            if self.id_refs.get(&id).is_some_and(|r| r.0 > 0) {
                continue;
            }
            self.id_refs.remove(&id);
            if self.ids.remove(id).is_some() && self.journal.enabled {
                self.id_journal.entry(id).or_insert(true);
            }
        }
        let mut changes = Changes {
            warnings: std::mem::take(&mut self.warnings),
            ..Default::default()
        };
        for (id, existed) in std::mem::take(&mut self.id_journal) {
            match (existed, self.ids.key_of(id)) {
                (false, Some(key)) => changes.identities_added.push((id, key.clone())),
                (true, None) => changes.identities_removed.push(id),
                _ => {}
            }
        }
        (changes.delta, changes.undo) = self.take_delta();
        changes
    }

    // ----- tiers -------------------------------------------------------------

    /// Re-resolve the tier cells events marked: every cell of marked
    /// endpoints (all endpoints after a tier policy or the node's mode
    /// changed), and the cells of marked identities on every endpoint.
    fn refresh_tiers(&mut self) {
        let all = std::mem::take(&mut self.tier_all);
        let mut eps = std::mem::take(&mut self.tier_dirty_eps);
        let ids = std::mem::take(&mut self.tier_dirty_ids);
        if self.tier_pols.is_empty() && self.tier_cells.is_empty() {
            if self.tier_dns_eps > 0 {
                // The last tier policy naming domains went away.
                let on: Vec<u32> = self
                    .eps
                    .iter()
                    .filter(|(_, e)| e.out.as_ref().is_some_and(|o| o.tier_dns))
                    .map(|(k, _)| *k)
                    .collect();
                for ep in on {
                    self.set_tier_dns(ep, false);
                }
                // (Endpoints removed while on were never counted down.)
                self.tier_dns_eps = 0;
            }
            return;
        }
        if all {
            eps.extend(
                self.eps
                    .iter()
                    .filter(|(_, e)| !e.input.remote)
                    .map(|(k, _)| *k),
            );
            eps.extend(self.tier_cells.keys().copied());
        }
        let node_mode = self.node_mode;
        let tier_pols = std::mem::take(&mut self.tier_pols);
        let mut refs: Vec<tiers::TierRef<'_>> = tier_pols
            .iter()
            .map(|(id, t)| tiers::TierRef::new(*id, &t.policy, node_mode))
            .collect();
        tiers::sort(&mut refs);
        for &ep in &eps {
            self.refresh_ep_cells(ep, &refs, None, &tier_pols);
        }
        if !ids.is_empty() {
            let others: Vec<u32> = self
                .tier_cells
                .keys()
                .copied()
                .chain(
                    self.eps
                        .iter()
                        .filter(|(_, e)| !e.input.remote)
                        .map(|(k, _)| *k),
                )
                .filter(|ep| !eps.contains(ep))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            for ep in others {
                self.refresh_ep_cells(ep, &refs, Some(&ids), &tier_pols);
            }
        }
        self.tier_pols = tier_pols;
    }

    /// Record whether a tier policy sends the endpoint's DNS to the proxy.
    fn set_tier_dns(&mut self, ep: u32, on: bool) {
        let Some(e) = self.eps.get_mut(&ep) else {
            return;
        };
        let out = e.out.get_or_insert_with(Box::default);
        if out.tier_dns != on {
            out.tier_dns = on;
            if on {
                self.tier_dns_eps += 1;
            } else {
                self.tier_dns_eps = self.tier_dns_eps.saturating_sub(1);
            }
            self.dirty_ifindex.insert(e.input.ifindex);
        }
    }

    /// Re-resolve an endpoint's cells: all of them, or those of `only`
    /// these peer identities.
    fn refresh_ep_cells(
        &mut self,
        ep: u32,
        refs: &[tiers::TierRef<'_>],
        only: Option<&BTreeSet<u32>>,
        tier_pols: &BTreeMap<u32, TierPolState>,
    ) {
        let mut fresh: BTreeMap<CellKey, Vec<(PolicyKey, PolicyValue)>> = BTreeMap::new();
        if only.is_none() {
            let dns = self
                .eps
                .get(&ep)
                .filter(|e| !e.input.remote)
                .is_some_and(|e| {
                    let ns_labels = self.ns_labels(&e.input.namespace);
                    refs.iter().any(|t| {
                        t.policy.uses_dns_proxy() && tiers::selects(t.policy, &ns_labels, &e.labels)
                    })
                });
            self.set_tier_dns(ep, dns);
        }
        if let Some(e) = self.eps.get(&ep).filter(|e| !e.input.remote) {
            let ns_labels = self.ns_labels(&e.input.namespace);
            let pols: Vec<tiers::TierRef<'_>> = refs
                .iter()
                .filter(|t| tiers::selects(t.policy, &ns_labels, &e.labels))
                .copied()
                .collect();
            let mut peers: BTreeSet<u32> = BTreeSet::new();
            for t in &pols {
                for &s in &tier_pols[&t.id].sels {
                    peers.extend(self.sels[s].matches.iter().copied());
                }
            }
            if let Some(only) = only {
                peers.retain(|id| only.contains(id));
            }
            for id in peers {
                let key = self.key(id);
                let id_ns_labels = key.namespace.as_deref().map(|ns| self.ns_labels(ns));
                let facts = PeerFacts {
                    pod: key
                        .namespace
                        .as_deref()
                        .zip(id_ns_labels.as_ref())
                        .map(|(ns, nl)| (ns, nl, &key.labels)),
                    blocks: &key.blocks,
                    node: key.node.then_some(&key.labels),
                };
                for dir in Direction::ALL {
                    for (tier, tier_no) in tiers::TIERS {
                        let rules =
                            tiers::cell_rules(&pols, tier, dir, &e.ports, &facts, &|n, p| {
                                key.named_port(n, p)
                            });
                        let entries = tiers::cell_entries(ep, dir, tier_no, id, &rules);
                        if !entries.is_empty() {
                            fresh.insert((dir as u8, tier_no, id), entries);
                        }
                    }
                }
            }
        }
        let cells = self.tier_cells.entry(ep).or_default();
        let stale: Vec<CellKey> = cells
            .keys()
            .filter(|k| only.is_none_or(|o| o.contains(&k.2)) && !fresh.contains_key(k))
            .copied()
            .collect();
        let mut old: HashMap<PolicyKey, PolicyValue> = HashMap::default();
        for k in stale {
            old.extend(cells.remove(&k).into_iter().flatten());
        }
        let mut new: Vec<(PolicyKey, PolicyValue)> = Vec::new();
        for (k, entries) in fresh {
            if let Some(prev) = cells.insert(k, entries.clone()) {
                old.extend(prev);
            }
            new.extend(entries);
        }
        if cells.is_empty() {
            self.tier_cells.remove(&ep);
        }
        for (k, v) in &new {
            old.remove(k);
            self.set_policy(*k, Some(*v));
        }
        for k in old.into_keys() {
            self.set_policy(k, None);
        }
    }

    // ----- the oracle -----------------------------------------------------

    /// The inputs as the full compiler takes them.
    pub fn compile_inputs(&self) -> (NamespaceMap, Vec<(u32, Policy)>, Vec<EndpointView>) {
        let namespaces: NamespaceMap = self
            .namespaces
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Modes and labels are derived again from the inputs, not taken
        // from what the engine keeps: this is what the oracle checks.
        let policies = self
            .pol_by_id
            .values()
            .map(|&p| {
                let s = &self.pols[p];
                let mut policy = s.policy.clone();
                policy.mode = Some(effective_mode(
                    s.policy.mode,
                    self.namespaces.get(&policy.namespace).and_then(|n| n.mode),
                    self.node_mode,
                ));
                (s.id, policy)
            })
            .collect();
        let endpoints = self
            .eps
            .values()
            .map(|e| {
                let pod = self
                    .pods
                    .get(&(e.input.namespace.clone(), e.input.name.clone()));
                EndpointView {
                    ep_id: e.input.ep_id,
                    ifindex: e.input.ifindex,
                    namespace: e.input.namespace.clone(),
                    name: e.input.name.clone(),
                    labels: effective_labels(&e.input.labels, pod),
                    ports: pod.map(|p| p.ports.clone()).unwrap_or_default(),
                    addresses: e.input.addresses.clone(),
                    extra_flags: 0,
                    remote: e.input.remote,
                }
            })
            .collect();
        (namespaces, policies, endpoints)
    }

    /// Compile the same inputs in full with a copy of the identity table.
    pub fn full_compile(&self) -> (compile::Compiled, IdentityTable) {
        let (namespaces, policies, endpoints) = self.compile_inputs();
        let host: Vec<IpAddr> = self.host.iter().copied().collect();
        let mut names: Vec<&String> = self.nodes.keys().collect();
        names.sort();
        let nodes = compile::node_address_labels(names.into_iter().map(|n| {
            (
                &self.nodes[n],
                self.node_labels.get(n).cloned().unwrap_or_default(),
            )
        }));
        let tier_policies: Vec<(u32, TierPolicy)> = self
            .tier_pols
            .iter()
            .map(|(id, t)| {
                let mut p = t.policy.clone();
                p.mode = Some(p.mode.unwrap_or(self.node_mode));
                (*id, p)
            })
            .collect();
        let mut ids = self.ids.clone();
        let compiled = compile::compile(
            &compile::Input {
                namespaces: &namespaces,
                policies: &policies,
                endpoints: &endpoints,
                host_addresses: &host,
                node_addresses: &nodes,
                tier_policies: &tier_policies,
            },
            &mut ids,
        );
        ids.retain_used(&compiled.used_identities);
        (compiled, ids)
    }

    // ----- identities -----------------------------------------------------

    fn acquire(&mut self, key: &IdentityKey, fact: bool) -> u32 {
        let (id, new) = self.ids.allocate(key);
        if id == ID_WORLD {
            return id;
        }
        if new && self.journal.enabled {
            self.id_journal.entry(id).or_insert(false);
        }
        let refs = self.id_refs.entry(id).or_default();
        refs.0 += 1;
        if fact {
            refs.1 += 1;
            if refs.1 == 1 {
                self.identity_visible(id);
            }
        }
        id
    }

    fn release(&mut self, id: u32, fact: bool) {
        if id == ID_WORLD {
            return;
        }
        let Some(refs) = self.id_refs.get_mut(&id) else {
            return;
        };
        refs.0 = refs.0.saturating_sub(1);
        let hidden = fact && {
            refs.1 = refs.1.saturating_sub(1);
            refs.1 == 0
        };
        if refs.0 == 0 {
            // Forgotten at `finish` unless something takes it again first,
            // so a relabel back and forth keeps the number.
            self.gc.insert(id);
        }
        if hidden {
            self.identity_hidden(id);
        }
    }

    fn key(&self, id: u32) -> IdentityKey {
        self.ids.key_of(id).cloned().unwrap_or_default()
    }

    fn ns_labels(&self, ns: &str) -> Labels {
        match self.namespaces.get(ns) {
            Some(n) => n.labels.clone(),
            None => NamespaceInfo::new(ns, None).labels,
        }
    }

    /// Selectors that could match an identity with this key.
    fn candidate_sels(&self, key: &IdentityKey) -> Vec<usize> {
        let mut out: Vec<usize> = key
            .blocks
            .iter()
            .filter_map(|b| self.sel_by_block.get(b).copied())
            .collect();
        if let Some(ns) = &key.namespace {
            out.extend(self.pod_sels_own.get(ns).into_iter().flatten());
            out.extend(self.pod_sels_matching.iter());
        }
        if key.node {
            out.extend(self.node_sels.iter());
        }
        out.extend(self.all_sel);
        out
    }

    fn sel_matches(&self, sel: usize, key: &IdentityKey) -> bool {
        match &self.sels[sel].key {
            SelKey::All => true,
            SelKey::Nodes(s) => key.node && s.matches(&key.labels),
            SelKey::Peer { policy_ns, peer } => {
                let ns_labels = key.namespace.as_deref().map(|ns| self.ns_labels(ns));
                let facts = PeerFacts {
                    pod: key
                        .namespace
                        .as_deref()
                        .zip(ns_labels.as_ref())
                        .map(|(ns, nl)| (ns, nl, &key.labels)),
                    blocks: &key.blocks,
                    node: key.node.then_some(&key.labels),
                };
                compile::peer_matches(peer, policy_ns, &facts)
            }
        }
    }

    fn identity_visible(&mut self, id: u32) {
        let key = self.key(id);
        self.visible.insert(id);
        if let Some(ns) = &key.namespace {
            self.ids_by_ns.entry(ns.clone()).or_default().insert(id);
        }
        for b in &key.blocks {
            self.ids_by_block.entry(b.clone()).or_default().insert(id);
        }
        for sel in self.candidate_sels(&key) {
            if self.sel_matches(sel, &key) {
                self.sel_member(sel, id, 1);
            }
        }
    }

    fn identity_hidden(&mut self, id: u32) {
        let key = self.key(id);
        for sel in self.candidate_sels(&key) {
            self.sel_member(sel, id, -1);
        }
        self.visible.remove(&id);
        if let Some(ns) = &key.namespace {
            remove_from(&mut self.ids_by_ns, ns, &id);
        }
        for b in &key.blocks {
            remove_from(&mut self.ids_by_block, b, &id);
        }
    }

    // ----- selectors and rules ---------------------------------------------

    /// An identity starts (`sign` 1) or stops matching a selector.
    fn sel_member(&mut self, sel: usize, id: u32, sign: i32) {
        let matches = &mut self.sels[sel].matches;
        let changed = if sign > 0 {
            matches.insert(id)
        } else {
            matches.remove(&id)
        };
        if changed {
            if self.sels[sel].tier_users > 0 {
                self.tier_dirty_ids.insert(id);
            }
            for r in self.sels[sel].rules.clone() {
                self.rule_peer(r, id, sign);
            }
        }
    }

    fn rule_peer(&mut self, r: usize, id: u32, sign: i32) {
        if !count(&mut self.rules[r].peers, id, sign) {
            return;
        }
        let subj = self.pols[self.rules[r].pol].subj;
        let subjects: Vec<u32> = self.subjs[subj].matches.iter().copied().collect();
        for ep in subjects {
            self.emit(r, ep, PeerRef::Id(id), sign);
        }
    }

    fn sel_ref(&mut self, key: SelKey) -> usize {
        if let Some(&s) = self.sel_index.get(&key) {
            self.sels[s].users += 1;
            return s;
        }
        let s = self.sels.insert(PeerSel {
            key: key.clone(),
            users: 1,
            tier_users: 0,
            matches: BTreeSet::new(),
            rules: Vec::new(),
        });
        self.sel_index.insert(key.clone(), s);
        let candidates: Vec<u32> = match &key {
            SelKey::All => {
                self.all_sel = Some(s);
                self.visible.iter().copied().collect()
            }
            SelKey::Nodes(_) => {
                self.node_sels.insert(s);
                self.visible.iter().copied().collect()
            }
            SelKey::Peer {
                peer: Peer::IpBlock(b),
                ..
            } => {
                let c = b.canonical();
                self.sel_by_block.insert(c.clone(), s);
                self.ids_by_block
                    .get(&c)
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect()
            }
            SelKey::Peer {
                policy_ns,
                peer:
                    Peer::Pods {
                        namespaces: NamespaceScope::Own,
                        ..
                    },
            } => {
                self.pod_sels_own
                    .entry(policy_ns.clone())
                    .or_default()
                    .insert(s);
                self.ids_by_ns
                    .get(policy_ns)
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect()
            }
            SelKey::Peer { .. } => {
                self.pod_sels_matching.insert(s);
                self.ids_by_ns.values().flatten().copied().collect()
            }
        };
        for id in candidates {
            let k = self.key(id);
            if self.sel_matches(s, &k) {
                self.sels[s].matches.insert(id);
            }
        }
        s
    }

    fn sel_unref(&mut self, s: usize) {
        self.sels[s].users -= 1;
        if self.sels[s].users > 0 {
            return;
        }
        let Some(sel) = self.sels.remove(s) else {
            return;
        };
        self.sel_index.remove(&sel.key);
        match &sel.key {
            SelKey::All => self.all_sel = None,
            SelKey::Nodes(_) => {
                self.node_sels.remove(&s);
            }
            SelKey::Peer {
                peer: Peer::IpBlock(b),
                ..
            } => {
                self.sel_by_block.remove(&b.canonical());
            }
            SelKey::Peer {
                policy_ns,
                peer:
                    Peer::Pods {
                        namespaces: NamespaceScope::Own,
                        ..
                    },
            } => remove_from(&mut self.pod_sels_own, policy_ns, &s),
            SelKey::Peer { .. } => {
                self.pod_sels_matching.remove(&s);
            }
        }
    }

    fn subj_ref(&mut self, namespace: &str, selector: &Selector) -> usize {
        let key = (namespace.to_owned(), selector.clone());
        if let Some(&s) = self.subj_index.get(&key) {
            self.subjs[s].users += 1;
            return s;
        }
        let matches: BTreeSet<u32> = self
            .eps_by_ns
            .get(namespace)
            .into_iter()
            .flatten()
            .copied()
            .filter(|ep| !self.eps[ep].input.remote && selector.matches(&self.eps[ep].labels))
            .collect();
        let s = self.subjs.insert(SubjSel {
            namespace: namespace.to_owned(),
            selector: selector.clone(),
            users: 1,
            matches,
            policies: BTreeSet::new(),
        });
        self.subj_index.insert(key, s);
        self.subj_by_ns
            .entry(namespace.to_owned())
            .or_default()
            .insert(s);
        s
    }

    fn subj_unref(&mut self, s: usize) {
        self.subjs[s].users -= 1;
        if self.subjs[s].users > 0 {
            return;
        }
        if let Some(sub) = self.subjs.remove(s) {
            self.subj_index
                .remove(&(sub.namespace.clone(), sub.selector.clone()));
            remove_from(&mut self.subj_by_ns, &sub.namespace, &s);
        }
    }

    /// An endpoint starts (`sign` 1) or stops matching a subject selector.
    fn subj_member(&mut self, s: usize, ep: u32, sign: i32) {
        let matches = &mut self.subjs[s].matches;
        let changed = if sign > 0 {
            matches.insert(ep)
        } else {
            matches.remove(&ep)
        };
        if changed {
            for p in self.subjs[s].policies.clone() {
                self.policy_subject(p, ep, sign);
            }
        }
    }

    /// A policy starts (`sign` 1) or stops (-1) selecting an endpoint.
    fn policy_subject(&mut self, p: usize, ep: u32, sign: i32) {
        let pol = &self.pols[p];
        let isolates = [pol.policy.ingress_isolation, pol.policy.egress_isolation];
        let enforced = pol.mode == Mode::Enforce;
        if let Some(e) = self.eps.get_mut(&ep) {
            let out = e.out.get_or_insert_with(Box::default);
            for (d, _) in isolates.iter().enumerate().filter(|(_, i)| **i) {
                out.isolating[d] = out.isolating[d].wrapping_add_signed(sign);
                if enforced {
                    out.enforcing[d] = out.enforcing[d].wrapping_add_signed(sign);
                }
            }
            if pol.policy.dns_proxy {
                out.dns = out.dns.wrapping_add_signed(sign);
            }
            self.dirty_ifindex.insert(e.input.ifindex);
        }
        for i in 0..self.pols[p].rules.len() {
            let r = self.pols[p].rules[i];
            if self.rules[r].any {
                self.emit(r, ep, PeerRef::Any, sign);
            }
            let mut peers = std::mem::take(&mut self.scratch_ids);
            peers.clear();
            peers.extend(self.rules[r].peers.iter().map(|(id, _)| *id));
            for &id in &peers {
                self.emit(r, ep, PeerRef::Id(id), sign);
            }
            self.scratch_ids = peers;
        }
    }

    // ----- policies ----------------------------------------------------------

    fn add_policy(&mut self, id: u32, policy: Policy) -> usize {
        let blocks: Vec<IpBlock> =
            compile::collect_blocks(std::slice::from_ref(&(id, policy.clone())));
        let names: Vec<(String, Protocol)> =
            compile::egress_port_names(std::slice::from_ref(&(id, policy.clone())))
                .into_iter()
                .collect();
        for b in &blocks {
            self.block_ref(b, 1);
        }
        for n in &names {
            self.name_ref(n, 1);
        }
        self.pol_rank
            .add(id, (policy.namespace.clone(), policy.order_name()));
        let mode = effective_mode(
            policy.mode,
            self.namespaces.get(&policy.namespace).and_then(|n| n.mode),
            self.node_mode,
        );
        let subj = self.subj_ref(&policy.namespace, &policy.pod_selector);
        let ns = policy.namespace.clone();
        let ingress = if policy.ingress_isolation {
            policy.ingress.clone()
        } else {
            Vec::new()
        };
        let egress = if policy.egress_isolation {
            policy.egress.clone()
        } else {
            Vec::new()
        };
        let p = self.pols.insert(PolState {
            id,
            policy,
            mode,
            subj,
            rules: Vec::new(),
            blocks,
            egress_names: names,
        });
        self.pol_by_id.insert(id, p);
        self.pols_by_ns.entry(ns.clone()).or_default().insert(p);
        for (dir, rules) in [(Direction::Ingress, ingress), (Direction::Egress, egress)] {
            for rule in &rules {
                let r = self.add_rule(p, id, &ns, dir, rule);
                self.pols[p].rules.push(r);
            }
        }
        self.subjs[subj].policies.insert(p);
        let eps: Vec<u32> = self.subjs[subj].matches.iter().copied().collect();
        for ep in eps {
            self.policy_subject(p, ep, 1);
        }
        p
    }

    fn add_rule(&mut self, p: usize, id: u32, ns: &str, dir: Direction, rule: &Rule) -> usize {
        let any = rule.peers.is_empty();
        let named_egress = dir == Direction::Egress
            && rule
                .ports
                .iter()
                .any(|p| matches!(p.port, PortMatch::Named(_)));
        let keys: Vec<SelKey> = if any {
            if named_egress {
                vec![SelKey::All]
            } else {
                Vec::new()
            }
        } else {
            rule.peers
                .iter()
                .map(|peer| SelKey::Peer {
                    policy_ns: match peer {
                        Peer::IpBlock(_) => String::new(),
                        Peer::Pods { .. } => ns.to_owned(),
                    },
                    peer: peer.clone(),
                })
                .collect()
        };
        let r = self.rules.insert(RuleState {
            pol: p,
            policy_id: id,
            dir,
            any,
            sels: Vec::new(),
            ports: rule.ports.clone(),
            peers: Vec::new(),
        });
        for key in keys {
            let s = self.sel_ref(key);
            self.sels[s].rules.push(r);
            self.rules[r].sels.push(s);
            let matches: Vec<u32> = self.sels[s].matches.iter().copied().collect();
            for m in matches {
                count(&mut self.rules[r].peers, m, 1);
            }
        }
        r
    }

    fn remove_policy_version(&mut self, p: usize) {
        let subj = self.pols[p].subj;
        let eps: Vec<u32> = self.subjs[subj].matches.iter().copied().collect();
        for ep in eps {
            self.policy_subject(p, ep, -1);
        }
        self.subjs[subj].policies.remove(&p);
        self.subj_unref(subj);
        for r in std::mem::take(&mut self.pols[p].rules) {
            let Some(rule) = self.rules.remove(r) else {
                continue;
            };
            for s in rule.sels {
                let uses = &mut self.sels[s].rules;
                if let Some(i) = uses.iter().position(|x| *x == r) {
                    uses.swap_remove(i);
                }
                self.sel_unref(s);
            }
        }
        let Some(pol) = self.pols.remove(p) else {
            return;
        };
        remove_from(&mut self.pols_by_ns, &pol.policy.namespace, &p);
        if self.pol_by_id.get(&pol.id) == Some(&p) {
            self.pol_by_id.remove(&pol.id);
        }
        self.pol_rank.remove(pol.id);
        for n in &pol.egress_names {
            self.name_ref(n, -1);
        }
        for b in &pol.blocks {
            self.block_ref(b, -1);
        }
    }

    fn refresh_mode(&mut self, p: usize) {
        let pol = &self.pols[p];
        let mode = effective_mode(
            pol.policy.mode,
            self.namespaces
                .get(&pol.policy.namespace)
                .and_then(|n| n.mode),
            self.node_mode,
        );
        if mode == pol.mode {
            return;
        }
        let isolates = [pol.policy.ingress_isolation, pol.policy.egress_isolation];
        let sign: i32 = if mode == Mode::Enforce { 1 } else { -1 };
        let eps: Vec<u32> = self.subjs[pol.subj].matches.iter().copied().collect();
        self.pols[p].mode = mode;
        for ep in eps {
            if let Some(e) = self.eps.get_mut(&ep) {
                let out = e.out.get_or_insert_with(Box::default);
                for (d, _) in isolates.iter().enumerate().filter(|(_, i)| **i) {
                    out.enforcing[d] = out.enforcing[d].wrapping_add_signed(sign);
                }
                self.dirty_ifindex.insert(e.input.ifindex);
            }
        }
    }

    // ----- namespaces and pods -------------------------------------------------

    fn namespace_changed(&mut self, name: &str, old: Option<NamespaceInfo>) {
        let old_labels = old
            .as_ref()
            .map(|o| o.labels.clone())
            .unwrap_or_else(|| NamespaceInfo::new(name, None).labels);
        let old_mode = old.and_then(|o| o.mode);
        let new_mode = self.namespaces.get(name).and_then(|n| n.mode);
        if old_labels != self.ns_labels(name) {
            // Tier subjects select by namespace labels.
            if !self.tier_pols.is_empty() {
                let eps = self.eps_by_ns.get(name).into_iter().flatten().copied();
                self.tier_dirty_eps.extend(eps);
            }
            // Only namespace selectors look at namespace labels.
            let ids: Vec<u32> = self
                .ids_by_ns
                .get(name)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            let sels: Vec<usize> = self.pod_sels_matching.iter().copied().collect();
            for id in ids {
                let key = self.key(id);
                for &s in &sels {
                    if self.sel_matches(s, &key) {
                        self.sel_member(s, id, 1);
                    } else {
                        self.sel_member(s, id, -1);
                    }
                }
            }
        }
        if old_mode != new_mode {
            let pols: Vec<usize> = self
                .pols_by_ns
                .get(name)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            for p in pols {
                self.refresh_mode(p);
            }
        }
    }

    fn pod_changed(&mut self, key: &(String, String), old: Option<&PodInfo>) {
        let eps: Vec<u32> = self
            .eps_by_pod
            .get(key)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        for ep in eps {
            let e = &self.eps[&ep];
            let pod = self.pods.get(key);
            let labels = effective_labels(&e.input.labels, pod);
            let ports = pod.map(|p| p.ports.clone()).unwrap_or_default();
            let was = if e.input.remote {
                effective_labels(&e.input.labels, old)
            } else {
                e.labels.clone()
            };
            if labels != was || ports != e.ports {
                let input = e.input.clone();
                self.remove_ep(ep);
                self.add_ep(input);
            }
        }
    }

    // ----- endpoints and addresses ---------------------------------------------

    fn port_tags(&self, ports: &[NamedPort]) -> BTreeSet<String> {
        ports
            .iter()
            .filter(|np| {
                self.egress_names
                    .contains_key(&(np.name.clone(), np.protocol))
            })
            .map(IdentityKey::port_tag)
            .collect()
    }

    /// The identity key of an endpoint's address (`None`: of the endpoint
    /// without addresses).
    fn ep_key(&self, e: &EpState, addr: Option<IpAddr>) -> IdentityKey {
        let labels = if e.input.remote {
            let pod = self
                .pods
                .get(&(e.input.namespace.clone(), e.input.name.clone()));
            effective_labels(&e.input.labels, pod)
        } else {
            e.labels.clone()
        };
        IdentityKey {
            namespace: Some(e.input.namespace.clone()),
            labels,
            blocks: addr
                .map(|a| self.block_index.of_addr(a))
                .unwrap_or_default(),
            ports: self.port_tags(&e.ports),
            node: false,
        }
    }

    fn add_ep(&mut self, input: EndpointInput) {
        let ep = input.ep_id;
        self.tier_dirty_eps.insert(ep);
        let pod_key = (input.namespace.clone(), input.name.clone());
        let pod = self.pods.get(&pod_key);
        let labels = if input.remote {
            Labels::new()
        } else {
            effective_labels(&input.labels, pod)
        };
        let ports = pod.map(|p| p.ports.clone()).unwrap_or_default();
        self.eps_by_ns
            .entry(input.namespace.clone())
            .or_default()
            .insert(ep);
        self.eps_by_pod.entry(pod_key).or_default().insert(ep);
        for np in &ports {
            self.eps_by_port
                .entry((np.name.clone(), np.protocol))
                .or_default()
                .insert(ep);
        }
        let remote = input.remote;
        if !remote {
            self.ifindex_claims
                .entry(input.ifindex)
                .or_default()
                .insert(ep);
            self.dirty_ifindex.insert(input.ifindex);
        }
        let addresses = input.addresses.clone();
        let namespace = input.namespace.clone();
        self.eps.insert(
            ep,
            EpState {
                input,
                labels,
                ports,
                addr_ids: Vec::new(),
                own: ID_WORLD,
                out: (!remote).then(Box::default),
            },
        );
        for addr in &addresses {
            let key = self.ep_key(&self.eps[&ep], Some(*addr));
            let id = self.acquire(&key, true);
            if let Some(e) = self.eps.get_mut(&ep) {
                e.addr_ids.push(id);
            }
            self.claim(*addr, ep);
            if !remote {
                self.set_srcguard(
                    SrcguardKey {
                        ep_id: ep,
                        addr: abi::addr16(*addr),
                    },
                    true,
                );
            }
        }
        if remote {
            return;
        }
        let own_key = self.ep_key(&self.eps[&ep], addresses.first().copied());
        let own = self.acquire(&own_key, false);
        if let Some(e) = self.eps.get_mut(&ep) {
            e.own = own;
        }
        let labels = self.eps[&ep].labels.clone();
        let subjects: Vec<usize> = self
            .subj_by_ns
            .get(&namespace)
            .into_iter()
            .flatten()
            .copied()
            .filter(|&s| self.subjs[s].selector.matches(&labels))
            .collect();
        for s in subjects {
            self.subj_member(s, ep, 1);
        }
    }

    fn remove_ep(&mut self, ep: u32) {
        // Its tier entries go while its counts still exist; `finish`
        // resolves them again if it comes back.
        for (k, _) in self
            .tier_cells
            .remove(&ep)
            .into_iter()
            .flatten()
            .flat_map(|(_, v)| v)
        {
            self.set_policy(k, None);
        }
        self.tier_dirty_eps.insert(ep);
        let namespace = self.eps[&ep].input.namespace.clone();
        let subjects: Vec<usize> = self
            .subj_by_ns
            .get(&namespace)
            .into_iter()
            .flatten()
            .copied()
            .filter(|&s| self.subjs[s].matches.contains(&ep))
            .collect();
        for s in subjects {
            self.subj_member(s, ep, -1);
        }
        let e = &self.eps[&ep];
        let addresses = e.input.addresses.clone();
        let addr_ids = e.addr_ids.clone();
        let own = e.own;
        let remote = e.input.remote;
        for (addr, id) in addresses.iter().zip(addr_ids) {
            self.unclaim(*addr, ep);
            if !remote {
                self.set_srcguard(
                    SrcguardKey {
                        ep_id: ep,
                        addr: abi::addr16(*addr),
                    },
                    false,
                );
            }
            self.release(id, true);
        }
        if !remote {
            self.release(own, false);
        }
        let Some(e) = self.eps.remove(&ep) else {
            return;
        };
        remove_from(&mut self.eps_by_ns, &e.input.namespace, &ep);
        remove_from(
            &mut self.eps_by_pod,
            &(e.input.namespace.clone(), e.input.name.clone()),
            &ep,
        );
        for np in &e.ports {
            remove_from(&mut self.eps_by_port, &(np.name.clone(), np.protocol), &ep);
        }
        if !remote {
            remove_from(&mut self.ifindex_claims, &e.input.ifindex, &ep);
            self.dirty_ifindex.insert(e.input.ifindex);
        }
    }

    /// Recompute an endpoint's identities (its labels did not change, but
    /// the ipBlocks or named ports that refine them did).
    fn reidentify(&mut self, ep: u32) {
        self.tier_dirty_eps.insert(ep);
        let Some(e) = self.eps.get(&ep) else {
            return;
        };
        let addresses = e.input.addresses.clone();
        for (pos, addr) in addresses.iter().enumerate() {
            let key = self.ep_key(&self.eps[&ep], Some(*addr));
            let old = self.eps[&ep].addr_ids[pos];
            if self.ids.id_of(&key) == Some(old) {
                continue;
            }
            let new = self.acquire(&key, true);
            if let Some(e) = self.eps.get_mut(&ep) {
                e.addr_ids[pos] = new;
            }
            self.release(old, true);
            self.recompute_ipcache(host_prefix(abi::addr16(*addr)));
        }
        if self.eps[&ep].input.remote {
            return;
        }
        let own_key = self.ep_key(&self.eps[&ep], addresses.first().copied());
        let old = self.eps[&ep].own;
        if self.ids.id_of(&own_key) != Some(old) {
            let new = self.acquire(&own_key, false);
            if let Some(e) = self.eps.get_mut(&ep) {
                e.own = new;
                self.dirty_ifindex.insert(e.input.ifindex);
            }
            self.release(old, false);
        }
    }

    fn claim(&mut self, addr: IpAddr, ep: u32) {
        let key = abi::addr16(addr);
        let local = !self.eps[&ep].input.remote;
        let a = self.addrs.entry(key).or_default();
        // Two local endpoints on one address is worth a word (a lost DEL);
        // a remote pod's address taken over is the cluster moving on.
        if let Some(&(true, prev)) = a.claimants.iter().next_back()
            && local
            && prev != ep
        {
            let (older, newer) = if prev < ep { (prev, ep) } else { (ep, prev) };
            let name = |id: u32| {
                self.eps
                    .get(&id)
                    .map(|e| e.input.name.clone())
                    .unwrap_or_default()
            };
            self.warnings.push(format!(
                "address {addr} is claimed by endpoints {} and {}; the newer one ({}) wins",
                name(older),
                name(newer),
                name(newer)
            ));
        }
        self.addrs
            .entry(key)
            .or_default()
            .claimants
            .insert((local, ep));
        self.recompute_ipcache(host_prefix(key));
    }

    fn unclaim(&mut self, addr: IpAddr, ep: u32) {
        let key = abi::addr16(addr);
        if let Some(a) = self.addrs.get_mut(&key) {
            let local = !self.eps.get(&ep).is_some_and(|e| e.input.remote);
            a.claimants.remove(&(local, ep));
        }
        self.recompute_ipcache(host_prefix(key));
        self.tidy_addr(key);
    }

    fn tidy_addr(&mut self, key: [u8; 16]) {
        if self
            .addrs
            .get(&key)
            .is_some_and(|a| a.claimants.is_empty() && !a.host && a.node == 0)
        {
            self.addrs.remove(&key);
        }
    }

    /// The identity of an endpoint's address.
    fn addr_identity(&self, ep: u32, addr: [u8; 16]) -> Option<u32> {
        let e = self.eps.get(&ep)?;
        let pos = e
            .input
            .addresses
            .iter()
            .position(|a| abi::addr16(*a) == addr)?;
        e.addr_ids.get(pos).copied()
    }

    /// What the ipcache holds for a prefix: the owning endpoint's identity,
    /// else the host's, else another node's, else the ipBlock region's.
    fn recompute_ipcache(&mut self, prefix: Prefix) {
        let mut id = None;
        if prefix.len == 128 {
            self.refresh_node_identity(prefix.addr);
        }
        if prefix.len == 128
            && let Some(a) = self.addrs.get(&prefix.addr)
        {
            id = match a.claimants.last() {
                Some(&(_, owner)) => self.addr_identity(owner, prefix.addr),
                None if a.host => Some(ID_HOST),
                None => a.node_id,
            };
        }
        if id.is_none() {
            id = self
                .regions
                .get(&(prefix.addr, prefix.len))
                .and_then(|r| r.id);
        }
        self.set_ipcache(
            prefix,
            id.map(|identity| IpcacheValue { identity, flags: 0 }),
        );
    }

    /// Give another node's address the node identity (refined by the
    /// ipBlocks it falls in) while nothing before it owns the address, and
    /// take it back when something does.
    fn refresh_node_identity(&mut self, addr: [u8; 16]) {
        let Some(a) = self.addrs.get(&addr) else {
            return;
        };
        let old = a.node_id;
        let labels = self
            .addr_nodes
            .get(&addr)
            .and_then(|n| n.first())
            .and_then(|n| self.node_labels.get(n))
            .cloned()
            .unwrap_or_default();
        let want = (a.node > 0 && a.claimants.is_empty() && !a.host).then(|| IdentityKey {
            node: true,
            labels,
            blocks: self.block_index.of_addr(abi::ip_from16(addr)),
            ..Default::default()
        });
        let new = match want {
            Some(key) if old.is_some() && self.ids.id_of(&key) == old => return,
            Some(key) => Some(self.acquire(&key, true)),
            None if old.is_none() => return,
            None => None,
        };
        if let Some(a) = self.addrs.get_mut(&addr) {
            a.node_id = new;
        }
        if let Some(o) = old {
            self.release(o, true);
        }
    }

    // ----- ipBlocks and named ports ----------------------------------------------

    fn block_ref(&mut self, b: &IpBlock, sign: i32) {
        let c = b.canonical();
        let entry = self.blocks.entry(c.clone()).or_insert((b.clone(), 0));
        if sign > 0 {
            entry.1 += 1;
            if entry.1 != 1 {
                return;
            }
            self.block_index.insert(b.clone());
            for net in std::iter::once(b.cidr).chain(b.except.iter().copied()) {
                self.region_ref(net, 1);
            }
            self.refresh_within(&b.cidr);
        } else {
            entry.1 -= 1;
            if entry.1 != 0 {
                return;
            }
            self.blocks.remove(&c);
            self.block_index.remove(b);
            self.refresh_within(&b.cidr);
            for net in std::iter::once(b.cidr).chain(b.except.iter().copied()) {
                self.region_ref(net, -1);
            }
        }
    }

    fn region_ref(&mut self, net: IpNetwork, sign: i32) {
        let p = Prefix::from_net(net);
        let k = (p.addr, p.len);
        if sign > 0 {
            let r = self.regions.entry(k).or_insert(Region {
                net,
                refs: 0,
                id: None,
            });
            r.refs += 1;
            if r.refs == 1 {
                self.refresh_region(k);
            }
        } else {
            let Some(r) = self.regions.get_mut(&k) else {
                return;
            };
            r.refs -= 1;
            if r.refs > 0 {
                return;
            }
            if let Some(r) = self.regions.remove(&k)
                && let Some(id) = r.id
            {
                self.release(id, true);
            }
            self.recompute_ipcache(p);
        }
    }

    fn refresh_region(&mut self, k: ([u8; 16], u32)) {
        let Some(r) = self.regions.get(&k) else {
            return;
        };
        let key = IdentityKey {
            blocks: self.block_index.of_prefix(&r.net),
            ..Default::default()
        };
        let old = r.id;
        if old.is_some() && self.ids.id_of(&key) == old {
            return;
        }
        if old == Some(ID_WORLD) && key.blocks.is_empty() {
            return;
        }
        let new = self.acquire(&key, true);
        if let Some(r) = self.regions.get_mut(&k) {
            r.id = Some(new);
        }
        if let Some(o) = old {
            self.release(o, true);
        }
        self.recompute_ipcache(Prefix {
            addr: k.0,
            len: k.1,
        });
    }

    /// Regions and endpoint addresses inside `cidr` may have changed
    /// identity (a block around them came or went).
    fn refresh_within(&mut self, cidr: &IpNetwork) {
        let (lo, hi) = range16(cidr);
        let len = Prefix::from_net(*cidr).len;
        let regions: Vec<([u8; 16], u32)> = self
            .regions
            .range((lo, 0)..=(hi, 128))
            .map(|(k, _)| *k)
            .filter(|k| k.1 >= len)
            .collect();
        for k in regions {
            self.refresh_region(k);
        }
        let eps: BTreeSet<u32> = self
            .addrs
            .range(lo..=hi)
            .flat_map(|(_, a)| a.claimants.iter().map(|&(_, ep)| ep))
            .collect();
        for ep in eps {
            self.reidentify(ep);
        }
        let nodes: Vec<[u8; 16]> = self
            .addrs
            .range(lo..=hi)
            .filter(|(_, a)| a.node_id.is_some())
            .map(|(k, _)| *k)
            .collect();
        for k in nodes {
            self.recompute_ipcache(host_prefix(k));
        }
    }

    fn name_ref(&mut self, name: &(String, Protocol), sign: i32) {
        let c = self.egress_names.entry(name.clone()).or_insert(0);
        let before = *c;
        *c = c.wrapping_add_signed(sign);
        let after = *c;
        if after == 0 {
            self.egress_names.remove(name);
        }
        if (before == 0) != (after == 0) {
            let eps: Vec<u32> = self
                .eps_by_port
                .get(name)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            for ep in eps {
                self.reidentify(ep);
            }
        }
    }

    // ----- entries -----------------------------------------------------------------

    fn emit(&mut self, r: usize, ep: u32, peer: PeerRef, sign: i32) {
        let mut keys = std::mem::take(&mut self.scratch_keys);
        keys.clear();
        self.rule_keys(r, ep, peer, &mut keys);
        let pid = self.rules[r].policy_id;
        for (k, l7) in &keys {
            self.contribute(*k, pid, sign, *l7);
        }
        self.scratch_keys = keys;
    }

    /// The entries one rule gives one subject endpoint for one peer (or for
    /// any peer).
    fn rule_keys(&self, r: usize, ep: u32, peer: PeerRef, out: &mut Vec<(PolicyKey, bool)>) {
        let rule = &self.rules[r];
        let Some(e) = self.eps.get(&ep) else {
            return;
        };
        let mut put = |peer_id: u32, proto: u8, port: u16, prefixlen: u32, l7: bool| {
            out.push((
                PolicyKey {
                    prefixlen,
                    data: PolicyKeyData {
                        ep_id: ep,
                        direction: rule.dir as u8,
                        tier: TIER_NETPOL,
                        pad1: 0,
                        peer_id,
                        pad2: 0,
                        protocol: proto,
                        dport_be: port.to_be(),
                    },
                },
                l7,
            ));
        };
        // Rules without peers give "any peer" entries, except for named
        // egress ports, which resolve on each destination identity.
        let (peer_id, numbered) = match peer {
            PeerRef::Any => (ID_ANY, true),
            PeerRef::Id(id) => (id, !rule.any),
        };
        if rule.ports.is_empty() {
            if numbered {
                put(peer_id, 0, 0, POLICY_PREFIX_ANY_PROTO, false);
            }
            return;
        }
        for port in &rule.ports {
            let proto = port.protocol.number();
            let l7 = !port.http.is_empty();
            match &port.port {
                PortMatch::All if numbered => put(peer_id, proto, 0, POLICY_PREFIX_ANY_PORT, l7),
                PortMatch::Range(a, b) if numbered => {
                    for (start, bits) in port_prefixes(*a, *b) {
                        put(peer_id, proto, start, POLICY_PREFIX_ANY_PORT + bits, l7);
                    }
                }
                PortMatch::Named(name) if rule.dir == Direction::Ingress && numbered => {
                    for np in e
                        .ports
                        .iter()
                        .filter(|np| &np.name == name && np.protocol == port.protocol)
                    {
                        put(peer_id, proto, np.port, POLICY_PREFIX_FULL, l7);
                    }
                }
                PortMatch::Named(name) if rule.dir == Direction::Egress => {
                    if let PeerRef::Id(id) = peer
                        && let Some(num) = self
                            .ids
                            .key_of(id)
                            .and_then(|k| k.named_port(name, port.protocol))
                    {
                        put(id, proto, num, POLICY_PREFIX_FULL, l7);
                    }
                }
                _ => {}
            }
        }
    }

    /// One rule starts (`sign` 1) or stops producing an entry.
    fn contribute(&mut self, key: PolicyKey, pid: u32, sign: i32, l7: bool) {
        let ranks = &self.pol_rank;
        let c = self.contrib.entry(key).or_default();
        let pos = c.by_id.binary_search_by_key(&pid, |x| x.0);
        if sign < 0 && pos.is_err() {
            return;
        }
        let was_plain = c.plain > 0;
        if !l7 {
            c.plain = c.plain.wrapping_add_signed(sign);
        }
        let flag_changed = was_plain != (c.plain > 0);
        if sign > 0 {
            match pos {
                Ok(i) => c.by_id[i].1 += 1,
                Err(i) => {
                    c.by_id.insert(i, (pid, 1));
                    if c.by_id.len() == 1 || ranks.get(pid) < ranks.get(c.reported) {
                        c.reported = pid;
                    }
                }
            }
        } else {
            let Ok(i) = pos else {
                return;
            };
            c.by_id[i].1 -= 1;
            if c.by_id[i].1 == 0 {
                c.by_id.remove(i);
                if c.by_id.is_empty() {
                    self.contrib.remove(&key);
                    self.set_policy(key, None);
                    self.set_l7_raw(key, false);
                    return;
                }
                if pid == c.reported {
                    // The reported policy left: the first by name of the rest.
                    if let Some(n) = c.by_id.iter().map(|x| x.0).min_by_key(|id| ranks.get(*id)) {
                        c.reported = n;
                    }
                }
            }
        }
        let (reported, raw_l7) = (c.reported, c.plain == 0);
        let flags = match self.desired.policy.get(&key) {
            // A settled flag stays until `finish` settles it again.
            Some(v) if !flag_changed => v.flags,
            _ if raw_l7 => abi::POLICY_F_L7,
            _ => 0,
        };
        self.set_policy(
            key,
            Some(PolicyValue {
                policy_id: reported,
                verdict: Verdict::Allow as u8,
                flags,
                pad: 0,
            }),
        );
        self.set_l7_raw(key, raw_l7);
    }

    /// Record whether `key` is produced only by port entries with HTTP
    /// rules (its L7 flag is settled at `finish`).
    fn set_l7_raw(&mut self, key: PolicyKey, l7: bool) {
        let ep = key.data.ep_id;
        if l7 {
            self.l7_keys.entry(ep).or_default().insert(key);
        } else if let Some(set) = self.l7_keys.get_mut(&ep) {
            set.remove(&key);
            if set.is_empty() {
                self.l7_keys.remove(&ep);
            }
        }
    }

    /// Settle the L7 flags of the endpoints whose entries changed: an L7
    /// entry loses its flag while an entry without HTTP rules covers it.
    fn settle_l7(&mut self) {
        for ep in std::mem::take(&mut self.l7_dirty) {
            let Some(keys) = self.l7_keys.get(&ep) else {
                continue;
            };
            let mut updates = Vec::new();
            for key in keys {
                let flag = l7_flag_of(&self.desired.policy, key);
                if let Some(v) = self.desired.policy.get(key)
                    && v.flags & abi::POLICY_F_L7 != flag
                {
                    updates.push((*key, PolicyValue { flags: flag, ..*v }));
                }
            }
            for (key, value) in updates {
                self.set_policy(key, Some(value));
            }
        }
        self.l7_dirty.clear();
    }

    fn set_policy(&mut self, key: PolicyKey, value: Option<PolicyValue>) {
        let old = match value {
            Some(v) => self.desired.policy.insert(key, v),
            None => self.desired.policy.remove(&key),
        };
        if old == value {
            return;
        }
        if self.journal.enabled {
            self.journal.policy.entry(key).or_insert(old);
        }
        if key.data.tier == TIER_NETPOL {
            self.l7_dirty.insert(key.data.ep_id);
        }
        let l7 = |v: &Option<PolicyValue>| v.as_ref().is_some_and(|v| is_l7_egress(&key, v));
        let (was_l7, is_l7) = (l7(&old), l7(&value));
        if was_l7 != is_l7
            && let Some(e) = self.eps.get_mut(&key.data.ep_id)
        {
            let c = &mut e.out.get_or_insert_with(Box::default).l7_egress;
            *c = if is_l7 { *c + 1 } else { *c - 1 };
            self.dirty_ifindex.insert(e.input.ifindex);
        }
        if old.is_some() != value.is_some() {
            let ep = key.data.ep_id;
            if let Some(e) = self.eps.get_mut(&ep) {
                let slot =
                    usize::from(key.data.direction) * SHAPE_SLOTS + shape_slot(key.prefixlen);
                if key.prefixlen != POLICY_PREFIX_FULL {
                    let c = &mut e.out.get_or_insert_with(Box::default).shapes[slot];
                    *c = if value.is_some() { *c + 1 } else { *c - 1 };
                    self.dirty_ifindex.insert(e.input.ifindex);
                }
                if key.data.tier != TIER_NETPOL {
                    let t = usize::from(key.data.direction) * 2
                        + usize::from(key.data.tier == abi::TIER_BASELINE);
                    let c = &mut e.out.get_or_insert_with(Box::default).tiers[t];
                    *c = if value.is_some() { *c + 1 } else { *c - 1 };
                    self.dirty_ifindex.insert(e.input.ifindex);
                }
            }
        }
    }

    fn set_ipcache(&mut self, prefix: Prefix, value: Option<IpcacheValue>) {
        let old = match value {
            Some(v) => self.desired.ipcache.insert(prefix, v),
            None => self.desired.ipcache.remove(&prefix),
        };
        if old != value && self.journal.enabled {
            self.journal.ipcache.entry(prefix).or_insert(old);
        }
    }

    fn set_srcguard(&mut self, key: SrcguardKey, present: bool) {
        let old = if present {
            !self.desired.srcguard.insert(key)
        } else {
            self.desired.srcguard.remove(&key)
        };
        if old != present && self.journal.enabled {
            self.journal.srcguard.entry(key).or_insert(old);
        }
    }

    fn set_endpoint(&mut self, ifindex: u32, value: Option<EndpointValue>) {
        let old = match value {
            Some(v) => self.desired.endpoints.insert(ifindex, v),
            None => self.desired.endpoints.remove(&ifindex),
        };
        if old != value && self.journal.enabled {
            self.journal.endpoints.entry(ifindex).or_insert(old);
        }
    }

    fn ep_value(&self, ep: u32) -> EndpointValue {
        let e = &self.eps[&ep];
        let none = EpOut::default();
        let out = e.out.as_deref().unwrap_or(&none);
        let mut flags = 0;
        let mut range_lens = 0;
        for (d, dir) in Direction::ALL.iter().enumerate() {
            for slot in 0..SHAPE_SLOTS {
                if out.shapes[d * SHAPE_SLOTS + slot] > 0 {
                    let (f, l) = abi::ep_shape(*dir as u8, slot_prefixlen(slot));
                    flags |= f;
                    range_lens |= l;
                }
            }
        }
        for (t, n) in out.tiers.iter().enumerate() {
            if *n > 0 {
                let tier = if t % 2 == 0 {
                    abi::TIER_ADMIN
                } else {
                    abi::TIER_BASELINE
                };
                flags |= tiers::ep_flag(tier, (t / 2) as u8);
            }
        }
        if out.dns > 0 || out.tier_dns {
            flags |= abi::EP_DNS_PROXY;
        }
        if out.l7_egress > 0 {
            flags |= abi::EP_L7_EGRESS;
        }
        for (d, (isolate, audit)) in [
            (abi::EP_ISOLATE_INGRESS, abi::EP_AUDIT_INGRESS),
            (abi::EP_ISOLATE_EGRESS, abi::EP_AUDIT_EGRESS),
        ]
        .into_iter()
        .enumerate()
        {
            if out.isolating[d] > 0 {
                flags |= isolate;
                // Isolated only by audit-mode policies: report, not drop.
                if out.enforcing[d] == 0 {
                    flags |= audit;
                }
            }
        }
        EndpointValue {
            ep_id: ep,
            identity: e.own,
            flags,
            range_lens,
        }
    }

    fn take_delta(&mut self) -> (Delta, Delta) {
        let j = std::mem::take(&mut self.journal);
        self.journal.enabled = j.enabled;
        let mut d = Delta::default();
        let mut undo = Delta {
            revokes: true,
            ..Default::default()
        };
        for (k, old) in j.policy {
            let new = self.desired.policy.get(&k).copied();
            if new != old {
                // NetworkPolicy entries only allow: only a removal can
                // revoke. A tier entry can deny: any change can.
                d.revokes |= new.is_none() || k.data.tier != TIER_NETPOL;
                d.policy.push((k, new));
                undo.policy.push((k, old));
            }
        }
        for (k, old) in j.ipcache {
            let new = self.desired.ipcache.get(&k).copied();
            if new != old {
                // A prefix that had no entry before only gains one: an
                // address nobody owned, or a block region whose identity
                // only adds blocks to what covered it.
                d.revokes |= old.is_some();
                d.ipcache.push((k, new));
                undo.ipcache.push((k, old));
            }
        }
        for (k, old) in j.endpoints {
            let new = self.desired.endpoints.get(&k).copied();
            if new != old {
                d.revokes |= match (old, new) {
                    (Some(o), Some(n)) => {
                        let iso = abi::EP_ISOLATE_INGRESS | abi::EP_ISOLATE_EGRESS;
                        let audit = abi::EP_AUDIT_INGRESS | abi::EP_AUDIT_EGRESS;
                        o.ep_id != n.ep_id
                            || o.identity != n.identity
                            || n.flags & iso & !o.flags != 0
                            || o.flags & audit & !n.flags != 0
                    }
                    (Some(_), None) => true,
                    _ => false,
                };
                d.endpoints.push((k, new));
                undo.endpoints.push((k, old));
            }
        }
        for (k, old) in j.srcguard {
            let new = self.desired.srcguard.contains(&k);
            if new != old {
                d.srcguard.push((k, new));
                undo.srcguard.push((k, old));
            }
        }
        for delta in [&mut d, &mut undo] {
            delta.policy.sort_by_key(|(k, _)| *k);
            delta.ipcache.sort_by_key(|(k, _)| *k);
            delta.endpoints.sort_by_key(|(k, _)| *k);
            delta.srcguard.sort_by_key(|(k, _)| *k);
        }
        (d, undo)
    }
}

/// Count one more (`sign` 1) or one less of `id` in a sorted counted set;
/// whether it came (from 0) or went (to 0).
fn count(set: &mut Vec<(u32, u32)>, id: u32, sign: i32) -> bool {
    match set.binary_search_by_key(&id, |x| x.0) {
        Ok(i) if sign > 0 => {
            set[i].1 += 1;
            false
        }
        Ok(i) => {
            set[i].1 -= 1;
            if set[i].1 == 0 {
                set.remove(i);
                true
            } else {
                false
            }
        }
        Err(i) if sign > 0 => {
            set.insert(i, (id, 1));
            true
        }
        Err(_) => false,
    }
}

fn remove_from<K, V>(map: &mut HashMap<K, BTreeSet<V>>, key: &K, v: &V)
where
    K: std::hash::Hash + Eq,
    V: Ord,
{
    if let Some(set) = map.get_mut(key) {
        set.remove(v);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::policy::{Object, parse_documents};

    /// Apply a delta to a copy of the maps, as the dataplane would.
    fn apply(maps: &mut Desired, d: &Delta) {
        for (k, v) in &d.policy {
            match v {
                Some(v) => maps.policy.insert(*k, *v),
                None => maps.policy.remove(k),
            };
        }
        for (k, v) in &d.ipcache {
            match v {
                Some(v) => maps.ipcache.insert(*k, *v),
                None => maps.ipcache.remove(k),
            };
        }
        for (k, v) in &d.endpoints {
            match v {
                Some(v) => maps.endpoints.insert(*k, *v),
                None => maps.endpoints.remove(k),
            };
        }
        for (k, add) in &d.srcguard {
            if *add {
                maps.srcguard.insert(*k);
            } else {
                maps.srcguard.remove(k);
            }
        }
    }

    fn policy(v: serde_json::Value) -> Policy {
        match parse_documents(&v.to_string(), "test")
            .unwrap_or_else(|e| panic!("{e}: {v}"))
            .remove(0)
        {
            Object::NetworkPolicy(np) => np.value,
            Object::PalisadePolicy(p) => p.value.base,
            other => panic!("not a policy: {other:?}"),
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Namespace(String, Option<String>, Option<Mode>),
        RemoveNamespace(String),
        Pod(String, String, Option<String>, Option<u16>),
        RemovePod(String, String),
        Policy(u32, serde_json::Value),
        RemovePolicy(u32),
        Endpoint {
            ep: u32,
            ifindex: u32,
            ns: String,
            name: String,
            app: Option<String>,
            addrs: Vec<IpAddr>,
            remote: bool,
        },
        RemoveEndpoint(u32),
        Host(Vec<IpAddr>),
        /// Another node with these addresses and role label (`None`: the
        /// Node is deleted).
        Node(String, Option<(Vec<IpAddr>, Option<String>)>),
        NodeMode(Mode),
        /// An ANP, BANP or CNP (its id, the object).
        Tier(u32, serde_json::Value),
        RemoveTier(u32),
    }

    const ADDRS: &[&str] = &[
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.1.7",
        "192.168.0.1",
        "fd00::1",
        "fd00::2",
        "2001:db8::9",
    ];

    fn ns() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string())]
    }

    fn app() -> impl Strategy<Value = Option<String>> {
        prop::option::of(prop_oneof![Just("x".to_string()), Just("y".to_string())])
    }

    fn pod_name() -> impl Strategy<Value = String> {
        prop_oneof![Just("p1".to_string()), Just("p2".to_string())]
    }

    fn mode() -> impl Strategy<Value = Option<Mode>> {
        prop::option::of(prop_oneof![Just(Mode::Enforce), Just(Mode::Audit)])
    }

    fn addr() -> impl Strategy<Value = IpAddr> {
        (0..ADDRS.len()).prop_map(|i| ADDRS[i].parse().unwrap())
    }

    fn selector() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(json!({})),
            Just(json!({"matchLabels": {"app": "x"}})),
            Just(json!({"matchLabels": {"app": "y"}})),
            Just(json!({"matchExpressions": [{"key": "app", "operator": "Exists"}]})),
            Just(
                json!({"matchExpressions": [{"key": "team", "operator": "In", "values": ["red"]}]})
            ),
        ]
    }

    fn peer() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            selector().prop_map(|s| json!({"podSelector": s})),
            selector().prop_map(|s| json!({"namespaceSelector": s})),
            (selector(), selector())
                .prop_map(|(n, p)| json!({"namespaceSelector": n, "podSelector": p})),
            Just(json!({"ipBlock": {"cidr": "10.0.0.0/24"}})),
            Just(json!({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/30"]}})),
            Just(json!({"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}})),
            Just(json!({"ipBlock": {"cidr": "10.0.0.2/32"}})),
            Just(json!({"ipBlock": {"cidr": "fd00::/64"}})),
            Just(json!({"ipBlock": {"cidr": "::/0"}})),
        ]
    }

    fn port() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(json!({"port": 80})),
            Just(json!({"port": 53, "protocol": "UDP"})),
            Just(json!({"port": 8000, "endPort": 8010})),
            Just(json!({"port": "http"})),
            Just(json!({"port": "dns", "protocol": "UDP"})),
            Just(json!({"protocol": "SCTP"})),
            // HTTP rules: the policy becomes a PalisadeNetworkPolicy.
            Just(json!({"port": 80, "rules": {"http": [{"method": "GET"}]}})),
            Just(json!({"port": "http", "rules": {"http": [{}]}})),
        ]
    }

    fn rule(field: &'static str) -> impl Strategy<Value = serde_json::Value> {
        (
            prop::collection::vec(peer(), 0..3),
            prop::collection::vec(port(), 0..3),
        )
            .prop_map(move |(peers, ports)| {
                let mut r = serde_json::Map::new();
                if !peers.is_empty() {
                    r.insert(field.into(), json!(peers));
                }
                if !ports.is_empty() {
                    r.insert("ports".into(), json!(ports));
                }
                serde_json::Value::Object(r)
            })
    }

    fn policy_json() -> impl Strategy<Value = (String, serde_json::Value)> {
        (
            ns(),
            selector(),
            prop_oneof![
                Just(None),
                Just(Some(vec!["Ingress"])),
                Just(Some(vec!["Egress"])),
                Just(Some(vec!["Ingress", "Egress"])),
            ],
            prop::collection::vec(rule("from"), 0..3),
            prop::collection::vec(rule("to"), 0..3),
            mode(),
        )
            .prop_map(|(ns, sel, types, ingress, egress, mode)| {
                let mut spec = json!({"podSelector": sel, "ingress": ingress, "egress": egress});
                if let Some(t) = types {
                    spec["policyTypes"] = json!(t);
                }
                let mut meta = json!({"namespace": ns});
                if let Some(m) = mode {
                    meta["annotations"] = json!({"palisade.io/mode": m.as_str()});
                }
                let (api, kind) = if spec.to_string().contains("\"rules\"") {
                    ("palisade.io/v1alpha1", "PalisadeNetworkPolicy")
                } else {
                    ("networking.k8s.io/v1", "NetworkPolicy")
                };
                (
                    ns,
                    json!({"apiVersion": api, "kind": kind, "metadata": meta, "spec": spec}),
                )
            })
    }

    fn tier_port() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(json!({"portNumber": {"port": 80}})),
            Just(json!({"portNumber": {"port": 53, "protocol": "UDP"}})),
            Just(json!({"portRange": {"start": 70, "end": 90}})),
            Just(json!({"portRange": {"start": 8000, "end": 8010, "protocol": "SCTP"}})),
            Just(json!({"namedPort": "http"})),
            Just(json!({"namedPort": "dns"})),
        ]
    }

    fn tier_peer(egress: bool) -> impl Strategy<Value = serde_json::Value> {
        let pods = prop_oneof![
            selector().prop_map(|s| json!({"namespaces": s})),
            (selector(), selector())
                .prop_map(|(n, p)| json!({"pods": {"namespaceSelector": n, "podSelector": p}})),
        ];
        let nodes = prop_oneof![
            Just(json!({"nodes": {}})),
            Just(json!({"nodes": {"matchLabels": {"role": "infra"}}})),
        ];
        let networks = prop_oneof![
            Just(json!({"networks": ["10.0.0.0/24"]})),
            Just(json!({"networks": ["0.0.0.0/0", "fd00::/64"]})),
            Just(json!({"networks": ["10.0.0.2/32"]})),
        ];
        if egress {
            prop_oneof![3 => pods, 1 => networks, 1 => nodes].boxed()
        } else {
            pods.boxed()
        }
    }

    fn tier_rule(egress: bool) -> impl Strategy<Value = serde_json::Value> {
        (
            prop_oneof![Just("Allow"), Just("Deny"), Just("Pass")],
            prop::collection::vec(tier_peer(egress), 1..3),
            prop::option::of(prop::collection::vec(tier_port(), 1..3)),
        )
            .prop_map(move |(action, peers, ports)| {
                let mut r = json!({"action": action});
                r[if egress { "to" } else { "from" }] = json!(peers);
                if let Some(p) = ports {
                    r["ports"] = json!(p);
                }
                r
            })
    }

    /// An ANP, BANP or CNP; invalid combinations (named ports with
    /// networks, Pass in a BANP) are refused by validation and skipped.
    fn tier_json() -> impl Strategy<Value = serde_json::Value> {
        (
            0u32..3,
            0i64..3,
            prop_oneof![
                selector().prop_map(|s| json!({"namespaces": s})),
                (selector(), selector())
                    .prop_map(|(n, p)| json!({"pods": {"namespaceSelector": n, "podSelector": p}})),
            ],
            prop::collection::vec(tier_rule(false), 0..3),
            prop::collection::vec(tier_rule(true), 0..3),
            mode(),
        )
            .prop_map(|(kind, priority, subject, ingress, egress, mode)| {
                let mut meta = json!({});
                if let Some(m) = mode {
                    meta["annotations"] = json!({"palisade.io/mode": m.as_str()});
                }
                match kind {
                    0 => json!({"apiVersion": "policy.networking.k8s.io/v1alpha1",
                        "kind": "AdminNetworkPolicy", "metadata": meta,
                        "spec": {"priority": priority, "subject": subject,
                                 "ingress": ingress, "egress": egress}}),
                    1 => json!({"apiVersion": "policy.networking.k8s.io/v1alpha1",
                        "kind": "BaselineAdminNetworkPolicy", "metadata": meta,
                        "spec": {"subject": subject, "ingress": ingress, "egress": egress}}),
                    _ => {
                        let convert = |rules: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
                            rules.into_iter().map(cnp_rule).collect()
                        };
                        json!({"apiVersion": "policy.networking.k8s.io/v1alpha2",
                            "kind": "ClusterNetworkPolicy", "metadata": meta,
                            "spec": {"tier": if priority == 2 { "Baseline" } else { "Admin" },
                                     "priority": priority, "subject": subject,
                                     "ingress": convert(ingress), "egress": convert(egress)}})
                    }
                }
            })
    }

    /// A v1alpha1 rule in v1alpha2's shape.
    fn cnp_rule(mut r: serde_json::Value) -> serde_json::Value {
        if r["action"] == "Allow" {
            r["action"] = json!("Accept");
            // An egress Accept with two peers names a domain instead of
            // the second (nothing learned: it matches nothing, but sends
            // the subjects' DNS to the proxy).
            if let Some(to) = r.get_mut("to").and_then(|t| t.as_array_mut())
                && to.len() == 2
            {
                to[1] = json!({"domainNames": ["a.example.test", "*.example.org"]});
            }
        }
        if let Some(ports) = r.get("ports").cloned() {
            let protocols: Vec<serde_json::Value> = ports
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let proto = |p: &serde_json::Value| {
                        p["protocol"].as_str().unwrap_or("TCP").to_lowercase()
                    };
                    if let Some(n) = p.get("namedPort") {
                        json!({"destinationNamedPort": n})
                    } else if let Some(n) = p.get("portNumber") {
                        json!({proto(n): {"destinationPort": {"number": n["port"]}}})
                    } else {
                        let r = &p["portRange"];
                        json!({proto(r): {"destinationPort":
                            {"range": {"start": r["start"], "end": r["end"]}}}})
                    }
                })
                .collect();
            r.as_object_mut().map(|o| o.remove("ports"));
            r["protocols"] = json!(protocols);
        }
        r
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (11u32..15, tier_json()).prop_map(|(id, v)| Op::Tier(id, v)),
            (11u32..15).prop_map(Op::RemoveTier),
            (
                ns(),
                prop::option::of(prop_oneof![
                    Just("red".to_string()),
                    Just("blue".to_string())
                ]),
                mode()
            )
                .prop_map(|(n, team, m)| Op::Namespace(n, team, m)),
            ns().prop_map(Op::RemoveNamespace),
            (
                ns(),
                pod_name(),
                app(),
                prop::option::of(prop_oneof![Just(80u16), Just(8080)])
            )
                .prop_map(|(n, p, a, port)| Op::Pod(n, p, a, port)),
            (ns(), pod_name()).prop_map(|(n, p)| Op::RemovePod(n, p)),
            (1u32..7, policy_json()).prop_map(|(id, (_, v))| Op::Policy(id, v)),
            (1u32..7).prop_map(Op::RemovePolicy),
            (
                1u32..6,
                10u32..13,
                ns(),
                pod_name(),
                app(),
                prop::collection::vec(addr(), 0..3),
                prop::bool::weighted(0.3),
            )
                .prop_map(|(ep, ifindex, ns, name, app, addrs, remote)| Op::Endpoint {
                    ep,
                    // A remote pod has no veth here.
                    ifindex: if remote { 0 } else { ifindex },
                    ns,
                    name,
                    app,
                    addrs,
                    remote,
                }),
            (1u32..6).prop_map(Op::RemoveEndpoint),
            prop::collection::vec(addr(), 0..2).prop_map(Op::Host),
            (
                prop_oneof![Just("n1".to_string()), Just("n2".to_string())],
                prop::option::of((
                    prop::collection::vec(addr(), 0..3),
                    prop::option::of(prop_oneof![
                        Just("infra".to_string()),
                        Just("edge".to_string())
                    ])
                ))
            )
                .prop_map(|(n, node)| Op::Node(n, node)),
            prop_oneof![Just(Mode::Enforce), Just(Mode::Audit)].prop_map(Op::NodeMode),
        ]
    }

    fn labels(pairs: &[(&str, Option<&String>)]) -> Labels {
        pairs
            .iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v.clone())))
            .collect()
    }

    fn run(engine: &mut Engine, op: &Op) {
        match op.clone() {
            Op::Namespace(name, team, mode) => {
                let mut info = NamespaceInfo::new(&name, Some(&labels(&[("team", team.as_ref())])));
                info.mode = mode;
                engine.upsert_namespace(info);
            }
            Op::RemoveNamespace(name) => engine.remove_namespace(&name),
            Op::Pod(namespace, name, app, port) => engine.upsert_pod(PodInfo {
                namespace,
                name,
                labels: labels(&[("app", app.as_ref())]),
                ports: port
                    .map(|p| NamedPort {
                        name: "http".into(),
                        port: p,
                        protocol: Protocol::Tcp,
                    })
                    .into_iter()
                    .chain(std::iter::once(NamedPort {
                        name: "dns".into(),
                        port: 5353,
                        protocol: Protocol::Udp,
                    }))
                    .collect(),
            }),
            Op::RemovePod(ns, name) => engine.remove_pod(&ns, &name),
            Op::Policy(id, mut v) => {
                // Names in another order than ids, so that which policy an
                // entry reports (the first by name) is not the oldest.
                v["metadata"]["name"] = json!(format!("pol{}", (id * 7) % 10));
                // A policy keeps its namespace for life (its id is its name).
                v["metadata"]["namespace"] = json!(if id % 3 == 0 { "a" } else { "b" });
                let mut p = policy(v);
                // Some send DNS to the proxy; some are the L3/L4 part of a
                // PalisadeNetworkPolicy (ordered after NetworkPolicies).
                p.dns_proxy = id % 2 == 0;
                if id % 4 == 0 {
                    p.kind = crate::policy::PolicyKind::PalisadeNetworkPolicy;
                }
                engine.upsert_policy(id, p);
            }
            Op::RemovePolicy(id) => engine.remove_policy(id),
            Op::Endpoint {
                ep,
                ifindex,
                ns,
                name,
                app,
                addrs,
                remote,
            } => engine.upsert_endpoint(EndpointInput {
                ep_id: ep,
                ifindex,
                namespace: ns,
                name,
                labels: labels(&[("app", app.as_ref())]),
                addresses: addrs,
                remote,
            }),
            Op::RemoveEndpoint(ep) => engine.remove_endpoint(ep),
            Op::Host(addrs) => engine.set_host_addresses(&addrs),
            Op::Node(name, Some((addrs, role))) => {
                engine.upsert_node(&name, &addrs, &labels(&[("role", role.as_ref())]))
            }
            Op::Node(name, None) => engine.remove_node(&name),
            Op::NodeMode(m) => engine.set_node_mode(m),
            Op::Tier(id, mut v) => {
                use crate::policy::tier::{TierKind, validate_anp, validate_cnp};
                // Names in another order than ids (ties of priority are
                // broken by name).
                v["metadata"]["name"] = json!(if v["kind"] == "BaselineAdminNetworkPolicy" {
                    "default".to_string()
                } else {
                    format!("t{}", (id * 3) % 5)
                });
                let parsed = match v["kind"].as_str() {
                    Some("ClusterNetworkPolicy") => serde_json::from_value(v)
                        .ok()
                        .and_then(|o| validate_cnp(o).ok())
                        .map(|(_, p)| p),
                    Some(k) => {
                        let kind = if k == "AdminNetworkPolicy" {
                            TierKind::AdminNetworkPolicy
                        } else {
                            TierKind::BaselineAdminNetworkPolicy
                        };
                        serde_json::from_value(v)
                            .ok()
                            .and_then(|o| validate_anp(o, kind).ok())
                            .map(|(_, p)| p)
                    }
                    None => None,
                };
                if let Some(p) = parsed {
                    engine.upsert_tier_policy(id, p);
                }
            }
            Op::RemoveTier(id) => engine.remove_tier_policy(id),
        }
    }

    fn check(engine: &mut Engine, maps: &mut Desired, ids: &mut IdentityTable, step: &str) {
        let changes = engine.finish();
        let before = maps.clone();
        apply(maps, &changes.delta);
        let mut undone = maps.clone();
        apply(&mut undone, &changes.undo);
        assert_eq!(undone, before, "undo did not restore the maps after {step}");
        for (id, key) in &changes.identities_added {
            ids.insert(*id, key.clone());
        }
        for id in &changes.identities_removed {
            ids.remove(*id);
        }
        let (full, full_ids) = engine.full_compile();
        assert_eq!(
            engine.desired(),
            &full.desired,
            "incremental != full compile after {step}"
        );
        assert_eq!(
            maps,
            engine.desired(),
            "delta did not reproduce the maps after {step}"
        );
        let table = |t: &IdentityTable| -> Vec<(u32, IdentityKey)> {
            t.iter().map(|(k, id)| (id, k.clone())).collect()
        };
        assert_eq!(
            table(engine.identities()),
            table(&full_ids),
            "identities after {step}"
        );
        assert_eq!(
            table(ids),
            table(engine.identities()),
            "identity changes after {step}"
        );
        for (k, v) in engine
            .compile_inputs()
            .2
            .iter()
            .map(|e| (e.ep_id, engine.endpoint_identity(e.ep_id)))
        {
            assert_eq!(
                v,
                full.endpoint_identities.get(&k).copied(),
                "identity of {k}"
            );
        }
    }

    #[test]
    fn policy_ranks_follow_name_order_through_renumbering() {
        let mut r = Ranks::default();
        let name = |i: u32| ("ns".to_string(), format!("p{i:05}"));
        // Always between the first two: the gap halves every time, so the
        // ranks are renumbered again and again.
        r.add(0, name(0));
        r.add(99_999, name(99_999));
        for i in (1..200).rev() {
            r.add(i, name(i));
        }
        for i in 1000..1100 {
            r.add(i, name(i));
        }
        r.remove(5);
        let mut ids: Vec<u32> = r.of.keys().copied().collect();
        ids.sort_by_key(|id| r.get(*id));
        let mut by_name = ids.clone();
        by_name.sort_by_key(|id| name(*id));
        assert_eq!(ids, by_name);
        assert!(!ids.contains(&5));
    }

    #[test]
    fn an_entry_reports_the_first_policy_by_name_after_the_first_leaves() {
        let mut engine = Engine::new(IdentityTable::default(), Mode::Enforce);
        let mut maps = Desired::default();
        let mut ids = IdentityTable::default();
        run(
            &mut engine,
            &Op::Endpoint {
                ep: 1,
                ifindex: 10,
                ns: "b".into(),
                name: "p1".into(),
                app: None,
                addrs: vec!["10.0.0.1".parse().unwrap()],
                remote: false,
            },
        );
        let allow_all = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                               "metadata": {}, "spec": {"podSelector": {}, "ingress": [{}]}});
        // Ids 2, 1 and 5 are pol4, pol7 and pol5 (all in namespace b):
        // the first by name comes first, the second last.
        for id in [2, 1, 5] {
            run(&mut engine, &Op::Policy(id, allow_all.clone()));
            check(&mut engine, &mut maps, &mut ids, &format!("policy {id}"));
        }
        let reported = |m: &Desired| m.policy.values().next().map(|v| v.policy_id);
        assert_eq!(reported(&maps), Some(2), "pol4 is first by name");
        run(&mut engine, &Op::RemovePolicy(2));
        check(&mut engine, &mut maps, &mut ids, "remove pol4");
        assert_eq!(reported(&maps), Some(5), "pol5 is first by name now");
    }

    #[test]
    fn a_new_egress_port_name_refines_existing_endpoints() {
        let mut engine = Engine::new(IdentityTable::default(), Mode::Enforce);
        let mut maps = Desired::default();
        let mut ids = IdentityTable::default();
        run(
            &mut engine,
            &Op::Pod("a".into(), "p1".into(), None, Some(80)),
        );
        run(
            &mut engine,
            &Op::Endpoint {
                ep: 1,
                ifindex: 10,
                ns: "a".into(),
                name: "p1".into(),
                app: None,
                addrs: vec!["10.0.0.1".parse().unwrap()],
                remote: false,
            },
        );
        check(&mut engine, &mut maps, &mut ids, "endpoint");
        let before = engine.endpoint_identity(1);
        run(
            &mut engine,
            &Op::Policy(
                2,
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "metadata": {}, "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                       "egress": [{"ports": [{"port": "http"}]}]}}),
            ),
        );
        check(&mut engine, &mut maps, &mut ids, "policy");
        assert_ne!(
            engine.endpoint_identity(1),
            before,
            "refined by http/TCP=80"
        );
    }

    #[test]
    fn a_namespace_mode_changes_the_audit_flags_of_its_policies_subjects() {
        let mut engine = Engine::new(IdentityTable::default(), Mode::Enforce);
        let mut maps = Desired::default();
        let mut ids = IdentityTable::default();
        run(
            &mut engine,
            &Op::Endpoint {
                ep: 1,
                ifindex: 10,
                ns: "a".into(),
                name: "p1".into(),
                app: None,
                addrs: vec!["10.0.0.1".parse().unwrap()],
                remote: false,
            },
        );
        run(
            &mut engine,
            &Op::Policy(
                3,
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "metadata": {}, "spec": {"podSelector": {}}}),
            ),
        );
        check(&mut engine, &mut maps, &mut ids, "policy");
        assert_eq!(maps.endpoints[&10].flags, abi::EP_ISOLATE_INGRESS);
        run(
            &mut engine,
            &Op::Namespace("a".into(), None, Some(Mode::Audit)),
        );
        check(&mut engine, &mut maps, &mut ids, "audit namespace");
        assert_eq!(
            maps.endpoints[&10].flags,
            abi::EP_ISOLATE_INGRESS | abi::EP_AUDIT_INGRESS
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PALISADE_PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
            .. ProptestConfig::default()
        })]

        /// After any sequence of events, the incremental maps equal a full
        /// compile entry for entry, and the deltas reproduce them.
        #[test]
        fn incremental_equals_full_compile(
            ops in prop::collection::vec((op(), prop::bool::weighted(0.7)), 1..40)
        ) {
            let mut engine = Engine::new(IdentityTable::default(), Mode::Enforce);
            let mut maps = Desired::default();
            let mut ids = IdentityTable::default();
            check(&mut engine, &mut maps, &mut ids, "start");
            // Several events in one change (one `finish`) as well as one.
            let mut batch = Vec::new();
            for (i, (op, finish)) in ops.iter().enumerate() {
                run(&mut engine, op);
                batch.push(format!("{op:?}"));
                if *finish || i + 1 == ops.len() {
                    check(&mut engine, &mut maps, &mut ids, &format!("step {i}: {}", batch.join(", ")));
                    batch.clear();
                }
            }
            // A fresh engine loaded in bulk from the same inputs (as the
            // daemon starts) reaches the same maps with the same numbers.
            let (namespaces, policies, endpoints) = engine.compile_inputs();
            let mut fresh = Engine::new(engine.identities().clone(), engine.node_mode());
            fresh.begin_bulk();
            for ns in namespaces.into_values() {
                fresh.upsert_namespace(ns);
            }
            for p in engine.pods.values() {
                fresh.upsert_pod(p.clone());
            }
            for (id, _) in policies {
                fresh.upsert_policy(id, engine.pols[engine.pol_by_id[&id]].policy.clone());
            }
            for (id, t) in &engine.tier_pols {
                fresh.upsert_tier_policy(*id, t.policy.clone());
            }
            fresh.set_host_addresses(&engine.host.iter().copied().collect::<Vec<_>>());
            for (name, addrs) in &engine.nodes {
                fresh.upsert_node(
                    name,
                    &addrs.iter().copied().collect::<Vec<_>>(),
                    &engine.node_labels[name],
                );
            }
            for e in endpoints {
                fresh.upsert_endpoint(engine.eps[&e.ep_id].input.clone());
            }
            fresh.end_bulk();
            prop_assert_eq!(fresh.desired(), engine.desired());
        }
    }
}
