//! Datapath cost per packet: the real programs run through
//! BPF_PROG_TEST_RUN on crafted packets, with the maps the real compiler
//! produces for growing numbers of rules and endpoints. Also the map memory
//! each configuration pins.

use std::{
    collections::BTreeMap,
    fmt::Write,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::Instant,
};

use aya::maps::MapData;
use palisade::{abi::Direction, compile::EndpointView};
use serde_json::json;
use testbed::{
    bpfrun::{Datapath, TEST_IFINDEX, Verdict, endpoint},
    pkt::{self, L4, TCP_ACK, TCP_SYN},
};

use crate::{
    Config, Report,
    stats::{Samples, Table, ratio},
};

const SUBJECT: &str = "10.0.0.1";
const CLIENT: &str = "10.0.0.2";
const STRANGER: &str = "192.0.2.1";
const PORT: u16 = 80;

/// `n` ingress rules for the subject: one allows the client pod, the other
/// `n - 1` allow single addresses no test packet comes from.
pub fn policy_json(n: usize, ports: &[u16], client: &serde_json::Value) -> String {
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|p| json!({"protocol": "TCP", "port": p}))
        .collect();
    policy_json_with(n, &ports, &ports, client)
}

/// Range rules: the `n - 1` other rules allow a port range each.
const RANGE: (u16, u16) = (8080, 8089);

/// As `policy_json`, with the ports of the client's rule and of the others.
fn policy_json_with(
    n: usize,
    ports: &[serde_json::Value],
    other_ports: &[serde_json::Value],
    client: &serde_json::Value,
) -> String {
    let mut rules = Vec::with_capacity(n);
    if n > 0 {
        rules.push(json!({
            "from": [{"podSelector": {"matchLabels": client}}],
            "ports": ports,
        }));
    }
    for i in 1..n {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i as u32);
        rules.push(json!({
            "from": [{"ipBlock": {"cidr": format!("{addr}/32")}}],
            "ports": other_ports,
        }));
    }
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "subject"}},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        }
    })
    .to_string()
}

/// About `n` single-port rules spread over the three tiers, all selecting
/// the subject:
/// AdminNetworkPolicies (100 rules each, the API's limit) whose first
/// rule passes the client on TCP 80 to NetworkPolicy and whose others deny
/// other ports from every pod; the NetworkPolicy of [`policy_json`]; a
/// BaselineAdminNetworkPolicy and baseline ClusterNetworkPolicies (25
/// rules each) denying other ports from every pod. Every tier has entries
/// for the subject, so every tier is looked up.
fn tier_yaml(n: usize, client: &serde_json::Value) -> String {
    let per = (n / 3).max(1);
    // Every other port: each rule is its own single-port entry, as in the
    // single-port rows above (contiguous ports would merge into port
    // blocks; their cost is the port-range section's).
    let other_port = |i: usize| 20_000 + 2 * i as u16;
    let every_pod = json!([{"namespaces": {}}]);
    let mut docs = Vec::new();
    let mut admin: Vec<serde_json::Value> = vec![json!({
        "name": "client-to-networkpolicy",
        "action": "Pass",
        "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": client}}}],
        "ports": [{"portNumber": {"port": PORT}}],
    })];
    admin.extend((1..per).map(|i| {
        json!({"action": "Deny", "from": every_pod, "ports": [{"portNumber": {"port": other_port(i)}}]})
    }));
    for (k, chunk) in admin.chunks(100).enumerate() {
        docs.push(json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha1",
            "kind": "AdminNetworkPolicy",
            "metadata": {"name": format!("bench-{k}")},
            "spec": {
                "priority": k,
                "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "subject"}}}},
                "ingress": chunk,
            }
        }));
    }
    let port_rule = [json!({"protocol": "TCP", "port": PORT})];
    let np: serde_json::Value =
        serde_json::from_str(&policy_json_with(per, &port_rule, &port_rule, client))
            .expect("policy JSON");
    docs.push(np);
    let baseline: Vec<serde_json::Value> = (0..per)
        .map(|i| json!({"action": "Deny", "from": every_pod, "ports": [{"portNumber": {"port": other_port(per + i)}}]}))
        .collect();
    let (banp, rest) = baseline.split_at(baseline.len().min(100));
    docs.push(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha1",
        "kind": "BaselineAdminNetworkPolicy",
        "metadata": {"name": "default"},
        "spec": {
            "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "subject"}}}},
            "ingress": banp,
        }
    }));
    for (k, chunk) in rest.chunks(25).enumerate() {
        let protocols = |r: &serde_json::Value| json!([{"tcp": {"destinationPort": {"number": r["ports"][0]["portNumber"]["port"]}}}]);
        let rules: Vec<serde_json::Value> = chunk
            .iter()
            .map(|r| json!({"action": "Deny", "from": every_pod, "protocols": protocols(r)}))
            .collect();
        docs.push(json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": format!("bench-baseline-{k}")},
            "spec": {
                "tier": "Baseline",
                "priority": k,
                "subject": {"pods": {"podSelector": {"matchLabels": {"app": "subject"}}}},
                "ingress": rules,
            }
        }));
    }
    docs.iter()
        .map(serde_json::Value::to_string)
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// `count` endpoints: the subject (on the test-run ifindex), the client,
/// and others with labels of their own (one identity each).
fn endpoints(count: usize) -> Vec<EndpointView> {
    let mut v = vec![
        endpoint(1, TEST_IFINDEX, "bench", &[("app", "subject")], &[SUBJECT]),
        endpoint(2, 1002, "bench", &[("app", "client")], &[CLIENT]),
    ];
    for i in 3..=count as u32 {
        let addr = Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8).to_string();
        let app = format!("ep{i}");
        v.push(endpoint(
            i,
            1000 + i,
            "bench",
            &[("app", app.as_str())],
            &[addr.as_str()],
        ));
    }
    v
}

