//! L7: what the node's HTTP proxy adds. The same server pod answers on a
//! port whose rule carries HTTP rules (through the proxy) and on a port
//! whose rule does not (direct); requests at fixed rates and back to back,
//! HTTP/1.1 over kept-alive connections and over a new connection per
//! request, and gRPC over HTTP/2; the daemon's CPU and memory.

use std::{
    fmt::Write as _,
    io::{BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use testbed::{
    http::{HttpServer, read_reply},
    node::{Node, NodeOptions},
    sys::in_netns,
};

use crate::{
    Config, Report,
    stats::{Table, percentile},
};

const POLICY: &str = r#"
apiVersion: palisade.io/v1alpha1
kind: PalisadeNetworkPolicy
metadata: {name: bench-http, namespace: app}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports:
    - port: 80
      rules:
        http: [{method: GET, path: "/books(/.*)?"}]
    - port: 8080
    - port: 50051
      rules:
        http: [{method: POST, path: /bookstore\.Books/GetBook}]
    - port: 50052
"#;

/// The ports: (through the proxy, direct).
const HTTP_PORTS: (u16, u16) = (80, 8080);
const GRPC_PORTS: (u16, u16) = (50051, 50052);

#[derive(Debug, Clone, Copy)]
enum Mode {
    KeepAlive,
    NewConnection,
    Grpc,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Self::KeepAlive => "HTTP/1.1, keep-alive",
            Self::NewConnection => "HTTP/1.1, a connection per request",
            Self::Grpc => "gRPC (HTTP/2)",
        }
    }
}

const REQUEST: &[u8] = b"GET /books/1 HTTP/1.1\r\nhost: api\r\ncontent-length: 0\r\n\r\n";
const REQUEST_CLOSE: &[u8] =
    b"GET /books/1 HTTP/1.1\r\nhost: api\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

fn h1_once(conn: &mut Option<BufReader<TcpStream>>, to: SocketAddr, close: bool) -> Option<()> {
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let _ = s.set_nodelay(true);
        *conn = Some(BufReader::new(s));
    }
    let r = conn.as_mut()?;
    let ok = r
        .get_mut()
        .write_all(if close { REQUEST_CLOSE } else { REQUEST })
        .is_ok()
        && read_reply(r).is_ok_and(|rep| rep.status == 200);
    if !ok || close {
        *conn = None;
    }
    ok.then_some(())
}

