//! Throughput and latency between two containers on a real bridge chain in
//! a hermetic node: no enforcement, palisade, and iptables built the ways
//! iptables-based NetworkPolicy implementations build it.

use std::{
    collections::BTreeMap,
    fmt::Write,
    net::{IpAddr, Ipv4Addr},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use palisade::{
    abi::SvcKey,
    dataplane::{
        AttachMode,
        kernel::KernelDataplane,
        service::{Frontends, ServiceHook},
    },
};
use serde_json::{Value, json};
use testbed::{
    chain::{Call, Chain},
    node::{Node, NodeOptions, bin_dir},
    sys::{Netns, describe},
};

use crate::{
    Config, Report,
    datapath::policy_json,
    stats::{Samples, Table, ratio},
};

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7000;
const PLAIN_SUBNET: &str = "10.101.0.0/24";

/// What stands between the client and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Setup {
    /// Bridge plugin alone: no palisade, no rules.
    None,
    /// palisade attached, no policy selects the server.
    PalisadeNoPolicy,
    /// palisade, a policy with this many ingress rules on the server.
    Palisade(usize),
    /// iptables (nft backend), rules evaluated for every packet.
    IptNft(usize),
    /// iptables-legacy, rules evaluated for every packet.
    IptLegacy(usize),
    /// iptables (nft), conntrack ESTABLISHED accepted first, then the rules.
    IptNftCt(usize),
    /// iptables (nft), conntrack first, then one ipset (hash:net) match.
    Ipset(usize),
}

impl Setup {
    fn name(self) -> String {
        match self {
            Setup::None => "no enforcement (bridge alone)".into(),
            Setup::PalisadeNoPolicy => "palisade, no policy".into(),
            Setup::Palisade(n) => format!("palisade, {n} rules"),
            Setup::IptNft(n) => format!("iptables-nft linear, {n} rules"),
            Setup::IptLegacy(n) => format!("iptables-legacy linear, {n} rules"),
            Setup::IptNftCt(n) => format!("iptables-nft, conntrack first, {n} rules"),
            Setup::Ipset(n) => format!("iptables-nft + ipset, conntrack first, {n} entries"),
        }
    }

    /// Whether a connection from a stranger must be refused.
    fn enforces(self) -> bool {
        !matches!(self, Setup::None | Setup::PalisadeNoPolicy)
    }
}

/// Processes started in pod namespaces, killed on drop.
#[derive(Debug, Default)]
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A container: a namespace the CNI chain gave an address.
#[derive(Debug)]
struct BenchPod {
    netns: Netns,
    addr: IpAddr,
}

/// The test bed. Field order is drop order: processes, pods, the node.
struct Bed {
    _procs: Procs,
    pods: BTreeMap<&'static str, BenchPod>,
    node: Node,
}

fn add_pod(bed_node: &Node, chain: &Chain, name: &str, idx: usize) -> BenchPod {
    let netns = Netns::new(&format!("{}b{idx}", bed_node.prefix));
    let call = Call {
        container_id: format!("{}-bench-{name}", bed_node.prefix),
        netns: netns.path.display().to_string(),
        ifname: "eth0".into(),
        args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={name}"),
    };
    let result = chain
        .add(&call)
        .unwrap_or_else(|e| panic!("CNI ADD for {name}: {e}"));
    let addr = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in the result for {name}: {result}"));
    BenchPod { netns, addr }
}

/// A bridge-only chain on a bridge of its own, in the node namespace.
pub fn plain_chain(node: &Node) -> Chain {
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "plain",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni1",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": PLAIN_SUBNET}]],
                "dataDir": node.dir.join("ipam-plain"),
            }
        }]
    });
    Chain::new(conflist, &node.netns.path, &bin_dir())
}

