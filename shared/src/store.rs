//! The on-disk mirror of Kubernetes objects, endpoints and identities: one
//! JSON document under the state directory, replaced atomically (write a
//! temporary file, fsync, rename) while holding one exclusive file lock.
//! Readers that only display state read the file without the lock: a rename
//! never exposes a half-written document.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    dataplane::Attachment,
    identity::IdentityTable,
    policy::{Labels, Mode, NamespaceInfo, NamespaceMap, PodInfo, Policy},
};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/palisade";
const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
const STATE_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("open lock file {path}")]
    OpenLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "another palisade process held {path} for {waited:?}; try again later, or find the stuck process with `fuser {path}`"
    )]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a palisade state file (move it away to start empty)")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path} was written by a newer palisade (state version {found}, this one knows {known})"
    )]
    Version {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("write {path}")]
    Write {
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

/// A stored NetworkPolicy with its stable number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub id: u32,
    pub object: NetworkPolicy,
}

/// Everything palisade knows about this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub version: u32,
    /// Kernel boot id when endpoints were last written; endpoints never
    /// survive a reboot.
    #[serde(default)]
    pub boot_id: String,
    #[serde(default)]
    pub namespaces: BTreeMap<String, Namespace>,
    /// By `namespace/name`.
    #[serde(default)]
    pub pods: BTreeMap<String, Pod>,
    /// By `namespace/name`.
    #[serde(default)]
    pub policies: BTreeMap<String, StoredPolicy>,
    #[serde(default = "one")]
    pub next_policy_id: u32,
    /// By [`Endpoint::key`].
    #[serde(default)]
    pub endpoints: BTreeMap<String, Endpoint>,
    #[serde(default = "one")]
    pub next_endpoint_id: u32,
    #[serde(default)]
    pub identities: IdentityTable,
    /// The node's own addresses, refreshed by every CNI ADD.
    #[serde(default)]
    pub host_addresses: Vec<IpAddr>,
    /// By network namespace inode.
    #[serde(default)]
    pub pending: BTreeMap<String, PendingIdentity>,
    /// The node's default mode for policies and namespaces that do not
    /// set one (`palisadectl mode`).
    #[serde(default)]
    pub mode: Mode,
}

fn one() -> u32 {
    1
}

impl Default for State {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            boot_id: String::new(),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            policies: BTreeMap::new(),
            next_policy_id: 1,
            endpoints: BTreeMap::new(),
            next_endpoint_id: 1,
            identities: IdentityTable::default(),
            host_addresses: Vec::new(),
            pending: BTreeMap::new(),
            mode: Mode::Enforce,
        }
    }
}

impl State {
    /// Allocate the next endpoint number (never reused, so stale
    /// conntrack entries can never match a new endpoint).
    pub fn allocate_endpoint_id(&mut self) -> u32 {
        let id = self.next_endpoint_id.max(1);
        self.next_endpoint_id = id.checked_add(1).unwrap_or(1);
        id
    }

    pub fn allocate_policy_id(&mut self) -> u32 {
        let id = self.next_policy_id.max(1);
        self.next_policy_id = id.checked_add(1).unwrap_or(1);
        id
    }

    /// Every namespace: stored Namespace objects, plus the implicit ones
    /// endpoints, pods and policies live in.
    pub fn namespace_map(&self) -> NamespaceMap {
        let mut map = NamespaceMap::new();
        for (name, ns) in &self.namespaces {
            let mut info = NamespaceInfo::new(name, ns.metadata.labels.as_ref());
            info.mode = crate::policy::mode_annotation(&ns.metadata, "")
                .ok()
                .flatten();
            map.insert(name.clone(), info);
        }
        let implicit = self
            .endpoints
            .values()
            .map(|e| e.namespace.clone())
            .chain(
                self.pods
                    .values()
                    .filter_map(|p| p.metadata.namespace.clone()),
            )
            .chain(
                self.policies
                    .values()
                    .filter_map(|p| p.object.metadata.namespace.clone()),
            );
        for ns in implicit {
            map.entry(ns.clone())
                .or_insert_with(|| NamespaceInfo::new(&ns, None));
        }
        map
    }

    /// Converted policies with their ids. Stored policies were validated
    /// when applied; one that no longer converts is skipped and reported.
    pub fn policies(&self) -> (Vec<(u32, Policy)>, Vec<String>) {
        let mut out = Vec::new();
        let mut warnings = Vec::new();
        for (key, sp) in &self.policies {
            match Policy::from_k8s(&sp.object) {
                Ok(p) => out.push((sp.id, p)),
                Err(e) => warnings.push(format!(
                    "stored NetworkPolicy {key} is invalid and ignored: {e}"
                )),
            }
        }
        (out, warnings)
    }

