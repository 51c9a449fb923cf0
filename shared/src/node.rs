//! The node: the store, the incremental engine and the dataplane, and every
//! operation the binaries perform on them.
//!
//! Each write runs under the store's write lock and changes the stored rows
//! and the engine together; the engine's net delta goes to the kernel maps
//! before the store commits, and is written back if the commit fails, so
//! nothing is left half-done. The maps carry the generation of the store
//! they match (`sync_token`): a writer that finds another value (a crash
//! between the two, or a store changed while the datapath was away)
//! rebuilds the maps from the store first.
//!
//! The engine is kept between operations when the same `Node` serves many
//! (the daemon), and rebuilt from the store when another process changed
//! it (the store's generation tells). Attaching programs to a veth happens
//! outside the lock: [`Node::register_endpoint`] and
//! [`Node::complete_add`] are the two locked halves of an ADD.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    cluster::{ApiChanges, ApiObject, ApiReport, CLUSTER_NODE_SETTING, Placement},
    compile::{self, Compiled, EndpointView},
    dataplane::{Attachment, Dataplane, DataplaneError, SyncReport},
    engine::Engine,
    fault, fqdn,
    identity::IdentityTable,
    policy::{
        Kind, Labels, MODE_ANNOTATION, Mode, Object, ObjectRef,
        palisade::{PalisadeNetworkPolicy, PalisadePolicy},
        tier::{TierKind, TierObject, TierPolicy},
        validate_namespace_object,
    },
    store::{
        Endpoint, PendingIdentity, RemoteNode, RemotePod, Source, State, Store, StoreError,
        StoredNamespace, StoredPalisadePolicy, StoredPod, StoredPolicy, StoredTierPolicy, Txn,
    },
};

/// How long an identity recorded by an OCI hook waits for its CNI ADD.
pub const PENDING_TTL_SECS: u64 = 120;

/// How long an operation waits for another one to release the store.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{context}; rolling back also failed: {rollback}")]
    RollbackFailed {
        context: String,
        rollback: DataplaneError,
    },
    /// Reported by the daemon (see [`crate::daemon`]).
    #[error("{message}")]
    Remote { kind: ErrorKind, message: String },
}

/// What kind of failure an error is, for callers that map it to a
/// contract's codes (and for the daemon's answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    /// The store was busy: retrying later may help.
    Busy,
    NotFound,
    Invalid,
    /// The kernel refused (attach, map update).
    Dataplane,
    /// No daemon answers (nothing was sent to it).
    Unreachable,
    Other,
}

impl NodeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Store(StoreError::LockTimeout { .. }) => ErrorKind::Busy,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Invalid(_) => ErrorKind::Invalid,
            Self::Dataplane(_) | Self::RollbackFailed { .. } => ErrorKind::Dataplane,
            Self::Remote { kind, .. } => *kind,
            Self::Store(_) => ErrorKind::Other,
        }
    }

    /// Whether retrying later may help (the store was busy).
    pub fn is_busy(&self) -> bool {
        self.kind() == ErrorKind::Busy
    }
}

/// A new endpoint to register.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewEndpoint {
    pub source: Source,
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub addresses: Vec<IpAddr>,
    /// The node's current addresses, when the caller knows them.
    pub host_addresses: Option<Vec<IpAddr>>,
    /// Inode of the container's network namespace: an identity an OCI hook
    /// recorded for it earlier (see [`Node::record_pending`]) applies.
    pub netns_inode: Option<u64>,
    /// The identity came from Kubernetes (the CRI's pod namespace and
    /// name): annotations may never override it.
    pub k8s: bool,
    /// The container interface's MAC address: the only source address its
    /// frames may carry, and the only unicast destination delivered to it.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
}

/// What [`Node::add_endpoint`] did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AddOutcome {
    /// Registered and attached.
    Added(Endpoint),
    /// The veth is already enforced by an endpoint the other integration
    /// (CNI plugin or OCI hook) registered; nothing was changed.
    AlreadyManaged(Endpoint),
}

impl AddOutcome {
    pub fn endpoint(&self) -> &Endpoint {
        match self {
            Self::Added(e) | Self::AlreadyManaged(e) => e,
        }
    }
}

/// How long an endpoint whose programs are being attached counts as alive
/// (an ADD that died between registering and recording its attachment
/// leaves one behind; after this, a new ADD for the veth replaces it).
pub const ATTACH_GRACE_SECS: u64 = 30;

/// The first half of an ADD: what [`Node::register_endpoint`] found.
#[derive(Debug)]
pub enum Registered {
    AlreadyManaged(Endpoint),
    /// Another ADD for the same veth is attaching its programs right now:
    /// ask again shortly (it becomes `AlreadyManaged`, or, if that ADD
    /// fails, room for this one).
    Attaching(Endpoint),
    /// In the store and the maps, its programs not yet attached.
    New(Endpoint),
}

/// What `apply` did to each object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Change {
    Created,
    Configured,
    Unchanged,
    Deleted,
    NotFound,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Configured => "configured",
            Self::Unchanged => "unchanged",
            Self::Deleted => "deleted",
            Self::NotFound => "not found",
        }
    }
}

/// The result of applying or deleting objects.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ObjectsReport {
    pub changes: Vec<(ObjectRef, Change)>,
    pub sync: SyncReport,
    pub warnings: Vec<String>,
}

/// What `upgrade` did to each endpoint (by endpoint key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// Now running this build's programs.
    pub upgraded: Vec<String>,
    /// Already ran them.
    pub current: Vec<String>,
    /// Their veth is gone (the container died without a DEL): skipped.
    pub stale: Vec<String>,
    /// Could not be upgraded, with why; they keep their old programs.
    pub failed: Vec<(String, String)>,
}

/// An endpoint to remove: by key, and only if it still has this id (when
/// the caller decided from an earlier read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRef {
    pub key: String,
    pub id: Option<u32>,
}

/// What a write changed in the maps, and what a user should know.
#[derive(Debug, Clone, Default)]
struct Committed {
    report: SyncReport,
    warnings: Vec<String>,
}

/// Whether a write needs the datapath's maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Maps {
    /// Load the datapath if it is not there yet.
    Load,
    /// Only if it is loaded (cleanup never loads programs).
    IfLoaded,
    /// The write changes nothing the maps hold.
    No,
}

/// One write: the store transaction and the engine, changed together.
struct Op<'a, 'c> {
    tx: &'a mut Txn<'c>,
    engine: &'a mut Engine,
    /// Something the engine computes from changed.
    inputs: bool,
}

impl Op<'_, '_> {
    fn put_namespace(&mut self, ns: &StoredNamespace) -> Result<(), NodeError> {
        self.tx.put_namespace(ns)?;
        self.engine.upsert_namespace(ns.value.clone());
        self.inputs = true;
        Ok(())
    }

    fn delete_namespace(&mut self, name: &str) -> Result<bool, NodeError> {
        let found = self.tx.delete_namespace(name)?;
        if found {
            self.engine.remove_namespace(name);
            self.inputs = true;
        }
        Ok(found)
    }

    fn put_pod(&mut self, pod: &StoredPod) -> Result<(), NodeError> {
        self.tx.put_pod(pod)?;
        self.engine.upsert_pod(pod.value.clone());
        self.inputs = true;
        Ok(())
    }

    fn delete_pod(&mut self, namespace: &str, name: &str) -> Result<bool, NodeError> {
        let found = self.tx.delete_pod(namespace, name)?;
        if found {
            self.engine.remove_pod(namespace, name);
            self.inputs = true;
        }
        Ok(found)
    }

    fn put_policy(&mut self, p: &StoredPolicy) -> Result<(), NodeError> {
        self.tx.put_policy(p)?;
        self.engine.upsert_policy(p.id, p.policy.clone());
        self.inputs = true;
        Ok(())
    }

    fn delete_policy(&mut self, p: &StoredPolicy) -> Result<(), NodeError> {
        self.tx.delete_policy(&p.policy.namespace, &p.policy.name)?;
        self.engine.remove_policy(p.id);
        self.inputs = true;
        Ok(())
    }
    fn put_tier_policy(&mut self, p: &StoredTierPolicy) -> Result<(), NodeError> {
        self.tx.put_tier_policy(p)?;
        let policy = if p.policy.uses_dns_proxy() {
            fqdn::expand_tier(&p.policy, &self.tx.fqdns()?)
        } else {
            p.policy.clone()
        };
        self.engine.upsert_tier_policy(p.id, policy);
        self.inputs = true;
        Ok(())
    }
    /// Delete a tier policy if it exists; whether it did.
    fn delete_tier_policy(&mut self, kind: TierKind, name: &str) -> Result<bool, NodeError> {
        let Some(p) = self.tx.tier_policy(kind, name)? else {
            return Ok(false);
        };
        self.tx.delete_tier_policy(kind, name)?;
        self.engine.remove_tier_policy(p.id);
        self.inputs = true;
        Ok(true)
    }
    /// Create or replace a tier policy, keeping its number.
    fn upsert_tier_policy(
        &mut self,
        object: &TierObject,
        value: &TierPolicy,
    ) -> Result<Change, NodeError> {
        let old = self.tx.tier_policy(value.kind, &value.name)?;
        if old.as_ref().is_some_and(|o| &o.object == object) {
            return Ok(Change::Unchanged);
        }
        let id = match &old {
            Some(o) => o.id,
            None => self.tx.allocate_policy_id()?,
        };
        let stored = StoredTierPolicy {
            id,
            object: object.clone(),
            policy: value.clone(),
        };
        upsert(old.map(|o| o.object), &stored.object, || {
            self.put_tier_policy(&stored)
        })
    }

    /// Create or replace a PalisadeNetworkPolicy, keeping its number; its
    /// `toFQDNs` rules allow the addresses learned so far.
    fn upsert_palisade_policy(
        &mut self,
        object: &PalisadeNetworkPolicy,
        value: &PalisadePolicy,
    ) -> Result<Change, NodeError> {
        let old = self
            .tx
            .palisade_policy(&value.base.namespace, &value.base.name)?;
        if old.as_ref().is_some_and(|o| &o.object == object) {
            return Ok(Change::Unchanged);
        }
        let id = match &old {
            Some(o) => o.id,
            None => self.tx.allocate_policy_id()?,
        };
        let stored = StoredPalisadePolicy {
            id,
            object: object.clone(),
            policy: value.clone(),
        };
        let cache = self.tx.fqdns()?;
        upsert(old.map(|o| o.object), &stored.object, || {
            self.tx.put_palisade_policy(&stored)?;
            self.engine
                .upsert_policy(stored.id, fqdn::expand(&stored.policy, &cache));
            self.inputs = true;
            Ok(())
        })
    }

    /// Delete a PalisadeNetworkPolicy if it exists; whether it did.
    fn delete_palisade_policy(&mut self, namespace: &str, name: &str) -> Result<bool, NodeError> {
        let Some(p) = self.tx.palisade_policy(namespace, name)? else {
            return Ok(false);
        };
        self.tx.delete_palisade_policy(namespace, name)?;
        self.engine.remove_policy(p.id);
        self.inputs = true;
        Ok(true)
    }

