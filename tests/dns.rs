//! DNS-aware egress with real traffic: a real DNS server (unbound) in the
//! outside namespace serves a test zone; pods selected by a
//! PalisadeNetworkPolicy with `toFQDNs` and DNS rules ask it through the
//! node's DNS proxy (in the daemon) and connect to what it answered.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use hickory_proto::rr::RecordType;
use serde_json::Value;
use testbed::{
    dns::{Unbound, query, query_with},
    http::{HttpServer, Req, exchange},
    node::{Node, NodeOptions, Pod, WORLD_V4, WORLD_V6},
    probe::{PROBE_TIMEOUT, Proto, probe},
    sys,
};

/// Addresses the zone hands out; the outside host holds them all.
const API_V4: &str = "203.0.113.21";
const API_V6: &str = "2001:db8:cafe::21";
const EDGE_V4: &str = "203.0.113.22";
const OTHER_V4: &str = "203.0.113.23";
const DEEP_V4: &str = "203.0.113.24";
const BLOCKED_V4: &str = "203.0.113.25";
const ROTATED_V4: &str = "203.0.113.31";
const KEEP_V4: &str = "203.0.113.26";
/// shop.example.test: an HTTP server outside, with HTTP rules on its name.
const SHOP_V4: &str = "203.0.113.40";
const SHOP_V6: &str = "2001:db8:cafe::40";
/// big.example.test: more A records than fit in 512 bytes.
const BIG: std::ops::Range<u8> = 100..140;

fn zone(api_v4: &str) -> Vec<String> {
    let mut r = vec![
        format!("api.example.test. 2 IN A {api_v4}"),
        format!("api.example.test. 2 IN AAAA {API_V6}"),
        "www.example.test. 60 IN CNAME edge.cdn.test.".to_string(),
        format!("edge.cdn.test. 60 IN A {EDGE_V4}"),
        format!("other.example.test. 60 IN A {OTHER_V4}"),
        format!("x.y.deep.example.test. 60 IN A {DEEP_V4}"),
        format!("x.blocked.test. 60 IN A {BLOCKED_V4}"),
        format!("keep.example.test. 2 IN A {KEEP_V4}"),
        format!("shop.example.test. 60 IN A {SHOP_V4}"),
        format!("shop.example.test. 60 IN AAAA {SHOP_V6}"),
    ];
    for i in BIG {
        r.push(format!("big.example.test. 60 IN A 203.0.113.{i}"));
    }
    r
}

const ZONES: &[&str] = &["example.test.", "cdn.test.", "blocked.test."];

const POLICY: &str = r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {name: web-egress, namespace: app}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - toFQDNs:
    - matchName: api.example.test
    - matchName: www.example.test
    - matchName: big.example.test
    - matchName: keep.example.test
    - matchPattern: "**.deep.example.test"
    ports: [{port: 80}]
  - to:
    - ipBlock: {cidr: 203.0.113.10/32}
    - ipBlock: {cidr: 2001:db8:cafe::10/128}
    ports:
    - port: 53
      protocol: UDP
      rules:
        dns: [{matchPattern: "*.example.test"}, {matchPattern: "**.example.test"}, {matchPattern: "*.cdn.test"}]
    - port: 53
      protocol: TCP
      rules:
        dns: [{matchPattern: "*.example.test"}, {matchPattern: "**.example.test"}, {matchPattern: "*.cdn.test"}]
"#;

struct Bed {
    n: Node,
    dns: Unbound,
    web: std::sync::Arc<Pod>,
    plain: std::sync::Arc<Pod>,
}

