//! A container that attacks its neighbours with its own network stack, with
//! real traffic on the hermetic node: it sends from another container's
//! address, changes its own address inside its namespace, and announces
//! another container's address over ARP. Each attempt is dropped at its
//! veth (reason "sent from an address the container does not own", in the
//! flow records), and the victim's traffic goes on. (Without palisade on
//! its veth, the same ARP announcement from a container on the bridge does
//! rewrite the node's neighbour entry for the victim: checked by hand when
//! the test was written.)

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use testbed::{
    node::{Node, NodeOptions, Pod},
    probe::{PROBE_TIMEOUT, Proto, probe},
    sys::{self, in_netns},
};

/// The victim accepts TCP 80 from `app=friend` only.
const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: victim-in, namespace: x}
spec:
  podSelector: {matchLabels: {app: victim}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: friend}}}]
    ports: [{port: 80}]
"#;

fn pods(n: &Node) -> [std::sync::Arc<Pod>; 3] {
    let victim = n.add_pod("x", "victim", &[80]);
    let friend = n.add_pod("x", "friend", &[80]);
    let attacker = n.add_pod("x", "attacker", &[80]);
    for (p, app) in [
        (&victim, "victim"),
        (&friend, "friend"),
        (&attacker, "attacker"),
    ] {
        n.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: x, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c}}]}}\n",
            p.name
        ));
    }
    n.apply(POLICY);
    [victim, friend, attacker]
}

fn tcp80(from: &Pod, to: IpAddr) -> bool {
    probe(&from.netns, to, Proto::Tcp, 80, PROBE_TIMEOUT)
}

/// A TCP connect from `netns` with source address `src`.
fn connect_from(netns: &Path, src: IpAddr, to: IpAddr) -> bool {
    in_netns(netns, || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(src, 0).into()).unwrap();
        s.connect_timeout(&SocketAddr::new(to, 80).into(), Duration::from_secs(2))
            .is_ok()
    })
}

fn ip_in(pod: &Pod, args: &[&str]) {
    let mut a = vec!["-n", ns_name(pod)];
    a.extend_from_slice(args);
    sys::ip(&a);
}

/// `ip -n` takes a name: the pod's namespace file name under /run/netns.
fn ns_name(pod: &Pod) -> &str {
    pod.netns.file_name().unwrap().to_str().unwrap()
}

/// Drop records of packets the attacker sent from an address it does not
/// own (the daemon's flow log).
fn spoofed_records(n: &Node) -> usize {
    let out = n.ctl(&["flows", "-o", "json", "--pod", "x/attacker"], None);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["kind"] == "drop" && v["reason"] == "sent from an address the container does not own"
        })
        .count()
}

/// The pod network's gateway (the node's bridge address).
fn gateway(pod: &Pod) -> String {
    pod.result["ips"][0]["gateway"]
        .as_str()
        .expect("the bridge plugin reports the gateway")
        .to_owned()
}

#[test]
fn a_container_sending_from_another_containers_address_reaches_nothing() {
    let n = Node::new(NodeOptions::default());
    let [victim, friend, attacker] = pods(&n);
    let v = victim.addr(false);
    assert!(tcp80(&friend, v), "the friend is allowed");
    assert!(!tcp80(&attacker, v), "the attacker is not");

    // The attacker takes the friend's address as a second one.
    let f = friend.addr(false);
    ip_in(
        &attacker,
        &["addr", "add", &format!("{f}/32"), "dev", "eth0"],
    );
    assert!(
        !connect_from(&attacker.netns, f, v),
        "a connection from the friend's address, sent by the attacker, is dropped"
    );
    assert!(tcp80(&friend, v), "the friend's own connections go on");
    ip_in(
        &attacker,
        &["addr", "del", &format!("{f}/32"), "dev", "eth0"],
    );
}

