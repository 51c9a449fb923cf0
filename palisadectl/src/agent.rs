//! `palisadectl agent`: the node agent. Drains the datapath's flow events
//! into the size-capped flow log and serves Prometheus metrics. It only
//! reads: enforcement lives in pinned kernel objects and never depends on
//! the agent running (killing it changes no verdict).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use palisade::{
    dataplane::{AttachMode, Dataplane, events::EventReader, kernel::KernelDataplane},
    flows::{FlowLog, Resolver},
    store::Store,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::observe::{log_dir, pid_file};

/// Agent settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub state_dir: PathBuf,
    pub bpf_root: PathBuf,
    pub listen: String,
    pub log_dir: Option<PathBuf>,
    pub log_max_bytes: u64,
    pub log_files: u32,
    /// The daemon this agent runs in (for readiness).
    pub server: Option<Arc<palisade::daemon::Server>>,
    /// Cluster mode's metrics.
    pub cluster: Option<Arc<crate::cluster::Metrics>>,
    /// Queries the DNS proxy answered, to write into the flow log.
    pub dns_records: Option<crate::dns::Records>,
    /// Requests the L7 proxy judged, to write into the flow log.
    pub http_records: Option<crate::l7::Records>,
    /// Map capacities given on the command line (`--map-size`).
    pub map_sizes: Option<palisade::dataplane::MapSizes>,
    /// The web console's records, fed as the log is written.
    pub console: Option<Arc<crate::console::Feed>>,
}

type Labels = Vec<(String, String)>;

/// A record's metric labels: who saw it, which way, the verdict and the
/// deciding policy.
fn metric_labels(r: &palisade::flows::FlowRecord) -> Labels {
    vec![
        (
            "namespace".to_owned(),
            r.endpoint.namespace.clone().unwrap_or_default(),
        ),
        (
            "pod".to_owned(),
            r.endpoint.name.clone().unwrap_or_default(),
        ),
        ("direction".to_owned(), r.direction.as_str().to_owned()),
        ("verdict".to_owned(), r.verdict.as_str().to_owned()),
        ("policy".to_owned(), r.policy.clone().unwrap_or_default()),
    ]
}

/// What the agent counted itself (flow events by who and why).
#[derive(Debug, Default)]
struct Stats {
    events: BTreeMap<Labels, u64>,
    /// HTTP requests the L7 proxy judged, by the same labels.
    http: BTreeMap<Labels, u64>,
    log_dropped: u64,
}

