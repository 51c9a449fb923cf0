//! BPF verdicts without veths: the real programs through BPF_PROG_TEST_RUN
//! on crafted packets, maps programmed by the real compiler. The endpoint
//! under test ("me", 10.0.0.2 / fd00::2) is selected by the policies; peers
//! are other endpoints or outside addresses.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::net::IpAddr;

use palisade::abi::{
    self,
    Direction::{self, Egress, Ingress},
    Reason,
};
use testbed::{
    bpfrun::{Datapath, TEST_IFINDEX, Verdict, endpoint},
    pkt::{self, Frag, L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const ME: &str = "10.0.0.2";
const ME6: &str = "fd00::2";
const FRIEND: &str = "10.0.0.3"; // app=friend
const FRIEND6: &str = "fd00::3";
const STRANGER: &str = "10.0.0.4"; // app=stranger
const STRANGER6: &str = "fd00::4";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn endpoints() -> Vec<palisade::compile::EndpointView> {
    vec![
        endpoint(1, TEST_IFINDEX, "default", &[("app", "me")], &[ME, ME6]),
        endpoint(2, 1002, "default", &[("app", "friend")], &[FRIEND, FRIEND6]),
        endpoint(
            3,
            1003,
            "default",
            &[("app", "stranger")],
            &[STRANGER, STRANGER6],
        ),
    ]
}

/// A datapath where "me" accepts TCP 80 from friends only and may send
/// nothing but DNS (UDP 53) to anyone.
fn fixture() -> Datapath {
    let mut d = Datapath::new();
    d.program(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: me}
spec:
  podSelector: {matchLabels: {app: me}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: friend}}}]
    ports: [{port: 80}]
  egress:
  - ports: [{port: 53, protocol: UDP}]
"#,
        &endpoints(),
        &[ip("10.0.0.1")],
    );
    d
}

fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    pkt::frame(
        ip(src),
        ip(dst),
        &L4::Tcp {
            sport,
            dport,
            flags,
        },
    )
}

fn expect(d: &Datapath, dir: Direction, frame: &[u8], want: Verdict, what: &str) {
    let got = d.run(dir, frame);
    assert_eq!(
        got, want,
        "{what}: expected {want:?}, the program returned {got:?}"
    );
}

#[test]
fn ingress_from_an_allowed_peer_passes_and_others_are_dropped() {
    let d = fixture();
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 40000, 80, TCP_SYN),
        Verdict::Pass,
        "friend -> me:80",
    );
    expect(
        &d,
        Ingress,
        &tcp(STRANGER, ME, 40000, 80, TCP_SYN),
        Verdict::Drop,
        "stranger -> me:80",
    );
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 40000, 81, TCP_SYN),
        Verdict::Drop,
        "friend -> me:81",
    );
    expect(
        &d,
        Ingress,
        &tcp("192.0.2.9", ME, 40000, 80, TCP_SYN),
        Verdict::Drop,
        "world -> me:80",
    );
    let drops: u64 = d
        .counters()
        .iter()
        .filter(|c| c.verdict == abi::Verdict::Deny && c.direction == Ingress)
        .map(|c| c.packets)
        .sum();
    assert_eq!(drops, 3, "three denied packets counted: {:?}", d.counters());
}

#[test]
fn replies_pass_both_ways_but_only_for_the_flow_that_was_allowed() {
    let d = fixture();
    // Inbound connection from a friend: the reply leaves although egress
    // allows only DNS.
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 40001, 80, TCP_SYN),
        Verdict::Pass,
        "SYN in",
    );
    expect(
        &d,
        Egress,
        &tcp(ME, FRIEND, 80, 40001, TCP_SYN | TCP_ACK),
        Verdict::Pass,
        "SYN-ACK out",
    );
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 40001, 80, TCP_ACK),
        Verdict::Pass,
        "ACK in",
    );
    // Not a reply: a new connection from me to the friend's port 40001.
    expect(
        &d,
        Egress,
        &tcp(ME, FRIEND, 80, 40002, TCP_SYN),
        Verdict::Drop,
        "unrelated SYN out",
    );
    // Outbound DNS and its answer.
    let q = pkt::frame(
        ip(ME),
        ip("192.0.2.53"),
        &L4::Udp {
            sport: 5353,
            dport: 53,
        },
    );
    let a = pkt::frame(
        ip("192.0.2.53"),
        ip(ME),
        &L4::Udp {
            sport: 53,
            dport: 5353,
        },
    );
    expect(&d, Egress, &q, Verdict::Pass, "DNS query");
    expect(&d, Ingress, &a, Verdict::Pass, "DNS answer");
    // The same answer from another server is no reply.
    let spoof = pkt::frame(
        ip("192.0.2.54"),
        ip(ME),
        &L4::Udp {
            sport: 53,
            dport: 5353,
        },
    );
    expect(
        &d,
        Ingress,
        &spoof,
        Verdict::Drop,
        "answer from another address",
    );
}

#[test]
fn a_bare_syn_is_never_a_reply_and_reopens_closed_flows() {
    let d = fixture();
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 40010, 80, TCP_SYN),
        Verdict::Pass,
        "SYN in",
    );
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 40010, 80, TCP_ACK | TCP_RST),
        Verdict::Pass,
        "RST in",
    );
    // The reversed tuple as a new connection from me: egress allows only
    // DNS, so it must not pass as a "reply" of the closed inbound flow.
    expect(
        &d,
        Egress,
        &tcp(ME, FRIEND, 80, 40010, TCP_SYN),
        Verdict::Drop,
        "reversed SYN out",
    );
    // Same for an open flow.
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 40011, 80, TCP_SYN),
        Verdict::Pass,
        "SYN in",
    );
    expect(
        &d,
        Egress,
        &tcp(ME, FRIEND, 80, 40011, TCP_SYN),
        Verdict::Drop,
        "bare SYN as reply",
    );
    expect(
        &d,
        Egress,
        &tcp(ME, FRIEND, 80, 40011, TCP_SYN | TCP_ACK),
        Verdict::Pass,
        "SYN-ACK reply",
    );
    // The friend reopens its closed flow: decided anew, and still allowed.
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 40010, 80, TCP_SYN),
        Verdict::Pass,
        "friend reopens",
    );
}

