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
    // (Not /sys/class/net: sysfs shows the namespace that mounted it.)
    let out = std::process::Command::new("ip")
        .args(["-n", ns_name(pod), "-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let hex = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {text}"));
    let mut m = [0u8; 6];
    for (i, b) in hex.split(':').enumerate() {
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

/// Send `count` crafted IPv4 packets from `pod` to `dst` on a raw socket,
/// each a new flow: UDP datagrams and TCP SYNs, source port and
/// destination port varied. Returns how many the kernel took.
fn flood(pod: &Pod, dst: Ipv4Addr, count: u32) -> u32 {
    use testbed::pkt::{L4, ip_packet};
    let IpAddr::V4(src) = pod.addr(false) else {
        panic!()
    };
    in_netns(&pod.netns, || {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(socket2::Protocol::from(255))).unwrap();
        let to: socket2::SockAddr = SocketAddr::new(IpAddr::V4(dst), 0).into();
        let mut sent = 0;
        for i in 0..count {
            let sport = 1024 + (i % 64_000) as u16;
            let dport = 1 + (i / 64_000) as u16;
            let l4 = if i % 2 == 0 {
                L4::Udp { sport, dport }
            } else {
                L4::Tcp {
                    sport,
                    dport,
                    flags: 0x02,
                }
            };
            let p = ip_packet(IpAddr::V4(src), IpAddr::V4(dst), &l4);
            if s.send_to(&p, &to).is_ok() {
                sent += 1;
            }
        }
        sent
    })
}

/// Send `count` first fragments of UDP datagrams (each a new datagram id,
/// never completed) from `pod` to `dst` on a raw socket.
fn fragment_flood(pod: &Pod, dst: Ipv4Addr, count: u32) -> u32 {
    use testbed::pkt::{Frag, L4, ip_packet_frag};
    let IpAddr::V4(src) = pod.addr(false) else {
        panic!()
    };
    in_netns(&pod.netns, || {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(socket2::Protocol::from(255))).unwrap();
        let to: socket2::SockAddr = SocketAddr::new(IpAddr::V4(dst), 0).into();
        let mut sent = 0;
        for i in 0..count {
            let l4 = L4::Udp {
                sport: 1024 + (i % 60_000) as u16,
                dport: 53,
            };
            let frag = Frag {
                id: i,
                offset: 0,
                more: true,
            };
            let p = ip_packet_frag(IpAddr::V4(src), IpAddr::V4(dst), &l4, Some(frag));
            if s.send_to(&p, &to).is_ok() {
                sent += 1;
            }
        }
        sent
    })
}

/// A 4000-byte UDP datagram (three fragments each way) echoed by `to`.
fn fragmented_echo(from: &Pod, to: SocketAddr) -> bool {
    in_netns(&from.netns, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let big = vec![0x5au8; 4000];
        s.send_to(&big, to).unwrap();
        let mut buf = vec![0u8; 8000];
        matches!(s.recv_from(&mut buf), Ok((4000, _)))
    })
}

/// An echo round trip on an open connection.
fn echo(c: &mut std::net::TcpStream) -> bool {
    use std::io::{BufRead, BufReader, Write};
    if c.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(&*c).read_line(&mut line).is_ok() && line == "ping\n"
}

/// One endpoint's conntrack table for `direction` in `palisadectl status`.
fn budget_of(n: &Node, pod: &str, direction: &str) -> serde_json::Value {
    let out = n.ctl(&["status", "-o", "json"], None);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = st["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == pod)
        .unwrap_or_else(|| panic!("{pod} in {st}"))["id"]
        .clone();
    st["datapath"]["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["epId"] == id && b["direction"] == direction)
        .unwrap_or_else(|| panic!("{pod} {direction} budget in {st}"))
        .clone()
}

/// Pods whose flow records name `pod` as the endpoint, allowed, to `port`.
fn allowed_records(n: &Node, pod: &str, port: u16) -> usize {
    let out = n.ctl(&["flows", "-o", "json", "--pod", pod], None);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "flow" && v["verdict"] == "allowed" && v["dport"] == port)
        .count()
}

#[test]
fn a_container_flooding_new_flows_breaks_no_other_containers_connections() {
    let n = Node::new(NodeOptions {
        daemon: true,
        ..Default::default()
    });
    let server = n.add_pod("x", "server", &[80]);
    let victim = n.add_pod("x", "victim", &[]);
    let host = n.add_pod("x", "host", &[80]);
    let client = n.add_pod("x", "client", &[]);
    let flooder = n.add_pod("x", "flooder", &[]);
    let sink = n.add_pod("x", "sink", &[]);
    for (p, app) in [
        (&server, "server"),
        (&victim, "victim"),
        (&host, "host"),
        (&client, "client"),
        (&flooder, "flooder"),
        (&sink, "sink"),
    ] {
        n.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: x, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c}}]}}\n",
            p.name
        ));
    }
    // The victim accepts nothing: the replies to its own connections pass
    // only as long as its conntrack entries live. The host accepts TCP 80
    // from the client only.
    n.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: victim-closed, namespace: x}
