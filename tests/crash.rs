//! Crash consistency: palisade killed with SIGKILL at every step of ADD,
//! DEL, apply, delete, upgrade and the daemon's commit, then the next
//! operation (the runtime's DEL or retry, the user's retry, a daemon
//! restart). After that recovery step:
//!
//! - every endpoint in the store has its veth and its programs attached,
//!   and every container veth has an endpoint (none left without programs);
//! - no link pin, map entry (endpoint, MAC, conntrack and fragment tables,
//!   budgets, event buckets, counters) or store record belongs to an
//!   endpoint that is gone;
//! - the maps equal a fresh full compile of the store (`palisadectl sync`
//!   finds nothing to write or remove), and real traffic gets the verdicts
//!   policy gives.
//!
//! The steps are not listed by hand: each operation first runs with the
//! fault-point trace on (`PALISADE_FAULT_TRACE`, see `palisade::fault`),
//! and then once per step it passed with `PALISADE_FAULT=STEP`, which must
//! kill it there.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    collections::BTreeSet,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::Output,
    sync::Arc,
    time::Duration,
};

use palisade::{dataplane::map_pin, store::Endpoint};
use serde_json::Value;
use testbed::{
    chain::Call,
    node::{Node, NodeOptions, Pod},
    probe::{PROBE_TIMEOUT, Proto, probe},
    sys::{Netns, describe},
};

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
---
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: shop, labels: {app: late}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#;

/// The change that apply and delete make: `other` may reach the server too.
const EXTRA: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: extra, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: other}}}]
    ports: [{port: 80}]
"#;

struct Bed {
    node: Node,
    server: Arc<Pod>,
    client: Arc<Pod>,
    other: Arc<Pod>,
    /// The container ADD and DEL are killed in (no probe server: its
    /// network comes and goes).
    late: Netns,
}

impl Bed {
    fn new(daemon: bool) -> Self {
        let node = Node::new(NodeOptions {
            daemon,
            ..NodeOptions::default()
        });
        node.apply(PODS);
        let server = node.add_pod("shop", "server", &[80]);
        let client = node.add_pod("shop", "client", &[]);
        let other = node.add_pod("shop", "other", &[]);
        let late = Netns::new(&format!("{}late", node.prefix));
        Self {
            node,
            server,
            client,
            other,
            late,
        }
    }

    fn late_call(&self) -> Call {
        Call {
            container_id: format!("{}-late", self.node.prefix),
            netns: self.late.path.display().to_string(),
            ifname: "eth0".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=late".into(),
        }
    }

    /// Environment for the plugin and palisadectl from now on.
    fn set_env(&self, env: &[(&str, &str)]) {
        *self.node.chain.call_env.lock().unwrap() = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }

    /// Run `op` with the fault-point trace on; the steps it passed, as
    /// `PALISADE_FAULT` names them.
    fn steps(&self, what: &str, op: impl FnOnce()) -> Vec<String> {
        let trace = self.node.dir.join(format!("trace-{what}"));
        let _ = std::fs::remove_file(&trace);
        self.set_env(&[("PALISADE_FAULT_TRACE", trace.to_str().unwrap())]);
        op();
        self.set_env(&[]);
        read_trace(&trace, 0)
    }

    /// Run `op` (a palisadectl command) with `PALISADE_FAULT=step`; it must
    /// die there.
    fn kill_at(&self, step: &str, what: &str, op: impl FnOnce() -> Output) {
        self.set_env(&[("PALISADE_FAULT", step)]);
        let out = op();
        self.set_env(&[]);
        assert_killed(out.status, step, what);
    }

