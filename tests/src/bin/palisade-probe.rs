//! `palisade-probe serve`: the server side of the test bed's probes. Echoes
//! TCP lines and UDP datagrams on the given ports (IPv4 and IPv6), answers
//! a TCP `who` line with the address the client reached, and
//! answers SCTP INIT chunks with INIT ACK on raw sockets (the test kernel
//! has no SCTP stack). Prints `ready` once every socket is bound.
//!
//! `palisade-probe rr --to ADDR:PORT --count N [--size B] [--timeout-ms MS]
//! [--interval-us US] [--connect-each]`:
//! the benchmarks' request/response client. Sends N small requests to an
//! echo server, one at a time, over one connection (or a new connection
//! per request), and prints one JSON line with the latency percentiles.

use std::{
    io::{Read, Write},
    mem::MaybeUninit,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use testbed::probe::{raw_sctp_socket, sctp_packet, sctp_parse, sctp_payload};

fn dual_stack(ty: Type, proto: Protocol, port: u16) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, ty, Some(proto))?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(SocketAddr::new(
        "::".parse().expect("addr"),
        port,
    )))?;
    Ok(s)
}

fn ports(arg: Option<&String>) -> Vec<u16> {
    arg.map(|s| {
        s.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().unwrap_or_else(|_| panic!("bad port {p}")))
            .collect()
    })
    .unwrap_or_default()
}

fn usage() -> ! {
    eprintln!(
        "usage: palisade-probe serve --ports 80,81\n       \
         palisade-probe http --ports 80,8080\n       \
         palisade-probe rr --to ADDR:PORT --count N [--size BYTES] [--timeout-ms MS] [--interval-us US] [--connect-each]"
    );
    std::process::exit(2);
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args),
        Some("rr") => rr(&args),
        Some("http") => http(&args),
        _ => usage(),
    }
}

/// `palisade-probe http --ports 80,8080`: a small HTTP server (IPv4 and
/// IPv6; HTTP/1.1 with keep-alive and pipelining, HTTP/2 with prior
/// knowledge) whose every answer is `200` with the body `METHOD PATH from
/// CLIENT-ADDRESS` and the request's `x-*` headers echoed back. A gRPC
/// call (`content-type: application/grpc`) is answered as gRPC: its
/// message echoed back, status OK in the trailers. An upgrade request
/// (WebSocket) is accepted and the connection then echoes bytes. Prints
/// `ready` once bound.
fn http(args: &[String]) {
    let ports = ports(flag(args, "--ports"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut listeners = Vec::new();
    for port in ports {
        let s = dual_stack(Type::STREAM, Protocol::TCP, port)
            .unwrap_or_else(|e| panic!("bind {port}: {e}"));
        s.listen(128)
            .unwrap_or_else(|e| panic!("listen {port}: {e}"));
        s.set_nonblocking(true).unwrap_or_else(|e| panic!("{e}"));
        listeners.push(TcpListener::from(s));
    }
    rt.block_on(async move {
        for l in listeners {
            let l = tokio::net::TcpListener::from_std(l).unwrap_or_else(|e| panic!("{e}"));
            tokio::spawn(async move {
                while let Ok((conn, peer)) = l.accept().await {
                    tokio::spawn(http_conn(conn, peer));
                }
            });
        }
        println!("ready");
        std::future::pending::<()>().await;
    });
}

type ProbeBody = http_body_util::combinators::BoxBody<hyper::body::Bytes, hyper::Error>;

async fn http_conn(conn: tokio::net::TcpStream, peer: SocketAddr) {
    use http_body_util::BodyExt;
    let peer = match peer {
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map_or_else(|| v6.ip().to_string(), |v4| v4.to_string()),
        SocketAddr::V4(v4) => v4.ip().to_string(),
    };
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let peer = peer.clone();
            async move {
                let grpc = req
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/grpc"));
                let full = |b: hyper::body::Bytes| -> ProbeBody {
                    http_body_util::Full::new(b)
                        .map_err(|never: std::convert::Infallible| match never {})
                        .boxed()
                };
                if req.headers().contains_key("upgrade") {
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(up) = on.await {
                            let mut io = hyper_util::rt::TokioIo::new(up);
                            let (mut r, mut w) = tokio::io::split(&mut io);
                            let _copied = tokio::io::copy(&mut r, &mut w).await;
                        }
                    });
                    return Ok::<_, hyper::Error>(
                        hyper::Response::builder()
                            .status(101)
                            .header("connection", "upgrade")
                            .header("upgrade", "websocket")
                            .body(full(hyper::body::Bytes::new()))
                            .expect("response"),
                    );
                }
                let mut echo = Vec::new();
                for (name, value) in req.headers() {
                    if name.as_str().starts_with("x-") {
                        echo.push((name.clone(), value.clone()));
                    }
                }
                let line = format!(
                    "{} {} from {peer}\n",
                    req.method(),
                    req.uri().path_and_query().map_or("/", |p| p.as_str())
                );
                let body = req.into_body().collect().await?.to_bytes();
                if grpc {
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                    let frames = vec![
                        Ok(hyper::body::Frame::data(body)),
                        Ok(hyper::body::Frame::trailers(trailers)),
                    ];
                    let stream = http_body_util::StreamBody::new(futures::stream::iter(frames));
                    return Ok(hyper::Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc")
                        .header("x-served-by", line.trim())
                        .body(stream.boxed())
                        .expect("response"));
                }
                let mut resp = hyper::Response::builder()
                    .status(200)
                    .header("content-type", "text/plain");
                for (n, v) in echo {
                    resp = resp.header(n, v);
                }
                Ok(resp.body(full(line.into())).expect("response"))
            }
        });
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let _done = builder
        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(conn), service)
        .await;
}

