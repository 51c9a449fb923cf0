//! Hosts without Kubernetes sharing etcd: the time from `palisadectl apply`
//! on one host to the verdict changing in every host's datapath, with the
//! 3 real hosts alone and with 100 simulated hosts watching the same keys;
//! etcd keys and bytes per published container and per policy.

use std::{
    fmt::Write,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use palisade::{
    abi::Direction,
    dataplane::{AttachMode, Dataplane, Lookup, kernel::KernelDataplane},
};
use testbed::{
    etcd::{Hosts, ctl},
    sys::describe,
};

use crate::{
    Config, Report,
    stats::{Table, percentile},
};

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench}
---
apiVersion: v1
kind: Pod
metadata: {name: server-0, namespace: bench, labels: {app: server}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server-1, namespace: bench, labels: {app: server}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server-2, namespace: bench, labels: {app: server}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {containers: [{name: c}]}
"#;

/// Servers on every host accept TCP 80 from pods labelled app=`peer`.
fn policy(peer: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: servers, namespace: bench}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  \
         - from: [{{podSelector: {{matchLabels: {{app: {peer}}}}}}}]\n    ports: [{{port: 80}}]\n"
    )
}

/// One host's datapath answer for "client → this host's server, TCP 80".
struct Probe {
    dp: KernelDataplane,
    ep_id: u32,
    peer: IpAddr,
}

impl Probe {
    fn allowed(&self) -> Option<bool> {
        self.dp
            .lookup(&Lookup {
                ep_id: self.ep_id,
                direction: Direction::Ingress,
                peer: self.peer,
                protocol: 6,
                port: 80,
            })
            .ok()
            .map(|a| a.allowed)
    }
}

