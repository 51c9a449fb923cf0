//! The node daemon: the engine behind a root-only socket, a kill -9 and
//! restart under traffic that no verdict notices, the daemonless path
//! writing beside it, one daemon per node, and concurrent ADDs through it.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    os::unix::fs::PermissionsExt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use palisade::daemon::{Client, DaemonStatus, Request, default_socket};
use testbed::{
    chain::Call,
    node::{Node, NodeOptions, Pod},
    probe::{PROBE_TIMEOUT, Proto, probe},
    sys::{Netns, describe},
};

fn daemon_node() -> Node {
    Node::new(NodeOptions {
        daemon: true,
        ..NodeOptions::default()
    })
}

fn status(n: &Node) -> DaemonStatus {
    Client::connect(&default_socket(&n.state_dir), &n.bpf_root)
        .expect("the daemon answers")
        .call(Request::Status)
        .expect("daemon status")
}

fn tcp_ok(from: &Pod, to: &Pod, port: u16) -> bool {
    probe(&from.netns, to.addr(false), Proto::Tcp, port, PROBE_TIMEOUT)
}

const SERVER_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: shop, labels: {app: other}}
spec: {containers: [{name: c}]}
"#;

#[test]
fn commands_and_plugins_go_through_the_daemon_on_a_root_only_socket() {
    let n = daemon_node();
    let socket = default_socket(&n.state_dir);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let before = status(&n).requests;
    n.apply(PODS);
    let server = n.add_pod("shop", "server", &[80]);
    let client = n.add_pod("shop", "client", &[]);
    n.apply(SERVER_POLICY);
    assert!(tcp_ok(&client, &server, 80));
    let s = status(&n);
    assert!(
        s.requests >= before + 4,
        "two applies and two ADDs went through the daemon: {s:?}"
    );
    assert_eq!(s.bpf_root, n.bpf_root);
    // A client that names another datapath is refused, with what to do.
    let wrong = Client::connect(&socket, std::path::Path::new("/sys/fs/bpf/elsewhere"))
        .unwrap()
        .call::<DaemonStatus>(Request::Status)
        .unwrap_err()
        .to_string();
    assert!(wrong.contains("manages the datapath at"), "{wrong}");
}

#[test]
fn a_second_daemon_for_the_same_node_is_refused() {
    let n = daemon_node();
    let mut cmd = n.netns.command(n.bin_dir.join("palisadectl"));
    let out = cmd
        .arg("daemon")
        .env("PALISADE_STATE_DIR", &n.state_dir)
        .env("PALISADE_BPF_ROOT", &n.bpf_root)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another palisade daemon"), "{err}");
}

/// Probe both pairs back to back until `stop`; count every answer that is
/// not the verdict policy gives.
fn watch(
    client: Arc<Pod>,
    other: Arc<Pod>,
    server: Arc<Pod>,
    stop: Arc<AtomicBool>,
    wrong: Arc<AtomicUsize>,
    rounds: Arc<AtomicUsize>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if !tcp_ok(&client, &server, 80) {
                wrong.fetch_add(1, Ordering::Relaxed);
            }
            if probe(
                &other.netns,
                server.addr(false),
                Proto::Tcp,
                80,
                Duration::from_millis(100),
            ) {
                wrong.fetch_add(1, Ordering::Relaxed);
            }
            rounds.fetch_add(1, Ordering::Relaxed);
        }
    })
}

