//! The etcd datastore (hosts without Kubernetes), against a real etcd with
//! TLS and client certificates: `palisadectl apply/get/delete` write and
//! read the objects there, the host's daemon lists and watches them and
//! enforces every change, a stale update is refused, a client without a
//! trusted certificate is refused, and an etcd outage changes no verdict
//! (writes fail with a clear message) until etcd is back.

use std::{
    process::{Output, Stdio},
    time::Duration,
};

use testbed::{
    etcd::{Etcd, Hosts, Pki, ctl},
    node::{Node, NodeOptions, Pod},
    probe::{PROBE_TIMEOUT, Proto, probe},
    runtimes::wait_for,
    sys::{self, describe},
};

/// Generous for a loaded 2-core machine: a verdict follows a write within
/// this long.
const CONVERGE: Duration = Duration::from_secs(30);

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: shop, labels: {app: other}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: shop, labels: {app: server}}
spec: {containers: [{name: c}]}
"#;

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#;

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}:\n{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tcp(from: &Pod, to: &Pod) -> bool {
    probe(&from.netns, to.addr(false), Proto::Tcp, 80, PROBE_TIMEOUT)
}

/// Wait until `from` → `to` on TCP 80 is `allowed`, and check it stays so.
fn converge(from: &Pod, to: &Pod, allowed: bool, what: &str) {
    wait_for(what, CONVERGE, || tcp(from, to) == allowed);
    assert_eq!(tcp(from, to), allowed, "{what} (again)");
}

/// A node whose daemon starts once etcd runs, and the certificates.
fn host() -> (Node, Pki) {
    let node = Node::new(NodeOptions {
        daemon: true,
        defer_daemon: true,
        ..NodeOptions::default()
    });
    let pki = Pki::new(&node.dir.join("pki"));
    (node, pki)
}

#[test]
fn objects_in_etcd_are_enforced_by_the_host_daemon_and_outages_change_no_verdict() {
    let (node, pki) = host();
    let mut etcd = Etcd::start(&node.netns.path, &node.dir, &pki, &["127.0.0.1"]);
    let env = etcd.client_env();
    *node.daemon_env.lock().expect("lock") = env.clone();
    node.start_daemon();

    ok(
        ctl(&node, &env, &["apply", "-f", "-"], Some(PODS)),
        "apply pods to etcd",
    );
    let server = node.add_pod("shop", "server", &[80]);
    let client = node.add_pod("shop", "client", &[]);
    let other = node.add_pod("shop", "other", &[]);
    converge(&client, &server, true, "client -> server before any policy");
    converge(&other, &server, true, "other -> server before any policy");

    // A policy written to etcd by a user is enforced by the host's daemon.
    let out = ok(
        ctl(&node, &env, &["apply", "-f", "-"], Some(POLICY)),
        "apply policy",
    );
    assert!(
        out.contains("networkpolicy.networking.k8s.io/shop/server created"),
        "{out}"
    );
    converge(
        &other,
        &server,
        false,
        "other -> server denied by the policy from etcd",
    );
    converge(
        &client,
        &server,
        true,
        "client -> server allowed by the policy from etcd",
    );
    // The host's own store has it (the daemon synced it) ...
    let local = ok(node.ctl(&["get", "policies"], None), "local get policies");
    assert!(local.contains("server"), "{local}");
    // ... and a local write is refused: the objects belong to the datastore.
    let refused = node.ctl(&["apply", "-f", "-"], Some(POLICY));
    assert!(!refused.status.success(), "{}", describe(&refused));

    // get shows what etcd holds, with its resourceVersion.
    let yaml = ok(
        ctl(
            &node,
            &env,
            &["get", "policies", "-n", "shop", "-o", "yaml"],
            None,
        ),
        "get -o yaml",
    );
    assert!(yaml.contains("resourceVersion"), "{yaml}");
    // An update from what was read succeeds once; the same stale read
    // again is refused, and nothing is lost.
    let widened = yaml.replace("app: client", "app: other");
    assert_ne!(widened, yaml);
    ok(
        ctl(&node, &env, &["apply", "-f", "-"], Some(&widened)),
        "update at the resourceVersion read",
    );
    let stale = ctl(&node, &env, &["apply", "-f", "-"], Some(&widened));
    assert!(!stale.status.success(), "{}", describe(&stale));
    let err = String::from_utf8_lossy(&stale.stderr);
    assert!(err.contains("was changed after resourceVersion"), "{err}");
    converge(
        &other,
        &server,
        true,
        "other -> server allowed after the update",
    );
    converge(
        &client,
        &server,
        false,
        "client -> server denied after the update",
    );

    // A client without a certificate, or with one from another CA, is
    // refused by etcd: nothing is written.
    let no_cert: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| k != "PALISADE_ETCD_CERT" && k != "PALISADE_ETCD_KEY")
        .cloned()
        .collect();
    let out = ctl(&node, &no_cert, &["apply", "-f", "-"], Some(POLICY));
    assert!(
        !out.status.success(),
        "no client certificate: {}",
        describe(&out)
    );
    let stranger: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| match k.as_str() {
            "PALISADE_ETCD_CERT" => (k.clone(), pki.cert("stranger").display().to_string()),
            "PALISADE_ETCD_KEY" => (k.clone(), pki.key("stranger").display().to_string()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    let out = ctl(&node, &stranger, &["apply", "-f", "-"], Some(POLICY));
    assert!(
        !out.status.success(),
        "untrusted certificate: {}",
        describe(&out)
    );
    converge(&other, &server, true, "the refused writes changed nothing");
    converge(
        &client,
        &server,
        false,
        "the refused writes changed nothing",
    );

    // etcd down: enforcement stays, writes fail saying why.
    etcd.kill_all();
    let out = ctl(&node, &env, &["apply", "-f", "-"], Some(POLICY));
    assert!(
        !out.status.success(),
        "a write with etcd down: {}",
        describe(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is etcd up and reachable?"), "{err}");
    for _ in 0..5 {
        assert!(tcp(&other, &server), "other -> server while etcd is down");
        assert!(
            !tcp(&client, &server),
            "client -> server while etcd is down"
        );
    }
    assert!(node.daemon_alive(), "the daemon survives the outage");

    // etcd back: the daemon lists again and follows new writes.
    etcd.restart_all();
    ok(
        ctl(&node, &env, &["apply", "-f", "-"], Some(POLICY)),
        "apply after etcd came back",
    );
    converge(&client, &server, true, "client -> server after the resync");
    converge(&other, &server, false, "other -> server after the resync");

    // A policy deleted in etcd stops being enforced.
    let out = ok(
        ctl(&node, &env, &["delete", "-f", "-"], Some(POLICY)),
        "delete",
    );
    assert!(out.contains("deleted"), "{out}");
    converge(&other, &server, true, "other -> server after the delete");
    let out = ctl(&node, &env, &["delete", "-f", "-"], Some(POLICY));
    assert!(
        !out.status.success(),
        "deleting it again: {}",
        describe(&out)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

/// Keys under a prefix, as etcd lists them.
fn keys(etcd: &Etcd, netns: &std::path::Path, prefix: &str) -> String {
    let mut cmd = etcd.etcdctl(
        &etcd.endpoints(),
        &["get", "--prefix", "--keys-only", prefix],
    );
    let out = sys::spawn_in(netns, cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))
        .and_then(|c| c.wait_with_output())
        .expect("etcdctl get");
    assert!(out.status.success(), "etcdctl get: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn three_hosts_share_policies_and_containers_through_a_three_member_etcd() {
    // A short lease: a host that stops is forgotten by the others soon.
    let mut hosts = Hosts::new(3, &["--etcd-lease-ttl", "4"]);
    let Hosts {
        nodes,
        etcd,
        fabric,
        ..
    } = &mut hosts;
    // Users write objects as palisade-admin (etcd's auth is on: each
    // host's daemon may write only its own endpoints).
    let env = etcd.env_as("palisade-admin");
    ok(
        ctl(&nodes[0], &env, &["apply", "-f", "-"], Some(PODS)),
        "apply pods",
    );
    let server = nodes[0].add_pod("shop", "server", &[80]);
    let client = nodes[1].add_pod("shop", "client", &[]);
    let other = nodes[2].add_pod("shop", "other", &[]);
    converge(
        &client,
        &server,
        true,
        "client (host-1) -> server (host-0), no policy",
    );
    converge(
        &other,
        &server,
        true,
        "other (host-2) -> server (host-0), no policy",
    );

    // Every host publishes its containers.
    wait_for("every host's containers in etcd", CONVERGE, || {
        let k = keys(etcd, &fabric.path, "/palisade/endpoints/");
        [
            "host-0/shop/server",
            "host-1/shop/client",
            "host-2/shop/other",
        ]
        .iter()
        .all(|want| k.contains(want))
    });

    // A host's certificate may not write objects, nor another host's
    // endpoints.
    let host1 = etcd.env_as("host-1");
    let out = ctl(&nodes[1], &host1, &["apply", "-f", "-"], Some(POLICY));
    assert!(
        !out.status.success(),
        "host-1 writing a policy: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("etcd refused this client"),
        "{}",
        describe(&out)
    );
    let mut forge = etcd.etcdctl_as(
        "host-1",
        &etcd.endpoints(),
        &["put", "/palisade/endpoints/host-0/shop/fake", "{}"],
    );
    let out = sys::spawn_in(
        &fabric.path,
        forge.stdout(Stdio::piped()).stderr(Stdio::piped()),
    )
    .and_then(|c| c.wait_with_output())
    .expect("etcdctl put");
    assert!(
        !out.status.success(),
        "host-1 writing host-0's endpoints: {}",
        describe(&out)
    );

    // A policy applied on host-2 is enforced on host-0, for peers on
    // host-1 and host-2 (selected by labels across hosts).
    ok(
        ctl(&nodes[2], &env, &["apply", "-f", "-"], Some(POLICY)),
        "apply policy",
    );
    converge(
        &other,
        &server,
        false,
        "other -> server denied (policy from host-2)",
    );
    converge(
        &client,
        &server,
        true,
        "client -> server allowed (labels from host-1)",
    );

    // One member down: reads, writes and watches go on.
    etcd.kill(0);
    let widened = POLICY.replace("app: client", "app: other");
    ok(
        ctl(&nodes[1], &env, &["apply", "-f", "-"], Some(&widened)),
        "apply with one member down",
    );
    converge(
        &other,
        &server,
        true,
        "other -> server allowed, one member down",
    );
    converge(
        &client,
        &server,
        false,
        "client -> server denied, one member down",
    );

    // Every member down: writes are refused, every host keeps enforcing
    // (longer than the lease: nothing expires while etcd is away).
    etcd.kill_all();
    let out = ctl(&nodes[0], &env, &["apply", "-f", "-"], Some(POLICY));
    assert!(
        !out.status.success(),
        "a write with etcd down: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is etcd up and reachable?"),
        "{}",
        describe(&out)
    );
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < until {
        assert!(tcp(&other, &server), "other -> server while etcd is down");
        assert!(
            !tcp(&client, &server),
            "client -> server while etcd is down"
        );
    }
    // A container started meanwhile is enforced with what the host knows.
    let late = nodes[0].add_pod("shop", "late", &[80]);
    converge(
        &other,
        &late,
        true,
        "other -> a server started while etcd is down",
    );
    converge(
        &client,
        &late,
        false,
        "client -> a server started while etcd is down",
    );

    // Back: every host lists again (a resync that changes no verdict),
    // then follows new writes.
    let lists = |n: &Node| n.daemon_output().matches("etcd datastore: listed").count();
    let before: Vec<usize> = nodes.iter().map(lists).collect();
    etcd.restart_all();
    let deadline = std::time::Instant::now() + CONVERGE;
    while nodes.iter().zip(&before).any(|(n, b)| lists(n) <= *b) {
        assert!(
            std::time::Instant::now() < deadline,
            "every host lists etcd again within {CONVERGE:?}"
        );
        assert!(tcp(&other, &server), "other -> server during the resync");
        assert!(!tcp(&client, &server), "client -> server during the resync");
    }
    assert!(tcp(&other, &server), "other -> server after the resync");
    assert!(!tcp(&client, &server), "client -> server after the resync");
    ok(
        ctl(&nodes[0], &env, &["apply", "-f", "-"], Some(POLICY)),
        "apply after etcd came back",
    );
    converge(&client, &server, true, "client -> server after the resync");
    converge(&other, &server, false, "other -> server after the resync");

    // host-1 stops (its daemon killed: nothing keeps its lease): host-0
    // forgets its container once the lease expires, and the policy's
    // peer is gone there. Back, it publishes again.
    nodes[1].kill_daemon();
    converge(
        &client,
        &server,
        false,
        "client -> server denied once host-1's containers expired",
    );
    assert!(
        !keys(etcd, &fabric.path, "/palisade/endpoints/host-1/").contains("client"),
        "host-1's containers expired in etcd"
    );
    nodes[1].start_daemon();
    converge(
        &client,
        &server,
        true,
        "client -> server after host-1 came back",
    );
    converge(&other, &server, false, "other -> server still denied");
}

/// The address of the container `name` enforced on `node`.
fn address_of(node: &Node, name: &str) -> std::net::IpAddr {
    let eps = node.endpoints();
    let ep = eps
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no endpoint {name}: {eps:?}"));
    ep["addresses"][0]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("address of {name}: {ep}"))
}

/// Route `subnet` (a runtime's own network on host `on`) from every other
/// host through host `on`'s VXLAN endpoint, as Flannel routes a host's
/// subnet.
fn route_subnet(hosts: &Hosts, on: usize, subnet: &str) {
    for (_, n) in hosts.nodes.iter().enumerate().filter(|(i, _)| *i != on) {
        sys::ip(&[
            "-n",
            &n.netns.name,
            "route",
            "add",
            subnet,
            "via",
            &format!("10.100.{on}.0"),
            "dev",
            "flannel.1",
            "onlink",
        ]);
    }
}

#[test]
fn docker_podman_and_runc_containers_on_three_hosts_share_one_policy() {
    use testbed::runtimes::{Backend, Docker, Podman, RuncContainer};
    let hosts = Hosts::new(3, &[]);
    let env = hosts.etcd.env_as("palisade-admin");
    // Docker on host-0 (its own network 10.103.0.0/24, the palisade-runc
    // wrapper), Podman on host-1 (CNI backend, 10.101.0.0/24, the chained
    // plugin and the hook), runc on host-2 (the node's bridge, the hook).
    route_subnet(&hosts, 0, "10.103.0.0/24");
    route_subnet(&hosts, 1, "10.101.0.0/24");
    let mut docker = Docker::new(&hosts.nodes[0], true, "pal", "10.103.0.0/24");
    docker.run("web", &[("palisade.io/namespace", "shop"), ("app", "web")]);
    let podman = Podman::new(&hosts.nodes[1], Backend::Cni, true, "cni");
    podman.run(
        "client",
        &[
            ("palisade.io/namespace", "shop"),
            ("palisade.io/name", "client"),
            ("palisade.io/labels", "app=client"),
        ],
    );
    let (other, _) = RuncContainer::start(
        &hosts.nodes[2],
        "other",
        true,
        &[
            ("palisade.io/namespace", "shop"),
            ("palisade.io/name", "other"),
            ("palisade.io/labels", "app=other"),
        ],
    );
    let web = address_of(&hosts.nodes[0], "web");
    let client_ns = std::path::PathBuf::from(format!("/proc/{}/ns/net", podman.pid("client")));
    let reach = |from: &std::path::Path| probe(from, web, Proto::Tcp, 80, PROBE_TIMEOUT);
    wait_for(
        "client (Podman, host-1) -> web (Docker, host-0)",
        CONVERGE,
        || reach(&client_ns),
    );
    wait_for(
        "other (runc, host-2) -> web (Docker, host-0)",
        CONVERGE,
        || reach(&other.netns.path),
    );

    let policy = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#;
    ok(
        ctl(&hosts.nodes[2], &env, &["apply", "-f", "-"], Some(policy)),
        "apply",
    );
    wait_for("other (runc) denied by the policy", CONVERGE, || {
        !reach(&other.netns.path)
    });
    wait_for("client (Podman) still allowed", CONVERGE, || {
        reach(&client_ns)
    });
    assert!(reach(&client_ns), "client -> web (again)");
    assert!(!reach(&other.netns.path), "other -> web (again)");
    drop(other);
    drop(podman);
    docker.stop(false);
}
