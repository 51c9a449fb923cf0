//! Kubernetes cluster mode on several hermetic nodes: every node's daemon
//! watches the test API server (a list/watch double: no kube-apiserver
//! can be installed here), policies are written to the API only, and real
//! traffic crosses nodes over VXLAN (Flannel), host-gw routes (Flannel) or
//! per-pod routes (Calico's shape, the ptp plugin).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::time::Duration;

use testbed::{
    cluster::{Cluster, Topology, node_source},
    node::Pod,
    probe::{PROBE_TIMEOUT, Proto, probe},
    sys::describe,
};

fn tcp(from: &Pod, to: &Pod, port: u16, v6: bool) -> bool {
    probe(&from.netns, to.addr(v6), Proto::Tcp, port, PROBE_TIMEOUT)
}

/// Assert a connectivity matrix: (from, to, allowed).
fn expect(c: &Cluster, cases: &[(&Pod, &Pod, bool)], what: &str) {
    let families: &[bool] = if c.ipv6 { &[false, true] } else { &[false] };
    let mut wrong = Vec::new();
    for &v6 in families {
        for (from, to, allowed) in cases {
            let got = tcp(from, to, 80, v6);
            if got != *allowed {
                wrong.push(format!(
                    "{} -> {} (IPv{}): {} but expected {}",
                    from.key(),
                    to.key(),
                    if v6 { 6 } else { 4 },
                    if got { "allowed" } else { "denied" },
                    if *allowed { "allowed" } else { "denied" }
                ));
            }
        }
    }
    if wrong.is_empty() {
        return;
    }
    // What the network looked like, for the failure message.
    let mut routes = String::new();
    for n in &c.nodes {
        for args in [&["addr"][..], &["route"], &["-6", "route"]] {
            let mut a = vec!["-n", n.netns.name.as_str()];
            a.extend_from_slice(args);
            routes.push_str(&format!(
                "{} ip {}:\n{}",
                n.netns.name,
                args.join(" "),
                testbed::sys::ip(&a)
            ));
        }
    }
    panic!(
        "{} topology, {what}:\n{}\n\n{routes}",
        c.topology.name(),
        wrong.join("\n")
    );
}

/// Probe `pod` (isolated for ingress, no rule for nodes) from node `from`'s
/// host: denied, recorded as from that node; then allowed by an ipBlock of
/// the node's source address.
fn node_to_pod(c: &Cluster, from: usize, pod: &Pod) {
    let families: &[bool] = if c.ipv6 { &[false, true] } else { &[false] };
    let host = &c.nodes[from].netns.path;
    let node_name = format!("node-{from}");
    for &v6 in families {
        assert!(
            !probe(host, pod.addr(v6), Proto::Tcp, 80, PROBE_TIMEOUT),
            "{}: node {from} reached {} (IPv{}) though no rule admits nodes",
            c.topology.name(),
            pod.key(),
            if v6 { 6 } else { 4 }
        );
    }
    let at = c
        .nodes
        .iter()
        .find(|n| n.endpoints().iter().any(|e| e["name"] == pod.name.as_str()))
        .expect("the pod's node");
    let source = node_source(c.topology, from, false).to_string();
    eventually(
        &format!(
            "{}: a drop recorded from node {node_name} ({source}) in `palisadectl flows`",
            c.topology.name()
        ),
        Duration::from_secs(10),
        || {
            let out = at.ctl(&["flows", "-o", "json"], None);
            String::from_utf8_lossy(&out.stdout).lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                    v["kind"] == "drop"
                        && v["peer"]["address"] == source.as_str()
                        && v["peer"]["kind"] == "node"
                        && v["peer"]["name"] == node_name.as_str()
                })
            })
        },
    );
    let blocks: String = families
        .iter()
        .map(|&v6| {
            let a = node_source(c.topology, from, v6);
            format!(
                "    - ipBlock: {{cidr: '{a}/{}'}}\n",
                if v6 { 128 } else { 32 }
            )
        })
        .collect();
    c.apply_policy(&format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: from-node, namespace: {}}}
