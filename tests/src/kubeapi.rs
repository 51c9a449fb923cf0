//! A Kubernetes API server test double for cluster-mode tests: it serves
//! k8s-openapi objects over plain HTTP with the list/watch semantics of
//! <https://kubernetes.io/docs/reference/using-api/api-concepts/> (one
//! global resourceVersion, chunked lists over consistent snapshots, watches
//! resumed from kept history, bookmarks, 410 Gone after compaction), and lets
//! a test cut watches, forget history or take the API down.
//!
//! It is a double, not an apiserver: no authentication, admission,
//! validation beyond names, label or field selectors, PATCH, subresources,
//! graceful deletion, finalizers, garbage collection or `metadata.generation`.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt, io,
    net::{SocketAddr, TcpListener as StdTcpListener},
    ops::Bound,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};
use socket2::{Domain, Socket, Type};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    time::Instant,
};

/// One resource type the double serves.
#[derive(Debug)]
struct ResourceType {
    group: &'static str,
    version: &'static str,
    api_version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// A custom resource: served only while its CRD is "installed"
    /// ([`ApiServer::set_crds_installed`]).
    crd: bool,
}

const fn tier_crd(
    version: &'static str,
    api_version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
) -> ResourceType {
    ResourceType {
        group: "policy.networking.k8s.io",
        version,
        api_version,
        plural,
        singular,
        kind,
        namespaced: false,
        crd: true,
    }
}