fn bed() -> Bed {
    let n = Node::new(NodeOptions {
        world: true,
        ipv6: true,
        daemon: true,
        daemon_args: ["--dns-min-ttl", "1", "--dns-grace", "1"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    let world = &n.world.as_ref().unwrap().netns;
    let mut extra: Vec<String> = [
        API_V4, EDGE_V4, OTHER_V4, DEEP_V4, BLOCKED_V4, ROTATED_V4, KEEP_V4,
    ]
    .iter()
    .map(|a| format!("{a}/32"))
    .collect();
    extra.push(format!("{SHOP_V4}/32"));
    extra.push(format!("{API_V6}/128"));
    extra.push(format!("{SHOP_V6}/128"));
    extra.extend(BIG.map(|i| format!("203.0.113.{i}/32")));
    for a in &extra {
        let mut args = vec!["-n", &world.name, "addr", "add", a, "dev", "eth0"];
        if a.contains(':') {
            args.push("nodad");
        }
        sys::ip(&args);
    }
    let dns = Unbound::start(
        world,
        &n.dir.join("unbound"),
        &[WORLD_V4.parse().unwrap(), WORLD_V6.parse().unwrap()],
        ZONES,
        &zone(API_V4),
    );
    let web = n.add_pod("app", "web", &[]);
    let plain = n.add_pod("app", "plain", &[]);
    n.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: app, labels: {app: web}}\nspec: {containers: [{name: c}]}\n",
    );
    n.apply(POLICY);
    Bed { n, dns, web, plain }
}

fn server(v6: bool) -> SocketAddr {
    let a: IpAddr = if v6 { WORLD_V6 } else { WORLD_V4 }.parse().unwrap();
    SocketAddr::new(a, 53)
}

fn tcp80(pod: &Pod, addr: &str) -> bool {
    probe(
        &pod.netns,
        addr.parse().unwrap(),
        Proto::Tcp,
        80,
        PROBE_TIMEOUT,
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn daemon_log(n: &Node) -> String {
    if let Ok(secs) = std::env::var("PAL_DNS_DEBUG_SLEEP") {
        eprintln!("DEBUG: node netns {}", n.netns.name);
        std::thread::sleep(Duration::from_secs(secs.parse().unwrap()));
    }
    let mut out = std::fs::read_to_string(n.daemon_log()).unwrap_or_default();
    for args in [
        vec!["rule"],
        vec!["-6", "rule"],
        vec!["route", "show", "table", "1053"],
        vec!["-s", "link"],
    ] {
        let mut a = vec!["-n", n.netns.name.as_str()];
        a.extend(args);
        let o = std::process::Command::new("ip").args(&a).output().unwrap();
        out += &format!("\nip {a:?}:\n{}", String::from_utf8_lossy(&o.stdout));
    }
    let o = n
        .netns
        .command("cat")
        .arg("/proc/net/snmp")
        .output()
        .unwrap();
    out += &String::from_utf8_lossy(&o.stdout);
    let o = n.netns.command("ss").arg("-uanp").output().unwrap();
    out += &String::from_utf8_lossy(&o.stdout);
    if let Ok(rd) = std::fs::read_dir(n.state_dir.join("flows")) {
        for f in rd.flatten() {
            out += &std::fs::read_to_string(f.path()).unwrap_or_default();
        }
    }
    out
}

/// Wait (generously: a loaded CI machine) until `f` holds.
fn wait_until(what: &str, n: &Node, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "{what} did not happen within 60 s; daemon log:\n{}",
        daemon_log(n)
    );
}

#[test]
fn a_name_the_policy_allows_is_reachable_right_after_its_answer_and_nothing_else() {
    let b = bed();
    let (n, web) = (&b.n, &b.web);
    assert!(!tcp80(web, API_V4), "nothing learned yet: denied");

    // IPv4 and IPv6, over UDP: the first connection right after the
    // answer goes through.
    for (qtype, addr, v6) in [
        (RecordType::A, API_V4, false),
        (RecordType::AAAA, API_V6, true),
    ] {
        let a = query(&web.netns, server(v6), "api.example.test.", qtype, false)
            .unwrap_or_else(|e| panic!("{qtype} api.example.test: {e}\n{}", daemon_log(n)));
        assert_eq!(a.rcode, "No Error", "{a:?}");
        assert_eq!(a.addresses, vec![ip(addr)]);
        assert!(tcp80(web, addr), "{addr}: connected right after the answer");
    }

    // A CNAME chain: the rule names www, the address is edge.cdn.test's.
    let a = query(
        &web.netns,
        server(false),
        "www.example.test.",
        RecordType::A,
        false,
    )
    .unwrap();
    assert_eq!(a.addresses, vec![ip(EDGE_V4)]);
    assert!(tcp80(web, EDGE_V4), "reached through the CNAME chain");

    // `**.` matches several labels.
    let a = query(
        &web.netns,
        server(false),
        "x.y.deep.example.test.",
        RecordType::A,
        false,
    )
    .unwrap();
    assert_eq!(a.addresses, vec![ip(DEEP_V4)]);
    assert!(tcp80(web, DEEP_V4));

    // A name the DNS rules allow but no toFQDNs names: resolvable, not
    // reachable.
    let a = query(
        &web.netns,
        server(false),
        "other.example.test.",
        RecordType::A,
        false,
    )
    .unwrap();
    assert_eq!(a.addresses, vec![ip(OTHER_V4)]);
    assert!(
        !tcp80(web, OTHER_V4),
        "no toFQDNs rule names other.example.test"
    );

    // A name outside the DNS rules: REFUSED by the proxy, and its address
    // stays denied.
    let a = query(
        &web.netns,
        server(false),
        "x.blocked.test.",
        RecordType::A,
        false,
    )
    .unwrap();
    assert_eq!(a.rcode, "Query Refused", "{a:?}");
    assert!(a.addresses.is_empty());
    assert!(!tcp80(web, BLOCKED_V4));

    // A large answer: truncated over UDP, whole over TCP (through the
    // proxy too), and every address in it allowed.
    let a = query(
        &web.netns,
        server(false),
        "big.example.test.",
        RecordType::A,
        false,
    )
    .unwrap();
    assert!(a.truncated, "more than 512 bytes over UDP: {a:?}");
    // With EDNS (1232 bytes offered), whole over UDP: the OPT record passes
    // the proxy both ways, and the addresses are allowed.
    let a = query_with(
        &web.netns,
        server(false),
        "big.example.test.",
        RecordType::A,
        false,
        Some(1232),
    )
    .unwrap_or_else(|e| panic!("with EDNS: {e}\n{}", daemon_log(n)));
    assert!(!a.truncated, "fits the EDNS size: {a:?}");
    assert!(a.message.extensions().is_some(), "OPT in the answer: {a:?}");
    assert_eq!(a.addresses.len(), BIG.len(), "{a:?}");
    assert!(tcp80(web, "203.0.113.139"));
    let a = query(
        &web.netns,
        server(false),
        "big.example.test.",
        RecordType::A,
        true,
    )
    .unwrap_or_else(|e| panic!("over TCP: {e}\n{}", daemon_log(n)));
    assert_eq!(a.addresses.len(), BIG.len(), "{a:?}");
    assert!(tcp80(web, "203.0.113.100"));

    // A pod no such policy selects: its DNS is not redirected (the
    // proxy would refuse it) and nothing limits it.
    let a = query(
        &b.plain.netns,
        server(false),
        "x.blocked.test.",
        RecordType::A,
        false,
    )
    .unwrap();
    assert_eq!(a.addresses, vec![ip(BLOCKED_V4)]);
    assert!(tcp80(&b.plain, BLOCKED_V4));

    // What the proxy learned is listed, and the flow log has the queries.
    let out = n.ctl(&["get", "fqdns", "-o", "json"], None);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    for want in ["api.example.test", "www.example.test", "edge.cdn.test"] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    assert!(!names.contains(&"x.blocked.test"), "{names:?}");

    // explain names the domain and the deciding rule; so do the flows.
    let out = n.ctl(
        &[
            "explain", "--from", "app/web", "--to", API_V4, "--port", "80/TCP",
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("api.example.test")
            && text.contains("ALLOWED")
            && text.contains("PalisadeNetworkPolicy/app/web-egress"),
        "{text}"
    );
    wait_until("the DNS records in the flow log", n, || {
        let out = n.ctl(&["flows", "-o", "json"], None);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|f| {
                f["kind"] == "dns"
                    && f["dns"]["name"] == "x.blocked.test"
                    && f["verdict"] == "denied"
                    && f["dns"]["rcode"] == "Query Refused"
            })
            && text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .any(|f| {
                    f["kind"] == "flow"
                        && f["peer"]["address"] == API_V4
                        && f["peer"]["domains"][0] == "api.example.test"
                })
    });

    // learn proposes toFQDNs for what web reached by name, not addresses.
    let out = n.ctl(&["learn", "-n", "app"], None);
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", sys::describe(&out));
    assert!(
        yaml.contains("kind: PalisadeNetworkPolicy")
            && yaml.contains("toFQDNs")
            && yaml.contains("matchName: api.example.test")
            && !yaml.contains(API_V4),
        "{yaml}"
    );
    palisade::policy::parse_documents(&yaml, "learned").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
}

#[test]
fn addresses_rotate_when_their_ttl_ends_and_a_restarted_proxy_keeps_them() {
    let mut b = bed();
    let (n, web) = (&b.n, b.web.clone());
    let a = query(
        &web.netns,
        server(false),
        "api.example.test.",
        RecordType::A,
        false,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon_log(n)));
    assert_eq!(a.addresses, vec![ip(API_V4)]);
    assert!(tcp80(&web, API_V4));

    // The zone moves api.example.test (TTL 2 s) to another address.
    b.dns.stop();
    b.dns = Unbound::start(
        &n.world.as_ref().unwrap().netns,
        &n.dir.join("unbound"),
        &[WORLD_V4.parse().unwrap(), WORLD_V6.parse().unwrap()],
        ZONES,
        &zone(ROTATED_V4),
    );
    let a = query(
        &web.netns,
        server(false),
        "api.example.test.",
        RecordType::A,
        false,
    )
    .unwrap();
    assert_eq!(a.addresses, vec![ip(ROTATED_V4)]);
    assert!(tcp80(&web, ROTATED_V4), "the new address at once");
    // The old one goes when its TTL, the minimum TTL and the grace period
    // have passed (no connection uses it).
    wait_until("the old address expiring", n, || !tcp80(&web, API_V4));
    assert!(
        tcp80(&web, ROTATED_V4) || {
            // It may have expired too by now: ask again.
            query(
                &web.netns,
                server(false),
                "api.example.test.",
                RecordType::A,
                false,
            )
            .is_ok()
                && tcp80(&web, ROTATED_V4)
        }
    );

    // An address whose time is up stays allowed while a connection uses it.
    let a = query(
        &web.netns,
        server(false),
        "keep.example.test.",
        RecordType::A,
        false,
    )
    .unwrap();
    assert_eq!(a.addresses, vec![ip(KEEP_V4)]);
    let mut held = sys::in_netns(&web.netns, || {
        std::net::TcpStream::connect_timeout(
            &SocketAddr::new(ip(KEEP_V4), 80),
            Duration::from_secs(5),
        )
    })
    .expect("connect right after the answer");
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // TTL 2 s, minimum 1 s, grace 1 s, a sweep every 5 s: 12 s is past it.
    std::thread::sleep(Duration::from_secs(12));
    let fq = String::from_utf8_lossy(&n.ctl(&["get", "fqdns"], None).stdout).into_owned();
    assert!(
        fq.lines()
            .any(|l| l.contains("keep.example.test") && l.contains("expired (in use)")),
        "{fq}"
    );
    {
        use std::io::{Read, Write};
        held.write_all(b"still there\n").unwrap();
        let mut buf = [0u8; 12];
        held.read_exact(&mut buf)
            .expect("the open connection still works");
        assert_eq!(&buf, b"still there\n");
    }
    assert!(tcp80(&web, KEEP_V4), "kept while in use");
    drop(held);
    wait_until("the address going once its connection closed", n, || {
        !tcp80(&web, KEEP_V4)
    });

    // The daemon (with its proxy) killed: the pod's DNS fails, closed; the
    // pod that no such policy selects keeps resolving.
    let a = query(
        &web.netns,
        server(false),
        "www.example.test.",
        RecordType::A,
        false,
    )
    .unwrap();
    assert_eq!(a.addresses, vec![ip(EDGE_V4)]);
    n.kill_daemon();
    assert!(
        query(
            &web.netns,
            server(false),
            "www.example.test.",
            RecordType::A,
            false
        )
        .is_err(),
        "no proxy: the redirected query is dropped"
    );
    assert!(
        query(
            &b.plain.netns,
            server(false),
            "www.example.test.",
            RecordType::A,
            false
        )
        .is_ok()
    );
    // What was learned still holds without the daemon.
    assert!(tcp80(&web, EDGE_V4), "learned addresses outlive the daemon");
    n.start_daemon();
    wait_until("the restarted proxy answering", n, || {
        query(
            &web.netns,
            server(false),
            "www.example.test.",
            RecordType::A,
            false,
        )
        .is_ok()
    });
    assert!(tcp80(&web, EDGE_V4));
}

/// A ClusterNetworkPolicy's `domainNames` (`*.` = one or more labels)
/// accept what the names resolve to, before a Deny of everything else.
#[test]
fn cluster_network_policy_domain_names_accept_what_the_names_resolve_to() {
    let b = bed();
    let (n, web2) = (&b.n, n_pod(&b));
    n.apply(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: egress-allowlist}
spec:
  tier: Admin
  priority: 10
  subject:
    pods:
      namespaceSelector: {}
      podSelector: {matchLabels: {app: web2}}
  egress:
  - name: allowed-domains
    action: Accept
    to:
    - domainNames: ["*.cdn.test", "other.example.test"]
    protocols: [{tcp: {destinationPort: {number: 80}}}]
  - name: dns
    action: Accept
    to: [{networks: [203.0.113.10/32]}]
    protocols: [{udp: {destinationPort: {number: 53}}}]
  - name: nothing-else
    action: Deny
    to: [{networks: [0.0.0.0/0, "::/0"]}]
"#,
    );
    assert!(!tcp80(&web2, EDGE_V4), "nothing learned yet");
    // www.example.test is a CNAME to edge.cdn.test: `*.cdn.test` names it.
    let a = query(
        &web2.netns,
        server(false),
        "www.example.test.",
        RecordType::A,
        false,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon_log(n)));
    assert_eq!(a.addresses, vec![ip(EDGE_V4)]);
    assert!(tcp80(&web2, EDGE_V4), "accepted right after the answer");
    let a = query(
        &web2.netns,
        server(false),
        "other.example.test.",
        RecordType::A,
        false,
    )
    .unwrap();
    assert_eq!(a.addresses, vec![ip(OTHER_V4)]);
    assert!(tcp80(&web2, OTHER_V4));
    // Resolvable (no DNS rules), but no domain name of the policy: denied.
    let a = query(
        &web2.netns,
        server(false),
        "api.example.test.",
        RecordType::A,
        false,
    )
    .unwrap();
    assert_eq!(a.addresses, vec![ip(API_V4)]);
    assert!(
        !tcp80(&web2, API_V4),
        "denied by the Deny after the domainNames rule"
    );
    let out = n.ctl(
        &[
            "explain", "--from", "app/web2", "--to", OTHER_V4, "--port", "80/TCP",
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("other.example.test")
            && text.contains("ClusterNetworkPolicy/egress-allowlist"),
        "{text}"
    );
}

