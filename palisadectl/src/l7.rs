//! The L7 proxy inside `palisadectl daemon`: the datapath steers the
//! connections of L7 flows to its transparent listener (through lo, see
//! bpf/l7_steer.c); it judges every request against the HTTP rules that
//! govern the connection and forwards the allowed ones to the server the
//! client asked for, from the client's own address.
//!
//! What the server sees: the client's address, as without the proxy (the
//! upstream socket binds it, IP_TRANSPARENT), with a port the kernel picks;
//! so its own ingress policy judges the real client. Denied requests get `403` with
//! the deciding policies in `x-palisade-policy`, and never reach it.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    thread,
};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use palisade::{
    abi::ProxyConfig,
    daemon::Server,
    dnsproxy,
    l7::{self, Connection, HttpRecord, Verdict},
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The proxy's settings (`palisadectl daemon`).
#[derive(Debug, Clone)]
pub struct Options {
    /// The transparent listener's port, on every address.
    pub port: u16,
    /// The mark (and table) that route steered packets to the node.
    pub mark: u32,
    pub table: u32,
}

type Body = BoxBody<Bytes, hyper::Error>;

/// Requests the proxy judged, for the agent to write into the flow log.
pub type Records = Arc<Mutex<Vec<HttpRecord>>>;

fn record(records: &Records, r: HttpRecord) {
    let mut v = records.lock().unwrap_or_else(|p| p.into_inner());
    // The agent drains it; a stalled agent must not grow it forever.
    if v.len() < 100_000 {
        v.push(r);
    }
}

/// The rules of each connection, as last computed; forgotten when the
/// store's generation moves.
struct Rules {
    server: Arc<Server>,
    /// The store generation the cache was filled at, and the rules of each
    /// (client, server, port).
    cache: Mutex<(u64, ConnectionCache)>,
}

type ConnectionCache = HashMap<(IpAddr, IpAddr, u16), Arc<Connection>>;

impl Rules {
    fn get(&self, client: IpAddr, server: IpAddr, port: u16) -> Arc<Connection> {
        let generation = self.server.store_generation();
        {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if c.0 != generation {
                *c = (generation, HashMap::new());
            }
            if let Some(conn) = c.1.get(&(client, server, port)) {
                return Arc::clone(conn);
            }
        }
        let conn = Arc::new(match self.server.l7_connection(client, server, port) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("L7 proxy: cannot read the node's policies: {e}");
                Connection::deny_all(client, server)
            }
        });
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.0 == generation && c.1.len() < 100_000 {
            c.1.insert((client, server, port), Arc::clone(&conn));
        }
        conn
    }
}

/// An IPv4 address as the dual-stack listener reports it (`::ffff:a.b.c.d`)
/// back to IPv4.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

/// The transparent listener: every address, IPv4 and IPv6.
fn bind(port: u16) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.set_ip_transparent_v6(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Connect to `server` from the client's own address, on a port the kernel
/// picks: the client's port is the proxy's accepted connection, and a
/// second connection on the same four addresses and ports would share the
/// node's conntrack entry with it (two sequence spaces in one entry, and a
/// clash with a Service's DNAT).
async fn connect_as(client: SocketAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let domain = if server.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if server.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
    } else {
        s.set_ip_transparent_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    // The port is picked at connect, unique for the four addresses and
    // ports, not at bind, where it must be free for the client's address
    // alone: there the proxy's closed upstream connections in TIME_WAIT
    // would take every port of a busy client within the minute, and its
    // next connections would fail.
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
    s.bind(&SocketAddr::new(client.ip(), 0).into())?;
    let std: std::net::TcpStream = s.into();
    TcpSocket::from_std_stream(std).connect(server).await
}

fn text(status: StatusCode, body: String, policy: Option<String>) -> Response<Body> {
    let mut r = Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8");
    if let Some(p) = policy {
        r = r.header("x-palisade-policy", p);
    }
    r.body(
        Full::new(Bytes::from(body))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    )
    .expect("a valid response")
}

/// Whether the request is gRPC (its denial is a gRPC status, not a page).
fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn denial(req: &Request<Incoming>, v: &Verdict) -> Response<Body> {
    let policies = v.policies.join(", ");
    let what = format!(
        "no HTTP rule of {} allows {} {}",
        if policies.is_empty() {
            "the policies (unavailable)"
        } else {
            &policies
        },
        req.method(),
        req.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    if is_grpc(req) {
        // A trailers-only answer: PERMISSION_DENIED.
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/grpc")
            .header("grpc-status", "7")
            .header("grpc-message", format!("denied by palisade: {what}"))
            .header("x-palisade-policy", policies)
            .body(
                Full::new(Bytes::new())
                    .map_err(|never: Infallible| match never {})
                    .boxed(),
            )
            .expect("a valid response");
    }
    text(
        StatusCode::FORBIDDEN,
        format!("Forbidden by palisade: {what}\n"),
        Some(policies),
    )
}

/// The connection to the server, opened at the first allowed request in
/// the client's HTTP version.
enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<Incoming>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

impl Upstream {
    fn usable(&self) -> bool {
        match self {
            Self::H1(s) => !s.is_closed(),
            Self::H2(s) => !s.is_closed(),
        }
    }
}

async fn open_upstream(
    client: SocketAddr,
    target: SocketAddr,
    h2: bool,
) -> Result<Upstream, String> {
    let io = connect_as(client, target)
        .await
        .map_err(|e| format!("cannot reach {target}: {e}"))?;
    let io = TokioIo::new(io);
    if h2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("{target}: {e}"))?;
        tokio::spawn(async move {
            let _ended = connection.await;
        });
        Ok(Upstream::H2(sender))
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("{target}: {e}"))?;
        tokio::spawn(async move {
            let _ended = connection.with_upgrades().await;
        });
        Ok(Upstream::H1(sender))
    }
}