fn wait_listening(netns: &Netns, port: u16) {
    let start = Instant::now();
    loop {
        let out = netns
            .command("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("run ss");
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nothing listens on port {port} in {}",
            netns.name
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn start_servers(procs: &mut Procs, pod: &BenchPod) {
    let iperf = pod
        .netns
        .command("iperf3")
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 -s (apt-get install iperf3)");
    procs.0.push(iperf);
    let echo = pod
        .netns
        .command(bin_dir().join("palisade-probe"))
        .args(["serve", "--ports", &RR_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the echo server");
    procs.0.push(echo);
    wait_listening(&pod.netns, IPERF_PORT);
    wait_listening(&pod.netns, RR_PORT);
}

fn build() -> Bed {
    // Up to 10,000 rules: a large node's capacities.
    let mut palisade = serde_json::Map::new();
    palisade.insert("mapSizes".into(), testbed::node::large_map_sizes());
    let node = Node::new(NodeOptions {
        palisade,
        ..NodeOptions::default()
    });
    node.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: subject}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: bench, labels: {app: stranger}}
"#,
    );
    let plain = plain_chain(&node);
    let mut pods = BTreeMap::new();
    let mut procs = Procs::default();
    let names: [(&'static str, bool); 8] = [
        ("server", true),
        ("client", true),
        ("stranger", true),
        ("plain-server", false),
        ("nft-server", false),
        ("legacy-server", false),
        ("plain-client", false),
        ("plain-stranger", false),
    ];
    for (i, (name, palisade)) in names.into_iter().enumerate() {
        let chain = if palisade { &node.chain } else { &plain };
        // CNI pod names: the palisade ones match the Pod objects above.
        pods.insert(name, add_pod(&node, chain, name, i));
    }
    for s in ["server", "plain-server", "nft-server", "legacy-server"] {
        start_servers(&mut procs, &pods[s]);
    }
    Bed {
        _procs: procs,
        pods,
        node,
    }
}

fn restore(netns: &Netns, program: &str, input: &str) {
    use std::io::Write as _;
    let mut parts = program.split(' ');
    let mut child = netns
        .command(parts.next().expect("program"))
        .args(parts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write rules");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{program} failed: {}", describe(&out));
}

fn run_in(netns: &Netns, program: &str, args: &[&str]) {
    let out = netns.command(program).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{program} {args:?} in {} failed: {}",
        netns.name,
        describe(&out)
    );
}

fn stranger_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i as u32)
}

/// An iptables filter table: INPUT accepts loopback, optionally
/// established flows, then `n - 1` rules for addresses that never send,
/// then the client, then drops.
fn iptables_rules(n: usize, client: IpAddr, ct_first: bool) -> String {
    let mut s =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    s.push_str("-A INPUT -i lo -j ACCEPT\n");
    if ct_first {
        s.push_str("-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
    }
    let dports = format!("{IPERF_PORT},{RR_PORT}");
    for i in 1..n {
        let _ = writeln!(
            s,
            "-A INPUT -s {}/32 -p tcp -m multiport --dports {dports} -j ACCEPT",
            stranger_addr(i)
        );
    }
    let _ = writeln!(
        s,
        "-A INPUT -s {client}/32 -p tcp -m multiport --dports {dports} -j ACCEPT"
    );
    s.push_str("-A INPUT -j DROP\nCOMMIT\n");
    s
}

const SET: &str = "palisade-bench-allow";

fn ipset_rules(n: usize, client: IpAddr) -> (String, String) {
    let mut set = format!("create {SET} hash:net family inet hashsize 4096 maxelem 262144\n");
    for i in 1..n {
        let _ = writeln!(set, "add {SET} {}/32", stranger_addr(i));
    }
    let _ = writeln!(set, "add {SET} {client}/32");
    let rules = format!(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         -A INPUT -i lo -j ACCEPT\n\
         -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n\
         -A INPUT -p tcp -m multiport --dports {IPERF_PORT},{RR_PORT} -m set --match-set {SET} src -j ACCEPT\n\
         -A INPUT -j DROP\nCOMMIT\n"
    );
    (set, rules)
}

impl Bed {
    fn pod(&self, name: &str) -> &BenchPod {
        &self.pods[name]
    }

    /// (client, stranger, server) for a setup.
    fn ends(&self, setup: Setup) -> (&BenchPod, &BenchPod, &BenchPod) {
        let (c, x, s) = match setup {
            Setup::None => ("plain-client", "plain-stranger", "plain-server"),
            Setup::PalisadeNoPolicy | Setup::Palisade(_) => ("client", "stranger", "server"),
            Setup::IptNft(_) | Setup::IptNftCt(_) | Setup::Ipset(_) => {
                ("plain-client", "plain-stranger", "nft-server")
            }
            Setup::IptLegacy(_) => ("plain-client", "plain-stranger", "legacy-server"),
        };
        (self.pod(c), self.pod(x), self.pod(s))
    }

    fn policy(&self, n: usize) -> String {
        policy_json(n, &[IPERF_PORT, RR_PORT], &json!({"app": "client"}))
    }

    fn set_up(&self, setup: Setup) {
        let (client, _, server) = self.ends(setup);
        match setup {
            Setup::None | Setup::PalisadeNoPolicy => {}
            Setup::Palisade(n) => {
                self.node.apply(&self.policy(n));
            }
            Setup::IptNft(n) => restore(
                &server.netns,
                "iptables-nft-restore",
                &iptables_rules(n, client.addr, false),
            ),
            Setup::IptNftCt(n) => restore(
                &server.netns,
                "iptables-nft-restore",
                &iptables_rules(n, client.addr, true),
            ),
            Setup::IptLegacy(n) => restore(
                &server.netns,
                "iptables-legacy-restore",
                &iptables_rules(n, client.addr, false),
            ),
            Setup::Ipset(n) => {
                let (set, rules) = ipset_rules(n, client.addr);
                restore(&server.netns, "ipset restore", &set);
                restore(&server.netns, "iptables-nft-restore", &rules);
            }
        }
    }

    fn tear_down(&self, setup: Setup) {
        let (_, _, server) = self.ends(setup);
        match setup {
            Setup::None | Setup::PalisadeNoPolicy => {}
            Setup::Palisade(n) => self.node.delete(&self.policy(n)),
            Setup::IptNft(_) | Setup::IptNftCt(_) => {
                run_in(&server.netns, "iptables-nft", &["-F", "INPUT"])
            }
            Setup::IptLegacy(_) => run_in(&server.netns, "iptables-legacy", &["-F", "INPUT"]),
            Setup::Ipset(_) => {
                run_in(&server.netns, "iptables-nft", &["-F", "INPUT"]);
                run_in(&server.netns, "ipset", &["destroy", SET]);
            }
        }
    }
}

/// Busy and total jiffies of all CPUs.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return (0, 0);
    }
    // user nice system idle iowait irq softirq steal
    let idle = v[3] + v[4];
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    (busy, busy + idle)
}

