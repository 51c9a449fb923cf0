//! The CNI contract (spec 1.1.0; configurations 0.4.0, 1.0.0 and 1.1.0),
//! against the real bridge and host-local plugins on hermetic nodes.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{process::Stdio, sync::Arc, thread};

use serde_json::{Value, json};
use testbed::{
    chain::{Call, Failure},
    node::{Node, NodeOptions, Pod},
    probe::{PROBE_TIMEOUT, Proto, probe},
    sys::{self, Netns, describe},
};

const DENY_ALL: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all}
spec:
  podSelector: {}
"#;

fn node() -> Node {
    Node::new(NodeOptions::default())
}

fn node_with(settings: &[(&str, Value)]) -> Node {
    let mut palisade = serde_json::Map::new();
    for (k, v) in settings {
        palisade.insert((*k).to_owned(), v.clone());
    }
    Node::new(NodeOptions {
        palisade,
        ..Default::default()
    })
}

fn reachable(from: &Pod, to: &Pod) -> bool {
    probe(&from.netns, to.addr(false), Proto::Tcp, 80, PROBE_TIMEOUT)
}

/// Run the palisade binary with an environment and stdin, no chain.
fn raw_palisade(node: &Node, env: &[(&str, &str)], stdin: &str) -> (i32, Value, String) {
    let mut cmd = node.netns.command(node.bin_dir.join("palisade"));
    cmd.env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn palisade");
    {
        use std::io::Write;
        // Early failures exit before reading stdin; a closed pipe is fine.
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("wait");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v, describe(&out))
}

fn expect_code(r: Result<Value, Box<Failure>>, code: u64, words: &str) {
    match r {
        Ok(v) => panic!("expected CNI error {code} ({words}), got success: {v}"),
        Err(f) => {
            assert_eq!(f.code, Some(code), "wrong code for '{words}': {f}");
            assert!(
                f.msg.contains(words),
                "message should mention {words:?}: {f}"
            );
        }
    }
}

fn endpoint_count(node: &Node) -> usize {
    node.endpoints().len()
}

#[test]
fn version_lists_every_supported_spec_version() {
    let n = node();
    let (code, v, out) = raw_palisade(&n, &[("CNI_COMMAND", "VERSION")], "");
    assert_eq!(code, 0, "{out}");
    assert_eq!(v["cniVersion"], "1.1.0", "{v}");
    for ver in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            v["supportedVersions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == ver),
            "{ver} missing from {v}"
        );
    }
}

#[test]
fn add_prints_prev_result_unchanged_and_check_del_work_for_each_config_version() {
    for version in ["0.4.0", "1.0.0"] {
        let n = Node::new(NodeOptions {
            cni_version: version.into(),
            ..Default::default()
        });
        let ns = Netns::new(&format!("{}v", n.prefix));
        let call = Call {
            container_id: format!("{}-ver", n.prefix),
            netns: ns.path.display().to_string(),
            ifname: "eth0".into(),
            args: String::new(),
        };
        let plugins = n.chain.conflist["plugins"].as_array().unwrap().clone();
        // bridge alone, then palisade with bridge's result.
        let bridge_conf = n.chain.plugin_conf(&plugins[0], None);
        let out = n.chain.exec("ADD", &bridge_conf, &call);
        assert!(
            out.status.success(),
            "bridge ADD ({version}): {}",
            describe(&out)
        );
        let bridge_result: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ours = n
            .chain
            .exec_palisade("ADD", &[], Some(&bridge_result), &call)
            .unwrap_or_else(|e| panic!("palisade ADD ({version}): {e}"));
        assert_eq!(
            ours, bridge_result,
            "palisade must print prevResult unchanged ({version})"
        );
        if version == "0.4.0" {
            assert_eq!(
                ours["ips"][0]["version"], "4",
                "0.4.0 results keep their version field: {ours}"
            );
        }
        n.chain
            .exec_palisade("CHECK", &[], Some(&bridge_result), &call)
            .unwrap_or_else(|e| panic!("palisade CHECK ({version}): {e}"));
        assert_eq!(endpoint_count(&n), 1);
        n.chain
            .exec_palisade("DEL", &[], Some(&bridge_result), &call)
            .unwrap_or_else(|e| panic!("palisade DEL ({version}): {e}"));
        assert_eq!(endpoint_count(&n), 0);
        assert!(n.pins().is_empty(), "pins left: {:?}", n.pins());
    }
}

