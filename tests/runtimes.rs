//! Every runtime: real runc, Podman (CNI and netavark backends), containerd
//! (`ctr run --cni` and `ctr run` with the hook) and dockerd 20.10 with the
//! runtime wrapper, each in a hermetic node, containers from a
//! busybox-static rootfs. One NetworkPolicy (the same YAML for all), real
//! traffic both ways, one DNS-aware egress case (a real unbound outside,
//! the daemon's DNS proxy), one L7 case (HTTP rules through the daemon's
//! proxy), cleanup checked, and the start-time overhead
//! palisade adds measured (median of several starts with and without).
//!
//! A runtime that cannot run here fails its test with the runtime's error;
//! nothing is skipped.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use hickory_proto::rr::RecordType;
use serde_json::Value;
use testbed::{
    chain::Call,
    dns::{SMALL_API_V4, SMALL_OTHER_V4, query, small_zone},
    http::{HttpServer, Req, exchange},
    matrix::{Peer, probe_all},
    node::{Node, NodeOptions, WORLD_V4},
    probe::{PROBE_TIMEOUT, Proto, probe},
    runtimes::{
        Backend, Containerd, Docker, Podman, RuncContainer, StartTimes, bridge_only_chain, wait_for,
    },
    sys::{Netns, describe},
};

/// The policy every runtime test applies: in namespace `shop`, `web`
/// accepts TCP 80 from `app=client` only.
const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#;

/// How many starts each timing takes (median reported).
const STARTS: usize = 5;

/// A node with an outside host (for the DNS case); the daemon only when
/// `PALISADE_TEST_DAEMON=1` (the DNS case starts it for itself).
fn node() -> Node {
    Node::new(NodeOptions {
        world: true,
        ..Default::default()
    })
}

/// Addresses the DNS case's zone hands out (held by the outside host).
const API_V4: &str = SMALL_API_V4;
const OTHER_V4: &str = SMALL_OTHER_V4;

/// The DNS case: `client` (in `namespace`) may resolve `*.example.test`
/// and reach api.example.test on TCP 80, and nothing else outside.
const DNS_POLICY: &str = r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {name: client-egress, namespace: NS}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - toFQDNs: [{matchName: api.example.test}]
    ports: [{port: 80}]
  - to: [{ipBlock: {cidr: 203.0.113.10/32}}]
    ports:
    - port: 53
      protocol: UDP
      rules: {dns: [{matchPattern: "*.example.test"}]}
"#;

/// One DNS-aware egress case on this runtime path: a real unbound on the
/// outside host serves example.test; the node daemon (started here unless
/// it runs already) proxies the client's DNS once the policy selects it.
/// The first connection right after the answer works, an address of a name
/// no toFQDNs rule names stays denied, a name outside the DNS rules is
/// REFUSED.
fn check_dns(node: &Node, client: &Peer, namespace: &str) {
    let world = &node
        .world
        .as_ref()
        .expect("the node has an outside host")
        .netns;
    let _dns = small_zone(world, &node.dir.join("unbound"), WORLD_V4.parse().unwrap());
    let started = node.daemon_pid().is_none();
    if started {
        node.start_daemon();
    }
    let server = SocketAddr::new(WORLD_V4.parse().unwrap(), 53);
    let tcp80 = |addr: &str| {
        probe(
            &client.netns,
            addr.parse().unwrap(),
            Proto::Tcp,
            80,
            PROBE_TIMEOUT,
        )
    };
    let ask = |name: &str| {
        query(&client.netns, server, name, RecordType::A, false).unwrap_or_else(|e| {
            panic!(
                "{} asks {name}: {e}\ndaemon log:\n{}",
                client.name,
                node.daemon_output()
            )
        })
    };
    assert!(
        tcp80(OTHER_V4),
        "the outside host is reachable before the policy"
    );
    let policy = DNS_POLICY.replace("namespace: NS", &format!("namespace: {namespace}"));
    node.apply(&policy);
    assert!(!tcp80(API_V4), "nothing learned yet: denied");
    let a = ask("api.example.test.");
    assert_eq!(a.rcode, "No Error", "{a:?}");
    assert_eq!(a.addresses, vec![API_V4.parse::<IpAddr>().unwrap()]);
    assert!(
        tcp80(API_V4),
        "connected right after the answer:\n{}",
        node.daemon_output()
    );
    let a = ask("other.example.test.");
    assert_eq!(a.addresses, vec![OTHER_V4.parse::<IpAddr>().unwrap()]);
    assert!(!tcp80(OTHER_V4), "no toFQDNs rule names other.example.test");
    let a = ask("x.blocked.test.");
    assert_eq!(a.rcode, "Query Refused", "{a:?}");
    let fq = node.ctl(&["get", "fqdns", "-o", "json"], None);
    assert!(
        String::from_utf8_lossy(&fq.stdout).contains(API_V4),
        "get fqdns lists the learned address: {}",
        describe(&fq)
    );
    node.delete(&policy);
    if started {
        node.kill_daemon();
    }
}