const fn core(
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> ResourceType {
    ResourceType {
        group: "",
        version: "v1",
        api_version: "v1",
        plural,
        singular,
        kind,
        namespaced,
        crd: false,
    }
}

/// Every resource served, at `/api/v1/...` or `/apis/{group}/{version}/...`.
const RESOURCES: [ResourceType; 10] = [
    core("namespaces", "namespace", "Namespace", false),
    core("pods", "pod", "Pod", true),
    core("nodes", "node", "Node", false),
    core("services", "service", "Service", true),
    ResourceType {
        group: "networking.k8s.io",
        version: "v1",
        api_version: "networking.k8s.io/v1",
        plural: "networkpolicies",
        singular: "networkpolicy",
        kind: "NetworkPolicy",
        namespaced: true,
        crd: false,
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        api_version: "discovery.k8s.io/v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        crd: false,
    },
    tier_crd(
        "v1alpha1",
        "policy.networking.k8s.io/v1alpha1",
        "adminnetworkpolicies",
        "adminnetworkpolicy",
        "AdminNetworkPolicy",
    ),
    tier_crd(
        "v1alpha1",
        "policy.networking.k8s.io/v1alpha1",
        "baselineadminnetworkpolicies",
        "baselineadminnetworkpolicy",
        "BaselineAdminNetworkPolicy",
    ),
    tier_crd(
        "v1alpha2",
        "policy.networking.k8s.io/v1alpha2",
        "clusternetworkpolicies",
        "clusternetworkpolicy",
        "ClusterNetworkPolicy",
    ),
    // palisade's own kind (DNS-aware egress), a namespaced custom resource.
    ResourceType {
        group: "palisade.io",
        version: "v1alpha1",
        api_version: "palisade.io/v1alpha1",
        plural: "palisadenetworkpolicies",
        singular: "palisadenetworkpolicy",
        kind: "PalisadeNetworkPolicy",
        namespaced: true,
        crd: true,
    },
];

/// Index into [`RESOURCES`].
type Rt = usize;

fn resource_of(api_version: &str, kind: &str) -> Result<Rt, ApiError> {
    RESOURCES
        .iter()
        .position(|r| r.api_version == api_version && r.kind == kind)
        .ok_or_else(|| {
            let served: Vec<String> = RESOURCES
                .iter()
                .map(|r| format!("{} {}", r.api_version, r.kind))
                .collect();
            ApiError::bad_request(format!(
                "{api_version} {kind} is not served by the test double (it serves {})",
                served.join(", ")
            ))
        })
}

/// The default for watches that name no `timeoutSeconds` (the real server
/// picks 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// Watch and initial-event lines are sent in chunks of about this size.
const BATCH_BYTES: usize = 128 * 1024;
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// A request the double refuses, as the API's `Status` object says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status code.
    pub code: u16,
    /// The `Status` reason (`NotFound`, `Conflict`, `Expired`, ...).
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn unsupported(what: &str) -> Self {
        Self::bad_request(format!(
            "{what} is not supported by the test double (palisade tests/src/kubeapi.rs)"
        ))
    }

    fn not_found(rt: Rt, name: &str) -> Self {
        let plural = RESOURCES[rt].plural;
        Self::new(404, "NotFound", format!("{plural} \"{name}\" not found"))
    }

    fn conflict(rt: Rt, name: &str) -> Self {
        let plural = RESOURCES[rt].plural;
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {plural} \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            ),
        )
    }

    fn already_exists(rt: Rt, name: &str) -> Self {
        let plural = RESOURCES[rt].plural;
        Self::new(
            409,
            "AlreadyExists",
            format!("{plural} \"{name}\" already exists"),
        )
    }

    fn too_old(rv: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {rv} ({oldest})"),
        )
    }

    fn too_large(rv: u64, current: u64) -> Self {
        Self::new(
            504,
            "Timeout",
            format!("Too large resource version: {rv}, current: {current}"),
        )
    }

    fn status_json(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// (namespace, name); the namespace is empty for cluster-scoped objects.
type Key = (String, String);

#[derive(Debug)]
struct Stored {
    /// The object as served, with its metadata filled in.
    json: Bytes,
    rv: u64,
    uid: String,
    created: String,
}

/// One change in a resource's history.
#[derive(Debug)]
struct Change {
    rv: u64,
    key: Key,
    /// The watch event line, built once and shared by every watcher.
    line: Bytes,
    /// The object before the change: what a snapshot older than `rv` shows.
    before: Option<Bytes>,
}

#[derive(Debug, Default)]
struct Collection {
    objects: BTreeMap<Key, Stored>,
    history: VecDeque<Change>,
    /// Watches and snapshots from a resourceVersion below this get 410.
    compacted_rv: u64,
    /// The newest change no longer in `history`: a watcher behind it lagged.
    dropped_rv: u64,
}

impl Collection {
    fn changes_after(&self, rv: u64) -> impl Iterator<Item = &Change> {
        let start = self.history.partition_point(|c| c.rv <= rv);
        self.history.range(start..)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PutMode {
    Create,
    Replace,
    Upsert,
}

/// What a DELETE's `preconditions` require.
#[derive(Debug, Default)]
struct Preconditions {
    rv: Option<String>,
    uid: Option<String>,
}

/// One page of a list: the snapshot it was cut from and where it stopped.
#[derive(Debug)]
struct Page {
    rv: u64,
    items: Vec<Bytes>,
    next: Option<Key>,
}

#[derive(Debug)]
struct Store {
    rv: u64,
    seq: u64,
    uid_prefix: u32,
    history_limit: usize,
    collections: Vec<Collection>,
    /// Per resource, the resourceVersion of its latest change: wakes watchers.
    changed: Vec<watch::Sender<u64>>,
}

impl Store {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self {
            rv: 1,
            seq: 0,
            uid_prefix: nanos ^ std::process::id().rotate_left(16),
            history_limit: 10_000,
            collections: RESOURCES.iter().map(|_| Collection::default()).collect(),
            changed: RESOURCES.iter().map(|_| watch::Sender::new(1)).collect(),
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Checks and completes the identity of an incoming object: apiVersion,
    /// kind, name (or generateName) and namespace against the request path.
    fn identify(
        &mut self,
        rt: Rt,
        obj: &mut Value,
        path_ns: Option<&str>,
        path_name: Option<&str>,
    ) -> Result<Key, ApiError> {
        let r = &RESOURCES[rt];
        let map = obj
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("the object is not a JSON object"))?;
        for (field, want) in [("apiVersion", r.api_version), ("kind", r.kind)] {
            match map.get(field).and_then(Value::as_str) {
                None | Some("") => {}
                Some(got) if got == want => {}
                Some(got) => {
                    return Err(ApiError::bad_request(format!(
                        "{field} {got} does not match the request's {want}"
                    )));
                }
            }
            map.insert(field.into(), want.into());
        }
        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("metadata is not a JSON object"))?;
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            let prefix = meta
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if prefix.is_empty() {
                return Err(ApiError::bad_request(
                    "metadata.name or metadata.generateName is required",
                ));
            }
            name = format!("{prefix}{:05x}", self.next_seq() & 0xf_ffff);
            meta.insert("name".into(), name.clone().into());
        }
        if let Some(path_name) = path_name.filter(|p| *p != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name on the URL ({path_name})"
            )));
        }
        let ns = if r.namespaced {
            let body_ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let ns = match (body_ns, path_ns) {
                ("", None) => "default".to_owned(),
                ("", Some(p)) => p.to_owned(),
                (b, Some(p)) if b != p => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                (b, _) => b.to_owned(),
            };
            meta.insert("namespace".into(), ns.clone().into());
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        Ok((ns, name))
    }

    /// Creates or replaces an object; returns its stored JSON and resourceVersion.
    fn put(
        &mut self,
        rt: Rt,
        mut obj: Value,
        mode: PutMode,
        path_ns: Option<&str>,
        path_name: Option<&str>,
    ) -> Result<(Bytes, u64), ApiError> {
        let key = self.identify(rt, &mut obj, path_ns, path_name)?;
        let sent_rv = obj["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let existing = self.collections[rt].objects.get(&key);
        match (mode, existing) {
            (PutMode::Create, Some(_)) => return Err(ApiError::already_exists(rt, &key.1)),
            (PutMode::Create, None) if !sent_rv.is_empty() => {
                return Err(ApiError::bad_request(
                    "resourceVersion should not be set on objects to be created",
                ));
            }
            (PutMode::Replace, None) => return Err(ApiError::not_found(rt, &key.1)),
            (PutMode::Replace, Some(s)) if !sent_rv.is_empty() && sent_rv != s.rv.to_string() => {
                return Err(ApiError::conflict(rt, &key.1));
            }
            _ => {}
        }
        let (uid, created, before) = match existing {
            Some(s) => (s.uid.clone(), s.created.clone(), Some(s.json.clone())),
            None => {
                let seq = self.next_seq();
                let uid = format!("{:08x}-0000-4000-8000-{seq:012x}", self.uid_prefix);
                (uid, now_rfc3339(), None)
            }
        };
        self.rv += 1;
        let rv = self.rv;
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = rv.to_string().into();
        meta["uid"] = uid.clone().into();
        meta["creationTimestamp"] = created.clone().into();
        let json = to_bytes(&obj);
        let kind = if before.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let stored = Stored {
            json: json.clone(),
            rv,
            uid,
            created,
        };
        self.collections[rt].objects.insert(key.clone(), stored);
        self.record(
            rt,
            Change {
                rv,
                key,
                line: event_line(kind, &json),
                before,
            },
        );
        Ok((json, rv))
    }

    /// Deletes an object at once; returns its last state at the new resourceVersion.
    fn delete(&mut self, rt: Rt, key: &Key, pre: &Preconditions) -> Result<Bytes, ApiError> {
        let Some(stored) = self.collections[rt].objects.get(key) else {
            return Err(ApiError::not_found(rt, &key.1));
        };
        let stale_rv = pre
            .rv
            .as_ref()
            .is_some_and(|rv| *rv != stored.rv.to_string());
        let wrong_uid = pre.uid.as_ref().is_some_and(|uid| *uid != stored.uid);
        if stale_rv || wrong_uid {
            return Err(ApiError::conflict(rt, &key.1));
        }
        let mut last: Value =
            serde_json::from_slice(&stored.json).expect("stored objects are JSON");
        self.rv += 1;
        let rv = self.rv;
        last["metadata"]["resourceVersion"] = rv.to_string().into();
        let json = to_bytes(&last);
        let before = self.collections[rt].objects.remove(key).map(|s| s.json);
        self.record(
            rt,
            Change {
                rv,
                key: key.clone(),
                line: event_line("DELETED", &json),
                before,
            },
        );
        Ok(json)
    }

    fn record(&mut self, rt: Rt, change: Change) {
        let rv = change.rv;
        let col = &mut self.collections[rt];
        col.history.push_back(change);
        trim(col, self.history_limit);
        self.changed[rt].send_replace(rv);
    }

    /// Forgets every change so far: later reads from older versions get 410.
    fn compact(&mut self) {
        for col in &mut self.collections {
            if let Some(last) = col.history.back() {
                col.dropped_rv = col.dropped_rv.max(last.rv);
            }
            col.history.clear();
            col.compacted_rv = self.rv;
        }
    }

    fn set_history_limit(&mut self, limit: usize) {
        self.history_limit = limit;
        for col in &mut self.collections {
            trim(col, limit);
        }
    }

    /// Up to `limit` objects after `after`, as they were at resourceVersion
    /// `at` (None: now), in key order.
    fn page(
        &self,
        rt: Rt,
        ns: Option<&str>,
        at: Option<u64>,
        after: Option<&Key>,
        limit: Option<usize>,
    ) -> Result<Page, ApiError> {
        let col = &self.collections[rt];
        let rv = at.unwrap_or(self.rv);
        if rv < col.compacted_rv {
            return Err(ApiError::too_old(rv, col.compacted_rv));
        }
        let lower = match (after, ns) {
            (Some(k), _) => Bound::Excluded(k.clone()),
            (None, Some(ns)) => Bound::Included((ns.to_owned(), String::new())),
            (None, None) => Bound::Unbounded,
        };
        let in_range = |k: &Key| {
            let above = match &lower {
                Bound::Excluded(l) => k > l,
                Bound::Included(l) => k >= l,
                Bound::Unbounded => true,
            };
            above && ns.is_none_or(|ns| k.0 == ns)
        };
        // The state at `rv` of every key changed since: the state before its
        // first later change.
        let mut older: BTreeMap<&Key, Option<&Bytes>> = BTreeMap::new();
        for c in col.changes_after(rv).filter(|c| in_range(&c.key)) {
            older.entry(&c.key).or_insert(c.before.as_ref());
        }
        let current = col
            .objects
            .range((lower.clone(), Bound::Unbounded))
            .map(|(k, s)| (k, Some(&s.json)));
        let mut objects = Merge {
            current: current.peekable(),
            older: older.into_iter().peekable(),
        }
        .take_while(|(k, _)| ns.is_none_or(|ns| k.0 == ns))
        .filter_map(|(k, v)| Some((k, v?)));
        let limit = limit.unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last = None;
        for (k, v) in objects.by_ref().take(limit) {
            items.push(v.clone());
            last = Some(k);
        }
        let next = match objects.next() {
            Some(_) => last.cloned(),
            None => None,
        };
        Ok(Page { rv, items, next })
    }

    fn current_objects(&self, rt: Rt, ns: Option<&str>) -> Vec<Bytes> {
        self.collections[rt]
            .objects
            .iter()
            .filter(|(k, _)| ns.is_none_or(|ns| k.0 == ns))
            .map(|(_, s)| s.json.clone())
            .collect()
    }
}