fn metrics(opts: &Options, stats: &Mutex<Stats>) -> Result<String> {
    let mut reg = Registry::default();
    // Names only: in cluster mode the store holds every pod of the
    // cluster, and a scrape must not read them all.
    let names = Store::new(&opts.state_dir).endpoint_names()?;

    let endpoints = Gauge::<i64>::default();
    endpoints.set(i64::try_from(names.len()).unwrap_or(i64::MAX));
    reg.register(
        "palisade_endpoints",
        "Endpoints palisade enforces on",
        endpoints,
    );

    let mut dp = KernelDataplane::new(&opts.bpf_root, AttachMode::Auto);
    if dp.open_existing().unwrap_or(false) {
        let st = dp.status()?;
        let entries = Family::<Labels, Gauge<i64>>::default();
        let capacity = Family::<Labels, Gauge<i64>>::default();
        for m in &st.maps {
            let l = vec![("map".to_owned(), m.name.clone())];
            entries
                .get_or_create(&l)
                .set(i64::try_from(m.entries).unwrap_or(i64::MAX));
            capacity.get_or_create(&l).set(i64::from(m.max_entries));
        }
        reg.register(
            "palisade_map_entries",
            "Entries in each datapath map",
            entries,
        );
        reg.register(
            "palisade_map_capacity",
            "Maximum entries of each datapath map",
            capacity,
        );

        let lost = Family::<Labels, Counter>::default();
        lost.get_or_create(&vec![("cause".into(), "rate_limited".into())])
            .inc_by(st.events_rate_limited);
        lost.get_or_create(&vec![("cause".into(), "ring_buffer_full".into())])
            .inc_by(st.events_ringbuf_full);
        reg.register(
            "palisade_flow_events_lost",
            "Flow events the datapath did not deliver",
            lost,
        );
        let sent = Counter::<u64>::default();
        sent.inc_by(st.events_sent);
        reg.register(
            "palisade_flow_events_sent",
            "Flow events the datapath delivered",
            sent,
        );

        let packets = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        for c in dp.counters()? {
            let (ns, pod) = names.get(&c.ep_id).cloned().unwrap_or_default();
            let l = vec![
                ("namespace".to_owned(), ns),
                ("pod".to_owned(), pod),
                ("direction".to_owned(), c.direction.as_str().to_owned()),
                ("verdict".to_owned(), c.verdict.as_str().to_owned()),
                ("reason".to_owned(), c.reason.to_string()),
            ];
            packets.get_or_create(&l).inc_by(c.packets);
            bytes.get_or_create(&l).inc_by(c.bytes);
        }
        reg.register(
            "palisade_packets",
            "Packets per endpoint, direction, verdict and reason",
            packets,
        );
        reg.register(
            "palisade_bytes",
            "Bytes per endpoint, direction, verdict and reason",
            bytes,
        );
    }

    let flows = Family::<Labels, Counter>::default();
    let http = Family::<Labels, Counter>::default();
    let dropped = Counter::<u64>::default();
    {
        let s = stats
            .lock()
            .map_err(|_| anyhow::anyhow!("agent statistics lock poisoned"))?;
        for (l, n) in &s.events {
            flows.get_or_create(l).inc_by(*n);
        }
        for (l, n) in &s.http {
            http.get_or_create(l).inc_by(*n);
        }
        dropped.inc_by(s.log_dropped);
    }
    reg.register(
        "palisade_flows",
        "Flow events the agent logged, by namespace, pod, direction, verdict and deciding policy",
        flows,
    );
    reg.register(
        "palisade_http_requests",
        "HTTP requests the L7 proxy judged, by namespace, pod (whose rules decided), direction, verdict and deciding policy",
        http,
    );
    reg.register(
        "palisade_flow_log_dropped",
        "Flow records too large for the log",
        dropped,
    );

    if let Some(m) = &opts.cluster {
        reg.register(
            "palisade_kube_event_to_datapath_seconds",
            "From a Kubernetes API event's arrival to its change being in the datapath maps",
            m.lag.clone(),
        );
        reg.register(
            "palisade_kube_events",
            "Kubernetes API events applied",
            m.events.clone(),
        );
        reg.register(
            "palisade_kube_watch_restarts",
            "Kubernetes watches that failed and were started again",
            m.watch_restarts.clone(),
        );
        reg.register(
            "palisade_kube_relists",
            "Full relists after the first (410 Gone, lost watches)",
            m.relists.clone(),
        );
        if let Some(st) = opts.server.as_ref().and_then(|s| s.cluster_status()) {
            let objects = Family::<Labels, Gauge<i64>>::default();
            for (kind, n) in &st.objects {
                objects
                    .get_or_create(&vec![("resource".to_owned(), kind.clone())])
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
            reg.register(
                "palisade_kube_objects",
                "Objects known from the Kubernetes API, by resource",
                objects,
            );
            let synced = Gauge::<i64>::default();
            synced.set(i64::from(st.synced));
            reg.register(
                "palisade_kube_synced",
                "1 once every watched resource has been listed and applied",
                synced,
            );
        }
    }

    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

fn serve(opts: Options, stats: Arc<Mutex<Stats>>) -> Result<()> {
    let server = tiny_http::Server::http(&opts.listen)
        .map_err(|e| anyhow::anyhow!("listen on {}: {e}", opts.listen))?;
    for req in server.incoming_requests() {
        let resp = if req.url() == "/healthz" {
            tiny_http::Response::from_string("ok\n")
        } else if req.url() == "/readyz" {
            // Ready: the daemon serves; in cluster mode, once the first
            // full sync from the API server is in the maps.
            match opts.server.as_ref().map(|s| s.cluster_status()) {
                Some(Some(st)) if !st.synced => tiny_http::Response::from_string(
                    "not ready: the first sync from the Kubernetes API server is not complete\n",
                )
                .with_status_code(503),
                _ => tiny_http::Response::from_string("ok\n"),
            }
        } else if req.url() == "/metrics" {
            match metrics(&opts, &stats) {
                Ok(text) => tiny_http::Response::from_string(text).with_header(
                    tiny_http::Header::from_bytes("Content-Type", "text/plain; version=0.0.4")
                        .map_err(|()| anyhow::anyhow!("header"))?,
                ),
                Err(e) => tiny_http::Response::from_string(format!("{e:#}")).with_status_code(500),
            }
        } else {
            tiny_http::Response::from_string("palisade agent: see /metrics\n").with_status_code(404)
        };
        let _ = req.respond(resp);
    }
    Ok(())
}

/// Run until killed.
pub fn run(opts: Options) -> Result<()> {
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("create {}", opts.state_dir.display()))?;
    std::fs::write(pid_file(&opts.state_dir), std::process::id().to_string())
        .context("write the agent's pid file")?;
    let dir = opts
        .log_dir
        .clone()
        .unwrap_or_else(|| log_dir(&opts.state_dir));
    let mut log = FlowLog::open(&dir, opts.log_max_bytes, opts.log_files)
        .with_context(|| format!("open the flow log in {}", dir.display()))?;
    let stats = Arc::new(Mutex::new(Stats::default()));
    {
        let (o, s) = (opts.clone(), stats.clone());
        thread::spawn(move || {
            if let Err(e) = serve(o, s) {
                eprintln!("palisade agent: metrics server stopped: {e:#}");
            }
        });
    }
    eprintln!(
        "palisade agent: flow log in {} (at most {} bytes), metrics on http://{}/metrics",
        dir.display(),
        opts.log_max_bytes,
        opts.listen
    );
    // The ring buffer exists once the datapath is loaded (first container).
    let mut reader = loop {
        match EventReader::open(&opts.bpf_root) {
            Ok(r) => break r,
            Err(_) => thread::sleep(Duration::from_secs(1)),
        }
    };
    let store = Store::new(&opts.state_dir);
    let mut seen = store.generation().unwrap_or_default();
    let mut resolver = Resolver::new(&store.read_names()?);
    if opts.cluster.is_some() {
        crate::cluster::trim_heap();
    }
    let mut last_flush = Instant::now();
    // Endpoints an early read of the store was made for (see below).
    let mut tried = std::collections::BTreeSet::new();
    let mut tried_since = Instant::now();
    // In cluster mode the store changes many times a second and holds
    // every pod of the cluster: names are read again at most this often.
    let mut last_read = Instant::now();
    let reread_every = if opts.cluster.is_some() {
        Duration::from_secs(2)
    } else {
        Duration::ZERO
    };
    loop {
        reader.wait(Duration::from_millis(200));
        let events = reader.drain();
        let dns: Vec<palisade::dnsproxy::DnsRecord> = opts
            .dns_records
            .as_ref()
            .map(|r| std::mem::take(&mut *r.lock().unwrap_or_else(|p| p.into_inner())))
            .unwrap_or_default();
        let http: Vec<palisade::l7::HttpRecord> = opts
            .http_records
            .as_ref()
            .map(|r| std::mem::take(&mut *r.lock().unwrap_or_else(|p| p.into_inner())))
            .unwrap_or_default();
        if events.is_empty() && dns.is_empty() && http.is_empty() {
            if last_flush.elapsed() > Duration::from_millis(500) {
                log.flush()?;
                last_flush = Instant::now();
            }
            continue;
        }
        // Names and policies changed: read them again (at once when an
        // event comes from an endpoint the names do not know yet: a pod
        // that just started must not be logged without its name).
        let g = store.generation().unwrap_or_default();
        // Once per endpoint: one being removed may keep sending events the
        // store no longer names.
        if tried_since.elapsed() > Duration::from_secs(60) {
            tried.clear();
            tried_since = Instant::now();
        }
        let unknown: Vec<u32> = events
            .iter()
            .map(|e| e.ep_id)
            .filter(|id| !resolver.knows_endpoint(*id) && !tried.contains(id))
            .collect();
        if g != seen
            && (last_read.elapsed() >= reread_every || !unknown.is_empty())
            && let Ok(st) = store.read_names()
        {
            seen = g;
            last_read = Instant::now();
            tried.extend(unknown);
            resolver = Resolver::new(&st);
            drop(st);
            if opts.cluster.is_some() {
                crate::cluster::trim_heap();
            }
        }
        let mut s = stats
            .lock()
            .map_err(|_| anyhow::anyhow!("agent statistics lock poisoned"))?;
        let mut fed = Vec::new();
        for e in &events {
            let r = resolver.resolve(e, reader.wall_time(e.ts_ns));
            *s.events.entry(metric_labels(&r)).or_default() += 1;
            if !log.append(&r).context("write the flow log")? {
                s.log_dropped += 1;
            }
            if opts.console.is_some() {
                fed.push(r);
            }
        }
        for d in &dns {
            let r = resolver.resolve_dns(d, std::time::SystemTime::now());
            if !log.append(&r).context("write the flow log")? {
                s.log_dropped += 1;
            }
        }
        for h in &http {
            let r = resolver.resolve_http(h, std::time::SystemTime::now());
            *s.http.entry(metric_labels(&r)).or_default() += 1;
            if !log.append(&r).context("write the flow log")? {
                s.log_dropped += 1;
            }
        }
        drop(s);
        if let Some(feed) = &opts.console {
            feed.push(fed);
        }
        if last_flush.elapsed() > Duration::from_millis(500) {
            log.flush()?;
            last_flush = Instant::now();
        }
    }
}