#[test]
fn a_policy_change_revokes_established_flows() {
    let mut d = fixture();
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 40020, 80, TCP_SYN),
        Verdict::Pass,
        "SYN",
    );
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 40020, 80, TCP_ACK),
        Verdict::Pass,
        "established",
    );
    // Same policy, but the friend no longer matches.
    let mut eps = endpoints();
    eps[1].labels.insert("app".into(), "former-friend".into());
    d.program(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: me}
spec:
  podSelector: {matchLabels: {app: me}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: friend}}}]
    ports: [{port: 80}]
"#,
        &eps,
        &[],
    );
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 40020, 80, TCP_ACK),
        Verdict::Drop,
        "established after revocation",
    );
    let revoked = d
        .counters()
        .iter()
        .any(|c| c.verdict == abi::Verdict::Deny && c.reason == Reason::DropRevoked);
    assert!(
        revoked,
        "the drop is counted as a revocation: {:?}",
        d.counters()
    );
}

#[test]
fn icmp_errors_about_allowed_flows_are_related_and_others_are_not() {
    let d = fixture();
    // me -> 192.0.2.53:53 allowed; the peer answers port unreachable.
    let query = L4::Udp {
        sport: 5300,
        dport: 53,
    };
    expect(
        &d,
        Egress,
        &pkt::frame(ip(ME), ip("192.0.2.53"), &query),
        Verdict::Pass,
        "query",
    );
    let quoted = pkt::ip_packet(ip(ME), ip("192.0.2.53"), &query);
    let err = pkt::frame(ip("192.0.2.53"), ip(ME), &L4::Unreachable { inner: quoted });
    expect(&d, Ingress, &err, Verdict::Pass, "related port unreachable");
    // An error quoting a flow that never happened.
    let bogus = pkt::ip_packet(
        ip(ME),
        ip("192.0.2.53"),
        &L4::Udp {
            sport: 5301,
            dport: 53,
        },
    );
    let err = pkt::frame(ip("192.0.2.53"), ip(ME), &L4::Unreachable { inner: bogus });
    expect(&d, Ingress, &err, Verdict::Drop, "unrelated ICMP error");
    // IPv6: the same with ICMPv6.
    let query6 = L4::Udp {
        sport: 5302,
        dport: 53,
    };
    expect(
        &d,
        Egress,
        &pkt::frame(ip(ME6), ip("2001:db8::53"), &query6),
        Verdict::Pass,
        "v6 query",
    );
    let quoted6 = pkt::ip_packet(ip(ME6), ip("2001:db8::53"), &query6);
    let err6 = pkt::frame(
        ip("2001:db8::53"),
        ip(ME6),
        &L4::Unreachable { inner: quoted6 },
    );
    expect(&d, Ingress, &err6, Verdict::Pass, "related ICMPv6 error");
}

#[test]
fn ipv6_follows_the_same_policy() {
    let d = fixture();
    expect(
        &d,
        Ingress,
        &tcp(FRIEND6, ME6, 40000, 80, TCP_SYN),
        Verdict::Pass,
        "friend6 -> me6:80",
    );
    expect(
        &d,
        Ingress,
        &tcp(STRANGER6, ME6, 40000, 80, TCP_SYN),
        Verdict::Drop,
        "stranger6 -> me6:80",
    );
    expect(
        &d,
        Egress,
        &tcp(ME6, FRIEND6, 40000, 80, TCP_SYN),
        Verdict::Drop,
        "me6 -> friend6:80 (egress denied)",
    );
    // Echo: no rule without ports allows ICMPv6 here.
    let ping = pkt::frame(
        ip(FRIEND6),
        ip(ME6),
        &L4::Echo {
            request: true,
            id: 9,
        },
    );
    expect(&d, Ingress, &ping, Verdict::Drop, "ping6 from friend");
    // Neighbour discovery is never governed.
    let ns = pkt::frame(ip(STRANGER6), ip(ME6), &L4::NeighbourSolicit);
    expect(&d, Ingress, &ns, Verdict::Pass, "neighbour solicitation");
}

#[test]
fn port_range_edges() {
    let mut d = Datapath::new();
    d.program(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: range}
spec:
  podSelector: {matchLabels: {app: me}}
  ingress:
  - ports: [{port: 1000, endPort: 2000, protocol: TCP}, {port: 65535, protocol: SCTP}]
"#,
        &endpoints(),
        &[],
    );
    for (port, want) in [
        (999, Verdict::Drop),
        (1000, Verdict::Pass),
        (1024, Verdict::Pass),
        (1999, Verdict::Pass),
        (2000, Verdict::Pass),
        (2001, Verdict::Drop),
    ] {
        expect(
            &d,
            Ingress,
            &tcp(STRANGER, ME, 50000, port, TCP_SYN),
            want,
            &format!("TCP {port}"),
        );
    }
    let udp = pkt::frame(
        ip(STRANGER),
        ip(ME),
        &L4::Udp {
            sport: 5,
            dport: 1500,
        },
    );
    expect(&d, Ingress, &udp, Verdict::Drop, "UDP 1500 (range is TCP)");
    let sctp = |port| {
        pkt::frame(
            ip(STRANGER),
            ip(ME),
            &L4::Sctp {
                sport: 5,
                dport: port,
            },
        )
    };
    expect(&d, Ingress, &sctp(65535), Verdict::Pass, "SCTP 65535");
    expect(&d, Ingress, &sctp(65534), Verdict::Drop, "SCTP 65534");
}