fn syn(src: &str, sport: u16) -> Vec<u8> {
    tcp(src, sport, TCP_SYN)
}

fn tcp(src: &str, sport: u16, flags: u8) -> Vec<u8> {
    let ip = |s: &str| -> IpAddr { s.parse().expect("address") };
    pkt::frame(
        ip(src),
        ip(SUBJECT),
        &L4::Tcp {
            sport,
            dport: PORT,
            flags,
        },
    )
}

/// Empty the conntrack tables, so that "new flow" packets are new.
fn flush_ct(root: &Path) {
    palisade::dataplane::kernel::conntrack_flush(root).expect("flush conntrack");
}

/// Kernel memory charged to each pinned map (`memlock` in fdinfo).
pub fn map_memory(root: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(palisade::dataplane::maps_dir(root)) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(map) = MapData::from_pin(e.path()) else {
            continue;
        };
        let Some(mut bytes) = memlock(&map) else {
            continue;
        };
        // The endpoints' own tables hang off these, unpinned: counted with
        // them.
        if name == "pal_ct_tables" || name == "pal_frag_tables" {
            let outer: aya::maps::HashOfMaps<MapData, u32, MapData> =
                aya::maps::HashOfMaps::try_from(aya::maps::Map::HashOfMaps(map))
                    .expect("a hash of maps");
            let ids: Vec<u32> = outer.keys().filter_map(Result::ok).collect();
            for id in ids {
                if let Ok(inner) = outer.get(&id, 0) {
                    bytes += memlock(&inner).unwrap_or(0);
                }
            }
        }
        out.insert(name, bytes);
    }
    out
}

/// Kernel memory charged to one map (`memlock` in fdinfo).
fn memlock(map: &MapData) -> Option<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

#[derive(Default)]
struct Cell {
    new_flow: Samples,
    established: Samples,
    denied: Samples,
    program_ms: Samples,
    memory: BTreeMap<String, u64>,
    entries: (usize, usize),
}

/// A cell's medians as ratios to its 10-rule base ("new / est / denied"),
/// keeping the largest deviation from 1× in `worst`, labelled with `label`.
fn compare(c: &Cell, base: &Cell, label: &str, worst: &mut Option<(f64, String)>) -> String {
    let mut ratios = Vec::new();
    for (what, v, bv) in [
        ("new flow", &c.new_flow, &base.new_flow),
        ("established", &c.established, &base.established),
        ("denied", &c.denied, &base.denied),
    ] {
        ratios.push(ratio(v, bv));
        if let (Some(v), Some(bv)) = (v.median(), bv.median()) {
            let dev = (v / bv - 1.0).abs();
            if worst.as_ref().is_none_or(|(w, _)| dev > *w) {
                *worst = Some((dev, format!("{what}, {label}: {:.2}×", v / bv)));
            }
        }
    }
    ratios.join(" / ")
}