spec:
  podSelector: {{}}
  ingress:
  - from:
{blocks}"#,
        pod.namespace
    ));
    c.settle();
    for &v6 in families {
        assert!(
            probe(host, pod.addr(v6), Proto::Tcp, 80, PROBE_TIMEOUT),
            "{}: node {from} still denied {} (IPv{}) with an ipBlock of its address",
            c.topology.name(),
            pod.key(),
            if v6 { 6 } else { 4 }
        );
    }
    c.delete_policy(&pod.namespace, "from-node");
    c.settle();
}

/// Pods on three nodes; policies from the API select peers on other nodes
/// by pod and namespace labels, ipBlocks match remote pod addresses
/// exactly, and label changes on a remote pod move it in and out.
fn cross_node_policy(topology: Topology, ipv6: bool) {
    let c = Cluster::new(3, topology, ipv6, serde_json::Map::new());
    c.namespace("x", &[("team", "x")]);
    c.namespace("y", &[("team", "y")]);
    let a = c.add_pod(0, "x", "a", &[("app", "a")], &[80]);
    let b = c.add_pod(1, "x", "b", &[("app", "b")], &[80]);
    let d = c.add_pod(2, "y", "d", &[("app", "d")], &[80]);
    let e = c.add_pod(1, "y", "e", &[("app", "e")], &[80]);
    c.settle();
    expect(
        &c,
        &[
            (&a, &b, true),
            (&d, &b, true),
            (&b, &d, true),
            (&e, &a, true),
        ],
        "no policy",
    );

    // b admits pods labelled app=a in its namespace, and namespace y's app=d.
    c.apply_policy(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-in, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: a}}
    - namespaceSelector: {matchLabels: {team: y}}
      podSelector: {matchLabels: {app: d}}
"#,
    );
    c.settle();
    expect(
        &c,
        &[
            (&a, &b, true),
            (&d, &b, true),
            (&e, &b, false),
            (&b, &a, true),
        ],
        "ingress policy on b",
    );

    // Another node's own traffic is the node's, not a pod's: b's selectors
    // do not admit it; an ipBlock with its address does, and flow records
    // name the node.
    node_to_pod(&c, 2, &b);

    // A remote pod relabelled out of the selector loses access; back in,
    // it regains it.
    c.relabel_pod(&a, &[("app", "other")]);
    c.settle();
    expect(&c, &[(&a, &b, false), (&d, &b, true)], "a relabelled");
    c.relabel_pod(&a, &[("app", "a")]);
    c.settle();
    expect(&c, &[(&a, &b, true)], "a labelled back");

    // Egress from d: only to pods in namespace x, except b by ipBlock.
    let mut blocks = format!(
        "    - ipBlock: {{cidr: 10.100.0.0/16, except: [{}/32]}}\n",
        b.addr(false)
    );
    if ipv6 {
        blocks.push_str(&format!(
            "    - ipBlock: {{cidr: 'fd00:100::/32', except: ['{}/128']}}\n",
            b.addr(true)
        ));
    }
    c.apply_policy(&format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: d-out, namespace: y}}
spec:
  podSelector: {{matchLabels: {{app: d}}}}
  policyTypes: [Egress]
  egress:
  - to:
{blocks}"#
    ));
    c.settle();
    expect(
        &c,
        &[
            (&d, &a, true),
            (&d, &b, false),
            (&d, &e, true),
            (&e, &d, true),
        ],
        "egress ipBlock on d with b excepted",
    );

    c.delete_policy("x", "b-in");
    c.delete_policy("y", "d-out");
    c.settle();
    expect(
        &c,
        &[(&a, &b, true), (&e, &b, true), (&d, &b, true)],
        "policies deleted",
    );
}

#[test]
fn vxlan_cross_node_policy_ipv4_and_ipv6() {
    cross_node_policy(Topology::Vxlan, true);
}

#[test]
fn host_gw_cross_node_policy_ipv4_and_ipv6() {
    cross_node_policy(Topology::HostGw, true);
}