    /// Store the learned addresses that differ between `before` and
    /// `after`, and rewrite the PalisadeNetworkPolicies whose `toFQDNs`
    /// match a name in `changed`.
    fn write_fqdns(
        &mut self,
        before: &fqdn::FqdnCache,
        after: &fqdn::FqdnCache,
        changed: &BTreeSet<String>,
    ) -> Result<(), NodeError> {
        let old: BTreeMap<(String, IpAddr), u64> = before
            .entries()
            .map(|l| ((l.name, l.address), l.expires))
            .collect();
        let new: BTreeMap<(String, IpAddr), u64> = after
            .entries()
            .map(|l| ((l.name, l.address), l.expires))
            .collect();
        for ((name, address), expires) in &new {
            if old.get(&(name.clone(), *address)) != Some(expires) {
                self.tx.put_fqdn(&fqdn::Learned {
                    name: name.clone(),
                    address: *address,
                    expires: *expires,
                })?;
            }
        }
        for (name, address) in old.keys() {
            if !new.contains_key(&(name.clone(), *address)) {
                self.tx.delete_fqdn(name, *address)?;
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        for p in self.tx.palisade_policies()? {
            if changed.iter().any(|n| fqdn::uses_name(&p.policy, n)) {
                self.engine
                    .upsert_policy(p.id, fqdn::expand(&p.policy, after));
                self.inputs = true;
            }
        }
        for t in self.tx.tier_policies()? {
            if changed.iter().any(|n| fqdn::tier_uses_name(&t.policy, n)) {
                self.engine
                    .upsert_tier_policy(t.id, fqdn::expand_tier(&t.policy, after));
                self.inputs = true;
            }
        }
        Ok(())
    }

    fn put_endpoint(&mut self, ep: &Endpoint) -> Result<(), NodeError> {
        self.tx.put_endpoint(ep)?;
        self.engine.upsert_endpoint(ep.input());
        self.inputs = true;
        Ok(())
    }

    fn delete_endpoint(&mut self, ep: &Endpoint) -> Result<(), NodeError> {
        self.tx.delete_endpoint(&ep.key())?;
        self.engine.remove_endpoint(ep.id);
        self.inputs = true;
        Ok(())
    }

    fn put_remote_pod(&mut self, pod: &RemotePod) -> Result<(), NodeError> {
        self.tx.put_remote_pod(pod)?;
        self.engine.upsert_endpoint(pod.input());
        self.inputs = true;
        Ok(())
    }

    fn delete_remote_pod(&mut self, namespace: &str, name: &str) -> Result<bool, NodeError> {
        let Some(old) = self.tx.remote_pod(namespace, name)? else {
            return Ok(false);
        };
        self.tx.delete_remote_pod(namespace, name)?;
        self.engine.remove_endpoint(old.id);
        self.inputs = true;
        Ok(true)
    }

    /// Keep a pod's remote record in step with where it runs.
    fn place_pod(
        &mut self,
        namespace: &str,
        name: &str,
        placement: &Placement,
        this_node: &str,
    ) -> Result<(), NodeError> {
        let old = self.tx.remote_pod(namespace, name)?;
        let (Some(addresses), Some(node)) = (
            placement.remote_addresses(this_node),
            placement.node.as_deref(),
        ) else {
            if old.is_some() {
                self.delete_remote_pod(namespace, name)?;
            }
            return Ok(());
        };
        if let Some(o) = &old
            && o.addresses == addresses
            && o.node == node
        {
            return Ok(());
        }
        let id = match old {
            Some(o) => o.id,
            None => self.tx.allocate_endpoint_id()?,
        };
        self.put_remote_pod(&RemotePod {
            id,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            node: node.to_owned(),
            addresses: addresses.to_vec(),
        })
    }

    fn put_remote_node(&mut self, node: &RemoteNode) -> Result<(), NodeError> {
        self.tx.put_remote_node(node)?;
        self.engine
            .upsert_node(&node.name, &node.addresses, &node.labels);
        self.inputs = true;
        Ok(())
    }

    fn delete_remote_node(&mut self, name: &str) -> Result<bool, NodeError> {
        if !self.tx.delete_remote_node(name)? {
            return Ok(false);
        }
        self.engine.remove_node(name);
        self.inputs = true;
        Ok(true)
    }

    fn set_host_addresses(&mut self, addrs: &[IpAddr]) -> Result<(), NodeError> {
        if self.tx.host_addresses()? != addrs {
            self.tx.set_host_addresses(addrs)?;
            self.engine.set_host_addresses(addrs);
            self.inputs = true;
        }
        Ok(())
    }

    fn set_mode(&mut self, mode: Mode) -> Result<(), NodeError> {
        self.tx.set_mode(mode)?;
        self.engine.set_node_mode(mode);
        self.inputs = true;
        Ok(())
    }
}

/// The store, the engine and the dataplane of one node.
#[derive(Debug)]
pub struct Node<D: Dataplane> {
    pub store: Store,
    pub dataplane: D,
    pub lock_timeout: Duration,
    /// The engine and the store generation it reflects.
    engine: Option<(Engine, u64)>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Build the engine from a whole state (the identity numbers in it are
/// kept). Returns what the user should know (addresses claimed twice).
pub fn build_engine(state: &State) -> (Engine, Vec<String>) {
    let mut e = Engine::new(state.identities.clone(), state.mode);
    e.begin_bulk();
    for ns in state.namespaces.values() {
        e.upsert_namespace(ns.value.clone());
    }
    for pod in state.pods.values() {
        e.upsert_pod(pod.value.clone());
    }
    // Policies before endpoints: identities are computed once, with every
    // ipBlock and named port that refines them already known.
    for p in state.policies.values() {
        e.upsert_policy(p.id, p.policy.clone());
    }
    for p in state.palisade_policies.values() {
        e.upsert_policy(p.id, fqdn::expand(&p.policy, &state.fqdns));
    }
    for (id, p) in state.tier_policies() {
        e.upsert_tier_policy(id, p);
    }
    e.set_host_addresses(&state.host_addresses);
    // Endpoints with the same labels one after another: the policies and
    // rules that select them stay in the CPU's caches (several times
    // faster on a large node than in id order; the result is the same).
    let mut eps: Vec<(&str, Labels, &Endpoint)> = state
        .endpoints
        .values()
        .map(|ep| (ep.namespace.as_str(), state.effective_labels(ep), ep))
        .collect();
    eps.sort_by(|a, b| (a.0, &a.1, a.2.id).cmp(&(b.0, &b.1, b.2.id)));
    for (_, _, ep) in eps {
        e.upsert_endpoint(ep.input());
    }
    for r in state.remote.values() {
        e.upsert_endpoint(r.input());
    }
    // After the pods: an address a pod has never holds the node identity
    // in between.
    for n in state.nodes.values() {
        e.upsert_node(&n.name, &n.addresses, &n.labels);
    }
    let warnings = e.end_bulk().warnings;
    (e, warnings)
}

/// Make the stored identities equal to `now` (after a build or a full
/// compile).
fn store_identities(
    tx: &mut Txn<'_>,
    before: &IdentityTable,
    now: &IdentityTable,
) -> Result<(), StoreError> {
    let mut changed = false;
    for (key, id) in now.iter() {
        if before.key_of(id) != Some(key) {
            tx.put_identity(id, key)?;
            changed = true;
        }
    }
    for (_, id) in before.iter() {
        if now.key_of(id).is_none() {
            tx.delete_identity(id)?;
            changed = true;
        }
    }
    // Numbers handed out and given back while loading (ipBlock regions
    // seen before all their blocks) need not be recorded: nothing uses
    // them, so a write that changes nothing stays without a commit.
    if changed {
        tx.set_identity_counters(now.counters())?;
    }
    Ok(())
}

/// Compile a state in full: the endpoint views, then the compiler.
/// Identities are allocated in (and unused ones dropped from) the state's
/// table. For display and repair; the per-event path is the engine.
pub fn compile_state(state: &mut State) -> Compiled {
    let namespaces = state.namespace_map();
    let mut policies = state.policies();
    for (_, p) in &mut policies {
        p.mode = Some(state.effective_mode(p, &namespaces));
    }
    let endpoints: Vec<EndpointView> = state
        .endpoints
        .values()
        .map(|ep| EndpointView {
            ep_id: ep.id,
            ifindex: ep.host_ifindex,
            namespace: ep.namespace.clone(),
            name: ep.name.clone(),
            labels: state.effective_labels(ep),
            ports: state
                .pod_info(&ep.namespace, &ep.name)
                .map(|p| p.ports.clone())
                .unwrap_or_default(),
            addresses: ep.addresses.clone(),
            extra_flags: 0,
            remote: false,
        })
        .chain(state.remote.values().map(|r| {
            EndpointView {
                ep_id: r.id,
                ifindex: 0,
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                labels: state
                    .pod_info(&r.namespace, &r.name)
                    .map(|p| p.labels.clone())
                    .unwrap_or_default(),
                ports: state
                    .pod_info(&r.namespace, &r.name)
                    .map(|p| p.ports.clone())
                    .unwrap_or_default(),
                addresses: r.addresses.clone(),
                extra_flags: 0,
                remote: true,
            }
        }))
        .collect();
    let host = state.host_addresses.clone();
    let nodes = compile::node_address_labels(
        state
            .nodes
            .values()
            .map(|n| {
                (
                    n.addresses.iter().copied().collect::<BTreeSet<_>>(),
                    n.labels.clone(),
                )
            })
            .collect::<Vec<_>>()
            .iter()
            .map(|(a, l)| (a, l.clone())),
    );
    let tier_policies: Vec<(u32, TierPolicy)> = state
        .tier_policies()
        .into_iter()
        .map(|(id, mut p)| {
            p.mode = Some(p.mode.unwrap_or(state.mode));
            (id, p)
        })
        .collect();
    let compiled = compile::compile(
        &compile::Input {
            namespaces: &namespaces,
            policies: &policies,
            endpoints: &endpoints,
            host_addresses: &host,
            node_addresses: &nodes,
            tier_policies: &tier_policies,
        },
        &mut state.identities,
    );
    state.identities.retain_used(&compiled.used_identities);
    compiled
}

/// Register, waiting (without the lock) while another ADD attaches its
/// programs to the same veth.
pub fn register_waiting(
    mut register: impl FnMut() -> Result<Registered, NodeError>,
) -> Result<Registered, NodeError> {
    let start = std::time::Instant::now();
    loop {
        match register()? {
            Registered::Attaching(e)
                if start.elapsed() < Duration::from_secs(ATTACH_GRACE_SECS) =>
            {
                tracing::debug!(
                    "{} is being attached by another ADD; waiting",
                    e.host_ifname
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Registered::Attaching(e) => {
                return Err(NodeError::Remote {
                    kind: ErrorKind::Busy,
                    message: format!(
                        "another ADD has been attaching programs to {} for {ATTACH_GRACE_SECS} s; try again later",
                        e.host_ifname
                    ),
                });
            }
            other => return Ok(other),
        }
    }
}

/// Detach removed endpoints' programs and forget their counters. Runs
/// without the state lock (the endpoints are out of the store and the maps
/// already, so their programs drop everything meanwhile: fail closed).
pub fn detach_endpoints<D: Dataplane>(dp: &mut D, gone: &[Endpoint]) -> Result<(), NodeError> {
    let loaded = datapath_for_cleanup(dp);
    let mut failed = Vec::new();
    for ep in gone {
        fault::point("del:unregistered");
        let detached = match &ep.attachment {
            // Removed while (or after an ADD died while) attaching: its
            // TCX links, if any, are pinned where they always are.
            Attachment::Pending => remove_pins(&dp.link_pins(ep.id)),
            att => dp.detach(att, &ep.host_ifname),
        };
        if let Err(e) = detached {
            failed.push(format!("endpoint {} ({}): {e}", ep.id, ep.host_ifname));
        }
        fault::point("del:detached");
        if loaded && let Err(e) = dp.forget_endpoint(ep.id) {
            tracing::warn!("could not clear counters of endpoint {}: {e}", ep.id);
        }
    }
    if !failed.is_empty() {
        return Err(NodeError::Dataplane(DataplaneError::Other(format!(
            "removed from the maps but not detached (traffic through them is dropped): {}",
            failed.join("; ")
        ))));
    }
    Ok(())
}

fn remove_pins(pins: &[PathBuf]) -> Result<(), DataplaneError> {
    for pin in pins {
        match std::fs::remove_file(pin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DataplaneError::Fs {
                    op: "remove link pin",
                    path: pin.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Whether a datapath is there to clean up. Cleanup (DEL, GC, poststop)
/// never loads programs: a datapath that is missing or from an
/// incompatible build has nothing of this endpoint to remove from its
/// maps, and link pins are removed either way.
fn datapath_for_cleanup<D: Dataplane>(dp: &mut D) -> bool {
    match dp.open_existing() {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::warn!("cleaning up without the datapath's maps: {e}");
            false
        }
    }
}

impl<D: Dataplane> Node<D> {
    pub fn new(store: Store, dataplane: D) -> Self {
        Self {
            store,
            dataplane,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            engine: None,
        }
    }

    /// The engine, once an operation has built it (for status and tests).
    pub fn engine(&self) -> Option<&Engine> {
        self.engine.as_ref().map(|(e, _)| e)
    }

    /// Run one write. `f` changes the store and the engine through [`Op`];
    /// then the engine's delta goes to the maps and the store commits.
    fn transact<R>(
        &mut self,
        maps: Maps,
        f: impl FnOnce(&mut Op<'_, '_>, &D) -> Result<R, NodeError>,
    ) -> Result<(R, Committed), NodeError> {
        let Node {
            store,
            dataplane,
            lock_timeout,
            engine,
        } = self;
        let mut tx = store.write(*lock_timeout)?;
        fault::point("commit:locked");
        // Loading the datapath happens under the lock: two processes must
        // not load and pin it at once.
        let loaded = match maps {
            Maps::Load => {
                dataplane.prepare()?;
                true
            }
            Maps::IfLoaded => datapath_for_cleanup(dataplane),
            Maps::No => false,
        };
        let generation = nonzero_generation(&mut tx)?;
        // The engine is out of its slot until the change is committed: if
        // anything fails, or panics, on the way, it is rebuilt from the
        // store next time instead of being used half-changed.
        let mut eng = match engine.take() {
            Some((e, g)) if g == generation => e,
            // First use, or another process changed the store.
            _ => {
                let state = tx.load()?;
                let (built, warnings) = build_engine(&state);
                for w in warnings {
                    tracing::warn!("{w}");
                }
                store_identities(&mut tx, &state.identities, built.identities())?;
                built
            }
        };
        let token = if loaded { dataplane.sync_token()? } else { 0 };
        if loaded && (token == 0 || token != generation) {
            // The maps do not match the store (an interrupted write, a new
            // datapath, or one that was away): repair them from it first.
            let r = dataplane.sync(eng.desired())?;
            if token == 0 {
                // A new datapath: the endpoints' MAC addresses too.
                for e in tx.load()?.endpoints.values() {
                    dataplane.set_endpoint_mac(e.host_ifindex, e.mac)?;
                }
            }
            dataplane.set_sync_token(generation)?;
            tracing::info!(
                "datapath repaired from the store (generation {generation}): {} written, {} removed",
                r.upserted,
                r.deleted
            );
        }

        let mut op = Op {
            tx: &mut tx,
            engine: &mut eng,
            inputs: false,
        };
        let value = f(&mut op, dataplane);
        let inputs = op.inputs;
        let value = match value {
            Ok(v) => v,
            Err(e) => {
                // An engine that took part of the change stays out (it is
                // rebuilt next time); one that did not goes back.
                if !inputs {
                    *engine = Some((eng, generation));
                }
                return Err(e);
            }
        };
        if !inputs {
            if tx.changed() {
                tx.commit()?;
                fault::point("commit:store-committed");
            }
            *engine = Some((eng, generation));
            return Ok((value, Committed::default()));
        }

        let changes = eng.finish();
        let ids_now = eng.identities().counters();
        let next = (|| -> Result<u64, StoreError> {
            for (id, key) in &changes.identities_added {
                tx.put_identity(*id, key)?;
            }
            for id in &changes.identities_removed {
                tx.delete_identity(*id)?;
            }
            tx.set_identity_counters(ids_now)?;
            tx.bump_generation()
        })()?;
        let mut report = SyncReport::default();
        if loaded {
            // Until the store commits, the maps match neither generation;
            // they carry the new one before the lock is released, so no
            // other writer can find them matching a store they do not.
            let written = dataplane
                .set_sync_token(0)
                .and_then(|()| {
                    fault::point("commit:maps-unmarked");
                    dataplane.apply(&changes.delta)
                })
                .and_then(|r| dataplane.set_sync_token(next).map(|()| r));
            fault::point("commit:maps-written");
            match written {
                Ok(r) => report = r,
                Err(e) => return Err(undo(dataplane, &changes.undo, generation, e.into())),
            }
        }
        if let Err(e) = tx.commit() {
            return Err(if loaded {
                undo(dataplane, &changes.undo, generation, e.into())
            } else {
                e.into()
            });
        }
        fault::point("commit:store-committed");
        *engine = Some((eng, next));
        Ok((
            value,
            Committed {
                report,
                warnings: changes.warnings,
            },
        ))
    }

    /// Register an endpoint and write its maps; its programs are attached
    /// afterwards, outside the lock ([`Node::complete_add`]).
    pub fn register_endpoint(&mut self, mut new: NewEndpoint) -> Result<Registered, NodeError> {
        let ((registered, stale), c) = self.transact(Maps::Load, |op, dp| {
            let key = Endpoint::key_for(&new.network, &new.container_id, &new.ifname);
            let on_veth = op.tx.endpoints_on_ifindex(new.host_ifindex)?;
            // No double work: a live endpoint the other integration
            // registered for this very veth keeps it. (Two containers
            // sharing one network namespace, such as a Podman pod or a
            // Kubernetes pod's app containers, share its endpoint.)
            let now = now_secs();
            let attaching = |e: &Endpoint| {
                e.attachment == Attachment::Pending
                    && now.saturating_sub(e.created) < ATTACH_GRACE_SECS
            };
            for e in on_veth
                .iter()
                .filter(|e| e.host_ifname == new.host_ifname && e.key() != key)
            {
                if attaching(e) {
                    return Ok((Registered::Attaching(e.clone()), Vec::new()));
                }
                if dp.verify(&e.attachment, &e.host_ifname).is_ok() {
                    return Ok((Registered::AlreadyManaged(e.clone()), Vec::new()));
                }
            }
            // An identity an OCI hook recorded before the network existed.
            op.tx
                .prune_pending(now.saturating_sub(PENDING_TTL_SECS - 1))?;
            if let Some(ino) = new.netns_inode
                && !new.k8s
                && let Some(p) = op.tx.take_pending(ino)?
            {
                new.namespace = p.namespace;
                new.name = p.name;
                new.labels.extend(p.labels);
            }
            // A repeated ADD replaces the earlier registration; an endpoint
            // still claiming this veth is stale (its veth was deleted and
            // the index reused).
            let mut stale = on_veth;
            if let Some(same) = op.tx.endpoint(&key)?
                && !stale.iter().any(|e| e.id == same.id)
            {
                stale.push(same);
            }
            for old in &stale {
                op.delete_endpoint(old)?;
            }
            if let Some(h) = &new.host_addresses {
                op.set_host_addresses(h)?;
            }
            let id = op.tx.allocate_endpoint_id()?;
            let ep = Endpoint {
                id,
                source: new.source,
                network: new.network.clone(),
                container_id: new.container_id.clone(),
                ifname: new.ifname.clone(),
                namespace: new.namespace.clone(),
                name: new.name.clone(),
                labels: new.labels.clone(),
                netns: new.netns.clone(),
                host_ifname: new.host_ifname.clone(),
                host_ifindex: new.host_ifindex,
                addresses: new.addresses.clone(),
                k8s: new.k8s,
                mac: new.mac,
                attachment: Attachment::Pending,
                created: now,
            };
            // Maps first: the first packet through the programs already
            // finds this endpoint's policy.
            op.put_endpoint(&ep)?;
            Ok((Registered::New(ep), stale))
        })?;
        fault::point("add:registered");
        // Their veths are gone; their pins and filters go now.
        if let Err(e) = detach_endpoints(&mut self.dataplane, &stale) {
            tracing::warn!("stale endpoints: {e}");
        }
        if let Registered::New(ep) = &registered
            && let Err(e) = self.dataplane.set_endpoint_mac(ep.host_ifindex, ep.mac)
        {
            tracing::warn!("endpoint {}: its MAC address is not checked ({e})", ep.id);
        }
        for w in &c.warnings {
            tracing::warn!("{w}");
        }
        Ok(registered)
    }

    /// Record how a registered endpoint's programs were attached, or take
    /// it out again if attaching failed. Nothing stays behind on failure.
    pub fn complete_add(
        &mut self,
        ep: Endpoint,
        attached: Result<Attachment, DataplaneError>,
    ) -> Result<Endpoint, NodeError> {
        let key = ep.key();
        let att = match attached {
            Ok(att) => att,
            Err(e) => {
                let cleanup = self.unregister(&[EndpointRef {
                    key,
                    id: Some(ep.id),
                }]);
                if let Err(c) = cleanup {
                    tracing::warn!("could not take endpoint {} out again: {c}", ep.id);
                }
                return Err(e.into());
            }
        };
        let recorded = self.transact(Maps::No, |op, _| match op.tx.endpoint(&key)? {
            Some(mut e) if e.id == ep.id => {
                e.attachment = att.clone();
                op.tx.put_endpoint(&e)?;
                Ok(Some(e))
            }
            _ => Ok(None),
        });
        match recorded {
            Ok((Some(e), _)) => Ok(e),
            Ok((None, _)) => {
                let mut msg =
                    format!("endpoint {key} was removed while its programs were being attached");
                if let Err(d) = self.dataplane.detach(&att, &ep.host_ifname) {
                    msg.push_str(&format!(
                        "; detaching them again failed too ({d}): run `palisadectl gc`"
                    ));
                }
                Err(NodeError::NotFound(msg))
            }
            Err(e) => {
                if let Err(d) = self.dataplane.detach(&att, &ep.host_ifname) {
                    tracing::warn!(
                        "could not detach the programs of endpoint {} from {} again: {d}",
                        ep.id,
                        ep.host_ifname
                    );
                }
                if let Err(c) = self.unregister(&[EndpointRef {
                    key,
                    id: Some(ep.id),
                }]) {
                    tracing::warn!("could not take endpoint {} out again: {c}", ep.id);
                }
                Err(e)
            }
        }
    }

    /// Register an endpoint, program its maps, then attach the programs.
    /// On any failure nothing stays behind.
    pub fn add_endpoint(&mut self, new: NewEndpoint) -> Result<AddOutcome, NodeError> {
        let ep = match register_waiting(|| self.register_endpoint(new.clone()))? {
            Registered::AlreadyManaged(e) => return Ok(AddOutcome::AlreadyManaged(e)),
            Registered::New(ep) => ep,
            Registered::Attaching(_) => unreachable!("register_waiting waits it out"),
        };
        let attached = self
            .dataplane
            .attach(ep.id, &ep.host_ifname, ep.host_ifindex);
        fault::point("add:attached");
        self.complete_add(ep, attached).map(AddOutcome::Added)
    }

    /// Whether the endpoint `key` exists on this veth with its programs
    /// attached (a hook that runs twice for one container does nothing).
    pub fn is_enforced(&mut self, key: &str, ifindex: u32) -> Result<bool, NodeError> {
        let Some(ep) = self.store.endpoint(key)? else {
            return Ok(false);
        };
        if ep.host_ifindex != ifindex {
            return Ok(false);
        }
        Ok(self
            .dataplane
            .verify(&ep.attachment, &ep.host_ifname)
            .is_ok())
    }

    /// Give an endpoint a new namespace, name and labels (an OCI hook
    /// learning the identity of a container the CNI plugin registered).
    pub fn set_identity(
        &mut self,
        key: &str,
        namespace: &str,
        name: &str,
        labels: &Labels,
    ) -> Result<(), NodeError> {
        self.transact(Maps::Load, |op, _| {
            let Some(mut ep) = op.tx.endpoint(key)? else {
                return Err(NodeError::NotFound(format!("no endpoint {key}")));
            };
            if ep.namespace == namespace && ep.name == name && ep.labels == *labels {
                return Ok(());
            }
            ep.namespace = namespace.to_owned();
            ep.name = name.to_owned();
            ep.labels = labels.clone();
            op.put_endpoint(&ep)
        })?;
        Ok(())
    }

    /// Remember an identity for a network namespace that has no interface
    /// yet (`ctr run --cni` runs hooks before CNI ADD); the CNI ADD for that
    /// namespace picks it up.
    pub fn record_pending(
        &mut self,
        inode: u64,
        pending: PendingIdentity,
    ) -> Result<(), NodeError> {
        self.transact(Maps::No, |op, _| {
            // The CNI ADD follows the hook within seconds; an identity
            // nobody claimed soon is stale, and namespace inodes get reused.
            op.tx
                .prune_pending(now_secs().saturating_sub(PENDING_TTL_SECS - 1))?;
            op.tx.put_pending(inode, &pending)?;
            Ok(())
        })?;
        Ok(())
    }

    /// Forget everything an OCI container registered: its endpoints and any
    /// pending identity. Idempotent.
    pub fn remove_container(&mut self, container_id: &str) -> Result<Vec<Endpoint>, NodeError> {
        let (gone, _) = self.transact(Maps::IfLoaded, |op, _| {
            op.tx.forget_pending_of(container_id)?;
            let mut gone = Vec::new();
            for e in op.tx.endpoints_of_container(container_id)? {
                if e.source == Source::Oci {
                    op.delete_endpoint(&e)?;
                    gone.push(e);
                }
            }
            Ok(gone)
        })?;
        detach_endpoints(&mut self.dataplane, &gone)?;
        // A removal killed half-way leaves pins and counters behind; the
        // retry that follows finds nothing to remove, so it sweeps.
        self.sweep();
        Ok(gone)
    }

    /// Take endpoints out of the store and the maps (under the lock); their
    /// programs are detached afterwards ([`detach_endpoints`]).
    pub fn unregister(&mut self, which: &[EndpointRef]) -> Result<Vec<Endpoint>, NodeError> {
        let (gone, _) = self.transact(Maps::IfLoaded, |op, _| {
            let mut gone = Vec::new();
            for r in which {
                if let Some(e) = op.tx.endpoint(&r.key)?
                    && r.id.is_none_or(|id| id == e.id)
                {
                    op.delete_endpoint(&e)?;
                    gone.push(e);
                }
            }
            Ok(gone)
        })?;
        Ok(gone)
    }

    /// Remove endpoints: out of the maps (their programs then drop
    /// everything: fail closed), out of the store, then detached.
    pub fn remove_endpoints(&mut self, which: &[EndpointRef]) -> Result<Vec<Endpoint>, NodeError> {
        let gone = self.unregister(which)?;
        detach_endpoints(&mut self.dataplane, &gone)?;
        // See `remove_container`.
        self.sweep();
        Ok(gone)
    }

    /// Remove every endpoint for which `stale` says so (CNI GC, `palisadectl gc`).
    pub fn remove_endpoints_where(
        &mut self,
        stale: impl Fn(&Endpoint) -> bool,
    ) -> Result<Vec<Endpoint>, NodeError> {
        let which = stale_refs(&self.store.read()?, stale);
        if which.is_empty() {
            self.sweep();
            return Ok(Vec::new());
        }
        // Sweeps too.
        self.remove_endpoints(&which)
    }

    /// Fail unless the endpoint is registered, in the maps and attached.
    pub fn check_endpoint(&mut self, key: &str) -> Result<Endpoint, NodeError> {
        let ep = self.store.endpoint(key)?.ok_or_else(|| {
            NodeError::NotFound(format!(
                "palisade has no endpoint {key}; it was never added or was deleted"
            ))
        })?;
        // Verifying reads pins and the kernel's attach lists; it never
        // loads anything.
        self.dataplane.verify(&ep.attachment, &ep.host_ifname)?;
        Ok(ep)
    }

    /// Set the node's default mode, or a namespace's (through the
    /// `palisade.io/mode` annotation of its Namespace object, created if
    /// the namespace has none). `None` for a namespace removes its own
    /// setting.
    pub fn set_mode(
        &mut self,
        namespace: Option<&str>,
        mode: Option<Mode>,
    ) -> Result<SyncReport, NodeError> {
        let (_, c) = self.transact(Maps::Load, |op, _| match namespace {
            None => op.set_mode(mode.unwrap_or_default()),
            Some(ns) => {
                let mut obj = op.tx.namespace(ns)?.map(|v| v.object).unwrap_or_else(|| {
                    let mut n = k8s_openapi::api::core::v1::Namespace::default();
                    n.metadata.name = Some(ns.to_owned());
                    n
                });
                let ann = obj
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default);
                match mode {
                    Some(m) => {
                        ann.insert(MODE_ANNOTATION.to_owned(), m.as_str().to_owned());
                    }
                    None => {
                        ann.remove(MODE_ANNOTATION);
                    }
                }
                let valid = validate_namespace_object(obj)
                    .map_err(|e| NodeError::Invalid(format!("namespace {ns:?}: {e}")))?;
                op.put_namespace(&valid)
            }
        })?;
        Ok(c.report)
    }

    /// Create or replace objects, then enforce the result.
    pub fn apply(&mut self, objects: Vec<Object>) -> Result<ObjectsReport, NodeError> {
        let (changes, c) = self.transact(Maps::Load, |op, _| {
            Self::refuse_in_cluster(op.tx, "apply")?;
            let mut changes = Vec::new();
            for obj in objects {
                let r = obj.reference();
                let change = match obj {
                    Object::Namespace(ns) => {
                        let old = op.tx.namespace(&r.name)?;
                        upsert(old.map(|o| o.object), &ns.object, || op.put_namespace(&ns))?
                    }
                    Object::Pod(pod) => {
                        let old = op.tx.pod(&r.namespace, &r.name)?;
                        upsert(old.map(|o| o.object), &pod.object, || op.put_pod(&pod))?
                    }
                    Object::NetworkPolicy(np) => {
                        let old = op.tx.policy(&r.namespace, &r.name)?;
                        let id = match &old {
                            Some(sp) => sp.id,
                            None => op.tx.allocate_policy_id()?,
                        };
                        let stored = StoredPolicy {
                            id,
                            object: np.object,
                            policy: np.value,
                        };
                        upsert(old.map(|o| o.object), &stored.object, || {
                            op.put_policy(&stored)
                        })?
                    }
                    Object::TierPolicy(t) => op.upsert_tier_policy(&t.object, &t.value)?,
                    Object::PalisadePolicy(p) => op.upsert_palisade_policy(&p.object, &p.value)?,
                };
                changes.push((r, change));
            }
            Ok(changes)
        })?;
        Ok(ObjectsReport {
            changes,
            sync: c.report,
            warnings: c.warnings,
        })
    }

    /// Record addresses the DNS proxy saw answered, and make the
    /// `toFQDNs` rules whose names they match allow them. Returns when the
    /// maps hold them (the proxy answers the pod only then). At most `cap`
    /// addresses per name.
    pub fn learn_fqdns(
        &mut self,
        learned: &[fqdn::Learned],
        cap: usize,
    ) -> Result<SyncReport, NodeError> {
        let (_, c) = self.transact(Maps::Load, |op, _| {
            let mut cache = op.tx.fqdns()?;
            let before = cache.clone();
            let mut changed_names = BTreeSet::new();
            for l in learned {
                if cache.learn(&l.name, l.address, l.expires, cap) {
                    changed_names.insert(crate::policy::palisade::normalize(&l.name));
                }
            }
            op.write_fqdns(&before, &cache, &changed_names)
        })?;
        Ok(c.report)
    }

    /// Forget learned addresses that expired before `now` (Unix seconds),
    /// except those in `in_use` (an open connection still uses them).
    /// How many were forgotten.
    pub fn expire_fqdns(
        &mut self,
        now: u64,
        in_use: &BTreeSet<IpAddr>,
    ) -> Result<usize, NodeError> {
        let (n, _) = self.transact(Maps::IfLoaded, |op, _| {
            let mut cache = op.tx.fqdns()?;
            let before = cache.clone();
            let changed: BTreeSet<String> = cache.expire(now, in_use).into_iter().collect();
            if changed.is_empty() {
                return Ok(0);
            }
            op.write_fqdns(&before, &cache, &changed)?;
            Ok(before.len() - cache.len())
        })?;
        Ok(n)
    }

    /// Apply a batch of events from the Kubernetes API (cluster mode; the
    /// node is `this_node`) in one transaction. Objects equal to the stored
    /// ones change nothing.
    pub fn apply_api(
        &mut self,
        this_node: &str,
        changes: &ApiChanges,
    ) -> Result<ApiReport, NodeError> {
        let (mut report, c) = self.transact(Maps::Load, |op, _| {
            let mut report = ApiReport::default();
            if op.tx.setting(CLUSTER_NODE_SETTING)?.as_deref() != Some(this_node) {
                op.tx.set_setting(CLUSTER_NODE_SETTING, this_node)?;
            }
            let mut listed: BTreeMap<Kind, BTreeSet<(String, String)>> = changes
                .complete
                .iter()
                .map(|k| (*k, BTreeSet::new()))
                .collect();
            for r in &changes.listed {
                if let Some(set) = listed.get_mut(&r.kind) {
                    set.insert((r.namespace.clone(), r.name.clone()));
                }
            }
            let mut count = |c: Change| match c {
                Change::Created => report.created += 1,
                Change::Configured => report.changed += 1,
                _ => report.unchanged += 1,
            };
            for obj in &changes.upserts {
                let r = obj.reference();
                if let Some(set) = listed.get_mut(&r.kind) {
                    set.insert((r.namespace.clone(), r.name.clone()));
                }
                match obj {
                    ApiObject::Namespace(ns) => {
                        let old = op.tx.namespace(&r.name)?;
                        count(upsert(old.map(|o| o.object), &ns.object, || {
                            op.put_namespace(ns)
                        })?);
                    }
                    ApiObject::Pod(pod, placement) => {
                        let old = op.tx.pod(&r.namespace, &r.name)?;
                        count(upsert(old.map(|o| o.object), &pod.object, || {
                            op.put_pod(pod)
                        })?);
                        op.place_pod(&r.namespace, &r.name, placement, this_node)?;
                    }
                    ApiObject::NetworkPolicy(np) => {
                        let old = op.tx.policy(&r.namespace, &r.name)?;
                        let id = match &old {
                            Some(sp) => sp.id,
                            None => op.tx.allocate_policy_id()?,
                        };
                        // Compared before anything is copied.
                        if old.as_ref().is_some_and(|o| o.object == np.object) {
                            count(Change::Unchanged);
                            continue;
                        }
                        let stored = StoredPolicy {
                            id,
                            object: np.object.clone(),
                            policy: np.value.clone(),
                        };
                        count(upsert(old.map(|o| o.object), &stored.object, || {
                            op.put_policy(&stored)
                        })?);
                    }
                    ApiObject::TierPolicy(t) => {
                        count(op.upsert_tier_policy(&t.object, &t.value)?);
                    }
                    ApiObject::PalisadePolicy(p) => {
                        count(op.upsert_palisade_policy(&p.object, &p.value)?);
                    }
                    // This node's addresses are the host's.
                    ApiObject::Node(n) if n.name == this_node => {
                        op.delete_remote_node(&n.name)?;
                    }
                    ApiObject::Node(n) => {
                        let old = op.tx.remote_node(&n.name)?;
                        count(match &old {
                            Some(o) if o == n => Change::Unchanged,
                            Some(_) => Change::Configured,
                            None => Change::Created,
                        });
                        if old.as_ref() != Some(n) {
                            op.put_remote_node(n)?;
                        }
                    }
                }
            }
            let mut gone = changes.deletes.clone();
            for (kind, keep) in &listed {
                for (namespace, name) in op.tx.object_keys(*kind)? {
                    if !keep.contains(&(namespace.clone(), name.clone())) {
                        gone.push(ObjectRef {
                            kind: *kind,
                            namespace,
                            name,
                        });
                    }
                }
            }
            for r in gone {
                // Deleting a Namespace does not cascade here: the API
                // sends the deletion of each of its objects.
                let found = match r.kind {
                    Kind::Namespace => op.delete_namespace(&r.name)?,
                    Kind::Pod => {
                        let remote = op.delete_remote_pod(&r.namespace, &r.name)?;
                        op.delete_pod(&r.namespace, &r.name)? || remote
                    }
                    Kind::NetworkPolicy => match op.tx.policy(&r.namespace, &r.name)? {
                        Some(p) => {
                            op.delete_policy(&p)?;
                            true
                        }
                        None => false,
                    },
                    Kind::Node => op.delete_remote_node(&r.name)?,
                    Kind::AdminNetworkPolicy
                    | Kind::BaselineAdminNetworkPolicy
                    | Kind::ClusterNetworkPolicy => {
                        let kind = r.kind.tier_kind().expect("a tier kind");
                        op.delete_tier_policy(kind, &r.name)?
                    }
                    Kind::PalisadeNetworkPolicy => {
                        op.delete_palisade_policy(&r.namespace, &r.name)?
                    }
                };
                if found {
                    report.deleted += 1;
                }
            }
            Ok(report)
        })?;
        report.upserted = c.report.upserted;
        report.removed = c.report.deleted;
        for w in c.warnings {
            tracing::warn!("{w}");
        }
        Ok(report)
    }

    /// Leave cluster mode: objects stay, `palisadectl apply` takes them again.
    pub fn leave_cluster(&mut self) -> Result<(), NodeError> {
        self.transact(Maps::No, |op, _| {
            if op.tx.setting(CLUSTER_NODE_SETTING)?.is_some() {
                op.tx.delete_setting(CLUSTER_NODE_SETTING)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Refuse what the API server (or the etcd datastore) owns.
    fn refuse_in_cluster(tx: &Txn<'_>, what: &str) -> Result<(), NodeError> {
        match tx.setting(CLUSTER_NODE_SETTING)? {
            Some(node) => Err(NodeError::Invalid(format!(
                "this node ({node}) takes Namespaces, Pods and policies from a shared \
                 datastore, so {what} them there: with kubectl in Kubernetes cluster mode \
                 (`kubectl {what} -f FILE`), or with palisadectl and the etcd settings on hosts \
                 that share etcd (`palisadectl --etcd-endpoints URL ... {what} -f FILE`, or \
                 /etc/palisade/datastore.yaml); palisade-only settings such as \
                 `palisadectl mode` stay local"
            ))),
            None => Ok(()),
        }
    }

    /// Delete objects. Deleting a Namespace deletes its Pods and
    /// NetworkPolicies too, as Kubernetes does.
    pub fn delete(&mut self, refs: Vec<ObjectRef>) -> Result<ObjectsReport, NodeError> {
        let (changes, c) = self.transact(Maps::Load, |op, _| {
            Self::refuse_in_cluster(op.tx, "delete")?;
            let mut changes = Vec::new();
            for r in refs {
                let found = match r.kind {
                    Kind::Namespace => {
                        for pod in op.tx.pods_in(&r.name)? {
                            op.delete_pod(&pod.value.namespace, &pod.value.name)?;
                            changes.push((
                                ObjectRef {
                                    kind: Kind::Pod,
                                    namespace: r.name.clone(),
                                    name: pod.value.name.clone(),
                                },
                                Change::Deleted,
                            ));
                        }
                        for p in op.tx.policies_in(&r.name)? {
                            op.delete_policy(&p)?;
                            changes.push((
                                ObjectRef {
                                    kind: Kind::NetworkPolicy,
                                    namespace: r.name.clone(),
                                    name: p.policy.name.clone(),
                                },
                                Change::Deleted,
                            ));
                        }
                        for p in op.tx.palisade_policies()? {
                            if p.policy.base.namespace != r.name {
                                continue;
                            }
                            op.delete_palisade_policy(&r.name, &p.policy.base.name)?;
                            changes.push((
                                ObjectRef {
                                    kind: Kind::PalisadeNetworkPolicy,
                                    namespace: r.name.clone(),
                                    name: p.policy.base.name.clone(),
                                },
                                Change::Deleted,
                            ));
                        }
                        op.delete_namespace(&r.name)?
                    }
                    Kind::Pod => op.delete_pod(&r.namespace, &r.name)?,
                    Kind::NetworkPolicy => match op.tx.policy(&r.namespace, &r.name)? {
                        Some(p) => {
                            op.delete_policy(&p)?;
                            true
                        }
                        None => false,
                    },
                    Kind::Node => op.delete_remote_node(&r.name)?,
                    Kind::AdminNetworkPolicy
                    | Kind::BaselineAdminNetworkPolicy
                    | Kind::ClusterNetworkPolicy => {
                        let kind = r.kind.tier_kind().expect("a tier kind");
                        op.delete_tier_policy(kind, &r.name)?
                    }
                    Kind::PalisadeNetworkPolicy => {
                        op.delete_palisade_policy(&r.namespace, &r.name)?
                    }
                };
                changes.push((
                    r,
                    if found {
                        Change::Deleted
                    } else {
                        Change::NotFound
                    },
                ));
            }
            Ok(changes)
        })?;
        Ok(ObjectsReport {
            changes,
            sync: c.report,
            warnings: c.warnings,
        })
    }

    /// Compile everything in full and make the kernel maps match it,
    /// reading them whole (repair). The engine is rebuilt from the store
    /// and checked against the full compile; a difference is reported.
    pub fn resync(&mut self) -> Result<(SyncReport, Vec<String>), NodeError> {
        self.engine = None;
        let Node {
            store,
            dataplane,
            lock_timeout,
            engine,
        } = self;
        let mut tx = store.write(*lock_timeout)?;
        dataplane.prepare()?;
        let mut generation = nonzero_generation(&mut tx)?;
        let state = tx.load()?;
        let (built, mut warnings) = build_engine(&state);
        let (full, ids) = built.full_compile();
        let agrees = full.desired == *built.desired() && ids == *built.identities();
        if !agrees {
            warnings.push(format!(
                "the incremental engine disagreed with a full compile ({} policy, {} ipcache, {} endpoint entries in the full compile vs {}, {}, {}); the full compile was written — please report this",
                full.desired.policy.len(),
                full.desired.ipcache.len(),
                full.desired.endpoints.len(),
                built.desired().policy.len(),
                built.desired().ipcache.len(),
                built.desired().endpoints.len(),
            ));
            generation = tx.bump_generation()?;
        }
        store_identities(&mut tx, &state.identities, &ids)?;
        dataplane.set_sync_token(0)?;
        let report = dataplane.sync(&full.desired)?;
        // Before the lock is released (see `transact`).
        dataplane.set_sync_token(generation)?;
        if tx.changed() {
            tx.commit()?;
        } else {
            drop(tx);
        }
        if agrees {
            *engine = Some((built, generation));
        }
        self.sweep();
        Ok((report, warnings))
    }

    /// Build the engine from the store and make the kernel maps match it,
    /// reading them whole (a daemon's start). When they match already,
    /// nothing is written and no verdict changes.
    pub fn start(&mut self) -> Result<SyncReport, NodeError> {
        self.engine = None;
        let Node {
            store,
            dataplane,
            lock_timeout,
            engine,
        } = self;
        let mut tx = store.write(*lock_timeout)?;
        dataplane.prepare()?;
        let generation = nonzero_generation(&mut tx)?;
        let t = std::time::Instant::now();
        let state = tx.load()?;
        let loaded = t.elapsed();
        let (built, warnings) = build_engine(&state);
        let engine_built = t.elapsed() - loaded;
        for w in warnings {
            tracing::warn!("{w}");
        }
        store_identities(&mut tx, &state.identities, built.identities())?;
        let report = dataplane.sync(built.desired())?;
        tracing::info!(
            "start: store read in {} ms ({} policies, {} endpoints), engine built in {} ms, maps read and reconciled in {} ms",
            loaded.as_millis(),
            state.policies.len(),
            state.endpoints.len(),
            engine_built.as_millis(),
            (t.elapsed() - loaded - engine_built).as_millis()
        );
        dataplane.set_sync_token(generation)?;
        if tx.changed() {
            tx.commit()?;
        } else {
            drop(tx);
        }
        *engine = Some((built, generation));
        self.sweep();
        Ok(report)
    }

    /// The store generation the engine reflects (0: not built yet).
    pub fn generation(&self) -> u64 {
        self.engine.as_ref().map_or(0, |(_, g)| *g)
    }

    /// Remove link pins no endpoint owns, and the counters and event
    /// buckets of endpoints that are gone (left behind by a crash). Under
    /// the lock: an ADD registers its endpoint before it pins its links, so
    /// every pin an ADD in flight makes is known here.
    pub fn sweep(&mut self) {
        let Node {
            store,
            dataplane,
            lock_timeout,
            ..
        } = self;
        let swept = store
            .write(*lock_timeout)
            .map_err(NodeError::from)
            .and_then(|tx| {
                let endpoints = tx.endpoints()?;
                let keep: Vec<PathBuf> = endpoints
                    .iter()
                    .flat_map(|e| match &e.attachment {
                        // An endpoint being attached owns its future pins.
                        Attachment::Pending => dataplane.link_pins(e.id),
                        att => att.pins(),
                    })
                    .collect();
                dataplane.sweep_links(&keep)?;
                if datapath_for_cleanup(dataplane) {
                    let live = endpoints.iter().map(|e| e.id).collect();
                    dataplane.forget_unknown_endpoints(&live)?;
                }
                if tx.changed() {
                    tx.commit()?;
                }
                Ok(())
            });
        if let Err(e) = swept {
            tracing::warn!("could not sweep orphaned link pins: {e}");
        }
    }

    /// Put this build's programs on every endpoint, each swapped in place
    /// (maps, conntrack and policy stay as they are, so no open connection
    /// notices). Endpoints that fail keep enforcing with their old programs.
    pub fn upgrade(&mut self) -> Result<UpgradeReport, NodeError> {
        let state = self.store.read()?;
        self.dataplane.prepare()?;
        let mut report = UpgradeReport::default();
        // Flows an earlier build tracked move to the endpoints' own tables
        // before its programs are replaced (and those it tracked meanwhile,
        // after), so no established connection is cut by the upgrade.
        self.dataplane.adopt_legacy_conntrack(false)?;
        fault::point("upgrade:conntrack-copied");
        for ep in state.endpoints.values() {
            if self
                .dataplane
                .verify(&ep.attachment, &ep.host_ifname)
                .is_err_and(|e| e.to_string().contains("no longer exists"))
            {
                report.stale.push(ep.key());
                continue;
            }
            match self.dataplane.upgrade(&ep.attachment, &ep.host_ifname) {
                Ok(true) => {
                    fault::point("upgrade:endpoint-upgraded");
                    report.upgraded.push(ep.key())
                }
                Ok(false) => report.current.push(ep.key()),
                Err(e) => report.failed.push((ep.key(), e.to_string())),
            }
        }
        self.dataplane
            .adopt_legacy_conntrack(report.failed.is_empty())?;
        Ok(report)
    }

    /// Detach palisade from every endpoint and remove the pinned datapath.
    /// Objects (policies, namespaces, pods) stay in the store. Containers
    /// lose their isolation: this is for removing palisade from a node.
    pub fn reset(&mut self) -> Result<Vec<Endpoint>, NodeError> {
        let gone: Vec<Endpoint> = self.store.read()?.endpoints.into_values().collect();
        let mut failed = Vec::new();
        for ep in &gone {
            if let Err(e) = self.dataplane.detach(&ep.attachment, &ep.host_ifname) {
                failed.push(format!("endpoint {} ({}): {e}", ep.id, ep.host_ifname));
            }
        }
        if !failed.is_empty() {
            return Err(NodeError::Dataplane(DataplaneError::Other(format!(
                "could not detach, nothing removed: {}",
                failed.join("; ")
            ))));
        }
        self.dataplane.destroy()?;
        self.transact(Maps::No, |op, _| {
            for ep in &gone {
                op.delete_endpoint(ep)?;
            }
            op.tx.clear_endpoints()?;
            Ok(())
        })?;
        Ok(gone)
    }

    /// Endpoint keys whose attachment the dataplane no longer confirms.
    pub fn broken_endpoints(&mut self) -> Result<BTreeSet<String>, NodeError> {
        let state = self.store.read()?;
        Ok(state
            .endpoints
            .values()
            .filter(|e| {
                self.dataplane
                    .verify(&e.attachment, &e.host_ifname)
                    .is_err()
            })
            .map(Endpoint::key)
            .collect())
    }
}

/// The store's generation, never 0 (0 is what a new datapath's maps say).
fn nonzero_generation(tx: &mut Txn<'_>) -> Result<u64, StoreError> {
    match tx.generation()? {
        0 => tx.bump_generation(),
        g => Ok(g),
    }
}

/// The endpoints of a state for which `stale` says so, by key and id.
pub fn stale_refs(state: &State, stale: impl Fn(&Endpoint) -> bool) -> Vec<EndpointRef> {
    state
        .endpoints
        .values()
        .filter(|e| stale(e))
        .map(|e| EndpointRef {
            key: e.key(),
            id: Some(e.id),
        })
        .collect()
}

/// Write back the values a failed write replaced; report both failures if
/// that fails too (the maps then stay marked as not matching the store,
/// and the next write repairs them).
fn undo<D: Dataplane>(
    dp: &mut D,
    undo: &crate::engine::Delta,
    generation: u64,
    err: NodeError,
) -> NodeError {
    match dp.apply(undo).and_then(|_| dp.set_sync_token(generation)) {
        Ok(()) => err,
        Err(rollback) => NodeError::RollbackFailed {
            context: err.to_string(),
            rollback,
        },
    }
}

/// Create or replace: unchanged when the object is the same.
fn upsert<T: PartialEq>(
    old: Option<T>,
    new: &T,
    write: impl FnOnce() -> Result<(), NodeError>,
) -> Result<Change, NodeError> {
    match old {
        Some(o) if o == *new => Ok(Change::Unchanged),
        Some(_) => write().map(|()| Change::Configured),
        None => write().map(|()| Change::Created),
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        abi::{Direction, EP_ISOLATE_INGRESS, PROTO_TCP},
        daemon::NodeOps,
        dataplane::{
            Lookup,
            fake::{Call, RecordingDataplane},
        },
        policy::parse_documents,
    };

    fn node() -> (tempfile::TempDir, Node<RecordingDataplane>) {
        let dir = tempfile::tempdir().unwrap();
        let n = Node::new(Store::new(dir.path()), RecordingDataplane::default());
        (dir, n)
    }

    fn new_ep(id: &str, ifindex: u32, labels: &[(&str, &str)], addr: &str) -> NewEndpoint {
        NewEndpoint {
            source: Source::Cni,
            network: "net".into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            namespace: "default".into(),
            name: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: format!("/run/netns/{id}"),
            host_ifname: format!("veth{ifindex}"),
            host_ifindex: ifindex,
            addresses: vec![addr.parse().unwrap()],
            host_addresses: Some(vec!["10.0.0.1".parse().unwrap()]),
            netns_inode: None,
            k8s: false,
            mac: None,
        }
    }

    const API_ALLOW: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-allow}
spec:
  podSelector: {matchLabels: {app: bookstore, role: api}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: bookstore}}
"#;

    fn decide(n: &Node<RecordingDataplane>, ep: u32, peer: &str) -> bool {
        let a = n
            .dataplane
            .lookup(&Lookup {
                ep_id: ep,
                direction: Direction::Ingress,
                peer: peer.parse().unwrap(),
                protocol: PROTO_TCP,
                port: 80,
            })
            .unwrap();
        !a.isolated || a.entry.is_some()
    }

    fn api_pod(ns: &str, name: &str, app: &str, node: &str, ip: &str) -> ApiObject {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        }))
        .unwrap();
        ApiObject::pod(&pod).unwrap()
    }

    fn api_policy(yaml: &str) -> ApiObject {
        ApiObject::policy(serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    fn ipcache_id(n: &Node<RecordingDataplane>, addr: &str) -> Option<u32> {
        let a: IpAddr = addr.parse().unwrap();
        n.dataplane
            .maps
            .ipcache
            .get(&compile::Prefix::host(a))
            .map(|v| v.identity)
    }

    #[test]
    fn api_pods_on_other_nodes_are_peers_and_relists_delete_what_is_gone() {
        let (_d, mut n) = node();
        n.add_endpoint(new_ep(
            "api",
            10,
            &[("app", "bookstore"), ("role", "api")],
            "10.0.0.2",
        ))
        .unwrap();
        let changes = ApiChanges {
            upserts: vec![
                api_pod("default", "web", "bookstore", "node-b", "10.1.0.5"),
                api_pod("default", "other", "x", "node-b", "10.1.0.6"),
                // This node's pod: its labels overlay the endpoint, no
                // remote record.
                api_pod("default", "api", "bookstore", "node-a", "10.0.0.2"),
                api_policy(API_ALLOW),
            ],
            deletes: vec![],
            complete: vec![Kind::Pod, Kind::NetworkPolicy],
            listed: vec![],
        };
        let r = n.apply_api("node-a", &changes).unwrap();
        assert_eq!(r.created, 4, "{r:?}");
        let st = n.store.read().unwrap();
        assert_eq!(st.remote.len(), 2, "{:?}", st.remote);
        assert_eq!(
            n.store.setting(CLUSTER_NODE_SETTING).unwrap().as_deref(),
            Some("node-a")
        );
        let ep = st.endpoints.values().next().unwrap().id;
        // Reads for names take this node's Pod objects only.
        let names = n.store.read_names().unwrap();
        assert_eq!(
            names.pods.keys().map(String::as_str).collect::<Vec<_>>(),
            ["default/api"]
        );
        assert_eq!(names.remote.len(), 2);
        assert_eq!(st.pods.len(), 3);
        assert_eq!(
            n.store.endpoint_names().unwrap(),
            BTreeMap::from([(ep, ("default".to_owned(), "api".to_owned()))])
        );
        assert!(decide(&n, ep, "10.1.0.5"), "a remote pod the policy admits");
        assert!(!decide(&n, ep, "10.1.0.6"), "a remote pod it does not");
        assert!(ipcache_id(&n, "10.1.0.5").is_some());

        // Events: relabel the admitted one out; the other in.
        let r = n
            .apply_api(
                "node-a",
                &ApiChanges {
                    upserts: vec![
                        api_pod("default", "web", "x", "node-b", "10.1.0.5"),
                        api_pod("default", "other", "bookstore", "node-b", "10.1.0.6"),
                    ],
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(r.changed, 2, "{r:?}");
        assert!(!decide(&n, ep, "10.1.0.5"));
        assert!(decide(&n, ep, "10.1.0.6"));

        // A relist without "other" and without the policy: both go, the
        // rest is unchanged and not rewritten. The list arrives in two
        // batches: "web" in the first, the rest with the end of the list.
        let r = n
            .apply_api(
                "node-a",
                &ApiChanges {
                    upserts: vec![api_pod("default", "web", "x", "node-b", "10.1.0.5")],
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!((r.deleted, r.unchanged), (0, 1), "{r:?}");
        let r = n
            .apply_api(
                "node-a",
                &ApiChanges {
                    upserts: vec![api_pod("default", "api", "bookstore", "node-a", "10.0.0.2")],
                    deletes: vec![],
                    complete: vec![Kind::Pod, Kind::NetworkPolicy],
                    listed: vec![ObjectRef {
                        kind: Kind::Pod,
                        namespace: "default".into(),
                        name: "web".into(),
                    }],
                },
            )
            .unwrap();
        assert_eq!((r.deleted, r.unchanged), (2, 1), "{r:?}");
        let st = n.store.read().unwrap();
        assert_eq!(st.remote.len(), 1);
        assert!(st.policies.is_empty());
        assert_eq!(
            ipcache_id(&n, "10.1.0.6"),
            None,
            "the deleted pod's address"
        );
        assert!(decide(&n, ep, "10.1.0.6"), "no policy: not isolated");
        // The engine agrees with a full compile of the store.
        let (_, warnings) = n.resync().unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    fn api_node(name: &str, ips: &[&str], extra: serde_json::Value) -> ApiObject {
        let mut node = serde_json::json!({
            "metadata": {"name": name},
            "status": {"addresses": ips.iter()
                .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip}))
                .collect::<Vec<_>>()}
        });
        if let serde_json::Value::Object(m) = extra {
            for (k, v) in m {
                node[k] = v;
            }
        }
        ApiObject::node(&serde_json::from_value(node).unwrap())
    }

    const NODE_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-pods-and-one-node}
spec:
  podSelector: {matchLabels: {role: api}}
  ingress:
  - from:
    - namespaceSelector: {}
    - ipBlock: {cidr: 192.168.250.2/32}
"#;

    #[test]
    fn other_nodes_addresses_get_the_node_identity_and_follow_node_objects() {
        let (_d, mut n) = node();
        n.add_endpoint(new_ep(
            "api",
            10,
            &[("app", "bookstore"), ("role", "api")],
            "10.0.0.2",
        ))
        .unwrap();
        let flannel = serde_json::json!({
            "metadata": {"name": "node-b", "annotations": {
                "flannel.alpha.coreos.com/backend-type": "vxlan"}},
            "spec": {"podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24"]}
        });
        let r = n
            .apply_api(
                "node-a",
                &ApiChanges {
                    upserts: vec![
                        api_policy(NODE_POLICY),
                        api_node("node-a", &["192.168.250.1"], serde_json::json!({})),
                        api_node("node-b", &["192.168.250.2"], flannel),
                        api_node("node-c", &["192.168.250.3"], serde_json::json!({})),
                    ],
                    deletes: vec![],
                    complete: vec![Kind::Node],
                    listed: vec![],
                },
            )
            .unwrap();
        assert_eq!(r.created, 3, "this node's own Node is not stored: {r:?}");
        let st = n.store.read().unwrap();
        assert_eq!(
            st.nodes.keys().map(String::as_str).collect::<Vec<_>>(),
            ["node-b", "node-c"]
        );
        let node_key = |n: &Node<RecordingDataplane>, addr: &str| {
            let id = ipcache_id(n, addr)?;
            n.store.read().unwrap().identities.key_of(id).cloned()
        };
        assert_eq!(ipcache_id(&n, "192.168.250.1"), None, "this node's Node");
        for addr in ["192.168.250.2", "192.168.250.3", "10.1.0.0"] {
            let key = node_key(&n, addr).unwrap_or_else(|| panic!("{addr} has no identity"));
            assert!(key.node && key.namespace.is_none(), "{addr}: {key:?}");
        }
        let ep = st.endpoints.values().next().unwrap().id;
        assert!(
            decide(&n, ep, "192.168.250.2"),
            "inside the policy's ipBlock"
        );
        assert!(
            !decide(&n, ep, "192.168.250.3"),
            "a namespaceSelector never matches a node"
        );
        assert!(!decide(&n, ep, "10.1.0.0"), "node-b's flannel.1 address");
        assert!(
            node_key(&n, "192.168.250.2")
                .unwrap()
                .blocks
                .contains("192.168.250.2/32"),
            "the ipBlock refines the node identity"
        );

        // The Node's address changes; then it goes.
        n.apply_api(
            "node-a",
            &ApiChanges {
                upserts: vec![api_node(
                    "node-c",
                    &["192.168.250.4"],
                    serde_json::json!({}),
                )],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(ipcache_id(&n, "192.168.250.3"), None);
        assert!(node_key(&n, "192.168.250.4").unwrap().node);
        n.apply_api(
            "node-a",
            &ApiChanges {
                deletes: vec![ObjectRef {
                    kind: Kind::Node,
                    namespace: String::new(),
                    name: "node-c".into(),
                }],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(ipcache_id(&n, "192.168.250.4"), None);

        // A pod that gets a node's address takes it over; when it goes,
        // the address is the node's again.
        n.apply_api(
            "node-a",
            &ApiChanges {
                upserts: vec![api_pod(
                    "default",
                    "web",
                    "bookstore",
                    "node-b",
                    "192.168.250.2",
                )],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!node_key(&n, "192.168.250.2").unwrap().node);
        assert!(decide(&n, ep, "192.168.250.2"));
        n.apply_api(
            "node-a",
            &ApiChanges {
                complete: vec![Kind::Pod],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(node_key(&n, "192.168.250.2").unwrap().node);
        // A relist of Nodes without node-b.
        n.apply_api(
            "node-a",
            &ApiChanges {
                complete: vec![Kind::Node],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(n.store.read().unwrap().nodes.is_empty());
        assert_eq!(ipcache_id(&n, "10.1.0.0"), None);
        let (_, warnings) = n.resync().unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    fn decide_egress(n: &Node<RecordingDataplane>, ep: u32, peer: &str, port: u16) -> bool {
        let a = n
            .dataplane
            .lookup(&Lookup {
                ep_id: ep,
                direction: Direction::Egress,
                peer: peer.parse().unwrap(),
                protocol: PROTO_TCP,
                port,
            })
            .unwrap();
        !a.isolated || a.entry.is_some()
    }

    const FQDN_POLICY: &str = r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {name: web-out}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - toFQDNs: [{matchPattern: "*.example.test"}]
    ports: [{port: 443}]
"#;

    #[test]
    fn fqdn_rules_allow_learned_addresses_until_they_expire() {
        let (_d, mut n) = node();
        n.add_endpoint(new_ep("web", 10, &[("app", "web")], "10.0.0.2"))
            .unwrap();
        let r = n.apply(parse_documents(FQDN_POLICY, "t").unwrap()).unwrap();
        assert_eq!(r.changes[0].1, Change::Created);
        let ep = n
            .store
            .read()
            .unwrap()
            .endpoints
            .values()
            .next()
            .unwrap()
            .id;
        assert!(
            !decide_egress(&n, ep, "192.0.2.10", 443),
            "nothing learned yet"
        );

        let learned = |name: &str, addr: &str, expires| fqdn::Learned {
            name: name.into(),
            address: addr.parse().unwrap(),
            expires,
        };
        n.learn_fqdns(
            &[
                learned("api.example.test.", "192.0.2.10", 100),
                learned("api.example.test", "2001:db8::10", 100),
                learned("other.test", "192.0.2.11", 100),
            ],
            16,
        )
        .unwrap();
        assert!(decide_egress(&n, ep, "192.0.2.10", 443));
        assert!(decide_egress(&n, ep, "2001:db8::10", 443));
        assert!(!decide_egress(&n, ep, "192.0.2.10", 80), "another port");
        assert!(
            !decide_egress(&n, ep, "192.0.2.11", 443),
            "a name no rule matches"
        );

        // A fresh node (a restart) reads the learned addresses back.
        let st = n.store.read().unwrap();
        assert_eq!(st.fqdns.len(), 3);
        let mut full = st.clone();
        let compiled = compile_state(&mut full);
        assert_eq!(
            compiled.desired, n.dataplane.maps,
            "the engine equals a full compile"
        );

        // In use: kept past its expiry; then forgotten.
        let keep = BTreeSet::from(["192.0.2.10".parse().unwrap()]);
        assert_eq!(n.expire_fqdns(200, &keep).unwrap(), 2);
        assert!(decide_egress(&n, ep, "192.0.2.10", 443));
        assert!(!decide_egress(&n, ep, "2001:db8::10", 443));
        assert_eq!(n.expire_fqdns(200, &BTreeSet::new()).unwrap(), 1);
        assert!(!decide_egress(&n, ep, "192.0.2.10", 443));

        // The same name in both kinds: two policies.
        let np = FQDN_POLICY
            .replace("palisade.io/v1alpha1", "networking.k8s.io/v1")
            .replace("PalisadeNetworkPolicy", "NetworkPolicy")
            .replace(
                "  - toFQDNs: [{matchPattern: \"*.example.test\"}]\n    ports",
                "  - ports",
            );
        n.apply(parse_documents(&np, "t").unwrap()).unwrap();
        assert!(
            decide_egress(&n, ep, "192.0.2.99", 443),
            "the NetworkPolicy allows 443 anywhere"
        );
        let r = n
            .delete(vec![ObjectRef {
                kind: Kind::PalisadeNetworkPolicy,
                namespace: "default".into(),
                name: "web-out".into(),
            }])
            .unwrap();
        assert_eq!(r.changes[0].1, Change::Deleted);
        let st = n.store.read().unwrap();
        assert!(st.palisade_policies.is_empty());
        assert_eq!(st.policies.len(), 1);
    }

    #[test]
    fn a_pod_that_finishes_or_moves_here_stops_being_remote() {
        let (_d, mut n) = node();
        n.apply_api(
            "node-a",
            &ApiChanges {
                upserts: vec![api_pod("default", "job", "j", "node-b", "10.1.0.9")],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(ipcache_id(&n, "10.1.0.9").is_some());
        let mut done = api_pod("default", "job", "j", "node-b", "10.1.0.9");
        if let ApiObject::Pod(_, placement) = &mut done {
            placement.finished = true;
        }
        n.apply_api(
            "node-a",
            &ApiChanges {
                upserts: vec![done],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(ipcache_id(&n, "10.1.0.9"), None);
        assert!(n.store.read().unwrap().remote.is_empty());
    }

    #[test]
    fn apply_and_delete_are_refused_in_cluster_mode() {
        let (_d, mut n) = node();
        n.apply_api("node-a", &ApiChanges::default()).unwrap();
        let objects = parse_documents(API_ALLOW, "test").unwrap();
        let err = n.apply(objects).unwrap_err().to_string();
        assert!(
            err.contains("kubectl apply") && err.contains("node-a"),
            "{err}"
        );
        let err = n
            .delete(vec![ObjectRef {
                kind: Kind::NetworkPolicy,
                namespace: "default".into(),
                name: "api-allow".into(),
            }])
            .unwrap_err()
            .to_string();
        assert!(err.contains("kubectl delete"), "{err}");
        n.leave_cluster().unwrap();
        let objects = parse_documents(API_ALLOW, "test").unwrap();
        n.apply(objects).unwrap();
    }

    #[test]
    fn maps_are_written_before_programs_are_attached() {
        let (_d, mut n) = node();
        n.add_endpoint(new_ep(
            "api",
            10,
            &[("app", "bookstore"), ("role", "api")],
            "10.0.0.2",
        ))
        .unwrap();
        let calls = &n.dataplane.calls;
        let sync = calls.iter().position(|c| *c == Call::Apply).unwrap();
        let attach = calls
            .iter()
            .position(|c| matches!(c, Call::Attach { .. }))
            .unwrap();
        assert!(sync < attach, "{calls:?}");
        assert!(n.dataplane.maps.endpoints.contains_key(&10));
    }

    #[test]
    fn a_failed_attach_leaves_nothing_behind() {
        let (_d, mut n) = node();
        n.dataplane.fail_attach = true;
        let err = n
            .add_endpoint(new_ep("api", 10, &[], "10.0.0.2"))
            .unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(n.dataplane.maps.endpoints.is_empty());
        assert!(
            n.dataplane
                .maps
                .ipcache
                .keys()
                .all(|p| p.len != 128 || p.addr[15] != 2)
        );
        assert!(n.store.read().unwrap().endpoints.is_empty());
    }

    #[test]
    fn a_veth_the_other_integration_enforces_is_left_alone() {
        let (_d, mut n) = node();
        n.add_endpoint(new_ep("c", 10, &[], "10.0.0.2")).unwrap();
        let mut from_hook = new_ep("c-oci", 10, &[("app", "x")], "10.0.0.2");
        from_hook.source = Source::Oci;
        from_hook.network = String::new();
        let out = n.add_endpoint(from_hook).unwrap();
        assert!(
            matches!(out, AddOutcome::AlreadyManaged(ref e) if e.source == Source::Cni),
            "{out:?}"
        );
        assert_eq!(n.store.read().unwrap().endpoints.len(), 1);
        // Once the CNI endpoint's programs are gone, it is stale and replaced.
        n.dataplane.attached.clear();
        let mut again = new_ep("c-oci", 10, &[("app", "x")], "10.0.0.2");
        again.source = Source::Oci;
        assert!(matches!(
            n.add_endpoint(again).unwrap(),
            AddOutcome::Added(_)
        ));
    }

    #[test]
    fn a_pending_identity_applies_to_the_next_add_for_its_namespace() {
        let (_d, mut n) = node();
        n.record_pending(
            4242,
            PendingIdentity {
                container_id: "c2".into(),
                namespace: "shop".into(),
                name: "web".into(),
                labels: [("app".to_string(), "web".to_string())].into(),
                created: now_secs(),
            },
        )
        .unwrap();
        let mut new = new_ep("default-c2", 10, &[], "10.0.0.2");
        new.netns_inode = Some(4242);
        let ep = n.add_endpoint(new).unwrap().endpoint().clone();
        assert_eq!((ep.namespace.as_str(), ep.name.as_str()), ("shop", "web"));
        assert_eq!(ep.labels.get("app").map(String::as_str), Some("web"));
        assert!(n.store.read().unwrap().pending.is_empty(), "consumed");
    }

    #[test]
    fn order_does_not_matter_policy_before_or_after_endpoints() {
        let (_d, mut n) = node();
        let api = n
            .add_endpoint(new_ep(
                "api",
                10,
                &[("app", "bookstore"), ("role", "api")],
                "10.0.0.2",
            ))
            .unwrap()
            .endpoint()
            .clone();
        n.add_endpoint(new_ep("coffee", 11, &[("app", "coffeeshop")], "10.0.0.3"))
            .unwrap();
        assert!(decide(&n, api.id, "10.0.0.3"));
        n.apply(parse_documents(API_ALLOW, "t").unwrap()).unwrap();
        assert_eq!(
            n.dataplane.maps.endpoints[&10].flags,
            EP_ISOLATE_INGRESS | crate::abi::EP_HAS_ANY_PROTO_INGRESS
        );
        assert!(!decide(&n, api.id, "10.0.0.3"));
        // A frontend that starts after the policy is allowed at once.
        n.add_endpoint(new_ep(
            "front",
            12,
            &[("app", "bookstore"), ("role", "frontend")],
            "10.0.0.4",
        ))
        .unwrap();
        assert!(decide(&n, api.id, "10.0.0.4"));
        // Relabel the coffeeshop through a Pod object: allowed now.
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: coffee, labels: {app: bookstore}}\nspec: {containers: [{name: c}]}\n";
        n.apply(parse_documents(pod, "t").unwrap()).unwrap();
        assert!(decide(&n, api.id, "10.0.0.3"));
        // Deleting the policy opens the api again.
        let refs = parse_documents(API_ALLOW, "t")
            .unwrap()
            .iter()
            .map(Object::reference)
            .collect();
        let r = n.delete(refs).unwrap();
        assert_eq!(r.changes[0].1, Change::Deleted);
        assert_eq!(n.dataplane.maps.endpoints[&10].flags, 0);
    }

    #[test]
    fn remove_is_idempotent_and_reapply_is_unchanged() {
        let (_d, mut n) = node();
        n.add_endpoint(new_ep("a", 10, &[], "10.0.0.2")).unwrap();
        let key = Endpoint::key_for("net", "a", "eth0");
        assert!(n.remove_endpoint(&key).unwrap().is_some());
        assert!(n.remove_endpoint(&key).unwrap().is_none());
        assert!(n.dataplane.maps.endpoints.is_empty());
        let first = n.apply(parse_documents(API_ALLOW, "t").unwrap()).unwrap();
        assert_eq!(first.changes[0].1, Change::Created);
        let again = n.apply(parse_documents(API_ALLOW, "t").unwrap()).unwrap();
        assert_eq!(again.changes[0].1, Change::Unchanged);
        assert!(!again.sync.changed());
    }

    #[test]
    fn a_new_endpoint_on_a_reused_ifindex_replaces_the_stale_one() {
        let (_d, mut n) = node();
        n.add_endpoint(new_ep("old", 10, &[], "10.0.0.2")).unwrap();
        // The old veth is deleted (its programs with it); the index is reused.
        n.dataplane.attached.clear();
        n.add_endpoint(new_ep("new", 10, &[], "10.0.0.3")).unwrap();
        let st = n.store.read().unwrap();
        assert_eq!(st.endpoints.len(), 1);
        assert!(st.endpoints.values().all(|e| e.container_id == "new"));
        // While an endpoint is live, another container in the same network
        // namespace (same veth) shares it instead of replacing it.
        let out = n
            .add_endpoint(new_ep("sidecar", 10, &[], "10.0.0.3"))
            .unwrap();
        assert!(
            matches!(out, AddOutcome::AlreadyManaged(ref e) if e.container_id == "new"),
            "{out:?}"
        );
    }

    #[test]
    fn a_refused_map_write_changes_neither_the_maps_nor_the_store() {
        let (_d, mut n) = node();
        n.add_endpoint(new_ep(
            "api",
            10,
            &[("app", "bookstore"), ("role", "api")],
            "10.0.0.2",
        ))
        .unwrap();
        let maps = n.dataplane.maps.clone();
        let before = n.store.read().unwrap();
        n.dataplane.fail_apply = true;
        let err = n
            .apply(parse_documents(API_ALLOW, "t").unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert_eq!(n.dataplane.maps, maps);
        assert_eq!(n.store.read().unwrap(), before);
        // The next write works from the store as it is.
        n.apply(parse_documents(API_ALLOW, "t").unwrap()).unwrap();
        assert_ne!(n.dataplane.maps, maps);
    }

    #[test]
    fn maps_that_do_not_match_the_store_are_repaired_before_the_next_write() {
        let (_d, mut n) = node();
        n.add_endpoint(new_ep("a", 10, &[], "10.0.0.2")).unwrap();
        let good = n.dataplane.maps.clone();
        // A crash between the map write and the commit leaves the token at 0.
        n.dataplane.maps.policy.clear();
        n.dataplane.maps.endpoints.clear();
        n.dataplane.token = 0;
        n.dataplane.calls.clear();
        n.set_mode(None, Some(Mode::Enforce)).unwrap();
        assert_eq!(
            n.dataplane
                .calls
                .iter()
                .filter(|c| **c == Call::Sync)
                .count(),
            1
        );
        assert_eq!(n.dataplane.maps, good);
        // In step again: no full sync.
        n.dataplane.calls.clear();
        n.set_mode(None, Some(Mode::Audit)).unwrap();
        assert!(
            !n.dataplane.calls.contains(&Call::Sync),
            "{:?}",
            n.dataplane.calls
        );
    }

    #[test]
    fn a_node_sees_what_another_process_committed() {
        let (d, mut a) = node();
        let mut b = Node::new(Store::new(d.path()), RecordingDataplane::default());
        a.add_endpoint(new_ep(
            "api",
            10,
            &[("app", "bookstore"), ("role", "api")],
            "10.0.0.2",
        ))
        .unwrap();
        // b builds its engine now, then a changes the store behind it.
        b.set_mode(None, Some(Mode::Enforce)).unwrap();
        a.apply(parse_documents(API_ALLOW, "t").unwrap()).unwrap();
        b.set_mode(None, Some(Mode::Enforce)).unwrap();
        let engine = b.engine().unwrap();
        assert_eq!(engine.desired(), a.engine().unwrap().desired());
        assert_eq!(
            engine.desired().endpoints[&10].flags & EP_ISOLATE_INGRESS,
            EP_ISOLATE_INGRESS
        );
    }

    #[test]
    fn an_unchanged_apply_writes_nothing() {
        let (_d, mut n) = node();
        n.apply(parse_documents(API_ALLOW, "t").unwrap()).unwrap();
        let generation = n.store.generation().unwrap();
        n.dataplane.calls.clear();
        let r = n.apply(parse_documents(API_ALLOW, "t").unwrap()).unwrap();
        assert_eq!(r.changes[0].1, Change::Unchanged);
        assert_eq!(n.store.generation().unwrap(), generation);
        assert!(!n.dataplane.calls.contains(&Call::Apply));
    }

    #[test]
    fn an_endpoint_removed_while_attaching_is_detached_again() {
        let (_d, mut n) = node();
        let Registered::New(ep) = n
            .register_endpoint(new_ep("a", 10, &[], "10.0.0.2"))
            .unwrap()
        else {
            panic!("a new endpoint")
        };
        assert_eq!(
            n.store.read().unwrap().endpoints[&ep.key()].attachment,
            Attachment::Pending
        );
        // A DEL comes in while the programs are being attached.
        n.remove_endpoint(&ep.key()).unwrap();
        let att = n
            .dataplane
            .attach(ep.id, &ep.host_ifname, ep.host_ifindex)
            .unwrap();
        let err = n.complete_add(ep.clone(), Ok(att)).unwrap_err();
        assert!(err.to_string().contains("was removed"), "{err}");
        assert!(n.dataplane.attached.is_empty());
        assert!(n.dataplane.maps.endpoints.is_empty());
    }

    #[test]
    fn a_second_add_for_a_veth_being_attached_waits_for_the_first() {
        let (_d, mut n) = node();
        let Registered::New(first) = n
            .register_endpoint(new_ep("a", 10, &[], "10.0.0.2"))
            .unwrap()
        else {
            panic!("a new endpoint")
        };
        // The OCI hook of a second container in the same network
        // namespace arrives while the first ADD attaches.
        let mut second = new_ep("a-oci", 10, &[], "10.0.0.2");
        second.source = Source::Oci;
        assert!(matches!(
            n.register_endpoint(second.clone()).unwrap(),
            Registered::Attaching(ref e) if e.id == first.id
        ));
        let att = n
            .dataplane
            .attach(first.id, &first.host_ifname, first.host_ifindex)
            .unwrap();
        n.complete_add(first.clone(), Ok(att)).unwrap();
        let out = n.add_endpoint(second).unwrap();
        assert!(
            matches!(out, AddOutcome::AlreadyManaged(ref e) if e.id == first.id),
            "{out:?}"
        );
    }

    #[test]
    fn check_fails_for_unknown_or_detached_endpoints() {
        let (_d, mut n) = node();
        assert!(matches!(
            n.check_endpoint("net/x/eth0"),
            Err(NodeError::NotFound(_))
        ));
        n.add_endpoint(new_ep("a", 10, &[], "10.0.0.2")).unwrap();
        let key = Endpoint::key_for("net", "a", "eth0");
        n.check_endpoint(&key).unwrap();
        n.dataplane.attached.clear();
        assert!(n.check_endpoint(&key).is_err());
    }
}
