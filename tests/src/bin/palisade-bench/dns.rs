//! DNS-aware egress: what the node's DNS proxy adds to a lookup, how long
//! an answer's addresses take to reach the datapath, and whether a
//! connection opened right after an answer is allowed.

use std::{
    fmt::Write,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RecordType},
};
use serde_json::Value;
use testbed::{
    dns::Unbound,
    node::{Node, NodeOptions, WORLD_V4},
    sys::{self, in_netns},
};

use crate::{
    Config, Report,
    stats::{Table, percentile},
};

/// Addresses for the race test: one fresh name and address per try.
const RACE_NET: &str = "198.18.0.0/15";

fn race_addr(i: usize) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000u32 + 1 + i as u32))
}

fn query_bytes(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
    m.to_vec().expect("query")
}

/// Ask `n` queries for `name` at `rate` per second from inside `netns`;
/// the round-trip times in microseconds (lost queries are left out).
fn paced(netns: &std::path::Path, server: SocketAddr, name: &str, n: usize, rate: f64) -> Vec<f64> {
    in_netns(netns, || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        s.connect(server).expect("connect");
        let gap = Duration::from_secs_f64(1.0 / rate);
        let start = Instant::now();
        let mut out = Vec::with_capacity(n);
        let mut buf = [0u8; 4096];
        for i in 0..n {
            let due = start + gap * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let q = query_bytes(i as u16, name);
            let t = Instant::now();
            if s.send(&q).is_err() {
                continue;
            }
            // Skip stale answers of earlier, timed-out queries.
            while let Ok(len) = s.recv(&mut buf) {
                if len >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == i as u16 {
                    out.push(t.elapsed().as_secs_f64() * 1e6);
                    break;
                }
            }
        }
        out
    })
}

/// Queries per second one client reaches asking one after another.
fn saturated(netns: &std::path::Path, server: SocketAddr, name: &str, secs: f64) -> f64 {
    in_netns(netns, || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        s.connect(server).expect("connect");
        let start = Instant::now();
        let mut done = 0u64;
        let mut buf = [0u8; 4096];
        let mut id = 0u16;
        while start.elapsed().as_secs_f64() < secs {
            id = id.wrapping_add(1);
            if s.send(&query_bytes(id, name)).is_ok() && s.recv(&mut buf).is_ok() {
                done += 1;
            }
        }
        done as f64 / start.elapsed().as_secs_f64()
    })
}

/// `tries` lookups of fresh names, each followed at once by a connection
/// to the answer; how many connected, and the lookups' round trips.
fn race(netns: &std::path::Path, server: SocketAddr, tries: usize) -> (usize, usize) {
    in_netns(netns, || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        s.connect(server).expect("connect");
        let mut ok = 0;
        let mut answered = 0;
        let mut buf = [0u8; 4096];
        for i in 0..tries {
            let q = query_bytes(i as u16, &format!("n{i}.race.example.test."));
            if s.send(&q).is_err() {
                continue;
            }
            let Ok(len) = s.recv(&mut buf) else { continue };
            let Ok(m) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            let Some(addr) = m.answers().iter().find_map(|r| match r.data() {
                hickory_proto::rr::RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            }) else {
                continue;
            };
            answered += 1;
            if TcpStream::connect_timeout(&SocketAddr::new(addr, 80), Duration::from_millis(500))
                .is_ok()
            {
                ok += 1;
            }
        }
        (ok, answered)
    })
}