#[test]
fn spec_1_1_0_add_check_status_gc_del() {
    // The Debian reference plugins stop at 1.0.0; their result format is
    // the same in 1.1.0, so palisade gets bridge's result as prevResult.
    let n = node();
    let pod = n.add_pod("default", "v11", &[80]);
    let call = pod.call();
    let v11 = [("cniVersion", json!("1.1.0"))];
    let prev = pod.result.clone();
    let out = n
        .chain
        .exec_palisade("ADD", &v11, Some(&prev), &call)
        .expect("ADD at 1.1.0 (re-ADD)");
    assert_eq!(
        out["cniVersion"], "1.1.0",
        "the result comes in the requested version"
    );
    n.chain
        .exec_palisade("CHECK", &v11, Some(&prev), &call)
        .expect("CHECK at 1.1.0");
    let st = n
        .chain
        .exec_palisade("STATUS", &v11, None, &Call::default())
        .expect("STATUS");
    assert!(st.is_null(), "STATUS prints nothing on success: {st}");
    let gc = [
        ("cniVersion", json!("1.1.0")),
        (
            "cni.dev/valid-attachments",
            json!([{"containerID": call.container_id, "ifname": "eth0"}]),
        ),
    ];
    n.chain
        .exec_palisade("GC", &gc, None, &Call::default())
        .expect("GC keeping the pod");
    assert_eq!(endpoint_count(&n), 1, "GC kept the valid attachment");
    n.chain
        .exec_palisade("DEL", &v11, Some(&prev), &call)
        .expect("DEL at 1.1.0");
    assert_eq!(endpoint_count(&n), 0);
}

#[test]
fn del_succeeds_twice_without_netns_and_without_prev_result() {
    let n = node();
    let a = n.add_pod("default", "a", &[80]);
    assert_eq!(endpoint_count(&n), 1);
    assert_eq!(
        n.pins().len(),
        2,
        "two link pins per endpoint: {:?}",
        n.pins()
    );
    let bare = Call {
        netns: String::new(),
        ..a.call()
    };
    for attempt in 1..=2 {
        n.chain
            .exec_palisade("DEL", &[], None, &bare)
            .unwrap_or_else(|e| panic!("DEL #{attempt} without netns/prevResult: {e}"));
    }
    assert_eq!(endpoint_count(&n), 0);
    assert!(n.pins().is_empty(), "pins left: {:?}", n.pins());
    // And a DEL for something palisade never saw.
    let never = Call {
        container_id: "never-added".into(),
        ..bare
    };
    n.chain
        .exec_palisade("DEL", &[], None, &never)
        .expect("DEL of an unknown container");
    // The whole chain's DEL, in reverse order, also still succeeds.
    n.chain.del(&a.call()).expect("chain DEL");
}

#[test]
fn check_fails_when_programs_are_detached_or_the_endpoint_is_unknown() {
    let n = node();
    let a = n.add_pod("default", "a", &[80]);
    n.chain.check(&a.call()).expect("CHECK right after ADD");
    let pin = n
        .pins()
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with("from-container"))
        .expect("pin");
    std::fs::remove_file(&pin).expect("detach by removing the link pin");
    let r = n
        .chain
        .exec_palisade("CHECK", &[], Some(&a.result), &a.call());
    expect_code(r, 100, "detached");
    let unknown = Call {
        container_id: "nobody".into(),
        ..a.call()
    };
    let r = n
        .chain
        .exec_palisade("CHECK", &[], Some(&a.result), &unknown);
    expect_code(r, 100, "no endpoint");
    // `palisadectl status` says the same.
    let out = n.ctl(&["status"], None);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("NO:"),
        "{}",
        describe(&out)
    );
}