#[test]
fn routed_ptp_cross_node_policy_ipv4_and_ipv6() {
    cross_node_policy(Topology::Routed, true);
}

/// In cluster mode, Kubernetes kinds come from the API: `palisadectl
/// apply` refuses them and says to use kubectl.
#[test]
fn palisadectl_apply_of_kubernetes_kinds_is_refused_in_cluster_mode() {
    let c = Cluster::new(1, Topology::HostGw, false, serde_json::Map::new());
    let out = c.nodes[0].ctl(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: z}\n"),
    );
    assert!(
        !out.status.success(),
        "apply succeeded:\n{}",
        describe(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kubectl") && err.contains("cluster mode"),
        "the refusal does not say to use kubectl:\n{err}"
    );
}

/// A sandbox whose Pod object the agent has not seen waits (bounded),
/// then fails closed with what is missing; one whose object arrives while
/// it waits starts.
#[test]
fn cni_add_waits_for_the_pod_object_then_fails_closed() {
    let mut conf = serde_json::Map::new();
    conf.insert("podWaitSeconds".into(), serde_json::json!(2));
    let c = Cluster::new(1, Topology::HostGw, false, conf);
    c.namespace("x", &[]);
    c.settle();
    let start = std::time::Instant::now();
    let err = c.nodes[0]
        .try_add_pod("x", "ghost", &[])
        .expect_err("ADD for a pod the API does not have must fail");
    let waited = start.elapsed();
    let text = format!("{err}");
    assert!(
        text.contains("x/ghost") && text.contains("not known to the palisade agent"),
        "the error does not say what is missing:\n{text}"
    );
    assert!(
        waited >= Duration::from_secs(2),
        "ADD failed after {waited:?}, before the 2 s wait"
    );
    assert!(
        c.nodes[0].endpoints().is_empty(),
        "a failed ADD left an endpoint"
    );

    // The object arrives while ADD waits: it succeeds.
    let late = std::thread::scope(|s| {
        let adder = s.spawn(|| c.nodes[0].try_add_pod("x", "late", &[80]));
        std::thread::sleep(Duration::from_millis(500));
        c.api.apply(&k8s_openapi::api::core::v1::Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("late".into()),
                namespace: Some("x".into()),
                labels: Some([("app".to_owned(), "late".to_owned())].into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: Some("node-0".into()),
                ..Default::default()
            }),
            status: None,
        });
        adder.join().unwrap()
    });
    let late = late.unwrap_or_else(|e| panic!("ADD with a late Pod object failed: {e}"));
    let eps = c.nodes[0].endpoints();
    assert_eq!(eps.len(), 1, "endpoints: {eps:?}");
    assert_eq!(eps[0]["name"], "late");
    drop(late);
}

/// Poll until `f` holds (the agent reconnects with backoff after an
/// outage), or fail with `what`.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what} (waited {limit:?})");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn cluster_status(node: &testbed::node::Node) -> serde_json::Value {
    let out = node.ctl(&["status", "-o", "json"], None);
    assert!(out.status.success(), "status: {}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["daemon"]["cluster"].clone()
}

/// Dropped watches, an outage, changes made while the agents could not
/// see them, 410 Gone on reconnect (history compacted) and an API server
/// restart: enforcement never loosens or flaps in between, and afterwards
/// every agent has resynced to what the API holds.
#[test]
fn the_agent_survives_api_failures_without_loosening_and_resyncs() {
    let c = Cluster::new(2, Topology::HostGw, false, serde_json::Map::new());
    c.namespace("x", &[]);
    let a = c.add_pod(0, "x", "a", &[("app", "a")], &[80]);
    let b = c.add_pod(1, "x", "b", &[("app", "b")], &[80]);
    let d = c.add_pod(0, "x", "d", &[("app", "d")], &[80]);
    c.apply_policy(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-in, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
"#,
    );
    c.settle();
    expect(&c, &[(&a, &b, true), (&d, &b, false)], "before any failure");

    // 1. Every watch drops: nothing changes; the next change still arrives.
    c.api.drop_watches();
    expect(&c, &[(&a, &b, true), (&d, &b, false)], "watches dropped");
    c.relabel_pod(&d, &[("app", "a")]);
    c.settle();
    expect(
        &c,
        &[(&d, &b, true)],
        "a change after the watches came back",
    );

    // 2. An outage, with changes the agents cannot see, and the history
    // compacted so that their watches get 410 Gone when they come back.
    c.api.pause();
    c.api.drop_watches();
    for node in &c.nodes {
        eventually(
            "the agent notices the outage",
            Duration::from_secs(30),
            || cluster_status(node)["connected"] == false,
        );
    }
    c.relabel_pod(&d, &[("app", "d")]);
    c.delete_policy("x", "b-in");
    c.apply_policy(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-only-d, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: d}}}]
