//! The Kubernetes API server test double (`testbed::kubeapi`) against
//! kube-rs's real client, watcher and reflector: chunked lists, watch
//! resumption, 410 relists, outages, bookmarks, timeouts and HTTP writes.
//! Unprivileged; every wait polls for an outcome with a deadline.

use std::{
    collections::BTreeSet,
    fmt::Debug,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DeleteParams, ListParams, PostParams, VersionMatch, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt, reflector,
        watcher::{self, Event},
    },
};
use testbed::kubeapi::ApiServer;

/// How long any outcome may take on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(20);

fn start() -> ApiServer {
    ApiServer::start("127.0.0.1:0").expect("start the test API server")
}

async fn client_from(kubeconfig: Kubeconfig) -> Client {
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a kube Config from the test server's kubeconfig");
    Client::try_from(config).expect("a kube Client for the test server")
}

async fn client(server: &ApiServer) -> Client {
    let kubeconfig =
        Kubeconfig::from_yaml(&server.kubeconfig()).expect("parse the test server's kubeconfig");
    client_from(kubeconfig).await
}

fn pod(ns: &str, name: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Pod::default()
    }
}

fn labelled(ns: &str, name: &str, value: &str) -> Pod {
    let mut p = pod(ns, name);
    p.labels_mut().insert("v".into(), value.into());
    p
}

fn key(p: &Pod) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