/// Simulated hosts: `n` etcd clients (each its own connection) watching
/// palisade's keys, as every host's daemon does; each put's arrival time
/// is recorded.
struct Watchers {
    arrivals: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchers {
    fn start(n: usize, endpoints: Vec<String>, tls: TlsOptions) -> Self {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (arrivals.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for i in 0..n {
                    let endpoint = endpoints[i % endpoints.len()].clone();
                    let opts = ConnectOptions::new().with_tls(tls.clone());
                    let mut client = Client::connect([endpoint], Some(opts)).await.unwrap();
                    let (_w, mut stream) = client
                        .watch(
                            "/palisade/objects/",
                            Some(etcd_client::WatchOptions::new().with_prefix()),
                        )
                        .await
                        .unwrap()
                        .split();
                    let (a, s) = (a.clone(), s.clone());
                    tasks.push(tokio::spawn(async move {
                        let _keep = (client, _w);
                        while !s.load(Ordering::Relaxed) {
                            let Ok(Ok(Some(resp))) =
                                tokio::time::timeout(Duration::from_millis(200), stream.message())
                                    .await
                            else {
                                continue;
                            };
                            let now = Instant::now();
                            for ev in resp.events() {
                                if let Some(kv) = ev.kv() {
                                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                                    a.lock().unwrap().push((key, now));
                                }
                            }
                        }
                    }));
                }
                ready_tx.send(()).unwrap();
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("simulated watchers connected");
        Watchers {
            arrivals,
            stop,
            thread: Some(thread),
        }
    }

    /// Arrivals of `key` after `since`, one per watcher (ms after `since`).
    fn take(&self, key: &str, since: Instant) -> Vec<f64> {
        let mut a = self.arrivals.lock().unwrap();
        let out = a
            .iter()
            .filter(|(k, t)| k == key && *t >= since)
            .map(|(_, t)| t.duration_since(since).as_secs_f64() * 1e3)
            .collect();
        a.clear();
        out
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Apply `yaml` from host 0 and wait until every probe answers `want`;
/// the time to each host's change (ms), and the command's own time.
fn flip(
    hosts: &Hosts,
    env: &[(String, String)],
    probes: &[Probe],
    yaml: &str,
    want: bool,
) -> (Vec<f64>, f64, Instant) {
    let start = Instant::now();
    let done = Arc::new(Mutex::new(vec![None; probes.len()]));
    let cmd_ms = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let deadline = start + Duration::from_secs(60);
            loop {
                let mut d = done.lock().unwrap();
                for (i, p) in probes.iter().enumerate() {
                    if d[i].is_none() && p.allowed() == Some(want) {
                        d[i] = Some(start.elapsed().as_secs_f64() * 1e3);
                    }
                }
                if d.iter().all(Option::is_some) || Instant::now() > deadline {
                    return;
                }
                drop(d);
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        let out = ctl(&hosts.nodes[0], env, &["apply", "-f", "-"], Some(yaml));
        let cmd_ms = start.elapsed().as_secs_f64() * 1e3;
        assert!(out.status.success(), "apply: {}", describe(&out));
        watcher.join().unwrap();
        cmd_ms
    });
    let d = done.lock().unwrap();
    let times = d
        .iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| panic!("host-{i}'s verdict did not change within 60 s")))
        .collect();
    (times, cmd_ms, start)
}

pub fn run(cfg: &Config, report: &mut Report) {
    let rounds = if cfg.short { 4 } else { 40 };
    let simulated = if cfg.short { 10 } else { 100 };
    let hosts = Hosts::new(3, &[]);
    let env = hosts.etcd.env_as("palisade-admin");
    let out = ctl(&hosts.nodes[0], &env, &["apply", "-f", "-"], Some(PODS));
    assert!(out.status.success(), "apply pods: {}", describe(&out));
    let client = hosts.nodes[0].add_pod("bench", "client", &[]);
    let servers: Vec<_> = (0..3)
        .map(|i| hosts.nodes[i].add_pod("bench", &format!("server-{i}"), &[80]))
        .collect();
    let peer = client.v4.expect("client address");
    let probes: Vec<Probe> = hosts
        .nodes
        .iter()
        .zip(&servers)
        .map(|(n, srv)| {
            let ep_id = n
                .endpoints()
                .iter()
                .find(|e| e["name"] == srv.name.as_str())
                .and_then(|e| e["id"].as_u64())
                .expect("server endpoint id") as u32;
            let mut dp = KernelDataplane::new(&n.bpf_root, AttachMode::Auto);
            assert!(dp.open_existing().expect("open maps"), "maps loaded");
            Probe { dp, ep_id, peer }
        })
        .collect();
    // Wait until every host knows the client (host 0 published it).
    let (_, _, _) = flip(&hosts, &env, &probes, &policy("client"), true);

    let mut alone: Vec<f64> = Vec::new();
    let mut alone_cmd = Vec::new();
    for r in 0..rounds {
        let (peer, want) = if r % 2 == 0 {
            ("nobody", false)
        } else {
            ("client", true)
        };
        let (t, c, _) = flip(&hosts, &env, &probes, &policy(peer), want);
        alone.extend(t);
        alone_cmd.push(c);
    }

    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(hosts.pki.cert("ca")).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(hosts.pki.cert("palisade-admin")).unwrap(),
            std::fs::read(hosts.pki.key("palisade-admin")).unwrap(),
        ));
    let endpoints: Vec<String> = hosts
        .etcd
        .endpoints()
        .split(',')
        .map(str::to_owned)
        .collect();
    // The watchers live in the bench process (host namespace): they reach
    // the fabric's members from inside it.
    let watchers = testbed::sys::in_netns(&hosts.fabric.path, || {
        Watchers::start(simulated, endpoints.clone(), tls.clone())
    });
    let mut loaded: Vec<f64> = Vec::new();
    let mut loaded_cmd = Vec::new();
    let mut events: Vec<f64> = Vec::new();
    for r in 0..rounds {
        let (peer, want) = if r % 2 == 0 {
            ("nobody", false)
        } else {
            ("client", true)
        };
        let (t, c, start) = flip(&hosts, &env, &probes, &policy(peer), want);
        loaded.extend(t);
        loaded_cmd.push(c);
        // Give the last watchers a moment, then collect.
        std::thread::sleep(Duration::from_millis(200));
        events.extend(watchers.take("/palisade/objects/NetworkPolicy/bench/servers", start));
    }
    drop(watchers);

    // etcd's keys and bytes per published container and per policy.
    let sizes = testbed::sys::in_netns(&hosts.fabric.path, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let mut c = Client::connect(
                    [endpoints[0].clone()],
                    Some(ConnectOptions::new().with_tls(tls.clone())),
                )
                .await
                .unwrap();
                let mut out = Vec::new();
                for prefix in ["/palisade/endpoints/", "/palisade/objects/NetworkPolicy/"] {
                    let r = c
                        .get(prefix, Some(GetOptions::new().with_prefix()))
                        .await
                        .unwrap();
                    let bytes: usize = r
                        .kvs()
                        .iter()
                        .map(|kv| kv.key().len() + kv.value().len())
                        .sum();
                    out.push((r.kvs().len(), bytes));
                }
                let (eps, nps) = (out[0], out[1]);
                (eps, nps)
            })
    });
    let ((ep_keys, ep_bytes), (np_keys, np_bytes)) = sizes;

    let p = |v: &[f64], q: f64| percentile(v, q).unwrap_or(f64::NAN);
    let mut t = Table::new(&[
        "",
        "apply command (ms, p50 / p99)",
        "apply to every host's verdict (ms, p50 / p99)",
        "write to a simulated host's watch event (ms, p50 / p99)",
    ]);
    t.row(vec![
        "3 hosts".into(),
        format!("{:.0} / {:.0}", p(&alone_cmd, 0.5), p(&alone_cmd, 0.99)),
        format!("{:.0} / {:.0}", p(&alone, 0.5), p(&alone, 0.99)),
        "—".into(),
    ]);
    t.row(vec![
        format!("3 hosts + {simulated} simulated hosts watching"),
        format!("{:.0} / {:.0}", p(&loaded_cmd, 0.5), p(&loaded_cmd, 0.99)),
        format!("{:.0} / {:.0}", p(&loaded, 0.5), p(&loaded, 0.99)),
        format!("{:.0} / {:.0}", p(&events, 0.5), p(&events, 0.99)),
    ]);
    let mut body = String::new();
    let _ = writeln!(
        body,
        "Three hosts (network namespaces joined like Flannel's VXLAN backend) and a three-member \
         etcd cluster (Debian's etcd 3.4, TLS with client certificates, auth on), as \
         `tests/etcd.rs` builds them. A NetworkPolicy selecting a server on every host is \
         applied {rounds} times from host 0 with `palisadectl apply` (a new process each time, \
         TLS handshake included), alternately allowing and denying the client; each host's \
         verdict is read from its kernel maps (the same lookup as `explain`) every 0.5 ms, \
         from just before the command starts. Then the same with {simulated} more etcd clients \
         watching palisade's objects, as {simulated} more hosts' daemons would (their events \
         are timed from the same start).\n"
    );
    body.push_str(&t.render());
    let _ = writeln!(
        body,
        "\netcd holds {} bytes per published container ({ep_keys} keys, {ep_bytes} bytes: key \
         and value) and {} bytes per NetworkPolicy ({np_keys} key, {np_bytes} bytes), one key \
         each.\n",
        ep_bytes / ep_keys.max(1),
        np_bytes / np_keys.max(1),
    );
    report.section("Several hosts sharing etcd", body);
    let p99 = p(&loaded, 0.99);
    report.measured("etcd: apply to every host's verdict p99", Some(p99));
    report.measured("etcd: watch event p99", Some(p(&events, 0.99)));
    report.target(
        &format!(
            "apply on one host to the verdict on every host, p99 under 200 ms with {simulated} \
             simulated hosts watching"
        ),
        &format!("{p99:.0} ms"),
        p99 < 200.0,
        "",
    );
}
