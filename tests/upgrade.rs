//! Upgrading without a gap: with requests flowing between two containers,
//! `palisadectl upgrade` swaps rebuilt programs (the same sources compiled
//! with another build tag, so their code differs) onto every attached veth,
//! and back to the built-in ones. Not one allowed request may fail, and a
//! connection that policy denies, attempted throughout, must never succeed.
//! Both attachment kinds: TCX links (link update) and clsact filters
//! (filter replaced under its handle).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

use aya::programs::{ProgramInfo, SchedClassifier, TcAttachType};
use serde_json::{Value, json};
use testbed::{
    node::{Node, NodeOptions},
    probe::{Proto, probe},
    sys::{self, describe, in_netns},
};

/// Program ids attached to a host veth, by hook (TCX and clsact alike).
fn attached(node: &Node, veth: &str, tcx: bool) -> [Vec<u32>; 2] {
    [TcAttachType::Ingress, TcAttachType::Egress].map(|hook| {
        if tcx {
            in_netns(&node.netns.path, || {
                let (_, progs) = SchedClassifier::query_tcx(veth, hook).unwrap();
                progs.iter().map(|p| p.id()).collect()
            })
        } else {
            let dir = if hook == TcAttachType::Ingress {
                "ingress"
            } else {
                "egress"
            };
            let out = sys::ip(&[
                "netns",
                "exec",
                &node.netns.name,
                "tc",
                "filter",
                "show",
                "dev",
                veth,
                dir,
            ]);
            out.split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .filter(|w| w[0] == "id")
                .filter_map(|w| w[1].parse().ok())
                .collect()
        }
    })
}

/// The ids of the programs pinned for build `hash`.
fn pinned(node: &Node, hash: &str) -> [u32; 2] {
    ["from_container", "to_container"].map(|p| {
        ProgramInfo::from_pin(node.bpf_root.join("progs").join(hash).join(p))
            .unwrap()
            .id()
    })
}