fn trim(col: &mut Collection, limit: usize) {
    while col.history.len() > limit {
        if let Some(old) = col.history.pop_front() {
            col.compacted_rv = col.compacted_rv.max(old.rv);
            col.dropped_rv = col.dropped_rv.max(old.rv);
        }
    }
}

/// Merges the current objects with the older states that override them,
/// both in key order.
struct Merge<'a, C, O>
where
    C: Iterator<Item = (&'a Key, Option<&'a Bytes>)>,
    O: Iterator<Item = (&'a Key, Option<&'a Bytes>)>,
{
    current: std::iter::Peekable<C>,
    older: std::iter::Peekable<O>,
}

impl<'a, C, O> Iterator for Merge<'a, C, O>
where
    C: Iterator<Item = (&'a Key, Option<&'a Bytes>)>,
    O: Iterator<Item = (&'a Key, Option<&'a Bytes>)>,
{
    type Item = (&'a Key, Option<&'a Bytes>);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.current.peek(), self.older.peek()) {
            (Some(c), Some(o)) if c.0 == o.0 => {
                self.current.next();
                self.older.next()
            }
            (Some(c), Some(o)) if c.0 < o.0 => self.current.next(),
            (Some(_), None) => self.current.next(),
            _ => self.older.next(),
        }
    }
}

/// Server knobs a test may turn.
#[derive(Debug)]
struct Knobs {
    page_limit_max: Option<usize>,
    max_watch_timeout: Option<Duration>,
    bookmark_interval: Duration,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    refused: AtomicU64,
    writes: AtomicU64,
    open_watches: AtomicU64,
    lists: [AtomicU64; RESOURCES.len()],
    watches: [AtomicU64; RESOURCES.len()],
}

#[derive(Debug)]
struct Shared {
    addr: SocketAddr,
    store: Mutex<Store>,
    knobs: Mutex<Knobs>,
    paused: AtomicBool,
    /// Bumped to end every open watch stream abruptly.
    kill_watches: watch::Sender<u64>,
    /// Bumped to close every open connection (the listener went away).
    kill_connections: watch::Sender<u64>,
    counters: Counters,
    /// The custom resources' CRDs are installed (they are served).
    crds: AtomicBool,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn knobs(&self) -> MutexGuard<'_, Knobs> {
        self.knobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn drop_watches(&self) {
        self.kill_watches.send_modify(|n| *n += 1);
    }
}

/// Request counters, for tests that assert what a client did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Every request received, refused ones included.
    pub requests: u64,
    /// Requests refused (connection closed) while paused.
    pub refused: u64,
    /// Creates, replaces and deletes over HTTP.
    pub writes: u64,
    /// Watch streams open now.
    pub open_watches: u64,
    /// List requests (every page counts) per resource plural.
    pub lists: BTreeMap<String, u64>,
    /// Watch requests per resource plural.
    pub watches: BTreeMap<String, u64>,
}

impl Stats {
    /// List requests (pages) for a resource, e.g. `"pods"`.
    pub fn lists_of(&self, plural: &str) -> u64 {
        self.lists.get(plural).copied().unwrap_or(0)
    }

    /// Watch requests for a resource, e.g. `"pods"`.
    pub fn watches_of(&self, plural: &str) -> u64 {
        self.watches.get(plural).copied().unwrap_or(0)
    }
}

enum Command {
    StopListening(std_mpsc::Sender<()>),
    /// Bound on the server thread: it stays in the network namespace of
    /// the thread that called [`ApiServer::start`].
    Listen(std_mpsc::Sender<io::Result<()>>),
    Shutdown,
}