    fn palisadectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.node.ctl(args, stdin)
    }

    fn store_endpoints(&self) -> Vec<Endpoint> {
        let out = self.palisadectl(&["get", "endpoints", "-o", "json"], None);
        assert!(out.status.success(), "get endpoints: {}", describe(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Everything the module comment promises, after a recovery step.
    /// `containers`: the containers that have a network now (host veths).
    /// `extra`: whether [`EXTRA`] must be in force; `None`: either, as the
    /// store says (a change whose commit landed before the kill stays).
    fn assert_settled(&self, containers: usize, extra: Option<bool>, context: &str) {
        let eps = self.store_endpoints();
        let ctx = |what: &str| format!("{context}: {what}");
        let out = self.palisadectl(&["get", "policies", "-n", "shop", "-o", "json"], None);
        assert!(out.status.success(), "get policies: {}", describe(&out));
        let stored = String::from_utf8_lossy(&out.stdout).contains("\"extra\"");
        if let Some(e) = extra {
            assert_eq!(stored, e, "{}", ctx("policy extra in the store"));
        }
        let extra = stored;

        // Store records: one per container veth, each attached.
        let veths: BTreeSet<String> = self.node.host_veths().into_iter().collect();
        let recorded: BTreeSet<String> = eps.iter().map(|e| e.host_ifname.clone()).collect();
        assert_eq!(
            veths,
            recorded,
            "{}",
            ctx("the host veths and the recorded endpoints differ")
        );
        assert_eq!(eps.len(), containers, "{}", ctx("endpoints in the store"));
        let out = self.palisadectl(&["status", "-o", "json"], None);
        assert!(out.status.success(), "status: {}", describe(&out));
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        for e in status["endpoints"].as_array().unwrap() {
            assert_eq!(
                e["enforcing"],
                true,
                "{}",
                ctx(&format!("an endpoint is not enforcing: {e}"))
            );
        }

        // Pins: exactly the recorded endpoints' links.
        let owned: BTreeSet<PathBuf> = eps.iter().flat_map(|e| e.attachment.pins()).collect();
        let pinned: BTreeSet<PathBuf> = self.node.pins().into_iter().collect();
        assert_eq!(pinned, owned, "{}", ctx("link pins"));

        // Map entries: only for recorded endpoints, and each has its own.
        let ids: BTreeSet<u32> = eps.iter().map(|e| e.id).collect();
        let ifindexes: BTreeSet<u32> = eps.iter().map(|e| e.host_ifindex).collect();
        let tables: BTreeSet<u32> = ids.iter().flat_map(|id| [id << 1, id << 1 | 1]).collect();
        let keys = |map: &str| map_keys(&map_pin(&self.node.bpf_root, map));
        assert_eq!(keys("pal_endpoints"), ifindexes, "{}", ctx("pal_endpoints"));
        for map in ["pal_ct_tables", "pal_frag_tables", "pal_budget"] {
            assert_eq!(keys(map), tables, "{}", ctx(map));
        }
        let macs = keys("pal_ep_mac");
        assert!(
            macs.is_subset(&ifindexes),
            "{}",
            ctx(&format!("pal_ep_mac has {macs:?}, endpoints {ifindexes:?}"))
        );
        // Endpoint 0 is "no endpoint" (a veth palisade does not know).
        let buckets: BTreeSet<u32> = keys("pal_ratelimit_ep")
            .into_iter()
            .filter(|i| *i != 0)
            .collect();
        assert!(
            buckets.is_subset(&ids),
            "{}",
            ctx(&format!(
                "pal_ratelimit_ep has {buckets:?}, endpoints {ids:?}"
            ))
        );
        let counted: BTreeSet<u32> = keys("pal_counters")
            .into_iter()
            .filter(|i| *i != 0)
            .collect();
        assert!(
            counted.is_subset(&ids),
            "{}",
            ctx(&format!(
                "pal_counters has endpoints {counted:?}, live {ids:?}"
            ))
        );

        // The maps equal a fresh full compile of the store.
        let out = self.palisadectl(&["sync"], None);
        assert!(out.status.success(), "sync: {}", describe(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("0 entries written, 0 removed"),
            "{}",
            ctx(&format!("a full compile found the maps different: {said}"))
        );

        // And real traffic gets policy's verdicts.
        let to_server = |from: &Pod| {
            probe(
                &from.netns,
                self.server.addr(false),
                Proto::Tcp,
                80,
                PROBE_TIMEOUT,
            )
        };
        assert!(
            to_server(&self.client),
            "{}",
            ctx("client -> server:80 (allowed) failed")
        );
        assert_eq!(
            to_server(&self.other),
            extra,
            "{}",
            ctx(&format!(
                "other -> server:80 should be {}",
                if extra { "allowed" } else { "denied" }
            ))
        );
    }
}

/// The lines of a trace file from line `from` on.
fn read_trace(path: &Path, from: usize) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(from)
        .map(str::to_owned)
        .collect()
}

/// The first four bytes (little-endian) of every key of a pinned map: the
/// endpoint id, table id or ifindex each of palisade's per-endpoint maps
/// starts its key with.
fn map_keys(path: &Path) -> BTreeSet<u32> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        path.display(),
        describe(&out)
    );
    let dump: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    dump.iter()
        .map(|e| {
            let bytes: Vec<u8> = e["key"]
                .as_array()
                .unwrap_or_else(|| panic!("no raw key in {e}"))
                .iter()
                .take(4)
                .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16))
                .collect::<Result<_, _>>()
                .unwrap();
            u32::from_le_bytes(bytes.try_into().unwrap())
        })
        .collect()
}

/// Must have died at its fault point.
fn assert_killed(status: std::process::ExitStatus, step: &str, what: &str) {
    assert_eq!(
        status.signal(),
        Some(9),
        "{what} with PALISADE_FAULT={step} did not die at that step ({status})"
    );
}

