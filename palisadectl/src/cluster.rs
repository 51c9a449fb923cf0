//! Kubernetes cluster mode in the daemon (`palisadectl daemon
//! --kubernetes`): watch the API server with kube-rs and feed every event
//! to the engine as one incremental change.
//!
//! Each watched kind has its own watcher (list, then watch from the list's
//! resourceVersion; bookmarks; a relist after 410 Gone or a lost watch;
//! backoff while the API is away). Events go to one applier, which takes
//! whatever has queued since its last batch and applies it in one
//! transaction. A relist is the whole truth for its kind (what is stored
//! and not listed is deleted once it is complete), so an outage or a 410
//! never empties or loosens the maps in between: enforcement stays as it
//! was until the API answers again. When watches relist together (after an
//! outage, at the start), the applier holds their events until every one
//! of them has listed and applies them as one change, so that no state
//! mixing new objects of one kind with old ones of another (a relabelled
//! pod against a replaced policy) reaches the datapath.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{ApiResource, DynamicObject},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use palisade::{
    cluster::{
        ApiChanges, ApiObject, ClusterStatus, ServiceFrontends, frontend_set, node_addresses,
    },
    daemon::Server,
    policy::{Kind, ObjectError, ObjectRef},
};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

/// Cluster-mode settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// A kubeconfig to use instead of the in-cluster service account,
    /// `KUBECONFIG` and `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (its pods are enforced here; every other pod is a
    /// peer known by its addresses).
    pub node_name: String,
}

/// What the metrics endpoint shows of the agent.
#[derive(Debug)]
pub struct Metrics {
    /// From an event's arrival to its change being in the maps, seconds.
    pub lag: Histogram,
    pub events: Counter,
    pub watch_restarts: Counter,
    pub relists: Counter,
}

impl Metrics {
    fn new() -> Self {
        Metrics {
            lag: Histogram::new([
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
            ]),
            events: Counter::default(),
            watch_restarts: Counter::default(),
            relists: Counter::default(),
        }
    }
}

/// Every kind the agent watches, as the applier names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Watch {
    Namespaces,
    Pods,
    NetworkPolicies,
    Nodes,
    Services,
    EndpointSlices,
    AdminNetworkPolicies,
    BaselineAdminNetworkPolicies,
    ClusterNetworkPolicies,
    PalisadeNetworkPolicies,
}

impl Watch {
    const ALL: [Watch; 10] = [
        Watch::Namespaces,
        Watch::Pods,
        Watch::NetworkPolicies,
        Watch::Nodes,
        Watch::Services,
        Watch::EndpointSlices,
        Watch::AdminNetworkPolicies,
        Watch::BaselineAdminNetworkPolicies,
        Watch::ClusterNetworkPolicies,
        Watch::PalisadeNetworkPolicies,
    ];

    /// The custom resource behind a tier policy watch (group, version,
    /// kind): served only where its CRD is installed.
    fn crd(self) -> Option<(&'static str, &'static str, &'static str)> {
        let group = "policy.networking.k8s.io";
        match self {
            Watch::AdminNetworkPolicies => Some((group, "v1alpha1", "AdminNetworkPolicy")),
            Watch::BaselineAdminNetworkPolicies => {
                Some((group, "v1alpha1", "BaselineAdminNetworkPolicy"))
            }
            Watch::ClusterNetworkPolicies => Some((group, "v1alpha2", "ClusterNetworkPolicy")),
            Watch::PalisadeNetworkPolicies => {
                Some(("palisade.io", "v1alpha1", "PalisadeNetworkPolicy"))
            }
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Watch::Namespaces => "namespaces",
            Watch::Pods => "pods",
            Watch::NetworkPolicies => "networkpolicies",
            Watch::Nodes => "nodes",
            Watch::Services => "services",
            Watch::EndpointSlices => "endpointslices",
            Watch::AdminNetworkPolicies => "adminnetworkpolicies",
            Watch::BaselineAdminNetworkPolicies => "baselineadminnetworkpolicies",
            Watch::ClusterNetworkPolicies => "clusternetworkpolicies",
            Watch::PalisadeNetworkPolicies => "palisadenetworkpolicies",
        }
    }

