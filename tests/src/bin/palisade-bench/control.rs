//! Control plane: applying policies at scale through the real CLI, how soon
//! a change shows in the datapath, and CNI ADD/DEL latency against the
//! bridge plugin alone.

use std::{
    collections::BTreeMap,
    fmt::Write,
    net::{IpAddr, Ipv4Addr},
    thread,
    time::{Duration, Instant},
};

use palisade::{
    dataplane::Attachment,
    policy::Labels,
    store::{Endpoint, Source, Store},
};
use serde_json::json;
use testbed::{
    chain::{Call, Chain},
    node::{Node, NodeOptions},
    probe::{Proto, probe},
    sys::{Netns, describe},
};

use crate::{
    Config, Report,
    stats::{Samples, Table, percentile},
    traffic::plain_chain,
};

/// Distinct `app` labels the synthetic endpoints and policies use.
pub const APPS: usize = 50;

/// Register `count` endpoints in namespace `bench` (labels `app: appN`) in
/// the node's store as CNI ADD would, minus the veth: their records,
/// addresses and labels are real, their interfaces do not exist (the maps
/// get their entries all the same).
pub fn seed_endpoints(node: &Node, count: usize) {
    seed(
        node,
        (0..count).map(|i| {
            (
                "bench".to_owned(),
                format!("pod-{i}"),
                [("app".to_string(), format!("app{}", i % APPS))].into(),
                IpAddr::V4(Ipv4Addr::new(10, 200, (i >> 8) as u8, i as u8)),
            )
        }),
    )
}

/// Register synthetic endpoints: (namespace, name, labels, address).
pub fn seed(node: &Node, eps: impl Iterator<Item = (String, String, Labels, IpAddr)>) {
    let mut store = Store::new(&node.state_dir);
    let mut tx = store
        .write(Duration::from_secs(10))
        .expect("lock the store");
    for (namespace, name, labels, addr) in eps {
        let id = tx.allocate_endpoint_id().expect("allocate an endpoint id");
        let ep = Endpoint {
            id,
            source: Source::Cni,
            network: "synthetic".into(),
            container_id: format!("synthetic-{id}"),
            ifname: "eth0".into(),
            namespace,
            name,
            labels,
            netns: String::new(),
            host_ifname: format!("syn{id}"),
            host_ifindex: 1_000_000 + id,
            addresses: vec![addr],
            k8s: true,
            mac: None,
            attachment: Attachment::Tcx {
                from_container: node.dir.join(format!("nonexistent/{id}/from")),
                to_container: node.dir.join(format!("nonexistent/{id}/to")),
            },
            created: 0,
        };
        tx.put_endpoint(&ep).expect("store an endpoint");
    }
    // Engines built before this write see it and rebuild.
    tx.bump_generation().expect("bump the generation");
    tx.commit().expect("commit the endpoints");
}

/// `count` NetworkPolicies of the usual shapes: each selects one app and
/// admits another app on one port; every tenth also limits egress to an
/// address block and DNS, and every tenth admits the namespaces of a team.
pub fn policies_yaml(count: usize) -> String {
    let mut docs = Vec::with_capacity(count);
    for i in 0..count {
        let mut spec = json!({
            "podSelector": {"matchLabels": {"app": format!("app{}", i % APPS)}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": format!("app{}", (i * 7 + 1) % APPS)}}}],
                "ports": [{"protocol": "TCP", "port": 8000 + (i % 100)}],
            }],
        });
        if i % 10 == 5 {
            let team = if i % 20 == 5 { "red" } else { "blue" };
            spec["ingress"][0]["from"]
                .as_array_mut()
                .expect("from")
                .push(json!({"namespaceSelector": {"matchLabels": {"bench-team": team}}}));
        }
        if i % 10 == 0 {
            spec["policyTypes"] = json!(["Ingress", "Egress"]);
            spec["egress"] = json!([
                {"to": [{"ipBlock": {"cidr": format!("172.16.{}.0/24", i % 256)}}],
                 "ports": [{"protocol": "TCP", "port": 443}]},
                {"ports": [{"protocol": "UDP", "port": 53}]},
            ]);
        }
        docs.push(
            json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": format!("policy-{i}"), "namespace": "bench"},
                "spec": spec,
            })
            .to_string(),
        );
    }
    docs.join("\n---\n")
}