#[test]
fn gc_removes_stale_endpoints_and_keeps_valid_ones() {
    let n = node();
    let keep = n.add_pod("default", "keep", &[80]);
    let _s1 = n.add_pod("default", "stale1", &[80]);
    let _s2 = n.add_pod("default", "stale2", &[80]);
    assert_eq!(endpoint_count(&n), 3);
    let gc = [
        ("cniVersion", json!("1.1.0")),
        (
            "cni.dev/valid-attachments",
            json!([{"containerID": keep.container_id, "ifname": "eth0"}]),
        ),
    ];
    n.chain
        .exec_palisade("GC", &gc, None, &Call::default())
        .expect("GC");
    let eps = n.endpoints();
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0]["containerId"], keep.container_id);
    assert_eq!(
        n.pins().len(),
        2,
        "only the kept endpoint's pins remain: {:?}",
        n.pins()
    );
    n.chain
        .check(&keep.call())
        .expect("the kept endpoint is still enforced");
}

#[test]
fn malformed_input_gets_the_spec_error_codes() {
    let n = node();
    let pod = n.add_pod("default", "a", &[]);
    let conf = |extra: Value| {
        let mut c = n
            .chain
            .plugin_conf(&n.chain.palisade_plugin(), Some(&pod.result));
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c.to_string()
    };
    let env_add = |cid: &str| {
        vec![
            ("CNI_COMMAND", "ADD".to_string()),
            ("CNI_CONTAINERID", cid.to_string()),
            ("CNI_NETNS", pod.netns.display().to_string()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_PATH", "/usr/lib/cni".to_string()),
        ]
    };
    let run = |env: &[(&str, String)], stdin: &str| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        raw_palisade(&n, &env, stdin)
    };
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, String, u64, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("no CNI_COMMAND", vec![], conf(json!({})), 4, "CNI_COMMAND"),
        (
            "unknown command",
            vec![("CNI_COMMAND", "FROB".into())],
            conf(json!({})),
            4,
            "FROB",
        ),
        (
            "not JSON",
            env_add("x"),
            "{nope".into(),
            6,
            "not valid JSON",
        ),
        (
            "unsupported version",
            env_add("x"),
            conf(json!({"cniVersion": "9.9.9"})),
            1,
            "9.9.9",
        ),
        (
            "no prevResult",
            env_add("x"),
            conf(json!({"prevResult": null})),
            7,
            "prevResult",
        ),
        (
            "bad attachMode",
            env_add("x"),
            conf(json!({"attachMode": "warp"})),
            7,
            "attachMode",
        ),
        (
            "no container id",
            env_add("x")
                .into_iter()
                .filter(|(k, _)| *k != "CNI_CONTAINERID")
                .collect(),
            conf(json!({})),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "garbage prevResult",
            env_add("x"),
            conf(json!({"prevResult": {"interfaces": "many"}})),
            6,
            "prevResult",
        ),
        (
            "GC without valid attachments",
            vec![("CNI_COMMAND", "GC".into())],
            conf(json!({"cniVersion": "1.1.0"})),
            7,
            "valid-attachments",
        ),
        (
            "CHECK at 0.3.1",
            vec![
                ("CNI_COMMAND", "CHECK".into()),
                ("CNI_CONTAINERID", "x".into()),
                ("CNI_IFNAME", "eth0".into()),
            ],
            conf(json!({"cniVersion": "0.3.1"})),
            1,
            "0.4.0",
        ),
    ];
    for (what, env, stdin, code, words) in cases {
        let (exit, v, out) = run(&env, &stdin);
        assert_ne!(exit, 0, "{what}: must fail\n{out}");
        assert_eq!(v["code"], code, "{what}: wrong code\n{out}");
        assert!(
            v["msg"].as_str().unwrap_or_default().contains(words),
            "{what}: message must mention {words:?}\n{out}"
        );
        assert!(
            v["cniVersion"].is_string(),
            "{what}: error JSON carries cniVersion\n{out}"
        );
    }
    // Nothing of the failed ADDs was registered.
    assert_eq!(endpoint_count(&n), 1);
}

