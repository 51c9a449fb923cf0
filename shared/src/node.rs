//! The node: the store plus the dataplane, and every operation the binaries
//! perform on them. Each operation takes the store lock, changes the state
//! in memory, compiles it, syncs the maps, and saves the state only when
//! the kernel accepted it; on failure the previous state is synced back,
//! so nothing is left half-done.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use thiserror::Error;

use crate::{
    compile::{self, Compiled, EndpointView},
    dataplane::{Dataplane, DataplaneError, SyncReport},
    policy::{Kind, Labels, MODE_ANNOTATION, Mode, Object, ObjectRef},
    store::{Endpoint, Locked, PendingIdentity, Source, State, Store, StoreError, StoredPolicy},
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
    #[error("{context}; rolling back also failed: {rollback}")]
    RollbackFailed {
        context: String,
        rollback: DataplaneError,
    },
}

impl NodeError {
    /// Whether retrying later may help (the store was busy).
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Store(StoreError::LockTimeout { .. }))
    }
}

/// A new endpoint to register.
#[derive(Debug, Clone)]
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
}

/// What [`Node::add_endpoint`] did.
#[derive(Debug, Clone)]
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

/// What `apply` did to each object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Default)]
pub struct ObjectsReport {
    pub changes: Vec<(ObjectRef, Change)>,
    pub sync: SyncReport,
    pub warnings: Vec<String>,
}

/// What `upgrade` did to each endpoint (by endpoint key).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

/// The store and the dataplane of one node.
#[derive(Debug)]
pub struct Node<D: Dataplane> {
    pub store: Store,
    pub dataplane: D,
    pub lock_timeout: Duration,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Compile a state: the endpoint views, then the compiler. Identities are
/// allocated in (and unused ones dropped from) the state's table.
pub fn compile_state(state: &mut State) -> Compiled {
    let namespaces = state.namespace_map();
    let (mut policies, mut warnings) = state.policies();
    // The compiler sees each policy's effective mode.
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
                .map(|p| p.ports)
                .unwrap_or_default(),
            addresses: ep.addresses.clone(),
            extra_flags: 0,
        })
        .collect();
    let host = state.host_addresses.clone();
    let mut compiled = compile::compile(
        &compile::Input {
            namespaces: &namespaces,
            policies: &policies,
            endpoints: &endpoints,
            host_addresses: &host,
        },
        &mut state.identities,
    );
    state.identities.retain_used(&compiled.used_identities);
    warnings.append(&mut compiled.warnings);
    compiled.warnings = warnings;
    compiled
}

impl<D: Dataplane> Node<D> {
    pub fn new(store: Store, dataplane: D) -> Self {
        Self {
            store,
            dataplane,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        }
    }

    fn lock(&self) -> Result<Locked, NodeError> {
        Ok(self.store.lock(self.lock_timeout)?)
    }

    /// Sync `locked.state`; if the kernel refuses, sync `previous` back.
    fn commit(
        &mut self,
        locked: &mut Locked,
        previous: &State,
    ) -> Result<(SyncReport, Vec<String>), NodeError> {
        let compiled = compile_state(&mut locked.state);
        let result = match self.dataplane.sync(&compiled.desired) {
            // The kernel took it; only a saved state makes it official.
            Ok(report) => match locked.save() {
                Ok(()) => return Ok((report, compiled.warnings)),
                Err(e) => NodeError::from(e),
            },
            Err(e) => NodeError::from(e),
        };
        Err(self.rollback(previous, result))
    }

    /// Sync `previous` back after `err`; report both if that fails too.
    fn rollback(&mut self, previous: &State, err: NodeError) -> NodeError {
        let mut prev = previous.clone();
        let back = compile_state(&mut prev);
        match self.dataplane.sync(&back.desired) {
            Ok(_) => err,
            Err(rollback) => NodeError::RollbackFailed {
                context: err.to_string(),
                rollback,
            },
        }
    }