spec:
  podSelector: {matchLabels: {app: victim}}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: host-in, namespace: x}
spec:
  podSelector: {matchLabels: {app: host}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#,
    );
    let to_server = SocketAddr::new(server.addr(false), 80);
    let mut held: Vec<std::net::TcpStream> = in_netns(&victim.netns, || {
        (0..100)
            .map(|_| {
                let c = std::net::TcpStream::connect_timeout(&to_server, Duration::from_secs(2))
                    .unwrap();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                c
            })
            .collect()
    });
    assert!(
        held.iter_mut().all(echo),
        "100 connections open and echoing"
    );
    assert!(
        !tcp80(&flooder, host.addr(false)),
        "denied before the flood"
    );

    // Meanwhile: the victims' new allowed connections, over and over.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tries = |from: std::sync::Arc<Pod>, to: IpAddr| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if probe(&from.netns, to, Proto::Tcp, 80, Duration::from_secs(2)) {
                    ok += 1;
                } else {
                    failed += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
    };
    let out_tries = tries(victim.clone(), server.addr(false));
    let in_tries = tries(client.clone(), host.addr(false));

    let IpAddr::V4(sink4) = sink.addr(false) else {
        panic!()
    };
    let sent = flood(&flooder, sink4, 1_000_000);
    assert_eq!(sent, 1_000_000, "the flood was sent");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (out_ok, out_failed) = out_tries.join().unwrap();
    let (in_ok, in_failed) = in_tries.join().unwrap();

    let spent = budget_of(&n, "flooder", "egress");
    assert_eq!(
        spent["flows"], spent["budget"],
        "the flooder's table is full: {spent}"
    );
    assert!(
        spent["refused"].as_u64().unwrap() > 900_000,
        "its flood beyond the budget was refused: {spent}"
    );
    let text = String::from_utf8_lossy(&n.ctl(&["status"], None).stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.contains("x/flooder") && l.contains("by it (egress)") && l.contains("FULL")),
        "status names the flooder at its limit:\n{text}"
    );
    for (i, c) in held.iter_mut().enumerate() {
        assert!(
            echo(c),
            "the victim's held connection {i} survived the flood"
        );
    }
    assert!(out_ok > 0 && in_ok > 0, "tried during the flood");
    assert_eq!(
        (out_failed, in_failed),
        (0, 0),
        "no new allowed connection failed during the flood ({out_ok} and {in_ok} succeeded)"
    );
    assert!(
        tcp80(&victim, server.addr(false)),
        "a new connection after it"
    );
    assert!(
        tcp80(&client, host.addr(false)),
        "a new inbound one after it"
    );
    assert!(!tcp80(&flooder, host.addr(false)), "denied stays denied");
    assert!(
        !tcp80(&sink, victim.addr(false)),
        "the closed victim stays closed"
    );
    assert!(
        !tcp80(&flooder, server.addr(false)),
        "the flooder's own new flows are refused while its table is full"
    );

    // A fragment flood: first fragments of datagrams that never complete,
    // each a new id, while the victim's fragmented datagrams (three
    // fragments each way) are echoed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let echoes = {
        let (stop, victim) = (stop.clone(), victim.clone());
        let to = SocketAddr::new(server.addr(false), 80);
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if fragmented_echo(&victim, to) {
                    ok += 1;
                } else {
                    failed += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
    };
    assert_eq!(fragment_flood(&flooder, sink4, 300_000), 300_000);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = echoes.join().unwrap();
    assert!(ok > 0, "echoed during the fragment flood");
    assert_eq!(
        failed, 0,
        "every fragmented datagram of the victim passed during the fragment flood ({ok} did)"
    );
    assert!(fragmented_echo(
        &victim,
        SocketAddr::new(server.addr(false), 80)
    ));

    testbed::runtimes::wait_for(
        "the victims' flow records after the flood",
        Duration::from_secs(60),
        || allowed_records(&n, "x/victim", 80) > 100 && allowed_records(&n, "x/client", 80) > 0,
    );
}

