//! The node's store: objects, endpoints, identities and settings in an
//! embedded SQLite database (`palisade.db` under the state directory), one
//! row per object, endpoint and identity, so that a commit writes what it
//! changes and nothing else. Why SQLite: docs/STORE.md.
//!
//! Writers take SQLite's write lock for their whole transaction (`BEGIN
//! IMMEDIATE`), which is the node's one state lock: the daemon and any
//! process that runs without it (a CNI plugin, a hook, `palisadectl`) queue
//! on it. Readers that only display state read a consistent snapshot
//! without waiting for writers (write-ahead log). Every commit is durable
//! (`synchronous=FULL`).
//!
//! Objects are stored as validated domain values beside the wire object
//! they came from (which is only displayed): nothing is validated again
//! when it is loaded.
//!
//! A state directory written by an earlier palisade (`state.json`) is
//! migrated once, automatically, the first time it is opened.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use nix::fcntl::{Flock, FlockArg};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;

use crate::{
    dataplane::Attachment,
    engine::EndpointInput,
    fqdn::{self, FqdnCache, Learned},
    identity::{IdentityKey, IdentityTable},
    policy::{
        Kind, Labels, Mode, NamespaceInfo, NamespaceMap, PodInfo, Policy, Valid, effective_labels,
        effective_mode,
        palisade::{PalisadeNetworkPolicy, PalisadePolicy},
        tier::{TierKind, TierObject, TierPolicy},
    },
};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/palisade";
/// The database file in the state directory.
pub const DB_FILE: &str = "palisade.db";
/// What palisade before the database kept (migrated, then renamed to
/// `state.json.migrated`).
pub const LEGACY_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
/// The schema this build writes (state.json was version 1).
const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another palisade process held the store {path} for {waited:?}; try again later, or find the stuck process with `fuser {path}`"
    )]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("{op} in {path}")]
    Db {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "{path}: the {what} record {key:?} is damaged (restore the state directory from a backup, or remove it to start empty)"
    )]
    Record {
        path: PathBuf,
        what: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path} was written by a newer palisade (schema version {found}, this one knows {known}); upgrade palisade"
    )]
    Version {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("{path} is not a palisade state file (move it away to start empty)")]
    Legacy {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("migrate {path}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Who registered an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Cni,
    Oci,
}

/// A container interface palisade enforces on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Numeric id used in map keys.
    pub id: u32,
    pub source: Source,
    /// CNI network name (empty for OCI-hook endpoints).
    pub network: String,
    pub container_id: String,
    /// Interface name inside the container.
    pub ifname: String,
    pub namespace: String,
    /// Pod name (the container id when the runtime gave none).
    pub name: String,
    /// Labels the runtime supplied (CNI args, OCI annotations).
    #[serde(default)]
    pub labels: Labels,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub addresses: Vec<IpAddr>,
    /// Namespace and name came from Kubernetes; annotations never
    /// override them.
    #[serde(default)]
    pub k8s: bool,
    /// The container interface's MAC address, when known.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
    pub attachment: Attachment,
    /// Unix seconds.
    pub created: u64,
}

impl Endpoint {
    /// The CNI attachment key: (network, container id, interface).
    pub fn key_for(network: &str, container_id: &str, ifname: &str) -> String {
        format!("{network}/{container_id}/{ifname}")
    }

    pub fn key(&self) -> String {
        Self::key_for(&self.network, &self.container_id, &self.ifname)
    }

    /// What the engine needs of it.
    pub fn input(&self) -> EndpointInput {
        EndpointInput {
            ep_id: self.id,
            ifindex: self.host_ifindex,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            labels: self.labels.clone(),
            addresses: self.addresses.clone(),
            remote: false,
        }
    }
}

/// A pod on another node (cluster mode): its addresses, so that they get
/// the identity of its namespace and labels (the stored Pod object's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemotePod {
    /// Numeric id in the engine (from the endpoint counter; never used in
    /// map keys).
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// The node it runs on.
    pub node: String,
    pub addresses: Vec<IpAddr>,
}

impl RemotePod {
    pub fn input(&self) -> EndpointInput {
        EndpointInput {
            ep_id: self.id,
            ifindex: 0,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            labels: Labels::new(),
            addresses: self.addresses.clone(),
            remote: true,
        }
    }
}

/// Another node of the cluster (cluster mode): its addresses get the node
/// identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteNode {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// Its `InternalIP` addresses, in the Node's order (where the web
    /// console reaches the node's console).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub internal: Vec<IpAddr>,
    /// The Node object's labels (what `nodes` peers of tier policies
    /// select).
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// An identity an OCI hook learnt for a network namespace before any
/// interface existed in it (the CNI ADD for that namespace takes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingIdentity {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    /// Unix seconds.
    pub created: u64,
}

pub type StoredNamespace = Valid<Namespace, NamespaceInfo>;
pub type StoredPod = Valid<Pod, PodInfo>;

/// A stored AdminNetworkPolicy, BaselineAdminNetworkPolicy or
/// ClusterNetworkPolicy with its stable number (from the same counter as
/// NetworkPolicies', so a number names one policy of any kind).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredTierPolicy {
    pub id: u32,
    pub object: TierObject,
    pub policy: TierPolicy,
}

/// A stored PalisadeNetworkPolicy with its stable number (from the same
/// counter as NetworkPolicies').
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPalisadePolicy {
    pub id: u32,
    pub object: PalisadeNetworkPolicy,
    pub policy: PalisadePolicy,
}

/// A stored NetworkPolicy with its stable number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub id: u32,
    pub object: NetworkPolicy,
    pub policy: Policy,
}

/// Everything palisade knows about this node, read at once (for display,
/// explain, and loading the engine).
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// Counts commits that changed what the engine computes from.
    pub generation: u64,
    pub namespaces: BTreeMap<String, StoredNamespace>,
    /// By `namespace/name`.
    pub pods: BTreeMap<String, StoredPod>,
    /// By `namespace/name`.
    pub policies: BTreeMap<String, StoredPolicy>,
    /// By `Kind/name`.
    pub tier_policies: BTreeMap<String, StoredTierPolicy>,
    /// PalisadeNetworkPolicies, by `namespace/name`.
    pub palisade_policies: BTreeMap<String, StoredPalisadePolicy>,
    /// Addresses the DNS proxy learned (`toFQDNs` rules allow them).
    pub fqdns: FqdnCache,
    /// By [`Endpoint::key`].
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Pods on other nodes, by `namespace/name` (cluster mode).
    pub remote: BTreeMap<String, RemotePod>,
    /// The other nodes of the cluster, by name (cluster mode).
    pub nodes: BTreeMap<String, RemoteNode>,
    pub identities: IdentityTable,
    /// The node's own addresses, refreshed by every CNI ADD.
    pub host_addresses: Vec<IpAddr>,
    /// By network namespace inode.
    pub pending: BTreeMap<String, PendingIdentity>,
    /// The node's default mode for policies and namespaces that do not
    /// set one (`palisadectl mode`).
    pub mode: Mode,
}

