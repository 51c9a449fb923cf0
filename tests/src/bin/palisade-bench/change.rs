//! The cost of one change: on nodes holding 100 to 10,000 policies and 100
//! to 10,000 endpoints, with the node daemon running (the default
//! deployment), how long each kind of change takes through the real
//! commands and plugins; the bulk apply that fills the node, the daemon's
//! restart to reconciled maps, and the memory of the daemon and the store.

use std::{
    collections::BTreeMap,
    fmt::Write,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use palisade::daemon::{Client, DaemonStatus, Request, default_socket};
use testbed::{
    node::{Node, NodeOptions},
    sys::Netns,
};

use crate::{
    Config, Report,
    control::{APPS, CniRun, cni_batch, ctl_file, ms, policies_yaml, seed, seed_endpoints},
    stats::{Samples, Table, percentile},
    traffic::plain_chain,
};

/// The kinds of change, in table order.
const CHANGES: [&str; 4] = [
    "apply one policy",
    "delete one policy",
    "relabel one pod",
    "relabel one namespace",
];

/// Containers per CNI batch.
const PER_BATCH: usize = 20;

#[derive(Default)]
struct Cost {
    /// Command wall time, ms, by kind of change.
    change: BTreeMap<&'static str, Samples>,
    /// CNI wall times, ms, by (chain, at once).
    cni: BTreeMap<(&'static str, usize), CniRun>,
    bulk_ms: f64,
    restart_ms: Samples,
    restart_log: String,
    daemon_rss_kib: Option<u64>,
    store_kib: u64,
    map_entries: u64,
}

fn daemon_status(n: &Node) -> DaemonStatus {
    Client::connect(&default_socket(&n.state_dir), &n.bpf_root)
        .expect("the daemon answers")
        .call(Request::Status)
        .expect("daemon status")
}

fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn store_kib(n: &Node) -> u64 {
    ["palisade.db", "palisade.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(n.state_dir.join(f)).ok())
        .map(|m| m.len())
        .sum::<u64>()
        / 1024
}

fn policy_entries(n: &Node) -> u64 {
    let out = n.ctl(&["status", "-o", "json"], None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["datapath"]["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["name"] == "pal_policy")
        .filter_map(|m| m["entries"].as_u64())
        .sum()
}

/// The namespace whose objects the measured changes touch: two endpoints,
/// one policy admitting one of them (by pod and namespace labels) to the
/// other. Whatever the node holds besides, these changes touch the same few
/// entries, so their cost shows what the rest of the state adds.
const PROBE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: probe, labels: {team: red}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: probe-a, namespace: probe}
spec:
  podSelector: {matchLabels: {app: probe-a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: red}}, podSelector: {matchLabels: {app: probe-b}}}]
    ports: [{port: 80}]
"#;

const ONE_MORE: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: one-more, namespace: probe}
spec:
  podSelector: {matchLabels: {app: probe-b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: probe-a}}}]
    ports: [{port: 81}]
"#;

fn namespace(team: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: probe, labels: {{team: {team}}}}}\n"
    )
}

fn pod(app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: probe-1, namespace: probe, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c}}]}}\n"
    )
}

