//! Service traffic judged on its backend. Each node runs kube-proxy's rules
//! as kube-proxy writes them (iptables mode: KUBE-SERVICES, KUBE-SVC-*,
//! KUBE-SEP-* chains with `-m statistic --mode random`; nftables mode: a
//! `numgen random` verdict map to per-endpoint chains), written here by the
//! test in each node's namespace; the Service objects go to the test API
//! server. A pod's connection to a ClusterIP or a NodePort must get the
//! verdict of a direct connection to the backend the DNAT chose, for
//! backends on the same node and on others, IPv4 and IPv6.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use testbed::{
    cluster::{Cluster, Topology, node_address},
    node::{Node, Pod},
    probe::{PROBE_TIMEOUT, Proto, probe, who},
    sys::{self, command_in, in_netns},
};

const CLUSTER_V4: &str = "10.96.0.10";
const CLUSTER_V6: &str = "fd00:96::10";
const NODE_PORT: u16 = 30080;
/// One SYN per attempt: a retransmission would be balanced again.
const ATTEMPT: Duration = Duration::from_millis(900);
const ATTEMPTS: usize = 16;
/// The client may only reach tier one (b1, on the client's node).
const CLIENT_TO_TIER_ONE: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector: {matchLabels: {tier: one}}
"#;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Iptables,
    Nftables,
}

/// kube-proxy's rules for one Service (port 80 to each backend's port 80,
/// and NodePort 30080) in a node's namespace.
fn kube_proxy(node: &Node, mode: Mode, ipv6: bool, backends: &[&Pod]) {
    let ns = node.netns.name.as_str();
    // A backend on this node's bridge answers its client over the bridge:
    // kube-proxy needs bridged traffic to pass netfilter (br_netfilter) to
    // undo the DNAT on the reply.
    node.netns.sysctl("net.bridge.bridge-nf-call-iptables", "1");
    node.netns
        .sysctl("net.bridge.bridge-nf-call-ip6tables", "1");
    let families: &[bool] = if ipv6 { &[false, true] } else { &[false] };
    match mode {
        Mode::Iptables => {
            for &v6 in families {
                let tool = if v6 { "ip6tables" } else { "iptables" };
                let ipt = |args: &[&str]| {
                    let mut a = vec!["netns", "exec", ns, tool, "-w", "-t", "nat"];
                    a.extend_from_slice(args);
                    sys::run("ip", &a);
                };
                let vip = if v6 { CLUSTER_V6 } else { CLUSTER_V4 };
                let node_addr = node_address(node_index(node), v6).to_string();
                ipt(&["-N", "KUBE-SERVICES"]);
                ipt(&["-N", "KUBE-NODEPORTS"]);
                ipt(&["-N", "KUBE-SVC-WEB"]);
                ipt(&["-A", "PREROUTING", "-j", "KUBE-SERVICES"]);
                ipt(&[
                    "-A",
                    "KUBE-SERVICES",
                    "-d",
                    vip,
                    "-p",
                    "tcp",
                    "--dport",
                    "80",
                    "-j",
                    "KUBE-SVC-WEB",
                ]);
                ipt(&[
                    "-A",
                    "KUBE-SERVICES",
                    "-d",
                    &node_addr,
                    "-j",
                    "KUBE-NODEPORTS",
                ]);
                ipt(&[
                    "-A",
                    "KUBE-NODEPORTS",
                    "-p",
                    "tcp",
                    "--dport",
                    &NODE_PORT.to_string(),
                    "-j",
                    "KUBE-SVC-WEB",
                ]);
                let n = backends.len();
                for (i, b) in backends.iter().enumerate() {
                    let sep = format!("KUBE-SEP-WEB{i}");
                    ipt(&["-N", &sep]);
                    let to = if v6 {
                        format!("[{}]:80", b.addr(true))
                    } else {
                        format!("{}:80", b.addr(false))
                    };
                    ipt(&[
                        "-A",
                        &sep,
                        "-p",
                        "tcp",
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &to,
                    ]);
                    if i + 1 < n {
                        let p = format!("{:.5}", 1.0 / (n - i) as f64);
                        ipt(&[
                            "-A",
                            "KUBE-SVC-WEB",
                            "-m",
                            "statistic",
                            "--mode",
                            "random",
                            "--probability",
                            &p,
                            "-j",
                            &sep,
                        ]);
                    } else {
                        ipt(&["-A", "KUBE-SVC-WEB", "-j", &sep]);
                    }
                }
            }
        }
        Mode::Nftables => {
            let mut rules = String::new();
            for &v6 in families {
                let (family, l3, vip) = if v6 {
                    ("ip6", "ip6", CLUSTER_V6)
                } else {
                    ("ip", "ip", CLUSTER_V4)
                };
                let node_addr = node_address(node_index(node), v6);
                let mut endpoints = String::new();
                let mut vmap = Vec::new();
                for (i, b) in backends.iter().enumerate() {
                    let to = if v6 {
                        format!("[{}]:80", b.addr(true))
                    } else {
                        format!("{}:80", b.addr(false))
                    };
                    endpoints.push_str(&format!(
                        "  chain endpoint-web-{i} {{\n    meta l4proto tcp dnat {l3} to {to}\n  }}\n"
                    ));
                    vmap.push(format!("{i} : goto endpoint-web-{i}"));
                }
                rules.push_str(&format!(
                    "table {family} kube-proxy {{\n\
                     {endpoints}\
                       chain service-web {{\n    numgen random mod {n} vmap {{ {vmap} }}\n  }}\n\
                       chain services {{\n    {l3} daddr {vip} tcp dport 80 goto service-web\n    \
                         {l3} daddr {node_addr} tcp dport {NODE_PORT} goto service-web\n  }}\n\
                       chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
                         jump services\n  }}\n\
                     }}\n",
                    n = backends.len(),
                    vmap = vmap.join(", "),
                ));
            }
            let file = node.dir.join("kube-proxy.nft");
            std::fs::write(&file, rules).unwrap();
            sys::run(
                "ip",
                &["netns", "exec", ns, "nft", "-f", file.to_str().unwrap()],
            );
        }
    }
}