fn upgrade(node: &Node, objects: Option<&Path>) -> Value {
    let mut args = vec!["upgrade", "-o", "json"];
    let dir;
    if let Some(d) = objects {
        dir = d.display().to_string();
        args.extend(["--objects", dir.as_str()]);
    }
    let out = node.ctl(&args, None);
    assert!(
        out.status.success(),
        "palisadectl upgrade: {}",
        describe(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn upgrade_under_traffic(attach_mode: Option<&str>) {
    let mut options = NodeOptions::default();
    if let Some(m) = attach_mode {
        options.palisade.insert("attachMode".into(), json!(m));
    }
    let tcx = attach_mode.is_none();
    let node = Node::new(options);
    node.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: default, labels: {app: server}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: default, labels: {app: stranger}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: default}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#,
    );
    let server = node.add_pod("default", "server", &[80]);
    let client = node.add_pod("default", "client", &[]);
    let stranger = node.add_pod("default", "stranger", &[]);
    let target = server.addr(false);
    assert!(probe(
        &client.netns,
        target,
        Proto::Tcp,
        80,
        Duration::from_secs(1)
    ));
    assert!(!probe(
        &stranger.netns,
        target,
        Proto::Tcp,
        80,
        Duration::from_millis(300)
    ));
    let veths = node.host_veths();
    assert_eq!(veths.len(), 3);
    let v1 = node.build_objects(1);
    let v2 = node.build_objects(2);

    // Steady small requests: one long connection, and a new connection
    // each time (each one decided afresh by whichever programs run).
    let rr = |extra: &[&str], count: &str, interval: &str| {
        let mut c = sys::command_in(&client.netns, node.bin_dir.join("palisade-probe"));
        c.args(["rr", "--to", &format!("{target}:80"), "--count", count])
            .args(["--interval-us", interval, "--timeout-ms", "1000"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let long = rr(&[], "1500", "2000");
    let fresh = rr(&["--connect-each"], "600", "5000");

    // A denied connection, attempted over and over meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let (tries, leaks) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let denied = {
        let (stop, tries, leaks) = (stop.clone(), tries.clone(), leaks.clone());
        let netns = stranger.netns.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if probe(&netns, target, Proto::Tcp, 80, Duration::from_millis(50)) {
                    leaks.fetch_add(1, Ordering::SeqCst);
                }
                tries.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let before: Vec<[Vec<u32>; 2]> = veths.iter().map(|v| attached(&node, v, tcx)).collect();
    let mut seen = vec![before.clone()];
    for objects in [Some(v1.as_path()), Some(v2.as_path()), None] {
        thread::sleep(Duration::from_millis(400));
        let report = upgrade(&node, objects);
        assert_eq!(report["upgraded"].as_array().unwrap().len(), 3, "{report}");
        assert_eq!(report["failed"], json!([]), "{report}");
        let hash = report["programs"].as_str().unwrap();
        let [from, to] = pinned(&node, hash);
        let now: Vec<[Vec<u32>; 2]> = veths.iter().map(|v| attached(&node, v, tcx)).collect();
        for (veth, [ingress, egress]) in veths.iter().zip(&now) {
            // Exactly the new programs: the old ones are gone, not stacked.
            assert_eq!(
                ingress,
                &vec![from],
                "{veth} tc ingress after upgrading to {hash}"
            );
            assert_eq!(
                egress,
                &vec![to],
                "{veth} tc egress after upgrading to {hash}"
            );
        }
        assert!(!seen.contains(&now), "the programs changed");
        seen.push(now);
    }
    // Upgrading again changes nothing.
    let report = upgrade(&node, None);
    if tcx {
        assert_eq!(report["current"].as_array().unwrap().len(), 3, "{report}");
    }

    for (name, child) in [("long connection", long), ("new connections", fresh)] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{name}: {}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["failed"], 0,
            "{name}: requests failed during the upgrades: {v}"
        );
        assert_eq!(v["ok"], v["count"], "{name}: {v}");
    }
    stop.store(true, Ordering::SeqCst);
    denied.join().unwrap();
    assert!(
        tries.load(Ordering::SeqCst) >= 10,
        "the denied connection was tried throughout"
    );
    assert_eq!(
        leaks.load(Ordering::SeqCst),
        0,
        "a denied connection got through during the upgrades"
    );
    assert!(probe(
        &client.netns,
        target,
        Proto::Tcp,
        80,
        Duration::from_secs(1)
    ));
}

#[test]
fn tcx_links_are_updated_under_traffic_without_a_gap() {
    upgrade_under_traffic(None);
}

#[test]
fn clsact_filters_are_replaced_under_traffic_without_a_gap() {
    upgrade_under_traffic(Some("netlink"));
}

/// Hex bytes for bpftool.
fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn upgrade_moves_an_earlier_builds_shared_conntrack_into_the_endpoints_tables() {
    let node = Node::new(NodeOptions::default());
    let a = node.add_pod("default", "a", &[80]);
    let st: Value =
        serde_json::from_slice(&node.ctl(&["status", "-o", "json"], None).stdout).unwrap();
    let ep_id = st["endpoints"][0]["id"].as_u64().unwrap() as u32;
    // The shared table an earlier build kept (`pal_ct`, an LRU), holding
    // one flow of a's: opened by it (egress), TCP, to 10.99.0.1:80.
    let legacy = palisade::dataplane::map_pin(&node.bpf_root, "pal_ct");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&legacy)
        .args(["type", "lru_hash", "key", "44", "value", "48"])
        .args(["entries", "1024", "name", "pal_ct"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {}", describe(&out));
    let std::net::IpAddr::V4(own) = a.addr(false) else {
        panic!()
    };
    let mapped = |v4: [u8; 4]| {
        let mut m = [0u8; 16];
        m[10] = 0xff;
        m[11] = 0xff;
        m[12..].copy_from_slice(&v4);
        m
    };
    let mut key = Vec::new();
    key.extend_from_slice(&ep_id.to_ne_bytes());
    key.extend_from_slice(&[1, 6, 0, 0]); // egress, TCP, pad
    key.extend_from_slice(&mapped(own.octets()));
    key.extend_from_slice(&mapped([10, 99, 0, 1]));
    key.extend_from_slice(&40000u16.to_be_bytes());
    key.extend_from_slice(&80u16.to_be_bytes());
    let mut value = vec![0u8; 48];
    value[46] = 1; // PAL_CT_SEEN_REPLY
    let out = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&legacy)
        .arg("key")
        .args(["hex"])
        .args(hex(&key))
        .arg("value")
        .args(["hex"])
        .args(hex(&value))
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {}", describe(&out));

    let report = upgrade(&node, None);
    assert_eq!(report["failed"], json!([]), "{report}");
    assert!(!legacy.exists(), "the earlier build's table is unpinned");
    let st: Value =
        serde_json::from_slice(&node.ctl(&["status", "-o", "json"], None).stdout).unwrap();
    let egress = st["datapath"]["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["epId"] == ep_id && b["direction"] == "egress")
        .cloned()
        .unwrap_or_else(|| panic!("{st}"));
    assert_eq!(egress["flows"], 1, "the flow moved to a's own table: {st}");
}