/// Every entry shape (one port, port range, all ports of a protocol, all
/// protocols), for a named peer, an ipBlock and any peer, on one endpoint;
/// the program and `explain`'s map lookup give the same answer.
#[test]
fn every_rule_shape_is_found_and_explain_agrees_with_the_program() {
    use palisade::dataplane::{Dataplane, Lookup};
    let mut d = Datapath::new();
    d.program(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: shapes}
spec:
  podSelector: {matchLabels: {app: me}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: friend}}}]
    ports: [{port: 80}]
  - from: [{podSelector: {matchLabels: {app: friend}}}]
    ports: [{port: 8000, endPort: 8999, protocol: TCP}]
  - from: [{podSelector: {matchLabels: {app: friend}}}]
    ports: [{protocol: UDP}]
  - from: [{ipBlock: {cidr: 192.0.2.0/24}}]
  - from: [{ipBlock: {cidr: 10.0.0.4/32}}]
    ports: [{protocol: SCTP}]
  - ports: [{port: 443}]
"#,
        &endpoints(),
        &[],
    );
    let cases: &[(&str, L4, bool)] = &[
        (FRIEND, tcp_syn(80), true),
        (FRIEND, tcp_syn(81), false),
        (FRIEND, tcp_syn(7999), false),
        (FRIEND, tcp_syn(8000), true),
        (FRIEND, tcp_syn(8999), true),
        (FRIEND, tcp_syn(9000), false),
        (FRIEND6, tcp_syn(8500), true),
        (
            FRIEND,
            L4::Udp {
                sport: 9,
                dport: 5353,
            },
            true,
        ),
        (FRIEND6, L4::Udp { sport: 9, dport: 1 }, true),
        (FRIEND, L4::Sctp { sport: 9, dport: 7 }, false),
        (FRIEND, tcp_syn(443), true),
        (STRANGER, tcp_syn(443), true),
        (STRANGER, tcp_syn(80), false),
        (STRANGER, tcp_syn(8000), false),
        (
            STRANGER,
            L4::Udp {
                sport: 9,
                dport: 53,
            },
            false,
        ),
        (STRANGER, L4::Sctp { sport: 9, dport: 7 }, true),
        (STRANGER6, L4::Sctp { sport: 9, dport: 7 }, false),
        ("192.0.2.9", tcp_syn(22), true),
        ("192.0.2.9", L4::Udp { sport: 9, dport: 1 }, true),
        ("192.0.2.9", L4::Sctp { sport: 9, dport: 2 }, true),
        ("198.51.100.1", tcp_syn(443), true),
        ("198.51.100.1", tcp_syn(22), false),
        ("2001:db8::1", tcp_syn(443), true),
        ("2001:db8::1", tcp_syn(8000), false),
    ];
    for (src, l4, want) in cases {
        let (proto, port) = match l4 {
            L4::Tcp { dport, .. } => (6, *dport),
            L4::Udp { dport, .. } => (17, *dport),
            L4::Sctp { dport, .. } => (132, *dport),
            other => panic!("no case for {other:?}"),
        };
        let dst = if src.contains(':') { ME6 } else { ME };
        let what = format!("{src} -> me proto {proto} port {port}");
        let verdict = if *want { Verdict::Pass } else { Verdict::Drop };
        expect(
            &d,
            Ingress,
            &pkt::frame(ip(src), ip(dst), l4),
            verdict,
            &what,
        );
        let answer =
            d.dp.lookup(&Lookup {
                ep_id: 1,
                direction: Ingress,
                peer: ip(src),
                protocol: proto,
                port,
            })
            .unwrap();
        assert!(answer.isolated, "{what}: explain sees the isolation");
        assert_eq!(
            answer.entry.is_some(),
            *want,
            "{what}: explain's lookup disagrees with the program ({answer:?})"
        );
    }
}

fn tcp_syn(dport: u16) -> L4 {
    L4::Tcp {
        sport: 40000,
        dport,
        flags: TCP_SYN,
    }
}

#[test]
fn ip_block_except_edges() {
    let mut d = Datapath::new();
    d.program(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: block}
spec:
  podSelector: {matchLabels: {app: me}}
  ingress:
  - from: [{ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.128/25]}}]
  - from: [{ipBlock: {cidr: "2001:db8::/32", except: ["2001:db8:1::/48"]}}]
"#,
        &endpoints(),
        &[],
    );
    for (src, want) in [
        ("198.51.100.0", Verdict::Pass),
        ("198.51.100.127", Verdict::Pass),
        ("198.51.100.128", Verdict::Drop),
        ("198.51.100.255", Verdict::Drop),
        ("198.51.101.0", Verdict::Drop),
        ("2001:db8::1", Verdict::Pass),
        ("2001:db8:1::1", Verdict::Drop),
        ("2001:db8:2::1", Verdict::Pass),
        ("2001:db9::1", Verdict::Drop),
    ] {
        let dst = if src.contains(':') { ME6 } else { ME };
        expect(
            &d,
            Ingress,
            &tcp(src, dst, 1234, 80, TCP_SYN),
            want,
            &format!("from {src}"),
        );
    }
}

