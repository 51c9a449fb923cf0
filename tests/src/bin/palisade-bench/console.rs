//! The web console: time from a new connection to its edge in the
//! browser, page load and browser memory with 1,000 pods and 10,000 edges
//! (a flow log written before the daemon starts), and the daemon's CPU
//! while it streams the live map to 0, 1 and 10 clients under steady
//! traffic. The browser is Debian's headless chromium through
//! chromedriver, in the node's namespace.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use fantoccini::Client;
use palisade::{
    abi::{Direction, Reason, Verdict},
    flows::{FlowParty, FlowRecord},
};
use serde_json::Value;
use testbed::{
    browser::Driver,
    node::{Node, NodeOptions},
    probe::{PROBE_TIMEOUT, Proto, probe},
    sys::in_netns,
};

use crate::{
    Config, Report,
    l7::daemon_usage,
    stats::{Table, percentile},
};

const CONSOLE_PORT: u16 = 19981;
const DRIVER_PORT: u16 = 19525;
const PODS: usize = 1000;
const EDGES: usize = 10_000;

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// 1,000 pods in 20 namespaces (10 workloads of 5 pods each), 10,000
/// distinct pod-to-pod connections: 90% allowed, 5% denied, 5% audit.
fn synthetic_log() -> String {
    let pod = |i: usize| {
        let ns = i / 50;
        let w = (i % 50) / 5;
        FlowParty {
            kind: "pod".into(),
            address: format!("10.200.{}.{}", i / 250, 1 + i % 250)
                .parse()
                .unwrap(),
            namespace: Some(format!("ns-{ns:02}")),
            name: Some(format!("w{w}-{i}")),
            identity: 0,
            labels: [
                ("app".to_owned(), format!("w{w}")),
                ("pod-template-hash".to_owned(), format!("h{i}")),
            ]
            .into(),
            domains: Vec::new(),
        }
    };
    let mut out = String::new();
    for i in 0..EDGES {
        let (c, k) = (i % PODS, i / PODS);
        let s = (c + 1 + k * 37) % PODS;
        let verdict = match i % 20 {
            0 => Verdict::Deny,
            1 => Verdict::Audit,
            _ => Verdict::Allow,
        };
        let r = FlowRecord {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            kind: "flow".into(),
            verdict,
            reason: Reason::Policy,
            direction: Direction::Egress,
            endpoint: pod(c),
            peer: pod(s),
            protocol: "TCP".into(),
            sport: 40000 + u16::try_from(k).unwrap(),
            dport: 80 + u16::try_from(i % 5).unwrap(),
            policy: None,
            tier: None,
            isolated_by: Vec::new(),
            dns: None,
            http: None,
        };
        out.push_str(&serde_json::to_string(&r).unwrap());
        out.push('\n');
    }
    out
}

/// Resident memory of chromium's renderer processes (KiB).
fn renderer_rss() -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.contains("chromium") || !cmd.contains("--type=renderer") {
            continue;
        }
        total += std::fs::read_to_string(e.path().join("status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap()
}

/// Open the console and wait for its first map; (ms to it, JS heap MiB,
/// renderer RSS MiB, what it shows).
async fn load(c: &Client, url: &str) -> (f64, f64, f64, String) {
    c.goto("about:blank").await.unwrap();
    c.goto(url).await.unwrap();
    let start = Instant::now();
    while js(c, "return document.body.dataset.ready === '1';").await != Value::Bool(true) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the console's map never loaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the table and layout settle before reading memory.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let ready = js(c, "return Number(document.body.dataset.readyAt);")
        .await
        .as_f64()
        .unwrap_or(f64::NAN);
    let heap = js(c, "return performance.memory.usedJSHeapSize;")
        .await
        .as_f64()
        .unwrap_or(f64::NAN)
        / 1048576.0;
    let shows = js(c, "return document.getElementById('counts').textContent;")
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (ready, heap, renderer_rss() as f64 / 1024.0, shows)
}

/// A client reading the live stream until told to stop.
fn stream_client(
    netns: std::path::PathBuf,
    token: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        in_netns(&netns, || {
            let mut s = TcpStream::connect(("127.0.0.1", CONSOLE_PORT)).unwrap();
            write!(
                s,
                "GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut r = BufReader::new(s);
            let mut events = 0;
            let mut line = String::new();
            while !stop.load(Ordering::Relaxed) {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) if line.starts_with("event: map") => events += 1,
                    _ => {}
                }
            }
            events
        })
    })
}