    /// Whether a datapath is there to clean up. Cleanup (DEL, GC,
    /// poststop) never loads programs: a datapath that is missing or from
    /// an incompatible build has nothing of this endpoint to remove from
    /// its maps, and link pins are removed either way.
    fn datapath_for_cleanup(&mut self) -> bool {
        match self.dataplane.open_existing() {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::warn!("cleaning up without the datapath's maps: {e}");
                false
            }
        }
    }

    /// Remove endpoints: first from the maps (their programs then drop
    /// everything: fail closed), then detach, then save.
    fn remove_locked(
        &mut self,
        locked: &mut Locked,
        gone: &[Endpoint],
    ) -> Result<Vec<String>, NodeError> {
        let loaded = self.datapath_for_cleanup();
        let previous = locked.state.clone();
        for ep in gone {
            locked.state.endpoints.remove(&ep.key());
        }
        let mut warnings = Vec::new();
        if loaded {
            warnings = self.commit(locked, &previous)?.1;
        } else {
            locked.save()?;
        }
        let mut failed = Vec::new();
        for ep in gone {
            if let Err(e) = self.dataplane.detach(&ep.attachment, &ep.host_ifname) {
                failed.push(format!("endpoint {} ({}): {e}", ep.id, ep.host_ifname));
            }
            if loaded && let Err(e) = self.dataplane.forget_endpoint(ep.id) {
                tracing::warn!("could not clear counters of endpoint {}: {e}", ep.id);
            }
        }
        if !failed.is_empty() {
            // The maps no longer know these endpoints, so their programs
            // drop everything; say what is still attached.
            return Err(NodeError::Dataplane(DataplaneError::Other(format!(
                "removed from the maps but not detached (traffic through them is dropped): {}",
                failed.join("; ")
            ))));
        }
        Ok(warnings)
    }

    /// Remove link pins no endpoint owns (left behind by a crash).
    fn sweep(&mut self, state: &State) {
        let keep: Vec<PathBuf> = state
            .endpoints
            .values()
            .flat_map(|e| e.attachment.pins())
            .collect();
        if let Err(e) = self.dataplane.sweep_links(&keep) {
            tracing::warn!("could not sweep orphaned link pins: {e}");
        }
    }

    /// Register an endpoint, program its maps, then attach the programs.
    /// On any failure nothing stays behind.
    pub fn add_endpoint(&mut self, mut new: NewEndpoint) -> Result<AddOutcome, NodeError> {
        let mut locked = self.lock()?;
        self.dataplane.prepare()?;
        let previous = locked.state.clone();
        let key = Endpoint::key_for(&new.network, &new.container_id, &new.ifname);

        // No double work: a live endpoint the other integration registered
        // for this very veth keeps it.
        // (Two containers sharing one network namespace, such as a Podman
        // pod or a Kubernetes pod's app containers, share its endpoint.)
        if let Some(live) = locked.state.endpoints.values().find(|e| {
            e.host_ifindex == new.host_ifindex
                && e.host_ifname == new.host_ifname
                && e.key() != key
                && self.dataplane.verify(&e.attachment, &e.host_ifname).is_ok()
        }) {
            return Ok(AddOutcome::AlreadyManaged(live.clone()));
        }
        // An identity an OCI hook recorded before the network existed.
        let now = now_secs();
        locked
            .state
            .pending
            .retain(|_, p| now.saturating_sub(p.created) < PENDING_TTL_SECS);
        if let Some(ino) = new.netns_inode
            && !new.k8s
            && let Some(p) = locked.state.pending.remove(&ino.to_string())
        {
            new.namespace = p.namespace;
            new.name = p.name;
            new.labels.extend(p.labels);
        }

        // A repeated ADD replaces the earlier registration; an endpoint
        // still claiming this veth is stale (its veth was deleted and the
        // index reused).
        let stale: Vec<Endpoint> = locked
            .state
            .endpoints
            .values()
            .filter(|e| e.key() == key || e.host_ifindex == new.host_ifindex)
            .cloned()
            .collect();
        for old in &stale {
            self.dataplane.detach(&old.attachment, &old.host_ifname)?;
            locked.state.endpoints.remove(&old.key());
        }
        if let Some(h) = &new.host_addresses {
            locked.state.host_addresses = h.clone();
        }
        let id = locked.state.allocate_endpoint_id();
        let mut ep = Endpoint {
            id,
            source: new.source,
            network: new.network,
            container_id: new.container_id,
            ifname: new.ifname,
            namespace: new.namespace,
            name: new.name,
            labels: new.labels,
            netns: new.netns,
            host_ifname: new.host_ifname,
            host_ifindex: new.host_ifindex,
            addresses: new.addresses,
            k8s: new.k8s,
            attachment: crate::dataplane::Attachment::Netlink {
                ifindex: 0,
                from_container: crate::dataplane::NlFilter {
                    priority: 0,
                    handle: 0,
                },
                to_container: crate::dataplane::NlFilter {
                    priority: 0,
                    handle: 0,
                },
            },
            created: now_secs(),
        };
        locked.state.endpoints.insert(key.clone(), ep.clone());

        // Maps first: the first packet through the programs already finds
        // this endpoint's policy.
        let compiled = compile_state(&mut locked.state);
        if let Err(e) = self.dataplane.sync(&compiled.desired) {
            return Err(self.undo_add(&previous, e.into()));
        }
        match self.dataplane.attach(id, &ep.host_ifname, ep.host_ifindex) {
            Ok(att) => ep.attachment = att,
            Err(e) => return Err(self.undo_add(&previous, e.into())),
        }
        locked.state.endpoints.insert(key, ep.clone());
        if let Err(e) = locked.save() {
            let _best_effort = self.dataplane.detach(&ep.attachment, &ep.host_ifname);
            return Err(self.undo_add(&previous, e.into()));
        }
        for w in &compiled.warnings {
            tracing::warn!("{w}");
        }
        self.sweep(&locked.state);
        Ok(AddOutcome::Added(ep))
    }

    /// Whether the endpoint `key` exists on this veth with its programs
    /// attached (a hook that runs twice for one container does nothing).
    pub fn is_enforced(&mut self, key: &str, ifindex: u32) -> Result<bool, NodeError> {
        let state = self.store.read()?;
        let Some(ep) = state.endpoints.get(key) else {
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
        let mut locked = self.lock()?;
        let previous = locked.state.clone();
        let Some(ep) = locked.state.endpoints.get_mut(key) else {
            return Err(NodeError::NotFound(format!("no endpoint {key}")));
        };
        if ep.namespace == namespace && ep.name == name && ep.labels == *labels {
            return Ok(());
        }
        ep.namespace = namespace.to_owned();
        ep.name = name.to_owned();
        ep.labels = labels.clone();
        self.dataplane.prepare()?;
        self.commit(&mut locked, &previous)?;
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
        let mut locked = self.lock()?;
        let now = now_secs();
        // The CNI ADD follows the hook within seconds; an identity nobody
        // claimed soon is stale, and namespace inodes get reused.
        locked
            .state
            .pending
            .retain(|_, p| now.saturating_sub(p.created) < PENDING_TTL_SECS);
        locked.state.pending.insert(inode.to_string(), pending);
        locked.save()?;
        Ok(())
    }

    /// Forget everything an OCI container registered: its endpoints and any
    /// pending identity. Idempotent.
    pub fn remove_container(&mut self, container_id: &str) -> Result<Vec<Endpoint>, NodeError> {
        {
            let mut locked = self.lock()?;
            let before = locked.state.pending.len();
            locked
                .state
                .pending
                .retain(|_, p| p.container_id != container_id);
            if locked.state.pending.len() != before {
                locked.save()?;
            }
        }
        self.remove_endpoints_where(|e| e.source == Source::Oci && e.container_id == container_id)
    }

    fn undo_add(&mut self, previous: &State, err: NodeError) -> NodeError {
        self.rollback(previous, err)
    }

    /// Detach and forget an endpoint. Succeeds when it is already gone.
    pub fn remove_endpoint(&mut self, key: &str) -> Result<Option<Endpoint>, NodeError> {
        let mut locked = self.lock()?;
        let Some(ep) = locked.state.endpoints.get(key).cloned() else {
            return Ok(None);
        };
        self.remove_locked(&mut locked, std::slice::from_ref(&ep))?;
        self.sweep(&locked.state);
        Ok(Some(ep))
    }

    /// Remove every endpoint for which `stale` says so (CNI GC, `palisadectl gc`).
    pub fn remove_endpoints_where(
        &mut self,
        stale: impl Fn(&Endpoint) -> bool,
    ) -> Result<Vec<Endpoint>, NodeError> {
        let mut locked = self.lock()?;
        let gone: Vec<Endpoint> = locked
            .state
            .endpoints
            .values()
            .filter(|e| stale(e))
            .cloned()
            .collect();
        if gone.is_empty() {
            return Ok(gone);
        }
        self.remove_locked(&mut locked, &gone)?;
        self.sweep(&locked.state);
        Ok(gone)
    }

    /// Fail unless the endpoint is registered, in the maps and attached.
    pub fn check_endpoint(&mut self, key: &str) -> Result<Endpoint, NodeError> {
        let state = self.store.read()?;
        let ep = state.endpoints.get(key).cloned().ok_or_else(|| {
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
        let mut locked = self.lock()?;
        self.dataplane.prepare()?;
        let previous = locked.state.clone();
        match namespace {
            None => locked.state.mode = mode.unwrap_or_default(),
            Some(ns) => {
                let obj = locked
                    .state
                    .namespaces
                    .entry(ns.to_owned())
                    .or_insert_with(|| {
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
            }
        }
        let (report, _) = self.commit(&mut locked, &previous)?;
        Ok(report)
    }

    /// Create or replace objects, then enforce the result.
    pub fn apply(&mut self, objects: Vec<Object>) -> Result<ObjectsReport, NodeError> {
        let mut locked = self.lock()?;
        self.dataplane.prepare()?;
        let previous = locked.state.clone();
        let mut changes = Vec::new();
        for obj in objects {
            let r = obj.reference();
            let key = format!("{}/{}", r.namespace, r.name);
            let change = match obj {
                Object::Namespace(ns) => upsert(&mut locked.state.namespaces, r.name.clone(), *ns),
                Object::Pod(pod) => upsert(&mut locked.state.pods, key, *pod),
                Object::NetworkPolicy(np) => match locked.state.policies.get(&key) {
                    Some(sp) if sp.object == *np => Change::Unchanged,
                    Some(sp) => {
                        let id = sp.id;
                        locked
                            .state
                            .policies
                            .insert(key, StoredPolicy { id, object: *np });
                        Change::Configured
                    }
                    None => {
                        let id = locked.state.allocate_policy_id();
                        locked
                            .state
                            .policies
                            .insert(key, StoredPolicy { id, object: *np });
                        Change::Created
                    }
                },
            };
            changes.push((r, change));
        }
        let (sync, warnings) = self.commit(&mut locked, &previous)?;
        Ok(ObjectsReport {
            changes,
            sync,
            warnings,
        })
    }

    /// Delete objects. Deleting a Namespace deletes its Pods and
    /// NetworkPolicies too, as Kubernetes does.
    pub fn delete(&mut self, refs: Vec<ObjectRef>) -> Result<ObjectsReport, NodeError> {
        let mut locked = self.lock()?;
        self.dataplane.prepare()?;
        let previous = locked.state.clone();
        let mut changes = Vec::new();
        for r in refs {
            let key = format!("{}/{}", r.namespace, r.name);
            let found = match r.kind {
                Kind::Namespace => {
                    let found = locked.state.namespaces.remove(&r.name).is_some();
                    let prefix = format!("{}/", r.name);
                    let pods: Vec<String> = locked
                        .state
                        .pods
                        .keys()
                        .filter(|k| k.starts_with(&prefix))
                        .cloned()
                        .collect();
                    for k in pods {
                        locked.state.pods.remove(&k);
                        let (_, name) = k.split_once('/').unwrap_or_default();
                        changes.push((
                            ObjectRef {
                                kind: Kind::Pod,
                                namespace: r.name.clone(),
                                name: name.to_owned(),
                            },
                            Change::Deleted,
                        ));
                    }
                    let pols: Vec<String> = locked
                        .state
                        .policies
                        .keys()
                        .filter(|k| k.starts_with(&prefix))
                        .cloned()
                        .collect();
                    for k in pols {
                        locked.state.policies.remove(&k);
                        let (_, name) = k.split_once('/').unwrap_or_default();
                        changes.push((
                            ObjectRef {
                                kind: Kind::NetworkPolicy,
                                namespace: r.name.clone(),
                                name: name.to_owned(),
                            },
                            Change::Deleted,
                        ));
                    }
                    found
                }
                Kind::Pod => locked.state.pods.remove(&key).is_some(),
                Kind::NetworkPolicy => locked.state.policies.remove(&key).is_some(),
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
        let (sync, warnings) = self.commit(&mut locked, &previous)?;
        Ok(ObjectsReport {
            changes,
            sync,
            warnings,
        })
    }

    /// Recompile and sync without changing anything (repairs maps).
    pub fn resync(&mut self) -> Result<SyncReport, NodeError> {
        let mut locked = self.lock()?;
        self.dataplane.prepare()?;
        let previous = locked.state.clone();
        let (report, _) = self.commit(&mut locked, &previous)?;
        self.sweep(&locked.state);
        Ok(report)
    }

    /// Put this build's programs on every endpoint, each swapped in place
    /// (maps, conntrack and policy stay as they are, so no open connection
    /// notices). Endpoints that fail keep enforcing with their old programs.
    pub fn upgrade(&mut self) -> Result<UpgradeReport, NodeError> {
        let locked = self.lock()?;
        self.dataplane.prepare()?;
        let mut report = UpgradeReport::default();
        for ep in locked.state.endpoints.values() {
            if self
                .dataplane
                .verify(&ep.attachment, &ep.host_ifname)
                .is_err_and(|e| e.to_string().contains("no longer exists"))
            {
                report.stale.push(ep.key());
                continue;
            }
            match self.dataplane.upgrade(&ep.attachment, &ep.host_ifname) {
                Ok(true) => report.upgraded.push(ep.key()),
                Ok(false) => report.current.push(ep.key()),
                Err(e) => report.failed.push((ep.key(), e.to_string())),
            }
        }
        Ok(report)
    }

    /// Detach palisade from every endpoint and remove the pinned datapath.
    /// Objects (policies, namespaces, pods) stay in the store. Containers
    /// lose their isolation: this is for removing palisade from a node.
    pub fn reset(&mut self) -> Result<Vec<Endpoint>, NodeError> {
        let mut locked = self.lock()?;
        let gone: Vec<Endpoint> = locked.state.endpoints.values().cloned().collect();
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
        locked.state.endpoints.clear();
        locked.state.pending.clear();
        locked.save()?;
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

fn upsert<T: PartialEq>(
    map: &mut std::collections::BTreeMap<String, T>,
    key: String,
    value: T,
) -> Change {
    match map.get(&key) {
        Some(old) if *old == value => Change::Unchanged,
        Some(_) => {
            map.insert(key, value);
            Change::Configured
        }
        None => {
            map.insert(key, value);
            Change::Created
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        abi::{Direction, EP_ISOLATE_INGRESS, PROTO_TCP},
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
        let sync = calls.iter().position(|c| *c == Call::Sync).unwrap();
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