#[test]
fn arp_passes_and_unknown_endpoints_and_vlan_frames_fail_closed() {
    let mut d = fixture();
    expect(
        &d,
        Ingress,
        &pkt::arp_request(),
        Verdict::Pass,
        "ARP under default deny",
    );
    let vlan = pkt::ether(pkt::ETH_P_8021Q, &[0, 1, 8, 0, 0x45, 0, 0, 20]);
    expect(&d, Egress, &vlan, Verdict::Drop, "VLAN-tagged frame");
    // An IPv4 header length below the minimum (IHL 4).
    let malformed = pkt::ether(pkt::ETH_P_IP, &[0x44, 0, 0, 20]);
    expect(
        &d,
        Egress,
        &malformed,
        Verdict::Drop,
        "malformed IPv4 header",
    );
    // No endpoint registered for this ifindex: everything is dropped.
    d.program("", &[endpoints()[1].clone()], &[]);
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 1, 80, TCP_SYN),
        Verdict::Drop,
        "unknown endpoint",
    );
    expect(
        &d,
        Ingress,
        &pkt::arp_request(),
        Verdict::Drop,
        "ARP on an unknown endpoint",
    );
}

#[test]
fn node_traffic_is_never_governed() {
    let d = fixture();
    expect(
        &d,
        Ingress,
        &tcp("10.0.0.1", ME, 40000, 8080, TCP_SYN),
        Verdict::Pass,
        "kubelet probe",
    );
    expect(
        &d,
        Egress,
        &tcp(ME, "10.0.0.1", 40000, 10250, TCP_SYN),
        Verdict::Pass,
        "pod -> node",
    );
}

#[test]
fn fragments_follow_their_first_fragment() {
    let d = fixture();
    let dns = L4::Udp {
        sport: 6000,
        dport: 53,
    };
    let first = Frag {
        id: 77,
        offset: 0,
        more: true,
    };
    let later = Frag {
        id: 77,
        offset: 185,
        more: false,
    };
    expect(
        &d,
        Egress,
        &pkt::frame_frag(ip(ME), ip("192.0.2.53"), &dns, first),
        Verdict::Pass,
        "first fragment",
    );
    expect(
        &d,
        Egress,
        &pkt::frame_frag(ip(ME), ip("192.0.2.53"), &dns, later),
        Verdict::Pass,
        "later fragment",
    );
    // A later fragment whose first fragment never came.
    let orphan = Frag {
        id: 78,
        offset: 185,
        more: false,
    };
    expect(
        &d,
        Egress,
        &pkt::frame_frag(ip(ME), ip("192.0.2.53"), &dns, orphan),
        Verdict::Drop,
        "orphan fragment",
    );
    // A denied first fragment, then its tail: both dropped.
    let http = L4::Tcp {
        sport: 6001,
        dport: 80,
        flags: TCP_SYN,
    };
    let f1 = Frag {
        id: 79,
        offset: 0,
        more: true,
    };
    let f2 = Frag {
        id: 79,
        offset: 3,
        more: false,
    };
    expect(
        &d,
        Egress,
        &pkt::frame_frag(ip(ME), ip(FRIEND), &http, f1),
        Verdict::Drop,
        "denied first fragment",
    );
    expect(
        &d,
        Egress,
        &pkt::frame_frag(ip(ME), ip(FRIEND), &http, f2),
        Verdict::Drop,
        "its tail",
    );
    // IPv6 fragment headers.
    let dns6 = L4::Udp {
        sport: 6002,
        dport: 53,
    };
    let f61 = Frag {
        id: 0x1234_5678,
        offset: 0,
        more: true,
    };
    let f62 = Frag {
        id: 0x1234_5678,
        offset: 100,
        more: false,
    };
    expect(
        &d,
        Egress,
        &pkt::frame_frag(ip(ME6), ip("2001:db8::53"), &dns6, f61),
        Verdict::Pass,
        "v6 first fragment",
    );
    expect(
        &d,
        Egress,
        &pkt::frame_frag(ip(ME6), ip("2001:db8::53"), &dns6, f62),
        Verdict::Pass,
        "v6 later fragment",
    );
}

#[test]
fn tcp_fin_then_new_syn_on_an_egress_flow() {
    // Egress allowed to everyone on 443; a FIN closes, a new SYN reopens.
    let mut d = Datapath::new();
    d.program(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: out}
spec:
  podSelector: {matchLabels: {app: me}}
  policyTypes: [Egress]
  egress: [{ports: [{port: 443}]}]
"#,
        &endpoints(),
        &[],
    );
    expect(
        &d,
        Egress,
        &tcp(ME, "192.0.2.1", 30000, 443, TCP_SYN),
        Verdict::Pass,
        "SYN",
    );
    expect(
        &d,
        Ingress,
        &tcp("192.0.2.1", ME, 443, 30000, TCP_SYN | TCP_ACK),
        Verdict::Pass,
        "SYN-ACK",
    );
    expect(
        &d,
        Egress,
        &tcp(ME, "192.0.2.1", 30000, 443, TCP_FIN | TCP_ACK),
        Verdict::Pass,
        "FIN",
    );
    expect(
        &d,
        Egress,
        &tcp(ME, "192.0.2.1", 30000, 443, TCP_SYN),
        Verdict::Pass,
        "new SYN, still allowed",
    );
    expect(
        &d,
        Egress,
        &tcp(ME, "192.0.2.1", 30000, 444, TCP_SYN),
        Verdict::Drop,
        "other port",
    );
}

