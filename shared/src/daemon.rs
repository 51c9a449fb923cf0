//! The node daemon's socket, and the one way every binary reaches the
//! node: [`Control`] sends writes to the daemon when one runs, and runs the
//! same engine in-process against the same store when none does. Nothing
//! needs the daemon for correctness; with it, the engine stays in memory
//! between events instead of being rebuilt from the store for each.
//!
//! The socket (`palisade.sock` in the state directory unless set) is
//! root-only: the directory is 0700 and the socket 0600. One request per
//! connection, one JSON line each way.

use std::{
    collections::BTreeSet,
    fs,
    io::{self, BufRead, BufReader, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{
    abi::SvcKey,
    cluster::{ApiChanges, ApiReport, ClusterStatus},
    dataplane::{
        AttachMode, Dataplane, SyncReport,
        kernel::KernelDataplane,
        service::{Frontends, HookChange, HookInfo, ServiceHook},
    },
    node::{
        AddOutcome, DEFAULT_LOCK_TIMEOUT, EndpointRef, ErrorKind, NewEndpoint, Node, NodeError,
        ObjectsReport, Registered, detach_endpoints, register_waiting,
    },
    policy::{Labels, Mode, Object, ObjectRef, Source, parse_sources},
    store::{Endpoint, PendingIdentity, Store},
};

/// The socket's file name in the state directory.
pub const SOCKET_FILE: &str = "palisade.sock";
/// Set to 1 to make every command fail unless the daemon answers.
pub const REQUIRE_DAEMON_ENV: &str = "PALISADE_REQUIRE_DAEMON";
/// How long a client waits for the daemon's answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the daemon listens for a state directory, unless configured.
pub fn default_socket(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    /// Who are you (and are you alive)?
    Status,
    /// Kubernetes objects as read from files; the daemon parses and
    /// validates them.
    Apply {
        sources: Vec<Source>,
    },
    Delete {
        refs: Vec<ObjectRef>,
    },
    #[serde(rename_all = "camelCase")]
    AddEndpoint {
        endpoint: NewEndpoint,
        attach_mode: AttachMode,
    },
    RemoveEndpoints {
        endpoints: Vec<EndpointRef>,
    },
    #[serde(rename_all = "camelCase")]
    RemoveContainer {
        container_id: String,
    },
    SetIdentity {
        key: String,
        namespace: String,
        name: String,
        labels: Labels,
    },
    RecordPending {
        inode: u64,
        pending: PendingIdentity,
    },
    SetMode {
        namespace: Option<String>,
        mode: Option<Mode>,
    },
    Sync,
}

/// What a client writes (borrowing what it sends).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvelopeRef<'a> {
    bpf_root: &'a Path,
    request: &'a Request,
}

/// What the daemon reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    /// The datapath the client means; the daemon refuses another.
    bpf_root: PathBuf,
    request: Request,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
enum Response {
    Ok { value: Value },
    Err { kind: ErrorKind, message: String },
}

/// What the daemon says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonStatus {
    pub pid: u32,
    pub bpf_root: PathBuf,
    pub state_dir: PathBuf,
    /// Requests answered since it started.
    pub requests: u64,
    /// Store generation its engine reflects.
    pub generation: u64,
    /// Kubernetes cluster mode: the API connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// A connection to a running daemon.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    bpf_root: PathBuf,
}