/// ICMP destination-unreachable errors (type 3) from `from` that reach a
/// raw ICMP socket in `pod` while `send` runs.
fn unreachables_seen(pod: &Pod, from: Ipv4Addr, send: impl FnOnce()) -> usize {
    let s = in_netns(&pod.netns, || {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(socket2::Protocol::ICMPV4)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s
    });
    send();
    let mut seen = 0;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    while let Ok(n) = s.recv(&mut buf) {
        // SAFETY: recv initialised the first n bytes.
        let b: Vec<u8> = buf[..n]
            .iter()
            .map(|x| unsafe { x.assume_init() })
            .collect();
        let ihl = usize::from(b[0] & 0x0f) * 4;
        if b[12..16] == from.octets() && b.get(ihl) == Some(&3) {
            seen += 1;
        }
    }
    seen
}

/// A "host unreachable" error about the TCP packet `quoted_src` →
/// `quoted_dst` (as its sender sent it), sent by `pod` to `quoted_src`.
fn send_unreachable(pod: &Pod, quoted_src: SocketAddr, quoted_dst: SocketAddr) {
    use testbed::pkt::{L4, ip_packet};
    let (SocketAddr::V4(qs), SocketAddr::V4(qd)) = (quoted_src, quoted_dst) else {
        panic!()
    };
    let quoted = ip_packet(
        IpAddr::V4(*qs.ip()),
        IpAddr::V4(*qd.ip()),
        &L4::Tcp {
            sport: qs.port(),
            dport: qd.port(),
            flags: 0x18,
        },
    );
    let IpAddr::V4(me) = pod.addr(false) else {
        panic!()
    };
    let p = ip_packet(
        IpAddr::V4(me),
        IpAddr::V4(*qs.ip()),
        &L4::Unreachable { inner: quoted },
    );
    in_netns(&pod.netns, || {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(socket2::Protocol::from(255))).unwrap();
        let to: socket2::SockAddr = SocketAddr::new(IpAddr::V4(*qs.ip()), 0).into();
        for _ in 0..3 {
            s.send_to(&p, &to).unwrap();
        }
    });
}

#[test]
fn an_icmp_error_forged_by_a_third_container_about_anothers_flow_is_not_related() {
    let n = Node::new(NodeOptions::default());
    let [victim, friend, attacker] = pods(&n);
    // The victim (ingress: TCP 80 from the friend only) connects to the
    // friend: the flow its error could be about.
    let to_friend = SocketAddr::new(friend.addr(false), 80);
    let conn = in_netns(&victim.netns, || {
        std::net::TcpStream::connect_timeout(&to_friend, Duration::from_secs(2)).unwrap()
    });
    let local = conn.local_addr().unwrap();
    let IpAddr::V4(f4) = friend.addr(false) else {
        panic!()
    };
    let IpAddr::V4(a4) = attacker.addr(false) else {
        panic!()
    };
    // From the flow's peer, the error is related and arrives.
    let from_peer = unreachables_seen(&victim, f4, || {
        send_unreachable(&friend, local, to_friend);
    });
    assert!(from_peer > 0, "an error from the flow's peer arrives");
    // From a third container, quoting the same flow exactly, it does not.
    let forged = unreachables_seen(&victim, a4, || {
        send_unreachable(&attacker, local, to_friend);
    });
    assert_eq!(forged, 0, "an error forged by a third container is dropped");
    drop(conn);
}