fn node_index(node: &Node) -> usize {
    // Nodes are named node-<i> in their daemon's options.
    let name = &node
        .options
        .kube
        .as_ref()
        .expect("a cluster node")
        .node_name;
    name.trim_start_matches("node-").parse().unwrap()
}

/// The Service object: port 80 and NodePort 30080, selecting app=web.
fn service_yaml(ipv6: bool) -> String {
    let ips = if ipv6 {
        format!("[{CLUSTER_V4}, '{CLUSTER_V6}']")
    } else {
        format!("[{CLUSTER_V4}]")
    };
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: x}}
spec:
  type: NodePort
  selector: {{app: web}}
  clusterIP: {CLUSTER_V4}
  clusterIPs: {ips}
  ports:
  - {{name: http, port: 80, targetPort: 80, nodePort: {NODE_PORT}, protocol: TCP}}
"#
    )
}

/// Connect `ATTEMPTS` times; by backend address, how many answered, and
/// how many attempts got no connection.
fn spread(from: &Pod, target: IpAddr, port: u16) -> (BTreeMap<IpAddr, usize>, usize) {
    let mut by = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..ATTEMPTS {
        match who(&from.netns, target, port, ATTEMPT) {
            Some(b) => *by.entry(b).or_default() += 1,
            None => failed += 1,
        }
    }
    (by, failed)
}

/// Through `target`, every answer comes from `allowed`, and when
/// `denied` is also a backend some attempts fail (the DNAT chose it).
fn expect_only(
    from: &Pod,
    target: IpAddr,
    port: u16,
    allowed: &[IpAddr],
    some_fail: bool,
    what: &str,
) {
    let (by, failed) = spread(from, target, port);
    let wrong: Vec<_> = by.keys().filter(|b| !allowed.contains(b)).collect();
    assert!(
        wrong.is_empty(),
        "{what}: {} reached {wrong:?} through {target}:{port}, which policy denies (answers {by:?}, {failed} failed)",
        from.key()
    );
    for a in allowed {
        assert!(
            by.contains_key(a),
            "{what}: {} never reached the allowed backend {a} through {target}:{port} in {ATTEMPTS} attempts (answers {by:?}, {failed} failed)",
            from.key()
        );
    }
    if some_fail {
        assert!(
            failed > 0,
            "{what}: every one of {ATTEMPTS} attempts from {} through {target}:{port} connected, but the DNAT must have chosen the denied backend for some (answers {by:?})",
            from.key()
        );
    } else {
        assert_eq!(
            failed,
            0,
            "{what}: {failed} of {ATTEMPTS} attempts from {} through {target}:{port} failed (answers {by:?})",
            from.key()
        );
    }
}