impl Default for State {
    fn default() -> Self {
        Self {
            generation: 0,
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            policies: BTreeMap::new(),
            tier_policies: BTreeMap::new(),
            palisade_policies: BTreeMap::new(),
            fqdns: FqdnCache::default(),
            endpoints: BTreeMap::new(),
            remote: BTreeMap::new(),
            nodes: BTreeMap::new(),
            identities: IdentityTable::default(),
            host_addresses: Vec::new(),
            pending: BTreeMap::new(),
            mode: Mode::Enforce,
        }
    }
}

impl State {
    /// Every namespace: stored Namespace objects, plus the implicit ones
    /// endpoints, pods and policies live in.
    pub fn namespace_map(&self) -> NamespaceMap {
        let mut map: NamespaceMap = self
            .namespaces
            .iter()
            .map(|(name, ns)| (name.clone(), ns.value.clone()))
            .collect();
        let implicit = self
            .endpoints
            .values()
            .map(|e| e.namespace.clone())
            .chain(self.pods.values().map(|p| p.value.namespace.clone()))
            .chain(self.remote.values().map(|p| p.namespace.clone()))
            .chain(self.policies.values().map(|p| p.policy.namespace.clone()))
            .chain(
                self.palisade_policies
                    .values()
                    .map(|p| p.policy.base.namespace.clone()),
            );
        for ns in implicit {
            map.entry(ns.clone())
                .or_insert_with(|| NamespaceInfo::new(&ns, None));
        }
        map
    }

    /// Policies with their ids (validated when they were applied):
    /// NetworkPolicies, and PalisadeNetworkPolicies with their `toFQDNs`
    /// rules expanded to the addresses learned so far.
    pub fn policies(&self) -> Vec<(u32, Policy)> {
        self.policies
            .values()
            .map(|sp| (sp.id, sp.policy.clone()))
            .chain(
                self.palisade_policies
                    .values()
                    .map(|sp| (sp.id, fqdn::expand(&sp.policy, &self.fqdns))),
            )
            .collect()
    }

    /// Tier policies with their ids, `domainNames` expanded to the
    /// addresses learned so far.
    pub fn tier_policies(&self) -> Vec<(u32, TierPolicy)> {
        self.tier_policies
            .values()
            .map(|t| (t.id, fqdn::expand_tier(&t.policy, &self.fqdns)))
            .collect()
    }

    /// A policy's effective mode: its own annotation, else its namespace's,
    /// else the node's default.
    pub fn effective_mode(&self, policy: &Policy, namespaces: &NamespaceMap) -> Mode {
        effective_mode(
            policy.mode,
            namespaces.get(&policy.namespace).and_then(|n| n.mode),
            self.mode,
        )
    }

    pub fn pod_info(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods
            .get(&format!("{namespace}/{name}"))
            .map(|p| &p.value)
    }

    /// An endpoint's effective labels: the runtime's, overlaid by the Pod
    /// object's when one is stored.
    pub fn effective_labels(&self, ep: &Endpoint) -> Labels {
        effective_labels(&ep.labels, self.pod_info(&ep.namespace, &ep.name))
    }
}

/// The state directory and its database.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    conn: Option<Connection>,
}

fn db_err(op: &'static str, path: &Path) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Db { op, path, source }
}

/// A read-only connection that waits for a writer's commit (the WAL being
/// reset, the file being created) instead of failing at once.
fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(db_err("open", path))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(db_err("set the lock timeout", path))?;
    Ok(conn)
}