/// The L7 case: `web` (in `namespace`) serves HTTP on 8080, where a
/// PalisadeNetworkPolicy lets `client` (any namespace) read books (GET) and
/// nothing else;
/// the node daemon's L7 proxy (started here unless it runs already) judges
/// each request.
const L7_POLICY: &str = r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {name: web-http, namespace: NS}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}]
    ports:
    - port: 8080
      rules:
        http: [{method: GET, path: "/books(/.*)?"}]
"#;

fn check_l7(node: &Node, web: &Peer, client: &Peer, other: &Peer, namespace: &str) {
    let started = node.daemon_pid().is_none();
    if started {
        node.start_daemon();
    }
    let _http = HttpServer::start(&web.netns, &[8080]);
    let policy = L7_POLICY.replace("namespace: NS", &format!("namespace: {namespace}"));
    node.apply(&policy);
    let send = |from: &Peer, method: &str| {
        exchange(
            &from.netns,
            web.addr,
            8080,
            &[Req::new(method, "/books/1")],
            Duration::from_secs(5),
        )
    };
    let mut got = None;
    wait_for("GET through the L7 proxy", Duration::from_secs(60), || {
        got = send(client, "GET").ok().map(|r| r[0].status);
        got == Some(200)
    });
    let denied = send(client, "DELETE").unwrap_or_else(|e| {
        panic!(
            "{} DELETE: {e}
daemon log:
{}",
            client.name,
            node.daemon_output()
        )
    });
    assert_eq!(denied[0].status, 403, "{:?}", denied[0]);
    assert!(
        send(other, "GET").is_err(),
        "{} is not allowed on 8080 at all",
        other.name
    );
    node.delete(&policy);
    if started {
        node.kill_daemon();
    }
}

/// The endpoint palisade registered under `name`, once it exists.
fn endpoint(node: &Node, name: &str) -> Value {
    let mut found = None;
    wait_for(&format!("endpoint {name}"), Duration::from_secs(10), || {
        found = node.endpoints().into_iter().find(|e| e["name"] == name);
        found.is_some()
    });
    found.unwrap()
}

fn peer(node: &Node, name: &str, pid: u32) -> Peer {
    let ep = endpoint(node, name);
    let addr: IpAddr = ep["addresses"][0].as_str().unwrap().parse().unwrap();
    Peer {
        name: name.to_owned(),
        netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
        addr,
    }
}

/// Check identity, then the policy with real traffic both ways.
fn check_policy(node: &Node, web: &Peer, client: &Peer, other: &Peer) {
    for (p, app) in [(web, "web"), (client, "client"), (other, "other")] {
        let ep = endpoint(node, &p.name);
        assert_eq!(ep["namespace"], "shop", "{} namespace: {ep}", p.name);
        assert_eq!(ep["effectiveLabels"]["app"], app, "{} labels: {ep}", p.name);
    }
    let peers = vec![web.clone(), client.clone(), other.clone()];
    let before = probe_all(&peers, Proto::Tcp, 80);
    assert!(
        before.cells.values().all(|v| *v),
        "everything reachable before the policy:\n{before}"
    );
    node.apply(POLICY);
    let after = probe_all(&peers, Proto::Tcp, 80);
    let want = |f: &Peer, t: &Peer| !(t.name == web.name && f.name != client.name);
    for f in &peers {
        for t in &peers {
            if f.name != t.name {
                assert_eq!(
                    after.get(&f.name, &t.name),
                    Some(want(f, t)),
                    "{} -> {}:\n{after}",
                    f.name,
                    t.name
                );
            }
        }
    }
    assert!(
        !probe(&client.netns, web.addr, Proto::Icmp, 0, PROBE_TIMEOUT),
        "ICMP to web is not in the policy's ports"
    );
}

