//! The node's DNS proxy.
//!
//! Pods selected by a PalisadeNetworkPolicy with `toFQDNs` or DNS rules
//! send their DNS (UDP and TCP port 53) here: the datapath marks it for
//! local delivery and moves it to the proxy's port (see `pal_to_dns_proxy`
//! in `bpf/lib/datapath.h`); the packet keeps the server's address, which
//! the proxy, listening on every address of its port, reads back as the
//! destination. (Assigning the packet to the proxy's socket at tc ingress
//! does not survive a bridge between the veth and the node's stack, which
//! the bridge plugin puts there.) For each query the proxy
//!
//! 1. answers REFUSED when the pod's DNS rules do not allow the name;
//! 2. forwards it to the server the pod asked, from the node;
//! 3. checks the answer (same id and question; only A, AAAA and CNAME
//!    records on the chain from the question's name count), and has the
//!    node write every address it learned into the datapath;
//! 4. only then answers the pod, from the server's address and port.
//!
//! So a connection the pod opens right after the answer is already
//! allowed. Answers the proxy cannot read, or that do not answer the
//! question, never add an address.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{Name, RData, RecordType},
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

use crate::{
    fqdn::Learned,
    policy::{
        PortMatch, Protocol,
        palisade::{DNS_PORT, FqdnSelector},
    },
    store::State,
};

/// Settings of the proxy.
#[derive(Debug, Clone)]
pub struct Options {
    /// Port on every address (UDP and TCP, IPv4 and IPv6).
    pub port: u16,
    /// The skb mark that routes redirected packets to the local table.
    pub mark: u32,
    /// The routing table with `local 0.0.0.0/0` and `local ::/0`.
    pub table: u32,
    /// Addresses are kept at least this long (seconds) ...
    pub min_ttl: u32,
    /// ... plus this grace period.
    pub grace: u32,
    /// At most this many addresses per name.
    pub max_per_name: usize,
    /// How long to wait for the server.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            port: 15053,
            mark: 0x1000,
            table: 1053,
            min_ttl: 60,
            grace: 30,
            max_per_name: 50,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Which names a pod may look up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePolicy {
    Any,
    Only(Vec<FqdnSelector>),
}

impl NamePolicy {
    pub fn allows(&self, name: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(sels) => sels.iter().any(|s| s.matches(name)),
        }
    }
}

/// The proxy's view of the node: for each address of a local endpoint
/// whose DNS comes here, what it may look up and which policy says so.
#[derive(Debug, Clone, Default)]
pub struct DnsView {
    pub clients: BTreeMap<IpAddr, (NamePolicy, String)>,
}

/// Compute the view from the node's state. An endpoint's names are limited
/// when a PalisadeNetworkPolicy selecting it has DNS rules and no egress
/// rule of any policy selecting it allows port 53 without DNS rules (an
/// L3/L4 rule for DNS allows every name, as everywhere else: the union).
pub fn dns_view(state: &State) -> DnsView {
    let mut view = DnsView::default();
    let namespaces = state.namespace_map();
    for ep in state.endpoints.values() {
        let labels = state.effective_labels(ep);
        let mut proxied = None;
        let mut names: Vec<FqdnSelector> = Vec::new();
        let mut dns_rules = false;
        let mut open_53 = false;
        for sp in state.palisade_policies.values() {
            let p = &sp.policy;
            if !p.base.selects(&ep.namespace, &labels) {
                continue;
            }
            if p.uses_dns_proxy() && proxied.is_none() {
                proxied = Some(p.base.key());
            }
            for d in &p.dns {
                dns_rules = true;
                names.extend(d.names.iter().cloned());
            }
            if p.base.egress_isolation {
                for (i, r) in p.base.egress.iter().enumerate() {
                    if !p.dns.iter().any(|d| d.rule == i) && covers_53(&r.ports) {
                        open_53 = true;
                    }
                }
            }
        }
        if proxied.is_none() {
            let ns_labels = namespaces
                .get(&ep.namespace)
                .map(|n| n.labels.clone())
                .unwrap_or_else(|| crate::policy::NamespaceInfo::new(&ep.namespace, None).labels);
            proxied = state
                .tier_policies
                .values()
                .find(|t| {
                    t.policy.uses_dns_proxy()
                        && crate::tiers::selects(&t.policy, &ns_labels, &labels)
                })
                .map(|t| format!("{}/{}", t.policy.kind.as_str(), t.policy.name));
        }
        let Some(by) = proxied else { continue };
        for sp in state.policies.values() {
            let p = &sp.policy;
            if p.egress_isolation
                && p.selects(&ep.namespace, &labels)
                && p.egress.iter().any(|r| covers_53(&r.ports))
            {
                open_53 = true;
            }
        }
        let policy = if dns_rules && !open_53 {
            names.sort();
            names.dedup();
            NamePolicy::Only(names)
        } else {
            NamePolicy::Any
        };
        for a in &ep.addresses {
            view.clients.insert(*a, (policy.clone(), by.clone()));
        }
    }
    view
}