/// The store file exists but its tables do not yet (another process is
/// creating it).
fn no_table(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(_, Some(m)) if m.starts_with("no such table"))
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS namespaces (name TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pods (
    namespace TEXT NOT NULL, name TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (namespace, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS policies (
    namespace TEXT NOT NULL, name TEXT NOT NULL, id INTEGER NOT NULL UNIQUE, record TEXT NOT NULL,
    PRIMARY KEY (namespace, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS endpoints (
    key TEXT PRIMARY KEY, id INTEGER NOT NULL UNIQUE, ifindex INTEGER NOT NULL,
    container_id TEXT NOT NULL, record TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS endpoints_by_ifindex ON endpoints (ifindex);
CREATE INDEX IF NOT EXISTS endpoints_by_container ON endpoints (container_id);
CREATE TABLE IF NOT EXISTS identities (id INTEGER PRIMARY KEY, key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending (inode TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS remote_pods (
    namespace TEXT NOT NULL, name TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (namespace, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS remote_nodes (name TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tier_policies (
    kind TEXT NOT NULL, name TEXT NOT NULL, id INTEGER NOT NULL UNIQUE, record TEXT NOT NULL,
    PRIMARY KEY (kind, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS palisade_policies (
    namespace TEXT NOT NULL, name TEXT NOT NULL, id INTEGER NOT NULL UNIQUE, record TEXT NOT NULL,
    PRIMARY KEY (namespace, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fqdns (
    name TEXT NOT NULL, address TEXT NOT NULL, expires INTEGER NOT NULL,
    PRIMARY KEY (name, address)) WITHOUT ROWID;
";

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            conn: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    fn ensure_dir(&self) -> Result<(), StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| StoreError::CreateDir {
                path: self.dir.clone(),
                source,
            })
    }

    /// Open (creating and migrating if needed) the database.
    fn conn(&mut self) -> Result<&mut Connection, StoreError> {
        if self.conn.is_none() {
            self.ensure_dir()?;
            self.migrate_legacy()?;
            self.conn = Some(open_rw(&self.db_path())?);
        }
        Ok(self.conn.as_mut().expect("opened above"))
    }

    /// Begin a write transaction: the node's state lock, waited for at
    /// most `timeout`.
    pub fn write(&mut self, timeout: Duration) -> Result<Txn<'_>, StoreError> {
        let path = self.db_path();
        let conn = self.conn()?;
        conn.busy_timeout(timeout)
            .map_err(db_err("set the lock timeout", &path))?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| {
                if is_busy(&e) {
                    StoreError::LockTimeout {
                        path: path.clone(),
                        waited: timeout,
                    }
                } else {
                    db_err("begin a transaction", &path)(e)
                }
            })?;
        let mut txn = Txn {
            tx,
            path,
            changed: false,
        };
        txn.forget_other_boots()?;
        Ok(txn)
    }

    /// A consistent snapshot of everything, without waiting for writers.
    /// An empty state when nothing was ever stored.
    pub fn read(&self) -> Result<State, StoreError> {
        self.read_with(Pods::All)
    }

    /// Like [`Store::read`], but with the Pod objects of this node's
    /// endpoints only: everything that names the parties of a flow (local
    /// endpoints and their labels, pods on other nodes, nodes, policies),
    /// without the whole cluster's Pod objects in cluster mode.
    pub fn read_names(&self) -> Result<State, StoreError> {
        self.read_with(Pods::OfEndpoints)
    }

    fn read_with(&self, which: Pods) -> Result<State, StoreError> {
        let path = self.db_path();
        if !path.exists() {
            if self.dir.join(LEGACY_FILE).exists() {
                // Migrate first (needs the directory to be writable).
                let mut s = Store::new(&self.dir);
                s.conn()?;
            } else {
                return Ok(State::default());
            }
        }
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err("open", &path))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(db_err("set the lock timeout", &path))?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(db_err("begin a read", &path))?;
        let mut state = load_with(&tx, &path, which)?;
        if another_boot(
            get_meta(&tx, &path, "boot_id")?.as_deref(),
            boot_id().as_deref(),
        ) {
            // Not yet cleaned by a writer: none of these exist any more.
            state.endpoints.clear();
            state.host_addresses.clear();
            state.pending.clear();
        }
        Ok(state)
    }

    /// This node's endpoints by id, as (namespace, name), read without
    /// waiting for writers and without anything else (for metrics).
    pub fn endpoint_names(&self) -> Result<BTreeMap<u32, (String, String)>, StoreError> {
        let path = self.db_path();
        if !path.exists() {
            return Ok(self
                .read()?
                .endpoints
                .into_values()
                .map(|e| (e.id, (e.namespace, e.name)))
                .collect());
        }
        let conn = open_read_only(&path)?;
        if another_boot(
            get_meta(&conn, &path, "boot_id")?.as_deref(),
            boot_id().as_deref(),
        ) {
            return Ok(BTreeMap::new());
        }
        let mut stmt = match conn.prepare(
            "SELECT id, json_extract(record, '$.namespace'), json_extract(record, '$.name') \
             FROM endpoints",
        ) {
            Ok(s) => s,
            Err(e) if no_table(&e) => return Ok(BTreeMap::new()),
            Err(e) => return Err(db_err("read", &path)(e)),
        };
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .map_err(db_err("read", &path))?;
        rows.collect::<Result<_, _>>()
            .map_err(db_err("read", &path))
    }

    /// One endpoint, read without waiting for writers.
    pub fn endpoint(&self, key: &str) -> Result<Option<Endpoint>, StoreError> {
        let path = self.db_path();
        if !path.exists() {
            return Ok(self.read()?.endpoints.remove(key));
        }
        let conn = open_read_only(&path)?;
        if another_boot(
            get_meta(&conn, &path, "boot_id")?.as_deref(),
            boot_id().as_deref(),
        ) {
            return Ok(None);
        }
        let text: Option<String> = conn
            .query_row("SELECT record FROM endpoints WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err("read", &path))?;
        text.map(|t| decode(&path, "endpoint", key, &t)).transpose()
    }

    /// A setting, read without waiting for writers (`None`: never set, or
    /// nothing stored yet).
    pub fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let path = self.db_path();
        if !path.exists() {
            return Ok(None);
        }
        let conn = open_read_only(&path)?;
        match conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
        {
            Ok(v) => Ok(v),
            // Another process is creating the store this instant.
            Err(e) if no_table(&e) => Ok(None),
            Err(e) => Err(db_err("read settings", &path)(e)),
        }
    }

    /// Whether a Pod object is stored, read without waiting for writers.
    pub fn has_pod(&self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        let path = self.db_path();
        if !path.exists() {
            return Ok(false);
        }
        let conn = open_read_only(&path)?;
        match conn
            .query_row(
                "SELECT 1 FROM pods WHERE namespace = ?1 AND name = ?2",
                [namespace, name],
                |_| Ok(()),
            )
            .optional()
        {
            Ok(r) => Ok(r.is_some()),
            Err(e) if no_table(&e) => Ok(false),
            Err(e) => Err(db_err("read", &path)(e)),
        }
    }

    /// The generation of the stored state (cheap; for readers that cache
    /// what they derive from it).
    pub fn generation(&self) -> Result<u64, StoreError> {
        let path = self.db_path();
        if !path.exists() {
            return Ok(0);
        }
        let conn = open_read_only(&path)?;
        match conn
            .query_row("SELECT value FROM meta WHERE key = 'generation'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()
        {
            Ok(g) => Ok(g.and_then(|g| g.parse().ok()).unwrap_or(0)),
            Err(e) if no_table(&e) => Ok(0),
            Err(e) => Err(db_err("read settings", &path)(e)),
        }
    }

    /// Import `state.json` of an earlier palisade, once.
    fn migrate_legacy(&self) -> Result<(), StoreError> {
        let legacy = self.dir.join(LEGACY_FILE);
        if self.db_path().exists() || !legacy.exists() {
            return Ok(());
        }
        // Two processes may find it at once: one migrates, the other waits.
        let lock_path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| StoreError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        let _lock =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| StoreError::Lock {
                path: lock_path.clone(),
                source: e.into(),
            })?;
        if self.db_path().exists() || !legacy.exists() {
            return Ok(());
        }
        let bytes = fs::read(&legacy).map_err(|source| StoreError::Migrate {
            path: legacy.clone(),
            source,
        })?;
        let old: LegacyState =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Legacy {
                path: legacy.clone(),
                source,
            })?;
        if old.version > 1 {
            // The marker a migration leaves: the database was removed
            // since; start empty.
            return Ok(());
        }
        // Build the database beside, then rename it into place: a crash
        // leaves either no database (migrate again) or a complete one.
        let tmp = self.dir.join(format!("{DB_FILE}.migrating"));
        let _stale = fs::remove_file(&tmp);
        {
            let mut conn = open_rw(&tmp)?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err("begin the migration", &tmp))?;
            let mut txn = Txn {
                tx,
                path: tmp.clone(),
                changed: false,
            };
            old.import(&mut txn)?;
            txn.commit()?;
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .map_err(db_err("checkpoint the migration", &tmp))?;
        }
        for ext in ["-wal", "-shm"] {
            let _gone = fs::remove_file(self.dir.join(format!("{DB_FILE}.migrating{ext}")));
        }
        let move_err = |source| StoreError::Migrate {
            path: legacy.clone(),
            source,
        };
        fs::rename(&tmp, self.db_path()).map_err(move_err)?;
        fs::rename(&legacy, self.dir.join(format!("{LEGACY_FILE}.migrated"))).map_err(
            |source| StoreError::Migrate {
                path: legacy.clone(),
                source,
            },
        )?;
        // An older palisade still running during an upgrade would take a
        // missing state.json for an empty node and clear the maps; a file
        // of a newer version makes it refuse instead.
        fs::write(
            &legacy,
            format!("{{\"version\": {SCHEMA_VERSION}, \"movedTo\": \"{DB_FILE}\"}}\n"),
        )
        .map_err(|source| StoreError::Migrate {
            path: legacy.clone(),
            source,
        })?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::Migrate {
                path: self.dir.clone(),
                source,
            })?;
        tracing::info!(
            "migrated {} into {}",
            legacy.display(),
            self.db_path().display()
        );
        Ok(())
    }
}

fn open_rw(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err("open", path))?;
    conn.busy_timeout(Duration::from_secs(30))
        .map_err(db_err("set the lock timeout", path))?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
        .map_err(db_err("configure", path))?;
    let found: u32 = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()
        .ok()
        .flatten()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::Version {
            path: path.to_owned(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found < SCHEMA_VERSION {
        conn.execute_batch(SCHEMA)
            .map_err(db_err("create the schema", path))?;
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
            params![SCHEMA_VERSION.to_string()],
        )
        .map_err(db_err("record the schema version", path))?;
    }
    Ok(conn)
}

/// The kernel's boot id (changes at every boot); `None` when it cannot be
/// read.
pub fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Whether records written at boot `stored` belong to another boot than
/// `current`. Only two known, different ids say so: a boot id that cannot
/// be read (a restricted /proc, a failing read) never makes the recorded
/// endpoints look stale, since forgetting them would leave veths with
/// programs that no record owns.
fn another_boot(stored: Option<&str>, current: Option<&str>) -> bool {
    matches!((stored, current), (Some(s), Some(c)) if s != c)
}

fn get_meta(conn: &Connection, path: &Path, key: &str) -> Result<Option<String>, StoreError> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(db_err("read settings", path))
}

fn decode<T: DeserializeOwned>(
    path: &Path,
    what: &'static str,
    key: &str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Record {
        path: path.to_owned(),
        what,
        key: key.to_owned(),
        source,
    })
}

fn encode<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("palisade's records always serialise")
}

/// Every row, for one table of `key → record`.
fn rows<T: DeserializeOwned>(
    conn: &Connection,
    path: &Path,
    what: &'static str,
    sql: &str,
) -> Result<Vec<(String, T)>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err("read", path))?;
    let mut rows = stmt.query([]).map_err(db_err("read", path))?;
    // Decoded one by one: the texts of a large table are never all held.
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(db_err("read", path))? {
        let key: String = r.get(0).map_err(db_err("read", path))?;
        let text = r.get_ref(1).map_err(db_err("read", path))?;
        let text = text
            .as_str()
            .map_err(|e| db_err("read", path)(rusqlite::Error::from(e)))?;
        let value = decode(path, what, &key, text)?;
        out.push((key, value));
    }
    Ok(out)
}

fn load_fqdns(conn: &Connection, path: &Path) -> Result<FqdnCache, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT name, address, expires FROM fqdns")
        .map_err(db_err("read", path))?;
    let mut rows = stmt.query([]).map_err(db_err("read", path))?;
    let mut cache = FqdnCache::default();
    while let Some(r) = rows.next().map_err(db_err("read", path))? {
        let name: String = r.get(0).map_err(db_err("read", path))?;
        let address: String = r.get(1).map_err(db_err("read", path))?;
        let expires: i64 = r.get(2).map_err(db_err("read", path))?;
        // A row that does not parse is skipped: it only ever allowed more.
        if let Ok(address) = address.parse() {
            cache.insert_entry(&Learned {
                name,
                address,
                expires: u64::try_from(expires).unwrap_or(0),
            });
        }
    }
    Ok(cache)
}

