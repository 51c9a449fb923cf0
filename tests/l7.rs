//! L7 (HTTP) policy with real traffic: a PalisadeNetworkPolicy's
//! `rules.http` on a pod's ingress or egress steers the connections only
//! those rules allow to the node's L7 proxy (in the daemon), which lets
//! through the requests a rule matches and answers the others `403`.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    io::{BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use testbed::{
    cluster::{Cluster, Topology},
    http::{HttpServer, Reply, Req, exchange, h2_exchange, raw_exchange, read_reply, upgrade_echo},
    node::{Node, NodeOptions, Pod, Primary},
    probe::who,
    sys::in_netns,
};

const TIMEOUT: Duration = Duration::from_secs(5);

const API_POLICY: &str = r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {name: api-http, namespace: app}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports:
    - port: 80
      rules:
        http:
        - method: GET
          path: "/books(/.*)?"
        - method: POST
          path: /books
          headers: ["X-Team: blue"]
    - port: 8080
    - port: 50051
      rules:
        http:
        - method: POST
          path: /bookstore\.Books/GetBook
        - method: GET
          path: "/books(/.*)?"
"#;

const WEB_EGRESS: &str = r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {name: web-out, namespace: app}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: api}}}]
    ports:
    - port: 80
      rules:
        http: [{method: GET}]
    - port: 8080
    - port: 9000
"#;

fn pod_object(name: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: app, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c}}]}}\n"
    )
}

struct Bed {
    n: Node,
    api: Arc<Pod>,
    web: Arc<Pod>,
    other: Arc<Pod>,
    _http: HttpServer,
}

fn bed(primary: Primary) -> Bed {
    let n = Node::new(NodeOptions {
        ipv6: true,
        daemon: true,
        primary,
        ..Default::default()
    });
    let api = n.add_pod("app", "api", &[]);
    let web = n.add_pod("app", "web", &[]);
    let other = n.add_pod("app", "other", &[]);
    let http = HttpServer::start(&api.netns, &[80, 8080, 50051]);
    for (name, app) in [("api", "api"), ("web", "web"), ("other", "other")] {
        n.apply(&pod_object(name, app));
    }
    n.apply(API_POLICY);
    Bed {
        n,
        api,
        web,
        other,
        _http: http,
    }
}

fn daemon_log(n: &Node) -> String {
    if let Ok(secs) = std::env::var("PAL_L7_DEBUG_SLEEP") {
        eprintln!("DEBUG: node netns {}", n.netns.name);
        std::thread::sleep(Duration::from_secs(secs.parse().unwrap()));
    }
    std::fs::read_to_string(n.daemon_log()).unwrap_or_default()
}

fn send(from: &Pod, to: IpAddr, port: u16, reqs: &[Req]) -> std::io::Result<Vec<Reply>> {
    exchange(&from.netns, to, port, reqs, TIMEOUT)
}

fn statuses(r: &std::io::Result<Vec<Reply>>) -> Option<Vec<u16>> {
    r.as_ref()
        .ok()
        .map(|v| v.iter().map(|x| x.status).collect())
}