#[test]
fn a_container_cannot_send_from_addresses_it_does_not_own() {
    let d = fixture();
    let dns = |src: &str| {
        pkt::frame(
            ip(src),
            ip("192.0.2.53"),
            &L4::Udp {
                sport: 5000,
                dport: 53,
            },
        )
    };
    expect(&d, Egress, &dns(ME), Verdict::Pass, "DNS from my address");
    expect(
        &d,
        Egress,
        &dns(FRIEND),
        Verdict::Drop,
        "DNS from a neighbour's address",
    );
    expect(
        &d,
        Egress,
        &dns("10.0.0.1"),
        Verdict::Drop,
        "DNS from the node's address",
    );
    expect(
        &d,
        Egress,
        &pkt::frame(
            ip(FRIEND6),
            ip("2001:db8::53"),
            &L4::Udp {
                sport: 5000,
                dport: 53,
            },
        ),
        Verdict::Drop,
        "v6 spoof",
    );
    // Spoofing the node to reach a neighbour's closed port.
    expect(
        &d,
        Egress,
        &tcp("10.0.0.1", STRANGER, 1, 22, TCP_SYN),
        Verdict::Drop,
        "pretending to be the node",
    );
    // ARP must announce my own address (or 0.0.0.0 as a probe).
    expect(
        &d,
        Egress,
        &pkt::arp_request_from([10, 0, 0, 2]),
        Verdict::Pass,
        "ARP for me",
    );
    expect(
        &d,
        Egress,
        &pkt::arp_request_from([0, 0, 0, 0]),
        Verdict::Pass,
        "ARP probe",
    );
    expect(
        &d,
        Egress,
        &pkt::arp_request_from([10, 0, 0, 3]),
        Verdict::Drop,
        "ARP claiming a neighbour",
    );
    expect(
        &d,
        Ingress,
        &pkt::arp_request_from([10, 0, 0, 9]),
        Verdict::Pass,
        "ARP to me is never governed",
    );
    let spoofed = d
        .counters()
        .iter()
        .filter(|c| c.reason == Reason::DropSpoofed)
        .map(|c| c.packets)
        .sum::<u64>();
    assert_eq!(spoofed, 5, "{:?}", d.counters());
}

#[test]
fn icmp_errors_cannot_tunnel_through_a_known_flow() {
    let d = fixture();
    let query = L4::Udp {
        sport: 5400,
        dport: 53,
    };
    expect(
        &d,
        Egress,
        &pkt::frame(ip(ME), ip("192.0.2.53"), &query),
        Verdict::Pass,
        "query",
    );
    // Quoting the answer direction of my flow, but sent to a third party.
    let quoted = pkt::ip_packet(
        ip("192.0.2.53"),
        ip(ME),
        &L4::Udp {
            sport: 53,
            dport: 5400,
        },
    );
    let out = pkt::frame(
        ip(ME),
        ip("203.0.113.9"),
        &L4::Unreachable {
            inner: quoted.clone(),
        },
    );
    expect(
        &d,
        Egress,
        &out,
        Verdict::Drop,
        "error to someone else than the quoted sender",
    );
    let back = pkt::frame(ip(ME), ip("192.0.2.53"), &L4::Unreachable { inner: quoted });
    expect(
        &d,
        Egress,
        &back,
        Verdict::Pass,
        "error back to the quoted sender",
    );
}

#[test]
fn dhcp_nd_and_router_messages_are_exempt_only_in_their_scope() {
    let d = fixture();
    let dhcp = |src: &str, dst: &str, s: u16, t: u16| {
        pkt::frame(ip(src), ip(dst), &L4::Udp { sport: s, dport: t })
    };
    expect(
        &d,
        Egress,
        &dhcp("0.0.0.0", "255.255.255.255", 68, 67),
        Verdict::Pass,
        "DHCP discover",
    );
    expect(
        &d,
        Egress,
        &dhcp(ME, "255.255.255.255", 68, 67),
        Verdict::Pass,
        "DHCP renew broadcast",
    );
    expect(
        &d,
        Egress,
        &dhcp(ME, "203.0.113.9", 68, 67),
        Verdict::Drop,
        "UDP 68->67 to the internet",
    );
    expect(
        &d,
        Ingress,
        &dhcp("203.0.113.9", ME, 67, 68),
        Verdict::Drop,
        "unicast UDP 67->68 from the internet",
    );
    expect(
        &d,
        Ingress,
        &dhcp("10.0.0.1", "255.255.255.255", 67, 68),
        Verdict::Pass,
        "broadcast DHCP offer",
    );
    expect(
        &d,
        Egress,
        &dhcp("fe80::2", "ff02::1:2", 546, 547),
        Verdict::Pass,
        "DHCPv6 solicit",
    );
    expect(
        &d,
        Egress,
        &dhcp(ME6, "2001:db8::9", 546, 547),
        Verdict::Drop,
        "DHCPv6 ports to a global address",
    );

    let ns = |src: &str, dst: &str| pkt::frame(ip(src), ip(dst), &L4::NeighbourSolicit);
    expect(
        &d,
        Egress,
        &ns("fe80::2", "ff02::1:ff00:3"),
        Verdict::Pass,
        "NS to solicited-node multicast",
    );
    expect(
        &d,
        Egress,
        &ns("::", "ff02::1:ff00:2"),
        Verdict::Pass,
        "DAD probe",
    );
    expect(
        &d,
        Egress,
        &ns(ME6, FRIEND6),
        Verdict::Pass,
        "unicast NS to a neighbour",
    );
    expect(
        &d,
        Egress,
        &ns(ME6, "2001:db8::9"),
        Verdict::Drop,
        "NS to an off-node address",
    );
    let routed = pkt::with_hop_limit(ns(ME6, FRIEND6), 64);
    expect(
        &d,
        Egress,
        &routed,
        Verdict::Drop,
        "NS with a routed hop limit",
    );
    let ra = pkt::with_hop_limit(
        pkt::frame(
            ip("fe80::2"),
            ip("ff02::1"),
            &L4::Raw {
                proto: 58,
                bytes: vec![134, 0, 0, 0, 64, 0, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0],
            },
        ),
        255,
    );
    expect(
        &d,
        Egress,
        &ra,
        Verdict::Drop,
        "router advertisement from a container",
    );
    expect(
        &d,
        Ingress,
        &ra,
        Verdict::Pass,
        "router advertisement to a container",
    );
}

