//! See, learn, stage, enforce: flow records from real traffic, audit mode,
//! policy learning round-trips, the traffic graph, and the agent (crash,
//! restart, log cap, metrics), each on a hermetic node.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::Value;
use testbed::{
    matrix::{Peer, probe_all},
    node::{Node, NodeOptions, Pod, pods_yaml},
    probe::{PROBE_TIMEOUT, Proto, probe},
    runtimes::wait_for,
    sys::{describe, in_netns},
};

/// A running `palisadectl agent` in the node namespace.
struct Agent {
    child: Child,
    port: u16,
}

impl Agent {
    fn start(n: &Node, port: u16, extra: &[&str]) -> Self {
        let mut c = n.netns.command(n.bin_dir.join("palisadectl"));
        c.env("PALISADE_STATE_DIR", &n.state_dir)
            .env("PALISADE_BPF_ROOT", &n.bpf_root)
            .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let agent = Self {
            child: c.spawn().expect("start the agent"),
            port,
        };
        wait_for(
            "the agent's metrics endpoint",
            Duration::from_secs(10),
            || {
                in_netns(&n.netns.path, || {
                    TcpStream::connect(("127.0.0.1", port)).is_ok()
                })
            },
        );
        agent
    }

    fn metrics(&self, n: &Node) -> String {
        let port = self.port;
        in_netns(&n.netns.path, move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn flows(n: &Node, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["flows", "-o", "json"];
    a.extend_from_slice(args);
    let out = n.ctl(&a, None);
    assert!(
        out.status.success(),
        "palisadectl flows: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("flows line {l:?}: {e}")))
        .collect()
}

/// Open `count` TCP connections from `from` to `to:port` (each a new flow).
fn connect(from: &Pod, to: &Pod, port: u16, count: usize) -> usize {
    (0..count)
        .filter(|_| probe(&from.netns, to.addr(false), Proto::Tcp, port, PROBE_TIMEOUT))
        .count()
}

/// Wait until the agent has logged what `pred` looks for.
fn wait_flows(n: &Node, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        last = flows(n, &[]);
        if pred(&last) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "the flow log never showed {what}; it has:\n{}",
        last.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn count(fs: &[Value], pred: impl Fn(&Value) -> bool) -> usize {
    fs.iter().filter(|f| pred(f)).count()
}

#[test]
fn flows_show_endpoints_verdicts_and_deciding_policies_and_counters_match() {
    let n = Node::new(NodeOptions::default());
    n.apply(&pods_yaml(&[
        ("x", "a", "app: a"),
        ("x", "b", "app: b"),
        ("y", "c", "app: c"),
    ]));
    let a = n.add_pod("x", "a", &[80]);
    let b = n.add_pod("x", "b", &[80]);
    let c = n.add_pod("y", "c", &[80]);
    let agent = Agent::start(&n, 19970, &[]);
    n.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lockdown, namespace: y, annotations: {palisade.io/mode: audit}}
spec:
  podSelector: {}
"#,
    );
    assert_eq!(connect(&b, &a, 80, 3), 3, "b reaches a");
    assert_eq!(connect(&c, &a, 80, 2), 0, "c is denied");
    assert_eq!(connect(&a, &c, 80, 2), 2, "audit mode drops nothing");

    let is = |f: &Value, at: &str, dir: &str, peer: &str, verdict: &str| {
        f["endpoint"]["name"] == at
            && f["direction"] == dir
            && f["peer"]["name"] == peer
            && f["verdict"] == verdict
    };
    let fs = wait_flows(&n, "all three kinds of flows", |fs| {
        count(fs, |f| is(f, "a", "ingress", "b", "allowed")) >= 3
            && count(fs, |f| is(f, "a", "ingress", "c", "denied")) >= 2
            && count(fs, |f| is(f, "c", "ingress", "a", "audit")) >= 2
    });
    // Counters: one record per allowed or audited connection at each end.
    assert_eq!(count(&fs, |f| is(f, "a", "ingress", "b", "allowed")), 3);
    assert_eq!(count(&fs, |f| is(f, "b", "egress", "a", "allowed")), 3);
    assert_eq!(count(&fs, |f| is(f, "c", "ingress", "a", "audit")), 2);
    // Denied attempts retransmit their SYN; each attempt has its own port.
    let attempts: BTreeSet<u64> = fs
        .iter()
        .filter(|f| is(f, "a", "ingress", "c", "denied"))
        .map(|f| f["sport"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts.len(), 2, "two denied connection attempts");

    let allowed = fs
        .iter()
        .find(|f| is(f, "a", "ingress", "b", "allowed"))
        .unwrap();
    assert_eq!(allowed["policy"], "x/allow-b", "{allowed}");
    assert_eq!(allowed["endpoint"]["namespace"], "x");
    assert_eq!(allowed["peer"]["labels"]["app"], "b");
    assert_eq!(allowed["dport"], 80);
    assert_eq!(allowed["protocol"], "TCP");
    let denied = fs
        .iter()
        .find(|f| is(f, "a", "ingress", "c", "denied"))
        .unwrap();
    assert_eq!(denied["isolatedBy"][0], "x/allow-b", "{denied}");
    assert_eq!(denied["kind"], "drop");
    let audit = fs
        .iter()
        .find(|f| is(f, "c", "ingress", "a", "audit"))
        .unwrap();
    assert_eq!(audit["isolatedBy"][0], "y/lockdown (audit)", "{audit}");

    // Filters.
    assert!(
        flows(&n, &["--verdict", "denied"])
            .iter()
            .all(|f| f["verdict"] == "denied")
    );
    let of_c = flows(&n, &["--pod", "y/c"]);
    assert!(
        !of_c.is_empty()
            && of_c
                .iter()
                .all(|f| f["endpoint"]["name"] == "c" || f["peer"]["name"] == "c")
    );
    assert!(flows(&n, &["--namespace", "y", "--port", "81"]).is_empty());
    let table = n.ctl(&["flows", "--verdict", "audit"], None);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.starts_with("TIME") && text.contains("y/lockdown (audit)"),
        "{text}"
    );

    // Metrics.
    let m = agent.metrics(&n);
    let line = |needle: &[&str]| {
        m.lines()
            .find(|l| l.starts_with("palisade_flows_total") && needle.iter().all(|x| l.contains(x)))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(
        line(&[
            "namespace=\"x\"",
            "pod=\"a\"",
            "verdict=\"allowed\"",
            "policy=\"x/allow-b\""
        ])
        .as_deref(),
        Some("3"),
        "{m}"
    );
    for name in [
        "palisade_endpoints 3",
        "palisade_map_entries",
        "palisade_flow_events_lost_total",
        "palisade_packets_total",
    ] {
        assert!(m.contains(name), "metrics lack {name}:\n{m}");
    }
}

#[test]
fn a_closed_pipe_ends_flows_cleanly() {
    let n = Node::new(NodeOptions::default());
    let a = n.add_pod("default", "a", &[80]);
    let b = n.add_pod("default", "b", &[80]);
    let _agent = Agent::start(&n, 19971, &[]);
    connect(&a, &b, 80, 20);
    wait_flows(&n, "20 flows", |fs| fs.len() >= 20);
    let script = format!(
        "PALISADE_STATE_DIR={} PALISADE_BPF_ROOT={} {} flows | head -n 2; echo \"status ${{PIPESTATUS[0]}}\"",
        n.state_dir.display(),
        n.bpf_root.display(),
        n.bin_dir.join("palisadectl").display()
    );
    let out = n
        .netns
        .command("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("status 0"),
        "palisadectl flows | head must exit 0: {text}\n{}",
        describe(&out)
    );
}

#[test]
fn audit_mode_drops_nothing_and_enforcing_drops_exactly_what_audit_reported() {
    let n = Node::new(NodeOptions::default());
    n.apply(&pods_yaml(&[
        ("x", "a", "role: db"),
        ("x", "b", "role: api"),
        ("x", "c", "role: web"),
    ]));
    let pods: Vec<Arc<Pod>> = ["a", "b", "c"]
        .iter()
        .map(|p| n.add_pod("x", p, &[80]))
        .collect();
    let peers: Vec<Peer> = pods
        .iter()
        .map(|p| Peer {
            name: p.name.clone(),
            netns: p.netns.clone(),
            addr: p.addr(false),
        })
        .collect();
    let _agent = Agent::start(&n, 19972, &[]);
    let policy = |mode: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: db, namespace: x, annotations: {{palisade.io/mode: {mode}}}}}\nspec:\n  podSelector: {{matchLabels: {{role: db}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{role: api}}}}}}]}}]\n"
        )
    };
    n.apply(&policy("audit"));
    let audited_matrix = probe_all(&peers, Proto::Tcp, 80);
    assert!(
        audited_matrix.cells.values().all(|v| *v),
        "audit drops nothing:\n{audited_matrix}"
    );
    let fs = wait_flows(&n, "audit records", |fs| {
        fs.iter().any(|f| f["verdict"] == "audit")
    });
    let audited: BTreeSet<(String, String)> = fs
        .iter()
        .filter(|f| f["verdict"] == "audit")
        .map(|f| {
            (
                f["peer"]["name"].as_str().unwrap().to_owned(),
                f["endpoint"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        audited,
        [("c".to_owned(), "a".to_owned())].into(),
        "only web -> db would be denied"
    );
    assert!(!fs.iter().any(|f| f["verdict"] == "denied"));

    n.apply(&policy("enforce"));
    let enforced = probe_all(&peers, Proto::Tcp, 80);
    let blocked: BTreeSet<(String, String)> = enforced
        .cells
        .iter()
        .filter(|(_, v)| !**v)
        .map(|((f, t), _)| (f.clone(), t.clone()))
        .collect();
    assert_eq!(
        blocked, audited,
        "enforcing drops exactly what audit reported:\n{enforced}"
    );

    // Namespace-wide audit, set with palisadectl mode, overrides nothing
    // the policy says itself; a policy without its own mode follows it.
    n.apply(&policy("enforce").replace(
        "annotations: {palisade.io/mode: enforce}",
        "annotations: {}",
    ));
    let out = n.ctl(&["mode", "audit", "-n", "x"], None);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        probe_all(&peers, Proto::Tcp, 80).cells.values().all(|v| *v),
        "namespace in audit"
    );
    let out = n.ctl(&["mode", "inherit", "-n", "x"], None);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        probe_all(&peers, Proto::Tcp, 80).get("c", "a"),
        Some(false),
        "back to enforce"
    );
    let out = n.ctl(&["mode", "audit"], None);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        probe_all(&peers, Proto::Tcp, 80).get("c", "a"),
        Some(true),
        "node-wide audit"
    );
}