    /// The engine's kind for the objects of this watch (the others are
    /// only counted for now).
    fn kind(self) -> Option<Kind> {
        match self {
            Watch::Namespaces => Some(Kind::Namespace),
            Watch::Pods => Some(Kind::Pod),
            Watch::NetworkPolicies => Some(Kind::NetworkPolicy),
            Watch::Nodes => Some(Kind::Node),
            Watch::AdminNetworkPolicies => Some(Kind::AdminNetworkPolicy),
            Watch::BaselineAdminNetworkPolicies => Some(Kind::BaselineAdminNetworkPolicy),
            Watch::ClusterNetworkPolicies => Some(Kind::ClusterNetworkPolicy),
            Watch::PalisadeNetworkPolicies => Some(Kind::PalisadeNetworkPolicy),
            _ => None,
        }
    }
}

/// One object of a watch event, converted.
#[derive(Debug)]
struct Item {
    key: (String, String),
    /// The object's resourceVersion (0 when it is not a number).
    rv: u64,
    /// `None` for kinds the engine does not take (yet), and for objects
    /// that failed validation (`error`).
    object: Option<ApiObject>,
    error: Option<String>,
    /// What the agent keeps itself (Service frontends, node addresses).
    side: Side,
}

/// What the agent takes from kinds the engine does not store.
#[derive(Debug, Default)]
enum Side {
    #[default]
    None,
    Service(ServiceFrontends),
    Node(Vec<IpAddr>),
}

#[derive(Debug)]
enum Msg {
    Apply(Watch, Instant, Item),
    Delete(Watch, Instant, Item),
    ListStart(Watch),
    Listed(Watch, Item),
    ListDone(Watch),
    Failed(Watch, String),
    /// The kind's CRD is not installed (`true`) or is again (`false`).
    NotServed(Watch, bool),
}

/// How often the agent looks again for a tier policy CRD that is not
/// installed.
const CRD_RECHECK: Duration = Duration::from_secs(10);

/// Events waiting for the engine, at most (also the largest batch).
const QUEUE: usize = 10_000;

/// How long events are held while watches relist together, at most: a
/// watch that cannot list by then is not waited for.
const HOLD_MAX: Duration = Duration::from_secs(10);

/// How many events are held while watches relist together, at most: a
/// larger relist is applied in parts, each kind still whole (see
/// [`Listing`]), so that memory stays bounded.
const HOLD_LIMIT: usize = QUEUE;

/// The applier's request to failed watches: list again now instead of
/// after their backoff (a counter; each change is one request).
type Kick = watch::Receiver<u64>;