/// A full sync (the daemon's start, `palisadectl sync`) reads every entry
/// back, also past the first batch of the kernel's batched lookup: written
/// once, nothing is written again, and removals are exact.
#[test]
fn a_full_sync_reads_back_every_entry_of_large_maps() {
    use palisade::{
        abi::{IpcacheValue, PolicyKey, PolicyKeyData, PolicyValue, TIER_NETPOL},
        compile::{Desired, Prefix},
        dataplane::Dataplane,
    };
    let mut d = fixture();
    let mut want = Desired::default();
    for i in 0..10_000u32 {
        want.policy.insert(
            PolicyKey {
                prefixlen: abi::POLICY_PREFIX_FULL,
                data: PolicyKeyData {
                    ep_id: 7,
                    tier: TIER_NETPOL,
                    peer_id: 1_000 + i,
                    protocol: abi::PROTO_TCP,
                    dport_be: 80u16.to_be(),
                    ..Default::default()
                },
            },
            PolicyValue {
                policy_id: 1,
                verdict: 1,
                ..Default::default()
            },
        );
        let addr = IpAddr::from([10, 77, (i >> 8) as u8, i as u8]);
        want.ipcache.insert(
            Prefix::host(addr),
            IpcacheValue {
                identity: 256 + i,
                flags: 0,
            },
        );
    }
    let first = d.dp.sync(&want).unwrap();
    assert!(first.upserted >= 20_000, "{first:?}");
    let again = d.dp.sync(&want).unwrap();
    assert_eq!(
        (again.upserted, again.deleted),
        (0, 0),
        "a second sync found entries missing or different"
    );
    let drop: Vec<PolicyKey> = want.policy.keys().step_by(2).copied().collect();
    for k in &drop {
        want.policy.remove(k);
    }
    let third = d.dp.sync(&want).unwrap();
    assert_eq!((third.upserted, third.deleted), (0, drop.len()));
}

/// An admin or baseline tier entry for "me" (endpoint 1), as the compiler
/// writes them: exact peer identity, resolved verdict, deciding policy.
fn tier_entry(
    want: &mut palisade::compile::Desired,
    (dir, tier): (Direction, u8),
    peer: u32,
    (prefixlen, dport): (u32, u16),
    (verdict, policy_id): (abi::Verdict, u32),
) {
    tier_entry_flags(
        want,
        (dir, tier),
        peer,
        (prefixlen, dport),
        (verdict, policy_id),
        0,
    );
}

fn tier_entry_flags(
    want: &mut palisade::compile::Desired,
    (dir, tier): (Direction, u8),
    peer: u32,
    (prefixlen, dport): (u32, u16),
    (verdict, policy_id): (abi::Verdict, u32),
    flags: u8,
) {
    want.policy.insert(
        abi::PolicyKey {
            prefixlen,
            data: abi::PolicyKeyData {
                ep_id: 1,
                direction: dir as u8,
                tier,
                peer_id: peer,
                protocol: abi::PROTO_TCP,
                dport_be: dport.to_be(),
                ..Default::default()
            },
        },
        abi::PolicyValue {
            policy_id,
            verdict: verdict as u8,
            flags,
            ..Default::default()
        },
    );
    let (flags, lens) = abi::ep_shape(dir as u8, prefixlen);
    let tier_flag = match (tier, dir) {
        (abi::TIER_ADMIN, Ingress) => abi::EP_ADMIN_INGRESS,
        (abi::TIER_ADMIN, Egress) => abi::EP_ADMIN_EGRESS,
        (_, Ingress) => abi::EP_BASELINE_INGRESS,
        (_, Egress) => abi::EP_BASELINE_EGRESS,
    };
    let ep = want
        .endpoints
        .get_mut(&TEST_IFINDEX)
        .expect("me is an endpoint");
    ep.flags |= flags | tier_flag;
    ep.range_lens |= lens;
}

fn identity_of(want: &palisade::compile::Desired, addr: &str) -> u32 {
    want.ipcache[&palisade::compile::Prefix::host(ip(addr))].identity
}

/// The datapath's order of tiers: the admin tier first (allow and deny
/// final, pass and no entry go on), NetworkPolicy for what it isolates,
/// the baseline tier only for directions no NetworkPolicy isolates. Within
/// a tier the longest entry is the answer, even when it says pass.
#[test]
fn tiers_decide_in_order_admin_then_networkpolicy_then_baseline() {
    use abi::{TIER_ADMIN, TIER_BASELINE, Verdict as V};
    let full = abi::POLICY_PREFIX_FULL;
    let any_port = abi::POLICY_PREFIX_ANY_PORT;
    // Ingress isolated (friends on TCP 80), egress not isolated.
    let mut d = Datapath::new();
    let mut want = d.program(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: me}
spec:
  podSelector: {matchLabels: {app: me}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: friend}}}]
    ports: [{port: 80}]