#[test]
fn a_container_interface_that_is_not_a_veth_is_refused() {
    let n = node();
    let ns = Netns::new(&format!("{}d", n.prefix));
    sys::ip(&["-n", &ns.name, "link", "add", "eth0", "type", "bridge"]);
    let call = Call {
        container_id: "dummy-ctr".into(),
        netns: ns.path.display().to_string(),
        ifname: "eth0".into(),
        args: String::new(),
    };
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": call.netns}], "ips": []});
    let r = n.chain.exec_palisade("ADD", &[], Some(&prev), &call);
    expect_code(r, 7, "not a veth");
    assert_eq!(endpoint_count(&n), 0);
}

/// A real veth from the bridge plugin, and a directory squatting on the
/// path where palisade will pin the next endpoint's link: the programs get
/// attached, pinning fails, and palisade has to undo everything after the
/// maps were already written.
fn veth_with_blocked_pin(n: &Node, tag: &str) -> (Netns, Call, Value) {
    let ns = Netns::new(&format!("{}{tag}", n.prefix));
    let call = Call {
        container_id: format!("blocked-{tag}"),
        netns: ns.path.display().to_string(),
        ifname: "eth0".into(),
        args: String::new(),
    };
    let plugins = n.chain.conflist["plugins"].as_array().unwrap().clone();
    let out = n
        .chain
        .exec("ADD", &n.chain.plugin_conf(&plugins[0], None), &call);
    assert!(out.status.success(), "bridge ADD: {}", describe(&out));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The id the next ADD gets (taken in a transaction that is dropped).
    let mut store = palisade::store::Store::new(&n.state_dir);
    let next = store
        .write(std::time::Duration::from_secs(10))
        .unwrap()
        .allocate_endpoint_id()
        .unwrap();
    std::fs::create_dir_all(
        n.bpf_root
            .join(format!("links/ep{next}-from-container/squatter")),
    )
    .unwrap();
    (ns, call, result)
}

#[test]
fn a_failed_add_leaves_nothing_behind_and_fails_closed() {
    let n = node();
    let ok = n.add_pod("default", "ok", &[80]);
    let before = n.ctl(&["get", "identities", "-o", "json"], None);
    let (_ns, call, result) = veth_with_blocked_pin(&n, "b");
    let r = n.chain.exec_palisade("ADD", &[], Some(&result), &call);
    let err = r.expect_err("ADD must fail when the programs cannot be pinned");
    assert_eq!(err.code, Some(5), "{err}");
    assert!(err.msg.contains("link pin"), "{err}");
    // Nothing of it remains: not in the store, not in the maps.
    let eps = n.endpoints();
    assert_eq!(eps.len(), 1, "{eps:?}");
    let after = n.ctl(&["get", "identities", "-o", "json"], None);
    assert_eq!(
        before.stdout, after.stdout,
        "identities and ipcache unchanged"
    );
    let status = n.ctl(&["status", "-o", "json"], None);
    let st: Value = serde_json::from_slice(&status.stdout).unwrap();
    let endpoints_map = st["datapath"]["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "pal_endpoints")
        .unwrap()["entries"]
        .clone();
    assert_eq!(
        endpoints_map, 1,
        "only the healthy endpoint is in the map: {st}"
    );
    n.chain
        .check(&ok.call())
        .expect("the healthy endpoint is unaffected");
}

#[test]
fn fail_open_lets_the_container_start_unprotected_and_says_so() {
    let n = node_with(&[("failOpen", json!(true))]);
    n.add_pod("default", "first", &[]);
    let (_ns, call, result) = veth_with_blocked_pin(&n, "o");
    let mut cmd_conf = n
        .chain
        .plugin_conf(&n.chain.palisade_plugin(), Some(&result));
    cmd_conf["failOpen"] = json!(true);
    let out = n.chain.exec("ADD", &cmd_conf, &call);
    assert!(
        out.status.success(),
        "failOpen ADD succeeds: {}",
        describe(&out)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, result);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("WITHOUT palisade enforcement"),
        "the failure is logged: {}",
        describe(&out)
    );
    assert_eq!(
        endpoint_count(&n),
        1,
        "only the first container is registered"
    );
}

