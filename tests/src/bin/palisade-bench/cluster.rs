//! Cluster scale through the test API server: one node's agent in cluster
//! mode facing a large cluster (pods on thousands of other nodes, many
//! namespaces and policies). Initial sync time, the agent's memory, and
//! event-to-datapath latency under a steady stream of pod events.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerPort, Namespace, Node as KubeNode, NodeAddress, NodeStatus, Pod,
            PodIP, PodSpec, PodStatus,
        },
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use testbed::cluster::{Cluster, Topology};

use crate::{Config, Report, stats::Table};

/// The cluster's shape.
#[derive(Debug, Clone, Copy)]
struct Scale {
    pods: usize,
    nodes: usize,
    namespaces: usize,
    policies: usize,
}

const APPS: usize = 15;
/// Pods on the node under test (a node of a 150,000-pod, 5,000-node
/// cluster runs 30 on average).
const LOCAL_PODS: usize = 30;
const TEAMS: usize = 50;

fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 128 + (i >> 16), (i >> 8) & 255, i & 255)
}

fn namespace(i: usize) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(format!("ns-{i}")),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/metadata.name".to_owned(), format!("ns-{i}")),
                ("team".to_owned(), format!("t{}", i % TEAMS)),
            ])),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn node(i: usize) -> KubeNode {
    KubeNode {
        metadata: ObjectMeta {
            // node-0 is the node under test (the cluster test bed's).
            name: Some(format!("node-{i}")),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: format!("172.16.{}.{}", i >> 8, i & 255),
            }]),
            ..Default::default()
        }),
    }
}

fn pod(i: usize, s: Scale, generation: usize) -> Pod {
    let per_ns = s.pods.div_ceil(s.namespaces);
    let ns = i / per_ns;
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("p-{i}")),
            namespace: Some(format!("ns-{ns}")),
            labels: Some(BTreeMap::from([
                ("app".to_owned(), format!("a{}", (i + generation) % APPS)),
                ("tier".to_owned(), format!("{}", i % 3)),
            ])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            // Spread over the other nodes (node-0 runs none of them: its
            // pods would need real sandboxes).
            node_name: Some(format!("node-{}", 1 + i % (s.nodes - 1))),
            containers: vec![Container {
                name: "c".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: 8080,
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(pod_ip(i)),
            pod_ips: Some(vec![PodIP { ip: pod_ip(i) }]),
            ..Default::default()
        }),
    }
}

/// Policy `k` of namespace `ns`: selects one app, admits another app of
/// the namespace on a named port; every fifth also admits a team's
/// namespaces.
fn policy(ns: usize, k: usize) -> NetworkPolicy {
    let mut from = vec![
        serde_json::json!({"podSelector": {"matchLabels": {"app": format!("a{}", (k + 1) % APPS)}}}),
    ];
    if k.is_multiple_of(5) {
        from.push(serde_json::json!({
            "namespaceSelector": {"matchLabels": {"team": format!("t{}", (ns + k) % TEAMS)}},
            "podSelector": {"matchLabels": {"tier": "0"}}
        }));
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": format!("np-{k}"), "namespace": format!("ns-{ns}")},
        "spec": {
            "podSelector": {"matchLabels": {"app": format!("a{}", k % APPS)}},
            "ingress": [{"from": from, "ports": [{"port": "http"}, {"port": 9090}]}]
        }
    }))
    .expect("policy")
}

/// GET a path of the daemon's HTTP endpoint (inside the node namespace).
fn http_get(c: &Cluster, path: &str) -> Option<(u16, String)> {
    c.nodes[0].netns.run(|| {
        let mut s = TcpStream::connect("127.0.0.1:9970").ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((code, body))
    })
}

fn rss_mib(pid: u32) -> Option<f64> {
    proc_status_mib(pid, "VmRSS:")
}

/// The highest RSS the process has had.
fn peak_mib(pid: u32) -> Option<f64> {
    proc_status_mib(pid, "VmHWM:")
}

