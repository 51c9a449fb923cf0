//! Stateful behaviour with real traffic on hermetic nodes: how fast changes
//! take effect, what happens to open connections, ICMP errors, fragments,
//! the node's own traffic, and where labels come from.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use testbed::{
    node::{GATEWAY_V4, Node, NodeOptions, Pod},
    probe::{PROBE_TIMEOUT, Proto, probe},
    sys::{describe, in_netns},
};

fn node() -> Node {
    Node::new(NodeOptions::default())
}

fn tcp_ok(from: &Pod, to: &Pod, port: u16) -> bool {
    probe(&from.netns, to.addr(false), Proto::Tcp, port, PROBE_TIMEOUT)
}

/// `palisadectl apply` and `delete` return only after the maps are synced,
/// so the first connection attempted after each command already sees the
/// new verdict. (How long the commands take is measured in `bench/`, not
/// asserted here: a loaded CI machine would fail a wall-clock limit.)
#[test]
fn every_kind_of_change_takes_effect_on_running_containers_when_the_command_returns() {
    let n = node();
    // Containers start with no Pod objects: no labels yet.
    let api = n.add_pod("shop", "api", &[80]);
    let web = n.add_pod("shop", "web", &[80]);
    let other = n.add_pod("other", "client", &[80]);
    assert!(tcp_ok(&web, &api, 80));

    n.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {role: api}}
  ingress:
  - from:
    - podSelector: {matchLabels: {role: web}}
    - namespaceSelector: {matchLabels: {trusted: "yes"}}
"#,
    );
    assert!(tcp_ok(&web, &api, 80), "nobody is labelled role=api yet");

    n.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: api, namespace: shop, labels: {role: api}}\nspec: {containers: [{name: c}]}\n",
    );
    assert!(
        !tcp_ok(&web, &api, 80),
        "api is now isolated and web is not labelled"
    );

    n.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {role: web}}\nspec: {containers: [{name: c}]}\n",
    );
    assert!(tcp_ok(&web, &api, 80), "web now matches the rule");
    assert!(!tcp_ok(&other, &api, 80));

    n.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other, labels: {trusted: \"yes\"}}\n",
    );
    assert!(tcp_ok(&other, &api, 80), "namespace other is trusted now");

    n.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {role: api}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: web}}}]
    ports: [{port: 81}]
"#,
    );
    assert!(!tcp_ok(&web, &api, 80), "only port 81 is allowed now");
    assert!(!tcp_ok(&other, &api, 80));

    n.delete("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: api, namespace: shop}\n");
    assert!(
        tcp_ok(&web, &api, 80) && tcp_ok(&other, &api, 80),
        "no policy: open again"
    );
}

#[test]
fn an_open_connection_is_cut_when_policy_stops_allowing_it() {
    let n = node();
    let server = n.add_pod("default", "server", &[80]);
    let client = n.add_pod("default", "client", &[]);
    let addr = SocketAddr::new(server.addr(false), 80);
    in_netns(&client.netns, || {
        let mut conn =
            TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).expect("connect before any policy");
        conn.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        let mut buf = [0u8; 5];
        conn.write_all(b"hello").unwrap();
        conn.read_exact(&mut buf)
            .expect("echo on the open connection");
        n.apply(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny}\nspec:\n  podSelector: {}\n",
        );
        let _ = conn.write_all(b"again");
        let got = conn.read(&mut buf);
        assert!(
            !matches!(got, Ok(5)),
            "the established connection still carried data after a deny-all policy: {got:?}"
        );
    });
}

#[test]
fn icmp_errors_reach_a_client_whose_ingress_is_closed() {
    let n = node();
    let server = n.add_pod("default", "server", &[80]);
    let client = n.add_pod("default", "client", &[]);
    n.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Ingress, Egress]
  egress: [{ports: [{port: 9999, protocol: UDP}]}]