fn assert_clean(node: &Node, what: &str) {
    let eps = node.endpoints();
    assert!(eps.is_empty(), "{what}: endpoints left: {eps:?}");
    assert!(
        node.pins().is_empty(),
        "{what}: link pins left: {:?}",
        node.pins()
    );
}

#[test]
fn runc_with_the_hook_in_config_json() {
    let n = node();
    let ann = |app: &'static str| {
        [
            ("palisade.io/namespace", "shop"),
            ("palisade.io/labels", app),
        ]
    };
    let (web, _) = RuncContainer::start(&n, "web", true, &ann("app=web"));
    let (client, _) = RuncContainer::start(&n, "client", true, &ann("app=client"));
    let (other, _) = RuncContainer::start(&n, "other", true, &ann("app=other"));
    let p = |c: &RuncContainer| Peer {
        name: c.id.clone(),
        netns: c.netns.path.clone(),
        addr: c.addr,
    };
    for c in [&web, &client, &other] {
        let ep = endpoint(&n, &c.id);
        assert_eq!(ep["source"], "oci", "{ep}");
        assert_eq!(ep["containerId"], c.id);
    }
    check_policy(&n, &p(&web), &p(&client), &p(&other));
    check_dns(&n, &p(&client), "shop");
    check_l7(&n, &p(&web), &p(&client), &p(&other), "shop");
    // SIGKILL and delete: poststop removes the endpoint.
    for c in [&web, &client, &other] {
        let out = c.delete(&n);
        assert!(out.status.success(), "runc delete: {}", describe(&out));
    }
    assert_clean(&n, "after runc delete");

    let mut t = StartTimes::default();
    for i in 0..STARTS {
        let (c, d) = RuncContainer::start(&n, &format!("tw{i}"), true, &[]);
        t.with.push(d);
        c.delete(&n);
        let (c, d) = RuncContainer::start(&n, &format!("to{i}"), false, &[]);
        t.without.push(d);
        c.delete(&n);
    }
    println!("{}", t.report("runc 1.1 (hook in config.json)"));
}

#[test]
fn podman_cni_backend_is_protected_by_the_chained_plugin_and_the_hook_adds_identity() {
    let n = node();
    let pm = Podman::new(&n, Backend::Cni, true, "cni");
    for (name, app) in [
        ("web", "app=web"),
        ("client", "app=client"),
        ("other", "app=other"),
    ] {
        pm.run(
            name,
            &[
                ("palisade.io/namespace", "shop"),
                ("palisade.io/name", name),
                ("palisade.io/labels", app),
            ],
        );
    }
    let eps = n.endpoints();
    assert_eq!(
        eps.len(),
        3,
        "one endpoint per container, no double work: {eps:?}"
    );
    assert!(
        eps.iter().all(|e| e["source"] == "cni"),
        "the CNI plugin owns them: {eps:?}"
    );
    let web = peer(&n, "web", pm.pid("web"));
    let client = peer(&n, "client", pm.pid("client"));
    let other = peer(&n, "other", pm.pid("other"));
    check_policy(&n, &web, &client, &other);
    check_dns(&n, &client, "shop");
    check_l7(&n, &web, &client, &other, "shop");
    for name in ["web", "client", "other"] {
        pm.rm(name);
    }
    assert_clean(&n, "after podman rm");

    let without = Podman::new(&n, Backend::Cni, false, "cni-plain");
    let mut t = StartTimes::default();
    for i in 0..STARTS {
        t.with.push(pm.run(&format!("w{i}"), &[]));
        pm.rm(&format!("w{i}"));
        t.without.push(without.run(&format!("o{i}"), &[]));
        without.rm(&format!("o{i}"));
    }
    println!("{}", t.report("podman 4.3, CNI backend (chained plugin)"));
}