#[test]
fn clsact_mode_enforces_and_check_sees_a_deleted_filter() {
    let n = node_with(&[("attachMode", json!("netlink"))]);
    let a = n.add_pod("default", "a", &[80]);
    let b = n.add_pod("default", "b", &[80]);
    assert!(reachable(&a, &b));
    n.apply(DENY_ALL);
    assert!(
        !reachable(&a, &b),
        "deny-all enforced through clsact filters"
    );
    n.chain.check(&b.call()).expect("CHECK with clsact");
    let eps = n.endpoints();
    assert!(
        eps.iter().all(|e| e["attachment"]["mode"] == "netlink"),
        "{eps:?}"
    );
    let veth = eps.iter().find(|e| e["name"] == "b").unwrap()["hostIfname"]
        .as_str()
        .unwrap()
        .to_owned();
    sys::run(
        "tc",
        &["-n", &n.netns.name, "filter", "del", "dev", &veth, "egress"],
    );
    let r = n
        .chain
        .exec_palisade("CHECK", &[], Some(&b.result), &b.call());
    expect_code(r, 100, "detached");
    n.chain
        .del(&b.call())
        .expect("DEL after the filter was removed");
    // palisade's DEL alone (before bridge removes the veth) removes its filters.
    let a_veth = eps.iter().find(|e| e["name"] == "a").unwrap()["hostIfname"]
        .as_str()
        .unwrap()
        .to_owned();
    n.chain
        .exec_palisade("DEL", &[], Some(&a.result), &a.call())
        .expect("palisade DEL");
    for hook in ["ingress", "egress"] {
        let filters = sys::run(
            "tc",
            &["-n", &n.netns.name, "filter", "show", "dev", &a_veth, hook],
        );
        assert!(!filters.contains("pal_"), "{hook} filters left: {filters}");
    }
    n.chain.del(&a.call()).expect("chain DEL");
}

#[test]
fn without_kubernetes_args_the_endpoint_is_default_namespace_container_id() {
    let n = node();
    let ns = Netns::new(&format!("{}k", n.prefix));
    let call = Call {
        container_id: "plain-container-1".into(),
        netns: ns.path.display().to_string(),
        ifname: "eth0".into(),
        args: String::new(),
    };
    let mut conflist_labels = n.chain.conflist.clone();
    conflist_labels["plugins"][1]["args"] =
        json!({"cni": {"labels": [{"key": "app", "value": "web"}]}});
    let chain = testbed::chain::Chain::new(conflist_labels, &n.netns.path, &n.bin_dir);
    chain.add(&call).expect("ADD without K8S args");
    let eps = n.endpoints();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0]["namespace"], "default");
    assert_eq!(eps[0]["name"], "plain-container-1");
    assert_eq!(
        eps[0]["effectiveLabels"]["app"], "web",
        "labels from args.cni.labels: {eps:?}"
    );
    chain.del(&call).expect("DEL");
}

#[test]
fn status_succeeds_and_fails_with_50_when_bpffs_is_missing() {
    let n = node();
    n.chain
        .exec_palisade(
            "STATUS",
            &[("cniVersion", json!("1.1.0"))],
            None,
            &Call::default(),
        )
        .expect("STATUS");
    let bad = [
        ("cniVersion", json!("1.1.0")),
        ("bpfRoot", json!("/tmp/not-bpffs/palisade")),
    ];
    let r = n
        .chain
        .exec_palisade("STATUS", &bad, None, &Call::default());
    expect_code(r, 50, "BPF filesystem");
}