/// Which Pod objects a read takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pods {
    All,
    /// Only those of this node's endpoints (what names and labels need; in
    /// cluster mode the table holds every pod of the cluster).
    OfEndpoints,
}

fn load(conn: &Connection, path: &Path) -> Result<State, StoreError> {
    load_with(conn, path, Pods::All)
}

fn load_with(conn: &Connection, path: &Path, which: Pods) -> Result<State, StoreError> {
    let meta = |key: &str| get_meta(conn, path, key);
    let mut ids = IdentityTable::with_counters(
        meta("next_local_identity")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        meta("next_cidr_identity")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    for (id, key) in rows::<IdentityKey>(
        conn,
        path,
        "identity",
        "SELECT CAST(id AS TEXT), key FROM identities",
    )? {
        ids.insert(id.parse().unwrap_or_default(), key);
    }
    Ok(State {
        generation: meta("generation")?
            .and_then(|g| g.parse().ok())
            .unwrap_or(0),
        namespaces: rows(
            conn,
            path,
            "namespace",
            "SELECT name, record FROM namespaces",
        )?
        .into_iter()
        .collect(),
        pods: match which {
            Pods::All => rows(
                conn,
                path,
                "pod",
                "SELECT namespace || '/' || name, record FROM pods",
            )?
            .into_iter()
            .collect(),
            Pods::OfEndpoints => rows(
                conn,
                path,
                "pod",
                "SELECT p.namespace || '/' || p.name, p.record FROM pods p \
                 WHERE EXISTS (SELECT 1 FROM endpoints e WHERE \
                 json_extract(e.record, '$.namespace') = p.namespace AND \
                 json_extract(e.record, '$.name') = p.name)",
            )?
            .into_iter()
            .collect(),
        },
        policies: rows(
            conn,
            path,
            "policy",
            "SELECT namespace || '/' || name, record FROM policies",
        )?
        .into_iter()
        .collect(),
        tier_policies: rows(
            conn,
            path,
            "tier policy",
            "SELECT kind || '/' || name, record FROM tier_policies",
        )?
        .into_iter()
        .collect(),
        palisade_policies: rows(
            conn,
            path,
            "PalisadeNetworkPolicy",
            "SELECT namespace || '/' || name, record FROM palisade_policies",
        )?
        .into_iter()
        .collect(),
        fqdns: load_fqdns(conn, path)?,
        endpoints: rows(conn, path, "endpoint", "SELECT key, record FROM endpoints")?
            .into_iter()
            .collect(),
        remote: rows(
            conn,
            path,
            "remote pod",
            "SELECT namespace || '/' || name, record FROM remote_pods",
        )?
        .into_iter()
        .collect(),
        nodes: rows(
            conn,
            path,
            "remote node",
            "SELECT name, record FROM remote_nodes",
        )?
        .into_iter()
        .collect(),
        identities: ids,
        host_addresses: meta("host_addresses")?
            .map(|v| decode(path, "setting", "host_addresses", &v))
            .transpose()?
            .unwrap_or_default(),
        pending: rows(
            conn,
            path,
            "pending identity",
            "SELECT inode, record FROM pending",
        )?
        .into_iter()
        .collect(),
        mode: meta("mode")?
            .map(|v| decode(path, "setting", "mode", &v))
            .transpose()?
            .unwrap_or_default(),
    })
}

/// A write transaction. Dropping it without [`Txn::commit`] changes
/// nothing.
#[derive(Debug)]
pub struct Txn<'c> {
    tx: rusqlite::Transaction<'c>,
    path: PathBuf,
    changed: bool,
}