#[test]
fn podman_netavark_backend_is_protected_by_the_hook() {
    let n = node();
    let pm = Podman::new(&n, Backend::Netavark, true, "nv");
    for (name, app) in [
        ("web", "app=web"),
        ("client", "app=client"),
        ("other", "app=other"),
    ] {
        pm.run(
            name,
            &[
                ("palisade.io/namespace", "shop"),
                ("palisade.io/name", name),
                ("palisade.io/labels", app),
            ],
        );
    }
    let eps = n.endpoints();
    assert_eq!(eps.len(), 3, "{eps:?}");
    assert!(
        eps.iter().all(|e| e["source"] == "oci"),
        "the hook registered them: {eps:?}"
    );
    let web = peer(&n, "web", pm.pid("web"));
    let client = peer(&n, "client", pm.pid("client"));
    let other = peer(&n, "other", pm.pid("other"));
    check_policy(&n, &web, &client, &other);
    check_dns(&n, &client, "shop");
    check_l7(&n, &web, &client, &other, "shop");
    for name in ["web", "client", "other"] {
        pm.rm(name);
    }
    assert_clean(&n, "after podman rm");

    let without = Podman::new(&n, Backend::Netavark, false, "nv-plain");
    let mut t = StartTimes::default();
    for i in 0..STARTS {
        t.with.push(pm.run(&format!("w{i}"), &[]));
        pm.rm(&format!("w{i}"));
        t.without.push(without.run(&format!("o{i}"), &[]));
        without.rm(&format!("o{i}"));
    }
    println!("{}", t.report("podman 4.3, netavark backend (OCI hook)"));
}

#[test]
fn containerd_ctr_run_cni_uses_the_chained_plugin() {
    let n = node();
    let ctrd = Containerd::new(&n);
    ctrd.set_cni(&n.chain.conflist);
    // Plain `ctr run --cni` gives palisade no labels and names the
    // endpoint "<containerd namespace>-<id>": a Pod object with that name
    // labels it.
    let client_name = format!("{}-client", ctrd.namespace());
    n.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {client_name}, namespace: default, labels: {{app: client}}}}\nspec: {{containers: [{{name: c}}]}}\n"
    ));
    let rootfs = testbed::runtimes::rootfs(&n.dir);
    let run_plain = |id: &str| {
        let mut c = ctrd.ctr_with_cni();
        c.args(["run", "-d", "--cni", "--rootfs"])
            .arg(&rootfs)
            .arg(id)
            .args(testbed::runtimes::SERVER);
        let out = c.output().expect("ctr run");
        assert!(
            out.status.success(),
            "ctr run --cni {id}: {}",
            describe(&out)
        );
    };
    // With palisade's hooks in the spec (a base runtime spec), annotations
    // name the container even though CNI runs after the hook.
    let run_annotated = |id: &str, app: &str| {
        let spec = ctrd.spec(
            id,
            true,
            None,
            &[
                ("palisade.io/namespace", "shop"),
                ("palisade.io/name", id),
                ("palisade.io/labels", app),
            ],
        );
        let out = ctrd
            .ctr_with_cni()
            .args(["run", "-d", "--cni", "--config"])
            .arg(&spec)
            .arg(id)
            .output()
            .expect("ctr run");
        assert!(
            out.status.success(),
            "ctr run --cni --config {id}: {}",
            describe(&out)
        );
    };
    run_annotated("web", "app=web");
    run_annotated("other", "app=other");
    run_plain("client");
    let client_ep = endpoint(&n, &client_name);
    assert_eq!(client_ep["effectiveLabels"]["app"], "client", "{client_ep}");
    assert_eq!(
        endpoint(&n, "web")["namespace"],
        "shop",
        "the hook's identity reached the CNI ADD"
    );
    assert!(n.endpoints().iter().all(|e| e["source"] == "cni"));
    let web = peer(&n, "web", ctrd.pid("web"));
    let other = peer(&n, "other", ctrd.pid("other"));
    let client = peer(&n, &client_name, ctrd.pid("client"));
    let peers = vec![web.clone(), client.clone(), other.clone()];
    assert!(probe_all(&peers, Proto::Tcp, 80).cells.values().all(|v| *v));
    n.apply(&POLICY.replace(
        "  - from: [{podSelector: {matchLabels: {app: client}}}]",
        "  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}, podSelector: {matchLabels: {app: client}}}]",
    ));
    let m = probe_all(&peers, Proto::Tcp, 80);
    assert_eq!(m.get(&client_name, "web"), Some(true), "{m}");
    assert_eq!(m.get("other", "web"), Some(false), "{m}");
    assert_eq!(m.get("web", &client_name), Some(true), "{m}");
    assert_eq!(m.get("web", "other"), Some(true), "{m}");
    check_dns(&n, &client, "default");
    check_l7(&n, &web, &client, &other, "shop");
    for id in ["web", "other", "client"] {
        ctrd.rm(id, true);
    }
    // ctr deletes the task without telling CNI when its process is gone;
    // palisadectl gc forgets endpoints whose veth and namespace are gone.
    let out = n.ctl(&["gc"], None);
    assert!(out.status.success(), "{}", describe(&out));
    assert_clean(&n, "after ctr rm and palisadectl gc");

    let mut t = StartTimes::default();
    let mut plain = n.chain.conflist.clone();
    plain["plugins"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "palisade");
    for i in 0..STARTS {
        ctrd.set_cni(&n.chain.conflist);
        let s = std::time::Instant::now();
        run_plain(&format!("w{i}"));
        t.with.push(s.elapsed());
        ctrd.rm(&format!("w{i}"), true);
        ctrd.set_cni(&plain);
        let s = std::time::Instant::now();
        run_plain(&format!("o{i}"));
        t.without.push(s.elapsed());
        ctrd.rm(&format!("o{i}"), true);
    }
    let _ = n.ctl(&["gc"], None);
    println!(
        "{}",
        t.report("containerd 1.6, ctr run --cni (chained plugin)")
    );
}