"#,
        &endpoints(),
        &[ip("10.0.0.1")],
    );
    let friend = identity_of(&want, FRIEND);
    let stranger = identity_of(&want, STRANGER);
    assert_ne!(friend, stranger);
    let admin_in = (Ingress, TIER_ADMIN);
    let admin_out = (Egress, TIER_ADMIN);
    let base_in = (Ingress, TIER_BASELINE);
    let base_out = (Egress, TIER_BASELINE);
    // Admin: deny friend:80 (over the NetworkPolicy's allow); allow the
    // stranger on every TCP port (over the isolation) except 22, passed on.
    tier_entry(&mut want, admin_in, friend, (full, 80), (V::Deny, 100));
    tier_entry(
        &mut want,
        admin_in,
        stranger,
        (any_port, 0),
        (V::Allow, 101),
    );
    tier_entry(&mut want, admin_in, stranger, (full, 22), (V::Pass, 102));
    // Baseline ingress: never consulted, ingress is isolated.
    tier_entry(&mut want, base_in, stranger, (full, 22), (V::Allow, 103));
    // Egress: admin passes friend:80 on, baseline denies it; baseline
    // denies the stranger on all TCP ports but passes 443.
    tier_entry(&mut want, admin_out, friend, (full, 80), (V::Pass, 104));
    tier_entry(&mut want, base_out, friend, (full, 80), (V::Deny, 105));
    tier_entry(&mut want, base_out, stranger, (any_port, 0), (V::Deny, 106));
    tier_entry(&mut want, base_out, stranger, (full, 443), (V::Pass, 107));
    d.load(&want);

    let cases = [
        (
            Ingress,
            FRIEND,
            ME,
            80,
            Verdict::Drop,
            "admin deny over NP allow",
        ),
        (Ingress, FRIEND6, ME6, 80, Verdict::Drop, "admin deny, IPv6"),
        (
            Ingress,
            FRIEND,
            ME,
            81,
            Verdict::Drop,
            "no admin entry, NP isolates",
        ),
        (
            Ingress,
            STRANGER,
            ME,
            81,
            Verdict::Pass,
            "admin allow over isolation",
        ),
        (
            Ingress,
            STRANGER,
            ME,
            22,
            Verdict::Drop,
            "admin pass, NP isolates, baseline not asked",
        ),
        (
            Egress,
            ME,
            FRIEND,
            80,
            Verdict::Drop,
            "admin pass, baseline deny",
        ),
        (
            Egress,
            ME,
            FRIEND,
            81,
            Verdict::Pass,
            "no entry: not isolated",
        ),
        (
            Egress,
            ME,
            STRANGER,
            8080,
            Verdict::Drop,
            "baseline deny on all ports",
        ),
        (
            Egress,
            ME6,
            STRANGER6,
            8080,
            Verdict::Drop,
            "baseline deny, IPv6",
        ),
        (
            Egress,
            ME,
            STRANGER,
            443,
            Verdict::Pass,
            "baseline pass: allowed",
        ),
        (
            Egress,
            ME,
            "192.0.2.9",
            8080,
            Verdict::Pass,
            "world: no tier entry",
        ),
    ];
    for (i, (dir, src, dst, port, verdict, what)) in cases.iter().enumerate() {
        // A fresh source port: every case opens its own flow.
        let frame = tcp(src, dst, 41000 + i as u16, *port, TCP_SYN);
        expect(&d, *dir, &frame, *verdict, what);
    }

    // Without the endpoint's tier flags the tiers are not looked up: the
    // flags are what keeps the cost of endpoints without tier policy flat.
    for ep in want.endpoints.values_mut() {
        ep.flags &= !(abi::EP_ADMIN_INGRESS | abi::EP_BASELINE_EGRESS);
    }
    d.load(&want);
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 42000, 80, TCP_SYN),
        Verdict::Pass,
        "admin flag off: the NetworkPolicy allows friend:80",
    );
    expect(
        &d,
        Egress,
        &tcp(ME, STRANGER, 42001, 8080, TCP_SYN),
        Verdict::Pass,
        "baseline flag off: egress not isolated",
    );
}

/// An entry marked audit (an audited Deny came first) lets the flow through
/// when it ends up allowed, counted as audit; an enforced deny stays a deny.
#[test]
fn audited_tier_denies_report_instead_of_drop() {
    use abi::{TIER_ADMIN, TIER_BASELINE, Verdict as V};
    let full = abi::POLICY_PREFIX_FULL;
    let mut d = Datapath::new();
    // Ingress isolated (friends on TCP 80), egress not isolated.
    let mut want = d.program(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: me}
spec:
  podSelector: {matchLabels: {app: me}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: friend}}}]
    ports: [{port: 80}]
