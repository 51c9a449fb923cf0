//! Finding a container's host-side veth and its addresses.
//!
//! First from the previous plugin's result (the host interface that is a
//! veth), and where that is absent or ambiguous, from the container
//! interface itself: a veth's `IFLA_LINK` is its peer's ifindex in the other
//! namespace.

use std::{net::IpAddr, path::Path};

use thiserror::Error;

use crate::{
    cni::PrevResult,
    netlink::{self, LinkFacts, NetlinkError},
};

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("interface {ifname} does not exist in the container's network namespace {netns}")]
    NoContainerInterface { ifname: String, netns: String },
    #[error(
        "container interface {ifname} is a {kind} device, not a veth: palisade enforces on the host side of veth pairs \
         (use bridge, ptp, flannel or calico as the main plugin)"
    )]
    NotVeth { ifname: String, kind: String },
    #[error(
        "no host-side veth found for container interface {ifname}: prevResult names none and its peer (ifindex {peer}) \
         is not a veth in this network namespace; run palisade in the host's namespace, after the plugin that creates the veth"
    )]
    NoHostVeth { ifname: String, peer: u32 },
    #[error(
        "no host-side veth found: prevResult names no veth and no network namespace was given to look at the container side"
    )]
    NoClue,
}

/// The host side of a container's veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVeth {
    pub ifname: String,
    pub ifindex: u32,
}

/// The container interface's peer ifindex (host side), read inside the
/// container's namespace.
pub fn container_peer_index(netns: &Path, ifname: &str) -> Result<u32, NetnsError> {
    let links = netlink::in_netns(netns, netlink::list_links)??;
    let link = links.iter().find(|l| l.name == ifname).ok_or_else(|| {
        NetnsError::NoContainerInterface {
            ifname: ifname.to_owned(),
            netns: netns.display().to_string(),
        }
    })?;
    if !link.is_veth {
        return Err(NetnsError::NotVeth {
            ifname: ifname.to_owned(),
            kind: if link.kind.is_empty() {
                "non-veth".into()
            } else {
                link.kind.clone()
            },
        });
    }
    link.peer_index.ok_or_else(|| NetnsError::NotVeth {
        ifname: ifname.to_owned(),
        kind: "veth without a peer".into(),
    })
}

/// Find the host veth of container interface `ifname`. `host_links` are
/// the links of the host namespace (the caller's).
pub fn find_host_veth(
    prev: &PrevResult,
    netns: Option<&Path>,
    ifname: &str,
    host_links: &[LinkFacts],
) -> Result<HostVeth, NetnsError> {
    let named: Vec<&LinkFacts> = prev
        .host_interfaces()
        .iter()
        .filter_map(|n| host_links.iter().find(|l| l.name == *n && l.is_veth))
        .collect();
    if let [only] = named[..] {
        return Ok(HostVeth {
            ifname: only.name.clone(),
            ifindex: only.index,
        });
    }
    let Some(netns) = netns else {
        return Err(NetnsError::NoClue);
    };
    let peer = container_peer_index(netns, ifname)?;
    host_links
        .iter()
        .find(|l| l.index == peer && l.is_veth)
        .map(|l| HostVeth {
            ifname: l.name.clone(),
            ifindex: l.index,
        })
        .ok_or_else(|| NetnsError::NoHostVeth {
            ifname: ifname.to_owned(),
            peer,
        })
}

/// The MAC address of interface `ifname` inside a container namespace.
pub fn container_mac(netns: &Path, ifname: &str) -> Result<Option<[u8; 6]>, NetnsError> {
    let links = netlink::in_netns(netns, netlink::list_links)??;
    let link = links.iter().find(|l| l.name == ifname).ok_or_else(|| {
        NetnsError::NoContainerInterface {
            ifname: ifname.to_owned(),
            netns: netns.display().to_string(),
        }
    })?;
    Ok(link.mac)
}

/// Global addresses of an interface inside a container namespace.
pub fn container_addresses(netns: &Path, ifname: &str) -> Result<Vec<IpAddr>, NetnsError> {
    let (links, addrs) = netlink::in_netns(netns, || -> Result<_, NetlinkError> {
        Ok((netlink::list_links()?, netlink::list_addresses()?))
    })??;
    let Some(link) = links.iter().find(|l| l.name == ifname) else {
        return Err(NetnsError::NoContainerInterface {
            ifname: ifname.to_owned(),
            netns: netns.display().to_string(),
        });
    };
    Ok(addrs
        .into_iter()
        .filter(|(idx, ip)| *idx == link.index && !is_link_local(ip))
        .map(|(_, ip)| ip)
        .collect())
}

/// The node's own addresses (the caller's namespace), loopback excluded.
pub fn host_addresses() -> Result<Vec<IpAddr>, NetnsError> {
    let mut out: Vec<IpAddr> = netlink::list_addresses()?
        .into_iter()
        .map(|(_, ip)| ip)
        .filter(|ip| !ip.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::ResultInterface;

    fn link(index: u32, name: &str, veth: bool) -> LinkFacts {
        LinkFacts {
            index,
            name: name.into(),
            is_veth: veth,
            peer_index: None,
            kind: if veth { "veth".into() } else { "bridge".into() },
            up: true,
            mac: None,
        }
    }

    #[test]
    fn the_one_host_veth_in_prev_result_is_chosen() {
        let prev = PrevResult {
            interfaces: vec![
                ResultInterface {
                    name: "cni0".into(),
                    ..Default::default()
                },
                ResultInterface {
                    name: "veth1".into(),
                    ..Default::default()
                },
                ResultInterface {
                    name: "eth0".into(),
                    sandbox: "/run/netns/x".into(),
                    ..Default::default()
                },
            ],
            ips: vec![],
        };
        let host = [
            link(3, "cni0", false),
            link(7, "veth1", true),
            link(8, "veth2", true),
        ];
        let v = find_host_veth(&prev, None, "eth0", &host).unwrap();
        assert_eq!(
            v,
            HostVeth {
                ifname: "veth1".into(),
                ifindex: 7
            }
        );
    }

    #[test]
    fn without_prev_result_interfaces_a_netns_is_needed() {
        let prev = PrevResult::default();
        let err = find_host_veth(&prev, None, "eth0", &[link(7, "veth1", true)]).unwrap_err();
        assert!(matches!(err, NetnsError::NoClue), "{err}");
    }
}