/// The API server double: serves on its own thread with its own tokio
/// runtime, and stops when dropped. That thread is spawned by
/// [`start`](Self::start), so it serves (and rebinds after a restart) in the
/// network namespace of the thread that called `start`.
///
/// Serves namespaces, pods, nodes and services (core v1),
/// `networking.k8s.io/v1` networkpolicies and `discovery.k8s.io/v1`
/// endpointslices: list, watch and get, cluster-wide and per namespace;
/// create (POST), replace (PUT) and delete over HTTP; and the control
/// endpoints `POST /_test/{drop-watches,compact,pause,resume}` and
/// `GET /_test/stats` for tests in another process.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `addr` (e.g. `"127.0.0.1:0"`) and serves until dropped.
    pub fn start(addr: &str) -> io::Result<ApiServer> {
        let addr: SocketAddr = addr.parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("listen address {addr}: {e}"),
            )
        })?;
        let listener = bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            addr,
            store: Mutex::new(Store::new()),
            knobs: Mutex::new(Knobs {
                page_limit_max: None,
                max_watch_timeout: None,
                bookmark_interval: Duration::from_secs(5),
            }),
            paused: AtomicBool::new(false),
            kill_watches: watch::Sender::new(0),
            kill_connections: watch::Sender::new(0),
            counters: Counters::default(),
            crds: AtomicBool::new(true),
        });
        let (commands, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let thread_shared = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("kube-apiserver-{}", addr.port()))
            .spawn(move || run(thread_shared, listener, rx, ready_tx))?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the kube API server thread exited before serving"))??;
        Ok(ApiServer {
            shared,
            commands,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://ADDR`
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A kubeconfig (YAML) for this server: plain HTTP, no credentials.
    pub fn kubeconfig(&self) -> String {
        kubeconfig(self.shared.addr)
    }

    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// Creates or replaces `obj` (whatever resourceVersion it carries) and
    /// returns its new resourceVersion. Namespaced objects without a
    /// namespace go to `default`. Panics if the kind is not served or the
    /// object has no name.
    pub fn apply<K: k8s_openapi::Resource + Serialize>(&self, obj: &K) -> String {
        let value = serde_json::to_value(obj).expect("k8s-openapi objects serialise to JSON");
        self.apply_value(value)
            .unwrap_or_else(|e| panic!("apply {} to the test API server: {e}", K::KIND))
    }

    /// [`apply`](Self::apply) for a JSON object naming its apiVersion and kind.
    pub fn apply_value(&self, obj: Value) -> Result<String, ApiError> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        let rt = resource_of(api_version, obj["kind"].as_str().unwrap_or_default())?;
        let (_, rv) = self
            .shared
            .store()
            .put(rt, obj, PutMode::Upsert, None, None)?;
        Ok(rv.to_string())
    }

    /// Applies every object of a multi-document YAML text (a `kind: List`
    /// document applies its items); returns how many objects it applied.
    pub fn load_yaml(&self, text: &str) -> Result<usize, ApiError> {
        let mut applied = 0;
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = Value::deserialize(doc)
                .map_err(|e| ApiError::bad_request(format!("parse a YAML document: {e}")))?;
            applied += self.apply_tree(value)?;
        }
        Ok(applied)
    }

    fn apply_tree(&self, value: Value) -> Result<usize, ApiError> {
        match value {
            Value::Null => Ok(0),
            Value::Object(mut map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
                let Some(Value::Array(items)) = map.remove("items") else {
                    return Ok(0);
                };
                items.into_iter().map(|item| self.apply_tree(item)).sum()
            }
            value => self.apply_value(value).map(|_| 1),
        }
    }

    /// Deletes an object at once (no graceful deletion); false if absent.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: Option<&str>, name: &str) -> bool {
        let rt = resource_of(K::API_VERSION, K::KIND).unwrap_or_else(|e| panic!("{e}"));
        let key = key_for(rt, namespace, name);
        self.shared
            .store()
            .delete(rt, &key, &Preconditions::default())
            .is_ok()
    }

    /// Deletes the object an (apiVersion, kind) document names, of any
    /// served kind (custom resources included); whether it existed.
    pub fn delete_named(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let rt = resource_of(api_version, kind).unwrap_or_else(|e| panic!("{e}"));
        let key = key_for(rt, namespace, name);
        self.shared
            .store()
            .delete(rt, &key, &Preconditions::default())
            .is_ok()
    }

    /// The object as the server stores it.
    pub fn get<K: k8s_openapi::Resource + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<K> {
        let rt = resource_of(K::API_VERSION, K::KIND).unwrap_or_else(|e| panic!("{e}"));
        let key = key_for(rt, namespace, name);
        let json = self.shared.store().collections[rt]
            .objects
            .get(&key)?
            .json
            .clone();
        Some(decode(&json))
    }

    /// Every object of a kind, in (namespace, name) order.
    pub fn list<K: k8s_openapi::Resource + DeserializeOwned>(&self) -> Vec<K> {
        let rt = resource_of(K::API_VERSION, K::KIND).unwrap_or_else(|e| panic!("{e}"));
        let objects = self.shared.store().current_objects(rt, None);
        objects.iter().map(|json| decode(json)).collect()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Ends every open watch stream abruptly (no final chunk), as a dropped
    /// connection or an apiserver restart would.
    pub fn drop_watches(&self) {
        self.shared.drop_watches();
    }

    /// Forgets every change so far: watches and continue tokens from older
    /// resourceVersions then get 410 Gone (reason `Expired`). Open watches
    /// that have sent everything go on; one still behind ends its stream.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// An outage: ends every watch stream abruptly and, until
    /// [`resume`](Self::resume), closes the connection of every request
    /// without an answer (except `/_test/` control requests).
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
        self.shared.drop_watches();
    }

    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    /// Closes the listening socket and every connection: clients get
    /// "connection refused" until [`start_listening`](Self::start_listening).
    /// Objects and resourceVersions are kept.
    /// Serve the custom resources (AdminNetworkPolicy,
    /// BaselineAdminNetworkPolicy, ClusterNetworkPolicy) or not, as if
    /// their CRDs were installed or deleted. Stored objects are kept; open
    /// watches on them end.
    pub fn set_crds_installed(&self, installed: bool) {
        self.shared.crds.store(installed, Ordering::SeqCst);
        self.shared.drop_watches();
    }

    pub fn stop_listening(&self) {
        let (ack, done) = std_mpsc::channel();
        if self.commands.send(Command::StopListening(ack)).is_ok() {
            // An error means the server thread is gone: nothing listens.
            let _ = done.recv();
        }
    }

    /// Listens again on the same address (in the network namespace the
    /// server was started in, whichever thread calls this).
    pub fn start_listening(&self) -> io::Result<()> {
        let (ack, done) = std_mpsc::channel();
        self.commands
            .send(Command::Listen(ack))
            .map_err(|_| io::Error::other("the kube API server thread is gone"))?;
        done.recv()
            .map_err(|_| io::Error::other("the kube API server thread is gone"))?
    }

    /// An apiserver restart in place: every connection closes, then the
    /// server listens again on the same port with the same objects,
    /// resourceVersions and history.
    pub fn restart(&self) -> io::Result<()> {
        self.stop_listening();
        self.start_listening()
    }

    /// Stops serving (as dropping does) and waits for the server thread.
    pub fn stop(self) {}

    /// Caps every list page at `max` items (None: no cap), even when the
    /// client asked for no limit; the rest comes with a continue token.
    pub fn set_page_limit_max(&self, max: Option<usize>) {
        self.shared.knobs().page_limit_max = max;
    }

    /// Ends watch streams after at most `max`, whatever `timeoutSeconds` asked.
    pub fn set_max_watch_timeout(&self, max: Option<Duration>) {
        self.shared.knobs().max_watch_timeout = max;
    }

    /// How often watches with `allowWatchBookmarks=true` get a bookmark
    /// (default 5 s). Applies to watches started afterwards.
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.knobs().bookmark_interval = every;
    }

    /// How many changes each resource keeps for watches to resume from
    /// (default 10,000); older ones are compacted away.
    pub fn set_history_limit(&self, changes: usize) {
        self.shared.store().set_history_limit(changes);
    }

    pub fn stats(&self) -> Stats {
        stats(&self.shared)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // An error means the server thread has already stopped.
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
            && !thread::panicking()
        {
            panic!("the kube API server thread panicked");
        }
    }
}

fn key_for(rt: Rt, namespace: Option<&str>, name: &str) -> Key {
    let r = &RESOURCES[rt];
    let ns = match (r.namespaced, namespace) {
        (true, Some(ns)) => ns.to_owned(),
        (true, None) => panic!("{} is namespaced: name its namespace", r.kind),
        (false, _) => String::new(),
    };
    (ns, name.to_owned())
}

fn decode<K: DeserializeOwned>(json: &[u8]) -> K {
    serde_json::from_slice(json).unwrap_or_else(|e| {
        panic!(
            "decode a stored object as {}: {e}",
            std::any::type_name::<K>()
        )
    })
}