impl Client {
    /// `None` when no daemon listens there.
    pub fn connect(socket: &Path, bpf_root: &Path) -> Option<Self> {
        UnixStream::connect(socket).ok()?;
        Some(Self {
            socket: socket.to_owned(),
            bpf_root: bpf_root.to_owned(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn call<T: DeserializeOwned>(&self, request: Request) -> Result<T, NodeError> {
        self.send(&request)
    }

    /// Send one request. A daemon that cannot be reached at all (it
    /// stopped since [`Client::connect`]) is `ErrorKind::Unreachable`:
    /// nothing was sent. One that does not answer in time is `Busy`.
    fn send<T: DeserializeOwned>(&self, request: &Request) -> Result<T, NodeError> {
        let err = |kind: ErrorKind, message: String| NodeError::Remote { kind, message };
        let socket = self.socket.display().to_string();
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| {
            err(
                ErrorKind::Unreachable,
                format!("the palisade daemon at {socket} does not answer: {e}"),
            )
        })?;
        let io = |e: io::Error| {
            let kind = if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                ErrorKind::Busy
            } else {
                ErrorKind::Other
            };
            err(
                kind,
                format!(
                    "the palisade daemon at {socket} did not answer: {e} (is it running? `systemctl status palisade`)"
                ),
            )
        };
        stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
        let mut line = serde_json::to_vec(&EnvelopeRef {
            bpf_root: &self.bpf_root,
            request,
        })
        .map_err(|e| err(ErrorKind::Other, format!("encode the request: {e}")))?;
        line.push(b'\n');
        stream.write_all(&line).map_err(io)?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).map_err(io)?;
        if answer.is_empty() {
            return Err(err(
                ErrorKind::Other,
                format!(
                    "the palisade daemon at {socket} closed the connection without an answer (did it stop?)"
                ),
            ));
        }
        let not_understood = |e: serde_json::Error| {
            err(
                ErrorKind::Other,
                format!("the daemon's answer is not understood: {e}"),
            )
        };
        match serde_json::from_str(&answer).map_err(not_understood)? {
            Response::Ok { value } => serde_json::from_value(value).map_err(not_understood),
            Response::Err { kind, message } => Err(NodeError::Remote { kind, message }),
        }
    }
}

/// Writes a binary performs on the node, whichever way it runs.
pub trait NodeOps {
    fn apply(&mut self, objects: Vec<Object>) -> Result<ObjectsReport, NodeError>;
    /// Parse and validate objects and apply them, where the work is done
    /// (with a daemon, there).
    fn apply_sources(&mut self, sources: Vec<Source>) -> Result<ObjectsReport, NodeError> {
        let objects = parse_sources(&sources).map_err(|e| NodeError::Invalid(e.to_string()))?;
        self.apply(objects)
    }
    fn delete(&mut self, refs: Vec<ObjectRef>) -> Result<ObjectsReport, NodeError>;
    fn add_endpoint(&mut self, new: NewEndpoint) -> Result<AddOutcome, NodeError>;
    fn remove_endpoints(&mut self, which: &[EndpointRef]) -> Result<Vec<Endpoint>, NodeError>;
    fn remove_container(&mut self, container_id: &str) -> Result<Vec<Endpoint>, NodeError>;
    fn set_identity(
        &mut self,
        key: &str,
        namespace: &str,
        name: &str,
        labels: &Labels,
    ) -> Result<(), NodeError>;
    fn record_pending(&mut self, inode: u64, pending: PendingIdentity) -> Result<(), NodeError>;
    fn set_mode(
        &mut self,
        namespace: Option<&str>,
        mode: Option<Mode>,
    ) -> Result<SyncReport, NodeError>;
    fn resync(&mut self) -> Result<(SyncReport, Vec<String>), NodeError>;
    /// Whether the endpoint `key` exists on this veth with its programs
    /// attached (reads only).
    fn is_enforced(&mut self, key: &str, ifindex: u32) -> Result<bool, NodeError>;