/// `GET /books/1` with `connection: close` from source port `from_port`,
/// read to the end: the other side closes first.
fn get_closing_from_port(
    netns: &Path,
    to: IpAddr,
    port: u16,
    from_port: u16,
) -> std::io::Result<Reply> {
    in_netns(netns, move || {
        let (domain, any): (Domain, IpAddr) = if to.is_ipv6() {
            (Domain::IPV6, Ipv6Addr::UNSPECIFIED.into())
        } else {
            (Domain::IPV4, Ipv4Addr::UNSPECIFIED.into())
        };
        let s = Socket::new(domain, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(any, from_port).into())?;
        s.connect_timeout(&SocketAddr::new(to, port).into(), TIMEOUT)?;
        let stream: TcpStream = s.into();
        stream.set_read_timeout(Some(TIMEOUT))?;
        (&stream).write_all(
            b"GET /books/1 HTTP/1.1\r\nhost: api\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        )?;
        let mut r = BufReader::new(&stream);
        let reply = read_reply(&mut r)?;
        let mut rest = Vec::new();
        r.read_to_end(&mut rest)?;
        Ok(reply)
    })
}

/// Wait (generously: a loaded CI machine) until the requests get these
/// statuses; the replies.
fn wait_for(
    n: &Node,
    what: &str,
    from: &Pod,
    to: IpAddr,
    port: u16,
    reqs: &[Req],
    want: &[u16],
) -> Vec<Reply> {
    wait_for_from(n, what, &from.netns, to, port, reqs, want)
}

/// [`wait_for`] from any namespace (a host outside the cluster).
fn wait_for_from(
    n: &Node,
    what: &str,
    from: &Path,
    to: IpAddr,
    port: u16,
    reqs: &[Req],
    want: &[u16],
) -> Vec<Reply> {
    let deadline = Instant::now()
        + Duration::from_secs(if std::env::var("PAL_L7_DEBUG_SLEEP").is_ok() {
            5
        } else {
            60
        });
    let mut last;
    loop {
        let r = exchange(from, to, port, reqs, TIMEOUT);
        if statuses(&r).as_deref() == Some(want) {
            return r.unwrap();
        }
        last = format!(
            "{:?}",
            r.map(|v| v
                .iter()
                .map(|x| (x.status, x.body.clone()))
                .collect::<Vec<_>>())
        );
        if Instant::now() > deadline {
            panic!(
                "{what}: wanted {want:?}, last got {last} (60 s); daemon log:\n{}",
                daemon_log(n)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn http_rules_on_ingress_allow_matching_requests_and_deny_the_others_with_403() {
    let b = bed(Primary::Bridge);
    let (n, api, web) = (&b.n, &b.api, &b.web);
    for v6 in [false, true] {
        let to = api.addr(v6);
        let ok = wait_for(
            n,
            "GET /books/1",
            web,
            to,
            80,
            &[Req::new("GET", "/books/1")],
            &[200],
        );
        // The server sees the client itself, not the node or the proxy.
        assert_eq!(
            ok[0].body.trim(),
            format!("GET /books/1 from {}", web.addr(v6)),
            "the server must see the client's own address"
        );
        let denied = send(web, to, 80, &[Req::new("DELETE", "/books/1")]).unwrap();
        assert_eq!(denied[0].status, 403, "{:?}", denied[0]);
        assert!(
            denied[0]
                .header("x-palisade-policy")
                .is_some_and(|p| p.contains("api-http")),
            "the deciding policy is named: {:?}",
            denied[0]
        );
        // A client that reuses its source port at once, as a busy one does:
        // the proxy closed the previous connection first, so that
        // connection's tuple is in TIME_WAIT on the node (the proxy's side);
        // each new one must still reach the proxy.
        let from_port = if v6 { 40_123 } else { 40_124 };
        for i in 0..3 {
            let r = get_closing_from_port(&web.netns, to, 80, from_port);
            assert!(
                matches!(&r, Ok(reply) if reply.status == 200),
                "connection {i} from port {from_port} to {to}:80 (the one before it in \
                 TIME_WAIT at the proxy): {r:?}; daemon log:\n{}",
                daemon_log(n)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let to = api.addr(false);
    // Keep-alive: each request on one connection is judged on its own.
    let seq = send(
        web,
        to,
        80,
        &[
            Req::new("GET", "/books/1"),
            Req::new("DELETE", "/books/1"),
            Req::new("GET", "/books"),
            Req::new("GET", "/admin"),
        ],
    )
    .unwrap();
    assert_eq!(
        seq.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 403, 200, 403]
    );
    // Headers: present with the value the rule gives.
    let posts = send(
        web,
        to,
        80,
        &[
            Req::new("POST", "/books"),
            Req::new("POST", "/books").header("X-Team", "red"),
            Req::new("POST", "/books").header("X-Team", "blue"),
        ],
    )
    .unwrap();
    assert_eq!(
        posts.iter().map(|r| r.status).collect::<Vec<_>>(),
        [403, 403, 200]
    );
    // Port 8080 has no HTTP rules: every request passes, directly.
    let plain = send(web, to, 8080, &[Req::new("DELETE", "/anything")]).unwrap();
    assert_eq!(plain[0].status, 200);
    // A pod no rule allows cannot connect at all (L3/L4).
    assert!(
        send(&b.other, to, 80, &[Req::new("GET", "/books/1")]).is_err(),
        "other must not reach api:80"
    );

    // An egress policy on the client adds its own HTTP rules: both sides
    // must allow.
    n.apply(WEB_EGRESS);
    wait_for(
        n,
        "POST denied by the client's egress rules",
        web,
        to,
        80,
        &[Req::new("POST", "/books").header("X-Team", "blue")],
        &[403],
    );
    let both = send(web, to, 80, &[Req::new("GET", "/books/1")]).unwrap();
    assert_eq!(both[0].status, 200);
    n.delete(WEB_EGRESS);

    // The proxy gone (the daemon killed): L7 connections fail, closed;
    // the other port is untouched. Back when it restarts.
    n.kill_daemon();
    let deadline = Instant::now() + Duration::from_secs(30);
    while send(web, to, 80, &[Req::new("GET", "/books/1")]).is_ok() {
        assert!(
            Instant::now() < deadline,
            "requests still pass with the daemon killed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        statuses(&send(web, to, 8080, &[Req::new("GET", "/")])),
        Some(vec![200])
    );
    n.start_daemon();
    wait_for(
        n,
        "GET after the restart",
        web,
        to,
        80,
        &[Req::new("GET", "/books/1")],
        &[200],
    );
    let denied = send(web, to, 80, &[Req::new("DELETE", "/books/1")]).unwrap();
    assert_eq!(denied[0].status, 403);

    // Every request judged is a flow record of kind http, at the endpoint
    // whose rules decided, with the deciding policy; and a metric.
    let mut seen = (false, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen != (true, true) {
        assert!(
            Instant::now() < deadline,
            "no http flow records: {}",
            String::from_utf8_lossy(&n.ctl(&["flows", "-o", "json"], None).stdout)
        );
        std::thread::sleep(Duration::from_millis(300));
        let out = n.ctl(&["flows", "-o", "json", "--pod", "app/api"], None);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(r) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if r["kind"] != "http" {
                continue;
            }
            // Seen at the endpoint whose rules decided: the client's for
            // its egress rules (web-out, earlier), the server's here.
            let at = if r["direction"] == "ingress" {
                "api"
            } else {
                "web"
            };
            assert_eq!(r["endpoint"]["name"], at, "{r}");
            if r["direction"] != "ingress" {
                assert!(r["policy"].as_str().unwrap().contains("web-out"), "{r}");
                continue;
            }
            assert_eq!(r["peer"]["name"], "web", "{r}");
            let (method, status) = (&r["http"]["method"], &r["http"]["status"]);
            if method == "DELETE" && status == 403 && r["verdict"] == "denied" {
                assert!(r["policy"].as_str().unwrap().contains("api-http"), "{r}");
                seen.0 = true;
            }
            if method == "GET" && status == 200 && r["verdict"] == "allowed" {
                assert!(r["http"]["latencyMicros"].as_u64().is_some(), "{r}");
                seen.1 = true;
            }
        }
    }
    let text =
        String::from_utf8_lossy(&n.ctl(&["flows", "--pod", "app/api"], None).stdout).into_owned();
    assert!(text.contains("HTTP DELETE /books/1 -> 403"), "{text}");

    // learn proposes HTTP rules from the requests that went through:
    // the book ids grouped, the denied DELETE not proposed.
    let out = n.ctl(&["learn", "--namespace", "app", "--mode", "audit"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let learned = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        learned.contains("kind: PalisadeNetworkPolicy")
            && learned.contains("path: /books/[^/]+")
            && learned.contains("method: GET")
            && !learned.contains("method: DELETE"),
        "{learned}"
    );

    // status shows where the datapath sends L7 connections.
    let st = String::from_utf8_lossy(&n.ctl(&["status"], None).stdout).into_owned();
    assert!(
        st.contains("L7 port 15080") && !st.contains("not this build's"),
        "{st}"
    );

    // explain --http gives the proxy's answer for one request.
    let explain = |method: &str, path: &str| -> serde_json::Value {
        let out = n.ctl(
            &[
                "explain", "--from", "app/web", "--to", "app/api", "--port", "80/TCP", "--http",
                method, path, "-o", "json",
            ],
            None,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let e = explain("DELETE", "/books/1");
    assert_eq!(e["verdict"], "denied", "{e}");
    assert_eq!(e["http"]["verdict"], "denied", "{e}");
    assert_eq!(e["http"]["throughL7Proxy"], true, "{e}");
    let e = explain("GET", "/books/1");
    assert_eq!(e["verdict"], "allowed", "{e}");

    // Audit mode: the requests no rule allows pass, reported as audit.
    n.apply(&API_POLICY.replace(
        "metadata: {name: api-http, namespace: app}",
        "metadata: {name: api-http, namespace: app, annotations: {palisade.io/mode: audit}}",
    ));
    wait_for(
        n,
        "DELETE passed in audit mode",
        web,
        to,
        80,
        &[Req::new("DELETE", "/books/1")],
        &[200],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = n.ctl(&["flows", "-o", "json", "--verdict", "audit"], None);
        let found = String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|r| {
                r["kind"] == "http" && r["http"]["method"] == "DELETE" && r["http"]["status"] == 200
            })
        });
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "no audit http record");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn http_rules_hold_behind_a_routed_primary_plugin() {
    let b = bed(Primary::Ptp);
    let (n, api, web) = (&b.n, &b.api, &b.web);
    let to = api.addr(false);
    wait_for(
        n,
        "GET /books/1",
        web,
        to,
        80,
        &[Req::new("GET", "/books/1")],
        &[200],
    );
    let denied = send(web, to, 80, &[Req::new("DELETE", "/books/1")]).unwrap();
    assert_eq!(denied[0].status, 403);
}

#[test]
fn grpc_and_http2_calls_are_judged_one_by_one_and_upgrades_pass_when_allowed() {
    let b = bed(Primary::Bridge);
    let (n, api, web) = (&b.n, &b.api, &b.web);
    let to = api.addr(false);
    wait_for(
        n,
        "GET /books/1",
        web,
        to,
        80,
        &[Req::new("GET", "/books/1")],
        &[200],
    );
    for v6 in [false, true] {
        let to = api.addr(v6);
        // One HTTP/2 connection: gRPC calls and plain requests, each
        // judged on its own.
        let calls = h2_exchange(
            &web.netns,
            to,
            50051,
            &[
                ("/bookstore.Books/GetBook", true),
                ("/bookstore.Books/DeleteBook", true),
                ("/books/1", false),
                ("/admin", false),
                ("/bookstore.Books/GetBook", true),
            ],
            TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("HTTP/2 exchange: {e}\n{}", daemon_log(n)));
        let got: Vec<(u16, u32)> = calls.iter().map(|(s, g)| (*s, g.status)).collect();
        assert_eq!(
            got,
            [
                (200, 0),
                (200, 7),
                (200, u32::MAX),
                (403, u32::MAX),
                (200, 0)
            ],
            "{calls:?}"
        );
        // The allowed call reached the server and came back whole.
        assert_eq!(calls[0].1.body, [0, 0, 0, 0, 3, 0x0a, 0x01, 0x78]);
        // The denied one: PERMISSION_DENIED naming the policy, and nothing
        // from the server.
        assert!(
            calls[1]
                .1
                .policy
                .as_deref()
                .is_some_and(|p| p.contains("api-http")),
            "{:?}",
            calls[1]
        );
        assert!(calls[1].1.body.is_empty());
    }
    // A WebSocket upgrade on an allowed path is joined through; on a
    // denied one it is answered 403.
    let (status, echoed) = upgrade_echo(&web.netns, to, 80, "/books/live", TIMEOUT).unwrap();
    assert_eq!(status, 101);
    assert_eq!(
        echoed.as_deref(),
        Some("ping over the upgraded connection\n")
    );
    let (status, echoed) = upgrade_echo(&web.netns, to, 80, "/admin/live", TIMEOUT).unwrap();
    assert_eq!((status, echoed), (403, None));
    // Bytes that are not HTTP: the connection is closed, and nothing
    // reaches the server (it would answer).
    let raw = raw_exchange(&web.netns, to, 80, b"hello, not http\r\n\r\n", TIMEOUT)
        .expect("the proxy must close the connection");
    let raw = String::from_utf8_lossy(&raw);
    assert!(!raw.contains(" from "), "the server answered: {raw}");
}

const CLUSTER_VIP: [&str; 2] = ["10.96.0.20", "fd00:96::20"];

/// Cluster mode: the policy comes from the API server; the senders sit on
/// the server's node and on another one, and also go through a Service
/// (kube-proxy's DNAT, written here as kube-proxy writes it, on every
/// node) whose backend has HTTP rules.
#[test]
fn http_rules_hold_for_senders_on_other_nodes_and_through_a_service() {
    // A host outside the cluster ("world"), routed through node 0.
    let c = Cluster::with_world(
        2,
        Topology::Vxlan,
        true,
        serde_json::Map::new(),
        Some(vec![81]),
    );
    c.namespace("app", &[]);
    let world = c.nodes[0].world.as_ref().expect("the outside host");
    let world_addr = |v6| c.nodes[0].world_addr(v6);
    // 80: HTTP (with HTTP rules); 9000: the probe server, a protocol
    // that is not HTTP (plain L3/L4 rules).
    let api = c.add_pod(0, "app", "api", &[("app", "api")], &[9000]);
    let near = c.add_pod(0, "app", "near", &[("app", "web")], &[]);
    let far = c.add_pod(1, "app", "far", &[("app", "web")], &[]);
    let stranger = c.add_pod(1, "app", "stranger", &[("app", "other")], &[]);
    let _http = HttpServer::start(&api.netns, &[80]);
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: app}}\n\
         spec:\n  selector: {{app: api}}\n  clusterIP: {v4}\n  clusterIPs: [{v4}, '{v6}']\n  \
         ports:\n  - {{name: http, port: 80, targetPort: 80, protocol: TCP}}\n  \
         - {{name: probe, port: 9000, targetPort: 9000, protocol: TCP}}\n",
        v4 = CLUSTER_VIP[0],
        v6 = CLUSTER_VIP[1],
    ));
    c.apply_yaml(&format!(
        r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {{name: api-http, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: api}}}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {{matchLabels: {{app: web}}}}
    - ipBlock: {{cidr: {}/32}}
    - ipBlock: {{cidr: "{}/128"}}
    ports:
    - port: 80
      rules:
        http: [{{method: GET, path: "/books(/.*)?"}}]
    - port: 9000
"#,
        world_addr(false),
        world_addr(true),
    ));
    c.settle();
    c.wait_service_frontends(2);
    for node in &c.nodes {
        node.netns.sysctl("net.bridge.bridge-nf-call-iptables", "1");
        node.netns
            .sysctl("net.bridge.bridge-nf-call-ip6tables", "1");
        for v6 in [false, true] {
            let (tool, len) = if v6 {
                ("ip6tables", 128)
            } else {
                ("iptables", 32)
            };
            let ipt = |args: &[&str]| {
                let out = node
                    .netns
                    .command(tool)
                    .args(["-w", "-t", "nat"])
                    .args(args)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{tool} {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            let vip = format!("{}/{len}", CLUSTER_VIP[usize::from(v6)]);
            ipt(&["-N", "KUBE-SERVICES"]);
            ipt(&["-A", "PREROUTING", "-j", "KUBE-SERVICES"]);
            for port in ["80", "9000"] {
                let to = if v6 {
                    format!("[{}]:{port}", api.addr(true))
                } else {
                    format!("{}:{port}", api.addr(false))
                };
                ipt(&[
                    "-A",
                    "KUBE-SERVICES",
                    "-d",
                    &vip,
                    "-p",
                    "tcp",
                    "--dport",
                    port,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &to,
                ]);
            }
        }
    }

    let server = &c.nodes[0];
    for v6 in [false, true] {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let vip: IpAddr = CLUSTER_VIP[usize::from(v6)].parse().unwrap();
        let (near_c, far_c) = (
            (near.netns.as_path(), near.addr(v6), near.name.as_str()),
            (far.netns.as_path(), far.addr(v6), far.name.as_str()),
        );
        let world_c = (world.netns.path.as_path(), world_addr(v6), "world");
        for (from, to, how) in [
            (far_c, api.addr(v6), "from another node"),
            (near_c, vip, "through the Service, from the backend's node"),
            (far_c, vip, "through the Service, from another node"),
            (world_c, api.addr(v6), "from outside the cluster"),
            (
                world_c,
                vip,
                "through the Service, from outside the cluster",
            ),
        ] {
            let (netns, source, name) = from;
            let what = format!("{fam} {how}: {name} GET /books/1");
            let ok = wait_for_from(
                server,
                &what,
                netns,
                to,
                80,
                &[Req::new("GET", "/books/1"), Req::new("DELETE", "/books/1")],
                &[200, 403],
            );
            assert_eq!(
                ok[0].body.trim(),
                format!("GET /books/1 from {source}"),
                "{what}: the server must see the client's own address"
            );
            assert!(
                ok[1]
                    .header("x-palisade-policy")
                    .is_some_and(|p| p.contains("api-http")),
                "{what}: the 403 names the policy: {:?}",
                ok[1]
            );
        }
        for to in [api.addr(v6), vip] {
            assert!(
                send(&stranger, to, 80, &[Req::new("GET", "/books/1")]).is_err(),
                "{fam}: a pod no rule admits must not connect to {to}:80"
            );
        }
    }

    // The clients' own egress HTTP rules, directly to the pod and through
    // the Service: the client's veth sends its connections to frontends to
    // its node's L7 proxy, the node's DNAT picks the backend there, and the
    // proxy judges each request against the client's rules for that
    // backend (and, when the backend is on this node, the backend's too).
    // The Service's other port (not HTTP, plain rules) is relayed as bytes.
    c.apply_yaml(WEB_EGRESS);
    c.settle();
    for v6 in [false, true] {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let vip: IpAddr = CLUSTER_VIP[usize::from(v6)].parse().unwrap();
        for (from, node) in [(&near, &c.nodes[0]), (&far, &c.nodes[1])] {
            for (to, how) in [(api.addr(v6), "directly"), (vip, "through the Service")] {
                let what = format!("{fam}: {} with egress HTTP rules, {how}", from.name);
                let ok = wait_for(
                    node,
                    &what,
                    from,
                    to,
                    80,
                    &[
                        Req::new("GET", "/books/1"),
                        Req::new("DELETE", "/books/1"),
                        Req::new("GET", "/books/2"),
                    ],
                    &[200, 403, 200],
                );
                assert_eq!(
                    ok[0].body.trim(),
                    format!("GET /books/1 from {}", from.addr(v6)),
                    "{what}: the server must see the client's own address"
                );
                assert!(
                    ok[1]
                        .header("x-palisade-policy")
                        .is_some_and(|p| p.contains("web-out")),
                    "{what}: the 403 names the client's policy: {:?}",
                    ok[1]
                );
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let reached = who(&from.netns, vip, 9000, TIMEOUT);
                if reached == Some(api.addr(v6)) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{fam}: {} through the Service to port 9000 (not HTTP): reached {reached:?}, \
                     wanted {} (60 s); daemon log:\n{}",
                    from.name,
                    api.addr(v6),
                    daemon_log(node)
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        assert!(
            send(&stranger, vip, 80, &[Req::new("GET", "/books/1")]).is_err(),
            "{fam}: a pod no rule admits must still not connect through the Service"
        );
    }
    // The denied request is recorded on the client's node, at the client,
    // with the client's policy.
    for (node, from) in [(&c.nodes[0], &near), (&c.nodes[1], &far)] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = node.ctl(&["flows", "-o", "json"], None);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let found = text.lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                    v["kind"] == "http"
                        && v["direction"] == "egress"
                        && v["endpoint"]["name"] == from.name.as_str()
                        && v["http"]["method"] == "DELETE"
                        && v["http"]["status"] == 403
                        && v["policy"].as_str().is_some_and(|p| p.contains("web-out"))
                })
            });
            if found {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no record of {}'s denied DELETE:\n{text}",
                node.prefix,
                from.name
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