fn stats(shared: &Shared) -> Stats {
    let c = &shared.counters;
    let per = |counts: &[AtomicU64]| {
        RESOURCES
            .iter()
            .zip(counts)
            .map(|(r, n)| (r.plural.to_owned(), n.load(Ordering::SeqCst)))
            .collect()
    };
    Stats {
        requests: c.requests.load(Ordering::SeqCst),
        refused: c.refused.load(Ordering::SeqCst),
        writes: c.writes.load(Ordering::SeqCst),
        open_watches: c.open_watches.load(Ordering::SeqCst),
        lists: per(&c.lists),
        watches: per(&c.watches),
    }
}

/// The kubeconfig text for a double at `addr`.
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: palisade-test
  cluster:
    server: http://{addr}
contexts:
- name: palisade-test
  context:
    cluster: palisade-test
    user: palisade-test
current-context: palisade-test
users:
- name: palisade-test
  user: {{}}
"
    )
}

fn bind(addr: SocketAddr) -> io::Result<StdTcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // A restart in place rebinds the port while old connections linger.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Timestamp::from_second(i64::try_from(now).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn to_bytes(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("JSON values serialise"))
}

fn event_line(kind: &str, obj: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(obj.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(obj);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

// ---- The server loop --------------------------------------------------------

type Body = UnsyncBoxBody<Bytes, io::Error>;

fn run(
    shared: Arc<Shared>,
    listener: StdTcpListener,
    commands: mpsc::UnboundedReceiver<Command>,
    ready: std_mpsc::Sender<io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            // An error means start() has stopped waiting: nobody to tell.
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        serve(shared, listener, commands).await;
    });
}

async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut listener = Some(listener);
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None | Some(Command::Shutdown) => return,
                Some(Command::StopListening(ack)) => {
                    listener = None;
                    shared.kill_connections.send_modify(|n| *n += 1);
                    // An error means the caller stopped waiting.
                    let _ = ack.send(());
                }
                Some(Command::Listen(ack)) => {
                    let result = bind(shared.addr)
                        .and_then(TcpListener::from_std)
                        .map(|l| listener = Some(l));
                    // An error means the caller stopped waiting.
                    let _ = ack.send(result);
                }
            },
            accepted = accept(listener.as_ref()) => match accepted {
                Ok(stream) => spawn_connection(&shared, stream),
                // Out of descriptors or a reset before accept: try again soon.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<tokio::net::TcpStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: tokio::net::TcpStream) {
    // Subscribed before the task runs, so a later stop_listening reaches it.
    let mut killed = shared.kill_connections.subscribe();
    let shared = shared.clone();
    tokio::spawn(async move {
        let service = service_fn(move |req| handle(shared.clone(), req));
        let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        tokio::select! {
            // A connection error is the client's problem, not the server's.
            _ = connection => {}
            _ = killed.changed() => {}
        }
    });
}

/// Serves one request; an `Err` makes hyper close the connection unanswered
/// (the outage of [`ApiServer::pause`]).
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    shared.counters.requests.fetch_add(1, Ordering::SeqCst);
    let control = req.uri().path().starts_with("/_test/");
    if !control && shared.paused.load(Ordering::SeqCst) {
        shared.counters.refused.fetch_add(1, Ordering::SeqCst);
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the test API server is paused",
        ));
    }
    Ok(route(&shared, req)
        .await
        .unwrap_or_else(|e| error_response(&e)))
}

// ---- Routing ------------------------------------------------------------------

/// What a resource path names.
#[derive(Debug)]
struct Target {
    rt: Rt,
    ns: Option<String>,
    name: Option<String>,
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (_, ["_test", action]) => control(shared, &method, action),
        (&Method::GET, ["version"]) => Ok(json_response(StatusCode::OK, &version())),
        (&Method::GET, ["healthz" | "livez" | "readyz"]) => Ok(text_response(StatusCode::OK, "ok")),
        (&Method::GET, ["api"]) => Ok(json_response(StatusCode::OK, &api_versions(shared.addr))),
        (&Method::GET, ["apis"]) => Ok(json_response(StatusCode::OK, &api_groups(crds(shared)))),
        (&Method::GET, ["apis", group]) => api_group(group, crds(shared)),
        (&Method::GET, ["api", version]) => resource_list("", version, crds(shared)),
        (&Method::GET, ["apis", group, version]) => resource_list(group, version, crds(shared)),
        _ => {
            let target = parse_target(&segments, crds(shared)).ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource ({path})"),
                )
            })?;
            let query = Query::parse(req.uri().query())?;
            resource_request(shared, req, method, target, query).await
        }
    }
}

fn crds(shared: &Shared) -> bool {
    shared.crds.load(Ordering::SeqCst)
}

/// Whether a resource is served now.
fn served(r: &ResourceType, crds: bool) -> bool {
    !r.crd || crds
}

fn parse_target(segments: &[&str], crds: bool) -> Option<Target> {
    let (group, version, rest) = match segments {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (ns, plural, name) = match rest {
        [plural] => (None, *plural, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    let rt = RESOURCES.iter().position(|r| {
        r.group == group && r.version == version && r.plural == plural && served(r, crds)
    })?;
    let namespaced = RESOURCES[rt].namespaced;
    if (!namespaced && ns.is_some()) || (namespaced && ns.is_none() && name.is_some()) {
        return None;
    }
    Some(Target {
        rt,
        ns: ns.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

async fn resource_request(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    method: Method,
    t: Target,
    q: Query,
) -> Result<Response<Body>, ApiError> {
    let ns = t.ns.as_deref();
    match (method, t.name.as_deref()) {
        (Method::GET, Some(name)) if !q.watch => get_object(shared, t.rt, ns, name),
        (Method::GET, Some(_)) => Err(ApiError::unsupported("watching one object by its path")),
        (Method::GET, None) if q.watch => watch_request(shared, t.rt, ns, &q),
        (Method::GET, None) => list_request(shared, t.rt, ns, &q),
        (Method::POST, None) if ns.is_some() || !RESOURCES[t.rt].namespaced => {
            let body = read_json(req).await?;
            q.check_not_dry_run()?;
            shared.counters.writes.fetch_add(1, Ordering::SeqCst);
            let (json, _) = shared.store().put(t.rt, body, PutMode::Create, ns, None)?;
            Ok(bytes_response(StatusCode::CREATED, json))
        }
        (Method::PUT, Some(name)) => {
            let body = read_json(req).await?;
            q.check_not_dry_run()?;
            shared.counters.writes.fetch_add(1, Ordering::SeqCst);
            let (json, _) = shared
                .store()
                .put(t.rt, body, PutMode::Replace, ns, Some(name))?;
            Ok(bytes_response(StatusCode::OK, json))
        }
        (Method::DELETE, Some(name)) => {
            let pre = delete_preconditions(req).await?;
            q.check_not_dry_run()?;
            shared.counters.writes.fetch_add(1, Ordering::SeqCst);
            let key = (ns.unwrap_or_default().to_owned(), name.to_owned());
            let json = shared.store().delete(t.rt, &key, &pre)?;
            Ok(bytes_response(StatusCode::OK, json))
        }
        (method, _) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} on this path is not supported by the test double"),
        )),
    }
}

fn control(
    shared: &Arc<Shared>,
    method: &Method,
    action: &str,
) -> Result<Response<Body>, ApiError> {
    match (method, action) {
        (&Method::GET, "stats") => {
            let stats = serde_json::to_value(stats(shared)).expect("stats serialise");
            return Ok(json_response(StatusCode::OK, &stats));
        }
        (&Method::POST, "drop-watches") => shared.drop_watches(),
        (&Method::POST, "compact") => shared.store().compact(),
        (&Method::POST, "pause") => {
            shared.paused.store(true, Ordering::SeqCst);
            shared.drop_watches();
        }
        (&Method::POST, "resume") => shared.paused.store(false, Ordering::SeqCst),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "control endpoints: POST /_test/{drop-watches,compact,pause,resume}, GET /_test/stats",
            ));
        }
    }
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200});
    Ok(json_response(StatusCode::OK, &status))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("read the request body: {e}")))?;
    Ok(body.to_bytes())
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not a JSON object: {e}")))
}