    fn remove_endpoint(&mut self, key: &str) -> Result<Option<Endpoint>, NodeError> {
        Ok(self
            .remove_endpoints(&[EndpointRef {
                key: key.to_owned(),
                id: None,
            }])?
            .into_iter()
            .next())
    }
}

impl<D: Dataplane> NodeOps for Node<D> {
    fn apply(&mut self, objects: Vec<Object>) -> Result<ObjectsReport, NodeError> {
        Node::apply(self, objects)
    }
    fn delete(&mut self, refs: Vec<ObjectRef>) -> Result<ObjectsReport, NodeError> {
        Node::delete(self, refs)
    }
    fn add_endpoint(&mut self, new: NewEndpoint) -> Result<AddOutcome, NodeError> {
        Node::add_endpoint(self, new)
    }
    fn remove_endpoints(&mut self, which: &[EndpointRef]) -> Result<Vec<Endpoint>, NodeError> {
        Node::remove_endpoints(self, which)
    }
    fn remove_container(&mut self, container_id: &str) -> Result<Vec<Endpoint>, NodeError> {
        Node::remove_container(self, container_id)
    }
    fn set_identity(
        &mut self,
        key: &str,
        namespace: &str,
        name: &str,
        labels: &Labels,
    ) -> Result<(), NodeError> {
        Node::set_identity(self, key, namespace, name, labels)
    }
    fn record_pending(&mut self, inode: u64, pending: PendingIdentity) -> Result<(), NodeError> {
        Node::record_pending(self, inode, pending)
    }
    fn set_mode(
        &mut self,
        namespace: Option<&str>,
        mode: Option<Mode>,
    ) -> Result<SyncReport, NodeError> {
        Node::set_mode(self, namespace, mode)
    }
    fn resync(&mut self) -> Result<(SyncReport, Vec<String>), NodeError> {
        Node::resync(self)
    }
    fn is_enforced(&mut self, key: &str, ifindex: u32) -> Result<bool, NodeError> {
        Node::is_enforced(self, key, ifindex)
    }
}

/// Where a binary finds the node.
#[derive(Debug, Clone)]
pub struct Paths {
    pub state_dir: PathBuf,
    pub bpf_root: PathBuf,
    /// The daemon's socket (default: in the state directory).
    pub socket: Option<PathBuf>,
    pub attach_mode: AttachMode,
    /// Map capacities given by the configuration (conflist `mapSizes`):
    /// used when the maps are created, checked against pinned ones.
    pub map_sizes: Option<crate::dataplane::MapSizes>,
}

/// The node as a binary sees it: through the daemon when one runs, else
/// in-process. Reads are always local (the store allows readers while a
/// writer works).
#[derive(Debug)]
pub struct Control {
    pub node: Node<KernelDataplane>,
    daemon: Option<Client>,
    /// Fail rather than work without the daemon.
    require: bool,
    attach_mode: AttachMode,
}

impl Control {
    pub fn open(paths: &Paths) -> Result<Self, NodeError> {
        let socket = paths
            .socket
            .clone()
            .unwrap_or_else(|| default_socket(&paths.state_dir));
        let daemon = Client::connect(&socket, &paths.bpf_root);
        let require = std::env::var(REQUIRE_DAEMON_ENV).is_ok_and(|v| v == "1");
        if daemon.is_none() && require {
            return Err(no_daemon(&socket));
        }
        Ok(Self {
            node: Node::new(
                Store::new(&paths.state_dir),
                KernelDataplane::new(&paths.bpf_root, paths.attach_mode)
                    .with_sizes(paths.map_sizes.clone()),
            ),
            daemon,
            require,
            attach_mode: paths.attach_mode,
        })
    }

    /// The daemon this talks to, if any.
    pub fn daemon(&self) -> Option<&Client> {
        self.daemon.as_ref()
    }