fn expect(d: &Datapath, frame: &[u8], want: Verdict, what: &str) {
    let got = d.run(Direction::Ingress, frame);
    assert_eq!(got, want, "{what}: the benchmark would time the wrong path");
}

/// One table of cells by rule count at `e0` endpoints (ratios to 10
/// rules), recording each figure; returns the largest deviation from 10
/// rules. `label` names the rules in ratios, `measured` in the report.
fn rules_table(
    s: &mut String,
    cells: &BTreeMap<usize, Cell>,
    label: &str,
    measured: &str,
    e0: usize,
    report: &mut Report,
) -> Option<(f64, String)> {
    let mut t = Table::new(&[
        "rules",
        "policy / ipcache entries",
        "new flow ns",
        "established ns",
        "denied ns",
        "new / est / denied vs 10 rules",
        "reprogram ms",
    ]);
    let mut worst: Option<(f64, String)> = None;
    let base = cells.get(&10);
    for (&n, c) in cells {
        let ratios = base.map_or_else(
            || "—".into(),
            |b| compare(c, b, &format!("{n} {label}"), &mut worst),
        );
        for (what, v) in [
            ("new flow", &c.new_flow),
            ("established", &c.established),
            ("denied", &c.denied),
        ] {
            report.measured(
                &format!("{what} ns, {n} {measured}, {e0} endpoints"),
                v.median(),
            );
        }
        t.row(vec![
            n.to_string(),
            format!("{} / {}", c.entries.0, c.entries.1),
            c.new_flow.show(0),
            c.established.show(0),
            c.denied.show(0),
            ratios,
            c.program_ms.show(0),
        ]);
    }
    s.push_str(&t.render());
    worst
}