async fn delete_preconditions(req: Request<Incoming>) -> Result<Preconditions, ApiError> {
    let body = read_body(req).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Preconditions::default());
    }
    let options: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the DeleteOptions body is not JSON: {e}")))?;
    if options["dryRun"].as_array().is_some_and(|a| !a.is_empty()) {
        return Err(ApiError::unsupported("dryRun"));
    }
    let field = |name: &str| options["preconditions"][name].as_str().map(str::to_owned);
    Ok(Preconditions {
        rv: field("resourceVersion"),
        uid: field("uid"),
    })
}

fn get_object(
    shared: &Shared,
    rt: Rt,
    ns: Option<&str>,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let key = (ns.unwrap_or_default().to_owned(), name.to_owned());
    let json = shared.store().collections[rt]
        .objects
        .get(&key)
        .map(|s| s.json.clone())
        .ok_or_else(|| ApiError::not_found(rt, name))?;
    Ok(bytes_response(StatusCode::OK, json))
}

// ---- Query parameters ------------------------------------------------------

#[derive(Debug, Default)]
struct Query {
    watch: bool,
    resource_version: Option<String>,
    version_match: Option<String>,
    limit: Option<usize>,
    continue_token: Option<String>,
    timeout: Option<u64>,
    bookmarks: bool,
    send_initial_events: Option<bool>,
    dry_run: bool,
}

impl Query {
    fn parse(query: Option<&str>) -> Result<Query, ApiError> {
        let mut q = Query::default();
        for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let flag = || match v.as_ref() {
                "true" | "1" => Ok(true),
                "false" | "0" | "" => Ok(false),
                other => Err(ApiError::bad_request(format!(
                    "{k}={other} is not a boolean"
                ))),
            };
            let number = || {
                v.parse::<u64>()
                    .map_err(|_| ApiError::bad_request(format!("{k}={v} is not a number")))
            };
            match k.as_ref() {
                "watch" => q.watch = flag()?,
                "resourceVersion" if !v.is_empty() => q.resource_version = Some(v.into_owned()),
                "resourceVersionMatch" if !v.is_empty() => q.version_match = Some(v.into_owned()),
                "limit" => {
                    q.limit =
                        Some(usize::try_from(number()?).unwrap_or(usize::MAX)).filter(|l| *l > 0)
                }
                "continue" if !v.is_empty() => q.continue_token = Some(v.into_owned()),
                "timeoutSeconds" => q.timeout = Some(number()?).filter(|t| *t > 0),
                "allowWatchBookmarks" => q.bookmarks = flag()?,
                "sendInitialEvents" => q.send_initial_events = Some(flag()?),
                "dryRun" if !v.is_empty() => q.dry_run = true,
                "labelSelector" | "fieldSelector" if !v.is_empty() => {
                    return Err(ApiError::unsupported(&k));
                }
                _ => {}
            }
        }
        Ok(q)
    }

    fn check_not_dry_run(&self) -> Result<(), ApiError> {
        if self.dry_run {
            return Err(ApiError::unsupported("dryRun"));
        }
        Ok(())
    }

    /// The resourceVersion asked for, None for "unset" or "0".
    fn explicit_rv(&self) -> Result<Option<u64>, ApiError> {
        match self.resource_version.as_deref() {
            None | Some("0") => Ok(None),
            Some(rv) => rv
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("resourceVersion {rv} is not valid"))),
        }
    }
}

// ---- Lists ---------------------------------------------------------------------

fn list_request(
    shared: &Shared,
    rt: Rt,
    ns: Option<&str>,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    shared.counters.lists[rt].fetch_add(1, Ordering::SeqCst);
    let limit = match (q.limit, shared.knobs().page_limit_max) {
        (Some(l), Some(max)) => Some(l.min(max)),
        (l, max) => l.or(max),
    };
    let page = {
        let store = shared.store();
        match &q.continue_token {
            Some(token) => {
                if q.resource_version.is_some() {
                    return Err(ApiError::bad_request(
                        "specifying resource version is not allowed when using continue",
                    ));
                }
                let (rv, after) = decode_continue(token, ns)?;
                store.page(rt, ns, Some(rv), Some(&after), limit).map_err(|e| {
                    if e.code == 410 {
                        ApiError::new(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent \
                             list result. You can start a new list without the continue parameter.",
                        )
                    } else {
                        e
                    }
                })?
            }
            None => {
                let at = list_snapshot(&store, q)?;
                store.page(rt, ns, at, None, limit)?
            }
        }
    };
    let body = list_body(rt, &page);
    Ok(bytes_response(StatusCode::OK, body))
}

/// The snapshot a first list page reads: None for the current state.
fn list_snapshot(store: &Store, q: &Query) -> Result<Option<u64>, ApiError> {
    let rv = q.explicit_rv()?;
    if let Some(rv) = rv.filter(|rv| *rv > store.rv) {
        return Err(ApiError::too_large(rv, store.rv));
    }
    match (q.version_match.as_deref(), rv) {
        (Some(_), None) if q.resource_version.is_none() => Err(ApiError::bad_request(
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        )),
        (Some("Exact"), None) => Err(ApiError::bad_request(
            "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
        )),
        (Some("Exact"), Some(rv)) => Ok(Some(rv)),
        (None | Some("NotOlderThan"), _) => Ok(None),
        (Some(other), _) => Err(ApiError::bad_request(format!(
            "resourceVersionMatch {other} is not one of Exact, NotOlderThan"
        ))),
    }
}