fn proc_status_mib(pid: u32, field: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

#[derive(Debug, Default)]
struct Outcome {
    load_s: f64,
    sync_s: Option<f64>,
    rss_synced: Option<f64>,
    rss_after: Option<f64>,
    rss_peak: Option<f64>,
    events: usize,
    rate: f64,
    lag_p50: Option<f64>,
    lag_p99: Option<f64>,
    ipcache: Option<u64>,
    policy_entries: Option<u64>,
}

fn measure(s: Scale, stream_secs: u64) -> Outcome {
    let mut out = Outcome::default();
    // 150,000 remote pods: a large node's capacities.
    let mut palisade = serde_json::Map::new();
    palisade.insert("mapSizes".into(), testbed::node::large_map_sizes());
    let c = Cluster::new(1, Topology::HostGw, false, palisade);
    // The agent starts on a full API server, as on a new node.
    c.nodes[0].kill_daemon();
    let start = Instant::now();
    for i in 1..s.nodes {
        c.api.apply(&node(i));
    }
    for i in 0..s.namespaces {
        c.api.apply(&namespace(i));
    }
    let per_ns = s.policies.div_ceil(s.namespaces);
    for k in 0..s.policies {
        c.api.apply(&policy(k / per_ns, k % per_ns));
    }
    for i in 0..s.pods {
        c.api.apply(&pod(i, s, 0));
    }
    // This node's own pods: Pod objects on node-0, and endpoints as a CNI
    // ADD would have registered them (store records without a veth).
    let local = LOCAL_PODS.min(s.namespaces);
    for k in 0..local {
        let mut p = pod(k, s, 0);
        p.metadata.name = Some(format!("local-{k}"));
        p.metadata.namespace = Some(format!("ns-{k}"));
        let ip = format!("10.200.0.{}", k + 1);
        if let Some(spec) = p.spec.as_mut() {
            spec.node_name = Some("node-0".into());
        }
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.clone()),
            pod_ips: Some(vec![PodIP { ip }]),
            ..Default::default()
        });
        c.api.apply(&p);
    }
    crate::control::seed(
        &c.nodes[0],
        (0..local).map(|k| {
            (
                format!("ns-{k}"),
                format!("local-{k}"),
                BTreeMap::new(),
                std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 200, 0, k as u8 + 1)),
            )
        }),
    );
    out.load_s = start.elapsed().as_secs_f64();
    eprintln!(
        "cluster bench: {} pods, {} nodes, {} namespaces, {} policies loaded into the API in {:.1} s",
        s.pods, s.nodes, s.namespaces, s.policies, out.load_s
    );

    let start = Instant::now();
    c.nodes[0].start_daemon();
    loop {
        if let Some((200, _)) = http_get(&c, "/readyz") {
            out.sync_s = Some(start.elapsed().as_secs_f64());
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            eprintln!(
                "cluster bench: no first sync within 600 s:\n{}",
                c.nodes[0].daemon_output()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = c.nodes[0].daemon_pid();
    out.rss_synced = pid.and_then(rss_mib);

    // A steady stream of pod events: relabels, and pods deleted and
    // created again, 200 a second.
    let rate = 200.0;
    let total = (stream_secs as f64 * rate) as usize;
    let start = Instant::now();
    for e in 0..total {
        let due = Duration::from_secs_f64(e as f64 / rate);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let i = (e * 7919) % s.pods;
        match e % 4 {
            0 => {
                let p = pod(i, s, 0);
                c.api
                    .delete::<Pod>(p.metadata.namespace.as_deref(), &format!("p-{i}"));
            }
            1 => {
                let i = ((e - 1) * 7919) % s.pods;
                c.api.apply(&pod(i, s, 0));
            }
            _ => {
                c.api.apply(&pod(i, s, e));
            }
        }
    }
    out.events = total;
    out.rate = total as f64 / start.elapsed().as_secs_f64();
    // Let the last events land.
    std::thread::sleep(Duration::from_secs(2));
    out.rss_after = pid.and_then(rss_mib);
    out.rss_peak = pid.and_then(peak_mib);
    let st = c.nodes[0].ctl(&["status", "-o", "json"], None);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&st.stdout) {
        let cl = &v["daemon"]["cluster"];
        out.lag_p50 = cl["lagP50Ms"].as_f64();
        out.lag_p99 = cl["lagP99Ms"].as_f64();
        for m in v["datapath"]["maps"].as_array().into_iter().flatten() {
            match m["name"].as_str() {
                Some("pal_ipcache" | "pal_ipcache_host") => {
                    out.ipcache =
                        Some(out.ipcache.unwrap_or(0) + m["entries"].as_u64().unwrap_or(0));
                }
                Some("pal_policy") => out.policy_entries = m["entries"].as_u64(),
                _ => {}
            }
        }
    } else {
        eprintln!(
            "cluster bench: status failed: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    if let Some((_, metrics)) = http_get(&c, "/metrics") {
        for l in metrics.lines().filter(|l| {
            l.starts_with("palisade_kube_watch_restarts") || l.starts_with("palisade_kube_relists")
        }) {
            eprintln!("cluster bench: {l}");
        }
    }
    out
}

pub fn run(cfg: &Config, report: &mut Report) {
    let (s, secs) = if cfg.short {
        (
            Scale {
                pods: 3_000,
                nodes: 100,
                namespaces: 40,
                policies: 200,
            },
            5,
        )
    } else {
        (
            Scale {
                pods: 150_000,
                nodes: 5_000,
                namespaces: 2_000,
                policies: 10_000,
            },
            30,
        )
    };
    let o = measure(s, secs);
    let f = |v: Option<f64>, d: usize| v.map_or("—".into(), |x| format!("{x:.d$}"));
    let mut body = String::new();
    let _ = writeln!(
        body,
        "One node's agent (`palisadectl daemon --kubernetes`, release build) against the test API \
         server (a list/watch double, see README: no kube-apiserver can be installed here) holding \
         {} pods spread over {} other nodes, {} namespaces ({} team labels), {} NetworkPolicies \
         ({} per namespace: one app admits another on a named port and a number; every fifth \
         also admits tier 0 of a team's namespaces). Those pods are remote: each address gets \
         its identity in this node's ipcache. The node itself runs {LOCAL_PODS} pods (endpoint \
         records without veths) that the policies select, so peer changes rewrite their policy \
         entries. Initial sync: from the daemon's start to `/readyz` \
         answering 200 (every resource listed, the whole state in the store and the maps). Then \
         a stream of pod events for {secs} s at 200/s (relabels, deletions and re-creations); \
         event-to-datapath is the agent's own measure, from an event's arrival on its watch to \
         its change being in the maps and committed (`palisadectl status`; the loopback watch \
         delivery before it is not included). Loading the objects into the API server took \
         {:.1} s (not part of any figure).\n",
        s.pods,
        s.nodes - 1,
        s.namespaces,
        TEAMS,
        s.policies,
        s.policies.div_ceil(s.namespaces),
        o.load_s
    );
    let mut t = Table::new(&[
        "initial sync s",
        "agent RSS synced MiB",
        "agent RSS after events MiB",
        "agent peak RSS MiB",
        "events",
        "rate /s",
        "event to datapath p50 ms",
        "p99 ms",
        "ipcache entries",
        "policy entries",
    ]);
    t.row(vec![
        f(o.sync_s, 1),
        f(o.rss_synced, 1),
        f(o.rss_after, 1),
        f(o.rss_peak, 1),
        o.events.to_string(),
        format!("{:.0}", o.rate),
        f(o.lag_p50, 1),
        f(o.lag_p99, 1),
        o.ipcache.map_or("—".into(), |v| v.to_string()),
        o.policy_entries.map_or("—".into(), |v| v.to_string()),
    ]);
    body.push_str(&t.render());
    body.push_str(
        "\nService traffic at node level (the per-packet cost of judging it on its backend, \
         and ClusterIP vs direct throughput) is its own section, \"Service traffic\".\n",
    );
    report.section("Cluster scale (Kubernetes cluster mode)", body);
    report.measured("cluster initial sync s", o.sync_s);
    report.measured("cluster agent RSS MiB", o.rss_after);
    report.measured("cluster event to datapath p99 ms", o.lag_p99);
    if !cfg.short {
        report.target(
            "cluster initial sync < 20 s (150k pods, 10k policies)",
            &f(o.sync_s, 1),
            o.sync_s.is_some_and(|v| v < 20.0),
            "",
        );
        let rss = match (o.rss_synced, o.rss_after) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        report.target(
            "cluster agent RSS < 400 MiB (after the first sync and under events)",
            &f(rss, 1),
            rss.is_some_and(|v| v < 400.0),
            "Missed by about 1.5x (it was 1661 MiB before the agent stopped reading the whole \
             store for metrics and flow names and started applying lists as they arrive). heaptrack \
             on a second run of the same bench (the agent under heaptrack, release build): heap at its peak 473 MiB, \
             during the first sync; live after the event stream 358 MiB, of which the Pod objects' \
             label maps about 80 MiB, the engine's endpoint records for remote pods about 95 MiB, \
             its pod table 38 MiB and per-pod index 19 MiB, identities about 20 MiB, the agent's \
             key sets per kind 13 MiB. The rest of the RSS is what glibc keeps of the sync's peak, \
             code and stacks. What would bring it down: one shared label set per distinct set of \
             labels (pods of one ReplicaSet share theirs), remote-pod records reduced to addresses \
             and an identity instead of full endpoint records, and smaller batches during the first \
             list (the peak).",
        );
        report.target(
            "cluster event-to-datapath p99 < 100 ms at 200 pod events/s",
            &f(o.lag_p99, 1),
            o.lag_p99.is_some_and(|v| v < 100.0),
            "",
        );
    }
}