#[test]
fn containerd_ctr_run_with_the_hook() {
    let n = node();
    let ctrd = Containerd::new(&n);
    let chain = bridge_only_chain(&n);
    let mut netns = Vec::new();
    let mut run = |id: &str, app: &str, hooks: bool| -> Duration {
        let ns = Netns::new(&format!("{}h{}", n.prefix, netns.len()));
        let call = Call {
            container_id: format!("ctr-{id}"),
            netns: ns.path.display().to_string(),
            ifname: "eth0".into(),
            args: String::new(),
        };
        chain
            .add(&call)
            .unwrap_or_else(|e| panic!("bridge ADD: {e}"));
        let spec = ctrd.spec(
            id,
            hooks,
            Some(&ns.path),
            &[
                ("palisade.io/namespace", "shop"),
                ("palisade.io/name", id),
                ("palisade.io/labels", app),
            ],
        );
        let start = std::time::Instant::now();
        let out = ctrd
            .ctr()
            .args(["run", "-d", "--config"])
            .arg(&spec)
            .arg(id)
            .output()
            .expect("ctr run");
        let took = start.elapsed();
        assert!(
            out.status.success(),
            "ctr run --config {id}: {}",
            describe(&out)
        );
        netns.push((ns, call));
        took
    };
    run("web", "app=web", true);
    run("client", "app=client", true);
    run("other", "app=other", true);
    assert!(n.endpoints().iter().all(|e| e["source"] == "oci"));
    let web = peer(&n, "web", ctrd.pid("web"));
    let client = peer(&n, "client", ctrd.pid("client"));
    let other = peer(&n, "other", ctrd.pid("other"));
    check_policy(&n, &web, &client, &other);
    check_dns(&n, &client, "shop");
    check_l7(&n, &web, &client, &other, "shop");
    for id in ["web", "client", "other"] {
        ctrd.rm(id, false);
    }
    assert_clean(&n, "after ctr task kill/delete (poststop)");

    let mut t = StartTimes::default();
    for i in 0..STARTS {
        t.with.push(run(&format!("w{i}"), "app=t", true));
        ctrd.rm(&format!("w{i}"), false);
        t.without.push(run(&format!("o{i}"), "app=t", false));
        ctrd.rm(&format!("o{i}"), false);
    }
    for (ns, call) in &netns {
        let _ = chain.del(call);
        let _ = ns;
    }
    println!(
        "{}",
        t.report("containerd 1.6, ctr run with the hook in the spec")
    );
}