fn list_body(rt: Rt, page: &Page) -> Bytes {
    let r = &RESOURCES[rt];
    let mut meta = json!({"resourceVersion": page.rv.to_string()});
    if let Some(next) = &page.next {
        meta["continue"] = encode_continue(page.rv, next).into();
    }
    let head = format!(
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{meta},\"items\":[",
        r.kind, r.api_version
    );
    let size = head.len() + page.items.iter().map(|i| i.len() + 1).sum::<usize>() + 2;
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(head.as_bytes());
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    Bytes::from(body)
}

/// A continue token: the snapshot's resourceVersion and the last key sent,
/// hex-encoded (opaque to clients, as the API requires).
fn encode_continue(rv: u64, last: &Key) -> String {
    format!("{rv}\n{}\n{}", last.0, last.1)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str, ns: Option<&str>) -> Result<(u64, Key), ApiError> {
    let invalid = || ApiError::bad_request(format!("continue key is not valid: {token}"));
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(invalid)?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.splitn(3, '\n');
    let (Some(rv), Some(key_ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid());
    };
    let rv = rv.parse().map_err(|_| invalid())?;
    if ns.is_some_and(|ns| ns != key_ns) {
        return Err(invalid());
    }
    Ok((rv, (key_ns.to_owned(), name.to_owned())))
}

// ---- Watches -------------------------------------------------------------------

fn watch_request(
    shared: &Arc<Shared>,
    rt: Rt,
    ns: Option<&str>,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    shared.counters.watches[rt].fetch_add(1, Ordering::SeqCst);
    let streaming = q.send_initial_events == Some(true);
    if streaming && (!q.bookmarks || q.version_match.as_deref() != Some("NotOlderThan")) {
        return Err(ApiError::bad_request(
            "sendInitialEvents requires allowWatchBookmarks=true and resourceVersionMatch=NotOlderThan",
        ));
    }
    let (bookmark_interval, max_timeout) = {
        let knobs = shared.knobs();
        (knobs.bookmark_interval, knobs.max_watch_timeout)
    };
    let mut timeout = q.timeout.map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    if let Some(max) = max_timeout {
        timeout = timeout.min(max);
    }
    let now = Instant::now();
    let mut w = Watch {
        shared: shared.clone(),
        rt,
        namespace: ns.map(str::to_owned),
        cursor: 0,
        initial: Vec::new().into_iter(),
        queued: None,
        end_after_queued: false,
        finished: false,
        deadline: now + timeout,
        bookmarks: q.bookmarks.then_some(bookmark_interval),
        next_bookmark: now + bookmark_interval,
        changes: shared.store().changed[rt].subscribe(),
        kill: shared.kill_watches.subscribe(),
        _open: OpenWatch::new(shared.clone()),
    };
    w.start(q, streaming)?;
    let stream = futures::stream::unfold(w, Watch::next_frame);
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("a valid response"))
}

/// The error that makes hyper cut a watch's connection without the final
/// chunk, as a dropped connection does.
fn watch_dropped() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "watch dropped by the test double",
    )
}

/// Counts an open watch stream while it lives.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: Arc<Shared>) -> Self {
        shared.counters.open_watches.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.counters.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One watch stream: initial events, then changes from the resource's
/// history after `cursor`, as newline-delimited JSON.
struct Watch {
    shared: Arc<Shared>,
    rt: Rt,
    namespace: Option<String>,
    /// Every change up to this resourceVersion has been sent (or skipped).
    cursor: u64,
    /// Objects still to send as synthetic ADDED events.
    initial: std::vec::IntoIter<Bytes>,
    /// A line to send after the initial events.
    queued: Option<Bytes>,
    end_after_queued: bool,
    finished: bool,
    deadline: Instant,
    bookmarks: Option<Duration>,
    next_bookmark: Instant,
    changes: watch::Receiver<u64>,
    kill: watch::Receiver<u64>,
    _open: OpenWatch,
}

enum Pull {
    Data(Bytes),
    Idle,
    Lagged,
}

impl Watch {
    /// Where the stream starts, as the API documents: from an explicit
    /// resourceVersion (410 as an ERROR event if compacted), or with
    /// synthetic ADDED events for the current objects.
    fn start(&mut self, q: &Query, streaming: bool) -> Result<(), ApiError> {
        let rv = q.explicit_rv()?;
        let store = self.shared.store();
        let col = &store.collections[self.rt];
        if let Some(rv) = rv.filter(|rv| *rv > store.rv) {
            return Err(ApiError::too_large(rv, store.rv));
        }
        let initial_events = streaming || (rv.is_none() && q.send_initial_events != Some(false));
        match rv {
            Some(rv) if !streaming && rv < col.compacted_rv => {
                let status = ApiError::too_old(rv, col.compacted_rv).status_json();
                self.queued = Some(event_line("ERROR", &to_bytes(&status)));
                self.end_after_queued = true;
                return Ok(());
            }
            Some(rv) if !streaming => self.cursor = rv,
            _ => self.cursor = store.rv,
        }
        if initial_events {
            self.initial = store
                .current_objects(self.rt, self.namespace.as_deref())
                .into_iter();
        }
        if streaming {
            self.queued = Some(self.bookmark_line(self.cursor, true));
        }
        Ok(())
    }

    async fn next_frame(mut self) -> Option<(io::Result<Frame<Bytes>>, Self)> {
        loop {
            if self.finished {
                return None;
            }
            if self.kill.has_changed().unwrap_or(true) {
                self.finished = true;
                return Some((Err(watch_dropped()), self));
            }
            if let Some(data) = self.initial_batch() {
                return Some((Ok(Frame::data(data)), self));
            }
            if let Some(line) = self.queued.take() {
                self.finished = self.end_after_queued;
                return Some((Ok(Frame::data(line)), self));
            }
            if Instant::now() >= self.deadline {
                return None;
            }
            match self.pull() {
                Pull::Data(data) => return Some((Ok(Frame::data(data)), self)),
                Pull::Lagged => return None,
                Pull::Idle => {}
            }
            tokio::select! {
                biased;
                _ = self.kill.changed() => {
                    self.finished = true;
                    return Some((Err(watch_dropped()), self));
                }
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = tokio::time::sleep_until(self.deadline) => return None,
                () = tokio::time::sleep_until(self.next_bookmark), if self.bookmarks.is_some() => {
                    if let Some(line) = self.bookmark() {
                        return Some((Ok(Frame::data(line)), self));
                    }
                }
            }
        }
    }

    fn initial_batch(&mut self) -> Option<Bytes> {
        let mut batch = Vec::new();
        for obj in self.initial.by_ref() {
            batch.extend_from_slice(&event_line("ADDED", &obj));
            if batch.len() >= BATCH_BYTES {
                break;
            }
        }
        (!batch.is_empty()).then(|| Bytes::from(batch))
    }