#[derive(Default)]
struct Cell {
    gbps: Samples,
    cpu_pct: Samples,
    cpu_ms_per_gb: Samples,
    rr_p50: Samples,
    rr_p99: Samples,
    crr_p50: Samples,
    crr_p99: Samples,
}

fn iperf(client: &BenchPod, to: IpAddr, secs: u32) -> (f64, f64, f64) {
    let (b0, t0) = cpu_jiffies();
    let out = client
        .netns
        .command("iperf3")
        .args([
            "-c",
            &to.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .output()
        .expect("run iperf3");
    let (b1, t1) = cpu_jiffies();
    assert!(out.status.success(), "iperf3 failed: {}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no throughput in iperf3's output: {v}"));
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let busy = (b1 - b0) as f64;
    let total = (t1 - t0).max(1) as f64;
    let cpu_pct = busy / total * 100.0;
    // Jiffies are 1/USER_HZ (100 per second) on Linux.
    let cpu_ms = busy * 10.0;
    let per_gb = if bytes > 0.0 {
        cpu_ms / (bytes / 1e9)
    } else {
        f64::NAN
    };
    (bps / 1e9, cpu_pct, per_gb)
}

/// (p50 µs, p99 µs) of `count` round trips; every one must succeed.
fn rr(client: &BenchPod, to: IpAddr, count: usize, connect_each: bool) -> (f64, f64) {
    let mut cmd = client.netns.command(bin_dir().join("palisade-probe"));
    cmd.args([
        "rr",
        "--to",
        &format!("{to}:{RR_PORT}"),
        "--count",
        &count.to_string(),
    ]);
    if connect_each {
        cmd.arg("--connect-each");
    }
    let out = cmd.output().expect("run palisade-probe rr");
    assert!(out.status.success(), "rr failed: {}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("rr JSON");
    assert_eq!(
        v["failed"], 0,
        "round trips failed between allowed pods: {v}"
    );
    (
        v["p50_us"].as_f64().expect("p50"),
        v["p99_us"].as_f64().expect("p99"),
    )
}

/// Whether one round trip from `from` to `to` fails (300 ms to answer).
fn refused(from: &BenchPod, to: IpAddr) -> bool {
    let out = from
        .netns
        .command(bin_dir().join("palisade-probe"))
        .args([
            "rr",
            "--to",
            &format!("{to}:{RR_PORT}"),
            "--count",
            "1",
            "--timeout-ms",
            "300",
        ])
        .output()
        .expect("run palisade-probe rr");
    let v: Value = serde_json::from_slice(&out.stdout).expect("rr JSON");
    v["failed"] == 1
}

/// A connection the setup must refuse is refused, so the figures really
/// are for traffic through the rules.
fn check_enforced(stranger: &BenchPod, server: &BenchPod, setup: Setup) {
    let refused = refused(stranger, server.addr);
    assert_eq!(
        refused,
        setup.enforces(),
        "{}: a stranger's connection was {}",
        setup.name(),
        if refused { "refused" } else { "accepted" }
    );
}

pub fn run(cfg: &Config, report: &mut Report) {
    let sizes: &[usize] = if cfg.short {
        &[10, 1_000]
    } else {
        &[10, 1_000, 10_000]
    };
    let secs: u32 = if cfg.short { 1 } else { 5 };
    let rr_count = if cfg.short { 200 } else { 5_000 };
    let crr_count = if cfg.short { 50 } else { 1_000 };
    let mut setups = vec![Setup::None, Setup::PalisadeNoPolicy];
    for &n in sizes {
        setups.extend([
            Setup::Palisade(n),
            Setup::IptNft(n),
            Setup::IptLegacy(n),
            Setup::IptNftCt(n),
            Setup::Ipset(n),
        ]);
    }
    let bed = build();
    let mut cells: BTreeMap<Setup, Cell> = BTreeMap::new();
    for rep in 0..cfg.reps {
        // Rotate the order so no setup always runs first.
        let mut order = setups.clone();
        order.rotate_left(rep % setups.len());
        for &setup in &order {
            eprintln!(
                "  traffic: rep {} of {}, {}",
                rep + 1,
                cfg.reps,
                setup.name()
            );
            bed.set_up(setup);
            let (client, stranger, server) = bed.ends(setup);
            check_enforced(stranger, server, setup);
            let cell = cells.entry(setup).or_default();
            let (gbps, cpu, per_gb) = iperf(client, server.addr, secs);
            cell.gbps.push(gbps);
            cell.cpu_pct.push(cpu);
            cell.cpu_ms_per_gb.push(per_gb);
            let (p50, p99) = rr(client, server.addr, rr_count, false);
            cell.rr_p50.push(p50);
            cell.rr_p99.push(p99);
            let (p50, p99) = rr(client, server.addr, crr_count, true);
            cell.crr_p50.push(p50);
            cell.crr_p99.push(p99);
            bed.tear_down(setup);
        }
    }
    drop(bed);

    let base = &cells[&Setup::None];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Two containers on one node, each a network namespace attached by the real bridge \
         plugin (host-local IPAM) inside a hermetic node namespace; palisade's containers go \
         through the bridge + palisade chain, the others through a bridge-only chain on a \
         second bridge of the same node. The server runs `iperf3 -s` and an echo server. \
         Rules protect the server's ingress: one allows the client, the others allow \
         addresses that never send (`198.18.0.0/15`).\n\n\
         - **iptables-nft / -legacy linear**: the rules in the server's INPUT chain, client \
         last, evaluated for every packet (as in the issue's reference measurement).\n\
         - **conntrack first**: `ESTABLISHED,RELATED` accepted first, as kube-router and \
         Calico's iptables mode build pod chains: established packets skip the rules, every \
         new connection walks them.\n\
         - **ipset**: conntrack first, then one `hash:net` set match holding all addresses.\n\n\
         Before each measurement a connection from a third container is checked to be refused \
         (or accepted where nothing enforces). TCP throughput is `iperf3 -t {secs}` \
         (one stream); CPU is the whole machine's busy share during it, and CPU time per GB \
         received. RR is {rr_count} 64-byte round trips on one connection; CRR is \
         {crr_count} round trips each on a new connection (connect, request, reply, close), \
         both with `palisade-probe rr`. Median (min–max) of {} interleaved repetitions; \
         ratios are to no enforcement.\n",
        cfg.reps
    );
    let mut t = Table::new(&[
        "setup",
        "Gbit/s",
        "vs none",
        "CPU busy %",
        "CPU ms/GB",
        "RR p50 µs",
        "RR p99 µs",
        "CRR p50 µs",
        "CRR p99 µs",
        "CRR p99 vs none",
    ]);
    for setup in &setups {
        let c = &cells[setup];
        let name = setup.name();
        report.measured(&format!("throughput, {name}"), c.gbps.median());
        report.measured(&format!("RR p99, {name}"), c.rr_p99.median());
        report.measured(&format!("CRR p99, {name}"), c.crr_p99.median());
        report.measured(&format!("CPU, {name}"), c.cpu_pct.median());
        t.row(vec![
            name,
            c.gbps.show(2),
            ratio(&c.gbps, &base.gbps),
            c.cpu_pct.show(0),
            c.cpu_ms_per_gb.show(0),
            c.rr_p50.show(0),
            c.rr_p99.show(0),
            c.crr_p50.show(0),
            c.crr_p99.show(0),
            ratio(&c.crr_p99, &base.crr_p99),
        ]);
    }
    s.push_str(&t.render());
    let top = *sizes.last().unwrap_or(&0);
    let pal = &cells[&Setup::Palisade(top)];
    if let (Some(p), Some(b)) = (pal.gbps.median(), base.gbps.median()) {
        report.target(
            &format!("Throughput with {top} rules at least 95% of no enforcement"),
            &format!("{:.1}% ({p:.2} vs {b:.2} Gbit/s)", p / b * 100.0),
            p / b >= 0.95,
            "The gap is there with no policy at all (\"palisade, no policy\" in the table) and \
             does not grow with the rules: it is the cost of running both programs on every \
             packet of an established flow (about 240 ns each, see the per-packet table: \
             parsing, endpoint and conntrack lookups, conntrack and per-CPU counter updates) \
             on two cores that iperf3 already saturates. Rules add nothing measurable.",
        );
    }
    report.section("Throughput and latency between two containers", s);
}