/// Forward an allowed request over the connection's upstream (opening it
/// first if needed).
async fn forward(
    mut req: Request<Incoming>,
    upstream: &tokio::sync::Mutex<Option<Upstream>>,
    client: SocketAddr,
    target: SocketAddr,
) -> Response<Body> {
    let h2 = req.version() == hyper::Version::HTTP_2;
    let bad_gateway = |e: String| {
        text(
            StatusCode::BAD_GATEWAY,
            format!("palisade L7 proxy: {e}\n"),
            None,
        )
    };
    let mut guard = upstream.lock().await;
    if guard.as_ref().is_none_or(|u| !u.usable()) {
        match open_upstream(client, target, h2).await {
            Ok(u) => *guard = Some(u),
            Err(e) => return bad_gateway(e),
        }
    }
    // An allowed upgrade (WebSocket): once the server agrees, the two
    // connections are joined and bytes flow as they are.
    let wants_upgrade = req.headers().contains_key(hyper::header::UPGRADE);
    let client_side = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let sent = match guard.as_mut().expect("opened above") {
        Upstream::H2(s) => {
            // Streams go concurrently: the lock is not held while waiting.
            let mut s = s.clone();
            drop(guard);
            s.send_request(req).await
        }
        Upstream::H1(s) => s.send_request(req).await,
    };
    match sent {
        Ok(mut resp) => {
            if let Some(client_side) = client_side
                && resp.status() == StatusCode::SWITCHING_PROTOCOLS
            {
                let server_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    if let (Ok(c), Ok(s)) = (client_side.await, server_side.await) {
                        let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                        let _copied = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                });
            }
            resp.map(BodyExt::boxed)
        }
        Err(e) => bad_gateway(format!("{target}: {e}")),
    }
}

/// Join the client's connection to one opened to `target` from the
/// client's address; closed (reset) when that cannot be opened.
async fn relay(mut stream: TcpStream, client: SocketAddr, target: SocketAddr) {
    match connect_as(client, target).await {
        Ok(mut upstream) => {
            let _copied = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
        }
        Err(e) => {
            tracing::debug!("L7 proxy: relay from {client} to {target}: {e}");
            // A reset, as the server would give (linger 0 does not block).
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
        }
    }
}