/// Polls `probe` until it says done; panics with the last state it saw.
async fn wait_for<T: Debug>(what: &str, mut probe: impl FnMut() -> (bool, T)) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (done, state) = probe();
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}; last state: {state:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn api_code(e: &kube::Error) -> Option<(u16, String)> {
    match e {
        kube::Error::Api(status) => Some((status.code, status.reason.clone())),
        _ => None,
    }
}

/// A kube-rs watcher feeding a reflector store in a task, with a log of
/// its events (`Init`, `InitApply(ns/name)`, `InitDone`, `Apply(ns/name)`,
/// `Delete(ns/name)`, `Error(..)`).
struct Watching {
    store: reflector::Store<Pod>,
    log: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watching {
    fn start(api: Api<Pod>, config: watcher::Config, backoff: bool) -> Self {
        let (store, writer) = reflector::store();
        let events = watcher::watcher(api, config);
        let events: BoxStream<'static, _> = if backoff {
            events.default_backoff().boxed()
        } else {
            events.boxed()
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let task_log = log.clone();
        let task = tokio::spawn(async move {
            let mut events = reflector(writer, events).boxed();
            while let Some(event) = events.next().await {
                let line = match &event {
                    Ok(Event::Init) => "Init".to_owned(),
                    Ok(Event::InitApply(p)) => format!("InitApply({})", key(p)),
                    Ok(Event::InitDone) => "InitDone".to_owned(),
                    Ok(Event::Apply(p)) => format!("Apply({})", key(p)),
                    Ok(Event::Delete(p)) => format!("Delete({})", key(p)),
                    Err(watcher::Error::WatchError(status)) => {
                        format!("Error(watch event {} {})", status.code, status.reason)
                    }
                    Err(e) => format!("Error({e})"),
                };
                task_log.lock().expect("log lock").push(line);
            }
        });
        Self { store, log, task }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    fn count(&self, line: &str) -> usize {
        self.log().iter().filter(|l| *l == line).count()
    }

    async fn wait_inits_done(&self, n: usize) {
        wait_for(&format!("{n} InitDone events"), || {
            (self.count("InitDone") >= n, self.log())
        })
        .await;
    }

    /// (namespace/name, resourceVersion) of every pod in the store.
    fn contents(&self) -> BTreeSet<(String, String)> {
        self.store
            .state()
            .iter()
            .map(|p| (key(p), p.resource_version().unwrap_or_default()))
            .collect()
    }

    /// Waits until the store holds exactly the server's pods, at their versions.
    async fn wait_matches(&self, server: &ApiServer, what: &str) {
        wait_for(what, || {
            let want: BTreeSet<(String, String)> = server
                .list::<Pod>()
                .iter()
                .map(|p| (key(p), p.resource_version().unwrap_or_default()))
                .collect();
            let got = self.contents();
            (got == want, (got, want, self.log()))
        })
        .await;
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Lists every page of `api` with `limit`; returns the pods' keys, the
/// number of pages and the resourceVersion of each page.
async fn list_all(
    api: &Api<Pod>,
    limit: u32,
    between_pages: impl Fn(usize),
) -> (Vec<String>, Vec<String>) {
    let mut keys = Vec::new();
    let mut versions = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(limit);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.expect("list a page");
        assert!(
            page.items.len() <= limit as usize,
            "a page holds at most {limit} items"
        );
        versions.push(page.metadata.resource_version.clone().unwrap_or_default());
        keys.extend(page.items.iter().map(key));
        between_pages(versions.len());
        match page.metadata.continue_.filter(|t| !t.is_empty()) {
            Some(t) => token = Some(t),
            None => return (keys, versions),
        }
    }
}

#[tokio::test]
async fn chunked_lists_return_every_object_exactly_once() {
    let server = start();
    let mut expected = BTreeSet::new();
    for ns in ["alpha", "beta", "gamma"] {
        for i in 0..9 {
            server.apply(&pod(ns, &format!("p{i}")));
            expected.insert(format!("{ns}/p{i}"));
        }
    }
    let client = client(&server).await;
    let all: Api<Pod> = Api::all(client.clone());

    // Changes between pages do not show: every page reads the first one's snapshot.
    let (keys, versions) = list_all(&all, 4, |page| {
        if page == 1 {
            server.delete::<Pod>(Some("gamma"), "p8");
            server.apply(&pod("gamma", "zz-created-after-page-1"));
            server.apply(&labelled("alpha", "p0", "updated"));
        }
    })
    .await;
    assert_eq!(versions.len(), 7, "27 pods in pages of 4: {versions:?}");
    assert!(
        versions.windows(2).all(|w| w[0] == w[1]),
        "one snapshot: {versions:?}"
    );
    let unique: BTreeSet<String> = keys.iter().cloned().collect();
    assert_eq!(unique.len(), keys.len(), "an object listed twice: {keys:?}");
    assert_eq!(unique, expected, "the snapshot of the first page");
    let snapshot = versions[0].clone();

    let beta: Api<Pod> = Api::namespaced(client.clone(), "beta");
    let (keys, versions) = list_all(&beta, 2, |_| {}).await;
    assert_eq!(versions.len(), 5, "9 pods of beta in pages of 2");
    let want: Vec<String> = (0..9).map(|i| format!("beta/p{i}")).collect();
    assert_eq!(keys, want);

    // An exact read of the first snapshot still shows gamma/p8, until compaction.
    let exact = ListParams::default()
        .at(&snapshot)
        .matching(VersionMatch::Exact);
    let old = all
        .list(&exact)
        .await
        .expect("an exact list at an older version");
    assert!(
        old.items.iter().any(|p| key(p) == "gamma/p8"),
        "the older version has gamma/p8"
    );
    let first = all
        .list(&ListParams::default().limit(5))
        .await
        .expect("a first page");
    let token = first.metadata.continue_.expect("a continue token");
    server.apply(&pod("gamma", "created-after-the-token"));
    server.compact();
    let err = all
        .list(&ListParams::default().limit(5).continue_token(&token))
        .await
        .expect_err("a continue token from before a compaction");
    assert_eq!(api_code(&err), Some((410, "Expired".into())), "{err}");
    let err = all
        .list(&exact)
        .await
        .expect_err("an exact list from before a compaction");
    assert_eq!(api_code(&err), Some((410, "Expired".into())), "{err}");

    // The server's page cap applies when the client asks for no limit.
    server.set_page_limit_max(Some(10));
    let page = all
        .list(&ListParams::default())
        .await
        .expect("a capped list");
    assert_eq!(page.items.len(), 10);
    assert!(
        page.metadata.continue_.is_some_and(|t| !t.is_empty()),
        "a capped list continues"
    );

    let err = all
        .list(&ListParams::default().labels("app=x"))
        .await
        .expect_err("a label selector");
    assert_eq!(api_code(&err).map(|c| c.0), Some(400), "{err}");
}

#[tokio::test]
async fn a_reflector_converges_through_creates_updates_and_deletes() {
    let server = start();
    server.set_page_limit_max(Some(5));
    for i in 0..12 {
        server.apply(&pod("default", &format!("p{i:02}")));
    }
    let api: Api<Pod> = Api::all(client(&server).await);
    let w = Watching::start(api, watcher::Config::default(), false);
    w.wait_inits_done(1).await;
    w.wait_matches(&server, "the initial list in the store")
        .await;
    assert_eq!(server.stats().lists_of("pods"), 3, "12 pods in pages of 5");

    for i in 12..22 {
        server.apply(&pod("other", &format!("p{i:02}")));
    }
    for i in 0..5 {
        server.apply(&labelled("default", &format!("p{i:02}"), "updated"));
    }
    for i in 5..11 {
        assert!(server.delete::<Pod>(Some("default"), &format!("p{i:02}")));
    }
    w.wait_matches(&server, "the store after creates, updates and deletes")
        .await;
    assert_eq!(w.contents().len(), 16);
    assert_eq!(w.count("Init"), 1, "no relist: {:?}", w.log());
    assert!(w.log().contains(&"Delete(default/p05)".to_owned()));
}

#[tokio::test]
async fn a_watcher_resumes_after_its_watch_is_dropped() {
    let server = start();
    server.apply(&pod("default", "before"));
    let api: Api<Pod> = Api::all(client(&server).await);
    let w = Watching::start(api, watcher::Config::default(), false);
    w.wait_inits_done(1).await;
    wait_for("a watch stream", || {
        (server.stats().open_watches == 1, server.stats())
    })
    .await;

    server.drop_watches();
    server.apply(&pod("default", "during-the-gap"));
    wait_for("the watcher to watch again", || {
        let s = server.stats();
        (s.watches_of("pods") >= 2 && s.open_watches == 1, s)
    })
    .await;
    server.apply(&pod("default", "after"));
    w.wait_matches(&server, "the events of the gap and after")
        .await;
    assert_eq!(
        server.stats().lists_of("pods"),
        1,
        "resumed from the last version, no relist"
    );
    assert_eq!(w.count("Init"), 1, "{:?}", w.log());
}

#[tokio::test]
async fn a_compaction_during_a_gap_makes_the_watcher_relist() {
    let server = start();
    for name in ["keep", "deleted-in-gap", "updated-in-gap"] {
        server.apply(&pod("default", name));
    }
    let api: Api<Pod> = Api::all(client(&server).await);
    let w = Watching::start(api.clone(), watcher::Config::default(), true);
    w.wait_inits_done(1).await;
    wait_for("a watch stream", || {
        (server.stats().open_watches == 1, server.stats())
    })
    .await;

    // Disconnect the watcher, change things, forget the history, come back.
    server.pause();
    wait_for("the watch to close", || {
        (server.stats().open_watches == 0, server.stats())
    })
    .await;
    assert!(server.delete::<Pod>(Some("default"), "deleted-in-gap"));
    server.apply(&labelled("default", "updated-in-gap", "new"));
    server.apply(&pod("default", "created-in-gap"));
    server.compact();
    server.resume();

    w.wait_inits_done(2).await;
    w.wait_matches(&server, "the relisted store").await;
    let names: BTreeSet<String> = w.store.state().iter().map(|p| p.name_any()).collect();
    assert!(
        !names.contains("deleted-in-gap"),
        "an object deleted in the gap is gone: {names:?}"
    );
    let log = w.log();
    assert!(
        log.contains(&"Error(watch event 410 Expired)".to_owned()),
        "the watch got 410 Gone: {log:?}"
    );
    assert_eq!(w.count("Init"), 2, "{log:?}");

    // A watcher that falls behind the kept history relists the same way.
    server.set_history_limit(2);
    server.pause();
    wait_for("the watch to close", || {
        (server.stats().open_watches == 0, server.stats())
    })
    .await;
    for name in ["a", "b", "c"] {
        server.apply(&pod("default", name));
    }
    assert!(server.delete::<Pod>(Some("default"), "keep"));
    server.resume();
    w.wait_inits_done(3).await;
    w.wait_matches(&server, "the store relisted after the history rolled over")
        .await;

    // A plain watch from a compacted version gets one ERROR event, 410.
    let mut stream = api
        .watch(&WatchParams::default(), "2")
        .await
        .expect("a watch from a compacted version starts")
        .boxed();
    match stream.next().await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected an ERROR event with 410, got {other:?}"),
    }
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the error"
    );
}

#[tokio::test]
async fn a_watcher_backs_off_through_an_outage_and_recovers() {
    let server = start();
    server.apply(&pod("default", "before"));
    let api: Api<Pod> = Api::all(client(&server).await);
    let w = Watching::start(api, watcher::Config::default(), true);
    w.wait_inits_done(1).await;
    wait_for("a watch stream", || {
        (server.stats().open_watches == 1, server.stats())
    })
    .await;

    server.pause();
    server.apply(&pod("default", "during-the-outage"));
    wait_for("two refused retries, reported as errors", || {
        let s = server.stats();
        let errors = w.log().iter().filter(|l| l.starts_with("Error(")).count();
        (s.refused >= 2 && errors >= 1, (s, w.log()))
    })
    .await;
    server.resume();
    server.apply(&pod("default", "after"));
    w.wait_matches(&server, "the store after the outage").await;
    assert_eq!(
        server.stats().lists_of("pods"),
        1,
        "history covered the outage: no relist"
    );

    // A restart in place: connections refused, then served on the same port.
    let before = server.stats().watches_of("pods");
    server.restart().expect("restart the server in place");
    server.apply(&pod("default", "after-restart"));
    w.wait_matches(&server, "the store after a restart").await;
    assert!(server.stats().watches_of("pods") > before);
    assert_eq!(w.count("Init"), 1, "{:?}", w.log());
}

#[tokio::test]
async fn bookmarks_arrive_when_asked_for() {
    let server = start();
    server.set_bookmark_interval(Duration::from_millis(100));
    server.apply(&pod("default", "a"));
    let api: Api<Pod> = Api::all(client(&server).await);
    server.apply(&Namespace {
        metadata: ObjectMeta {
            name: Some("unrelated".into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    });
    let now = server.resource_version();
    let mut stream = api
        .watch(&WatchParams::default().timeout(10), "0")
        .await
        .expect("a watch with bookmarks")
        .boxed();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no bookmark before the deadline; saw {seen:?}"));
        match event {
            Some(Ok(WatchEvent::Bookmark(b))) => {
                let rv: u64 = b
                    .metadata
                    .resource_version
                    .parse()
                    .expect("a numeric version");
                assert!(
                    rv >= now,
                    "a bookmark names the latest version ({now}), even of other resources: {rv}"
                );
                assert_eq!(b.types.kind, "Pod");
                break;
            }
            Some(Ok(WatchEvent::Added(p))) => seen.push(key(&p)),
            other => panic!("unexpected watch event {other:?} after {seen:?}"),
        }
    }
    assert_eq!(
        seen,
        ["default/a"],
        "synthetic ADDED for the current objects first"
    );

    // Without bookmarks, a 1 s watch ends cleanly with no event.
    let rv = server.resource_version().to_string();
    let events: Vec<_> = tokio::time::timeout(
        DEADLINE,
        api.watch(&WatchParams::default().disable_bookmarks().timeout(1), &rv)
            .await
            .expect("a watch without bookmarks")
            .collect::<Vec<_>>(),
    )
    .await
    .expect("timeoutSeconds=1 ends the stream");
    assert!(events.is_empty(), "no bookmarks unless asked: {events:?}");
}

#[tokio::test]
async fn a_watch_timeout_rewatches_from_the_last_version_without_relisting() {
    let server = start();
    server.apply(&pod("default", "a"));
    let api: Api<Pod> = Api::all(client(&server).await);
    let w = Watching::start(api, watcher::Config::default().timeout(1), false);
    w.wait_inits_done(1).await;
    server.apply(&pod("default", "b"));
    wait_for("three watches of 1 s", || {
        let s = server.stats();
        (s.watches_of("pods") >= 3, s)
    })
    .await;
    server.apply(&pod("default", "c"));
    w.wait_matches(&server, "the store across watch timeouts")
        .await;
    assert_eq!(
        server.stats().lists_of("pods"),
        1,
        "re-watched without relisting"
    );
    assert_eq!(w.count("Init"), 1, "{:?}", w.log());
}

#[tokio::test]
async fn a_streaming_list_watcher_gets_initial_events_and_their_end() {
    let server = start();
    for i in 0..5 {
        server.apply(&pod("default", &format!("p{i}")));
    }
    let api: Api<Pod> = Api::all(client(&server).await);
    let w = Watching::start(api, watcher::Config::default().streaming_lists(), false);
    w.wait_inits_done(1).await;
    server.apply(&pod("default", "later"));
    w.wait_matches(&server, "the streamed store").await;
    assert_eq!(
        server.stats().lists_of("pods"),
        0,
        "a streaming list does not LIST"
    );
}

#[tokio::test]
async fn http_writes_create_replace_with_conflicts_and_delete() {
    let server = start();
    let client = client(&server).await;
    let version = client.apiserver_version().await.expect("GET /version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "33")
    );
    let groups = client.list_api_groups().await.expect("GET /apis");
    let names: Vec<&str> = groups.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "networking.k8s.io",
            "discovery.k8s.io",
            "policy.networking.k8s.io",
            "palisade.io"
        ]
    );
    // The custom resources' group has both versions, the newest preferred;
    // without their CRDs it is not served at all.
    let policy = &groups.groups[2];
    let versions: Vec<&str> = policy.versions.iter().map(|v| v.version.as_str()).collect();
    assert_eq!(versions, ["v1alpha2", "v1alpha1"]);
    assert_eq!(
        policy
            .preferred_version
            .as_ref()
            .map(|v| v.version.as_str()),
        Some("v1alpha2")
    );
    server.set_crds_installed(false);
    let groups = client.list_api_groups().await.expect("GET /apis");
    assert_eq!(
        groups.groups.len(),
        2,
        "no custom groups without their CRDs"
    );
    let missing = client
        .list_api_group_resources("policy.networking.k8s.io/v1alpha1")
        .await
        .expect_err("not served");
    assert!(
        matches!(&missing, kube::Error::Api(s) if s.is_not_found()),
        "{missing:?}"
    );
    server.set_crds_installed(true);
    let core = client
        .list_core_api_resources("v1")
        .await
        .expect("GET /api/v1");
    assert!(
        core.resources
            .iter()
            .any(|r| r.name == "pods" && r.namespaced)
    );

    let api: Api<Pod> = Api::namespaced(client, "default");
    let mut events = api
        .watch(
            &WatchParams::default(),
            &server.resource_version().to_string(),
        )
        .await
        .expect("a watch")
        .boxed();

    let created = api
        .create(&PostParams::default(), &pod("default", "web"))
        .await
        .expect("create");
    let rv1 = created.resource_version().expect("a resourceVersion");
    assert!(created.uid().is_some() && created.creation_timestamp().is_some());
    let err = api
        .create(&PostParams::default(), &pod("default", "web"))
        .await
        .expect_err("a second create");
    assert_eq!(api_code(&err), Some((409, "AlreadyExists".into())), "{err}");

    let replaced = api
        .replace(
            "web",
            &PostParams::default(),
            &labelled("default", "web", "1"),
        )
        .await
        .expect("an unconditional replace");
    let rv2 = replaced.resource_version().expect("a resourceVersion");
    assert_eq!(replaced.uid(), created.uid(), "a replace keeps the uid");

    let mut stale = labelled("default", "web", "2");
    stale.metadata.resource_version = Some(rv1.clone());
    let err = api
        .replace("web", &PostParams::default(), &stale)
        .await
        .expect_err("a replace with a stale resourceVersion");
    assert_eq!(api_code(&err), Some((409, "Conflict".into())), "{err}");
    stale.metadata.resource_version = Some(rv2.clone());
    let rv3 = api
        .replace("web", &PostParams::default(), &stale)
        .await
        .expect("a replace with the current resourceVersion")
        .resource_version()
        .expect("a resourceVersion");

    api.delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    let err = api.get("web").await.expect_err("get after delete");
    assert_eq!(api_code(&err), Some((404, "NotFound".into())), "{err}");
    let err = api
        .delete("web", &DeleteParams::default())
        .await
        .expect_err("a second delete");
    assert_eq!(api_code(&err).map(|c| c.0), Some(404), "{err}");

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(DEADLINE, events.next())
            .await
            .unwrap_or_else(|_| panic!("4 events expected, saw {seen:?}"));
        match event {
            Some(Ok(WatchEvent::Added(p))) => seen.push(format!(
                "ADDED@{}",
                p.resource_version().unwrap_or_default()
            )),
            Some(Ok(WatchEvent::Modified(p))) => seen.push(format!(
                "MODIFIED@{}",
                p.resource_version().unwrap_or_default()
            )),
            Some(Ok(WatchEvent::Deleted(p))) => seen.push(format!(
                "DELETED@{}",
                p.resource_version().unwrap_or_default()
            )),
            Some(Ok(WatchEvent::Bookmark(_))) => {}
            other => panic!("unexpected watch event {other:?} after {seen:?}"),
        }
    }
    let rv4 = server.resource_version().to_string();
    assert_eq!(
        seen,
        [
            format!("ADDED@{rv1}"),
            format!("MODIFIED@{rv2}"),
            format!("MODIFIED@{rv3}"),
            format!("DELETED@{rv4}")
        ],
        "DELETED carries the object's last state at the deletion's version"
    );
}