impl Txn<'_> {
    fn exec(
        &mut self,
        op: &'static str,
        sql: &str,
        p: impl rusqlite::Params,
    ) -> Result<usize, StoreError> {
        self.changed = true;
        let mut stmt = self
            .tx
            .prepare_cached(sql)
            .map_err(db_err(op, &self.path))?;
        stmt.execute(p).map_err(db_err(op, &self.path))
    }

    fn one<T: DeserializeOwned>(
        &self,
        what: &'static str,
        sql: &str,
        p: impl rusqlite::Params,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(sql)
            .map_err(db_err("read", &self.path))?;
        let text: Option<String> = stmt
            .query_row(p, |r| r.get(0))
            .optional()
            .map_err(db_err("read", &self.path))?;
        text.map(|t| decode(&self.path, what, key, &t)).transpose()
    }

    fn many<T: DeserializeOwned>(
        &self,
        what: &'static str,
        sql: &str,
        p: impl rusqlite::Params,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(sql)
            .map_err(db_err("read", &self.path))?;
        let texts: Vec<String> = stmt
            .query_map(p, |r| r.get(0))
            .map_err(db_err("read", &self.path))?
            .collect::<Result<_, _>>()
            .map_err(db_err("read", &self.path))?;
        texts
            .iter()
            .map(|t| decode(&self.path, what, "", t))
            .collect()
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        get_meta(&self.tx, &self.path, key)
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.exec(
            "write settings",
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(())
    }

    fn counter(&self, key: &str) -> Result<u64, StoreError> {
        Ok(self.meta(key)?.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// Whether anything was written.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Endpoints, the node's addresses and pending identities do not
    /// survive a reboot (veths, links and pins do not).
    fn forget_other_boots(&mut self) -> Result<(), StoreError> {
        let Some(boot) = boot_id() else {
            tracing::warn!(
                "the kernel's boot id cannot be read: the recorded endpoints are kept as they are"
            );
            return Ok(());
        };
        let stored = self.meta("boot_id")?;
        if stored.as_deref() == Some(boot.as_str()) {
            return Ok(());
        }
        if another_boot(stored.as_deref(), Some(&boot)) {
            self.exec(
                "forget endpoints of another boot",
                "DELETE FROM endpoints",
                [],
            )?;
            self.exec("forget pending identities", "DELETE FROM pending", [])?;
            self.exec(
                "forget the node's addresses",
                "DELETE FROM meta WHERE key = 'host_addresses'",
                [],
            )?;
            self.bump_generation()?;
        }
        self.set_meta("boot_id", &boot)
    }

    /// Everything, as [`Store::read`] returns it.
    pub fn load(&self) -> Result<State, StoreError> {
        load(&self.tx, &self.path)
    }

    pub fn generation(&self) -> Result<u64, StoreError> {
        self.counter("generation")
    }

    /// Say that what the engine computes from changed; returns the new
    /// generation.
    pub fn bump_generation(&mut self) -> Result<u64, StoreError> {
        let next = self.generation()? + 1;
        self.set_meta("generation", &next.to_string())?;
        Ok(next)
    }

    pub fn commit(self) -> Result<(), StoreError> {
        let path = self.path.clone();
        self.tx.commit().map_err(db_err("commit", &path))
    }

    fn allocate(&mut self, key: &str) -> Result<u32, StoreError> {
        let id = u32::try_from(self.counter(key)?).unwrap_or(0).max(1);
        // Never reused, so stale conntrack entries can never match.
        let next = id.checked_add(1).unwrap_or(1);
        self.set_meta(key, &next.to_string())?;
        Ok(id)
    }

    pub fn allocate_endpoint_id(&mut self) -> Result<u32, StoreError> {
        self.allocate("next_endpoint_id")
    }

    pub fn allocate_policy_id(&mut self) -> Result<u32, StoreError> {
        self.allocate("next_policy_id")
    }

    // ----- objects -----

    pub fn namespace(&self, name: &str) -> Result<Option<StoredNamespace>, StoreError> {
        self.one(
            "namespace",
            "SELECT record FROM namespaces WHERE name = ?1",
            [name],
            name,
        )
    }

    pub fn put_namespace(&mut self, ns: &StoredNamespace) -> Result<(), StoreError> {
        self.exec(
            "write a namespace",
            "INSERT OR REPLACE INTO namespaces (name, record) VALUES (?1, ?2)",
            params![ns.value.name, encode(ns)],
        )?;
        Ok(())
    }

    pub fn delete_namespace(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self.exec(
            "delete a namespace",
            "DELETE FROM namespaces WHERE name = ?1",
            [name],
        )? > 0)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Result<Option<StoredPod>, StoreError> {
        self.one(
            "pod",
            "SELECT record FROM pods WHERE namespace = ?1 AND name = ?2",
            [namespace, name],
            &format!("{namespace}/{name}"),
        )
    }

    pub fn pods_in(&self, namespace: &str) -> Result<Vec<StoredPod>, StoreError> {
        self.many(
            "pod",
            "SELECT record FROM pods WHERE namespace = ?1",
            [namespace],
        )
    }

    pub fn put_pod(&mut self, pod: &StoredPod) -> Result<(), StoreError> {
        self.exec(
            "write a pod",
            "INSERT OR REPLACE INTO pods (namespace, name, record) VALUES (?1, ?2, ?3)",
            params![pod.value.namespace, pod.value.name, encode(pod)],
        )?;
        Ok(())
    }

    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        Ok(self.exec(
            "delete a pod",
            "DELETE FROM pods WHERE namespace = ?1 AND name = ?2",
            [namespace, name],
        )? > 0)
    }

    pub fn policy(&self, namespace: &str, name: &str) -> Result<Option<StoredPolicy>, StoreError> {
        self.one(
            "policy",
            "SELECT record FROM policies WHERE namespace = ?1 AND name = ?2",
            [namespace, name],
            &format!("{namespace}/{name}"),
        )
    }

    pub fn policies_in(&self, namespace: &str) -> Result<Vec<StoredPolicy>, StoreError> {
        self.many(
            "policy",
            "SELECT record FROM policies WHERE namespace = ?1",
            [namespace],
        )
    }

    pub fn put_policy(&mut self, p: &StoredPolicy) -> Result<(), StoreError> {
        self.exec(
            "write a policy",
            "INSERT OR REPLACE INTO policies (namespace, name, id, record) VALUES (?1, ?2, ?3, ?4)",
            params![p.policy.namespace, p.policy.name, p.id, encode(p)],
        )?;
        Ok(())
    }

    pub fn delete_policy(&mut self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        Ok(self.exec(
            "delete a policy",
            "DELETE FROM policies WHERE namespace = ?1 AND name = ?2",
            [namespace, name],
        )? > 0)
    }

    pub fn tier_policy(
        &self,
        kind: TierKind,
        name: &str,
    ) -> Result<Option<StoredTierPolicy>, StoreError> {
        self.one(
            "tier policy",
            "SELECT record FROM tier_policies WHERE kind = ?1 AND name = ?2",
            [kind.as_str(), name],
            &format!("{}/{name}", kind.as_str()),
        )
    }

    pub fn tier_policies(&self) -> Result<Vec<StoredTierPolicy>, StoreError> {
        self.many("tier policy", "SELECT record FROM tier_policies", [])
    }

    pub fn put_tier_policy(&mut self, p: &StoredTierPolicy) -> Result<(), StoreError> {
        self.exec(
            "write a tier policy",
            "INSERT OR REPLACE INTO tier_policies (kind, name, id, record) VALUES (?1, ?2, ?3, ?4)",
            params![p.policy.kind.as_str(), p.policy.name, p.id, encode(p)],
        )?;
        Ok(())
    }

    pub fn delete_tier_policy(&mut self, kind: TierKind, name: &str) -> Result<bool, StoreError> {
        Ok(self.exec(
            "delete a tier policy",
            "DELETE FROM tier_policies WHERE kind = ?1 AND name = ?2",
            [kind.as_str(), name],
        )? > 0)
    }

    pub fn palisade_policy(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<StoredPalisadePolicy>, StoreError> {
        self.one(
            "PalisadeNetworkPolicy",
            "SELECT record FROM palisade_policies WHERE namespace = ?1 AND name = ?2",
            [namespace, name],
            &format!("{namespace}/{name}"),
        )
    }

    pub fn palisade_policies(&self) -> Result<Vec<StoredPalisadePolicy>, StoreError> {
        self.many(
            "PalisadeNetworkPolicy",
            "SELECT record FROM palisade_policies",
            [],
        )
    }

    pub fn put_palisade_policy(&mut self, p: &StoredPalisadePolicy) -> Result<(), StoreError> {
        self.exec(
            "write a PalisadeNetworkPolicy",
            "INSERT OR REPLACE INTO palisade_policies (namespace, name, id, record) VALUES (?1, ?2, ?3, ?4)",
            params![p.policy.base.namespace, p.policy.base.name, p.id, encode(p)],
        )?;
        Ok(())
    }

    pub fn delete_palisade_policy(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<bool, StoreError> {
        Ok(self.exec(
            "delete a PalisadeNetworkPolicy",
            "DELETE FROM palisade_policies WHERE namespace = ?1 AND name = ?2",
            [namespace, name],
        )? > 0)
    }

    // ----- learned addresses -----

    pub fn fqdns(&self) -> Result<FqdnCache, StoreError> {
        load_fqdns(&self.tx, &self.path)
    }

    pub fn put_fqdn(&mut self, l: &Learned) -> Result<(), StoreError> {
        self.exec(
            "record a learned address",
            "INSERT OR REPLACE INTO fqdns (name, address, expires) VALUES (?1, ?2, ?3)",
            params![
                l.name,
                l.address.to_string(),
                i64::try_from(l.expires).unwrap_or(i64::MAX)
            ],
        )?;
        Ok(())
    }

    pub fn delete_fqdn(&mut self, name: &str, address: IpAddr) -> Result<bool, StoreError> {
        Ok(self.exec(
            "forget a learned address",
            "DELETE FROM fqdns WHERE name = ?1 AND address = ?2",
            params![name, address.to_string()],
        )? > 0)
    }

    // ----- endpoints -----

    pub fn endpoint(&self, key: &str) -> Result<Option<Endpoint>, StoreError> {
        self.one(
            "endpoint",
            "SELECT record FROM endpoints WHERE key = ?1",
            [key],
            key,
        )
    }

    pub fn endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        self.many("endpoint", "SELECT record FROM endpoints", [])
    }

    pub fn endpoints_on_ifindex(&self, ifindex: u32) -> Result<Vec<Endpoint>, StoreError> {
        self.many(
            "endpoint",
            "SELECT record FROM endpoints WHERE ifindex = ?1",
            [ifindex],
        )
    }

    pub fn endpoints_of_container(&self, container_id: &str) -> Result<Vec<Endpoint>, StoreError> {
        self.many(
            "endpoint",
            "SELECT record FROM endpoints WHERE container_id = ?1",
            [container_id],
        )
    }

    pub fn put_endpoint(&mut self, ep: &Endpoint) -> Result<(), StoreError> {
        self.exec(
            "write an endpoint",
            "INSERT OR REPLACE INTO endpoints (key, id, ifindex, container_id, record) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![ep.key(), ep.id, ep.host_ifindex, ep.container_id, encode(ep)],
        )?;
        Ok(())
    }

    pub fn delete_endpoint(&mut self, key: &str) -> Result<bool, StoreError> {
        Ok(self.exec(
            "delete an endpoint",
            "DELETE FROM endpoints WHERE key = ?1",
            [key],
        )? > 0)
    }

    /// (namespace, name) of every stored object of a kind (namespace empty
    /// for Namespaces).
    pub fn object_keys(&self, kind: Kind) -> Result<Vec<(String, String)>, StoreError> {
        let sql = match kind {
            Kind::Namespace => "SELECT '', name FROM namespaces",
            Kind::Pod => "SELECT namespace, name FROM pods",
            Kind::NetworkPolicy => "SELECT namespace, name FROM policies",
            Kind::Node => "SELECT '', name FROM remote_nodes",
            Kind::AdminNetworkPolicy => {
                "SELECT '', name FROM tier_policies WHERE kind = 'AdminNetworkPolicy'"
            }
            Kind::BaselineAdminNetworkPolicy => {
                "SELECT '', name FROM tier_policies WHERE kind = 'BaselineAdminNetworkPolicy'"
            }
            Kind::ClusterNetworkPolicy => {
                "SELECT '', name FROM tier_policies WHERE kind = 'ClusterNetworkPolicy'"
            }
            Kind::PalisadeNetworkPolicy => "SELECT namespace, name FROM palisade_policies",
        };
        let mut stmt = self
            .tx
            .prepare_cached(sql)
            .map_err(db_err("read", &self.path))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db_err("read", &self.path))?;
        rows.collect::<Result<_, _>>()
            .map_err(db_err("read", &self.path))
    }

    // ----- pods on other nodes -----

    pub fn remote_pod(&self, namespace: &str, name: &str) -> Result<Option<RemotePod>, StoreError> {
        self.one(
            "remote pod",
            "SELECT record FROM remote_pods WHERE namespace = ?1 AND name = ?2",
            [namespace, name],
            &format!("{namespace}/{name}"),
        )
    }

    pub fn put_remote_pod(&mut self, pod: &RemotePod) -> Result<(), StoreError> {
        self.exec(
            "write a remote pod",
            "INSERT OR REPLACE INTO remote_pods (namespace, name, record) VALUES (?1, ?2, ?3)",
            params![pod.namespace, pod.name, encode(pod)],
        )?;
        Ok(())
    }

    pub fn delete_remote_pod(&mut self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        Ok(self.exec(
            "delete a remote pod",
            "DELETE FROM remote_pods WHERE namespace = ?1 AND name = ?2",
            [namespace, name],
        )? > 0)
    }

    // ----- other nodes -----

    pub fn remote_node(&self, name: &str) -> Result<Option<RemoteNode>, StoreError> {
        self.one(
            "remote node",
            "SELECT record FROM remote_nodes WHERE name = ?1",
            [name],
            name,
        )
    }

    pub fn put_remote_node(&mut self, node: &RemoteNode) -> Result<(), StoreError> {
        self.exec(
            "write a remote node",
            "INSERT OR REPLACE INTO remote_nodes (name, record) VALUES (?1, ?2)",
            params![node.name, encode(node)],
        )?;
        Ok(())
    }

    pub fn delete_remote_node(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self.exec(
            "delete a remote node",
            "DELETE FROM remote_nodes WHERE name = ?1",
            [name],
        )? > 0)
    }

    /// A setting in the meta table (`None`: never set).
    pub fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.meta(key)
    }

    pub fn set_setting(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.set_meta(key, value)
    }

    pub fn delete_setting(&mut self, key: &str) -> Result<(), StoreError> {
        self.exec("delete a setting", "DELETE FROM meta WHERE key = ?1", [key])?;
        Ok(())
    }

    // ----- identities and settings -----

    pub fn put_identity(&mut self, id: u32, key: &IdentityKey) -> Result<(), StoreError> {
        self.exec(
            "write an identity",
            "INSERT OR REPLACE INTO identities (id, key) VALUES (?1, ?2)",
            params![id, encode(key)],
        )?;
        Ok(())
    }

    pub fn delete_identity(&mut self, id: u32) -> Result<(), StoreError> {
        self.exec(
            "delete an identity",
            "DELETE FROM identities WHERE id = ?1",
            [id],
        )?;
        Ok(())
    }

    pub fn set_identity_counters(&mut self, (local, cidr): (u32, u32)) -> Result<(), StoreError> {
        if self.counter("next_local_identity")? != u64::from(local) {
            self.set_meta("next_local_identity", &local.to_string())?;
        }
        if self.counter("next_cidr_identity")? != u64::from(cidr) {
            self.set_meta("next_cidr_identity", &cidr.to_string())?;
        }
        Ok(())
    }

    pub fn host_addresses(&self) -> Result<Vec<IpAddr>, StoreError> {
        self.meta("host_addresses")?
            .map(|v| decode(&self.path, "setting", "host_addresses", &v))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    pub fn set_host_addresses(&mut self, addrs: &[IpAddr]) -> Result<(), StoreError> {
        self.set_meta("host_addresses", &encode(&addrs))
    }

    pub fn mode(&self) -> Result<Mode, StoreError> {
        self.meta("mode")?
            .map(|v| decode(&self.path, "setting", "mode", &v))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    pub fn set_mode(&mut self, mode: Mode) -> Result<(), StoreError> {
        self.set_meta("mode", &encode(&mode))
    }

    // ----- pending identities -----

    /// Drop pending identities created before `oldest` (Unix seconds).
    pub fn prune_pending(&mut self, oldest: u64) -> Result<(), StoreError> {
        self.forget_pending_where(|p| p.created < oldest)
    }

    fn forget_pending_where(
        &mut self,
        stale: impl Fn(&PendingIdentity) -> bool,
    ) -> Result<(), StoreError> {
        let all: Vec<(String, PendingIdentity)> = rows(
            &self.tx,
            &self.path,
            "pending identity",
            "SELECT inode, record FROM pending",
        )?;
        for (inode, p) in all {
            if stale(&p) {
                self.exec(
                    "forget a pending identity",
                    "DELETE FROM pending WHERE inode = ?1",
                    [inode],
                )?;
            }
        }
        Ok(())
    }

    pub fn put_pending(&mut self, inode: u64, p: &PendingIdentity) -> Result<(), StoreError> {
        self.exec(
            "write a pending identity",
            "INSERT OR REPLACE INTO pending (inode, record) VALUES (?1, ?2)",
            params![inode.to_string(), encode(p)],
        )?;
        Ok(())
    }

    /// Remove and return the pending identity of a network namespace.
    pub fn take_pending(&mut self, inode: u64) -> Result<Option<PendingIdentity>, StoreError> {
        let key = inode.to_string();
        let p = self.one(
            "pending identity",
            "SELECT record FROM pending WHERE inode = ?1",
            [&key],
            &key,
        )?;
        if p.is_some() {
            self.exec(
                "take a pending identity",
                "DELETE FROM pending WHERE inode = ?1",
                [&key],
            )?;
        }
        Ok(p)
    }

    /// Forget the pending identities a container recorded.
    pub fn forget_pending_of(&mut self, container_id: &str) -> Result<(), StoreError> {
        self.forget_pending_where(|p| p.container_id == container_id)
    }

    /// Forget every endpoint and pending identity (reset).
    pub fn clear_endpoints(&mut self) -> Result<(), StoreError> {
        self.exec("forget endpoints", "DELETE FROM endpoints", [])?;
        self.exec("forget pending identities", "DELETE FROM pending", [])?;
        Ok(())
    }
}

/// `state.json` as palisade kept it before the database (schema 1).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LegacyState {
    #[serde(default)]
    version: u32,
    #[serde(default)]
    boot_id: String,
    #[serde(default)]
    namespaces: BTreeMap<String, Namespace>,
    #[serde(default)]
    pods: BTreeMap<String, Pod>,
    #[serde(default)]
    policies: BTreeMap<String, LegacyPolicy>,
    #[serde(default)]
    next_policy_id: u32,
    #[serde(default)]
    endpoints: BTreeMap<String, Endpoint>,
    #[serde(default)]
    next_endpoint_id: u32,
    #[serde(default)]
    identities: IdentityTable,
    #[serde(default)]
    host_addresses: Vec<IpAddr>,
    #[serde(default)]
    pending: BTreeMap<String, PendingIdentity>,
    #[serde(default)]
    mode: Mode,
}