"#,
    );
    c.api.compact();
    // While the API is away, the last known state is enforced, unchanged.
    for _ in 0..3 {
        expect(&c, &[(&a, &b, true), (&d, &b, true)], "during the outage");
    }
    let restarts_before = cluster_status(&c.nodes[1])["watchRestarts"]
        .as_u64()
        .unwrap();
    c.api.resume();
    // The relist brings every change; the states in between are never
    // looser than before or after (a loses access, d keeps it).
    eventually(
        "after the outage, a's access is revoked (b-in deleted, b-only-d applied)",
        Duration::from_secs(60),
        || {
            expect(
                &c,
                &[(&d, &b, true)],
                "d stays allowed while the agents resync",
            );
            !tcp(&a, &b, 80, false)
        },
    );
    for node in &c.nodes {
        eventually("the agent reconnects", Duration::from_secs(60), || {
            let st = cluster_status(node);
            st["connected"] == true && st["synced"] == true
        });
        let st = cluster_status(node);
        assert!(
            st["relists"].as_u64().unwrap() >= 1,
            "no relist after 410 Gone: {st}"
        );
    }
    assert!(
        cluster_status(&c.nodes[1])["watchRestarts"]
            .as_u64()
            .unwrap()
            > restarts_before,
        "the outage was not counted as watch restarts"
    );
    c.settle();
    expect(&c, &[(&a, &b, false), (&d, &b, true)], "after the resync");

    // 3. The API server restarts (same address, same objects): nothing
    // changes, and a change after it is applied.
    // It listens in the fabric namespace: bind there again.
    c.fabric.run(|| c.api.restart()).unwrap();
    expect(
        &c,
        &[(&a, &b, false), (&d, &b, true)],
        "API server restarted",
    );
    c.delete_policy("x", "b-only-d");
    c.settle();
    expect(
        &c,
        &[(&a, &b, true), (&d, &b, true)],
        "a change after the restart",
    );
}

/// A network installed for a cluster (`kubernetes: true`, as the
/// DaemonSet installs it) waits for Pod objects even before the agent has
/// started, and fails closed when none comes.
#[test]
fn cni_add_on_a_cluster_network_fails_closed_before_the_agent_starts() {
    let mut conf = serde_json::Map::new();
    conf.insert("kubernetes".into(), serde_json::json!(true));
    conf.insert("podWaitSeconds".into(), serde_json::json!(1));
    let node = testbed::node::Node::new(testbed::node::NodeOptions {
        palisade: conf,
        daemon: false,
        ..Default::default()
    });
    let err = node
        .try_add_pod("x", "early", &[])
        .expect_err("ADD must wait for the agent and fail closed");
    let text = format!("{err}");
    assert!(
        text.contains("x/early") && text.contains("has not started"),
        "the error does not say what is missing:\n{text}"
    );
}