/// The server binary, killed on drop.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // An error means it has already exited.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn control(client: &Client, action: &str) {
    let req = hyper::Request::post(format!("/_test/{action}"))
        .body(Vec::new())
        .expect("a control request");
    client
        .request_text(req)
        .await
        .unwrap_or_else(|e| panic!("POST /_test/{action}: {e}"));
}

#[tokio::test]
async fn the_binary_serves_loaded_objects_and_obeys_control_requests() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let objects = dir.path().join("objects.yaml");
    std::fs::write(
        &objects,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n---\n\
         apiVersion: v1\nkind: List\nitems:\n\
         - {apiVersion: v1, kind: Pod, metadata: {namespace: prod, name: web-1}}\n\
         - {apiVersion: v1, kind: Pod, metadata: {namespace: prod, name: web-2}}\n",
    )
    .expect("write the objects");
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade-kube-apiserver"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(&kubeconfig)
        .arg("--load")
        .arg(&objects)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run palisade-kube-apiserver");
    let stdout = child.stdout.take().expect("its stdout");
    let process = ServerProcess(child);
    let mut addr = String::new();
    BufReader::new(stdout)
        .read_line(&mut addr)
        .expect("read the address");
    assert!(
        addr.trim().starts_with("127.0.0.1:"),
        "the first line is the address: {addr:?}"
    );

    let client =
        client_from(Kubeconfig::read_from(&kubeconfig).expect("read the written kubeconfig")).await;
    let pods: Api<Pod> = Api::all(client.clone());
    let names: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .expect("list the loaded pods")
        .items
        .iter()
        .map(key)
        .collect();
    assert_eq!(names, ["prod/web-1", "prod/web-2"]);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.get("prod").await.expect("the loaded namespace");

    control(&client, "pause").await;
    pods.list(&ListParams::default())
        .await
        .expect_err("a list during an outage");
    control(&client, "resume").await;
    let rv = pods
        .list(&ListParams::default())
        .await
        .expect("a list after the outage")
        .metadata
        .resource_version
        .expect("a resourceVersion");
    control(&client, "compact").await;
    let mut stream = pods
        .watch(&WatchParams::default(), "1")
        .await
        .expect("a watch")
        .boxed();
    assert!(
        matches!(stream.next().await, Some(Ok(WatchEvent::Error(s))) if s.code == 410),
        "a watch from before the compaction gets 410"
    );
    let mut stream = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("a watch")
        .boxed();
    Api::<Pod>::namespaced(client.clone(), "prod")
        .create(&PostParams::default(), &pod("prod", "web-3"))
        .await
        .expect("create over HTTP");
    assert!(
        matches!(stream.next().await, Some(Ok(WatchEvent::Added(p))) if p.name_any() == "web-3"),
        "the watch sees the created pod"
    );
    control(&client, "drop-watches").await;
    let rest = tokio::time::timeout(DEADLINE, stream.collect::<Vec<_>>())
        .await
        .expect("drop-watches ends the stream");
    assert!(
        rest.iter().all(|e| !matches!(e, Ok(WatchEvent::Added(_)))),
        "{rest:?}"
    );
    drop(process);
}