fn covers_53(ports: &[crate::policy::PortRule]) -> bool {
    ports.is_empty()
        || ports.iter().any(|p| {
            matches!(p.protocol, Protocol::Udp | Protocol::Tcp)
                && match p.port {
                    PortMatch::All => true,
                    PortMatch::Range(a, b) => a <= DNS_PORT && DNS_PORT <= b,
                    PortMatch::Named(_) => false,
                }
        })
}

/// What the proxy reports of each query (flow records).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecord {
    pub client: IpAddr,
    pub server: SocketAddr,
    pub protocol: String,
    pub name: String,
    pub qtype: String,
    /// `allowed`, `denied` (REFUSED by DNS rules) or `error`.
    pub verdict: String,
    pub rcode: String,
    pub answers: Vec<IpAddr>,
    /// The policy whose rules decided (denied: the one that limits names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Microseconds from the answer's arrival to the datapath holding its
    /// addresses.
    pub learn_micros: u64,
}

/// What the proxy needs from the node.
pub trait Control: Send + Sync + std::fmt::Debug + 'static {
    /// What the pod at `client` may look up, and the policy that says so;
    /// `None` for an address that is no endpoint whose DNS comes here.
    fn names_for(&self, client: IpAddr) -> Option<(NamePolicy, String)>;
    /// Of these addresses, those the datapath does not hold long enough
    /// yet (cheap, never blocks on the node).
    fn fresh(&self, learned: &[Learned]) -> Vec<Learned> {
        learned.to_vec()
    }
    /// Write learned addresses into the datapath; returns once they are.
    fn learn(&self, learned: &[Learned]) -> Result<(), String>;
    /// Report one query.
    fn record(&self, record: DnsRecord);
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The query's one question: (name without the root dot, type).
fn question(m: &Message) -> Option<(String, RecordType)> {
    match m.queries() {
        [q] => Some((
            crate::policy::palisade::normalize(&q.name().to_ascii()),
            q.query_type(),
        )),
        _ => None,
    }
}

/// A response to `query` with this code and no records.
fn error_response(query: &Message, code: ResponseCode) -> Vec<u8> {
    let mut r = Message::new();
    r.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    for q in query.queries() {
        r.add_query(q.clone());
    }
    r.to_vec().unwrap_or_default()
}

/// One address of an answer: a name of the chain, the address, its TTL.
pub type AnswerAddress = (String, IpAddr, u32);