    /// Send `request` to the daemon; without one (or when it stopped since
    /// it was found: nothing was sent then), do the work here.
    fn via<T: DeserializeOwned>(
        &mut self,
        request: Request,
        local: impl FnOnce(&mut Node<KernelDataplane>, Request) -> Result<T, NodeError>,
    ) -> Result<T, NodeError> {
        if let Some(d) = &self.daemon {
            match d.send(&request) {
                Err(NodeError::Remote {
                    kind: ErrorKind::Unreachable,
                    ..
                }) if !self.require => {
                    tracing::info!("the daemon stopped; doing the work in this process");
                    self.daemon = None;
                }
                Err(NodeError::Remote {
                    kind: ErrorKind::Unreachable,
                    ..
                }) => return Err(no_daemon(d.socket())),
                answered => return answered,
            }
        }
        local(&mut self.node, request)
    }
}

fn no_daemon(socket: &Path) -> NodeError {
    NodeError::Remote {
        kind: ErrorKind::Unreachable,
        message: format!(
            "no palisade daemon answers at {} and {REQUIRE_DAEMON_ENV}=1 is set; start it (`palisadectl daemon`, or `systemctl start palisade`)",
            socket.display()
        ),
    }
}

/// A request's payload taken back for in-process work.
macro_rules! take {
    ($request:expr, $variant:path { $($field:ident),* }) => {
        match $request {
            $variant { $($field),* } => ($($field),*),
            _ => unreachable!("built just above"),
        }
    };
}

impl NodeOps for Control {
    fn apply(&mut self, objects: Vec<Object>) -> Result<ObjectsReport, NodeError> {
        if self.daemon.is_none() {
            return self.node.apply(objects);
        }
        // The daemon validates what it receives: send the objects as they
        // were written (JSON is YAML).
        let sources = objects
            .iter()
            .map(|o| {
                Ok(Source {
                    name: "<request>".into(),
                    text: o.to_json()?.to_string(),
                })
            })
            .collect::<Result<_, serde_json::Error>>()
            .map_err(|e| NodeError::Invalid(format!("encode objects: {e}")))?;
        self.via(Request::Apply { sources }, |n, _| n.apply(objects))
    }
    fn apply_sources(&mut self, sources: Vec<Source>) -> Result<ObjectsReport, NodeError> {
        self.via(Request::Apply { sources }, |n, r| {
            let sources = take!(r, Request::Apply { sources });
            n.apply(parse_sources(&sources).map_err(|e| NodeError::Invalid(e.to_string()))?)
        })
    }
    fn delete(&mut self, refs: Vec<ObjectRef>) -> Result<ObjectsReport, NodeError> {
        self.via(Request::Delete { refs }, |n, r| {
            n.delete(take!(r, Request::Delete { refs }))
        })
    }
    fn add_endpoint(&mut self, endpoint: NewEndpoint) -> Result<AddOutcome, NodeError> {
        let attach_mode = self.attach_mode;
        self.via(
            Request::AddEndpoint {
                endpoint,
                attach_mode,
            },
            |n, r| {
                let (endpoint, _) = take!(
                    r,
                    Request::AddEndpoint {
                        endpoint,
                        attach_mode
                    }
                );
                n.add_endpoint(endpoint)
            },
        )
    }
    fn remove_endpoints(&mut self, which: &[EndpointRef]) -> Result<Vec<Endpoint>, NodeError> {
        self.via(
            Request::RemoveEndpoints {
                endpoints: which.to_vec(),
            },
            |n, _| n.remove_endpoints(which),
        )
    }
    fn remove_container(&mut self, container_id: &str) -> Result<Vec<Endpoint>, NodeError> {
        self.via(
            Request::RemoveContainer {
                container_id: container_id.to_owned(),
            },
            |n, _| n.remove_container(container_id),
        )
    }
    fn set_identity(
        &mut self,
        key: &str,
        namespace: &str,
        name: &str,
        labels: &Labels,
    ) -> Result<(), NodeError> {
        self.via(
            Request::SetIdentity {
                key: key.to_owned(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                labels: labels.clone(),
            },
            |n, _| n.set_identity(key, namespace, name, labels),
        )
    }
    fn record_pending(&mut self, inode: u64, pending: PendingIdentity) -> Result<(), NodeError> {
        self.via(Request::RecordPending { inode, pending }, |n, r| {
            let (inode, pending) = take!(r, Request::RecordPending { inode, pending });
            n.record_pending(inode, pending)
        })
    }
    fn set_mode(
        &mut self,
        namespace: Option<&str>,
        mode: Option<Mode>,
    ) -> Result<SyncReport, NodeError> {
        self.via(
            Request::SetMode {
                namespace: namespace.map(str::to_owned),
                mode,
            },
            |n, _| n.set_mode(namespace, mode),
        )
    }
    fn resync(&mut self) -> Result<(SyncReport, Vec<String>), NodeError> {
        self.via(Request::Sync, |n, _| n.resync())
    }
    fn is_enforced(&mut self, key: &str, ifindex: u32) -> Result<bool, NodeError> {
        self.node.is_enforced(key, ifindex)
    }
}

/// The daemon's side: the node (one writer at a time) and what it needs
/// to attach programs outside the node's lock.
#[derive(Debug)]
pub struct Server {
    node: Mutex<Node<KernelDataplane>>,
    /// Dataplane handles for attaching and detaching outside the node's
    /// lock (each opened once, then reused).
    handles: Mutex<Vec<KernelDataplane>>,
    bpf_root: PathBuf,
    state_dir: PathBuf,
    requests: AtomicU64,
    cluster: Mutex<Option<ClusterStatus>>,
    /// `pal_svc`, opened when cluster mode first writes it.
    frontends: Mutex<Option<Frontends>>,
    /// Map capacities the daemon was given (`--map-size`).
    map_sizes: Option<crate::dataplane::MapSizes>,
}

impl Server {
    /// Build the engine from the store and make the maps match it (the
    /// start of a daemon: nothing changes when they already match).
    pub fn start(
        state_dir: &Path,
        bpf_root: &Path,
        map_sizes: Option<crate::dataplane::MapSizes>,
    ) -> Result<(Arc<Self>, SyncReport), NodeError> {
        let mut node = Node::new(
            Store::new(state_dir),
            KernelDataplane::new(bpf_root, AttachMode::Auto).with_sizes(map_sizes.clone()),
        );
        let report = node.start()?;
        Ok((
            Arc::new(Self {
                node: Mutex::new(node),
                handles: Mutex::new(Vec::new()),
                bpf_root: bpf_root.to_owned(),
                state_dir: state_dir.to_owned(),
                requests: AtomicU64::new(0),
                cluster: Mutex::new(None),
                frontends: Mutex::new(None),
                map_sizes,
            }),
            report,
        ))
    }