/// `palisadectl <verb> -f <file>`: the wall time of the whole command.
pub fn ctl_file(node: &Node, verb: &str, yaml: &str) -> Duration {
    let path = node.dir.join(format!("{verb}.yaml"));
    std::fs::write(&path, yaml).expect("write the policy file");
    let start = Instant::now();
    let out = node.ctl(&[verb, "-f", &path.display().to_string()], None);
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "palisadectl {verb} failed: {}",
        describe(&out)
    );
    took
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// When the connection from the client to the server first succeeds
/// (`want` true) or first fails, polling with fresh connections.
fn first_flip(netns: &std::path::Path, target: IpAddr, want: bool) -> Duration {
    let start = Instant::now();
    loop {
        let attempt = start.elapsed();
        if probe(netns, target, Proto::Tcp, 80, Duration::from_millis(20)) == want {
            return attempt;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the verdict did not change within 10 s"
        );
    }
}

fn visibility(cfg: &Config, report: &mut Report) -> String {
    let (e, p) = if cfg.short {
        (100, 100)
    } else {
        (1_000, 1_000)
    };
    let node = Node::new(NodeOptions {
        daemon: true,
        palisade: large(),
        ..NodeOptions::default()
    });
    node.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: server}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-deny, namespace: bench}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
"#,
    );
    let server = node.add_pod("bench", "server", &[80]);
    let client = node.add_pod("bench", "client", &[]);
    seed_endpoints(&node, e - 2);
    ctl_file(&node, "apply", &policies_yaml(p));
    let allow = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-allow, namespace: bench}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#;
    let target = server.addr(false);
    assert!(
        !probe(
            &client.netns,
            target,
            Proto::Tcp,
            80,
            Duration::from_millis(200)
        ),
        "the server must start isolated"
    );
    let rounds = if cfg.short { 3 } else { 10 * cfg.reps };
    let (mut allow_apply, mut allow_seen, mut deny_apply, mut deny_seen) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    for round in 0..rounds {
        eprintln!(
            "  control plane: visibility round {} of {rounds}",
            round + 1
        );
        allow_apply.push(ms(node.apply(allow)));
        allow_seen.push(ms(first_flip(&client.netns, target, true)));
        let start = Instant::now();
        node.delete(allow);
        deny_apply.push(ms(start.elapsed()));
        deny_seen.push(ms(first_flip(&client.netns, target, false)));
    }
    drop(node);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n#### From `apply` returning to the verdict changing\n\n\
         Two real containers (bridge + palisade) on a node (with the node daemon) that also \
         holds {} more endpoints and {p} policies. The server starts isolated. `palisadectl apply` of a policy \
         admitting the client, then `palisadectl delete` of it; after each command returns, \
         fresh TCP connections (20 ms timeout) are attempted back to back until the verdict \
         has changed. \"Visible after\" is when the first attempt with the new verdict \
         started, counted from the command's return: 0 means the very first attempt already \
         saw it. {rounds} rounds; median (min–max).\n",
        e - 2
    );
    let mut t = Table::new(&["change", "command ms", "visible after ms (from return)"]);
    t.row(vec![
        "allow (apply)".into(),
        allow_apply.show(1),
        allow_seen.show(2),
    ]);
    t.row(vec![
        "revoke (delete)".into(),
        deny_apply.show(1),
        deny_seen.show(2),
    ]);
    s.push_str(&t.render());
    report.measured("allow visible after apply ms", allow_seen.median());
    report.measured("revoke visible after delete ms", deny_seen.median());
    if let (Some(a), Some(d)) = (allow_seen.max(), deny_seen.max()) {
        let worst = a.max(d);
        report.target(
            "One policy change visible in the datapath under 100 ms",
            &format!(
                "visible {worst:.2} ms after the command returned at worst; the command itself \
                 takes {} ms (median) with {p} policies and {e} endpoints",
                allow_apply
                    .median()
                    .map_or("?".into(), |v| format!("{v:.0}"))
            ),
            worst < 100.0,
            "",
        );
    }
    s
}