pub fn run(cfg: &Config, report: &mut Report) {
    let rule_counts: &[usize] = if cfg.short {
        &[0, 10, 1_000]
    } else {
        &[0, 10, 1_000, 10_000, 100_000]
    };
    let endpoint_counts: &[usize] = if cfg.short {
        &[10, 1_000]
    } else {
        &[10, 1_000, 10_000]
    };
    let flows: u16 = if cfg.short { 200 } else { 2_000 };
    let repeat: u32 = if cfg.short { 20_000 } else { 500_000 };
    let client = json!({"app": "client"});

    // Up to 10,000 endpoints and 100,000 rules: a large node's capacities.
    let mut d = Datapath::with_sizes(Some(testbed::node::large_map_sizes_typed()));
    let root = d.dp.root().to_owned();
    let mut cells: BTreeMap<(usize, usize), Cell> = BTreeMap::new();
    let mut range_cells: BTreeMap<usize, Cell> = BTreeMap::new();
    let mut tier_cells: BTreeMap<usize, Cell> = BTreeMap::new();
    let tier_counts: &[usize] = if cfg.short {
        &[10, 1_000]
    } else {
        &[10, 1_000, 10_000]
    };
    let tier_policies: BTreeMap<usize, String> = tier_counts
        .iter()
        .map(|&n| (n, tier_yaml(n, &client)))
        .collect();
    let port_rule = [json!({"protocol": "TCP", "port": PORT})];
    let range_rule = [json!({"protocol": "TCP", "port": RANGE.0, "endPort": RANGE.1})];
    let policies: BTreeMap<(bool, usize), String> = rule_counts
        .iter()
        .flat_map(|&n| {
            [
                (
                    (false, n),
                    policy_json_with(n, &port_rule, &port_rule, &client),
                ),
                (
                    (true, n),
                    policy_json_with(n, &port_rule, &range_rule, &client),
                ),
            ]
        })
        .collect();
    // Single-port rules at every endpoint count, then range rules with the
    // fewest endpoints.
    // (ranged, tiers, rules, endpoints)
    let mut plan: Vec<(bool, bool, usize, usize)> = Vec::new();
    for &e in endpoint_counts {
        for &n in rule_counts {
            plan.push((false, false, n, e));
        }
    }
    for &n in rule_counts.iter().filter(|&&n| n >= 10) {
        plan.push((true, false, n, endpoint_counts[0]));
    }
    for &n in tier_counts {
        plan.push((false, true, n, endpoint_counts[0]));
    }
    for rep in 0..cfg.reps {
        let mut eps = (usize::MAX, Vec::new());
        for &(ranged, tiered, n, e) in &plan {
            if eps.0 != e {
                eps = (e, endpoints(e));
            }
            let eps = &eps.1;
            eprintln!(
                "  per-packet: rep {} of {}, {e} endpoints, {n} {} rules",
                rep + 1,
                cfg.reps,
                if tiered {
                    "tiered (ANP + NP + BANP)"
                } else if ranged {
                    "port-range"
                } else {
                    "single-port"
                }
            );
            let cell = if tiered {
                tier_cells.entry(n).or_default()
            } else if ranged {
                range_cells.entry(n).or_default()
            } else {
                cells.entry((n, e)).or_default()
            };
            let yaml = if n == 0 {
                ""
            } else if tiered {
                tier_policies[&n].as_str()
            } else {
                policies[&(ranged, n)].as_str()
            };
            let t = Instant::now();
            let desired = d.program(yaml, eps, &[]);
            cell.program_ms.push(t.elapsed().as_secs_f64() * 1e3);
            cell.entries = (desired.policy.len(), desired.ipcache.len());
            flush_ct(&root);

            // The paths measured are the ones named: check each verdict.
            expect(
                &d,
                &syn(CLIENT, 1),
                Verdict::Pass,
                "new flow from the client",
            );
            flush_ct(&root);
            let runs: Vec<f64> = (0..flows)
                .map(|f| {
                    d.time(Direction::Ingress, &syn(CLIENT, 10_000 + f), 1)
                        .as_nanos() as f64
                })
                .collect();
            cell.new_flow
                .push(Samples(runs).median().unwrap_or(f64::NAN));

            expect(&d, &syn(CLIENT, 9_000), Verdict::Pass, "opening the flow");
            let ack = tcp(CLIENT, 9_000, TCP_ACK);
            expect(&d, &ack, Verdict::Pass, "established flow");
            cell.established
                .push(d.time(Direction::Ingress, &ack, repeat).as_nanos() as f64);

            if n > 0 {
                let denied = syn(STRANGER, 5_555);
                expect(&d, &denied, Verdict::Drop, "denied flow");
                cell.denied
                    .push(d.time(Direction::Ingress, &denied, repeat).as_nanos() as f64);
            }
            if rep == 0 && !ranged && !tiered {
                cell.memory = map_memory(&root);
            }
        }
    }
    let ct_budget = {
        let mut dp = palisade::dataplane::kernel::KernelDataplane::new(
            &root,
            palisade::dataplane::AttachMode::Auto,
        );
        let _ = palisade::dataplane::Dataplane::open_existing(&mut dp);
        palisade::dataplane::Dataplane::status(&dp)
            .ok()
            .and_then(|st| st.budgets.first().map(|b| b.budget))
    };
    drop(d);

    let mut s = String::new();
    let _ = writeln!(
        s,
        "The real `to_container` program (ingress to the subject endpoint) runs through \
         `BPF_PROG_TEST_RUN` on crafted Ethernet/IPv4/TCP frames, with the maps the real \
         compiler produces. The subject's policy has *N* ingress rules: one allows the client \
         pod on TCP {PORT}, the other *N − 1* allow single addresses (`ipBlock` /32) no test \
         packet comes from, on the same port. Every other endpoint has labels of its own, so endpoints = \
         identities. Each verdict is checked before it is timed.\n\n\
         - **new flow**: a TCP SYN from the client with a fresh source port, allowed by policy, \
         creating a conntrack entry; the median of {flows} single runs, each a different flow \
         (a single run also carries the kernel's per-call timer overhead).\n\
         - **established**: an ACK of an open flow, `repeat` = {repeat}, kernel-reported mean.\n\
         - **denied**: a SYN from an address no rule allows, dropped, `repeat` = {repeat} \
         (a flow nobody isolates cannot be denied, so 0 rules has no figure).\n\n\
         Figures are ns per packet, median (min–max) over {} interleaved repetitions; the \
         ratio is to the same endpoint count with 10 rules. \"Reprogram\" is compiling this \
         configuration and syncing the maps from the previous one (removals included).\n",
        cfg.reps
    );
    let mut t = Table::new(&[
        "endpoints",
        "rules",
        "policy / ipcache entries",
        "new flow ns",
        "established ns",
        "denied ns",
        "new / est / denied vs 10 rules",
        "reprogram ms",
    ]);
    let mut worst: Option<(f64, String)> = None;
    for &e in endpoint_counts {
        for &n in rule_counts {
            let c = &cells[&(n, e)];
            let base = cells.get(&(10, e));
            let ratios = match base {
                Some(b) if n > 0 => compare(c, b, &format!("{n} rules, {e} endpoints"), &mut worst),
                _ => "—".into(),
            };
            report.measured(
                &format!("new flow ns, {n} rules, {e} endpoints"),
                c.new_flow.median(),
            );
            report.measured(
                &format!("established ns, {n} rules, {e} endpoints"),
                c.established.median(),
            );
            if n > 0 {
                report.measured(
                    &format!("denied ns, {n} rules, {e} endpoints"),
                    c.denied.median(),
                );
            }
            t.row(vec![
                e.to_string(),
                n.to_string(),
                format!("{} / {}", c.entries.0, c.entries.1),
                c.new_flow.show(0),
                c.established.show(0),
                if n > 0 {
                    c.denied.show(0)
                } else {
                    "—".into()
                },
                ratios,
                c.program_ms.show(0),
            ]);
        }
    }
    s.push_str(&t.render());
    let top = rule_counts.last().copied().unwrap_or(0);
    let flat_limit = "Policy and address lookups are hash lookups whose cost does not depend on \
         the number of entries; what is left to vary is conntrack insertion for new flows, \
         caches as the maps outgrow them, and the timer noise of single runs.";
    if let Some((dev, what)) = worst {
        report.target(
            &format!("Per-packet cost flat within 10% from 10 to {top} rules (single-port rules)"),
            &format!("largest deviation from 10 rules: {what}"),
            dev <= 0.10,
            flat_limit,
        );
    }

    // Port-range rules: an extra hash lookup per block size in use.
    let e0 = endpoint_counts[0];
    let _ = writeln!(
        s,
        "\n#### Port-range rules\n\nThe same, with {e0} endpoints, but the *N − 1* other rules \
         each allow a port range (TCP {}–{}: two aligned blocks, of 8 and 2 ports) instead of \
         one port. Each block is one hash entry; a packet that no one-port entry allows costs \
         one more hash lookup per block size the endpoint's ranges use (here two, for each \
         of the peer's identity and \"any peer\"), whatever the number of rules. The \
         client's rule is still one port: its new flows are found by the first lookup.\n",
        RANGE.0, RANGE.1
    );
    let worst_range = rules_table(
        &mut s,
        &range_cells,
        "rules",
        "port-range rules",
        e0,
        report,
    );
    if let Some((dev, what)) = worst_range {
        report.target(
            &format!("Per-packet cost flat within 10% from 10 to {top} rules (port-range rules)"),
            &format!("largest deviation from 10 rules: {what}"),
            dev <= 0.10,
            "Each block size in use costs one hash lookup, independent of the number of \
             entries; what is left to vary is conntrack insertion, caches as the maps outgrow \
             them, and the timer noise of single runs.",
        );
    }

    // The three tiers together.
    let _ = writeln!(
        s,
        "\n#### Tiers: AdminNetworkPolicy + NetworkPolicy + BaselineAdminNetworkPolicy\n\n\
         The same, with {e0} endpoints, and about *N* rules in three tiers, each with entries \
         for the subject: AdminNetworkPolicies (up to 100 rules each) whose first rule passes \
         the client on TCP {PORT} on to NetworkPolicy and whose other rules deny other single \
         ports (every other port from 20000) from every pod; the NetworkPolicy above with *N*/3 rules; a \
         BaselineAdminNetworkPolicy and baseline ClusterNetworkPolicies (25 rules each) denying \
         other single ports from every pod. (Tier rules on port ranges become aligned port \
         blocks, as NetworkPolicy's do: each block size an endpoint uses adds one hash lookup \
         to a search, at most 15, see the port-range rules above.) The client's new flow is looked up in the admin tier \
         (found: pass) and then in NetworkPolicy (allowed); the denied SYN misses the admin \
         tier and is denied by NetworkPolicy's isolation. The compiler resolves rule order \
         and priorities into one answer per (endpoint, direction, peer identity, port), so \
         each tier is one search, whatever the number of rules and policies.\n"
    );
    let worst_tier = rules_table(
        &mut s,
        &tier_cells,
        "tiered rules",
        "tiered rules",
        e0,
        report,
    );
    if let Some((dev, what)) = worst_tier {
        let top = tier_counts.last().copied().unwrap_or(0);
        report.target(
            &format!(
                "Per-packet cost flat within 10% from 10 to {top} rules (ANP + NP + BANP together)"
            ),
            &format!("largest deviation from 10 rules: {what}"),
            dev <= 0.10,
            "Each tier is one hash search whatever its rules; what is left to vary is \
             conntrack insertion, caches as the maps outgrow them, and timer noise.",
        );
    }

    let _ = writeln!(
        s,
        "\n#### Pinned map memory\n\nKernel memory charged to the pinned maps \
         (`memlock` in `/proc/<pid>/fdinfo`), by configuration. LRU, array and most hash \
         maps are preallocated at their full size; the maps policy and addresses fill \
         (`pal_policy`, `pal_ipcache_host`, the LPM trie `pal_ipcache` and `pal_srcguard`) \
         grow with their entries, above a fixed bucket array for the hashes (16 MiB for \
         `pal_policy`'s 1,048,576 entries).\n"
    );
    let mut names: Vec<String> = Vec::new();
    for c in cells.values() {
        for k in c.memory.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    names.sort();
    let mut head = vec!["endpoints".to_string(), "rules".into(), "total MiB".into()];
    head.extend(names.iter().map(|n| format!("{n} KiB")));
    let head_refs: Vec<&str> = head.iter().map(String::as_str).collect();
    let mut mt = Table::new(&head_refs);
    for &e in endpoint_counts {
        for &n in rule_counts {
            let c = &cells[&(n, e)];
            let total: u64 = c.memory.values().sum();
            report.measured(
                &format!("map memory, {n} rules, {e} endpoints"),
                (total > 0).then_some(total as f64),
            );
            let mut row = vec![
                e.to_string(),
                n.to_string(),
                format!("{:.1}", total as f64 / 1048576.0),
            ];
            row.extend(names.iter().map(|k| {
                c.memory
                    .get(k)
                    .map_or("—".into(), |b| (b / 1024).to_string())
            }));
            mt.row(row);
        }
    }
    s.push_str(&mt.render());

    // Memory per capacity setting: the maps as each preset creates them,
    // with 10 endpoints and no rules (what a node costs before it holds
    // anything).
    let _ = writeln!(
        s,
        "\nBy capacity setting (conflist `mapSizes`, `palisadectl daemon --map-size`): the \
         pinned maps with 10 endpoints and no rules. \"small node\" is the default; \"large \
         node\" is the sizes above (those of releases before the defaults became a small \
         node's), which the rest of this section uses.\n"
    );
    let mut st = Table::new(&[
        "setting",
        "capacities",
        "total MiB",
        "pal_ct_tables KiB",
        "pal_policy KiB",
    ]);
    for (label, sizes) in [
        (
            "small node (default)",
            palisade::dataplane::MapSizes::default(),
        ),
        ("large node", testbed::node::large_map_sizes_typed()),
    ] {
        // Settings only: the maps sized by `endpoints` follow it.
        let caps = palisade::abi::MAP_SIZE_DEFAULTS
            .iter()
            .filter_map(|(map, setting, _)| Some(format!("{setting} {}", sizes.of(map)?)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut dp = Datapath::with_sizes(Some(sizes));
        dp.program("", &endpoints(10), &[]);
        let mem = map_memory(dp.dp.root());
        let total: u64 = mem.values().sum();
        report.measured(
            &format!("map memory, {label}, 10 endpoints, no rules"),
            (total > 0).then_some(total as f64),
        );
        st.row(vec![
            label.to_owned(),
            caps,
            format!("{:.1}", total as f64 / 1048576.0),
            mem.get("pal_ct_tables")
                .map_or("—".into(), |b| (b / 1024).to_string()),
            mem.get("pal_policy")
                .map_or("—".into(), |b| (b / 1024).to_string()),
        ]);
    }
    s.push_str(&st.render());
    report.measured("conntrack budget", ct_budget.map(f64::from));
    if let Some(budget) = ct_budget {
        let _ = writeln!(
            s,
            "\nConntrack: every endpoint has two tables of its own (flows it opened, flows \
             opened towards it), {budget} flows each by default; memory follows the flows \
             (no preallocation), and a full table refuses that endpoint's new flows in that \
             direction without touching any other endpoint's (docs/HARDENING.md)."
        );
    }
    report.section("Datapath cost per packet", s);
}