/// The ClusterIP of the bench's Service (to the server), and of one to a
/// pod the client's policy does not allow.
const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DENIED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

/// `pal_service`'s run time and count so far.
fn service_runs(hook: &ServiceHook) -> (f64, u64) {
    let (t, n) = hook
        .run_stats()
        .unwrap_or_else(|e| panic!("read pal_service's run statistics: {e}"));
    (t.as_nanos() as f64, n)
}

/// Nanoseconds per run of `pal_service` between two readings.
fn ns_per_run(before: (f64, u64), after: (f64, u64)) -> Option<f64> {
    let runs = after.1.saturating_sub(before.1);
    (runs > 0).then(|| (after.0 - before.0) / runs as f64)
}

/// Service traffic: the client (egress-isolated, allowed to the server)
/// reaches the server directly and through a ClusterIP that kube-proxy-style
/// DNAT sends to it, with palisade's Service hook judging after the DNAT.
pub fn run_services(cfg: &Config, report: &mut Report) {
    let secs: u32 = if cfg.short { 1 } else { 5 };
    let rr_count = if cfg.short { 200 } else { 5_000 };
    let crr_count = if cfg.short { 50 } else { 1_000 };
    let bed = build();
    let node = &bed.node;
    let ns = &node.netns;
    let (client, server, denied) = (
        bed.pod("client"),
        bed.pod("server"),
        bed.pod("plain-server"),
    );
    // What a kube-proxy node has: bridged traffic through netfilter, and
    // the Service's DNAT; palisade's frontends and hook (the agent's job in
    // cluster mode, done here directly).
    ns.sysctl("net.bridge.bridge-nf-call-iptables", "1");
    restore(
        ns,
        "iptables-nft-restore",
        &format!(
            "*nat\n\
             -A PREROUTING -d {SERVICE_VIP}/32 -p tcp -j DNAT --to-destination {}\n\
             -A PREROUTING -d {DENIED_VIP}/32 -p tcp -j DNAT --to-destination {}\n\
             COMMIT\n",
            server.addr, denied.addr
        ),
    );
    let dp = KernelDataplane::new(&node.bpf_root, AttachMode::Auto);
    let hook = ServiceHook::new(&node.bpf_root, dp.service_program_pin());
    ns.run(|| hook.ensure())
        .unwrap_or_else(|e| panic!("attach pal_service: {e}"));
    let mut frontends = Frontends::open(&node.bpf_root).expect("open pal_svc");
    let keys: std::collections::BTreeSet<SvcKey> = [SERVICE_VIP, DENIED_VIP]
        .into_iter()
        .flat_map(|vip| [IPERF_PORT, RR_PORT].map(|p| SvcKey::new(IpAddr::V4(vip), 6, p)))
        .collect();
    frontends.set(&keys).expect("write pal_svc");
    node.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: bench}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: subject}}}]