#[derive(Default)]
pub struct CniRun {
    pub add: Vec<f64>,
    pub del: Vec<f64>,
    pub palisade_add: Vec<f64>,
}

impl CniRun {
    pub fn extend(&mut self, other: CniRun) {
        self.add.extend(other.add);
        self.del.extend(other.del);
        self.palisade_add.extend(other.palisade_add);
    }
}

/// ADD then DEL for `netns.len()` containers through `chain`, `parallel`
/// at a time; wall times in ms.
pub fn cni_batch(chain: &Chain, label: &str, netns: &[Netns], parallel: usize) -> CniRun {
    chain.add_times.lock().expect("lock").clear();
    let calls: Vec<Call> = netns
        .iter()
        .enumerate()
        .map(|(i, ns)| Call {
            container_id: format!("{label}-{i}"),
            netns: ns.path.display().to_string(),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={label}-{i}"),
        })
        .collect();
    let run = |op: &(dyn Fn(&Call) -> Result<(), String> + Sync)| -> Vec<f64> {
        let mut out = Vec::new();
        for group in calls.chunks(parallel) {
            let times: Vec<f64> = thread::scope(|s| {
                let handles: Vec<_> = group
                    .iter()
                    .map(|c| {
                        s.spawn(move || {
                            let start = Instant::now();
                            op(c).unwrap_or_else(|e| panic!("{e}"));
                            ms(start.elapsed())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("CNI thread"))
                    .collect()
            });
            out.extend(times);
        }
        out
    };
    let add = run(&|c| chain.add(c).map(|_| ()).map_err(|e| e.to_string()));
    let del = run(&|c| chain.del(c).map_err(|e| e.to_string()));
    let palisade_add = chain
        .add_times
        .lock()
        .expect("lock")
        .iter()
        .map(|d| ms(*d))
        .collect();
    CniRun {
        add,
        del,
        palisade_add,
    }
}

/// A node whose palisade entry uses `attach_mode` (`None`: the default),
/// with or without the node daemon.
fn cni_node(attach_mode: Option<&str>, daemon: bool) -> Node {
    let mut options = NodeOptions {
        daemon,
        ..NodeOptions::default()
    };
    if let Some(m) = attach_mode {
        options.palisade.insert("attachMode".into(), json!(m));
    }
    Node::new(options)
}

fn cni_latency(cfg: &Config, report: &mut Report) -> String {
    // The default (TCX where the kernel has it) and clsact, each on a node
    // of its own; the bridge-only chain shares the first node.
    let chains = [
        ("bridge + palisade (TCX, default)", None, true),
        ("bridge + palisade (clsact)", Some("netlink"), true),
        ("bridge + palisade (TCX, no daemon)", None, false),
    ];
    let nodes: Vec<Node> = chains.iter().map(|(_, m, d)| cni_node(*m, *d)).collect();
    let plain = plain_chain(&nodes[0]);
    let per_batch = 20;
    let batches = if cfg.short { 1 } else { 2 * cfg.reps };
    let netns: Vec<Netns> = (0..per_batch)
        .map(|i| Netns::new(&format!("{}k{i}", nodes[0].prefix)))
        .collect();
    // The first ADD on a node loads the programs; time it on its own and
    // keep it out of the percentiles below.
    let mut first_add = BTreeMap::new();
    for ((name, _, _), node) in chains.iter().zip(&nodes) {
        let r = cni_batch(&node.chain, "warmup", &netns[..1], 1);
        first_add.insert(*name, r.add[0]);
    }
    let mut runs: Vec<(&str, &Chain)> = vec![("bridge", &plain)];
    runs.extend(
        chains
            .iter()
            .zip(&nodes)
            .map(|((name, _, _), n)| (*name, &n.chain)),
    );
    let mut add: BTreeMap<(&str, usize), Vec<f64>> = BTreeMap::new();
    let mut del: BTreeMap<(&str, usize), Vec<f64>> = BTreeMap::new();
    let mut own: BTreeMap<(&str, usize), Vec<f64>> = BTreeMap::new();
    for b in 0..batches {
        for parallel in [1, per_batch] {
            eprintln!(
                "  control plane: CNI batch {} of {batches}, {parallel} at once",
                b + 1
            );
            for (i, (name, chain)) in runs.iter().enumerate() {
                let r = cni_batch(chain, &format!("c{i}b{b}p{parallel}"), &netns, parallel);
                add.entry((name, parallel)).or_default().extend(r.add);
                del.entry((name, parallel)).or_default().extend(r.del);
                own.entry((name, parallel))
                    .or_default()
                    .extend(r.palisade_add);
            }
        }
    }
    drop(netns);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n#### CNI ADD and DEL latency\n\n\
         The real bridge plugin (host-local IPAM) alone, and the same followed by palisade, \
         run as a container runtime runs them (one process per plugin, `prevResult` passed \
         along; spawned with posix_spawn from a thread inside the node namespace, so the \
         benchmark's own memory does not slow the spawn as a fork would). palisade attaches with TCX links (its default where the kernel has TCX) or, \
         with `\"attachMode\": \"netlink\"`, as clsact/cls_bpf filters; each on a node of its \
         own with the node daemon running, and TCX once more on a node without the daemon (each \
         plugin process then loads the engine from the store itself). {per_batch} containers per batch, either one after another or all {per_batch} \
         at once; {batches} batches per chain, interleaved. Wall time per container, ms; \
         \"palisade alone\" is the palisade plugin's own invocation inside the chain. The \
         first ADD on a node loads the programs and is not in these percentiles: it took \
         {} ms (TCX node) and {} ms (clsact node).\n",
        first_add
            .get(chains[0].0)
            .map_or("?".into(), |v| format!("{v:.0}")),
        first_add
            .get(chains[1].0)
            .map_or("?".into(), |v| format!("{v:.0}")),
    );
    let mut t = Table::new(&[
        "chain",
        "at once",
        "ADD p50",
        "ADD p99",
        "DEL p50",
        "DEL p99",
        "palisade alone ADD p50 / p99",
        "ADD p99 over bridge",
    ]);
    let f = |v: &[f64], p: f64| percentile(v, p).map_or("—".into(), |x| format!("{x:.1}"));
    for parallel in [1, per_batch] {
        let base = percentile(&add[&("bridge", parallel)], 0.99);
        report.measured(&format!("CNI ADD p99 bridge, {parallel} at once"), base);
        for (name, _) in &runs {
            let a = &add[&(*name, parallel)];
            let d = &del[&(*name, parallel)];
            let o = &own[&(*name, parallel)];
            let full = percentile(a, 0.99);
            let over = match (full, base) {
                (Some(f), Some(b)) if *name != "bridge" => format!("{:.1}", f - b),
                _ => "—".into(),
            };
            t.row(vec![
                (*name).into(),
                parallel.to_string(),
                f(a, 0.5),
                f(a, 0.99),
                f(d, 0.5),
                f(d, 0.99),
                if o.is_empty() {
                    "—".into()
                } else {
                    format!("{} / {}", f(o, 0.5), f(o, 0.99))
                },
                over,
            ]);
            if *name == "bridge" {
                continue;
            }
            report.measured(&format!("CNI ADD p99 {name}, {parallel} at once"), full);
            report.measured(
                &format!("CNI DEL p99 {name}, {parallel} at once"),
                percentile(d, 0.99),
            );
            if let (Some(fv), Some(b)) = (full, base) {
                // One at a time under 25 ms, 20 at once under 150 ms.
                let limit = if parallel == 1 { 25.0 } else { 150.0 };
                report.target(
                    &format!(
                        "CNI ADD overhead over bridge alone under {limit:.0} ms at p99: {name}, \
                         {parallel} at once"
                    ),
                    &format!("{:.1} ms (p99 {fv:.1} vs {b:.1} ms)", fv - b),
                    fv - b < limit,
                    crate::change::TCX_LIMIT,
                );
            }
        }
    }
    s.push_str(&t.render());
    drop(plain);
    drop(nodes);
    s
}

pub fn run(cfg: &Config, report: &mut Report) {
    let mut s = crate::change::run(cfg, report);
    s.push_str(&visibility(cfg, report));
    s.push_str(&cni_latency(cfg, report));
    report.section("Control plane", s);
}

/// A large node's map capacities (tens of thousands of endpoints and rules).
fn large() -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("mapSizes".into(), testbed::node::large_map_sizes());
    m
}