/// A third pod, labelled app=web2.
#[test]
fn http_rules_on_a_to_fqdns_rule_judge_each_request_to_the_learned_addresses() {
    let b = bed();
    let (n, web) = (&b.n, &b.web);
    let world = &n.world.as_ref().unwrap().netns;
    let _http = HttpServer::start(&world.path, &[8080]);
    n.apply(
        r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {name: shop-http, namespace: app}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - toFQDNs: [{matchName: shop.example.test}]
    ports:
    - port: 8080
      rules:
        http:
        - method: GET
          path: "/books(/.*)?"
          host: 'shop\.example\.test(:8080)?'
"#,
    );
    let reqs = |host: &str| {
        [
            Req::new("GET", "/books/1").header("host", host),
            Req::new("DELETE", "/books/1").header("host", host),
            Req::new("GET", "/books/1").header("host", "other.example.test"),
        ]
    };
    for (qtype, addr, v6) in [
        (RecordType::A, SHOP_V4, false),
        (RecordType::AAAA, SHOP_V6, true),
    ] {
        // Nothing learned: no connection.
        assert!(
            exchange(
                &web.netns,
                ip(addr),
                8080,
                &reqs("shop.example.test")[..1],
                PROBE_TIMEOUT
            )
            .is_err(),
            "{addr}: nothing learned yet, the connection must be refused"
        );
        let a = query(&web.netns, server(v6), "shop.example.test.", qtype, false)
            .unwrap_or_else(|e| panic!("{qtype} shop.example.test: {e}\n{}", daemon_log(n)));
        assert_eq!(a.addresses, vec![ip(addr)]);
        wait_until(
            &format!("{addr}: GET 200, DELETE 403, another host 403"),
            n,
            || {
                let r = exchange(
                    &web.netns,
                    ip(addr),
                    8080,
                    &reqs("shop.example.test"),
                    PROBE_TIMEOUT,
                );
                let Ok(r) = r else { return false };
                let ok = r.iter().map(|x| x.status).collect::<Vec<_>>() == [200, 403, 403];
                if ok {
                    assert_eq!(
                        r[0].body.trim(),
                        format!("GET /books/1 from {}", web.addr(v6)),
                        "the server sees the pod's own address"
                    );
                    assert!(
                        r[1].header("x-palisade-policy")
                            .is_some_and(|p| p.contains("shop-http")),
                        "the 403 names the policy: {:?}",
                        r[1]
                    );
                }
                ok
            },
        );
    }
    // A port of the learned address the rule does not name stays closed.
    assert!(
        !probe(&web.netns, ip(SHOP_V4), Proto::Tcp, 8081, PROBE_TIMEOUT),
        "port 8081 of shop.example.test is not allowed"
    );
}

fn n_pod(b: &Bed) -> std::sync::Arc<Pod> {
    let p = b.n.add_pod("app", "web2", &[]);
    b.n.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web2, namespace: app, labels: {app: web2}}\nspec: {containers: [{name: c}]}\n",
    );
    p
}

#[test]
fn bad_policies_are_refused_with_the_field_to_fix() {
    let n = Node::new(NodeOptions::default());
    let out = n.ctl(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: palisade.io/v1alpha1\nkind: PalisadeNetworkPolicy\nmetadata: {name: p}\nspec:\n  egress:\n  - toFQDNs: [{matchName: 'bad*.example.test'}]\n",
        ),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.egress[0].toFQDNs[0].matchName") && err.contains("matchPattern"),
        "{err}"
    );
    let st: Value = serde_json::from_slice(
        &n.ctl(&["get", "palisadenetworkpolicies", "-o", "json"], None)
            .stdout,
    )
    .unwrap();
    assert_eq!(st["items"].as_array().unwrap().len(), 0, "nothing applied");
    let out = n.ctl(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: c}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress:\n  - {name: r, action: Deny, to: [{domainNames: [a.example.test]}]}\n",
        ),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.egress[0].action") && err.contains("Accept"),
        "{err}"
    );
}