/// One line through an open connection and its echo back.
fn echoes(stream: &mut TcpStream) -> bool {
    let _ = stream.set_read_timeout(Some(PROBE_TIMEOUT));
    let mut buf = [0u8; 16];
    stream.write_all(b"ping\n").is_ok()
        && matches!(stream.read(&mut buf), Ok(n) if &buf[..n] == b"ping\n")
}

/// Whether `backend` holds an established TCP connection from `client`
/// (its sockets, as `ss` lists them in its namespace).
fn holds(backend: &Pod, client: SocketAddr) -> bool {
    let out = command_in(&backend.netns, "ss")
        .args(["-tnH", "state", "established"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ss: {}", sys::describe(&out));
    let ip = client.ip().to_string();
    let port = format!(":{}", client.port());
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        l.split_whitespace()
            .last()
            .is_some_and(|peer| peer.ends_with(&port) && peer.contains(&ip))
    })
}

/// Connections from `from` through `target:port`, each echoing a line,
/// opened until each of `backends` holds one (40 at most): with the backend
/// each reached.
fn hold_connections(
    from: &Pod,
    target: IpAddr,
    port: u16,
    backends: &[&Pod],
    v6: bool,
) -> Vec<(IpAddr, TcpStream)> {
    let mut held: Vec<(IpAddr, TcpStream)> = Vec::new();
    for _ in 0..40 {
        let mut stream = in_netns(&from.netns, || {
            TcpStream::connect_timeout(&SocketAddr::new(target, port), Duration::from_secs(3))
        })
        .unwrap_or_else(|e| panic!("{} -> {target}:{port}: {e}", from.key()));
        assert!(
            echoes(&mut stream),
            "{} -> {target}:{port}: no echo on a new connection",
            from.key()
        );
        let local = stream.local_addr().unwrap();
        let backend = backends
            .iter()
            .find(|b| holds(b, local))
            .unwrap_or_else(|| panic!("no backend holds the connection from {local}"));
        held.push((backend.addr(v6), stream));
        if backends
            .iter()
            .all(|b| held.iter().any(|(a, _)| *a == b.addr(v6)))
        {
            break;
        }
    }
    for b in backends {
        assert!(
            held.iter().any(|(a, _)| *a == b.addr(v6)),
            "none of {} connections from {} through {target}:{port} reached backend {}",
            held.len(),
            from.key(),
            b.addr(v6)
        );
    }
    held
}