#[test]
fn learned_policies_allow_every_observed_connection_and_deny_the_rest() {
    let n = Node::new(NodeOptions {
        world: true,
        ..Default::default()
    });
    n.apply(&pods_yaml(&[
        ("shop", "web", "app: web"),
        ("shop", "api", "app: api"),
        ("shop", "cache", "app: cache"),
        ("data", "db", "app: db"),
        ("data", "backup", "app: backup"),
        ("data", "idle", "app: idle"),
    ]));
    // A pod that never talks: no policy is learned for it.
    let idle = n.add_pod("data", "idle", &[80]);
    let names = [
        ("shop", "web"),
        ("shop", "api"),
        ("shop", "cache"),
        ("data", "db"),
        ("data", "backup"),
    ];
    let pods: Vec<Arc<Pod>> = names
        .iter()
        .map(|(ns, p)| n.add_pod(ns, p, &[80, 81]))
        .collect();
    let pod = |name: &str| pods.iter().find(|p| p.name == name).unwrap().clone();
    let world_ip = n.world_addr(false);
    let world_ns = n.world.as_ref().unwrap().netns.path.clone();
    let _agent = Agent::start(&n, 19973, &[]);

    // The traffic pattern to learn.
    let pattern: Vec<(&str, &str, u16, Proto)> = vec![
        ("world", "web", 80, Proto::Tcp),
        ("web", "api", 81, Proto::Tcp),
        ("api", "cache", 80, Proto::Udp),
        ("api", "db", 80, Proto::Tcp),
        ("backup", "db", 81, Proto::Tcp),
        ("api", "world", 80, Proto::Tcp),
    ];
    let endpoints = |name: &str| -> (std::path::PathBuf, std::net::IpAddr) {
        if name == "world" {
            (world_ns.clone(), world_ip)
        } else {
            let p = pod(name);
            (p.netns.clone(), p.addr(false))
        }
    };
    for (from, to, port, proto) in &pattern {
        let (ns, _) = endpoints(from);
        let (_, addr) = endpoints(to);
        assert!(
            probe(&ns, addr, *proto, *port, PROBE_TIMEOUT),
            "{from} -> {to}:{port} before learning"
        );
    }
    wait_flows(&n, "the whole pattern", |fs| {
        pattern.iter().all(|(from, to, port, _)| {
            fs.iter().any(|f| {
                let c = if f["direction"] == "egress" {
                    &f["endpoint"]
                } else {
                    &f["peer"]
                };
                let s = if f["direction"] == "egress" {
                    &f["peer"]
                } else {
                    &f["endpoint"]
                };
                let is = |side: &Value, who: &str| {
                    if who == "world" {
                        side["kind"] == "world"
                    } else {
                        side["name"] == who
                    }
                };
                is(c, from) && is(s, to) && f["dport"] == *port
            })
        })
    });

    let out = n.ctl(&["learn"], None);
    assert!(out.status.success(), "learn: {}", describe(&out));
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        report.contains("covers"),
        "the report says what each rule covers:\n{report}"
    );
    // Valid NetworkPolicy, parsed by the same code that parses user policy.
    let objects = palisade::policy::parse_documents(&yaml, "learned")
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(objects.len(), 5, "one policy per workload:\n{yaml}");
    assert!(
        !yaml.contains("10.100.0."),
        "pods are selected by label, never by address:\n{yaml}"
    );
    // Deterministic: learning again gives the same bytes.
    let again = n.ctl(&["learn"], None);
    assert_eq!(again.stdout, out.stdout);

    n.apply(&yaml);
    for (from, to, port, proto) in &pattern {
        let (ns, _) = endpoints(from);
        let (_, addr) = endpoints(to);
        assert!(
            probe(&ns, addr, *proto, *port, PROBE_TIMEOUT),
            "observed {from} -> {to}:{port}/{proto:?} must still work"
        );
    }
    // Every unobserved pair (on the ports and protocols used) is denied.
    let everyone: Vec<&str> = vec!["world", "web", "api", "cache", "db", "backup"];
    let mut wrong = Vec::new();
    for from in &everyone {
        for to in &everyone {
            if from == to || (*from == "world" && *to == "world") {
                continue;
            }
            for (port, proto) in [(80, Proto::Tcp), (81, Proto::Tcp), (80, Proto::Udp)] {
                if pattern
                    .iter()
                    .any(|(f, t, p, pr)| f == from && t == to && *p == port && *pr == proto)
                {
                    continue;
                }
                let (ns, _) = endpoints(from);
                let (_, addr) = endpoints(to);
                if probe(&ns, addr, proto, port, Duration::from_millis(600)) {
                    wrong.push(format!("{from} -> {to}:{port}/{proto:?}"));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "unobserved connections still work after learning:\n{}\n{yaml}",
        wrong.join("\n")
    );

    // With --baseline, a BaselineAdminNetworkPolicy denies what no learned
    // policy decides: the idle pod (isolated by nothing) is cut off, the
    // observed pattern keeps working.
    // (No probe from idle before: any traffic of its own would be learned
    // and give it a policy. api -> world above shows the world is there.)
    let out = n.ctl(&["learn", "--baseline"], None);
    assert!(out.status.success(), "learn --baseline: {}", describe(&out));
    let with_baseline = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        with_baseline.contains("kind: BaselineAdminNetworkPolicy"),
        "{with_baseline}"
    );
    n.apply(&with_baseline);
    for (from, to, port, proto) in &pattern {
        let (ns, _) = endpoints(from);
        let (_, addr) = endpoints(to);
        assert!(
            probe(&ns, addr, *proto, *port, PROBE_TIMEOUT),
            "observed {from} -> {to}:{port}/{proto:?} must still work with the baseline"
        );
    }
    assert!(
        !probe(
            &idle.netns,
            world_ip,
            Proto::Tcp,
            80,
            Duration::from_millis(600)
        ),
        "the baseline denies idle -> world:\n{}\n{}\n{}",
        describe(&n.ctl(
            &[
                "explain",
                "--from",
                "data/idle",
                "--to",
                &world_ip.to_string(),
                "--port",
                "80/TCP"
            ],
            None
        )),
        describe(&n.ctl(&["get", "banp"], None)),
        describe(&n.ctl(&["get", "endpoints"], None)),
    );
    assert!(
        !probe(
            &pod("api").netns,
            idle.addr(false),
            Proto::Tcp,
            80,
            Duration::from_millis(600)
        ),
        "nothing reaches idle"
    );
}

#[test]
fn the_graph_renders_nodes_and_edges() {
    let n = Node::new(NodeOptions {
        world: true,
        ..Default::default()
    });
    n.apply(&pods_yaml(&[
        ("shop", "web", "app: web"),
        ("shop", "api", "app: api"),
        ("data", "db", "app: db"),
    ]));
    let web = n.add_pod("shop", "web", &[80]);
    let api = n.add_pod("shop", "api", &[80]);
    let db = n.add_pod("data", "db", &[80]);
    let _agent = Agent::start(&n, 19974, &[]);
    n.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: data}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}, podSelector: {matchLabels: {app: api}}}]}]\n",
    );
    assert!(probe(
        &web.netns,
        api.addr(false),
        Proto::Tcp,
        80,
        PROBE_TIMEOUT
    ));
    assert!(probe(
        &api.netns,
        db.addr(false),
        Proto::Tcp,
        80,
        PROBE_TIMEOUT
    ));
    assert!(!probe(
        &web.netns,
        db.addr(false),
        Proto::Tcp,
        80,
        PROBE_TIMEOUT
    ));
    assert!(probe(
        &web.netns,
        n.world_addr(false),
        Proto::Tcp,
        80,
        PROBE_TIMEOUT
    ));
    wait_flows(&n, "the denied web -> db", |fs| {
        fs.iter().any(|f| f["verdict"] == "denied")
    });

    let out = n.ctl(&["graph", "-o", "dot"], None);
    assert!(out.status.success(), "{}", describe(&out));
    let dot = String::from_utf8_lossy(&out.stdout);
    for node in [
        "\"pod:shop/web\"",
        "\"pod:shop/api\"",
        "\"pod:data/db\"",
        "\"ext:203.0.113.10\"",
        "label=\"namespace shop\"",
        "label=\"namespace data\"",
    ] {
        assert!(dot.contains(node), "graph lacks {node}:\n{dot}");
    }
    assert!(
        dot.contains("\"pod:shop/web\" -> \"pod:shop/api\" [color=\"#2e7d32\""),
        "allowed edge:\n{dot}"
    );
    assert!(
        dot.contains("\"pod:shop/web\" -> \"pod:data/db\" [color=\"#c62828\""),
        "denied edge:\n{dot}"
    );
    assert!(
        dot.contains("\"pod:shop/web\" -> \"ext:203.0.113.10\""),
        "north-south edge:\n{dot}"
    );

    let html = n.dir.join("map.html");
    let out = n.ctl(
        &["graph", "-o", "html", "--file", html.to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{}", describe(&out));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("<svg") && page.contains("namespace shop") && page.contains("203.0.113.10"),
        "{page}"
    );
    let png = n.dir.join("map.png");
    let out = n.ctl(
        &["graph", "-o", "png", "--file", png.to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{}", describe(&out));
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
    if let Ok(dir) = std::env::var("PALISADE_GRAPH_OUT") {
        std::fs::copy(&png, std::path::Path::new(&dir).join("traffic-map.png")).unwrap();
        std::fs::copy(&html, std::path::Path::new(&dir).join("traffic-map.html")).unwrap();
    }
}

#[test]
fn the_agent_survives_kill_9_without_changing_a_verdict_and_its_log_stays_capped() {
    let n = Node::new(NodeOptions::default());
    n.apply(&pods_yaml(&[
        ("x", "a", "app: a"),
        ("x", "b", "app: b"),
        ("x", "c", "app: c"),
    ]));
    let a = n.add_pod("x", "a", &[80]);
    let b = n.add_pod("x", "b", &[80]);
    let c = n.add_pod("x", "c", &[80]);
    n.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]\n",
    );
    let cap: u64 = 24 * 1024;
    let mut agent = Agent::start(
        &n,
        19975,
        &["--log-max-bytes", &cap.to_string(), "--log-files", "3"],
    );
    // Plenty of flows: each UDP datagram from a new port is a new flow.
    let target = SocketAddr::new(a.addr(false), 80);
    in_netns(&b.netns, move || {
        for _ in 0..400 {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let _ = s.send_to(b"x", target);
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let logdir = n.state_dir.join("flows");
    let total = || -> u64 {
        std::fs::read_dir(&logdir)
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum()
    };
    assert!(
        total() <= cap,
        "the flow log is {} bytes, over its {cap}-byte cap",
        total()
    );
    assert!(total() > cap / 2, "the log did fill up ({} bytes)", total());

    agent.kill9();
    for _ in 0..3 {
        assert!(
            probe(&b.netns, a.addr(false), Proto::Tcp, 80, PROBE_TIMEOUT),
            "allowed with the agent dead"
        );
        assert!(
            !probe(&c.netns, a.addr(false), Proto::Tcp, 80, PROBE_TIMEOUT),
            "denied with the agent dead"
        );
    }
    let mut agent = Agent::start(
        &n,
        19975,
        &["--log-max-bytes", &cap.to_string(), "--log-files", "3"],
    );
    let tcp_before = count(&flows(&n, &[]), |f| {
        f["protocol"] == "TCP" && f["verdict"] == "allowed"
    });
    assert_eq!(connect(&b, &a, 80, 1), 1);
    wait_flows(&n, "a flow logged after the restart", |fs| {
        count(fs, |f| f["protocol"] == "TCP" && f["verdict"] == "allowed") > tcp_before
    });
    assert!(!probe(
        &c.netns,
        a.addr(false),
        Proto::Tcp,
        80,
        PROBE_TIMEOUT
    ));
    assert!(total() <= cap);
    agent.kill9();
}

/// Flow records name the deciding tier and policy: an AdminNetworkPolicy
/// deny, a NetworkPolicy allow after an ANP Pass, a
/// BaselineAdminNetworkPolicy deny. In audit mode (annotation) the same
/// ANP and BANP drop nothing and report what they would deny, naming
/// themselves; switched to enforce, they drop exactly that.
#[test]
fn flows_name_the_deciding_tier_and_audit_mode_works_per_tier_policy() {
    let n = Node::new(NodeOptions::default());
    n.apply(&pods_yaml(&[
        ("x", "a", "role: db"),
        ("x", "b", "role: api"),
        ("y", "c", "role: web"),
    ]));
    let a = n.add_pod("x", "a", &[80, 81]);
    let b = n.add_pod("x", "b", &[80, 81]);
    let c = n.add_pod("y", "c", &[80, 81]);
    let _agent = Agent::start(&n, 19974, &[]);
    let tiers = |mode: &str| {
        format!(
            r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {{name: guard, annotations: {{palisade.io/mode: {mode}}}}}
spec:
  priority: 10
  subject: {{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: x}}}}}}
  ingress:
  - name: api-to-np
    action: Pass
    from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: api}}}}}}}}]
  - name: no-web-81
    action: Deny
    from: [{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}}}]
    ports: [{{portNumber: {{port: 81}}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {{name: default, annotations: {{palisade.io/mode: {mode}}}}}
spec:
  subject: {{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}}}
  ingress:
  - action: Deny
    from: [{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: x}}}}}}]