"#,
        &endpoints(),
        &[ip("10.0.0.1")],
    );
    let friend = identity_of(&want, FRIEND);
    let stranger = identity_of(&want, STRANGER);
    let audit = abi::POLICY_F_AUDIT;
    // friend:80 in: audited deny, then nothing in the tier; NP allows.
    tier_entry_flags(
        &mut want,
        (Ingress, TIER_ADMIN),
        friend,
        (full, 80),
        (V::None, 120),
        audit,
    );
    // stranger:81 in: audited deny, then NP isolation denies for real.
    tier_entry_flags(
        &mut want,
        (Ingress, TIER_ADMIN),
        stranger,
        (full, 81),
        (V::None, 121),
        audit,
    );
    // egress to the stranger: audited deny, then a baseline allow.
    tier_entry_flags(
        &mut want,
        (Egress, TIER_BASELINE),
        stranger,
        (full, 80),
        (V::Allow, 122),
        audit,
    );
    d.load(&want);
    let audits = |d: &Datapath, dir: Direction| -> u64 {
        d.counters()
            .iter()
            .filter(|c| c.verdict == abi::Verdict::Audit && c.direction == dir)
            .map(|c| c.packets)
            .sum()
    };
    expect(
        &d,
        Ingress,
        &tcp(FRIEND, ME, 43000, 80, TCP_SYN),
        Verdict::Pass,
        "audited, then allowed",
    );
    assert_eq!(
        audits(&d, Ingress),
        1,
        "counted as audit: {:?}",
        d.counters()
    );
    expect(
        &d,
        Ingress,
        &tcp(STRANGER, ME, 43001, 81, TCP_SYN),
        Verdict::Drop,
        "audited, then denied",
    );
    assert_eq!(
        audits(&d, Ingress),
        1,
        "a real deny is not an audit: {:?}",
        d.counters()
    );
    expect(
        &d,
        Egress,
        &tcp(ME, STRANGER, 43002, 80, TCP_SYN),
        Verdict::Pass,
        "audited, baseline allows",
    );
    assert_eq!(
        audits(&d, Egress),
        1,
        "counted as audit: {:?}",
        d.counters()
    );
    expect(
        &d,
        Egress,
        &tcp(ME, STRANGER, 43003, 81, TCP_SYN),
        Verdict::Pass,
        "no entry",
    );
    assert_eq!(audits(&d, Egress), 1, "not an audit: {:?}", d.counters());
}

/// AdminNetworkPolicy, NetworkPolicy and BaselineAdminNetworkPolicy
/// compiled by the real compiler: the program decides each connection as
/// the tiers say, and the user-space mirror of the program (explain's
/// "live maps" answer) agrees, naming the deciding policy.
#[test]
fn compiled_tiers_decide_as_written_and_the_map_lookup_agrees() {
    use palisade::dataplane::{Dataplane, Lookup};
    let mut d = Datapath::new();
    d.program(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: first}
spec:
  priority: 1
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: me}}}}
  ingress:
  - name: stranger-https
    action: Allow
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: stranger}}}}]
    ports: [{portNumber: {port: 443}}]
  - name: friend-to-np
    action: Pass
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: friend}}}}]
    ports: [{portRange: {start: 80, end: 90}}]
  egress:
  - action: Deny
    to: [{networks: [192.0.2.0/24, "2001:db8::/64"]}]
    ports: [{portNumber: {port: 25}}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: second}
spec:
  priority: 2
  subject: {namespaces: {}}
  ingress:
  - action: Deny
    from: [{namespaces: {}}]
    ports: [{portRange: {start: 1, end: 1000}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: me}
spec:
  podSelector: {matchLabels: {app: me}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: friend}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  egress:
  - action: Allow
    to: [{networks: [192.0.2.7/32]}]
  - action: Deny
    to: [{networks: [0.0.0.0/0, "::/0"]}]
"#,
        &endpoints(),
        &[ip("10.0.0.1")],
    );
    // (direction, peer, proto, port, allowed, deciding policy id)
    let cases: &[(Direction, &str, u8, u16, bool, u32)] = &[
        // ANP first (1): stranger on 443 allowed over NP isolation.
        (Ingress, STRANGER, 6, 443, true, 1),
        (Ingress, STRANGER6, 6, 443, true, 1),
        // Friend 80-90 passed on by 1, so 2's deny never applies: NP allows.
        (Ingress, FRIEND, 6, 85, true, 3),
        // Friend on 91: 2 denies before NP (which would allow).
        (Ingress, FRIEND, 6, 91, false, 2),
        // Friend above 1000: no tier rule; NP allows.
        (Ingress, FRIEND, 6, 5000, true, 3),
        (Ingress, FRIEND, 17, 53, true, 3),
        // Stranger above 1000: NP isolation denies (no policy decided).
        (Ingress, STRANGER, 6, 5000, false, 0),
        // Egress is not isolated: the baseline decides.
        (Egress, "192.0.2.7", 6, 443, true, 4),
        (Egress, "192.0.2.8", 6, 443, false, 4),
        (Egress, "2001:db8::1", 17, 53, false, 4),
        // ... after the admin deny of port 25 to 192.0.2.0/24.
        (Egress, "192.0.2.7", 6, 25, false, 1),
        // Pods are in 0.0.0.0/0 too: networks match cluster addresses.
        (Egress, FRIEND, 6, 80, false, 4),
    ];
    for (i, (dir, peer, proto, port, allowed, policy)) in cases.iter().enumerate() {
        let (src, dst) = match dir {
            Ingress => (*peer, if peer.contains(':') { ME6 } else { ME }),
            Egress => (if peer.contains(':') { ME6 } else { ME }, *peer),
        };
        let sport = 42000 + i as u16;
        let l4 = match proto {
            6 => L4::Tcp {
                sport,
                dport: *port,
                flags: TCP_SYN,
            },
            _ => L4::Udp {
                sport,
                dport: *port,
            },
        };
        let what = format!("{dir:?} {peer} proto {proto} port {port}");
        let want = if *allowed {
            Verdict::Pass
        } else {
            Verdict::Drop
        };
        expect(&d, *dir, &pkt::frame(ip(src), ip(dst), &l4), want, &what);
        let a =
            d.dp.lookup(&Lookup {
                ep_id: 1,
                direction: *dir,
                peer: ip(peer),
                protocol: *proto,
                port: *port,
            })
            .unwrap();
        assert_eq!(
            a.allowed, *allowed,
            "{what}: the map lookup disagrees ({a:?})"
        );
        let decided = a.tier.map(|t| t.1).or(a.entry).map_or(0, |v| v.policy_id);
        assert_eq!(decided, *policy, "{what}: deciding policy ({a:?})");
    }
}