"#,
    );
    // Nothing listens on UDP 9999: the server's kernel answers "port
    // unreachable", which must pass the client's closed ingress as related.
    let target = SocketAddr::new(server.addr(false), 9999);
    let err = in_netns(&client.netns, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(target).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send(b"anyone?").unwrap();
        let mut buf = [0u8; 16];
        s.recv(&mut buf).expect_err("nobody answers UDP 9999")
    });
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the ICMP port-unreachable error should arrive (got {err:?})"
    );
    // And a ping from the server to the client stays blocked.
    assert!(!probe(
        &server.netns,
        client.addr(false),
        Proto::Icmp,
        0,
        PROBE_TIMEOUT
    ));
}

#[test]
fn fragmented_udp_datagrams_are_judged_like_their_first_fragment() {
    let n = node();
    let server = n.add_pod("default", "server", &[80]);
    let friend = n.add_pod("default", "friend", &[]);
    let stranger = n.add_pod("default", "stranger", &[]);
    n.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: friend, labels: {app: friend}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server}
spec:
  podSelector: {}
  ingress:
  - from: [{podSelector: {matchLabels: {app: friend}}}]
    ports: [{port: 80, protocol: UDP}]
"#,
    );
    let big = vec![0x5au8; 4000]; // three fragments at MTU 1500
    let echo = |from: &Pod| {
        let target = SocketAddr::new(server.addr(false), 80);
        let big = big.clone();
        in_netns(&from.netns, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(700)))
                .unwrap();
            for _ in 0..3 {
                s.send_to(&big, target).unwrap();
                let mut buf = vec![0u8; 8000];
                if let Ok((got, _)) = s.recv_from(&mut buf) {
                    return got;
                }
            }
            0
        })
    };
    assert_eq!(
        echo(&friend),
        4000,
        "the friend's 4000-byte datagram and its echo pass in fragments"
    );
    assert_eq!(echo(&stranger), 0, "the stranger's fragments are dropped");
}

#[test]
fn the_node_reaches_isolated_pods_and_they_reach_it() {
    let n = node();
    let pod = n.add_pod("default", "locked", &[80]);
    n.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    );
    assert!(
        probe(
            &n.netns.path,
            pod.addr(false),
            Proto::Tcp,
            80,
            PROBE_TIMEOUT
        ),
        "a kubelet-style probe from the node must pass default deny"
    );
    assert!(probe(
        &n.netns.path,
        pod.addr(false),
        Proto::Icmp,
        0,
        PROBE_TIMEOUT
    ));
    assert!(
        probe(
            &pod.netns,
            GATEWAY_V4.parse().unwrap(),
            Proto::Icmp,
            0,
            PROBE_TIMEOUT
        ),
        "the pod reaches its node"
    );
    let other = n.add_pod("default", "other", &[80]);
    assert!(!tcp_ok(&other, &pod, 80), "but not other pods");
}

#[test]
fn explain_names_the_deciding_policy_and_agrees_with_the_datapath() {
    let n = node();
    let _api = n.add_pod("default", "api", &[80]);
    let _front = n.add_pod("default", "frontend", &[80]);
    let _coffee = n.add_pod("default", "coffee", &[80]);
    n.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: api, labels: {app: bookstore, role: api}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, labels: {app: bookstore, role: frontend}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: coffee, labels: {app: coffeeshop}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-allow}
spec:
  podSelector: {matchLabels: {app: bookstore, role: api}}
  ingress: [{from: [{podSelector: {matchLabels: {app: bookstore}}}]}]
"#,
    );
    let out = n.ctl(
        &[
            "explain",
            "--from",
            "default/coffee",
            "--to",
            "default/api",
            "--port",
            "80/TCP",
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text.contains("DENIED") && text.contains("default/api-allow"),
        "{text}"
    );
    assert!(
        text.contains("datapath ingress") && !text.contains("DISAGREES"),
        "{text}"
    );
    let out = n.ctl(
        &[
            "explain", "--from", "frontend", "--to", "api", "--port", "80", "-o", "json",
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["verdict"], "allowed", "{v}");
    assert_eq!(
        v["ingress"]["allowedBy"][0]["policy"], "default/api-allow",
        "{v}"
    );
    assert!(
        v["datapath"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["agrees"] == true),
        "{v}"
    );
}