    /// The node, waited for as long as a write waits for the store.
    fn node(&self) -> Result<std::sync::MutexGuard<'_, Node<KernelDataplane>>, NodeError> {
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match self.node.try_lock() {
                Ok(n) => return Ok(n),
                // A request that panicked left the store as its last commit
                // did (writes are transactions) and the engine out of the
                // node (it is rebuilt): carry on.
                Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if start.elapsed() >= DEFAULT_LOCK_TIMEOUT {
                return Err(NodeError::Remote {
                    kind: ErrorKind::Busy,
                    message: format!(
                        "the palisade daemon was busy with other changes for {DEFAULT_LOCK_TIMEOUT:?}; try again later"
                    ),
                });
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Accept connections until the listener fails; each is answered on
    /// its own thread.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) -> io::Result<()> {
        for conn in listener.incoming() {
            let conn = conn?;
            let me = Arc::clone(self);
            thread::spawn(move || {
                if let Err(e) = me.answer(conn) {
                    tracing::warn!("daemon: a client connection failed: {e}");
                }
            });
        }
        Ok(())
    }

    fn answer(&self, conn: UnixStream) -> io::Result<()> {
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            // A client that only checked that the daemon answers.
            return Ok(());
        }
        let t = std::time::Instant::now();
        let parsed = serde_json::from_str::<Envelope>(&line);
        tracing::debug!(
            "request of {} bytes read in {} ms",
            line.len(),
            t.elapsed().as_millis()
        );
        let response = match parsed {
            Err(e) => Response::Err {
                kind: ErrorKind::Invalid,
                message: format!("the daemon does not understand the request: {e}"),
            },
            Ok(env) if env.bpf_root != self.bpf_root => Response::Err {
                kind: ErrorKind::Invalid,
                message: format!(
                    "this palisade daemon manages the datapath at {}, not {}; use its bpf root or its own socket",
                    self.bpf_root.display(),
                    env.bpf_root.display()
                ),
            },
            Ok(env) => match self.handle(env.request) {
                Ok(value) => Response::Ok { value },
                Err(e) => Response::Err {
                    kind: e.kind(),
                    message: anyhow_chain(&e),
                },
            },
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
        out.push(b'\n');
        (&conn).write_all(&out)
    }

    fn handle(&self, request: Request) -> Result<Value, NodeError> {
        match request {
            Request::Status => json(Ok(self.status())),
            Request::Apply { sources } => {
                let t = std::time::Instant::now();
                let objects =
                    parse_sources(&sources).map_err(|e| NodeError::Invalid(e.to_string()))?;
                let n = objects.len();
                let decoded = t.elapsed();
                let r = json(self.node()?.apply(objects));
                tracing::debug!(
                    "apply: {n} objects parsed and validated in {} ms, applied in {} ms",
                    decoded.as_millis(),
                    (t.elapsed() - decoded).as_millis()
                );
                r
            }
            Request::Delete { refs } => json(self.node()?.delete(refs)),
            Request::AddEndpoint {
                endpoint,
                attach_mode,
            } => json(self.add_endpoint(endpoint, attach_mode)),
            Request::RemoveEndpoints { endpoints } => {
                let gone = self.node()?.unregister(&endpoints)?;
                let detached = self.detach(gone);
                // See `Node::remove_container`.
                self.node()?.sweep();
                json(detached)
            }
            Request::RemoveContainer { container_id } => {
                json(self.node()?.remove_container(&container_id))
            }
            Request::SetIdentity {
                key,
                namespace,
                name,
                labels,
            } => json(self.node()?.set_identity(&key, &namespace, &name, &labels)),
            Request::RecordPending { inode, pending } => {
                json(self.node()?.record_pending(inode, pending))
            }
            Request::SetMode { namespace, mode } => {
                json(self.node()?.set_mode(namespace.as_deref(), mode))
            }
            Request::Sync => json(self.node()?.resync()),
        }
    }

    /// Register under the lock, attach without it, record under it again:
    /// concurrent ADDs do not wait for each other's attach.
    fn add_endpoint(&self, new: NewEndpoint, mode: AttachMode) -> Result<AddOutcome, NodeError> {
        let ep = match register_waiting(|| self.node()?.register_endpoint(new.clone()))? {
            Registered::AlreadyManaged(e) => return Ok(AddOutcome::AlreadyManaged(e)),
            Registered::New(ep) => ep,
            Registered::Attaching(_) => unreachable!("register_waiting waits it out"),
        };
        let mut dp = self.dataplane(mode);
        let attached = dp.attach(ep.id, &ep.host_ifname, ep.host_ifindex);
        crate::fault::point("add:attached");
        self.put_back(dp);
        self.node()?
            .complete_add(ep, attached)
            .map(AddOutcome::Added)
    }

    fn detach(&self, gone: Vec<Endpoint>) -> Result<Vec<Endpoint>, NodeError> {
        let mut dp = self.dataplane(AttachMode::Auto);
        let result = detach_endpoints(&mut dp, &gone);
        self.put_back(dp);
        result.map(|()| gone)
    }

    /// A dataplane handle in `mode` for work outside the node's lock: from
    /// the pool (maps and programs opened already), or new.
    fn dataplane(&self, mode: AttachMode) -> KernelDataplane {
        let mut pool = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        match pool.iter().position(|d| d.mode() == mode) {
            Some(i) => pool.swap_remove(i),
            None => KernelDataplane::new(&self.bpf_root, mode).with_sizes(self.map_sizes.clone()),
        }
    }

    fn put_back(&self, dp: KernelDataplane) {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dp);
    }

