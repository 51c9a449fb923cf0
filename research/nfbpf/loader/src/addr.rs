#![allow(dead_code)]
//! 16-byte address encoding shared by both binaries: IPv6 as-is, IPv4 as
//! IPv4-mapped IPv6 (::ffff:a.b.c.d), matching nf_egress.bpf.c.
use std::net::IpAddr;

pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// "10.0.0.0/8" or "fd00::/64" or a bare address -> (lpm prefixlen, addr16)
pub fn cidr16(s: &str) -> anyhow::Result<(u32, [u8; 16])> {
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p.parse::<u32>()?)),
        None => (s, None),
    };
    let ip: IpAddr = a.parse()?;
    let plen = match (ip, p) {
        (IpAddr::V4(_), Some(p)) if p <= 32 => 96 + p,
        (IpAddr::V4(_), None) => 128,
        (IpAddr::V6(_), Some(p)) if p <= 128 => p,
        (IpAddr::V6(_), None) => 128,
        _ => anyhow::bail!("bad prefix length in {s}"),
    };
    Ok((plen, addr16(ip)))
}

pub fn fmt16(b: &[u8]) -> String {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    let v6 = std::net::Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => v6.to_string(),
    }
}