/// The addresses an answer gives for the question's name: A and AAAA
/// records whose owner is the name or on its CNAME chain. Other records
/// (answers for other names, glue) never count. Fails when the answer does
/// not answer the query.
pub fn read_answer(
    query: &Message,
    answer: &[u8],
) -> Result<(Message, Vec<AnswerAddress>), String> {
    let msg = Message::from_vec(answer).map_err(|e| format!("unreadable answer: {e}"))?;
    if msg.id() != query.id() || msg.message_type() != MessageType::Response {
        return Err("the answer's id or type does not match the query".into());
    }
    let (Some(q), Some(a)) = (question(query), question(&msg)) else {
        return Err("the answer has no single question".into());
    };
    if q != a {
        return Err(format!(
            "the answer is for {} {}, not {} {}",
            a.0, a.1, q.0, q.1
        ));
    }
    let key = |n: &Name| crate::policy::palisade::normalize(&n.to_ascii());
    let mut chain: BTreeSet<String> = BTreeSet::from([q.0.clone()]);
    // CNAMEs may come in any order; a chain is at most as long as the
    // answer (a loop adds nothing new and ends the walk).
    for _ in 0..msg.answers().len() {
        let mut grew = false;
        for r in msg.answers() {
            if let RData::CNAME(c) = r.data()
                && chain.contains(&key(r.name()))
                && chain.insert(key(&c.0))
            {
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    let mut out = Vec::new();
    for r in msg.answers() {
        let owner = key(r.name());
        if !chain.contains(&owner) {
            continue;
        }
        let addr = match r.data() {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        // Under every name of the chain: a rule may name any of them.
        for n in &chain {
            out.push((n.clone(), addr, r.ttl()));
        }
    }
    Ok((msg, out))
}

/// The proxy. `serve` runs until its sockets fail.
#[derive(Debug)]
pub struct Proxy<C: Control> {
    control: Arc<C>,
    opts: Options,
}

impl<C: Control> Proxy<C> {
    pub fn new(control: Arc<C>, opts: Options) -> Arc<Self> {
        Arc::new(Self { control, opts })
    }

    /// Judge and forward one query; the bytes to send back (None: send
    /// nothing, the client retries).
    async fn handle(
        self: &Arc<Self>,
        client: IpAddr,
        server: SocketAddr,
        tcp: bool,
        query_bytes: &[u8],
        upstream: &mut Option<TcpStream>,
    ) -> Option<Vec<u8>> {
        let query = Message::from_vec(query_bytes).ok()?;
        let (name, qtype) = question(&query).unwrap_or((String::new(), RecordType::Unknown(0)));
        let mut rec = DnsRecord {
            client,
            server,
            protocol: if tcp { "TCP" } else { "UDP" }.into(),
            name: name.clone(),
            qtype: qtype.to_string(),
            verdict: "allowed".into(),
            rcode: String::new(),
            answers: Vec::new(),
            policy: None,
            learn_micros: 0,
        };
        let Some((names, by)) = self.control.names_for(client) else {
            rec.verdict = "denied".into();
            rec.rcode = ResponseCode::Refused.to_string();
            self.control.record(rec);
            return Some(error_response(&query, ResponseCode::Refused));
        };
        rec.policy = Some(by);
        if !names.allows(&name) {
            rec.verdict = "denied".into();
            rec.rcode = ResponseCode::Refused.to_string();
            self.control.record(rec);
            return Some(error_response(&query, ResponseCode::Refused));
        }
        let answer = match self.forward(server, tcp, query_bytes, upstream).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!("DNS query for {name} to {server}: {e}");
                rec.verdict = "error".into();
                rec.rcode = ResponseCode::ServFail.to_string();
                self.control.record(rec);
                return Some(error_response(&query, ResponseCode::ServFail));
            }
        };
        let got = std::time::Instant::now();
        match read_answer(&query, &answer) {
            Ok((msg, addrs)) => {
                rec.rcode = msg.response_code().to_string();
                let now = now_secs();
                let learned: Vec<Learned> = addrs
                    .iter()
                    .map(|(n, a, ttl)| Learned {
                        name: n.clone(),
                        address: *a,
                        expires: now
                            + u64::from((*ttl).max(self.opts.min_ttl))
                            + u64::from(self.opts.grace),
                    })
                    .collect();
                rec.answers = addrs.iter().map(|(_, a, _)| *a).collect();
                rec.answers.sort();
                rec.answers.dedup();
                let control = Arc::clone(&self.control);
                let learned = self.control.fresh(&learned);
                let written = if learned.is_empty() {
                    Ok(())
                } else {
                    // The node's lock and the map writes block: off the
                    // thread that serves the other queries.
                    tokio::task::spawn_blocking(move || control.learn(&learned))
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()))
                };
                if let Err(e) = written {
                    // The pod must not get an answer it cannot use.
                    tracing::warn!("DNS answer for {name}: addresses not written: {e}");
                    rec.verdict = "error".into();
                    rec.rcode = ResponseCode::ServFail.to_string();
                    self.control.record(rec);
                    return Some(error_response(&query, ResponseCode::ServFail));
                }
                rec.learn_micros = got.elapsed().as_micros() as u64;
                self.control.record(rec);
                Some(answer)
            }
            Err(e) => {
                tracing::info!("DNS answer for {name} from {server} refused: {e}");
                rec.verdict = "error".into();
                rec.rcode = ResponseCode::ServFail.to_string();
                self.control.record(rec);
                Some(error_response(&query, ResponseCode::ServFail))
            }
        }
    }

    async fn forward(
        &self,
        server: SocketAddr,
        tcp: bool,
        query: &[u8],
        upstream: &mut Option<TcpStream>,
    ) -> io::Result<Vec<u8>> {
        let t = self.opts.timeout;
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "no answer");
        if !tcp {
            let local: SocketAddr = if server.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = UdpSocket::bind(local).await?;
            sock.connect(server).await?;
            sock.send(query).await?;
            let mut buf = vec![0u8; 65535];
            let n = tokio::time::timeout(t, sock.recv(&mut buf))
                .await
                .map_err(|_| timed_out())??;
            buf.truncate(n);
            return Ok(buf);
        }
        if upstream.is_none() {
            let s = tokio::time::timeout(t, TcpStream::connect(server))
                .await
                .map_err(|_| timed_out())??;
            *upstream = Some(s);
        }
        let s = upstream.as_mut().expect("connected");
        let len = u16::try_from(query.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "query too long"))?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(query);
        let exchange = async {
            s.write_all(&framed).await?;
            let n = s.read_u16().await?;
            let mut buf = vec![0u8; usize::from(n)];
            s.read_exact(&mut buf).await?;
            Ok::<_, io::Error>(buf)
        };
        match tokio::time::timeout(t, exchange).await {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => {
                *upstream = None;
                Err(e)
            }
            Err(_) => {
                *upstream = None;
                Err(timed_out())
            }
        }
    }

    /// Bind the sockets (UDP and TCP, IPv4 and IPv6). Fails when the port
    /// is taken.
    pub fn bind(&self) -> io::Result<Sockets> {
        let v4: SocketAddr = (Ipv4Addr::UNSPECIFIED, self.opts.port).into();
        let v6: SocketAddr = (Ipv6Addr::UNSPECIFIED, self.opts.port).into();
        Ok(Sockets {
            udp: vec![udp_listener(v4)?, udp_listener(v6)?],
            tcp: vec![tcp_listener(v4)?, tcp_listener(v6)?],
        })
    }

    /// Serve on bound sockets until one fails.
    pub async fn serve(self: Arc<Self>, sockets: Sockets) -> io::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for s in sockets.udp {
            let me = Arc::clone(&self);
            tasks.spawn(async move { me.serve_udp(s).await });
        }
        for l in sockets.tcp {
            let me = Arc::clone(&self);
            tasks.spawn(async move { me.serve_tcp(l).await });
        }
        match tasks.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(io::Error::other(e)),
            None => Ok(()),
        }
    }

    async fn serve_udp(self: Arc<Self>, sock: UdpSocket) -> io::Result<()> {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, client, server) = sock
                .async_io(tokio::io::Interest::READABLE, || {
                    recv_with_orig_dst(sock.as_raw_fd(), &mut buf)
                })
                .await?;
            // The datapath moved the query to this port; it was for 53.
            let Some(server) = server.map(|s| SocketAddr::new(s.ip(), DNS_PORT)) else {
                continue;
            };
            let query = buf[..n].to_vec();
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let mut none = None;
                if let Some(reply) = me
                    .handle(client.ip(), server, false, &query, &mut none)
                    .await
                    && let Err(e) = send_from(server, client, &reply)
                {
                    tracing::debug!("DNS reply to {client} from {server}: {e}");
                }
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        loop {
            let (stream, client) = listener.accept().await?;
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(e) = me.serve_conn(stream, client).await {
                    tracing::debug!("DNS over TCP from {client}: {e}");
                }
            });
        }
    }

    async fn serve_conn(
        self: Arc<Self>,
        mut stream: TcpStream,
        client: SocketAddr,
    ) -> io::Result<()> {
        // The accepted socket's own address is the server's (the packet
        // kept its destination address; the datapath moved the port).
        let server = SocketAddr::new(stream.local_addr()?.ip(), DNS_PORT);
        let mut upstream = None;
        loop {
            let n = match tokio::time::timeout(Duration::from_secs(30), stream.read_u16()).await {
                Ok(Ok(n)) => n,
                _ => return Ok(()),
            };
            let mut q = vec![0u8; usize::from(n)];
            stream.read_exact(&mut q).await?;
            let Some(reply) = self
                .handle(client.ip(), server, true, &q, &mut upstream)
                .await
            else {
                return Ok(());
            };
            let len = u16::try_from(reply.len()).unwrap_or(u16::MAX);
            stream.write_all(&len.to_be_bytes()).await?;
            stream.write_all(&reply[..usize::from(len)]).await?;
        }
    }
}