"#
        )
    };
    // x/a is isolated by a NetworkPolicy that admits role=api on 80.
    n.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: x}\nspec:\n  podSelector: {matchLabels: {role: db}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: api}}}], ports: [{port: 80}]}]\n",
    );

    // Audit first: nothing the tiers would deny is dropped.
    n.apply(&tiers("audit"));
    assert_eq!(connect(&c, &b, 81, 1), 1, "audit: y/c -> x/b:81 passes");
    assert_eq!(connect(&a, &c, 80, 1), 1, "audit: x/a -> y/c passes");
    let fs = wait_flows(&n, "the audit records of both tiers", |fs| {
        let audit_by = |p: &str| {
            fs.iter()
                .any(|f| f["verdict"] == "audit" && f["policy"] == p && f["direction"] == "ingress")
        };
        audit_by("AdminNetworkPolicy/guard") && audit_by("BaselineAdminNetworkPolicy/default")
    });
    let audited = fs
        .iter()
        .find(|f| f["verdict"] == "audit" && f["policy"] == "AdminNetworkPolicy/guard");
    assert_eq!(
        audited.map(|f| (
            f["tier"].clone(),
            f["dport"].clone(),
            f["peer"]["name"].clone()
        )),
        Some((Value::from("Admin"), Value::from(81), Value::from("c"))),
        "the ANP audit record: {fs:#?}"
    );

    // Enforced: the same connections are dropped, each by its tier.
    n.apply(&tiers("enforce"));
    assert_eq!(connect(&c, &b, 81, 1), 0, "ANP denies y/c -> x/b:81");
    assert_eq!(connect(&c, &b, 80, 1), 1, "port 80 is not the ANP's");
    assert_eq!(connect(&a, &c, 80, 1), 0, "BANP denies x -> y/c");
    assert_eq!(
        connect(&b, &a, 80, 1),
        1,
        "ANP passes api on; the NP allows it"
    );
    assert_eq!(
        connect(&b, &a, 81, 1),
        0,
        "ANP passes api on; the NP denies 81"
    );
    let fs = wait_flows(&n, "drops by each tier and the NP allow", |fs| {
        let seen = |verdict: &str, tier: &str, policy: &str| {
            fs.iter().any(|f| {
                f["verdict"] == verdict
                    && f["tier"] == tier
                    && f["policy"] == policy
                    && f["direction"] == "ingress"
            })
        };
        seen("denied", "Admin", "AdminNetworkPolicy/guard")
            && seen("denied", "Baseline", "BaselineAdminNetworkPolicy/default")
            && seen("allowed", "NetworkPolicy", "x/db")
    });
    // The NetworkPolicy's own deny (after the Pass) names what isolates.
    assert!(
        fs.iter().any(|f| f["verdict"] == "denied"
            && f["dport"] == 81
            && f["peer"]["name"] == "b"
            && f["policy"].is_null()
            && f["isolatedBy"]
                .as_array()
                .is_some_and(|v| v.iter().any(|p| p == "x/db"))),
        "the NetworkPolicy deny after the Pass: {fs:#?}"
    );
}