/// One node of `e` endpoints and `p` policies, measured.
fn measure(cfg: &Config, p: usize, e: usize) -> Cost {
    let mut cost = Cost::default();
    let node = Node::new(NodeOptions {
        daemon: true,
        palisade: large(),
        ..NodeOptions::default()
    });
    seed_endpoints(&node, e);
    seed(
        &node,
        ["probe-a", "probe-b"].iter().enumerate().map(|(i, app)| {
            (
                "probe".to_owned(),
                format!("probe-{i}"),
                [("app".to_string(), app.to_string())].into(),
                IpAddr::V4(Ipv4Addr::new(10, 201, 0, i as u8 + 1)),
            )
        }),
    );
    ctl_file(&node, "apply", PROBE);
    cost.bulk_ms = ms(ctl_file(&node, "apply", &policies_yaml(p)));
    let reps = if cfg.short { 1 } else { 2 * cfg.reps };
    for rep in 0..reps {
        eprintln!(
            "  cost of one change: {p} policies, {e} endpoints, rep {} of {reps}",
            rep + 1
        );
        let mut push = |k: &'static str, v: f64| cost.change.entry(k).or_default().push(v);
        push(CHANGES[0], ms(ctl_file(&node, "apply", ONE_MORE)));
        push(CHANGES[1], ms(ctl_file(&node, "delete", ONE_MORE)));
        let (app, team) = if rep % 2 == 0 {
            ("probe-c", "blue")
        } else {
            ("probe-b", "red")
        };
        push(CHANGES[2], ms(ctl_file(&node, "apply", &pod(app))));
        push(CHANGES[3], ms(ctl_file(&node, "apply", &namespace(team))));
    }

    // CNI ADD and DEL of real containers, beside the bridge plugin alone.
    let plain = plain_chain(&node);
    let netns: Vec<Netns> = (0..PER_BATCH)
        .map(|i| Netns::new(&format!("{}k{i}", node.prefix)))
        .collect();
    let batches = if cfg.short { 1 } else { cfg.reps.div_ceil(2) };
    for b in 0..batches {
        for parallel in [1, PER_BATCH] {
            for (name, chain) in [("bridge", &plain), ("palisade", &node.chain)] {
                let r = cni_batch(chain, &format!("{name}{b}p{parallel}"), &netns, parallel);
                cost.cni.entry((name, parallel)).or_default().extend(r);
            }
        }
    }
    drop(netns);
    drop(plain);

    cost.map_entries = policy_entries(&node);
    cost.daemon_rss_kib = rss_kib(daemon_status(&node).pid);
    cost.store_kib = store_kib(&node);
    for _ in 0..if cfg.short { 1 } else { cfg.reps } {
        node.kill_daemon();
        let before = node.daemon_output().len();
        let start = Instant::now();
        node.start_daemon();
        cost.restart_ms.push(ms(start.elapsed()));
        // What the daemon says it did at start: how long each step took,
        // and what it wrote.
        let said = node.daemon_output()[before..].to_owned();
        let steps = said
            .lines()
            .find_map(|l| l.split_once("start: ").map(|(_, s)| s.to_owned()))
            .unwrap_or_default();
        let wrote = said
            .lines()
            .find_map(|l| {
                l.split_once("reconciled in ")
                    .and_then(|(_, s)| s.split_once('('))
                    .map(|(_, s)| s.trim_end_matches(')').to_owned())
            })
            .unwrap_or_default();
        cost.restart_log = format!("{steps}; {wrote}");
    }
    cost
}