pub fn run(cfg: &Config, report: &mut Report) {
    let tries = if cfg.short { 100 } else { 10_000 };
    let queries = if cfg.short { 300 } else { 5_000 };
    let n = Node::new(NodeOptions {
        world: true,
        daemon: true,
        // Addresses of the race expire quickly: the policy stays small.
        daemon_args: ["--dns-min-ttl", "1", "--dns-grace", "2"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    let world = &n.world.as_ref().expect("world").netns;
    // The race's addresses live on the outside host.
    let mut batch = String::new();
    for i in 0..tries {
        let _ = writeln!(batch, "addr add {}/32 dev eth0", race_addr(i));
    }
    let path = n.dir.join("race-addrs");
    std::fs::write(&path, batch).expect("write");
    sys::ip(&["-n", &world.name, "-batch", &path.display().to_string()]);
    sys::ip(&[
        "-n",
        &n.netns.name,
        "route",
        "add",
        RACE_NET,
        "via",
        WORLD_V4,
    ]);
    let mut records = vec![
        "a.example.test. 300 IN A 203.0.113.21".to_string(),
        "plain.other.test. 300 IN A 203.0.113.22".to_string(),
    ];
    for i in 0..tries {
        records.push(format!("n{i}.race.example.test. 1 IN A {}", race_addr(i)));
    }
    let _dns = Unbound::start(
        world,
        &n.dir.join("unbound"),
        &[WORLD_V4.parse().expect("addr")],
        &["example.test.", "other.test."],
        &records,
    );
    let web = n.add_pod("app", "web", &[]);
    let plain = n.add_pod("app", "plain", &[]);
    n.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: app, labels: {app: web}}\nspec: {containers: [{name: c}]}\n",
    );
    n.apply(
        r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {name: web, namespace: app}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - toFQDNs: [{matchName: a.example.test}, {matchPattern: "*.race.example.test"}]
    ports: [{port: 80}]
  - ports:
    - {port: 53, protocol: UDP, rules: {dns: [{matchPattern: "**.example.test"}]}}
"#,
    );
    let server = SocketAddr::new(WORLD_V4.parse().expect("addr"), 53);

    // Latency at 1,000 queries/s, through the proxy and direct (the pod no
    // policy selects), interleaved.
    let mut via = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..cfg.reps {
        via.extend(paced(
            &web.netns,
            server,
            "a.example.test.",
            queries,
            1000.0,
        ));
        direct.extend(paced(
            &plain.netns,
            server,
            "a.example.test.",
            queries,
            1000.0,
        ));
    }
    let p = |v: &[f64], q: f64| percentile(v, q).unwrap_or(f64::NAN);
    let (v50, v99, d50, d99) = (
        p(&via, 0.5),
        p(&via, 0.99),
        p(&direct, 0.5),
        p(&direct, 0.99),
    );
    let qps_via = saturated(
        &web.netns,
        server,
        "a.example.test.",
        if cfg.short { 1.0 } else { 5.0 },
    );
    let qps_direct = saturated(
        &plain.netns,
        server,
        "a.example.test.",
        if cfg.short { 1.0 } else { 5.0 },
    );

    // A fresh name per try, a connection right after each answer.
    let t = Instant::now();
    let (connected, answered) = race(&web.netns, server, tries);
    let race_secs = t.elapsed().as_secs_f64();

    // Answer-to-datapath times, from the flow log's DNS records.
    let mut learn = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        learn.clear();
        let out = n.ctl(&["flows", "-o", "json"], None);
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if let Ok(v) = serde_json::from_str::<Value>(l)
                && let Some(us) = v["dns"]["datapathMicros"].as_f64()
                && v["dns"]["name"]
                    .as_str()
                    .is_some_and(|s| s.ends_with("race.example.test"))
            {
                learn.push(us);
            }
        }
        if learn.len() >= answered.saturating_sub(answered / 100) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    let mut body = String::new();
    let _ = writeln!(
        body,
        "A pod whose PalisadeNetworkPolicy names domains asks a real unbound in the outside \
         namespace through the node's DNS proxy; a pod no policy selects asks it directly. \
         {queries} queries per repetition at 1,000/s for the latencies (the name is cached by \
         unbound and its address already learned: this is what the proxy adds to every lookup); \
         one client asking back to back for queries/s. For the race, each try looks up a name \
         never seen before (its own address) and connects to it at once.\n"
    );
    let mut tbl = Table::new(&["", "through the proxy", "direct", "added"]);
    tbl.row(vec![
        "latency p50 at 1,000 q/s (µs)".into(),
        format!("{v50:.0}"),
        format!("{d50:.0}"),
        format!("{:.0}", v50 - d50),
    ]);
    tbl.row(vec![
        "latency p99 at 1,000 q/s (µs)".into(),
        format!("{v99:.0}"),
        format!("{d99:.0}"),
        format!("{:.0}", v99 - d99),
    ]);
    tbl.row(vec![
        "queries/s, one client back to back".into(),
        format!("{qps_via:.0}"),
        format!("{qps_direct:.0}"),
        format!("{:.2}×", qps_via / qps_direct),
    ]);
    body.push_str(&tbl.render());
    let _ = writeln!(
        body,
        "\nAnswer received to its addresses in the datapath (a store transaction and the map \
         writes, before the pod gets the answer), {} fresh names: p50 {:.0} µs, p99 {:.0} µs.\n\n\
         Connections started right after the answer: {connected} of {answered} answered tries \
         allowed ({tries} tries in {race_secs:.1} s).",
        learn.len(),
        p(&learn, 0.5),
        p(&learn, 0.99),
    );
    report.section("DNS-aware egress", body);
    report.measured("DNS latency p99 through the proxy", Some(v99));
    report.measured("DNS latency p99 direct", Some(d99));
    report.measured("answer to datapath p99", percentile(&learn, 0.99));
    report.measured(
        "connections allowed right after the answer",
        (answered > 0).then(|| connected as f64 / answered as f64),
    );
    let added99 = v99 - d99;
    report.target(
        "DNS proxy: added latency p99 under 1 ms at 1,000 queries/s",
        &format!("{added99:.0} µs"),
        added99 < 1000.0,
        "",
    );
    report.target(
        "a connection right after the answer is allowed in 100% of 10,000 tries",
        &format!("{connected} of {answered} ({tries} tries)"),
        answered == tries && connected == answered && tries >= 10_000,
        if tries < 10_000 {
            "short mode runs fewer tries"
        } else {
            ""
        },
    );
}