    /// The changes after the cursor, up to a batch.
    fn pull(&mut self) -> Pull {
        let store = self.shared.store();
        // Marked seen before reading, under the lock writers hold: no
        // change can slip between the read and the next wait.
        self.changes.borrow_and_update();
        let col = &store.collections[self.rt];
        if col.dropped_rv > self.cursor {
            return Pull::Lagged;
        }
        let mut lines = Vec::new();
        let mut size = 0;
        for c in col.changes_after(self.cursor) {
            self.cursor = c.rv;
            if self.namespace.as_deref().is_none_or(|ns| c.key.0 == ns) {
                size += c.line.len();
                lines.push(c.line.clone());
                if size >= BATCH_BYTES {
                    break;
                }
            }
        }
        drop(store);
        match lines.len() {
            0 => Pull::Idle,
            1 => Pull::Data(lines.swap_remove(0)),
            _ => Pull::Data(Bytes::from(lines.concat())),
        }
    }

    /// A bookmark at the current resourceVersion if every change of this
    /// resource has been sent (else the changes go first).
    fn bookmark(&mut self) -> Option<Bytes> {
        let every = self.bookmarks?;
        self.next_bookmark = Instant::now() + every;
        let store = self.shared.store();
        if store.collections[self.rt]
            .changes_after(self.cursor)
            .next()
            .is_some()
        {
            return None;
        }
        self.cursor = store.rv;
        drop(store);
        Some(self.bookmark_line(self.cursor, false))
    }

    fn bookmark_line(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let r = &RESOURCES[self.rt];
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            meta["annotations"] = json!({INITIAL_EVENTS_END: "true"});
        }
        let obj = json!({"kind": r.kind, "apiVersion": r.api_version, "metadata": meta});
        event_line("BOOKMARK", &to_bytes(&obj))
    }
}

// ---- Responses and discovery ---------------------------------------------------

fn bytes_response(status: StatusCode, body: Bytes) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("a valid response")
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    bytes_response(status, to_bytes(body))
}

fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain")
        .body(
            Full::new(Bytes::from_static(text.as_bytes()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("a valid response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &e.status_json())
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-palisade-test-double",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "",
        "compiler": "",
        "platform": "linux/amd64",
    })
}

fn api_versions(addr: SocketAddr) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}],
    })
}

fn group_json(group: &str, crds: bool) -> Value {
    let mut versions: Vec<&str> = RESOURCES
        .iter()
        .filter(|r| r.group == group && served(r, crds))
        .map(|r| r.version)
        .collect();
    versions.dedup();
    // The newest first, as the real server prefers it.
    versions.reverse();
    let versions: Vec<Value> = versions
        .into_iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"name": group, "versions": versions, "preferredVersion": versions[0]})
}

fn api_groups(crds: bool) -> Value {
    let mut groups: Vec<&str> = RESOURCES
        .iter()
        .filter(|r| served(r, crds))
        .map(|r| r.group)
        .filter(|g| !g.is_empty())
        .collect();
    groups.dedup();
    let groups: Vec<Value> = groups.into_iter().map(|g| group_json(g, crds)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn api_group(group: &str, crds: bool) -> Result<Response<Body>, ApiError> {
    if group.is_empty()
        || !RESOURCES
            .iter()
            .any(|r| r.group == group && served(r, crds))
    {
        return Err(ApiError::new(
            404,
            "NotFound",
            format!("no API group {group}"),
        ));
    }
    let mut body = group_json(group, crds);
    body["kind"] = "APIGroup".into();
    body["apiVersion"] = "v1".into();
    Ok(json_response(StatusCode::OK, &body))
}

fn resource_list(group: &str, version: &str, crds: bool) -> Result<Response<Body>, ApiError> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version && served(r, crds))
        .map(|r| {
            json!({
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["create", "delete", "get", "list", "update", "watch"],
            })
        })
        .collect();
    if resources.is_empty() {
        return Err(ApiError::new(
            404,
            "NotFound",
            format!("no API group version {group}/{version}"),
        ));
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": ns, "name": name}})
    }

    fn names(page: &Page) -> Vec<String> {
        page.items
            .iter()
            .map(|i| {
                let v: Value = serde_json::from_slice(i).expect("json");
                v["metadata"]["name"].as_str().expect("name").to_owned()
            })
            .collect()
    }

    #[test]
    fn a_snapshot_page_shows_objects_as_they_were() {
        let mut s = Store::new();
        for name in ["a", "b", "c", "d"] {
            s.put(1, pod("ns", name), PutMode::Upsert, None, None)
                .expect("put");
        }
        let first = s.page(1, None, None, None, Some(2)).expect("page");
        assert_eq!(names(&first), ["a", "b"]);
        let after = first.next.clone().expect("a continue key");
        s.delete(1, &("ns".into(), "c".into()), &Preconditions::default())
            .expect("delete");
        s.put(1, pod("ns", "bb"), PutMode::Upsert, None, None)
            .expect("put");
        let rest = s
            .page(1, None, Some(first.rv), Some(&after), None)
            .expect("page");
        assert_eq!(
            names(&rest),
            ["c", "d"],
            "the snapshot keeps c and lacks bb"
        );
        assert!(rest.next.is_none());
        let now = s.page(1, None, None, None, None).expect("page");
        assert_eq!(names(&now), ["a", "b", "bb", "d"]);
        s.compact();
        let err = s
            .page(1, None, Some(first.rv), Some(&after), None)
            .expect_err("410");
        assert_eq!((err.code, err.reason), (410, "Expired"));
    }

    #[test]
    fn continue_tokens_round_trip() {
        let key = ("kube-system".to_owned(), "coredns-1".to_owned());
        let token = encode_continue(42, &key);
        assert_eq!(
            decode_continue(&token, None).expect("decode"),
            (42, key.clone())
        );
        assert!(decode_continue(&token, Some("default")).is_err());
        assert!(decode_continue("zz", None).is_err());
    }

    #[test]
    fn paths_name_resources_with_their_scope() {
        let t = parse_target(&["api", "v1", "namespaces", "x"], true).expect("namespace x");
        assert_eq!(
            (RESOURCES[t.rt].plural, t.ns, t.name.as_deref()),
            ("namespaces", None, Some("x"))
        );
        let t = parse_target(
            &[
                "apis",
                "networking.k8s.io",
                "v1",
                "namespaces",
                "x",
                "networkpolicies",
            ],
            true,
        )
        .expect("policies in x");
        assert_eq!(
            (RESOURCES[t.rt].plural, t.ns.as_deref()),
            ("networkpolicies", Some("x"))
        );
        assert!(parse_target(&["api", "v1", "namespaces", "x", "nodes"], true).is_none());
        assert!(parse_target(&["api", "v1", "pods", "p"], true).is_none());
        assert!(
            parse_target(
                &["api", "v1", "namespaces", "x", "pods", "p", "status"],
                true
            )
            .is_none()
        );
        let anp = [
            "apis",
            "policy.networking.k8s.io",
            "v1alpha1",
            "adminnetworkpolicies",
        ];
        assert!(parse_target(&anp, true).is_some(), "served with its CRD");
        assert!(
            parse_target(&anp, false).is_none(),
            "not served without its CRD"
        );
    }
}
