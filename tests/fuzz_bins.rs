//! The real binaries under fuzzed input: the CNI plugin (stdin, CNI_COMMAND,
//! CNI_ARGS and the rest of the CNI environment) and the OCI hook (the
//! state on stdin), each run as a runtime runs it, in a fresh network
//! namespace of its own (nothing on the machine can be touched: its only
//! interface is `lo`, and the state and pin directories are temporary and
//! not on bpffs). Properties: the process exits (within 20 s) with a
//! status and never by a panic or a signal; the plugin prints a CNI error
//! object whose code is one the spec defines (or palisade's own, 100+) and
//! whose message is not empty whenever it fails, and non-UTF-8 stdin is a
//! decode error (code 6).
//!
//! Short run (CI): 192 cases per binary. Long run:
//! `PALISADE_FUZZ_CASES=20000 cargo test -p palisade-tests --test fuzz_bins`.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic fails the case with its input"
)]

use std::{
    io::Write,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use serde_json::{Value, json};
use testbed::{node::bin_dir, sys::Netns};

fn config() -> Config {
    Config {
        cases: std::env::var("PALISADE_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(192),
        failure_persistence: None,
        ..Config::default()
    }
}

/// A fresh namespace for one test's cases (removed when it ends, passed
/// or not).
fn netns() -> Netns {
    testbed::sys::require_root();
    Netns::new(&format!("{}fz", testbed::sys::unique_prefix()))
}

/// Run `cmd` with `stdin`; kill it after 20 s (a hang fails the case).
fn run(mut cmd: Command, stdin: &[u8]) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    // Early failures exit before reading stdin; a closed pipe is fine.
    let _ = child.stdin.take().expect("stdin").write_all(stdin);
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "still running after 20 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Exited by itself with 0 or 1: not a panic (101), not a signal.
fn exited_cleanly(out: &Output) -> Result<(), String> {
    match out.status.code() {
        Some(0 | 1) => Ok(()),
        other => Err(format!(
            "exit {other:?} (101 is a panic); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

const SPEC_CODES: &[u64] = &[1, 2, 3, 4, 5, 6, 7, 11, 50, 51];

fn seed_conf() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "fuzz",
        "type": "palisade",
        "labels": {"team": "a"},
        "args": {"cni": {"labels": [{"key": "app", "value": "web"}]}},
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0"},
                {"name": "lo"},
                {"name": "eth0", "sandbox": "/var/run/netns/none"}
            ],
            "ips": [{"address": "10.22.0.5/16", "interface": 2}]
        }
    })
}

const KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "prevResult",
    "interfaces",
    "ips",
    "address",
    "interface",
    "sandbox",
    "args",
    "cni",
    "labels",
    "key",
    "value",
    "failOpen",
    "attachMode",
    "podWaitSeconds",
    "kubernetes",
    "cni.dev/valid-attachments",
    "mapSizes",
    "conntrack",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(Value::from),
        prop::sample::select(vec![
            "",
            "1.0.0",
            "0.4.0",
            "1.1.0",
            "0.3.1",
            "lo",
            "eth0",
            "10.0.0.1/8",
            "fd00::1/64",
            "tcx",
            "netlink",
            "auto",
            "x",
        ])
        .prop_map(Value::from),
        ".{0,10}".prop_map(Value::from),
    ]
}

fn tree() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(str::to_owned),
        1 => "[a-z]{0,6}",
    ];
    leaf().prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// The seed with some of its top-level or prevResult fields replaced.
fn conf_bytes() -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec((prop::sample::select(KEYS), any::<bool>(), tree()), 0..4)
        .prop_map(|edits| {
            let mut v = seed_conf();
            for (k, in_prev, with) in edits {
                let target = if in_prev {
                    &mut v["prevResult"]
                } else {
                    &mut v
                };
                if let Some(o) = target.as_object_mut() {
                    o.insert(k.to_owned(), with);
                }
            }
            serde_json::to_vec(&v).unwrap()
        });
    let bytes = (prop::collection::vec(
        (0u8..3, any::<prop::sample::Index>(), any::<u8>()),
        1..5,
    ),)
        .prop_map(|(edits,)| {
            let mut b = serde_json::to_vec(&seed_conf()).unwrap();
            for (op, at, byte) in edits {
                let len = b.len();
                match op {
                    0 if len > 0 => b[at.index(len)] = byte,
                    0 => {}
                    1 => b.insert(at.index(len + 1), byte),
                    _ => b.truncate(at.index(len + 1)),
                }
            }
            b
        });
    prop_oneof![conf_bytes_raw(), edits, bytes]
}