/// The proxy's bound sockets.
#[derive(Debug)]
pub struct Sockets {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

fn transparent(s: &socket2::Socket, v6: bool) -> io::Result<()> {
    if v6 {
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    Ok(())
}

fn udp_listener(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let v6 = addr.is_ipv6();
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    transparent(&s, v6)?;
    if v6 {
        s.set_only_v6(true)?;
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv6OrigDstAddr, &true)
            .map_err(io::Error::from)?;
    } else {
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv4OrigDstAddr, &true)
            .map_err(io::Error::from)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let v6 = addr.is_ipv6();
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    transparent(&s, v6)?;
    if v6 {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// One datagram, its sender and its original destination.
fn recv_with_orig_dst(
    fd: std::os::fd::RawFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
        .map_err(io::Error::from)?;
    let from = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| SocketAddr::from((s.ip(), s.port())))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|s| SocketAddr::from((s.ip(), s.port())))
                })
        })
        .ok_or_else(|| io::Error::other("a datagram without a sender"))?;
    let mut orig = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                orig = Some(SocketAddr::from((
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                orig = Some(SocketAddr::from((
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                )));
            }
            _ => {}
        }
    }
    Ok((msg.bytes, from, orig))
}

/// Send a datagram from a non-local address (the server the pod asked).
fn send_from(from: SocketAddr, to: SocketAddr, data: &[u8]) -> io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(from), Type::DGRAM, None)?;
    transparent(&s, from.is_ipv6())?;
    s.set_reuse_address(true)?;
    s.bind(&from.into())?;
    s.send_to(data, &to.into())?;
    Ok(())
}

