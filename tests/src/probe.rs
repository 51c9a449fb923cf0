//! Real traffic: probes that open a connection (TCP), exchange a datagram
//! (UDP), get an SCTP INIT answered, or get an ICMP echo reply, from inside
//! one namespace to an address, and report whether an answer came back.
//!
//! The test kernel has no SCTP stack (CONFIG_IP_SCTP is not set), so SCTP is
//! spoken on raw sockets: the client sends an INIT chunk, the probe server
//! answers with an INIT ACK. The datapath sees genuine SCTP headers.

use std::{
    io::{Read, Write},
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::sys::in_netns;

/// A protocol a probe speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

impl Proto {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            "ICMP" => Some(Self::Icmp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
            Self::Icmp => "ICMP",
        }
    }
}

/// How long a probe waits for an answer before calling it blocked.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1200);

/// Probe `target:port` with `proto` from inside the namespace at `netns`.
pub fn probe(netns: &Path, target: IpAddr, proto: Proto, port: u16, timeout: Duration) -> bool {
    in_netns(netns, || match proto {
        Proto::Tcp => tcp(target, port, timeout),
        Proto::Udp => udp(target, port, timeout),
        Proto::Sctp => sctp(target, port, timeout),
        Proto::Icmp => icmp(target, timeout),
    })
}

fn domain(ip: IpAddr) -> Domain {
    if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// A number that differs between concurrent probes (ids, ports, tags).
fn nonce() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    t.wrapping_mul(2_654_435_761) ^ n.wrapping_mul(40_503) ^ std::process::id()
}

fn tcp(target: IpAddr, port: u16, timeout: Duration) -> bool {
    let Ok(sock) = Socket::new(domain(target), Type::STREAM, Some(Protocol::TCP)) else {
        return false;
    };
    let addr = SockAddr::from(SocketAddr::new(target, port));
    if sock.connect_timeout(&addr, timeout).is_err() {
        return false;
    }
    let mut stream: std::net::TcpStream = sock.into();
    let _ = stream.set_read_timeout(Some(timeout));
    if stream.write_all(b"probe\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(n) if n > 0)
}

/// Connect over TCP (one SYN, no retransmission) and ask the server which
/// of its addresses was reached: behind a Service, the backend the DNAT
/// chose. `None` when no connection was made within `timeout`.
pub fn who(netns: &Path, target: IpAddr, port: u16, timeout: Duration) -> Option<IpAddr> {
    in_netns(netns, || {
        let sock = Socket::new(domain(target), Type::STREAM, Some(Protocol::TCP)).ok()?;
        // A retransmitted SYN would be balanced anew: one try per call.
        let one: libc::c_int = 1;
        // SAFETY: TCP_SYNCNT takes an int; the pointer and length are one.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_TCP,
                libc::TCP_SYNCNT,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return None;
        }
        let addr = SockAddr::from(SocketAddr::new(target, port));
        sock.connect_timeout(&addr, timeout).ok()?;
        let mut stream: std::net::TcpStream = sock.into();
        stream.set_read_timeout(Some(timeout)).ok()?;
        stream.write_all(b"who\n").ok()?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).ok()?;
        std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
    })
}