#[test]
fn docker_with_the_runtime_wrapper_compose_style() {
    let n = node();
    let mut dk = Docker::new(&n, true, "pal", "10.103.0.0/24");
    // Compose-style: one project, services labelled like compose does;
    // palisade.io/namespace as a label puts the project in namespace shop.
    let labels = |svc: &'static str, app: &'static str| {
        vec![
            ("com.docker.compose.project", "shop"),
            ("com.docker.compose.service", svc),
            ("palisade.io/namespace", "shop"),
            ("app", app),
        ]
    };
    dk.run("shop-web-1", &labels("web", "web"));
    dk.run("shop-client-1", &labels("client", "client"));
    dk.run("shop-other-1", &labels("other", "other"));
    let eps = n.endpoints();
    assert_eq!(eps.len(), 3, "{eps:?}");
    for e in &eps {
        assert_eq!(e["source"], "oci", "{e}");
        assert_eq!(
            e["effectiveLabels"]["com.docker.compose.project"], "shop",
            "compose labels reach palisade: {e}"
        );
    }
    let mut web = peer(&n, "shop-web-1", dk.pid("shop-web-1"));
    let mut client = peer(&n, "shop-client-1", dk.pid("shop-client-1"));
    let mut other = peer(&n, "shop-other-1", dk.pid("shop-other-1"));
    // Names differ from the other runtimes' tests; the identity check in
    // check_policy is by label.
    for p in [&mut web, &mut client, &mut other] {
        p.name = p
            .name
            .trim_start_matches("shop-")
            .trim_end_matches("-1")
            .to_owned();
    }
    let rename = |p: &Peer| p.name.clone();
    let peers = vec![web.clone(), client.clone(), other.clone()];
    assert!(probe_all(&peers, Proto::Tcp, 80).cells.values().all(|v| *v));
    n.apply(POLICY);
    let m = probe_all(&peers, Proto::Tcp, 80);
    assert_eq!(m.get(&rename(&client), &rename(&web)), Some(true), "{m}");
    assert_eq!(m.get(&rename(&other), &rename(&web)), Some(false), "{m}");
    assert_eq!(m.get(&rename(&web), &rename(&client)), Some(true), "{m}");
    assert_eq!(m.get(&rename(&web), &rename(&other)), Some(true), "{m}");
    check_dns(&n, &client, "shop");
    check_l7(&n, &web, &client, &other, "shop");

    // Restarting dockerd (even killed hard) changes nothing for running
    // containers: enforcement lives in pinned kernel objects.
    dk.stop(true);
    assert!(
        !probe(&other.netns, web.addr, Proto::Tcp, 80, PROBE_TIMEOUT),
        "still denied with dockerd dead"
    );
    assert!(
        probe(&client.netns, web.addr, Proto::Tcp, 80, PROBE_TIMEOUT),
        "still allowed with dockerd dead"
    );
    dk.start();
    assert!(
        !probe(&other.netns, web.addr, Proto::Tcp, 80, PROBE_TIMEOUT),
        "still denied after restart"
    );

    // SIGKILL a container: docker deletes it, the poststop hook forgets it.
    let out = dk.docker().args(["kill", "shop-other-1"]).output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    wait_for(
        "the killed container's endpoint to go",
        Duration::from_secs(15),
        || !n.endpoints().iter().any(|e| e["name"] == "shop-other-1"),
    );
    dk.rm("shop-other-1");
    dk.rm("shop-web-1");
    dk.rm("shop-client-1");
    assert_clean(&n, "after docker rm");

    let mut t = StartTimes::default();
    let plain = Docker::new(&n, false, "plain", "10.104.0.0/24");
    for i in 0..STARTS {
        t.with.push(dk.run(&format!("w{i}"), &[]));
        dk.rm(&format!("w{i}"));
        t.without.push(plain.run(&format!("o{i}"), &[]));
        plain.rm(&format!("o{i}"));
    }
    println!(
        "{}",
        t.report("dockerd 20.10 with palisade-runc (wrapper + hooks)")
    );
}

