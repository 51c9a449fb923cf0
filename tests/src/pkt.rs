//! Crafted packets for BPF_PROG_TEST_RUN: Ethernet + IPv4/IPv6 + TCP, UDP,
//! SCTP or ICMP, with enough control (flags, fragments, extension headers,
//! quoted packets in ICMP errors) to exercise every parser branch.

use std::net::IpAddr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Layer 4 of a crafted packet.
#[derive(Debug, Clone)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// Echo request (`true`) or reply with this identifier.
    Echo {
        request: bool,
        id: u16,
    },
    /// An ICMP error (destination unreachable) quoting `inner`.
    Unreachable {
        inner: Vec<u8>,
    },
    /// ICMPv6 neighbour solicitation.
    NeighbourSolicit,
    /// Raw bytes after the IP header, with this protocol number.
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

/// IPv4 fragmentation of a crafted packet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Frag {
    pub id: u32,
    /// Offset in 8-byte units (0 for the first fragment).
    pub offset: u16,
    pub more: bool,
}

fn l4_bytes(l4: &L4, v6: bool) -> (u8, Vec<u8>) {
    match l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
        } => {
            let mut b = Vec::new();
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&1u32.to_be_bytes()); // seq
            b.extend_from_slice(&0u32.to_be_bytes()); // ack
            b.push(5 << 4); // data offset
            b.push(*flags);
            b.extend_from_slice(&65535u16.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            (6, b)
        }
        L4::Udp { sport, dport } => {
            let mut b = Vec::new();
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&16u16.to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(b"payload!");
            (17, b)
        }
        L4::Sctp { sport, dport } => (132, crate::probe::sctp_packet(*sport, *dport, 0, 1, 7)),
        L4::Echo { request, id } => {
            let t = match (v6, request) {
                (false, true) => 8,
                (false, false) => 0,
                (true, true) => 128,
                (true, false) => 129,
            };
            let mut b = vec![t, 0, 0, 0];
            b.extend_from_slice(&id.to_be_bytes());
            b.extend_from_slice(&1u16.to_be_bytes());
            (if v6 { 58 } else { 1 }, b)
        }
        L4::Unreachable { inner } => {
            let mut b = vec![
                if v6 { 1 } else { 3 },
                if v6 { 4 } else { 3 },
                0,
                0,
                0,
                0,
                0,
                0,
            ];
            b.extend_from_slice(inner);
            (if v6 { 58 } else { 1 }, b)
        }
        L4::NeighbourSolicit => {
            let mut b = vec![135, 0, 0, 0, 0, 0, 0, 0];
            b.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            (58, b)
        }
        L4::Raw { proto, bytes } => (*proto, bytes.clone()),
    }
}

/// The IP packet (no Ethernet header): what an ICMP error quotes.
pub fn ip_packet(src: IpAddr, dst: IpAddr, l4: &L4) -> Vec<u8> {
    ip_packet_frag(src, dst, l4, None)
}

pub fn ip_packet_frag(src: IpAddr, dst: IpAddr, l4: &L4, frag: Option<Frag>) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let (proto, payload) = l4_bytes(l4, v6);
    let payload = match frag {
        Some(f) if f.offset != 0 => payload[..8.min(payload.len())].to_vec(),
        _ => payload,
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0x45, 0];
            h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
            let f = frag.unwrap_or_default();
            h.extend_from_slice(&(f.id as u16).to_be_bytes());
            let fo = f.offset | if f.more { 0x2000 } else { 0 };
            h.extend_from_slice(&fo.to_be_bytes());
            h.extend_from_slice(&[64, proto, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h.extend_from_slice(&payload);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut body = Vec::new();
            let next = if let Some(f) = frag {
                // Fragment extension header (RFC 8200 section 4.5).
                body.push(proto);
                body.push(0);
                let fo = (f.offset << 3) | u16::from(f.more);
                body.extend_from_slice(&fo.to_be_bytes());
                body.extend_from_slice(&f.id.to_be_bytes());
                44
            } else {
                proto
            };
            body.extend_from_slice(&payload);
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&(body.len() as u16).to_be_bytes());
            h.push(next);
            h.push(64);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h.extend_from_slice(&body);
            h
        }
        _ => panic!("mixed address families"),
    }
}

/// An Ethernet frame around `payload`.
pub fn ether(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    // Pad to the Ethernet minimum so the kernel accepts it.
    while f.len() < 60 {
        f.push(0);
    }
    f
}

/// A full frame: Ethernet + IP + layer 4. Neighbour discovery goes out
/// with hop limit 255 as RFC 4861 requires; everything else with 64.
pub fn frame(src: IpAddr, dst: IpAddr, l4: &L4) -> Vec<u8> {
    let et = if src.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 };
    let f = ether(et, &ip_packet(src, dst, l4));
    match l4 {
        L4::NeighbourSolicit => with_hop_limit(f, 255),
        _ => f,
    }
}

pub fn frame_frag(src: IpAddr, dst: IpAddr, l4: &L4, frag: Frag) -> Vec<u8> {
    let et = if src.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 };
    ether(et, &ip_packet_frag(src, dst, l4, Some(frag)))
}

/// An ARP request from 10.0.0.2 for 10.0.0.1.
pub fn arp_request() -> Vec<u8> {
    arp_request_from([10, 0, 0, 2])
}

/// An ARP request announcing `sender` as its protocol address.
pub fn arp_request_from(sender: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
    p.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&sender);
    p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
    ether(ETH_P_ARP, &p)
}

/// Set a frame's IPv4 TTL or IPv6 hop limit.
pub fn with_hop_limit(mut frame: Vec<u8>, hops: u8) -> Vec<u8> {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IP => frame[14 + 8] = hops,
        ETH_P_IPV6 => frame[14 + 7] = hops,
        _ => {}
    }
    frame
}