"#,
    );
    // Enforced: through a ClusterIP, the backend decides.
    assert!(
        refused(client, denied.addr) && refused(client, IpAddr::V4(DENIED_VIP)),
        "the client's policy must refuse the other pod, directly and through its ClusterIP"
    );

    let stats_was = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .unwrap_or_else(|_| "0".into());
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").expect("enable bpf_stats");
    let targets = [
        ("direct to the pod", server.addr),
        ("through the ClusterIP", IpAddr::V4(SERVICE_VIP)),
    ];
    let mut cells: BTreeMap<usize, Cell> = BTreeMap::new();
    let mut established_ns = Samples::default();
    let mut new_flow_ns = Samples::default();
    for rep in 0..cfg.reps {
        for (i, (name, to)) in targets.iter().enumerate() {
            eprintln!("  services: rep {} of {}, {name}", rep + 1, cfg.reps);
            let cell = cells.entry(i).or_default();
            let s0 = service_runs(&hook);
            let (gbps, cpu, per_gb) = iperf(client, *to, secs);
            let s1 = service_runs(&hook);
            cell.gbps.push(gbps);
            cell.cpu_pct.push(cpu);
            cell.cpu_ms_per_gb.push(per_gb);
            let (p50, p99) = rr(client, *to, rr_count, false);
            cell.rr_p50.push(p50);
            cell.rr_p99.push(p99);
            let s2 = service_runs(&hook);
            let (p50, p99) = rr(client, *to, crr_count, true);
            let s3 = service_runs(&hook);
            cell.crr_p50.push(p50);
            cell.crr_p99.push(p99);
            if i == 1 {
                if let Some(ns) = ns_per_run(s0, s1) {
                    established_ns.push(ns);
                }
                // CRR: a new connection per round trip, so each SYN is
                // judged; the rest of its packets are established.
                if let Some(ns) = ns_per_run(s2, s3) {
                    new_flow_ns.push(ns);
                }
            }
        }
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_was.trim());
    drop(bed);

    let mut s = String::new();
    let _ = writeln!(
        s,
        "The client and the server of the throughput section, on one node with what a \
         kube-proxy node has: `bridge-nf-call-iptables` on, and a DNAT rule for a ClusterIP \
         ({SERVICE_VIP}) to the server, as kube-proxy's KUBE-SEP chains write it. The client \
         is egress-isolated by a NetworkPolicy that allows the server's pods; palisade's \
         Service frontends and its netfilter hook (`pal_service` at FORWARD) are in place, as \
         the agent puts them in cluster mode. Before measuring, a second ClusterIP that DNATs \
         to a pod the policy does not allow is checked to be refused. Same runs, interleaved: \
         the client to the server's own address, and to the ClusterIP. `pal_service` cost is \
         the kernel's own accounting (`kernel.bpf_stats_enabled`: run time over run count, \
         which includes the accounting's own clock reads: a two-instruction program measured \
         about 60 ns this way on this machine, research/nfbpf) during \
         the iperf3 run (established packets) and during CRR (every connection's first packet \
         judged after DNAT). Median (min–max) of {} repetitions.\n",
        cfg.reps
    );
    let mut t = Table::new(&[
        "client to",
        "Gbit/s",
        "vs direct",
        "CPU ms/GB",
        "RR p50 µs",
        "RR p99 µs",
        "CRR p50 µs",
        "CRR p99 µs",
    ]);
    let direct = &cells[&0];
    for (i, (name, _)) in targets.iter().enumerate() {
        let c = &cells[&i];
        report.measured(&format!("Service throughput, {name}"), c.gbps.median());
        report.measured(&format!("Service CRR p99, {name}"), c.crr_p99.median());
        t.row(vec![
            (*name).to_owned(),
            c.gbps.show(2),
            ratio(&c.gbps, &direct.gbps),
            c.cpu_ms_per_gb.show(0),
            c.rr_p50.show(0),
            c.rr_p99.show(0),
            c.crr_p50.show(0),
            c.crr_p99.show(0),
        ]);
    }
    s.push_str(&t.render());
    report.measured(
        "pal_service ns per packet, established",
        established_ns.median(),
    );
    report.measured("pal_service ns per packet, CRR", new_flow_ns.median());
    let _ = writeln!(
        s,
        "\n`pal_service` per packet it sees: {} ns during iperf3 (established), {} ns during \
         CRR (each connection's SYN judged, the rest established).",
        established_ns.show(0),
        new_flow_ns.show(0)
    );
    report.section("Service traffic: through a ClusterIP vs direct", s);
}