fn udp(target: IpAddr, port: u16, timeout: Duration) -> bool {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("addr")
    } else {
        "[::]:0".parse().expect("addr")
    };
    let Ok(sock) = std::net::UdpSocket::bind(bind) else {
        return false;
    };
    let msg = format!("probe {}", nonce());
    let deadline = Instant::now() + timeout;
    // Three tries within the timeout: a datagram may be lost to ARP/ND.
    for attempt in 0..3 {
        if sock
            .send_to(msg.as_bytes(), SocketAddr::new(target, port))
            .is_err()
        {
            return false;
        }
        let until = (Instant::now() + timeout / 3).min(deadline);
        while let Some(left) = until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            let _ = sock.set_read_timeout(Some(left));
            let mut buf = [0u8; 64];
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if from.ip() == target && &buf[..n] == msg.as_bytes() => return true,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        if attempt == 2 || Instant::now() >= deadline {
            break;
        }
    }
    false
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Receive raw packets until `accept` says yes or time runs out.
fn recv_until(
    sock: &Socket,
    deadline: Instant,
    mut accept: impl FnMut(&[u8], IpAddr) -> bool,
) -> bool {
    while let Some(left) = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    {
        let _ = sock.set_read_timeout(Some(left));
        let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                // SAFETY: recv_from initialised the first n bytes.
                let bytes: Vec<u8> = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                let Some(src) = from.as_socket().map(|s| s.ip()) else {
                    continue;
                };
                if accept(&bytes, src) {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

/// Skip the IPv4 header that raw IPv4 sockets deliver.
fn strip_ipv4(bytes: &[u8]) -> &[u8] {
    match bytes.first() {
        Some(b) if b >> 4 == 4 => bytes.get(usize::from(b & 0xf) * 4..).unwrap_or(&[]),
        _ => bytes,
    }
}

fn icmp(target: IpAddr, timeout: Duration) -> bool {
    let (dom, proto) = if target.is_ipv4() {
        (Domain::IPV4, Protocol::ICMPV4)
    } else {
        (Domain::IPV6, Protocol::ICMPV6)
    };
    let Ok(sock) = Socket::new(dom, Type::RAW, Some(proto)) else {
        return false;
    };
    let id = (nonce() & 0xffff) as u16;
    let (req_type, rep_type) = if target.is_ipv4() {
        (8u8, 0u8)
    } else {
        (128u8, 129u8)
    };
    let mut pkt = vec![req_type, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&1u16.to_be_bytes());
    pkt.extend_from_slice(b"palisade-probe");
    if target.is_ipv4() {
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    } // the kernel fills in ICMPv6 checksums on raw sockets
    let dest = SockAddr::from(SocketAddr::new(target, 0));
    let deadline = Instant::now() + timeout;
    for _ in 0..2 {
        if sock.send_to(&pkt, &dest).is_err() {
            return false;
        }
        let half = (Instant::now() + timeout / 2).min(deadline);
        if recv_until(&sock, half, |bytes, src| {
            let icmp = strip_ipv4(bytes);
            src == target
                && icmp.len() >= 8
                && icmp[0] == rep_type
                && icmp[4..6] == id.to_be_bytes()
        }) {
            return true;
        }
    }
    false
}

/// CRC32c (Castagnoli), the SCTP checksum (RFC 9260 appendix A).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An SCTP packet with one INIT (type 1) or INIT ACK (type 2) chunk.
pub fn sctp_packet(sport: u16, dport: u16, vtag: u32, chunk_type: u8, init_tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]); // checksum, filled below
    p.extend_from_slice(&[chunk_type, 0]);
    p.extend_from_slice(&20u16.to_be_bytes());
    p.extend_from_slice(&init_tag.to_be_bytes());
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&init_tag.to_be_bytes()); // initial TSN
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// (source port, destination port, chunk type) of an SCTP packet.
pub fn sctp_parse(p: &[u8]) -> Option<(u16, u16, u8, u32)> {
    if p.len() < 20 {
        return None;
    }
    let sport = u16::from_be_bytes([p[0], p[1]]);
    let dport = u16::from_be_bytes([p[2], p[3]]);
    let init_tag = u32::from_be_bytes([p[16], p[17], p[18], p[19]]);
    Some((sport, dport, p[12], init_tag))
}

pub fn raw_sctp_socket(v6: bool) -> std::io::Result<Socket> {
    let dom = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    Socket::new(dom, Type::RAW, Some(Protocol::from(libc::IPPROTO_SCTP)))
}

/// Strip the IPv4 header from a raw IPv4 SCTP packet.
pub fn sctp_payload(bytes: &[u8]) -> &[u8] {
    strip_ipv4(bytes)
}

fn sctp(target: IpAddr, port: u16, timeout: Duration) -> bool {
    let Ok(sock) = raw_sctp_socket(target.is_ipv6()) else {
        return false;
    };
    let n = nonce();
    let sport = 20000 + (n % 40000) as u16;
    let tag = n | 1;
    let pkt = sctp_packet(sport, port, 0, 1, tag);
    let dest = SockAddr::from(SocketAddr::new(target, 0));
    let deadline = Instant::now() + timeout;
    for _ in 0..2 {
        if sock.send_to(&pkt, &dest).is_err() {
            return false;
        }
        let half = (Instant::now() + timeout / 2).min(deadline);
        if recv_until(&sock, half, |bytes, src| {
            src == target
                && matches!(sctp_parse(strip_ipv4(bytes)), Some((s, d, 2, t)) if s == port && d == sport && t == tag)
        }) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_rfc_test_vector() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn sctp_packets_round_trip() {
        let p = sctp_packet(1234, 80, 0, 1, 0xdead_beef);
        assert_eq!(sctp_parse(&p), Some((1234, 80, 1, 0xdead_beef)));
    }
}