pub fn run(cfg: &Config, report: &mut Report) -> String {
    let sizes: Vec<(usize, usize)> = if !cfg.sizes.is_empty() {
        cfg.sizes.clone()
    } else if cfg.short {
        vec![(100, 100), (1_000, 100)]
    } else {
        let counts = [100, 1_000, 10_000];
        counts
            .iter()
            .flat_map(|&p| counts.iter().map(move |&e| (p, e)))
            .collect()
    };
    let costs: Vec<((usize, usize), Cost)> = sizes
        .iter()
        .map(|&(p, e)| ((p, e), measure(cfg, p, e)))
        .collect();
    let smallest = sizes[0];
    let largest = *sizes.last().expect("sizes");
    let by_size: BTreeMap<(usize, usize), &Cost> = costs.iter().map(|(k, c)| (*k, c)).collect();

    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### Cost of one change\n\n\
         A node with the node daemon running (the default deployment) holds *P* NetworkPolicies \
         and *E* endpoints in namespace `bench` ({APPS} distinct `app` labels; the endpoints are \
         store records with real addresses and labels and no veth). Each policy selects one \
         app and admits another on one port; every tenth also limits egress to an address \
         block and DNS, and every tenth also admits namespaces by label. Beside them, namespace \
         `probe` holds two endpoints and one policy admitting one to the other by pod and \
         namespace labels. The measured changes are made there, so each touches the same few \
         entries at every size and its cost shows what the rest of the state adds: \
         `palisadectl apply` of one more policy and `delete` of it, `apply` of a Pod object \
         giving one of the two a new label, `apply` of the Namespace with a new label. (A \
         change that reaches more, such as a namespace label that many policies select, costs \
         in proportion to the entries it changes: see docs/CONTROL-PLANE.md.) Every figure is \
         the real command's wall time: process start, parse, the daemon's incremental update, \
         the map writes and the durable commit. Median (min–max) of {} repetitions. \
         \"Entries\" is `pal_policy`'s fill.\n",
        if cfg.short { 1 } else { 2 * cfg.reps }
    );
    let head: Vec<String> = ["policies", "endpoints", "entries"]
        .iter()
        .map(|h| h.to_string())
        .chain(CHANGES.iter().map(|c| format!("{c} ms")))
        .collect();
    let mut t = Table::new(&head.iter().map(String::as_str).collect::<Vec<_>>());
    for ((p, e), c) in &costs {
        let mut row = vec![p.to_string(), e.to_string(), c.map_entries.to_string()];
        for k in CHANGES {
            row.push(c.change[k].show(1));
            report.measured(
                &format!("{k} at {p} policies x {e} endpoints ms"),
                c.change[k].median(),
            );
        }
        t.row(row);
    }
    s.push_str(&t.render());

    let _ = writeln!(
        s,
        "\nCNI ADD and DEL of real containers on the same nodes (namespace `bench`, no labels), \
         the bridge plugin alone, and bridge + palisade (default attach mode: TCX), \
         {PER_BATCH} containers one after another and {PER_BATCH} at once, ms. \"palisade alone\" is the palisade plugin's own \
         invocation (it sends the endpoint to the daemon, which writes its maps, attaches its \
         programs outside the state lock and records them).\n"
    );
    let mut t = Table::new(&[
        "policies",
        "endpoints",
        "at once",
        "bridge ADD p99",
        "bridge + palisade ADD p50 / p99",
        "palisade alone ADD p50 / p99",
        "ADD p99 over bridge",
        "DEL p99 over bridge",
    ]);
    let f = |v: &[f64], p: f64| percentile(v, p).map_or("—".into(), |x| format!("{x:.1}"));
    let mut worst_over: BTreeMap<usize, (f64, (usize, usize))> = BTreeMap::new();
    for ((p, e), c) in &costs {
        for parallel in [1, PER_BATCH] {
            let bridge = &c.cni[&("bridge", parallel)];
            let pal = &c.cni[&("palisade", parallel)];
            let over = |a: &[f64], b: &[f64]| {
                percentile(a, 0.99)
                    .zip(percentile(b, 0.99))
                    .map(|(a, b)| a - b)
            };
            let add_over = over(&pal.add, &bridge.add);
            let del_over = over(&pal.del, &bridge.del);
            if let Some(o) = add_over {
                let w = worst_over.entry(parallel).or_insert((f64::MIN, (*p, *e)));
                if o > w.0 {
                    *w = (o, (*p, *e));
                }
            }
            report.measured(
                &format!("CNI ADD p99 over bridge at {p} x {e}, {parallel} at once"),
                add_over,
            );
            report.measured(
                &format!("palisade's own ADD p50 at {p} x {e}, {parallel} at once"),
                percentile(&pal.palisade_add, 0.5),
            );
            t.row(vec![
                p.to_string(),
                e.to_string(),
                parallel.to_string(),
                f(&bridge.add, 0.99),
                format!("{} / {}", f(&pal.add, 0.5), f(&pal.add, 0.99)),
                format!(
                    "{} / {}",
                    f(&pal.palisade_add, 0.5),
                    f(&pal.palisade_add, 0.99)
                ),
                add_over.map_or("—".into(), |v| format!("{v:.1}")),
                del_over.map_or("—".into(), |v| format!("{v:.1}")),
            ]);
        }
    }
    s.push_str(&t.render());

    let _ = writeln!(
        s,
        "\nFilling the node, restarting the daemon, memory. \"Bulk apply\" is the one \
         `palisadectl apply` of all *P* policies onto the *E* endpoints. \"Restart\" is a \
         `kill -9` of the daemon and the time from starting it again to its socket answering, \
         which it opens only after it rebuilt the engine from the store and reconciled the \
         kernel maps (what the daemon logged about it follows; when the maps already match, \
         nothing is written and no established flow is re-checked). Daemon memory is its resident set \
         (VmRSS) after the changes above; the store is `palisade.db` with its write-ahead log.\n"
    );
    let mut t = Table::new(&[
        "policies",
        "endpoints",
        "bulk apply ms",
        "restart to reconciled ms",
        "daemon RSS MiB",
        "store MiB",
        "the restarted daemon said",
    ]);
    for ((p, e), c) in &costs {
        report.measured(&format!("bulk apply {p} x {e} ms"), Some(c.bulk_ms));
        report.measured(
            &format!("daemon restart {p} x {e} ms"),
            c.restart_ms.median(),
        );
        report.measured(
            &format!("daemon RSS {p} x {e} KiB"),
            c.daemon_rss_kib.map(|v| v as f64),
        );
        t.row(vec![
            p.to_string(),
            e.to_string(),
            format!("{:.0}", c.bulk_ms),
            c.restart_ms.show(0),
            c.daemon_rss_kib
                .map_or("—".into(), |v| format!("{:.1}", v as f64 / 1024.0)),
            format!("{:.1}", c.store_kib as f64 / 1024.0),
            format!(
                "`{}`",
                c.restart_log.trim().replace("palisade daemon: ", "")
            ),
        ]);
    }
    s.push_str(&t.render());

    // Targets.
    let key = if cfg.short { smallest } else { (10_000, 1_000) };
    if let Some(c) = by_size.get(&key)
        && let Some(m) = c.change[CHANGES[0]].median()
    {
        report.target(
            &format!(
                "One more policy at {} policies x {} endpoints under 20 ms command time",
                key.0, key.1
            ),
            &format!("{m:.1} ms"),
            m < 20.0,
            "",
        );
    }
    if smallest != largest {
        for k in CHANGES {
            let (Some(big), Some(small)) = (
                by_size[&largest].change[k].median(),
                by_size[&smallest].change[k].median(),
            ) else {
                continue;
            };
            report.target(
                &format!(
                    "{k} at {} x {} within 2x of {} x {}",
                    largest.0, largest.1, smallest.0, smallest.1
                ),
                &format!("{:.2}x ({big:.1} vs {small:.1} ms)", big / small),
                big / small < 2.0,
                "",
            );
        }
        for (what, own_add) in [("ADD", true), ("DEL", false)] {
            for parallel in [1, PER_BATCH] {
                let own = |c: &Cost| {
                    let v = &c.cni[&("palisade", parallel)];
                    percentile(if own_add { &v.palisade_add } else { &v.del }, 0.5)
                };
                let (Some(big), Some(small)) = (own(by_size[&largest]), own(by_size[&smallest]))
                else {
                    continue;
                };
                report.target(
                    &format!(
                        "CNI {what} ({parallel} at once, p50{}) at {} x {} within 2x of {} x {}",
                        if own_add {
                            ", palisade alone"
                        } else {
                            ", whole chain"
                        },
                        largest.0,
                        largest.1,
                        smallest.0,
                        smallest.1
                    ),
                    &format!("{:.2}x ({big:.1} vs {small:.1} ms)", big / small),
                    big / small < 2.0,
                    "",
                );
            }
        }
    }
    for (parallel, limit) in [(1usize, 25.0), (PER_BATCH, 150.0)] {
        if let Some((worst, (p, e))) = worst_over.get(&parallel) {
            report.target(
                &format!(
                    "CNI ADD overhead over bridge under {limit:.0} ms at p99, {parallel} at once, \
                     every size, default attach mode (TCX)"
                ),
                &format!("{worst:.1} ms at worst ({p} policies x {e} endpoints)"),
                *worst < limit,
                TCX_LIMIT,
            );
        }
    }
    let bulk_key = if cfg.short { largest } else { (10_000, 1_000) };
    if let Some(c) = by_size.get(&bulk_key) {
        report.target(
            &format!(
                "Bulk: {} policies over {} endpoints applied under 1 s",
                bulk_key.0, bulk_key.1
            ),
            &format!("{:.0} ms", c.bulk_ms),
            c.bulk_ms < 1_000.0,
            "",
        );
    }
    if let Some(m) = by_size[&largest].restart_ms.median() {
        report.target(
            &format!(
                "Daemon restart to reconciled maps under 2 s at {} x {}",
                largest.0, largest.1
            ),
            &format!("{m:.0} ms"),
            m < 2_000.0,
            "",
        );
    }
    s
}

/// Why TCX attaches miss the CNI targets (see the CNI latency section).
pub const TCX_LIMIT: &str = "A TCX attach waits for an RCU grace period (`synchronize_rcu`, in \
    `tcx_entry_sync`) while holding the RTNL lock, once per hook, so twice per container: about \
    15 ms each on this kernel (seen with `strace -T` on `BPF_LINK_CREATE`). It serialises \
    against every other netlink user, the bridge plugin and the other containers' attaches \
    included, so 20 containers at once queue 40 grace periods on RTNL whatever palisade does \
    outside it. clsact/cls_bpf filters attach without that wait: `\"attachMode\": \"netlink\"` \
    meets these targets (see \"CNI ADD and DEL latency\").";

/// A large node's map capacities (tens of thousands of endpoints and rules).
fn large() -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("mapSizes".into(), testbed::node::large_map_sizes());
    m
}