/// Route packets with `mark` to the node's local table (so that a
/// redirected packet is delivered to the proxy, whatever its address), in
/// this thread's network namespace. Idempotent.
pub async fn ensure_routing(mark: u32, table: u32) -> io::Result<()> {
    use netlink_packet_route::{
        route::{RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute},
    };
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    let exists = |e: &rtnetlink::Error| matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST);
    let lo = {
        use futures::TryStreamExt;
        let mut links = handle.link().get().match_name("lo").execute();
        links
            .try_next()
            .await
            .map_err(io::Error::other)?
            .ok_or_else(|| io::Error::other("no lo interface"))?
            .header
            .index
    };
    for v6 in [false, true] {
        let rule = handle
            .rule()
            .add()
            .fw_mark(mark)
            .table_id(table)
            .action(RuleAction::ToTable)
            .priority(90);
        let added = if v6 {
            let mut r = rule.v6();
            r.message_mut().attributes.push(RuleAttribute::FwMask(mark));
            r.execute().await
        } else {
            let mut r = rule.v4();
            r.message_mut().attributes.push(RuleAttribute::FwMask(mark));
            r.execute().await
        };
        if let Err(e) = added
            && !exists(&e)
        {
            return Err(io::Error::other(format!("add the fwmark rule: {e}")));
        }
        let route = if v6 {
            rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .table_id(table)
                .output_interface(lo)
                .build()
        } else {
            rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .table_id(table)
                .output_interface(lo)
                .build()
        };
        if let Err(e) = handle.route().add(route).execute().await
            && !exists(&e)
        {
            return Err(io::Error::other(format!("add the local route: {e}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{
        op::Query,
        rr::{
            Record,
            rdata::{A, AAAA, CNAME, TXT},
        },
    };

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(7)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m
    }

    fn answer(q: &Message, records: Vec<Record>) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(q.id())
            .set_message_type(MessageType::Response)
            .add_query(q.queries()[0].clone());
        for r in records {
            m.add_answer(r);
        }
        m.to_vec().unwrap()
    }

    fn rec(name: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(Name::from_ascii(name).unwrap(), ttl, data)
    }

    #[test]
    fn answers_follow_cname_chains_and_ignore_other_names() {
        let q = query("api.example.test.", RecordType::A);
        let a = answer(
            &q,
            vec![
                // The chain out of order, an unrelated A record, a TXT.
                rec("lb.cdn.test.", 30, RData::A(A::new(192, 0, 2, 1))),
                rec(
                    "api.example.test.",
                    60,
                    RData::CNAME(CNAME(Name::from_ascii("lb.cdn.test.").unwrap())),
                ),
                rec("evil.test.", 60, RData::A(A::new(203, 0, 113, 9))),
                rec(
                    "api.example.test.",
                    60,
                    RData::TXT(TXT::new(vec!["x".into()])),
                ),
                rec(
                    "lb.cdn.test.",
                    30,
                    RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                ),
            ],
        );
        let (_, got) = read_answer(&q, &a).unwrap();
        let addrs: BTreeSet<IpAddr> = got.iter().map(|(_, a, _)| *a).collect();
        assert_eq!(
            addrs,
            BTreeSet::from(["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()])
        );
        let names: BTreeSet<&str> = got.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, BTreeSet::from(["api.example.test", "lb.cdn.test"]));
    }

    #[test]
    fn hostile_answers_add_nothing() {
        let q = query("api.example.test.", RecordType::A);
        // Another question.
        let other = query("evil.test.", RecordType::A);
        let a = answer(
            &other,
            vec![rec("evil.test.", 60, RData::A(A::new(1, 2, 3, 4)))],
        );
        assert!(read_answer(&q, &a).is_err());
        // Another id.
        let mut wrong_id = q.clone();
        wrong_id.set_id(8);
        let a = answer(
            &wrong_id,
            vec![rec("api.example.test.", 60, RData::A(A::new(1, 2, 3, 4)))],
        );
        assert!(read_answer(&q, &a).is_err());
        // A CNAME loop with no address on it.
        let a = answer(
            &q,
            vec![
                rec(
                    "api.example.test.",
                    60,
                    RData::CNAME(CNAME(Name::from_ascii("b.test.").unwrap())),
                ),
                rec(
                    "b.test.",
                    60,
                    RData::CNAME(CNAME(Name::from_ascii("api.example.test.").unwrap())),
                ),
            ],
        );
        assert!(read_answer(&q, &a).unwrap().1.is_empty());
        // A compression pointer that points at itself.
        let mut bytes = answer(&q, vec![]);
        bytes[7] = 1; // one answer
        bytes.extend_from_slice(&[0xc0, 12 + 22]); // loops to itself
        bytes.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 1, 2, 3, 4]);
        assert!(read_answer(&q, &bytes).is_err());
        // Garbage.
        assert!(read_answer(&q, &[1, 2, 3]).is_err());
    }

    #[test]
    fn names_are_limited_only_when_rules_say_so() {
        let only = NamePolicy::Only(vec![FqdnSelector::Pattern("*.example.test".into())]);
        assert!(only.allows("API.example.test."));
        assert!(!only.allows("example.test"));
        assert!(NamePolicy::Any.allows("anything"));
    }
}