pub fn run(cfg: &Config, report: &mut Report) {
    let n = Node::new(NodeOptions {
        daemon: true,
        defer_daemon: true,
        daemon_args: vec![
            "--console-listen".into(),
            format!("127.0.0.1:{CONSOLE_PORT}"),
        ],
        ..Default::default()
    });
    let log_dir = n.state_dir.join("flows");
    std::fs::create_dir_all(&log_dir).unwrap();
    std::fs::write(log_dir.join("flows.log"), synthetic_log()).unwrap();
    n.start_daemon();
    n.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: bench, labels: {app: a}}\nspec: {containers: [{name: c}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: bench, labels: {app: b}}\nspec: {containers: [{name: c}]}\n",
    );
    let a = n.add_pod("bench", "a", &[]);
    let b = n.add_pod("bench", "b", &[80]);
    let out = n.ctl(&["console"], None);
    assert!(out.status.success(), "palisadectl console");
    let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let token = url.split_once("token=").unwrap().1.to_owned();
    let pid = n.daemon_pid().expect("the daemon runs");
    let driver = Driver::start(&n.netns.path, DRIVER_PORT);
    let reps = cfg.reps;
    let tries = if cfg.short { 5 } else { 50 };

    // Page load and browser memory, the map at its automatic level
    // (workloads, as there are more than 300 pods) and at pod level.
    let netns = n.netns.path.clone();
    let (loads, latencies) = {
        let (url, a, b) = (url.clone(), Arc::clone(&a), Arc::clone(&b));
        in_netns(&netns.clone(), move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // A fresh browser for each load, so that memory is the
                // console's alone; an empty page's renderer for comparison.
                let mut loads: BTreeMap<&str, Vec<(f64, f64, f64, String)>> = BTreeMap::new();
                for _ in 0..reps {
                    let c = driver.browser().await;
                    c.goto("about:blank").await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                    let heap = js(&c, "return performance.memory.usedJSHeapSize;").await.as_f64().unwrap_or(f64::NAN) / 1048576.0;
                    loads.entry("an empty page (about:blank), for comparison").or_default().push((f64::NAN, heap, renderer_rss() as f64 / 1024.0, String::new()));
                    c.close().await.unwrap();
                    for (name, extra) in [("automatic (workloads)", ""), ("pods", "&level=pod")] {
                        let c = driver.browser().await;
                        let l = load(&c, &format!("{url}{extra}")).await;
                        loads.entry(name).or_default().push(l);
                        c.close().await.unwrap();
                    }
                }
                let c = driver.browser().await;
                // A new connection to its edge drawn.
                c.goto(&format!("{url}&namespace=bench&level=pod")).await.unwrap();
                let sel = "document.querySelector('g.edge[data-from=\"pod:bench/a\"][data-to=\"pod:bench/b\"]')";
                let mut latencies = Vec::new();
                for _ in 0..tries {
                    let count = |v: Value| v.as_f64().unwrap_or(0.0);
                    let before = count(js(&c, &format!("const e = {sel}; return e ? Number(e.dataset.connections) : 0;")).await);
                    let t0 = now_ms();
                    let ok = probe(&a.netns, b.addr(false), Proto::Tcp, 80, PROBE_TIMEOUT);
                    assert!(ok, "a -> b");
                    let start = Instant::now();
                    loop {
                        let v = js(&c, &format!("const e = {sel}; return e ? [Number(e.dataset.connections), Number(e.dataset.updated)] : [0, 0];")).await;
                        if count(v[0].clone()) > before {
                            latencies.push(count(v[1].clone()) - t0);
                            break;
                        }
                        assert!(start.elapsed() < Duration::from_secs(20), "the new connection never reached the map");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                c.close().await.unwrap();
                (loads, latencies)
            })
        })
    };

    // The daemon's CPU with 0, 1 and 10 clients on the live stream while
    // a connection a second... fifty a second arrive.
    let secs = if cfg.short { 3.0 } else { 20.0 };
    let mut cpu = Vec::new();
    for clients in [0usize, 1, 10] {
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..clients)
            .map(|_| stream_client(n.netns.path.clone(), token.clone(), Arc::clone(&stop)))
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        let (cpu0, _) = daemon_usage(pid);
        let start = Instant::now();
        let mut conns = 0;
        while start.elapsed().as_secs_f64() < secs {
            if probe(&a.netns, b.addr(false), Proto::Tcp, 80, PROBE_TIMEOUT) {
                conns += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (cpu1, rss) = daemon_usage(pid);
        let wall = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let events: usize = readers.into_iter().map(|r| r.join().unwrap_or(0)).sum();
        cpu.push((
            clients,
            (cpu1 - cpu0) / wall * 100.0,
            conns as f64 / wall,
            events,
            rss,
        ));
    }

    let p = |v: &[f64], q: f64| percentile(v, q).unwrap_or(f64::NAN);
    let mut body = String::new();
    let _ = writeln!(
        body,
        "The node daemon serves the console (`--console-listen`) from a flow log of {PODS} pods in 20 namespaces (10 workloads of 5 pods each) and {EDGES:} distinct pod-to-pod connections (90% allowed, 5% denied, 5% audit), written before it starts, plus two real pods. The browser is Debian's chromium {}, headless, driven through chromedriver. Debug or release: whichever `palisadectl` the command ran (`bench/run` builds release).\n",
        std::process::Command::new("chromium")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .unwrap_or("?")
                .to_owned())
            .unwrap_or_default()
    );
    let mut t = Table::new(&[
        "page",
        "shows",
        "page load to first map drawn (ms)",
        "JS heap (MiB)",
        "renderers' RSS (MiB)",
    ]);
    for (name, ls) in &loads {
        let col = |f: fn(&(f64, f64, f64, String)) -> f64| -> f64 {
            p(&ls.iter().map(f).collect::<Vec<_>>(), 0.5)
        };
        let (ready, heap, rss) = (col(|l| l.0), col(|l| l.1), col(|l| l.2));
        if !name.starts_with("an empty") {
            report.measured(&format!("console page load ({name})"), Some(ready));
        }
        t.row(vec![
            (*name).to_owned(),
            ls.last().map(|l| l.3.clone()).unwrap_or_default(),
            if ready.is_finite() {
                format!("{ready:.0}")
            } else {
                "—".into()
            },
            format!("{heap:.1}"),
            format!("{rss:.0}"),
        ]);
    }
    body.push_str(&t.render());
    let _ = writeln!(
        body,
        "\nMedians over {reps} loads, each in a fresh headless chromium. Page load: from the navigation to the first map drawn (the page, its script, the stream's first full map built on the daemon from the {EDGES} records, the SVG drawn). JS heap: `performance.memory.usedJSHeapSize` a second after. Renderers' RSS: every chromium renderer process together (the page's and the helpers chromium keeps), for comparison with an empty page."
    );
    let (p50, p99) = (p(&latencies, 0.5), p(&latencies, 0.99));
    report.measured("console: new connection to its edge p50", Some(p50));
    let _ = writeln!(
        body,
        "\nFrom a new connection (the client's `connect`) to the browser drawing its edge's new count, {} connections one after another, with the {EDGES} records in memory: **p50 {p50:.0} ms, p99 {p99:.0} ms**. The path: the datapath's flow event, the agent's drain (it waits up to 200 ms for events), the console's stream (a new map at most every 200 ms, sent as a difference), the page's update.\n",
        latencies.len()
    );
    let mut t = Table::new(&[
        "clients on the live stream",
        "daemon CPU (% of one core)",
        "new connections/s",
        "map updates sent",
        "daemon RSS (MiB)",
    ]);
    for (clients, pct, rate, events, rss) in &cpu {
        report.measured(
            &format!("console: daemon CPU with {clients} stream clients"),
            Some(*pct),
        );
        t.row(vec![
            clients.to_string(),
            format!("{pct:.1}"),
            format!("{rate:.0}"),
            events.to_string(),
            format!("{:.0}", *rss as f64 / 1024.0),
        ]);
    }
    let _ = writeln!(
        body,
        "The daemon's CPU over {secs:.0} s of steady traffic (one new connection every 20 ms, so every map update carries a change) with 0, 1 and 10 clients reading the live stream of the whole map (automatic level: {EDGES} records aggregated by workload). The clients are plain HTTP readers of `/api/stream`, the same stream a browser tab opens; a browser's own cost is in the table above.\n"
    );
    body.push_str(&t.render());
    report.section("Web console", body);
}