#[derive(Debug, Deserialize)]
struct LegacyPolicy {
    id: u32,
    object: NetworkPolicy,
}

impl LegacyState {
    /// Write everything into a fresh database. Objects are validated once
    /// here (they were when they were applied); one that no longer
    /// validates is left out with a warning.
    fn import(self, tx: &mut Txn<'_>) -> Result<(), StoreError> {
        for (name, ns) in self.namespaces {
            match crate::policy::validate_namespace_object(ns) {
                Ok(v) => tx.put_namespace(&v)?,
                Err(e) => tracing::warn!("migration: Namespace {name} left out: {e}"),
            }
        }
        for (key, pod) in self.pods {
            match crate::policy::validate_pod_object(pod) {
                Ok(v) => tx.put_pod(&v)?,
                Err(e) => tracing::warn!("migration: Pod {key} left out: {e}"),
            }
        }
        for (key, sp) in self.policies {
            match Policy::from_k8s(&sp.object) {
                Ok(policy) => tx.put_policy(&StoredPolicy {
                    id: sp.id,
                    object: sp.object,
                    policy,
                })?,
                Err(e) => tracing::warn!("migration: NetworkPolicy {key} left out: {e}"),
            }
        }
        let recorded = Some(self.boot_id.as_str()).filter(|b| !b.is_empty());
        if !another_boot(recorded, boot_id().as_deref()) {
            for ep in self.endpoints.values() {
                tx.put_endpoint(ep)?;
            }
            for (inode, p) in &self.pending {
                tx.put_pending(inode.parse().unwrap_or_default(), p)?;
            }
            tx.set_host_addresses(&self.host_addresses)?;
        }
        for (key, id) in self.identities.iter() {
            tx.put_identity(id, key)?;
        }
        tx.set_identity_counters(self.identities.counters())?;
        tx.set_meta("next_policy_id", &self.next_policy_id.max(1).to_string())?;
        tx.set_meta(
            "next_endpoint_id",
            &self.next_endpoint_id.max(1).to_string(),
        )?;
        tx.set_mode(self.mode)?;
        if let Some(boot) = boot_id() {
            tx.set_meta("boot_id", &boot)?;
        }
        tx.bump_generation()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Object, parse_documents};