/// `n` requests at `rate` per second over `lanes` connections (each its
/// own thread, paced at rate / lanes); the latencies in microseconds of
/// those answered 200, and how many were not.
fn paced(netns: &Path, to: SocketAddr, mode: Mode, rate: f64, n: usize) -> (Vec<f64>, usize) {
    let lanes = ((rate / 2000.0).ceil() as usize).clamp(1, 8);
    let per_lane = n / lanes;
    let gap = Duration::from_secs_f64(lanes as f64 / rate);
    let results: Vec<(Vec<f64>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..lanes)
            .map(|_| {
                s.spawn(move || {
                    in_netns(netns, move || match mode {
                        Mode::Grpc => grpc_lane(to, gap, per_lane),
                        _ => h1_lane(to, gap, per_lane, matches!(mode, Mode::NewConnection)),
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut lat = Vec::new();
    let mut failed = 0;
    for (l, f) in results {
        lat.extend(l);
        failed += f;
    }
    (lat, failed)
}

fn h1_lane(to: SocketAddr, gap: Duration, n: usize, close: bool) -> (Vec<f64>, usize) {
    let mut conn = None;
    let mut lat = Vec::with_capacity(n);
    let mut failed = 0;
    let start = Instant::now();
    for i in 0..n {
        let due = start + gap * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        match h1_once(&mut conn, to, close) {
            Some(()) => lat.push(t.elapsed().as_secs_f64() * 1e6),
            None => failed += 1,
        }
    }
    (lat, failed)
}

type GrpcSender = hyper::client::conn::http2::SendRequest<http_body_util::Full<hyper::body::Bytes>>;

/// One HTTP/2 connection to `to` (its driver spawned on the runtime).
async fn grpc_connect(to: SocketAddr) -> Option<GrpcSender> {
    let stream = tokio::net::TcpStream::connect(to).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .ok()?;
    tokio::spawn(async move {
        let _ended = conn.await;
    });
    Some(sender)
}

async fn grpc_call(sender: &mut GrpcSender, to: SocketAddr) -> Option<()> {
    use http_body_util::BodyExt;
    let msg = hyper::body::Bytes::from_static(&[0, 0, 0, 0, 3, 0x0a, 0x01, 0x78]);
    let req = hyper::Request::post(format!("http://{to}/bookstore.Books/GetBook"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(msg))
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?;
    let status = body
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status.as_deref() == Some("0")).then_some(())
}

fn grpc_lane(to: SocketAddr, gap: Duration, n: usize) -> (Vec<f64>, usize) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return (Vec::new(), n);
    };
    rt.block_on(async move {
        let Some(mut sender) = grpc_connect(to).await else {
            return (Vec::new(), n);
        };
        let mut lat = Vec::with_capacity(n);
        let mut failed = 0;
        let start = tokio::time::Instant::now();
        for i in 0..n {
            tokio::time::sleep_until(start + gap * i as u32).await;
            let t = Instant::now();
            match grpc_call(&mut sender, to).await {
                Some(()) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                None => failed += 1,
            }
        }
        (lat, failed)
    })
}

/// Requests per second `lanes` clients reach back to back for `secs`.
fn saturated(netns: &Path, to: SocketAddr, mode: Mode, lanes: usize, secs: f64) -> f64 {
    let done: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..lanes)
            .map(|_| {
                s.spawn(move || {
                    in_netns(netns, move || {
                        let n = 1_000_000;
                        let deadline = Instant::now() + Duration::from_secs_f64(secs);
                        match mode {
                            Mode::Grpc => {
                                // Paced with no gap, stopped by the clock.
                                let (lat, _) = grpc_until(to, deadline, n);
                                lat
                            }
                            _ => {
                                let close = matches!(mode, Mode::NewConnection);
                                let mut conn = None;
                                let mut ok = 0;
                                while Instant::now() < deadline {
                                    if h1_once(&mut conn, to, close).is_some() {
                                        ok += 1;
                                    }
                                }
                                ok
                            }
                        }
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    done as f64 / secs
}

fn grpc_until(to: SocketAddr, deadline: Instant, max: usize) -> (usize, usize) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return (0, 0);
    };
    rt.block_on(async move {
        let Some(mut sender) = grpc_connect(to).await else {
            return (0, 0);
        };
        let mut ok = 0;
        let mut failed = 0;
        for _ in 0..max {
            if Instant::now() >= deadline {
                break;
            }
            match grpc_call(&mut sender, to).await {
                Some(()) => ok += 1,
                None => failed += 1,
            }
        }
        (ok, failed)
    })
}

/// The daemon's CPU time so far (seconds) and resident memory (KiB).
pub(crate) fn daemon_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 12th and 13th of them.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (ticks(11) + ticks(12)) / hz;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (cpu, rss)
}

pub fn run(cfg: &Config, report: &mut Report) {
    let n = Node::new(NodeOptions {
        daemon: true,
        ..Default::default()
    });
    let api = n.add_pod("app", "api", &[]);
    let web = n.add_pod("app", "web", &[]);
    let _http = HttpServer::start(
        &api.netns,
        &[HTTP_PORTS.0, HTTP_PORTS.1, GRPC_PORTS.0, GRPC_PORTS.1],
    );
    for (name, app) in [("api", "api"), ("web", "web")] {
        n.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: app, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c}}]}}\n"
        ));
    }
    n.apply(POLICY);
    let addr: IpAddr = api.addr(false);
    let at = |port: u16| SocketAddr::new(addr, port);
    // The policy reaches the datapath and the proxy: wait for a 200.
    let deadline = Instant::now() + Duration::from_secs(60);
    while paced(&web.netns, at(HTTP_PORTS.0), Mode::KeepAlive, 100.0, 1)
        .0
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the L7 path never answered");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = n.daemon_pid().expect("the daemon runs");
    let secs = if cfg.short { 0.5 } else { 5.0 };
    let rates: &[f64] = if cfg.short {
        &[100.0, 1000.0]
    } else {
        &[100.0, 1000.0, 10_000.0]
    };
    let p = |v: &[f64], q: f64| percentile(v, q).unwrap_or(f64::NAN);
    let mut tbl = Table::new(&[
        "traffic",
        "rate (req/s)",
        "direct p50 / p99 (µs)",
        "through the proxy p50 / p99 (µs)",
        "added p50 / p99 (µs)",
        "failed (direct / proxy)",
    ]);
    let mut added_1000 = (f64::NAN, f64::NAN);
    let mut cpu_per_1000 = f64::NAN;
    for mode in [Mode::KeepAlive, Mode::NewConnection, Mode::Grpc] {
        let ports = if matches!(mode, Mode::Grpc) {
            GRPC_PORTS
        } else {
            HTTP_PORTS
        };
        for &rate in rates {
            let count = ((rate * secs) as usize).max(50);
            let mut via = (Vec::new(), 0);
            let mut direct = (Vec::new(), 0);
            let mut cpu = 0.0;
            for _ in 0..cfg.reps {
                let (d, df) = paced(&web.netns, at(ports.1), mode, rate, count);
                direct.0.extend(d);
                direct.1 += df;
                let before = daemon_usage(pid).0;
                let t = Instant::now();
                let (v, vf) = paced(&web.netns, at(ports.0), mode, rate, count);
                let elapsed = t.elapsed().as_secs_f64();
                cpu += (daemon_usage(pid).0 - before) / elapsed;
                via.0.extend(v);
                via.1 += vf;
            }
            let (v50, v99, d50, d99) = (
                p(&via.0, 0.5),
                p(&via.0, 0.99),
                p(&direct.0, 0.5),
                p(&direct.0, 0.99),
            );
            if matches!(mode, Mode::KeepAlive) && rate == 1000.0 {
                added_1000 = (v50 - d50, v99 - d99);
                // CPU share of one core per 1,000 req/s.
                cpu_per_1000 = cpu / cfg.reps as f64;
            }
            tbl.row(vec![
                mode.label().into(),
                format!("{rate:.0}"),
                format!("{d50:.0} / {d99:.0}"),
                format!("{v50:.0} / {v99:.0}"),
                format!("{:.0} / {:.0}", v50 - d50, v99 - d99),
                format!("{} / {}", direct.1, via.1),
            ]);
        }
    }
    let sat_secs = if cfg.short { 1.0 } else { 5.0 };
    let mut sat = Table::new(&[
        "traffic",
        "direct (req/s)",
        "through the proxy (req/s)",
        "ratio",
    ]);
    let mut ratio_ka = f64::NAN;
    for mode in [Mode::KeepAlive, Mode::NewConnection, Mode::Grpc] {
        let ports = if matches!(mode, Mode::Grpc) {
            GRPC_PORTS
        } else {
            HTTP_PORTS
        };
        let d = saturated(&web.netns, at(ports.1), mode, 4, sat_secs);
        let v = saturated(&web.netns, at(ports.0), mode, 4, sat_secs);
        if matches!(mode, Mode::KeepAlive) {
            ratio_ka = v / d;
        }
        sat.row(vec![
            mode.label().into(),
            format!("{d:.0}"),
            format!("{v:.0}"),
            format!("{:.2}", v / d),
        ]);
    }
    let rss = daemon_usage(pid).1;

    let mut body = String::new();
    let _ = writeln!(
        body,
        "One server pod answers on ports whose rule carries HTTP rules (80, gRPC 50051: \
         through the node's L7 proxy) and on ports whose rule does not (8080, 50052: direct); \
         a client pod sends `GET /books/1` (allowed) at fixed rates over kept-alive \
         connections (one per 2,000 req/s, at most 8), over a new connection per request, and \
         gRPC calls over one HTTP/2 connection per lane; {secs} s per rate and repetition, \
         {} repetition(s). Latency from sending the request to the whole answer.\n",
        cfg.reps
    );
    body.push_str(&tbl.render());
    let _ = writeln!(body, "\nBack to back, 4 clients for {sat_secs} s each:\n");
    body.push_str(&sat.render());
    let _ = writeln!(
        body,
        "\nThe daemon (proxy included) used {:.1}% of one core per 1,000 req/s (HTTP/1.1, \
         keep-alive, at 1,000 req/s); its resident memory after the runs: {:.1} MiB.",
        cpu_per_1000 * 100.0,
        rss as f64 / 1024.0
    );
    report.section("L7 (HTTP and gRPC through the node's proxy)", body);
    report.measured(
        "L7 added latency p50 at 1,000 req/s (µs)",
        Some(added_1000.0),
    );
    report.measured(
        "L7 added latency p99 at 1,000 req/s (µs)",
        Some(added_1000.1),
    );
    report.measured("L7 saturated throughput ratio (keep-alive)", Some(ratio_ka));
    report.measured("L7 proxy CPU per 1,000 req/s (cores)", Some(cpu_per_1000));
    report.target(
        "L7: added latency p50 under 0.3 ms at 1,000 req/s (HTTP/1.1 keep-alive)",
        &format!("{:.0} µs", added_1000.0),
        added_1000.0 < 300.0,
        "",
    );
    report.target(
        "L7: added latency p99 under 1 ms at 1,000 req/s (HTTP/1.1 keep-alive)",
        &format!("{:.0} µs", added_1000.1),
        added_1000.1 < 1000.0,
        "",
    );
    report.target(
        "L7: saturated throughput on an L7 port at least 50% of direct (keep-alive)",
        &format!("{:.0}%", ratio_ka * 100.0),
        ratio_ka >= 0.5,
        "",
    );
}