#[test]
fn the_wrapper_enforces_at_start_when_networking_comes_after_create() {
    // Docker 28+ order: runc create, then the network is attached, then
    // runc start. Reproduced with palisade-runc and a namespace that gets
    // its veth between create and start.
    let n = node();
    let ns = Netns::new(&format!("{}late", n.prefix));
    let bundle = n.dir.join("late-bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let out = std::process::Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut spec: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    spec["root"] = serde_json::json!({"path": testbed::runtimes::rootfs(&n.dir), "readonly": true});
    spec["process"]["args"] = serde_json::json!(testbed::runtimes::SERVER);
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["annotations"] = serde_json::json!({"palisade.io/namespace": "shop", "palisade.io/labels": "app=web", "palisade.io/name": "late"});
    for x in spec["linux"]["namespaces"].as_array_mut().unwrap() {
        if x["type"] == "network" {
            x["path"] = serde_json::json!(ns.path);
        }
    }
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let root = n.dir.join("late-runc-root");
    let log = n.dir.join("late-wrapper.log");
    let wrapper = |args: &[&str]| {
        let mut c = n.netns.command(n.bin_dir.join("palisade-runc"));
        c.arg(format!("--palisade-state-dir={}", n.state_dir.display()))
            .arg(format!("--palisade-bpf-root={}", n.bpf_root.display()))
            .arg("--root")
            .arg(&root)
            .args(args);
        if args[0] == "state" {
            c.stdin(std::process::Stdio::null()).output().unwrap()
        } else {
            testbed::runtimes::run_detached(&mut c, &log)
        }
    };
    let out = wrapper(&["create", "--bundle", &bundle.display().to_string(), "late"]);
    assert!(out.status.success(), "create: {}", describe(&out));
    assert!(
        n.endpoints().is_empty(),
        "no veth at create time, nothing registered"
    );
    let injected: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert!(
        injected["hooks"]["poststop"].is_array(),
        "the wrapper injected the hooks: {injected}"
    );
    // The network arrives now.
    let chain = bridge_only_chain(&n);
    let call = Call {
        container_id: "late".into(),
        netns: ns.path.display().to_string(),
        ifname: "eth0".into(),
        args: String::new(),
    };
    chain.add(&call).unwrap();
    let out = wrapper(&["start", "late"]);
    assert!(out.status.success(), "start: {}", describe(&out));
    let ep = endpoint(&n, "late");
    assert_eq!(ep["effectiveLabels"]["app"], "web");
    n.apply("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\nspec:\n  podSelector: {}\n");
    let addr: IpAddr = ep["addresses"][0].as_str().unwrap().parse().unwrap();
    let outsider = n.add_pod("default", "outsider", &[]);
    assert!(
        !probe(&outsider.netns, addr, Proto::Tcp, 80, PROBE_TIMEOUT),
        "enforced from the first packet"
    );
    let out = wrapper(&["kill", "late", "KILL"]);
    assert!(out.status.success(), "kill: {}", describe(&out));
    wait_for("late to stop", Duration::from_secs(10), || {
        let o = wrapper(&["state", "late"]);
        !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("stopped")
    });
    let out = wrapper(&["delete", "late"]);
    assert!(out.status.success(), "delete: {}", describe(&out));
    assert!(
        !n.endpoints().iter().any(|e| e["name"] == "late"),
        "poststop removed it"
    );
    let _ = chain.del(&call);
}

#[test]
fn a_hook_that_cannot_enforce_stops_the_container_unless_fail_open() {
    let n = node();
    // A namespace with a veth whose host side is in *another* namespace:
    // the hook cannot reach it, so it must refuse.
    let elsewhere = Netns::new(&format!("{}else", n.prefix));
    let ns = Netns::new(&format!("{}cant", n.prefix));
    testbed::sys::ip(&[
        "-n",
        &elsewhere.name,
        "link",
        "add",
        "vx0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &ns.name,
    ]);
    let bundle = n.dir.join("cant-bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let out = std::process::Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success());
    let hook = n.bin_dir.join("palisade-hook");
    let mk = |fail_open: bool| {
        let mut spec: Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        spec["root"] =
            serde_json::json!({"path": testbed::runtimes::rootfs(&n.dir), "readonly": true});
        spec["process"]["args"] = serde_json::json!(testbed::runtimes::SERVER);
        spec["process"]["terminal"] = serde_json::json!(false);
        for x in spec["linux"]["namespaces"].as_array_mut().unwrap() {
            if x["type"] == "network" {
                x["path"] = serde_json::json!(ns.path);
            }
        }
        let mut args = vec![
            "palisade-hook".to_owned(),
            format!("--state-dir={}", n.state_dir.display()),
            format!("--bpf-root={}", n.bpf_root.display()),
        ];
        if fail_open {
            args.push("--fail-open".into());
        }
        spec["hooks"] = serde_json::json!({"createRuntime": [{"path": hook, "args": args}]});
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    };
    let root = n.dir.join("cant-root");
    let log = n.dir.join("cant.log");
    let runc = |args: &[&str]| {
        let mut c = n.netns.command("runc");
        c.arg("--root").arg(&root).args(args);
        testbed::runtimes::run_detached(&mut c, &log)
    };
    mk(false);
    let out = runc(&[
        "run",
        "-d",
        "--bundle",
        &bundle.display().to_string(),
        "cant",
    ]);
    assert!(
        !out.status.success(),
        "the runtime must refuse: {}",
        describe(&out)
    );
    let text = describe(&out);
    assert!(
        text.contains("not in this network namespace"),
        "the error says what is wrong: {text}"
    );
    let _ = runc(&["delete", "--force", "cant"]);
    mk(true);
    let out = runc(&[
        "run",
        "-d",
        "--bundle",
        &bundle.display().to_string(),
        "cant",
    ]);
    assert!(
        out.status.success(),
        "fail-open lets it start: {}",
        describe(&out)
    );
    let _ = runc(&["delete", "--force", "cant"]);
    assert!(n.endpoints().is_empty());
}

#[test]
fn a_host_network_container_is_left_alone() {
    let n = node();
    let bundle = n.dir.join("hostnet-bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let out = std::process::Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut spec: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    spec["root"] = serde_json::json!({"path": testbed::runtimes::rootfs(&n.dir), "readonly": true});
    spec["process"]["args"] = serde_json::json!(["/bin/sleep", "30"]);
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|x| x["type"] != "network");
    let hook = n.bin_dir.join("palisade-hook");
    let args = serde_json::json!([
        "palisade-hook",
        format!("--state-dir={}", n.state_dir.display()),
        format!("--bpf-root={}", n.bpf_root.display())
    ]);
    spec["hooks"] = serde_json::json!({
        "createRuntime": [{"path": hook, "args": args}],
        "poststop": [{"path": hook, "args": args}]
    });
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let root = n.dir.join("hostnet-root");
    let log = n.dir.join("hostnet.log");
    let mut c = n.netns.command("runc");
    c.arg("--root")
        .arg(&root)
        .args(["run", "-d", "--bundle"])
        .arg(&bundle)
        .arg("hostnet");
    let out = testbed::runtimes::run_detached(&mut c, &log);
    assert!(
        out.status.success(),
        "a host-network container starts: {}",
        describe(&out)
    );
    assert!(n.endpoints().is_empty());
    // runc shows hook output only on failure; ask the hook directly.
    let state = serde_json::json!({
        "ociVersion": "1.0.2", "id": "hostnet", "status": "creating", "pid": std::process::id(), "bundle": bundle
    });
    let mut h = n.netns.command(&hook);
    h.arg(format!("--state-dir={}", n.state_dir.display()))
        .arg(format!("--bpf-root={}", n.bpf_root.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = h.spawn().unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(state.to_string().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("uses the host's network: nothing to enforce"),
        "the hook says why it does nothing: {}",
        describe(&out)
    );
    let mut k = n.netns.command("runc");
    let _ = k
        .arg("--root")
        .arg(&root)
        .args(["delete", "--force", "hostnet"])
        .output();
}