fn assert_steps(steps: &[String], expected: &[&str], what: &str) {
    eprintln!("{what}: {} steps: {}", steps.len(), steps.join(" "));
    for e in expected {
        assert!(
            steps.iter().any(|s| s.starts_with(&format!("{e}#"))),
            "{what} never passed fault point {e}; its steps: {steps:?}"
        );
    }
}

#[test]
fn add_and_del_killed_at_every_step_leave_nothing_behind_after_the_runtimes_cleanup() {
    let bed = Bed::new(false);
    let chain = &bed.node.chain;
    let call = bed.late_call();
    bed.assert_settled(3, Some(false), "before");

    let add = bed.steps("add", || {
        chain.add(&call).unwrap();
    });
    let del = bed.steps("del", || chain.del(&call).unwrap());
    assert_steps(
        &add,
        &[
            "commit:locked",
            "commit:maps-unmarked",
            "maps:upserted",
            "commit:maps-written",
            "commit:store-committed",
            "add:registered",
            "attach:first-link",
            "add:attached",
        ],
        "ADD",
    );
    assert_steps(
        &del,
        &[
            "commit:maps-written",
            "del:unregistered",
            "detach:link",
            "del:detached",
        ],
        "DEL",
    );

    for step in &add {
        bed.set_env(&[("PALISADE_FAULT", step)]);
        let failed = chain.add(&call).expect_err("ADD killed");
        bed.set_env(&[]);
        assert_eq!(failed.plugin, "palisade", "{failed}");
        assert_eq!(
            failed.signal,
            Some(9),
            "ADD with PALISADE_FAULT={step} did not die there: {failed}"
        );
        // The runtime's cleanup after a failed ADD.
        chain
            .del(&call)
            .unwrap_or_else(|e| panic!("DEL after ADD killed at {step}: {e}"));
        bed.assert_settled(3, Some(false), &format!("ADD killed at {step}, then DEL"));
    }

    for step in &del {
        chain.add(&call).unwrap();
        bed.set_env(&[("PALISADE_FAULT", step)]);
        let failed = chain.del(&call).expect_err("DEL killed");
        bed.set_env(&[]);
        assert_eq!(
            failed.signal,
            Some(9),
            "DEL with PALISADE_FAULT={step} did not die there: {failed}"
        );
        // The runtime retries a DEL that failed.
        chain
            .del(&call)
            .unwrap_or_else(|e| panic!("DEL again after DEL killed at {step}: {e}"));
        bed.assert_settled(
            3,
            Some(false),
            &format!("DEL killed at {step}, then DEL again"),
        );
    }

    // And the container can still be started.
    chain.add(&call).unwrap();
    bed.assert_settled(4, Some(false), "ADD after the crashes");
}

#[test]
fn apply_and_delete_killed_at_every_step_are_whole_after_the_retry() {
    let bed = Bed::new(false);
    let apply = |stdin: &str| bed.palisadectl(&["apply", "-f", "-"], Some(stdin));
    let delete =
        |stdin: &str| bed.palisadectl(&["delete", "--ignore-not-found", "-f", "-"], Some(stdin));
    let applied = bed.steps("apply", || assert!(apply(EXTRA).status.success()));
    let deleted = bed.steps("delete", || assert!(delete(EXTRA).status.success()));
    let commit = [
        "commit:locked",
        "commit:maps-unmarked",
        "maps:upserted",
        "commit:maps-written",
        "commit:store-committed",
    ];
    assert_steps(&applied, &commit, "apply");
    assert_steps(&deleted, &commit, "delete");

    for step in &applied {
        bed.kill_at(step, "apply", || apply(EXTRA));
        let out = apply(EXTRA);
        assert!(out.status.success(), "apply again: {}", describe(&out));
        bed.assert_settled(
            3,
            Some(true),
            &format!("apply killed at {step}, then again"),
        );
        assert!(delete(EXTRA).status.success());
    }
    assert!(apply(EXTRA).status.success());
    for step in &deleted {
        bed.kill_at(step, "delete", || delete(EXTRA));
        let out = delete(EXTRA);
        assert!(out.status.success(), "delete again: {}", describe(&out));
        bed.assert_settled(
            3,
            Some(false),
            &format!("delete killed at {step}, then again"),
        );
        assert!(apply(EXTRA).status.success());
    }
}