/// AdminNetworkPolicy and BaselineAdminNetworkPolicy come from the API
/// like NetworkPolicy, across nodes. Without their CRDs the agent still
/// syncs (those kinds are empty, and it says they are not installed); once
/// the CRDs are there, it picks the objects up without a restart.
#[test]
fn tier_policies_come_from_the_api_and_their_crds_may_be_missing() {
    let c = Cluster::new(2, Topology::Vxlan, true, serde_json::Map::new());
    c.namespace("x", &[("team", "blue")]);
    c.namespace("y", &[("team", "red")]);
    let a = c.add_pod(0, "x", "a", &[("app", "a")], &[80]);
    let b = c.add_pod(1, "y", "b", &[("app", "b")], &[80]);
    let d = c.add_pod(1, "x", "d", &[("app", "d")], &[80]);
    c.settle();
    expect(
        &c,
        &[(&b, &a, true), (&d, &a, true), (&a, &b, true)],
        "no policy",
    );

    // The admin tier denies red -> x/a before any NetworkPolicy; the
    // baseline denies everything else into x for pods no NetworkPolicy
    // isolates, except from x itself.
    c.apply_yaml(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: red-out}
spec:
  priority: 5
  subject: {namespaces: {matchLabels: {team: blue}}}
  ingress:
  - name: from-red
    action: Deny
    from: [{namespaces: {matchLabels: {team: red}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {matchLabels: {team: red}}}
  ingress:
  - action: Deny
    from: [{namespaces: {}}]
"#,
    );
    c.settle();
    expect(
        &c,
        &[
            (&b, &a, false),
            (&d, &a, true),
            (&a, &b, false),
            (&d, &b, false),
        ],
        "ANP denies red -> blue, BANP denies everything into red",
    );
    let out = c.nodes[0].ctl(
        &[
            "explain", "--from", "y/b", "--to", "x/a", "--port", "80/TCP",
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "denied by AdminNetworkPolicy/red-out ingress[0] (from-red) before any NetworkPolicy"
        ),
        "explain names the deciding tier, policy and rule:\n{}",
        describe(&out)
    );
    // A NetworkPolicy isolating y/b takes it out of the baseline's reach.
    c.apply_policy(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-x, namespace: y}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]
"#,
    );
    c.settle();
    expect(
        &c,
        &[(&a, &b, true), (&d, &b, true)],
        "NetworkPolicy decides for y/b; the baseline is not consulted",
    );

    // A nodes peer: pods of x may not reach node-1 (by its Node's label);
    // y is not the subject.
    let node1 = testbed::cluster::node_address(1, false);
    let ping = |p: &Pod| probe(&p.netns, node1, Proto::Icmp, 0, PROBE_TIMEOUT);
    assert!(ping(&a) && ping(&b), "node-1 answers pings before the ANP");
    c.apply_yaml(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-node-1}
spec:
  tier: Admin
  priority: 7
  subject: {namespaces: {matchLabels: {team: blue}}}
  egress:
  - name: node-1
    action: Deny
    to: [{nodes: {matchLabels: {kubernetes.io/hostname: node-1}}}]
"#,
    );
    c.settle();
    assert!(!ping(&a), "x/a may not reach node-1");
    assert!(ping(&b), "y/b still reaches node-1");

    // palisade's own kind comes from the API too (its CRD is installed with
    // the tiers'): x/d may send DNS only.
    assert!(tcp(&d, &a, 80, false));
    c.apply_yaml(
        r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {name: d-dns-only, namespace: x}
spec:
  podSelector: {matchLabels: {app: d}}
  policyTypes: [Egress]
  egress:
  - ports: [{port: 53, protocol: UDP}]
"#,
    );
    c.settle();
    expect(
        &c,
        &[(&d, &a, false), (&a, &d, true)],
        "the PalisadeNetworkPolicy from the API isolates x/d's egress",
    );

    // The CRDs go away: as in Kubernetes, no tier policy exists any more.
    c.api.set_crds_installed(false);
    for n in &c.nodes {
        eventually(
            "the agent says the CRDs are not installed",
            Duration::from_secs(30),
            || {
                let s = cluster_status(n);
                s["synced"] == true
                    && s["notInstalled"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "adminnetworkpolicies"))
            },
        );
    }
    eventually("ANP gone: y/b reaches x/a", Duration::from_secs(30), || {
        tcp(&b, &a, 80, false)
    });
    eventually(
        "PalisadeNetworkPolicy gone: x/d reaches x/a",
        Duration::from_secs(30),
        || tcp(&d, &a, 80, false),
    );
    // Back: the objects the API kept are enforced again, no restart.
    c.api.set_crds_installed(true);
    eventually(
        "CRDs installed again: the ANP denies y/b -> x/a",
        Duration::from_secs(40),
        || !tcp(&b, &a, 80, false),
    );
    for n in &c.nodes {
        eventually(
            "the agent no longer lists missing CRDs",
            Duration::from_secs(30),
            || {
                cluster_status(n)["notInstalled"]
                    .as_array()
                    .is_none_or(Vec::is_empty)
            },
        );
    }
    expect(
        &c,
        &[(&b, &a, false), (&d, &a, false)],
        "after the CRDs came back (x/d isolated by its PalisadeNetworkPolicy again)",
    );
}