#[test]
fn fifty_concurrent_adds_and_dels_leave_no_pins_or_endpoints() {
    let n = Arc::new(node());
    let count = 50;
    let namespaces: Vec<Netns> = (0..count)
        .map(|i| Netns::new(&format!("{}q{i}", n.prefix)))
        .collect();
    let calls: Vec<Call> = (0..count)
        .map(|i| Call {
            container_id: format!("{}-c{i}", n.prefix),
            netns: namespaces[i].path.display().to_string(),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=load;K8S_POD_NAME=p{i}"),
        })
        .collect();
    // All ADDs at once, with policy applies racing them.
    thread::scope(|s| {
        for c in &calls {
            let n = n.clone();
            s.spawn(move || {
                n.chain
                    .add(c)
                    .unwrap_or_else(|e| panic!("concurrent ADD {}: {e}", c.container_id))
            });
        }
        for i in 0..5 {
            let n = n.clone();
            s.spawn(move || {
                n.apply(&format!(
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: load}}\nspec:\n  podSelector: {{matchLabels: {{x: \"{i}\"}}}}\n"
                ));
            });
        }
    });
    assert_eq!(endpoint_count(&n), count);
    assert_eq!(n.pins().len(), 2 * count, "two pins per endpoint");
    // Every container passes CHECK, the bridge plugin's included: its check
    // of the bridge address holds whatever order the veths were added in.
    for c in &calls {
        n.chain
            .check(c)
            .unwrap_or_else(|e| panic!("CHECK {}: {e}", c.container_id));
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
    assert_eq!(endpoint_count(&n), 0);
    assert!(n.pins().is_empty(), "pins leaked: {:?}", n.pins());
    let st: Value = serde_json::from_slice(&n.ctl(&["status", "-o", "json"], None).stdout).unwrap();
    for m in st["datapath"]["maps"].as_array().unwrap() {
        if ["pal_endpoints", "pal_policy", "pal_policy_exact"]
            .contains(&m["name"].as_str().unwrap_or(""))
        {
            assert_eq!(m["entries"], 0, "{m}");
        }
    }
    let leftover_veths = n.host_veths();
    assert!(
        leftover_veths.is_empty(),
        "the bridge plugin's DEL removed every veth: {leftover_veths:?}"
    );
    drop(namespaces);
}

#[test]
fn the_example_conflists_end_with_palisade_and_the_bridge_chain_runs() {
    let conf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
    for name in ["bridge", "flannel", "calico"] {
        let path = conf_dir.join(format!("{name}.conflist"));
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(
            plugins.last().unwrap()["type"],
            "palisade",
            "{} must end with palisade",
            path.display()
        );
        let version = v["cniVersion"].as_str().unwrap();
        assert!(
            ["0.3.1", "0.4.0", "1.0.0", "1.1.0"].contains(&version),
            "{version}"
        );
    }
    // conf/bridge.conflist as shipped (bridge, portmap, palisade), with its
    // directories moved into the test node and masquerading (iptables) off.
    let n = node();
    let mut conf: Value =
        serde_json::from_slice(&std::fs::read(conf_dir.join("bridge.conflist")).unwrap()).unwrap();
    conf["plugins"][0]["ipMasq"] = json!(false);
    conf["plugins"][0]["ipam"]["dataDir"] = json!(n.dir.join("ipam-example"));
    conf["plugins"][2]["stateDir"] = json!(n.state_dir);
    conf["plugins"][2]["bpfRoot"] = json!(n.bpf_root);
    let chain = testbed::chain::Chain::new(conf, &n.netns.path, &n.bin_dir);
    let namespaces: Vec<Netns> = (0..2)
        .map(|i| Netns::new(&format!("{}e{i}", n.prefix)))
        .collect();
    let calls: Vec<Call> = namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| Call {
            container_id: format!("example-{i}"),
            netns: ns.path.display().to_string(),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=example-{i}"),
        })
        .collect();
    let results: Vec<Value> = calls
        .iter()
        .map(|c| chain.add(c).expect("ADD through bridge, portmap, palisade"))
        .collect();
    assert_eq!(endpoint_count(&n), 2);
    let addr = |r: &Value| -> std::net::IpAddr {
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(probe(
        &namespaces[0].path,
        addr(&results[1]),
        Proto::Icmp,
        0,
        PROBE_TIMEOUT
    ));
    n.apply(DENY_ALL);
    assert!(!probe(
        &namespaces[0].path,
        addr(&results[1]),
        Proto::Icmp,
        0,
        PROBE_TIMEOUT
    ));
    for c in &calls {
        chain.check(c).expect("CHECK");
        chain.del(c).expect("DEL in reverse order");
    }
    assert_eq!(endpoint_count(&n), 0);
    assert!(n.pins().is_empty());
}

#[test]
fn palisadectl_gc_forgets_endpoints_whose_container_is_gone() {
    let n = node();
    let alive = n.add_pod("default", "alive", &[]);
    let dead = n.add_pod("default", "dead", &[]);
    let out = n.ctl(&["gc"], None);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to remove"),
        "{}",
        describe(&out)
    );
    assert_eq!(endpoint_count(&n), 2);
    n.kill_pod(&dead);
    // Namespace teardown is asynchronous; wait for the veth pair to go.
    let veth = n.endpoints().iter().find(|e| e["name"] == "dead").unwrap()["hostIfname"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while n.host_veths().contains(&veth) {
        assert!(
            std::time::Instant::now() < deadline,
            "veth {veth} outlived its namespace"
        );
        thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = n.ctl(&["gc"], None);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed endpoint"),
        "{}",
        describe(&out)
    );
    let eps = n.endpoints();
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0]["name"], "alive");
    assert_eq!(n.pins().len(), 2, "{:?}", n.pins());
    n.chain
        .check(&alive.call())
        .expect("the living container is untouched");
}

/// A map pinned by an incompatible build (here a trie where this build keeps
/// a hash) is refused with what to do, and left as it was: never misread.
#[test]
fn a_pinned_map_of_an_incompatible_build_is_refused() {
    let n = node();
    let maps = palisade::dataplane::maps_dir(&n.bpf_root);
    assert!(maps.ends_with("maps-v1"), "{}", maps.display());
    std::fs::create_dir_all(&maps).unwrap();
    let pin = maps.join("pal_policy");
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "lpm_trie",
            "key",
            "20",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "pal_policy",
            "flags",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let Err(err) = n.try_add_pod("default", "p", &[]) else {
        panic!("ADD must refuse the foreign map");
    };
    let text = format!("{err}");
    assert!(
        text.contains("pal_policy") && text.contains("LpmTrie") && text.contains("remove"),
        "the error names the map, the mismatch and what to do: {text}"
    );
    let sync = n.ctl(&["sync"], None);
    assert!(!sync.status.success(), "sync refuses it too");
    assert!(
        String::from_utf8_lossy(&sync.stderr).contains("does not match this palisade build"),
        "{}",
        String::from_utf8_lossy(&sync.stderr)
    );
    let info = aya::maps::MapInfo::from_pin(&pin).unwrap();
    assert!(
        matches!(info.map_type(), Ok(aya::maps::MapType::LpmTrie)),
        "the foreign map is left as it was"
    );
    assert_eq!(endpoint_count(&n), 0);
}

/// Releases before the ABI version was in the pin path kept ABI 1's maps in
/// `maps/`: the next operation adopts them in place (renamed to `maps-v1`),
/// so an upgrade keeps every entry and the connections conntrack follows.
#[test]
fn maps_pinned_where_earlier_releases_kept_them_are_adopted_in_place() {
    let n = node();
    let a = n.add_pod("x", "a", &[80]);
    let b = n.add_pod("x", "b", &[80]);
    let (v1, legacy) = (n.bpf_root.join("maps-v1"), n.bpf_root.join("maps"));
    assert!(v1.is_dir() && !legacy.exists());
    let id = |p: &std::path::Path| {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(p)
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["id"].clone()
    };
    let ct = id(&v1.join("pal_ct_tables"));
    std::fs::rename(&v1, &legacy).unwrap();
    assert!(
        reachable(&a, &b),
        "running programs hold their maps: unaffected"
    );
    // Both isolated: the next write finds the maps where the old release put
    // them, and enforces with the same maps.
    n.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-in, namespace: x}\nspec:\n  podSelector: {matchLabels: {}}\n  policyTypes: [Ingress]\n",
    );
    assert!(v1.is_dir() && !legacy.exists(), "moved to maps-v1");
    assert_eq!(
        id(&v1.join("pal_ct_tables")),
        ct,
        "the same conntrack tables"
    );
    assert!(!reachable(&a, &b), "the policy is enforced");
    assert!(!reachable(&b, &a), "x/a is isolated too");
}