#[test]
fn an_upgrade_killed_at_every_step_leaves_every_endpoint_enforcing_and_finishes_when_run_again() {
    let bed = Bed::new(false);
    let objects = bed.node.build_objects(7);
    let objects = objects.to_str().unwrap();
    let upgrade = |to: Option<&str>| {
        let mut args = vec!["upgrade", "-o", "json"];
        args.extend(to.map(|d| ["--objects", d]).into_iter().flatten());
        bed.palisadectl(&args, None)
    };
    let finished = |out: &Output, context: &str| {
        assert!(out.status.success(), "{context}: {}", describe(out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            report["failed"],
            serde_json::json!([]),
            "{context}: {report}"
        );
    };
    // Killed on the way from a build with other programs (`--objects`)
    // back to this one's: palisadectl then sees the datapath as it sees
    // its own (it only opens program pins of its own build).
    finished(&upgrade(Some(objects)), "to the other programs");
    let steps = bed.steps("upgrade", || finished(&upgrade(None), "upgrade"));
    assert_steps(
        &steps,
        &[
            "upgrade:conntrack-copied",
            "upgrade:program-swapped",
            "upgrade:endpoint-upgraded",
        ],
        "upgrade",
    );
    for step in &steps {
        finished(&upgrade(Some(objects)), "to the other programs");
        bed.kill_at(step, "upgrade", || upgrade(None));
        // Half-way: every endpoint enforces, with the old or the new
        // programs.
        bed.assert_settled(3, Some(false), &format!("upgrade killed at {step}"));
        finished(&upgrade(None), "upgrade again");
        let again: Value = serde_json::from_slice(&upgrade(None).stdout).unwrap();
        assert_eq!(
            again["upgraded"],
            serde_json::json!([]),
            "after upgrade killed at {step} and run again, every endpoint runs the new programs: {again}"
        );
        bed.assert_settled(
            3,
            Some(false),
            &format!("upgrade killed at {step}, then again"),
        );
    }
}

/// Restart the daemon so that it dies at `step`, run `op` (which must
/// fail: the plugin and palisadectl only report the daemon's loss), check
/// that the daemon died there, and start it again (the recovery: it
/// reconciles the maps with the store).
fn kill_daemon_at(bed: &Bed, step: &str, op: impl FnOnce() -> bool, what: &str) {
    let node = &bed.node;
    node.kill_daemon();
    *node.daemon_env.lock().unwrap() = vec![("PALISADE_FAULT".into(), step.into())];
    node.start_daemon();
    node.daemon_env.lock().unwrap().clear();
    assert!(
        !op(),
        "{what} succeeded though the daemon was to die at {step}"
    );
    let status = node
        .wait_daemon_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the daemon did not die at {step} during {what}"));
    assert_killed(status, step, &format!("the daemon during {what}"));
    node.start_daemon();
}

/// The steps the daemon passes during `op` (after its start).
fn daemon_steps(bed: &Bed, what: &str, op: impl FnOnce()) -> Vec<String> {
    let node = &bed.node;
    let trace = node.dir.join(format!("trace-daemon-{what}"));
    node.kill_daemon();
    *node.daemon_env.lock().unwrap() =
        vec![("PALISADE_FAULT_TRACE".into(), trace.display().to_string())];
    node.start_daemon();
    node.daemon_env.lock().unwrap().clear();
    let before = read_trace(&trace, 0).len();
    op();
    // Counted from the daemon's start, as a kill's are.
    read_trace(&trace, before)
}

#[test]
fn the_daemon_killed_at_every_step_of_its_commits_is_whole_after_a_restart() {
    let bed = Bed::new(true);
    let chain = &bed.node.chain;
    let apply = |stdin: &str| bed.palisadectl(&["apply", "-f", "-"], Some(stdin));
    let delete =
        |stdin: &str| bed.palisadectl(&["delete", "--ignore-not-found", "-f", "-"], Some(stdin));
    let call = bed.late_call();

    let applied = daemon_steps(&bed, "apply", || assert!(apply(EXTRA).status.success()));
    assert!(delete(EXTRA).status.success());
    let added = daemon_steps(&bed, "add", || {
        chain.add(&call).unwrap();
    });
    chain.del(&call).unwrap();
    assert_steps(
        &applied,
        &[
            "commit:locked",
            "commit:maps-written",
            "commit:store-committed",
        ],
        "the daemon's apply",
    );
    assert_steps(
        &added,
        &["commit:maps-written", "add:registered", "add:attached"],
        "the daemon's ADD",
    );

    for step in &applied {
        kill_daemon_at(&bed, step, || apply(EXTRA).status.success(), "apply");
        bed.assert_settled(
            3,
            None,
            &format!("daemon killed at {step} of apply, restarted"),
        );
        let out = apply(EXTRA);
        assert!(out.status.success(), "apply again: {}", describe(&out));
        bed.assert_settled(
            3,
            Some(true),
            &format!("daemon killed at {step} of apply, applied again"),
        );
        assert!(delete(EXTRA).status.success());
    }
    for step in &added {
        kill_daemon_at(&bed, step, || chain.add(&call).is_ok(), "ADD");
        // The runtime's cleanup after a failed ADD.
        chain
            .del(&call)
            .unwrap_or_else(|e| panic!("DEL after the daemon died at {step} of an ADD: {e}"));
        bed.assert_settled(
            3,
            Some(false),
            &format!("daemon killed at {step} of an ADD, restarted, DEL"),
        );
    }
}