    fn objects(yaml: &str) -> Vec<Object> {
        parse_documents(yaml, "test").unwrap()
    }

    #[test]
    fn rows_round_trip_and_ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::new(dir.path());
        {
            let mut tx = store.write(Duration::from_secs(1)).unwrap();
            assert_eq!(tx.allocate_endpoint_id().unwrap(), 1);
            assert_eq!(tx.allocate_endpoint_id().unwrap(), 2);
            tx.set_host_addresses(&["10.0.0.1".parse().unwrap()])
                .unwrap();
            tx.commit().unwrap();
        }
        let mut tx = store.write(Duration::from_secs(1)).unwrap();
        assert_eq!(tx.allocate_endpoint_id().unwrap(), 3);
        drop(tx);
        let st = store.read().unwrap();
        assert_eq!(st.host_addresses.len(), 1);
        // The dropped transaction changed nothing.
        let mut tx = store.write(Duration::from_secs(1)).unwrap();
        assert_eq!(tx.allocate_endpoint_id().unwrap(), 3);
    }

    #[test]
    fn a_held_write_lock_times_out_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Store::new(dir.path());
        let mut b = Store::new(dir.path());
        let _held = a.write(Duration::from_secs(1)).unwrap();
        let err = b.write(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, StoreError::LockTimeout { .. }), "{err}");
        assert!(err.to_string().contains("try again later"));
        // Readers are not blocked by the writer.
        b.read().unwrap();
    }

    #[test]
    fn endpoints_from_another_boot_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::new(dir.path());
        let mut tx = store.write(Duration::from_secs(1)).unwrap();
        tx.set_host_addresses(&["10.0.0.1".parse().unwrap()])
            .unwrap();
        tx.set_meta("boot_id", "some-other-boot").unwrap();
        tx.commit().unwrap();
        assert!(store.read().unwrap().host_addresses.is_empty());
        let tx = store.write(Duration::from_secs(1)).unwrap();
        assert!(tx.host_addresses().unwrap().is_empty());
        assert_eq!(tx.meta("boot_id").unwrap(), boot_id());
    }

    #[test]
    fn only_two_known_different_boot_ids_make_records_stale() {
        assert!(another_boot(Some("a"), Some("b")));
        assert!(!another_boot(Some("a"), Some("a")));
        // The current id unreadable: nothing is forgotten.
        assert!(!another_boot(Some("a"), None));
        // Never recorded (a new store): nothing to forget.
        assert!(!another_boot(None, Some("b")));
        assert!(!another_boot(None, None));
    }

    #[test]
    fn a_legacy_state_file_is_migrated_once_with_its_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = IdentityTable::default();
        let key = IdentityKey {
            namespace: Some("shop".into()),
            ..Default::default()
        };
        let web = ids.get_or_allocate(&key);
        let objs = objects(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\nspec: {podSelector: {}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: red}}\n",
        );
        let (Object::NetworkPolicy(np), Object::Namespace(ns)) = (&objs[0], &objs[1]) else {
            panic!("{objs:?}")
        };
        let legacy = serde_json::json!({
            "version": 1,
            "bootId": boot_id().unwrap(),
            "namespaces": {"shop": ns.object},
            "policies": {"shop/deny": {"id": 7, "object": np.object}},
            "nextPolicyId": 8,
            "nextEndpointId": 5,
            "identities": ids,
            "hostAddresses": ["10.0.0.1"],
            "mode": "audit",
        });
        fs::write(dir.path().join(LEGACY_FILE), legacy.to_string()).unwrap();
        let mut store = Store::new(dir.path());
        let st = store.read().unwrap();
        assert_eq!(st.policies["shop/deny"].id, 7);
        assert_eq!(st.namespaces["shop"].value.labels["team"], "red");
        assert_eq!(st.identities.id_of(&key), Some(web));
        assert_eq!(st.mode, Mode::Audit);
        assert_eq!(st.host_addresses.len(), 1);
        assert!(dir.path().join("state.json.migrated").exists());
        // What is left in state.json makes an older palisade refuse.
        let marker: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(LEGACY_FILE)).unwrap()).unwrap();
        assert!(marker["version"].as_u64().unwrap() > 1, "{marker}");
        let mut tx = store.write(Duration::from_secs(1)).unwrap();
        assert_eq!(tx.allocate_policy_id().unwrap(), 8);
        assert_eq!(tx.allocate_endpoint_id().unwrap(), 5);
    }

    #[test]
    fn a_damaged_record_is_reported_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::new(dir.path());
        let mut tx = store.write(Duration::from_secs(1)).unwrap();
        tx.exec(
            "test",
            "INSERT INTO pods (namespace, name, record) VALUES ('a', 'b', '{nope')",
            [],
        )
        .unwrap();
        tx.commit().unwrap();
        let err = store.read().unwrap_err().to_string();
        assert!(err.contains("pod record \"a/b\" is damaged"), "{err}");
    }
}