/// One client connection (HTTP/1.1, or HTTP/2 with prior knowledge as
/// gRPC speaks it): each request judged on its own; the upstream
/// connection opened at the first allowed one.
async fn serve_connection(stream: TcpStream, rules: Arc<Rules>, records: Records) {
    // Answers (a gRPC frame, a 403) go out as they are written.
    let _ = stream.set_nodelay(true);
    let (Ok(client), Ok(target)) = (stream.peer_addr(), stream.local_addr()) else {
        return;
    };
    let (client, target) = (unmap(client), unmap(target));
    let conn = {
        let rules = Arc::clone(&rules);
        match tokio::task::spawn_blocking(move || {
            rules.get(client.ip(), target.ip(), target.port())
        })
        .await
        {
            Ok(c) => c,
            Err(_) => return,
        }
    };
    if conn.sides.is_empty() {
        // No HTTP rule governs the connection (a client's connection to a
        // Service whose backend its HTTP rules do not cover, or rules
        // gone since the datapath steered it): relayed as bytes, whatever
        // the protocol.
        relay(stream, client, target).await;
        return;
    }
    let upstream: Arc<tokio::sync::Mutex<Option<Upstream>>> = Arc::default();
    let service = service_fn(move |req: Request<Incoming>| {
        let conn = Arc::clone(&conn);
        let upstream = Arc::clone(&upstream);
        let records = Arc::clone(&records);
        async move {
            let start = std::time::Instant::now();
            let host = req
                .headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
                .or_else(|| req.uri().authority().map(|a| a.to_string()));
            let path = req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
            let verdict = {
                let headers = req.headers();
                let header = |name: &str| -> Vec<&str> {
                    headers
                        .get_all(name)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect()
                };
                conn.judge(
                    &l7::Request {
                        method: req.method().as_str(),
                        path: &path,
                        host: host.as_deref(),
                    },
                    &header,
                )
            };
            let method = req.method().to_string();
            let resp = if verdict.allowed {
                forward(req, &upstream, client, target).await
            } else {
                tracing::info!(
                    "L7 proxy: denied {method} {path} from {} to {} ({})",
                    conn.client,
                    conn.server,
                    verdict.policies.join(", ")
                );
                denial(&req, &verdict)
            };
            record(
                &records,
                HttpRecord {
                    client,
                    server: target,
                    direction: verdict
                        .direction
                        .unwrap_or(palisade::abi::Direction::Ingress),
                    method,
                    host,
                    path,
                    status: resp.status().as_u16(),
                    grpc_status: resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok()),
                    verdict: verdict.as_str().to_owned(),
                    policy: (!verdict.policies.is_empty()).then(|| verdict.policies.join(", ")),
                    latency_micros: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
                },
            );
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().pipeline_flush(true);
    // Bytes that are not HTTP end the connection.
    let _done = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

async fn serve(listener: TcpListener, rules: Arc<Rules>, records: Records) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(
                    stream,
                    Arc::clone(&rules),
                    Arc::clone(&records),
                ));
            }
            Err(e) => {
                tracing::warn!("L7 proxy: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Start the proxy on its own threads. Fails when the listener cannot be
/// bound, the routing or the steering program cannot be set up; the
/// datapath then keeps dropping L7 connections (fail closed).
pub fn start(server: Arc<Server>, opts: Options, records: Records) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("l7-proxy")
        .enable_all()
        .build()
        .context("start the L7 proxy's runtime")?;
    rt.block_on(dnsproxy::ensure_routing(opts.mark, opts.table))
        .context("route marked packets to the local table")?;
    server
        .ensure_l7_steer()
        .context("attach the L7 steering program to lo")?;
    // A routed node (Calico's, ptp) looks up a socket for every TCP
    // packet it forwards ("early demux"); one found (the proxy's, for the
    // tuple it took over) makes the stack drop the packet instead of
    // forwarding it to the container's veth, where palisade steers it.
    std::fs::write("/proc/sys/net/ipv4/tcp_early_demux", "0")
        .context("turn off TCP early demux (net.ipv4.tcp_early_demux)")?;
    let listener = {
        let _guard = rt.enter();
        bind(opts.port).with_context(|| format!("bind the L7 proxy on port {}", opts.port))?
    };
    server
        .set_l7_listener(&listener)
        .context("give the L7 steering programs the proxy's listener")?;
    server
        .update_proxy(|cfg| ProxyConfig {
            mark: opts.mark,
            http_port: opts.port,
            ..cfg
        })
        .context("tell the datapath where the L7 proxy listens")?;
    eprintln!(
        "palisade daemon: L7 proxy on port {0} (mark {1:#x}, table {2})",
        opts.port, opts.mark, opts.table
    );
    let rules = Arc::new(Rules {
        server,
        cache: Mutex::new((u64::MAX, HashMap::new())),
    });
    thread::Builder::new()
        .name("l7-proxy".into())
        .spawn(move || rt.block_on(serve(listener, rules, records)))
        .context("start the L7 proxy's thread")?;
    Ok(())
}