/// One request/response over `conn` (connecting first if there is none).
fn round_trip(
    conn: &mut Option<TcpStream>,
    to: SocketAddr,
    request: &[u8],
    reply: &mut [u8],
    timeout: Duration,
) -> std::io::Result<()> {
    if conn.is_none() {
        let c = TcpStream::connect_timeout(&to, timeout)?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(timeout))?;
        c.set_write_timeout(Some(timeout))?;
        *conn = Some(c);
    }
    let c = conn.as_mut().expect("connected above");
    c.write_all(request)?;
    c.read_exact(reply)?;
    Ok(())
}

fn rr(args: &[String]) {
    let to: SocketAddr = flag(args, "--to")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage());
    let count: usize = flag(args, "--count")
        .map(|s| s.parse().unwrap_or_else(|_| usage()))
        .unwrap_or(1000);
    let size: usize = flag(args, "--size")
        .map(|s| s.parse().unwrap_or_else(|_| usage()))
        .unwrap_or(64);
    if count == 0 || size == 0 {
        usage();
    }
    let timeout = Duration::from_millis(
        flag(args, "--timeout-ms")
            .map(|s| s.parse().unwrap_or_else(|_| usage()))
            .unwrap_or(2000),
    );
    let interval = Duration::from_micros(
        flag(args, "--interval-us")
            .map(|s| s.parse().unwrap_or_else(|_| usage()))
            .unwrap_or(0),
    );
    let connect_each = args.iter().any(|a| a == "--connect-each");
    let request = vec![b'x'; size];
    let mut reply = vec![0u8; size];
    let mut conn = None;
    let mut lat_ns: Vec<u64> = Vec::with_capacity(count);
    let mut failed = 0u64;
    for _ in 0..count {
        let start = Instant::now();
        match round_trip(&mut conn, to, &request, &mut reply, timeout) {
            Ok(()) => lat_ns.push(start.elapsed().as_nanos() as u64),
            Err(_) => {
                failed += 1;
                conn = None;
            }
        }
        if connect_each {
            conn = None;
        }
        if !interval.is_zero() {
            thread::sleep(interval.saturating_sub(start.elapsed()));
        }
    }
    lat_ns.sort_unstable();
    let pct = |p: f64| -> Option<f64> {
        if lat_ns.is_empty() {
            return None;
        }
        let i = ((lat_ns.len() as f64 * p).ceil() as usize).clamp(1, lat_ns.len()) - 1;
        Some(lat_ns[i] as f64 / 1000.0)
    };
    let json = serde_json::json!({
        "count": count,
        "ok": lat_ns.len(),
        "failed": failed,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "max_us": pct(1.0),
    });
    println!("{json}");
}

fn serve(args: &[String]) {
    let list = ports(flag(args, "--ports"));
    let mut handles = Vec::new();
    for &port in &list {
        let tcp = dual_stack(Type::STREAM, Protocol::TCP, port)
            .unwrap_or_else(|e| panic!("tcp {port}: {e}"));
        tcp.listen(128)
            .unwrap_or_else(|e| panic!("listen {port}: {e}"));
        let listener: TcpListener = tcp.into();
        handles.push(thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                // Echo until the client closes, so tests can hold a
                // connection open across policy changes.
                thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = [0u8; 65536];
                    // "who": which address the client reached (the backend
                    // a Service's DNAT chose).
                    let me = conn.local_addr().map(|a| a.ip().to_canonical());
                    while let Ok(n) = conn.read(&mut buf) {
                        if &buf[..n] == b"who\n"
                            && let Ok(me) = me
                        {
                            let _ = conn.write_all(format!("{me}\n").as_bytes());
                            break;
                        }
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        }));
        let udp: UdpSocket = dual_stack(Type::DGRAM, Protocol::UDP, port)
            .unwrap_or_else(|e| panic!("udp {port}: {e}"))
            .into();
        handles.push(thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        }));
    }
    for v6 in [false, true] {
        let sock = raw_sctp_socket(v6).unwrap_or_else(|e| panic!("raw sctp socket: {e}"));
        let served = list.clone();
        handles.push(thread::spawn(move || {
            loop {
                let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                // SAFETY: recv_from initialised the first n bytes.
                let bytes: Vec<u8> = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                let Some((sport, dport, 1, tag)) = sctp_parse(sctp_payload(&bytes)) else {
                    continue;
                };
                if !served.contains(&dport) {
                    continue;
                }
                let reply = sctp_packet(dport, sport, tag, 2, tag);
                let _ = sock.send_to(&reply, &from);
            }
        }));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for h in handles {
        let _ = h.join();
    }
}