#[test]
fn a_container_that_changes_its_own_address_reaches_nothing_with_it() {
    let n = Node::new(NodeOptions {
        daemon: true,
        ..Default::default()
    });
    let [victim, friend, attacker] = pods(&n);
    let v = victim.addr(false);
    let own = attacker.addr(false);
    assert!(
        tcp80(&attacker, friend.addr(false)),
        "before: the attacker reaches a pod that does not isolate"
    );
    // A new address in the pod subnet that palisade did not register.
    let IpAddr::V4(o) = own else { panic!("{own}") };
    let new = IpAddr::V4(Ipv4Addr::from(u32::from(o) ^ 0x80));
    let gw = gateway(&attacker);
    let plen = attacker.result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').nth(1))
        .unwrap()
        .to_owned();
    ip_in(&attacker, &["addr", "flush", "dev", "eth0"]);
    ip_in(
        &attacker,
        &["addr", "add", &format!("{new}/{plen}"), "dev", "eth0"],
    );
    ip_in(&attacker, &["route", "replace", "default", "via", &gw]);
    assert!(
        !tcp80(&attacker, friend.addr(false)),
        "from an address it was not given, the attacker reaches nothing, not even an open pod"
    );
    assert!(!tcp80(&attacker, v));
    assert!(tcp80(&friend, v), "the victim's allowed traffic goes on");
    // Back to its own address: as before.
    ip_in(&attacker, &["addr", "flush", "dev", "eth0"]);
    ip_in(
        &attacker,
        &["addr", "add", &format!("{own}/{plen}"), "dev", "eth0"],
    );
    ip_in(&attacker, &["route", "replace", "default", "via", &gw]);
    assert!(
        tcp80(&attacker, friend.addr(false)),
        "its own address works again"
    );
    assert!(!tcp80(&attacker, v), "and policy still applies");
    let mut recorded = 0;
    testbed::runtimes::wait_for(
        "the spoofed drops in the flow records",
        Duration::from_secs(60),
        || {
            recorded = spoofed_records(&n);
            recorded >= 1
        },
    );
}

/// An ARP announcement, sent raw from `pod`'s eth0: `sender_mac` claims
/// `sender_ip`, asking for `target_ip`.
fn send_arp(pod: &Pod, sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) {
    in_netns(&pod.netns, || {
        let ifindex = nix::net::if_::if_nametoindex("eth0").unwrap();
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&sender_mac);
        f.extend_from_slice(&0x0806u16.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&sender_mac);
        f.extend_from_slice(&sender_ip.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target_ip.octets());
        f.resize(60, 0);
        // SAFETY: a raw packet socket and a sockaddr_ll we fill in whole.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET socket");
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_ifindex = ifindex as i32;
            sa.sll_halen = 6;
            sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
            let sent = libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                std::ptr::addr_of!(sa).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            libc::close(fd);
            assert_eq!(sent, f.len() as isize, "send the ARP frame");
        }
    });
}

fn mac_of(pod: &Pod) -> [u8; 6] {
    let text = in_netns(&pod.netns, || {
        std::fs::read_to_string("/sys/class/net/eth0/address").unwrap()
    });
    let mut m = [0u8; 6];
    for (i, b) in text.trim().split(':').enumerate() {
        m[i] = u8::from_str_radix(b, 16).unwrap();
    }
    m
}

/// The node's neighbour entry for `ip` (its MAC), if any.
fn node_neigh(n: &Node, ip: IpAddr) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", &n.netns.name, "neigh", "show", &ip.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .map(str::to_owned)
}

#[test]
fn a_container_announcing_another_containers_address_over_arp_poisons_nothing() {
    let n = Node::new(NodeOptions::default());
    let [victim, friend, attacker] = pods(&n);
    let v = victim.addr(false);
    let IpAddr::V4(v4) = v else { panic!() };
    // The node knows the victim's MAC (it has talked to it).
    let _ = probe(&n.netns.path, v, Proto::Tcp, 80, PROBE_TIMEOUT);
    let before = node_neigh(&n, v).expect("the node has a neighbour entry for the victim");
    let gw: Ipv4Addr = gateway(&friend).parse().unwrap();
    // The attacker says, again and again: the victim's address is at my MAC.
    let mine = mac_of(&attacker);
    for _ in 0..5 {
        send_arp(&attacker, mine, v4, gw);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        node_neigh(&n, v).as_deref(),
        Some(before.as_str()),
        "the node still sends the victim's traffic to the victim"
    );
    assert!(tcp80(&friend, v), "the victim's allowed traffic goes on");
    // The same announcement with the attacker's own address is ordinary ARP.
    let IpAddr::V4(own) = attacker.addr(false) else {
        panic!()
    };
    send_arp(&attacker, mine, own, gw);
}