/// Start the agent on its own thread; it runs until the process ends.
pub fn start(server: Arc<Server>, opts: Options) -> Result<Arc<Metrics>> {
    let metrics = Arc::new(Metrics::new());
    // Say at once that this node is in cluster mode: from now on, ADDs
    // wait for their Pod objects and `palisadectl apply` is refused.
    server
        .apply_api(&opts.node_name, &ApiChanges::default())
        .context("record cluster mode in the store")?;
    server.set_cluster_status(ClusterStatus {
        node: opts.node_name.clone(),
        ..Default::default()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("palisade-kube")
        .build()
        .context("start the Kubernetes client's runtime")?;
    let m = Arc::clone(&metrics);
    thread::Builder::new()
        .name("palisade-cluster".into())
        .spawn(move || {
            runtime.block_on(async move {
                if let Err(e) = run(server, opts, m).await {
                    eprintln!("palisade daemon: cluster mode stopped: {e:#}");
                    std::process::exit(1);
                }
            });
        })
        .context("start the cluster-mode thread")?;
    Ok(metrics)
}

/// Find the API server the way kubectl does, with the in-cluster service
/// account first (a DaemonSet pod); `--kubeconfig` wins over both.
async fn config(opts: &Options) -> Result<Config> {
    if let Some(path) = &opts.kubeconfig {
        let kc = Kubeconfig::read_from(path)
            .with_context(|| format!("read the kubeconfig {}", path.display()))?;
        return Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("use the kubeconfig {}", path.display()));
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Config::incluster().context("use the in-cluster service account");
    }
    Config::from_kubeconfig(&KubeConfigOptions::default())
        .await
        .context("no --kubeconfig, not in a cluster, and KUBECONFIG / ~/.kube/config unusable")
}

/// Return freed heap memory to the system (glibc keeps it otherwise, and
/// the RSS would stay at the peak of the first sync).
pub fn trim_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

fn key_of<K: Resource>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// How one kind's objects become engine objects, and what the agent keeps
/// of them itself.
type Convert<K> = fn(&K) -> Option<Result<ApiObject, ObjectError>>;
type SideOf<K> = fn(&K) -> Side;

fn item<K: Resource>(obj: &K, convert: Convert<K>, side_of: SideOf<K>) -> Item {
    let side = side_of(obj);
    let key = key_of(obj);
    let rv = obj
        .meta()
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    match convert(obj) {
        Some(Ok(o)) => Item {
            key,
            rv,
            object: Some(o),
            error: None,
            side,
        },
        Some(Err(e)) => Item {
            error: Some(format!("{}/{}: {e}", key.0, key.1)),
            key,
            rv,
            object: None,
            side,
        },
        None => Item {
            key,
            rv,
            object: None,
            error: None,
            side,
        },
    }
}

type WatchStream<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// A watch that lists again at once, instead of after its backoff, when
/// the applier asks (a kick) while its last attempt failed: other watches
/// relist, and it should list with them.
struct Restartable<K, F> {
    start: F,
    stream: WatchStream<K>,
    failed: bool,
}

impl<K, F: Fn() -> WatchStream<K>> Restartable<K, F> {
    fn new(start: F) -> Self {
        let stream = start();
        Self {
            start,
            stream,
            failed: false,
        }
    }

    async fn next(&mut self, kick: &mut Kick) -> Result<Option<watcher::Event<K>>, watcher::Error> {
        loop {
            tokio::select! {
                next = self.stream.try_next() => {
                    self.failed = next.is_err();
                    return next;
                }
                Ok(()) = kick.changed() => {
                    if self.failed {
                        self.stream = (self.start)();
                        self.failed = false;
                    }
                }
            }
        }
    }
}

/// The message for a watch event, objects converted by `convert`.
fn msg_of<K>(which: Watch, ev: watcher::Event<K>, convert: impl Fn(&K) -> Item) -> Msg {
    match ev {
        watcher::Event::Init => Msg::ListStart(which),
        watcher::Event::InitApply(o) => Msg::Listed(which, convert(&o)),
        watcher::Event::InitDone => Msg::ListDone(which),
        watcher::Event::Apply(o) => Msg::Apply(which, Instant::now(), convert(&o)),
        watcher::Event::Delete(o) => Msg::Delete(which, Instant::now(), convert(&o)),
    }
}

/// Watch one kind cluster-wide until the process ends.
fn spawn_watch<K>(
    client: Client,
    which: Watch,
    convert: Convert<K>,
    side_of: SideOf<K>,
    tx: mpsc::Sender<Msg>,
    mut kick: Kick,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let api: Api<K> = Api::all(client);
        let mut stream = Restartable::new(|| {
            watcher(api.clone(), watcher::Config::default())
                .default_backoff()
                .boxed()
        });
        loop {
            let msg = match stream.next(&mut kick).await {
                Ok(Some(ev)) => msg_of(which, ev, |o| item(o, convert, side_of)),
                Ok(None) => return,
                Err(e) => Msg::Failed(which, e.to_string()),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
}

/// Whether the API serves a custom resource (its CRD is installed).
async fn served(client: &Client, ar: &ApiResource) -> Result<bool, kube::Error> {
    match client.list_api_group_resources(&ar.api_version).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == ar.plural)),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Watch one tier policy kind until the process ends. While its CRD is not
/// installed, the kind has no objects (an empty list: any stored ones are
/// deleted) and the agent looks again every [`CRD_RECHECK`]; a watch that
/// finds the resource gone goes back to that.
fn spawn_tier_watch(client: Client, which: Watch, tx: mpsc::Sender<Msg>, mut kick: Kick) {
    let Some((group, version, kind)) = which.crd() else {
        return;
    };
    let ar = ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: which.name().into(),
    };
    tokio::spawn(async move {
        let mut absent = false;
        loop {
            match served(&client, &ar).await {
                Ok(true) => {}
                Ok(false) => {
                    if !absent {
                        absent = true;
                        let sent = async {
                            tx.send(Msg::NotServed(which, true)).await?;
                            tx.send(Msg::ListStart(which)).await?;
                            tx.send(Msg::ListDone(which)).await
                        };
                        if sent.await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(CRD_RECHECK).await;
                    continue;
                }
                Err(e) => {
                    if tx.send(Msg::Failed(which, e.to_string())).await.is_err() {
                        return;
                    }
                    // Again after a while, or at once when other watches
                    // relist.
                    tokio::select! {
                        () = tokio::time::sleep(CRD_RECHECK) => {}
                        _ = kick.changed() => {}
                    }
                    continue;
                }
            }
            if absent {
                absent = false;
                if tx.send(Msg::NotServed(which, false)).await.is_err() {
                    return;
                }
            }
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let mut stream = Restartable::new(|| {
                watcher(api.clone(), watcher::Config::default())
                    .default_backoff()
                    .boxed()
            });
            let convert = |o: &DynamicObject| -> Item {
                // Cluster-scoped kinds have no namespace.
                let key = (o.namespace().unwrap_or_default(), o.name_any());
                let rv = o
                    .metadata
                    .resource_version
                    .as_deref()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let result = serde_json::to_value(o)
                    .map_err(|e| e.to_string())
                    .and_then(|v| ApiObject::tier(v).map_err(|e| e.to_string()));
                match result {
                    Ok(object) => Item {
                        key,
                        rv,
                        object: Some(object),
                        error: None,
                        side: Side::None,
                    },
                    Err(e) => Item {
                        error: Some(format!("{kind} {}: {e}", key.1)),
                        key,
                        rv,
                        object: None,
                        side: Side::None,
                    },
                }
            };
            loop {
                let msg = match stream.next(&mut kick).await {
                    Ok(Some(ev)) => msg_of(which, ev, convert),
                    Ok(None) => return,
                    // The CRD went away: look for it again.
                    Err(
                        watcher::Error::InitialListFailed(kube::Error::Api(s))
                        | watcher::Error::WatchStartFailed(kube::Error::Api(s)),
                    ) if s.is_not_found() => break,
                    Err(e) => Msg::Failed(which, e.to_string()),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
    });
}

async fn run(server: Arc<Server>, opts: Options, metrics: Arc<Metrics>) -> Result<()> {
    let config = config(&opts).await?;
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).context("create the Kubernetes client")?;
    eprintln!(
        "palisade daemon: cluster mode for node {} with the API server at {url}",
        opts.node_name
    );
    // Bounded: while the engine takes one batch, a watch waits instead of
    // reading on, so a long list is never held whole (the next page is
    // fetched when there is room).
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let (kick, kicked) = watch::channel(0u64);
    spawn_watch::<Namespace>(
        client.clone(),
        Watch::Namespaces,
        |o| Some(ApiObject::namespace(o.clone())),
        |_| Side::None,
        tx.clone(),
        kicked.clone(),
    );
    spawn_watch::<Pod>(
        client.clone(),
        Watch::Pods,
        |o| Some(ApiObject::pod(o)),
        |_| Side::None,
        tx.clone(),
        kicked.clone(),
    );
    spawn_watch::<NetworkPolicy>(
        client.clone(),
        Watch::NetworkPolicies,
        |o| Some(ApiObject::policy(o.clone())),
        |_| Side::None,
        tx.clone(),
        kicked.clone(),
    );
    spawn_watch::<Node>(
        client.clone(),
        Watch::Nodes,
        |n| Some(Ok(ApiObject::node(n))),
        |n| Side::Node(node_addresses(n)),
        tx.clone(),
        kicked.clone(),
    );
    spawn_watch::<Service>(
        client.clone(),
        Watch::Services,
        |_| None,
        |s| Side::Service(ServiceFrontends::of(s)),
        tx.clone(),
        kicked.clone(),
    );
    for w in [
        Watch::AdminNetworkPolicies,
        Watch::BaselineAdminNetworkPolicies,
        Watch::ClusterNetworkPolicies,
        Watch::PalisadeNetworkPolicies,
    ] {
        spawn_tier_watch(client.clone(), w, tx.clone(), kicked.clone());
    }
    spawn_watch::<EndpointSlice>(
        client,
        Watch::EndpointSlices,
        |_| None,
        |_| Side::None,
        tx,
        kicked,
    );

    // Service flows are judged after the node's DNAT by a netfilter
    // program in this (the node's) network namespace.
    // Without it, nothing may be deferred to it: the frontends are then
    // cleared, and flows to Services are judged on the veth against the
    // frontend address (closed for isolated clients), as before cluster
    // mode knew Services.
    let hook_error = {
        let server = Arc::clone(&server);
        match tokio::task::spawn_blocking(move || server.ensure_service_hook()).await {
            Ok(Ok(change)) => {
                tracing::info!("Service hook: {change:?}");
                None
            }
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) => Some(format!("panicked: {e}")),
        }
    };
    if let Some(e) = &hook_error {
        tracing::error!(
            "the netfilter hook that judges Service traffic on its backend could not be attached; \
             Service frontends are not deferred to it (flows to Services are judged against the \
             frontend address): {e}"
        );
        let server = Arc::clone(&server);
        let cleared =
            tokio::task::spawn_blocking(move || server.set_service_frontends(&BTreeSet::new()))
                .await;
        if !matches!(cleared, Ok(Ok(_))) {
            tracing::error!("could not clear the Service frontends either: {cleared:?}");
        }
    }

    let mut applier = Applier {
        server,
        node: opts.node_name,
        metrics,
        status: ClusterStatus::default(),
        known: BTreeMap::new(),
        listing: BTreeMap::new(),
        listed_once: BTreeSet::new(),
        failing: BTreeSet::new(),
        not_served: BTreeSet::new(),
        lags: Vec::new(),
        services: BTreeMap::new(),
        node_addresses: Vec::new(),
        frontends_changed: false,
        hook_attached: hook_error.is_none(),
        held: Vec::new(),
        hold: None,
        kick,
    };
    applier.status.node.clone_from(&applier.node);
    applier.status.api_server = url;
    applier.status.service_hook = match applier.server.service_hook_info() {
        _ if hook_error.is_some() => String::new(),
        Ok(hooks) => hooks
            .iter()
            .map(|h| {
                format!(
                    "{} (netfilter {}, priority {}, link {})",
                    h.family, h.hook, h.priority, h.link_id
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("unknown: {e}"),
    };
    if let Some(e) = hook_error {
        applier.status.last_error = Some(format!("Service hook: {e}"));
    }
    applier.publish();
    let mut batch = Vec::new();
    loop {
        let received = match applier.hold.as_ref().map(|h| h.since + HOLD_MAX) {
            Some(end) => tokio::select! {
                n = rx.recv_many(&mut batch, QUEUE) => n,
                () = tokio::time::sleep_until(end.into()) => {
                    applier.release().await;
                    continue;
                }
            },
            None => rx.recv_many(&mut batch, QUEUE).await,
        };
        if received == 0 {
            return Ok(());
        }
        applier.receive(std::mem::take(&mut batch)).await;
    }
}

/// Watches relisting together: their events are held until all of them
/// have listed.
#[derive(Debug)]
struct Hold {
    since: Instant,
    /// Lists started and not complete.
    open: BTreeSet<Watch>,
    /// Watches that failed (or never listed) and are expected to list.
    awaited: BTreeSet<Watch>,
}

impl Hold {
    fn note(&mut self, msg: &Msg) {
        match msg {
            Msg::ListStart(w) => {
                self.awaited.remove(w);
                self.open.insert(*w);
            }
            Msg::ListDone(w) => {
                self.open.remove(w);
            }
            Msg::Apply(w, ..) | Msg::Delete(w, ..) | Msg::NotServed(w, _) => {
                self.awaited.remove(w);
            }
            Msg::Listed(..) | Msg::Failed(..) => {}
        }
    }

    fn waiting(&self) -> bool {
        !(self.open.is_empty() && self.awaited.is_empty()) && self.since.elapsed() < HOLD_MAX
    }
}

/// A list under way. Its objects go to the engine with the batch they
/// arrive in (a list of every pod of a large cluster is never held whole);
/// the keys are kept so that, once it is complete, what was stored and not
/// listed is deleted.
#[derive(Debug, Default)]
struct Listing {
    keys: BTreeSet<(String, String)>,
    /// The objects the engine took (not those that failed validation: as
    /// before lists were applied in parts, those are deleted at the end).
    taken: Vec<ObjectRef>,
    /// What the agent keeps itself (Services, Nodes): taken at the end.
    sides: Vec<((String, String), Side)>,
}

/// Turns queued events into batches for the engine, and keeps the status.
struct Applier {
    server: Arc<Server>,
    node: String,
    metrics: Arc<Metrics>,
    status: ClusterStatus,
    /// Object keys per watch (for counts, and for kinds the engine does
    /// not take yet).
    known: BTreeMap<Watch, BTreeSet<(String, String)>>,
    /// Relists under way: what has been listed so far.
    listing: BTreeMap<Watch, Listing>,
    listed_once: BTreeSet<Watch>,
    failing: BTreeSet<Watch>,
    /// Tier policy kinds whose CRD is not installed.
    not_served: BTreeSet<Watch>,
    /// Recent event-to-datapath times, seconds.
    lags: Vec<f64>,
    /// Service frontends by Service, and this node's addresses (for
    /// NodePorts); written to `pal_svc` after a batch that changed them.
    services: BTreeMap<(String, String), ServiceFrontends>,
    node_addresses: Vec<IpAddr>,
    frontends_changed: bool,
    /// The Service hook is attached: frontends may be deferred to it.
    hook_attached: bool,
    /// Events received and not applied yet (while `hold`).
    held: Vec<Msg>,
    hold: Option<Hold>,
    kick: watch::Sender<u64>,
}

impl Applier {
    /// Take events from the watches: applied at once, unless watches
    /// relist (a list started): then held until every watch that failed
    /// or never listed has listed too (those are asked to list now), at
    /// most [`HOLD_MAX`] and [`HOLD_LIMIT`] events, and applied as one
    /// change.
    async fn receive(&mut self, msgs: Vec<Msg>) {
        for msg in msgs {
            match (&mut self.hold, &msg) {
                (Some(h), _) => h.note(&msg),
                (None, Msg::ListStart(w)) => {
                    let awaited: BTreeSet<Watch> = Watch::ALL
                        .into_iter()
                        .filter(|x| {
                            x != w
                                && !self.not_served.contains(x)
                                && (self.failing.contains(x) || !self.listed_once.contains(x))
                        })
                        .collect();
                    let mut open: BTreeSet<Watch> = self.listing.keys().copied().collect();
                    open.insert(*w);
                    if !awaited.is_empty() {
                        tracing::info!(
                            "{} relist: holding events until {} have listed too",
                            w.name(),
                            awaited
                                .iter()
                                .map(|x| x.name())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                        self.kick.send_modify(|k| *k += 1);
                    }
                    self.hold = Some(Hold {
                        since: Instant::now(),
                        open,
                        awaited,
                    });
                }
                (None, _) => {}
            }
            self.held.push(msg);
        }
        let waiting = self.hold.as_ref().is_some_and(Hold::waiting);
        if !waiting || self.held.len() >= HOLD_LIMIT {
            self.release().await;
        }
    }

    /// Apply what is held, and end the hold.
    async fn release(&mut self) {
        if let Some(h) = self.hold.take()
            && !(h.open.is_empty() && h.awaited.is_empty())
        {
            tracing::warn!(
                "applying {} held events before {} listed ({} s, at most {} events are held)",
                self.held.len(),
                h.open
                    .union(&h.awaited)
                    .map(|x| x.name())
                    .collect::<Vec<_>>()
                    .join(", "),
                h.since.elapsed().as_secs(),
                HOLD_LIMIT
            );
        }
        let msgs = std::mem::take(&mut self.held);
        if !msgs.is_empty() {
            self.apply(msgs).await;
        }
    }

    async fn apply(&mut self, msgs: Vec<Msg>) {
        let mut upserts: BTreeMap<ObjectRef, ApiObject> = BTreeMap::new();
        let mut deletes: BTreeSet<ObjectRef> = BTreeSet::new();
        let mut complete = Vec::new();
        let mut listed = Vec::new();
        let mut arrivals = Vec::new();
        let mut errors = Vec::new();
        let mut rvs: BTreeMap<Watch, u64> = BTreeMap::new();
        let mut seen = |w: Watch, rv: u64| {
            let e = rvs.entry(w).or_default();
            *e = (*e).max(rv);
        };
        for msg in msgs {
            match msg {
                Msg::Failed(w, e) => {
                    self.metrics.watch_restarts.inc();
                    self.status.watch_restarts += 1;
                    if self.failing.insert(w) {
                        tracing::warn!("watch of {} failed (retrying with backoff): {e}", w.name());
                    }
                    self.status.last_error = Some(format!("{}: {e}", w.name()));
                }
                Msg::ListStart(w) => {
                    self.listing.insert(w, Listing::default());
                }
                Msg::NotServed(w, absent) => {
                    if absent {
                        tracing::info!(
                            "{} are not served (their CRD is not installed); looking again every {} s",
                            w.name(),
                            CRD_RECHECK.as_secs()
                        );
                        self.not_served.insert(w);
                    } else {
                        tracing::info!("{} are served now: watching them", w.name());
                        self.not_served.remove(&w);
                    }
                    self.failing.remove(&w);
                }
                Msg::Listed(w, it) => {
                    seen(w, it.rv);
                    errors.extend(it.error);
                    let l = self.listing.entry(w).or_default();
                    if let Some(o) = it.object {
                        let r = o.reference();
                        deletes.remove(&r);
                        l.taken.push(r.clone());
                        upserts.insert(r, o);
                    }
                    l.keys.insert(it.key.clone());
                    if !matches!(it.side, Side::None) {
                        l.sides.push((it.key, it.side));
                    }
                }
                Msg::ListDone(w) => {
                    self.failing.remove(&w);
                    let Listing { keys, taken, sides } =
                        self.listing.remove(&w).unwrap_or_default();
                    if !self.listed_once.insert(w) {
                        self.metrics.relists.inc();
                        self.status.relists += 1;
                    }
                    if let Some(kind) = w.kind() {
                        complete.push(kind);
                        // Listed in earlier batches (or in this one: the
                        // engine takes the union).
                        listed.extend(taken);
                    }
                    self.known.insert(w, keys);
                    // A list is the whole truth for its kind.
                    match w {
                        Watch::Services => self.services.clear(),
                        Watch::Nodes => self.node_addresses.clear(),
                        _ => {}
                    }
                    if matches!(w, Watch::Services | Watch::Nodes) {
                        self.frontends_changed = true;
                    }
                    for (key, side) in sides {
                        self.take_side(key, side);
                    }
                }
                Msg::Apply(w, at, it) => {
                    seen(w, it.rv);
                    self.failing.remove(&w);
                    self.known.entry(w).or_default().insert(it.key.clone());
                    errors.extend(it.error);
                    if let Some(o) = it.object {
                        let r = o.reference();
                        deletes.remove(&r);
                        upserts.insert(r, o);
                    }
                    self.take_side(it.key, it.side);
                    arrivals.push(at);
                }
                Msg::Delete(w, at, it) => {
                    seen(w, it.rv);
                    self.failing.remove(&w);
                    if let Some(set) = self.known.get_mut(&w) {
                        set.remove(&it.key);
                    }
                    if let Some(kind) = w.kind() {
                        let r = ObjectRef {
                            kind,
                            namespace: if kind == Kind::Namespace {
                                String::new()
                            } else {
                                it.key.0.clone()
                            },
                            name: it.key.1.clone(),
                        };
                        upserts.remove(&r);
                        deletes.insert(r);
                    }
                    match w {
                        Watch::Services => {
                            self.frontends_changed |= self.services.remove(&it.key).is_some();
                        }
                        Watch::Nodes if it.key.1 == self.node => {
                            self.node_addresses.clear();
                            self.frontends_changed = true;
                        }
                        _ => {}
                    }
                    arrivals.push(at);
                }
            }
        }
        for e in errors {
            // The API server accepted it; palisade cannot enforce it.
            tracing::error!("an object from the API is not valid for palisade and is ignored: {e}");
            self.status.last_error = Some(e);
        }
        let changes = ApiChanges {
            upserts: upserts.into_values().collect(),
            deletes: deletes.into_iter().collect(),
            complete,
            listed,
        };
        if changes.is_empty() {
            self.applied(&rvs);
        } else {
            let n = changes.upserts.len() + changes.deletes.len();
            let changes = Arc::new(changes);
            // A batch that cannot be applied (the store busy for longer
            // than a write waits, a full disk) is tried again until it is:
            // dropping it would leave this node behind the API until the
            // next relist, which may never come. Events queue meanwhile.
            let mut pause = Duration::from_millis(100);
            for attempt in 1.. {
                let server = Arc::clone(&self.server);
                let node = self.node.clone();
                let batch = Arc::clone(&changes);
                let result =
                    tokio::task::spawn_blocking(move || server.apply_api(&node, &batch)).await;
                let err = match result {
                    Ok(Ok(report)) => {
                        tracing::debug!(
                            "applied {n} API changes: {} created, {} changed, {} deleted; {} entries written, {} removed",
                            report.created,
                            report.changed,
                            report.deleted,
                            report.upserted,
                            report.removed
                        );
                        self.status.last_applied_ms = Some(now_ms());
                        self.applied(&rvs);
                        if n >= 1000 {
                            // A large batch (a list) leaves freed memory in
                            // the allocator's arenas: give it back.
                            trim_heap();
                        }
                        break;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("panicked: {e}"),
                };
                tracing::error!(
                    "applying {n} API changes failed (attempt {attempt}, again in {pause:?}): {err}"
                );
                self.status.last_error = Some(format!("apply: {err}"));
                self.publish();
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
        self.write_frontends().await;
        let done = Instant::now();
        for at in arrivals {
            let lag = done.duration_since(at).as_secs_f64();
            self.metrics.events.inc();
            self.metrics.lag.observe(lag);
            self.lags.push(lag);
        }
        if self.lags.len() > 4096 {
            let cut = self.lags.len() - 4096;
            self.lags.drain(..cut);
        }
        self.publish();
    }

    /// Keep what the agent needs of a Service or of this node's Node.
    fn take_side(&mut self, key: (String, String), side: Side) {
        match side {
            Side::None => {}
            Side::Service(f) => {
                if self.services.get(&key) != Some(&f) {
                    self.services.insert(key, f);
                    self.frontends_changed = true;
                }
            }
            Side::Node(addresses) => {
                if key.1 == self.node && self.node_addresses != addresses {
                    self.node_addresses = addresses;
                    self.frontends_changed = true;
                }
            }
        }
    }

    /// Write the Service frontends after a change to Services or to this
    /// node's addresses, once Services have been listed (until then the
    /// map keeps what it held). A write that fails is tried again after
    /// the next batch.
    async fn write_frontends(&mut self) {
        if !self.hook_attached
            || !self.frontends_changed
            || !self.listed_once.contains(&Watch::Services)
        {
            return;
        }
        let desired = frontend_set(self.services.values(), &self.node_addresses);
        let count = desired.len();
        let server = Arc::clone(&self.server);
        let result =
            tokio::task::spawn_blocking(move || server.set_service_frontends(&desired)).await;
        match result {
            Ok(Ok((added, removed))) => {
                tracing::debug!(
                    "Service frontends: {added} added, {removed} removed, {count} in all"
                );
                self.frontends_changed = false;
                self.status.service_frontends = count;
            }
            Ok(Err(e)) => {
                tracing::error!(
                    "writing the Service frontends failed (again after the next change): {e}"
                );
                self.status.last_error = Some(format!("Service frontends: {e}"));
            }
            Err(e) => {
                tracing::error!("writing the Service frontends panicked: {e}");
                self.status.last_error = Some(format!("Service frontends: {e}"));
            }
        }
    }

    fn applied(&mut self, rvs: &BTreeMap<Watch, u64>) {
        for (w, rv) in rvs {
            let e = self
                .status
                .applied_resource_versions
                .entry(w.name().to_owned())
                .or_default();
            *e = (*e).max(*rv);
        }
    }

    fn publish(&mut self) {
        let s = &mut self.status;
        s.connected = self.failing.is_empty() && self.listing.is_empty();
        let synced = Watch::ALL.iter().all(|w| self.listed_once.contains(w));
        if synced && !s.synced {
            s.first_sync_ms = Some(now_ms());
            eprintln!(
                "palisade daemon: first full sync from the API server done ({})",
                Watch::ALL
                    .iter()
                    .map(|w| format!(
                        "{} {}",
                        self.known.get(w).map_or(0, BTreeSet::len),
                        w.name()
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        s.synced = synced;
        s.objects = Watch::ALL
            .iter()
            .map(|w| {
                (
                    w.name().to_owned(),
                    self.known.get(w).map_or(0, BTreeSet::len),
                )
            })
            .collect();
        let mut sorted = self.lags.clone();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| -> f64 {
            if sorted.is_empty() {
                return 0.0;
            }
            let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
            sorted[i.min(sorted.len() - 1)] * 1000.0
        };
        s.not_installed = self
            .not_served
            .iter()
            .map(|w| w.name().to_owned())
            .collect();
        s.lag_p50_ms = q(0.5);
        s.lag_p99_ms = q(0.99);
        self.server.set_cluster_status(s.clone());
    }
}