/// DNS-aware egress in cluster mode: a PalisadeNetworkPolicy written to the
/// API (`toFQDNs` and DNS rules) selects pods on two nodes; each node's DNS
/// proxy (in its agent) learns the addresses of a real unbound on the
/// outside host (behind node 0) for its own pods.
#[test]
fn a_palisade_network_policy_from_the_api_allows_a_domain_on_every_node() {
    use hickory_proto::rr::RecordType;
    use testbed::{
        dns::{SMALL_API_V4 as API, SMALL_OTHER_V4 as OTHER, query, small_zone},
        node::WORLD_V4,
    };
    let c = Cluster::with_world(
        2,
        Topology::HostGw,
        false,
        serde_json::Map::new(),
        Some(vec![80]),
    );
    let world = &c.nodes[0].world.as_ref().unwrap().netns;
    let _dns = small_zone(world, &c.dir().join("unbound"), WORLD_V4.parse().unwrap());
    c.namespace("x", &[]);
    let pods = [
        c.add_pod(0, "x", "w0", &[("app", "web")], &[]),
        c.add_pod(1, "x", "w1", &[("app", "web")], &[]),
    ];
    let to = |p: &Pod, addr: &str| {
        probe(
            &p.netns,
            addr.parse().unwrap(),
            Proto::Tcp,
            80,
            PROBE_TIMEOUT,
        )
    };
    for p in &pods {
        assert!(to(p, OTHER), "{}: the outside host is reachable", p.name);
    }
    c.apply_yaml(
        r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {name: web-egress, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - toFQDNs: [{matchName: api.example.test}]
    ports: [{port: 80}]
  - to: [{ipBlock: {cidr: 203.0.113.10/32}}]
    ports:
    - port: 53
      protocol: UDP
      rules: {dns: [{matchPattern: "*.example.test"}]}
"#,
    );
    c.settle();
    let server = std::net::SocketAddr::new(WORLD_V4.parse().unwrap(), 53);
    for (i, p) in pods.iter().enumerate() {
        let log = || c.nodes[i].daemon_output();
        eventually(
            "the policy from the API isolates the pod",
            Duration::from_secs(30),
            || !to(p, OTHER),
        );
        assert!(!to(p, API), "{}: nothing learned yet", p.name);
        let ask = |name: &str| {
            query(&p.netns, server, name, RecordType::A, false)
                .unwrap_or_else(|e| panic!("{} asks {name}: {e}\n{}", p.name, log()))
        };
        let a = ask("api.example.test.");
        assert_eq!(a.rcode, "No Error", "{a:?}");
        assert_eq!(a.addresses, vec![API.parse::<std::net::IpAddr>().unwrap()]);
        assert!(
            to(p, API),
            "{} (node {i}): connected right after the answer\n{}",
            p.name,
            log()
        );
        let a = ask("other.example.test.");
        assert_eq!(a.addresses.len(), 1, "{a:?}");
        assert!(!to(p, OTHER), "{}: no toFQDNs rule names it", p.name);
        assert_eq!(ask("x.blocked.test.").rcode, "Query Refused");
    }
}