/// The name of the node's bridge.
fn bridge(n: &Node) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", &n.netns.name, "-o", "link", "show", "type", "bridge"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(1)
        .map(|s| s.trim().to_owned())
        .expect("the node has a bridge")
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Frames with destination `dst` that a packet socket on `pod`'s eth0 (in
/// promiscuous mode) sees while `run` runs.
fn frames_to(pod: &Pod, dst: [u8; 6], run: impl FnOnce()) -> usize {
    ip_in(pod, &["link", "set", "eth0", "promisc", "on"]);
    let fd = in_netns(&pod.netns, || {
        // SAFETY: a raw packet socket for every protocol.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(fd >= 0, "AF_PACKET socket");
        fd
    });
    run();
    std::thread::sleep(Duration::from_millis(200));
    let mut seen = 0;
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: reading into a buffer we own, with its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            break;
        }
        if n >= 6 && buf[..6] == dst {
            seen += 1;
        }
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    ip_in(pod, &["link", "set", "eth0", "promisc", "off"]);
    seen
}

#[test]
fn a_container_using_another_containers_mac_reaches_nothing_and_sees_nothing_of_it() {
    let n = Node::new(NodeOptions::default());
    let [victim, friend, attacker] = pods(&n);
    let v = victim.addr(false);
    assert!(tcp80(&friend, v));
    assert!(tcp80(&attacker, friend.addr(false)), "an open pod, before");

    // The attacker takes the victim's MAC.
    let own = mac_of(&attacker);
    let victims = mac_of(&victim);
    ip_in(
        &attacker,
        &["link", "set", "eth0", "address", &mac_text(victims)],
    );
    assert!(
        !tcp80(&attacker, friend.addr(false)),
        "from another container's MAC, the attacker reaches nothing"
    );
    assert!(
        tcp80(&friend, v),
        "the victim's traffic still goes to the victim (the bridge learnt nothing from the attacker)"
    );
    ip_in(
        &attacker,
        &["link", "set", "eth0", "address", &mac_text(own)],
    );
    // (Its neighbour entries failed meanwhile: they are resolved again.)
    ip_in(&attacker, &["neigh", "flush", "dev", "eth0"]);
    testbed::runtimes::wait_for(
        "the attacker's own MAC to work again",
        Duration::from_secs(10),
        || tcp80(&attacker, friend.addr(false)),
    );

    // A bridge that learns nothing floods every frame to every port: the
    // frames for the victim are not delivered to the attacker.
    let br = bridge(&n);
    sys::ip(&[
        "-n",
        &n.netns.name,
        "link",
        "set",
        &br,
        "type",
        "bridge",
        "ageing_time",
        "0",
    ]);
    let seen = frames_to(&attacker, victims, || {
        for _ in 0..5 {
            assert!(tcp80(&friend, v), "the victim's allowed traffic goes on");
        }
    });
    assert_eq!(
        seen, 0,
        "the attacker's veth delivered none of the victim's frames"
    );
}

#[test]
fn a_container_advertising_another_containers_ipv6_address_poisons_nothing() {
    let n = Node::new(NodeOptions {
        ipv6: true,
        ..Default::default()
    });
    let [victim, friend, attacker] = pods(&n);
    let v6 = victim.addr(true);
    let _ = probe(&n.netns.path, v6, Proto::Tcp, 80, PROBE_TIMEOUT);
    let before = node_neigh(&n, v6).expect("the node has a neighbour entry for the victim");
    let IpAddr::V6(target) = v6 else { panic!() };
    let mine = mac_of(&attacker);
    // Unsolicited neighbour advertisements, override flag set: "the
    // victim's address is at my MAC", to all nodes.
    let mut na = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    na.extend_from_slice(&target.octets());
    na.extend_from_slice(&[2, 1]);
    na.extend_from_slice(&mine);
    in_netns(&attacker.netns, || {
        let s = Socket::new(Domain::IPV6, Type::RAW, Some(socket2::Protocol::ICMPV6)).unwrap();
        s.set_multicast_hops_v6(255).unwrap();
        let ifindex = nix::net::if_::if_nametoindex("eth0").unwrap();
        s.set_multicast_if_v6(ifindex).unwrap();
        let all: std::net::SocketAddrV6 =
            std::net::SocketAddrV6::new("ff02::1".parse().unwrap(), 0, 0, ifindex);
        for _ in 0..5 {
            s.send_to(&na, &all.into()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    assert_eq!(
        node_neigh(&n, v6).as_deref(),
        Some(before.as_str()),
        "the node still sends the victim's IPv6 traffic to the victim"
    );
    assert!(
        probe(&friend.netns, v6, Proto::Tcp, 80, PROBE_TIMEOUT),
        "the victim's allowed IPv6 traffic goes on"
    );
}