#[test]
fn a_daemon_killed_and_restarted_under_traffic_changes_no_verdict() {
    let n = daemon_node();
    n.apply(PODS);
    let server = n.add_pod("shop", "server", &[80]);
    let client = n.add_pod("shop", "client", &[]);
    let other = n.add_pod("shop", "other", &[]);
    n.apply(SERVER_POLICY);
    assert!(tcp_ok(&client, &server, 80));
    assert!(!tcp_ok(&other, &server, 80));
    let epoch = |n: &Node| -> u64 {
        let out = n.ctl(&["status", "-o", "json"], None);
        assert!(out.status.success(), "{}", describe(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["datapath"]["epoch"].as_u64().unwrap()
    };
    let epoch_before = epoch(&n);

    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicUsize::new(0));
    let rounds = Arc::new(AtomicUsize::new(0));
    let watcher = watch(
        client.clone(),
        other.clone(),
        server.clone(),
        stop.clone(),
        wrong.clone(),
        rounds.clone(),
    );
    let wait_rounds = |k: usize| {
        let start = rounds.load(Ordering::Relaxed);
        while rounds.load(Ordering::Relaxed) < start + k {
            thread::sleep(Duration::from_millis(10));
        }
    };
    wait_rounds(5);
    n.kill_daemon();
    wait_rounds(5);
    let log_before = n.daemon_output();
    n.start_daemon();
    wait_rounds(5);
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "verdicts changed around the daemon's kill -9 and restart ({} rounds)",
        rounds.load(Ordering::Relaxed)
    );
    // The restart found the maps as the store says: nothing written, and
    // established flows were not sent back to policy.
    let restart = n.daemon_output()[log_before.len()..].to_owned();
    assert!(
        restart.contains("(0 entries written, 0 removed"),
        "the restart rewrote the maps:\n{restart}"
    );
    assert_eq!(epoch(&n), epoch_before, "the restart bumped the epoch");
    // The restarted daemon works.
    n.delete(SERVER_POLICY);
    assert!(tcp_ok(&other, &server, 80));
}

#[test]
fn a_change_made_without_the_daemon_is_seen_by_it() {
    let n = daemon_node();
    n.apply(PODS);
    let server = n.add_pod("shop", "server", &[80]);
    let client = n.add_pod("shop", "client", &[]);
    let other = n.add_pod("shop", "other", &[]);
    // palisadectl pointed at no socket writes in-process, beside the daemon.
    let mut cmd = n.netns.command(n.bin_dir.join("palisadectl"));
    cmd.args(["--socket", "/nonexistent/palisade.sock", "apply", "-f", "-"])
        .env("PALISADE_STATE_DIR", &n.state_dir)
        .env("PALISADE_BPF_ROOT", &n.bpf_root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), SERVER_POLICY.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!tcp_ok(&other, &server, 80));
    // The daemon's next change starts from the store as it is now.
    n.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: other, namespace: shop, labels: {app: client}}\nspec: {containers: [{name: c}]}\n",
    );
    assert!(tcp_ok(&other, &server, 80));
    assert!(tcp_ok(&client, &server, 80));
    let out = n.ctl(&["sync"], None);
    assert!(out.status.success(), "{}", describe(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("0 entries written, 0 removed"),
        "the maps already matched a full compile: {said}"
    );
}

#[test]
fn twenty_concurrent_adds_through_the_daemon_each_enforce_and_leave_nothing_behind() {
    let n = Arc::new(daemon_node());
    n.apply(PODS);
    n.apply(SERVER_POLICY);
    let server = n.add_pod("shop", "server", &[80]);
    let namespaces: Vec<Netns> = (0..20)
        .map(|i| Netns::new(&format!("{}q{i}", n.prefix)))
        .collect();
    let calls: Vec<Call> = namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| Call {
            container_id: format!("{}-c{i}", n.prefix),
            netns: ns.path.display().to_string(),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=p{i}"),
        })
        .collect();
    thread::scope(|s| {
        for c in &calls {
            let n = n.clone();
            s.spawn(move || {
                n.chain
                    .add(c)
                    .unwrap_or_else(|e| panic!("concurrent ADD {}: {e}", c.container_id))
            });
        }
    });
    assert_eq!(n.endpoints().len(), 21);
    // Each new container is enforced at once: none of them is a client.
    for ns in namespaces.iter().take(5) {
        assert!(
            !probe(&ns.path, server.addr(false), Proto::Tcp, 80, PROBE_TIMEOUT),
            "{} reached the server",
            ns.name
        );
    }
    thread::scope(|s| {
        for c in &calls {
            let n = n.clone();
            s.spawn(move || {
                n.chain
                    .del(c)
                    .unwrap_or_else(|e| panic!("concurrent DEL {}: {e}", c.container_id))
            });
        }
    });
    assert_eq!(n.endpoints().len(), 1);
    let pins = n.pins();
    assert_eq!(pins.len(), 2, "only the server's links stay: {pins:?}");
    drop(namespaces);
}