    pub fn status(&self) -> DaemonStatus {
        DaemonStatus {
            pid: std::process::id(),
            bpf_root: self.bpf_root.clone(),
            state_dir: self.state_dir.clone(),
            requests: self.requests.load(Ordering::Relaxed),
            // 0 while a change holds the node.
            generation: self.node.try_lock().map_or(0, |n| n.generation()),
            cluster: self.cluster_status(),
        }
    }

    /// Apply a batch of Kubernetes API events (the cluster-mode agent in
    /// this process).
    pub fn apply_api(&self, this_node: &str, changes: &ApiChanges) -> Result<ApiReport, NodeError> {
        self.node()?.apply_api(this_node, changes)
    }

    /// Not in cluster mode (a daemon started without it).
    pub fn leave_cluster(&self) -> Result<(), NodeError> {
        self.node()?.leave_cluster()
    }

    pub fn set_cluster_status(&self, status: ClusterStatus) {
        *self.cluster.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }

    pub fn cluster_status(&self) -> Option<ClusterStatus> {
        self.cluster
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Attach the netfilter hook that judges Service flows on their
    /// backend (cluster mode), in this thread's network namespace.
    pub fn ensure_service_hook(&self) -> Result<HookChange, NodeError> {
        let dp = KernelDataplane::new(&self.bpf_root, AttachMode::Auto);
        Ok(ServiceHook::new(&self.bpf_root, dp.service_program_pin()).ensure()?)
    }

    /// The hooks in place, for status.
    pub fn service_hook_info(&self) -> Result<Vec<HookInfo>, NodeError> {
        let dp = KernelDataplane::new(&self.bpf_root, AttachMode::Auto);
        Ok(ServiceHook::new(&self.bpf_root, dp.service_program_pin()).info()?)
    }

    /// Make `pal_svc` hold exactly these Service frontends; returns (added,
    /// removed).
    pub fn set_service_frontends(
        &self,
        desired: &BTreeSet<SvcKey>,
    ) -> Result<(usize, usize), NodeError> {
        let mut guard = self.frontends.lock().unwrap_or_else(|p| p.into_inner());
        let frontends = match guard.as_mut() {
            Some(f) => f,
            None => guard.insert(Frontends::open(&self.bpf_root)?),
        };
        match frontends.set(desired) {
            Ok(r) => Ok(r),
            Err(e) => {
                // The map may have been replaced (the datapath removed and
                // created again): open it afresh next time.
                *guard = None;
                Err(e.into())
            }
        }
    }

    /// Record addresses the DNS proxy learned; returns once the datapath
    /// allows them.
    pub fn learn_fqdns(
        &self,
        learned: &[crate::fqdn::Learned],
        cap: usize,
    ) -> Result<(), NodeError> {
        self.node()?.learn_fqdns(learned, cap).map(|_| ())
    }

    /// Forget learned addresses that expired and that no tracked
    /// connection uses.
    pub fn expire_fqdns(&self, now: u64) -> Result<usize, NodeError> {
        let in_use = crate::dataplane::kernel::conntrack_addresses(&self.bpf_root)?;
        self.node()?.expire_fqdns(now, &in_use)
    }

    /// The store's generation (counts commits that changed what the
    /// engine computes from), read without the node's lock.
    pub fn store_generation(&self) -> u64 {
        Store::new(&self.state_dir).generation().unwrap_or(0)
    }

    /// What each local endpoint whose DNS goes to the proxy may look up.
    pub fn dns_view(&self) -> Result<crate::dnsproxy::DnsView, NodeError> {
        let state = self.node()?.store.read()?;
        Ok(crate::dnsproxy::dns_view(&state))
    }

    /// Change where the node's proxies listen (a zero port: that proxy
    /// does not; what the datapath steers to it is then dropped).
    pub fn update_proxy(
        &self,
        f: impl FnOnce(crate::abi::ProxyConfig) -> crate::abi::ProxyConfig,
    ) -> Result<(), NodeError> {
        self.node()?.dataplane.prepare()?;
        Ok(crate::dataplane::kernel::update_proxy_config(
            &self.bpf_root,
            f,
        )?)
    }

    /// Attach the L7 steering program to lo, in this thread's network
    /// namespace (the node's); returns whether anything changed.
    pub fn ensure_l7_steer(&self) -> Result<bool, NodeError> {
        self.node()?.dataplane.prepare()?;
        Ok(crate::dataplane::kernel::ensure_l7_steer(&self.bpf_root)?)
    }

    /// Give the L7 steering programs the proxy's listener.
    pub fn set_l7_listener(&self, listener: &impl std::os::fd::AsRawFd) -> Result<(), NodeError> {
        Ok(crate::dataplane::kernel::set_l7_listener(
            &self.bpf_root,
            listener,
        )?)
    }

    /// The HTTP rules the L7 proxy applies to a connection.
    pub fn l7_connection(
        &self,
        client: std::net::IpAddr,
        server: std::net::IpAddr,
        port: u16,
    ) -> Result<crate::l7::Connection, NodeError> {
        let state = self.node()?.store.read()?;
        Ok(crate::l7::connection(&state, client, server, port))
    }

    /// Sweep orphaned link pins (periodically, and at start).
    pub fn sweep(&self) {
        match self.node() {
            Ok(mut n) => n.sweep(),
            Err(e) => tracing::warn!("not sweeping link pins now: {e}"),
        }
    }
}

/// An answer as JSON.
fn json<T: Serialize>(v: Result<T, NodeError>) -> Result<Value, NodeError> {
    v.and_then(|v| serde_json::to_value(v).map_err(|e| NodeError::Invalid(format!("encode: {e}"))))
}

/// An error with its causes, as `{:#}` prints them.
fn anyhow_chain(e: &NodeError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Bind the daemon's socket: root-only, replacing a stale one (the caller
/// holds the daemon lock, so no other daemon listens there).
pub fn bind(socket: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        fs::create_dir_all(dir)?;
    }
    match fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(socket)?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