fn services_judged_on_backend(topology: Topology, mode: Mode, ipv6: bool) {
    let c = Cluster::new(2, topology, ipv6, serde_json::Map::new());
    c.namespace("x", &[("team", "x")]);
    let client = c.add_pod(0, "x", "client", &[("app", "client")], &[]);
    let other = c.add_pod(1, "x", "other", &[("app", "other")], &[]);
    let b1 = c.add_pod(0, "x", "b1", &[("app", "web"), ("tier", "one")], &[80]);
    let b2 = c.add_pod(1, "x", "b2", &[("app", "web"), ("tier", "two")], &[80]);
    c.apply_yaml(&service_yaml(ipv6));
    c.settle();
    // ClusterIP(s) and one NodePort per node address.
    c.wait_service_frontends(if ipv6 { 4 } else { 2 });
    for node in &c.nodes {
        kube_proxy(node, mode, ipv6, &[&b1, &b2]);
    }

    let families: &[bool] = if ipv6 { &[false, true] } else { &[false] };
    let vip = |v6: bool| -> IpAddr { if v6 { CLUSTER_V6 } else { CLUSTER_V4 }.parse().unwrap() };
    for &v6 in families {
        let both = [b1.addr(v6), b2.addr(v6)];
        expect_only(&client, vip(v6), 80, &both, false, "no policy");
        expect_only(
            &client,
            node_address(0, v6),
            NODE_PORT,
            &both,
            false,
            "no policy, NodePort",
        );
    }

    // Connections opened through the Service while nothing isolated the
    // client, to both backends, held open across the policy below.
    let held: Vec<(bool, Vec<(IpAddr, TcpStream)>)> = families
        .iter()
        .map(|&v6| (v6, hold_connections(&client, vip(v6), 80, &[&b1, &b2], v6)))
        .collect();

    // The client may only reach tier one: b1 on its own node.
    c.apply_policy(CLIENT_TO_TIER_ONE);
    c.settle();
    // An established connection to a backend policy denies now is cut;
    // one to the allowed backend goes on.
    for (v6, conns) in held {
        for (backend, mut stream) in conns {
            let allowed = backend == b1.addr(v6);
            assert_eq!(
                echoes(&mut stream),
                allowed,
                "a connection opened through {}:80 before the policy, to backend {backend}, must {} now",
                vip(v6),
                if allowed { "go on" } else { "be cut (revoked)" }
            );
        }
    }
    for &v6 in families {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        assert!(
            probe(&client.netns, b1.addr(v6), Proto::Tcp, 80, PROBE_TIMEOUT),
            "{fam}: client -> b1 directly must be allowed"
        );
        assert!(
            !probe(&client.netns, b2.addr(v6), Proto::Tcp, 80, PROBE_TIMEOUT),
            "{fam}: client -> b2 directly must be denied"
        );
        expect_only(
            &client,
            vip(v6),
            80,
            &[b1.addr(v6)],
            true,
            &format!("{fam}, egress to tier one, ClusterIP"),
        );
        expect_only(
            &client,
            node_address(0, v6),
            NODE_PORT,
            &[b1.addr(v6)],
            true,
            &format!("{fam}, egress to tier one, NodePort"),
        );
        // A pod no policy isolates reaches both.
        expect_only(
            &other,
            vip(v6),
            80,
            &[b1.addr(v6), b2.addr(v6)],
            false,
            &format!("{fam}, unisolated client"),
        );
    }

    // Now only tier two (on the other node); b2 also admits only the client.
    c.apply_policy(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector: {matchLabels: {tier: two}}
    ports:
    - {port: 80, protocol: TCP}
"#,
    );
    c.apply_policy(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b2-in, namespace: x}
spec:
  podSelector: {matchLabels: {tier: two}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
"#,
    );
    c.settle();
    for &v6 in families {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        expect_only(
            &client,
            vip(v6),
            80,
            &[b2.addr(v6)],
            true,
            &format!("{fam}, egress to tier two"),
        );
        // b2's own ingress policy (decided on its veth) turns `other` away.
        expect_only(
            &other,
            vip(v6),
            80,
            &[b1.addr(v6)],
            true,
            &format!("{fam}, ingress of b2"),
        );
    }

    // Without the client's policy, both backends again.
    c.delete_policy("x", "client-out");
    c.settle();
    for &v6 in families {
        expect_only(
            &client,
            vip(v6),
            80,
            &[b1.addr(v6), b2.addr(v6)],
            false,
            "client policy deleted",
        );
    }

    // Flow records name the backend that was refused.
    c.apply_policy(CLIENT_TO_TIER_ONE);
    c.settle();
    let _ = spread(&client, vip(false), 80);
    let node0 = &c.nodes[0];
    let start = std::time::Instant::now();
    loop {
        let out = node0.ctl(&["flows", "-o", "json"], None);
        let text = String::from_utf8_lossy(&out.stdout);
        let b2_addr = b2.addr(false).to_string();
        let found = text.lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["kind"] == "drop"
                    && v["direction"] == "egress"
                    && v["peer"]["address"] == b2_addr.as_str()
                    && v["isolatedBy"][0] == "x/client-out"
            })
        });
        if found {
            break;
        }
        assert!(
            // A deadline for a loaded CI machine, not a measure.
            start.elapsed() < Duration::from_secs(60),
            "no flow record of the denied backend {b2_addr} on node 0 within 60 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn iptables_mode_vxlan() {
    services_judged_on_backend(Topology::Vxlan, Mode::Iptables, true);
}

#[test]
fn nftables_mode_routed() {
    services_judged_on_backend(Topology::Routed, Mode::Nftables, true);
}
