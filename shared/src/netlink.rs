//! Small synchronous wrappers over rtnetlink for what palisade reads:
//! links, addresses and tc filters of the calling thread's network
//! namespace, plus running a closure inside another namespace on a
//! dedicated thread (setns only ever changes the calling thread).

use std::{fs::File, io, net::IpAddr, path::Path, thread};

use futures::TryStreamExt;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo},
    tc::TcAttribute,
};
use nix::sched::{CloneFlags, setns};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("open a netlink socket")]
    Connect(#[source] io::Error),
    #[error("netlink request {what}")]
    Request {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("start the netlink runtime")]
    Runtime(#[source] io::Error),
    #[error("open network namespace {path}")]
    OpenNetns {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("enter network namespace {path}")]
    Setns {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("the namespace worker thread panicked")]
    Thread,
}

/// What palisade needs to know about a network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    pub is_veth: bool,
    /// `IFLA_LINK`: for a veth, the peer's ifindex (in the peer's namespace).
    pub peer_index: Option<u32>,
    pub kind: String,
    pub up: bool,
    /// `IFLA_ADDRESS` of an Ethernet-like link.
    pub mac: Option<[u8; 6]>,
}

/// A tc filter as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcFilterFacts {
    pub priority: u16,
    pub handle: u32,
    pub kind: String,
}

fn block_on<T>(fut: impl Future<Output = Result<T, NetlinkError>>) -> Result<T, NetlinkError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(NetlinkError::Runtime)?;
    rt.block_on(fut)
}

fn connect() -> Result<rtnetlink::Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Every link of the calling thread's network namespace.
pub fn list_links() -> Result<Vec<LinkFacts>, NetlinkError> {
    block_on(async {
        let handle = connect()?;
        let mut out = Vec::new();
        let mut stream = handle.link().get().execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "list links",
                source,
            })?
        {
            let mut facts = LinkFacts {
                index: msg.header.index,
                name: String::new(),
                is_veth: false,
                peer_index: None,
                kind: String::new(),
                up: msg.header.flags.contains(LinkFlags::Up),
                mac: None,
            };
            for attr in &msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => facts.name = n.clone(),
                    LinkAttribute::Link(i) => facts.peer_index = Some(*i),
                    LinkAttribute::Address(a) => facts.mac = <[u8; 6]>::try_from(&a[..]).ok(),
                    LinkAttribute::LinkInfo(infos) => {
                        for info in infos {
                            if let LinkInfo::Kind(kind) = info {
                                facts.is_veth = matches!(kind, InfoKind::Veth);
                                facts.kind = kind.to_string();
                            }
                        }
                    }
                    _ => {}
                }
            }
            out.push(facts);
        }
        Ok(out)
    })
}

/// Every address of the calling thread's network namespace, with the
/// index of its interface.
pub fn list_addresses() -> Result<Vec<(u32, IpAddr)>, NetlinkError> {
    block_on(async {
        let handle = connect()?;
        let mut out = Vec::new();
        let mut stream = handle.address().get().execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "list addresses",
                source,
            })?
        {
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(addr) {
                out.push((msg.header.index, ip));
            }
        }
        Ok(out)
    })
}

/// The tc filters under the clsact ingress or egress hook of an interface.
pub fn list_tc_filters(ifindex: u32, ingress: bool) -> Result<Vec<TcFilterFacts>, NetlinkError> {
    block_on(async {
        let handle = connect()?;
        let req = handle.traffic_filter(ifindex as i32).get();
        let req = if ingress { req.ingress() } else { req.egress() };
        let mut stream = req.execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "list tc filters",
                source,
            })?
        {
            let kind = msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    TcAttribute::Kind(k) => Some(k.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            // tcm_info carries the priority in its upper 16 bits.
            out.push(TcFilterFacts {
                priority: (msg.header.info >> 16) as u16,
                handle: u32::from(msg.header.handle.major) << 16
                    | u32::from(msg.header.handle.minor),
                kind,
            });
        }
        Ok(out)
    })
}

/// Run `f` on a fresh thread that has entered the network namespace at
/// `path`. Sockets `f` opens live in that namespace.
pub fn in_netns<T, F>(path: &Path, f: F) -> Result<T, NetlinkError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let ns = File::open(path).map_err(|source| NetlinkError::OpenNetns {
        path: path.display().to_string(),
        source,
    })?;
    thread::scope(|s| {
        s.spawn(|| {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| NetlinkError::Setns {
                path: path.display().to_string(),
                source,
            })?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetlinkError::Thread)?
    })
}