fn conf_bytes_raw() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..64)
}

/// Force the places the plugin may write into a temporary directory.
fn confine(bytes: Vec<u8>, dir: &std::path::Path) -> Vec<u8> {
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(mut o)) => {
            o.insert("stateDir".into(), json!(dir.join("state")));
            o.insert("bpfRoot".into(), json!(dir.join("bpf")));
            o.insert("socket".into(), json!(dir.join("none.sock")));
            serde_json::to_vec(&o).unwrap()
        }
        // Anything else never gets as far as opening a store.
        _ => bytes,
    }
}

#[test]
fn the_cni_plugin_answers_every_input_with_a_cni_error_or_success() {
    let ns = netns();
    let args = prop_oneof![
        Just(String::new()),
        Just("K8S_POD_NAMESPACE=x;K8S_POD_NAME=a".to_owned()),
        Just("IgnoreUnknown=1;K8S_POD_NAME=a;=b".to_owned()),
        // Anything an environment variable can hold (no NUL).
        "[^\\x00]{0,24}",
    ];
    let command = prop::sample::select(vec![
        "ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "add", "",
    ]);
    let inputs = (conf_bytes(), command, args, any::<bool>());
    let mut runner = TestRunner::new(config());
    let result = runner.run(&inputs, |(stdin, command, args, with_env)| {
        let dir = tempfile::tempdir().unwrap();
        let stdin = confine(stdin, dir.path());
        let mut cmd = ns.command(bin_dir().join("palisade"));
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_ARGS", &args)
            .env("CNI_PATH", "/usr/lib/cni");
        if with_env {
            cmd.env("CNI_CONTAINERID", "fuzz1")
                .env("CNI_IFNAME", "eth0")
                .env("CNI_NETNS", "/var/run/netns/does-not-exist");
        }
        let out = run(cmd, &stdin);
        let clean = exited_cleanly(&out);
        prop_assert!(clean.is_ok(), "{}", clean.unwrap_err());
        if !out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
                TestCaseError::fail(format!(
                    "failure without a CNI error object ({e}): {:?}",
                    String::from_utf8_lossy(&out.stdout)
                ))
            })?;
            let code = v["code"].as_u64().unwrap_or(0);
            prop_assert!(
                SPEC_CODES.contains(&code) || code >= 100,
                "code {} is not the spec's: {}",
                code,
                v
            );
            prop_assert!(
                v["msg"].as_str().is_some_and(|m| !m.is_empty()),
                "no message: {}",
                v
            );
            if command != "VERSION" && !command.is_empty() && std::str::from_utf8(&stdin).is_err() {
                prop_assert_eq!(code, 6, "stdin that is not UTF-8 is a decode error: {}", v);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn the_oci_hook_answers_every_state_with_a_clear_error_or_success() {
    let ns = netns();
    let state = prop_oneof![
        conf_bytes_raw(),
        (
            prop::sample::select(vec![
                "creating", "created", "running", "stopped", "paused", "x"
            ]),
            prop::option::of(any::<i32>()),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "palisade.io/namespace",
                    "palisade.io/name",
                    "palisade.io/labels",
                    "palisade.io/label.app",
                    "io.kubernetes.pod.namespace",
                    "io.kubernetes.pod.name",
                    "palisade.io/fail-open",
                ]),
                prop::sample::select(vec![
                    "", "x", "shop", "app=web", "=", "a,b", "UPPER", "é", "true"
                ]),
                0..4,
            ),
        )
            .prop_map(|(status, pid, ann)| {
                let mut v = json!({
                    "ociVersion": "1.0.2",
                    "id": "fuzz1",
                    "status": status,
                    "bundle": "/nonexistent-bundle",
                    "annotations": ann
                });
                if let Some(p) = pid {
                    v["pid"] = json!(p);
                }
                serde_json::to_vec(&v).unwrap()
            }),
    ];
    let mut runner = TestRunner::new(config());
    let result = runner.run(&state, |state| {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = ns.command(bin_dir().join("palisade-hook"));
        cmd.env_clear()
            .arg(format!(
                "--state-dir={}",
                dir.path().join("state").display()
            ))
            .arg(format!("--bpf-root={}", dir.path().join("bpf").display()));
        let out = run(cmd, &state);
        let clean = exited_cleanly(&out);
        prop_assert!(clean.is_ok(), "{}", clean.unwrap_err());
        if !out.status.success() {
            prop_assert!(!out.stderr.is_empty(), "a failure says why");
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