    /// A policy's effective mode: its own annotation, else its namespace's,
    /// else the node's default.
    pub fn effective_mode(&self, policy: &Policy, namespaces: &NamespaceMap) -> Mode {
        policy
            .mode
            .or_else(|| namespaces.get(&policy.namespace).and_then(|n| n.mode))
            .unwrap_or(self.mode)
    }

    pub fn pod_info(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        self.pods
            .get(&format!("{namespace}/{name}"))
            .and_then(|p| PodInfo::from_k8s(p).ok())
    }

    /// An endpoint's effective labels: the runtime's, overlaid by the Pod
    /// object's when one is stored.
    pub fn effective_labels(&self, ep: &Endpoint) -> Labels {
        let mut labels = ep.labels.clone();
        if let Some(pod) = self.pod_info(&ep.namespace, &ep.name) {
            labels.extend(pod.labels);
        }
        labels
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// The state, loaded under the exclusive lock. Dropping it releases the
/// lock without writing; call [`Locked::save`] to commit changes.
#[derive(Debug)]
pub struct Locked {
    _lock: Flock<File>,
    path: PathBuf,
    pub state: State,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
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

    /// Take the exclusive lock (waiting up to `timeout`) and load the state.
    pub fn lock(&self, timeout: Duration) -> Result<Locked, StoreError> {
        self.ensure_dir()?;
        let lock_path = self.dir.join(LOCK_FILE);
        let start = Instant::now();
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| StoreError::OpenLock {
                path: lock_path.clone(),
                source,
            })?;
        let mut pause = Duration::from_millis(1);
        let lock = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((f, nix::Error::EWOULDBLOCK)) => {
                    if start.elapsed() >= timeout {
                        return Err(StoreError::LockTimeout {
                            path: lock_path,
                            waited: start.elapsed(),
                        });
                    }
                    file = f;
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err((_, source)) => {
                    return Err(StoreError::Lock {
                        path: lock_path,
                        source,
                    });
                }
            }
        };
        let path = self.dir.join(STATE_FILE);
        let state = load(&path)?;
        Ok(Locked {
            _lock: lock,
            path,
            state,
        })
    }

    /// Read the state without locking (for display only).
    pub fn read(&self) -> Result<State, StoreError> {
        load(&self.dir.join(STATE_FILE))
    }
}

fn load(path: &Path) -> Result<State, StoreError> {
    let mut state = match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice::<State>(&bytes).map_err(|source| StoreError::Parse {
                path: path.to_owned(),
                source,
            })?
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    if state.version > STATE_VERSION {
        return Err(StoreError::Version {
            path: path.to_owned(),
            found: state.version,
            known: STATE_VERSION,
        });
    }

    // Veths, links and pins do not survive a reboot; neither do endpoints.
    let boot = boot_id();
    if !state.boot_id.is_empty() && state.boot_id != boot {
        state.endpoints.clear();
        state.host_addresses.clear();
        state.pending.clear();
    }
    state.boot_id = boot;
    Ok(state)
}

/// The kernel's boot id (changes at every boot).
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Locked {
    /// Atomically replace the state file with the current state.
    pub fn save(&mut self) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(&self.state).map_err(|e| StoreError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|source| StoreError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        {
            let mut l = store.lock(Duration::from_secs(1)).unwrap();
            assert_eq!(l.state.allocate_endpoint_id(), 1);
            assert_eq!(l.state.allocate_endpoint_id(), 2);
            l.state.host_addresses.push("10.0.0.1".parse().unwrap());
            l.save().unwrap();
        }
        let l = store.lock(Duration::from_secs(1)).unwrap();
        assert_eq!(l.state.next_endpoint_id, 3);
        assert_eq!(l.state.host_addresses.len(), 1);
        assert_eq!(store.read().unwrap().next_endpoint_id, 3);
    }

    #[test]
    fn a_held_lock_times_out_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let _held = store.lock(Duration::from_secs(1)).unwrap();
        let err = store.lock(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, StoreError::LockTimeout { .. }), "{err}");
        assert!(err.to_string().contains("try again later"));
    }

    #[test]
    fn unsaved_changes_are_dropped_and_garbage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        {
            let mut l = store.lock(Duration::from_secs(1)).unwrap();
            l.state.allocate_policy_id();
        }
        assert_eq!(store.read().unwrap().next_policy_id, 1);
        fs::write(dir.path().join(STATE_FILE), b"{nope").unwrap();
        let err = store.read().unwrap_err().to_string();
        assert!(err.contains("not a palisade state file"), "{err}");
    }

    #[test]
    fn endpoints_from_another_boot_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = State {
            boot_id: "some-other-boot".into(),
            ..Default::default()
        };
        st.host_addresses.push("10.0.0.1".parse().unwrap());
        fs::write(
            dir.path().join(STATE_FILE),
            serde_json::to_vec(&st).unwrap(),
        )
        .unwrap();
        let read = Store::new(dir.path()).read().unwrap();
        assert!(read.host_addresses.is_empty());
        assert_eq!(read.boot_id, boot_id());
    }
}