/// The capacity of each map is a setting (conflist `mapSizes`), applied
/// when the maps are created; a configuration that asks for other
/// capacities later is refused with what to do, and so is a daemon started
/// with others; a bad setting names what to fix.
#[test]
fn map_sizes_are_set_when_the_maps_are_created_and_a_change_is_refused() {
    let n = node_with(&[(
        "mapSizes",
        json!({"conntrack": 4096, "policy": 8192, "eventBytes": 65536}),
    )]);
    let a = n.add_pod("x", "a", &[80]);
    let max_entries = |map: &str| {
        let pin = palisade::dataplane::map_pin(&n.bpf_root, map);
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&pin)
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["max_entries"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(max_entries("pal_policy"), 8192);
    assert_eq!(max_entries("pal_events"), 65536);
    assert_eq!(max_entries("pal_endpoints"), 4096, "a default for the rest");
    assert_eq!(
        max_entries("pal_ct_tables"),
        8192,
        "two tables per endpoint"
    );
    let st: Value = serde_json::from_slice(&n.ctl(&["status", "-o", "json"], None).stdout).unwrap();
    let budgets = st["datapath"]["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 2, "{st}");
    assert!(
        budgets.iter().all(|b| b["budget"] == 4096),
        "each conntrack table holds the configured budget: {st}"
    );

    let call = Call {
        container_id: "resized".into(),
        netns: a.netns.display().to_string(),
        ifname: "eth0".into(),
        args: String::new(),
    };
    let r = n.chain.exec_palisade(
        "ADD",
        &[(
            "mapSizes",
            json!({"conntrack": 4096, "policy": 16384, "eventBytes": 65536}),
        )],
        Some(&a.result),
        &call,
    );
    expect_code(r, 7, "8192 entries and this configuration asks for 16384");
    let r = n.chain.exec_palisade(
        "ADD",
        &[(
            "mapSizes",
            json!({"conntrack": 4096, "policy": 16384, "eventBytes": 65536}),
        )],
        Some(&a.result),
        &call,
    );
    expect_code(r, 7, "palisadectl reset --yes");
    for (bad, words) in [
        (
            json!({"conntrak": 4096}),
            "not a map size; the sizes are endpoints",
        ),
        (json!({"eventBytes": 10000}), "power of two"),
        (json!({"policy": 0}), "mapSizes.policy: 0 is not between 1"),
    ] {
        let r = n
            .chain
            .exec_palisade("ADD", &[("mapSizes", bad)], Some(&a.result), &call);
        expect_code(r, 7, words);
    }
    assert_eq!(
        n.endpoints().len(),
        1,
        "nothing was added by the refused ADDs"
    );

    // A daemon asked for other capacities does not start on these maps.
    let out = n
        .netns
        .command(n.bin_dir.join("palisadectl"))
        .args([
            "daemon",
            "--map-size",
            "conntrack=4096",
            "--map-size",
            "policy=16384",
            "--map-size",
            "eventBytes=65536",
            "--dns-proxy-port",
            "0",
        ])
        .env("PALISADE_STATE_DIR", &n.state_dir)
        .env("PALISADE_BPF_ROOT", &n.bpf_root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("asks for 16384"),
        "the daemon must refuse: {text}"
    );
}

#[test]
fn maps_created_before_any_container_take_the_first_configured_sizes() {
    // `palisadectl apply` before the first container creates the maps with
    // the defaults (it has no size setting) ...
    let n = node_with(&[("mapSizes", json!({"policy": 8192, "endpoints": 512}))]);
    n.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-in, namespace: x}\nspec:\n  podSelector: {matchLabels: {}}\n  policyTypes: [Ingress]\n",
    );
    let max_entries = |map: &str| {
        let pin = palisade::dataplane::map_pin(&n.bpf_root, map);
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&pin)
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["max_entries"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(max_entries("pal_policy"), 65536, "the defaults, at first");
    // ... and the first ADD, configured, creates them again with its sizes
    // (they hold no endpoint yet); the policy applied before is enforced.
    let a = n.add_pod("x", "a", &[80]);
    let b = n.add_pod("x", "b", &[80]);
    assert_eq!(max_entries("pal_policy"), 8192);
    assert_eq!(max_entries("pal_endpoints"), 512);
    assert_eq!(max_entries("pal_ct_tables"), 1024);
    assert!(!reachable(&a, &b), "the policy applied before is enforced");
    assert!(!reachable(&b, &a));
}
