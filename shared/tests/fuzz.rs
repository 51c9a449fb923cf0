//! Fuzzed parsers: every input a container, a runtime or a user controls
//! goes through generated inputs, on stable Rust (proptest). Two kinds of
//! input per parser: a valid document with random subtrees replaced by
//! random JSON (structure-aware: near-valid inputs reach deep checks), and
//! the document's text with random byte edits (including invalid UTF-8
//! where the parser takes bytes). Properties: no panic, no hang (each call
//! runs under a watchdog), every rejection is an error with a message, and
//! nothing is lost (install-cni leaves a file it refuses as it was).
//!
//! Short run (CI): `cargo test -p palisade-shared --test fuzz` (512 cases
//! per target). Long run: `PALISADE_FUZZ_CASES=200000 cargo test --release
//! -p palisade-shared --test fuzz`.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic fails the case with its input"
)]

use std::{collections::HashMap, path::Path, sync::mpsc, time::Duration};

use palisade::{cni, cniconf, flows, oci, policy};
use proptest::{prelude::*, test_runner::Config};
use serde_json::{Value, json};

fn cases() -> u32 {
    std::env::var("PALISADE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

fn config() -> Config {
    Config {
        cases: cases(),
        // Failures are shrunk and printed; nothing is written to the tree.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Run `f` on its own thread; a call that takes longer than 20 s (a hang,
/// or a blow-up in time) fails the case. A panic fails it too.
fn watchdog<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(v) => {
            let _ = t.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("{what}: no result"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still running after 20 s"),
    }
}

/// Strings that parsers treat specially.
const WORDS: &[&str] = &[
    "",
    "0",
    "-1",
    "eth0",
    "cni0",
    "10.0.0.2/24",
    "10.0.0.2",
    "fd00::2/64",
    "::",
    "0.0.0.0/0",
    "300.1.1.1/33",
    "TCP",
    "UDP",
    "SCTP",
    "ICMP",
    "http",
    "app",
    "web",
    "x",
    "default",
    "In",
    "NotIn",
    "Exists",
    "DoesNotExist",
    "Ingress",
    "Egress",
    "Allow",
    "Deny",
    "Pass",
    "Accept",
    "*",
    "**.",
    "*.example.test",
    "**.example.test",
    "a..b",
    "1.0.0",
    "0.4.0",
    "1.1.0",
    "ADD",
    "palisade",
    "bridge",
    "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a",
    "=;=;",
    "palisade.io/labels",
    "app=web,tier=db",
    "app",
    "networking.k8s.io/v1",
    "NetworkPolicy",
    "palisade.io/v1alpha1",
    "PalisadeNetworkPolicy",
    "policy.networking.k8s.io/v1alpha1",
    "AdminNetworkPolicy",
    "v1",
    "Pod",
    "Namespace",
    "\u{0}",
    "é",
    "\u{202e}",
    "/proc/1/ns/net",
    "../../etc",
    "65535",
    "65536",
    "99999999999999999999",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(65535),
            Just(65536),
            Just(u64::MAX)
        ]
        .prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(WORDS).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ]
}

/// Random JSON whose object keys are mostly names the parsers know.
fn tree(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        4 => prop::sample::select(keys).prop_map(str::to_owned),
        1 => "[a-zA-Z]{0,8}",
    ];
    leaf().prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Every node of `v`, depth first, as a mutable reference by index.
fn nth_node(v: &mut Value, mut n: usize) -> Option<&mut Value> {
    fn walk<'a>(v: &'a mut Value, n: &mut usize) -> Option<&'a mut Value> {
        if *n == 0 {
            return Some(v);
        }
        *n -= 1;
        match v {
            Value::Array(a) => a.iter_mut().find_map(|c| walk(c, n)),
            Value::Object(o) => o.values_mut().find_map(|c| walk(c, n)),
            _ => None,
        }
    }
    walk(v, &mut n)
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count_nodes).sum(),
        Value::Object(o) => o.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// A seed with up to four of its subtrees replaced by random ones (the
/// root is never replaced: the document stays close to valid).
fn mutated(seeds: Vec<Value>, keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    (
        prop::sample::select(seeds),
        prop::collection::vec((any::<prop::sample::Index>(), tree(keys)), 0..4),
    )
        .prop_map(|(mut seed, edits)| {
            for (at, with) in edits {
                let n = count_nodes(&seed);
                if n > 1 {
                    let i = 1 + at.index(n - 1);
                    if let Some(node) = nth_node(&mut seed, i) {
                        *node = with;
                    }
                }
            }
            seed
        })
}

/// A seed's text with random byte edits: replace, insert, delete, truncate.
fn byte_edits(seeds: Vec<String>) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(seeds),
        prop::collection::vec((0u8..4, any::<prop::sample::Index>(), any::<u8>()), 1..6),
    )
        .prop_map(|(seed, edits)| {
            let mut b = seed.into_bytes();
            for (op, at, byte) in edits {
                let len = b.len();
                match op {
                    0 if len > 0 => b[at.index(len)] = byte,
                    1 => b.insert(at.index(len + 1), byte),
                    2 if len > 0 => {
                        b.remove(at.index(len));
                    }
                    3 => b.truncate(at.index(len + 1)),
                    _ => {}
                }
            }
            b
        })
}

// ---------------------------------------------------------------- CNI ----

const CNI_KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "prevResult",
    "interfaces",
    "ips",
    "address",
    "interface",
    "sandbox",
    "mac",
    "gateway",
    "routes",
    "dst",
    "dns",
    "args",
    "cni",
    "labels",
    "key",
    "value",
    "cni.dev/valid-attachments",
    "containerID",
    "ifname",
    "stateDir",
    "bpfRoot",
    "failOpen",
    "attachMode",
    "socket",
    "podWaitSeconds",
    "kubernetes",
    "mapSizes",
    "conntrack",
    "policy",
    "eventBytes",
];

fn cni_seeds() -> Vec<Value> {
    vec![
        json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "palisade",
            "stateDir": "/tmp/x",
            "labels": {"team": "a"},
            "args": {"cni": {"labels": [{"key": "app", "value": "web"}]}},
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                    {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:01"},
                    {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/x"}
                ],
                "ips": [
                    {"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 2},
                    {"address": "fd00::5/64", "interface": 2}
                ],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {}
            }
        }),
        json!({
            "cniVersion": "0.4.0",
            "name": "podman",
            "type": "palisade",
            "attachMode": "tcx",
            "failOpen": false,
            "podWaitSeconds": 2.5,
            "kubernetes": true,
            "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}],
            "prevResult": {"interfaces": [{"name": "veth0"}], "ips": [{"address": "10.88.0.2/16"}]}
        }),
    ]
}

/// What the plugin does with a network configuration before it touches
/// anything: decode it, read the previous result, its addresses and
/// host-side interfaces, the labels.
fn cni_parse(bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    let conf: cni::NetConf = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let _ = conf.arg_labels();
    if let Some(prev) = conf.prev_result.clone().filter(|v| !v.is_null()) {
        let prev: cni::PrevResult = serde_json::from_value(prev).map_err(|e| e.to_string())?;
        let _ = prev.host_interfaces();
        prev.container_addresses("eth0")?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn cni_configurations_near_valid(v in mutated(cni_seeds(), CNI_KEYS)) {
        let bytes = serde_json::to_vec(&v).unwrap();
        if let Err(e) = watchdog("CNI configuration", move || cni_parse(&bytes)) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn cni_configurations_byte_edited(
        b in byte_edits(cni_seeds().iter().map(Value::to_string).collect())
    ) {
        if let Err(e) = watchdog("CNI configuration bytes", move || cni_parse(&b)) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn cni_args(s in prop_oneof![
        ".{0,40}",
        prop::collection::vec(
            (prop::sample::select(WORDS), prop::sample::select(WORDS)), 0..5
        ).prop_map(|kv| kv.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")),
    ]) {
        let r = watchdog("CNI_ARGS", move || cni::parse_cni_args(&s));
        if let Err(e) = r {
            prop_assert!(!e.is_empty());
        }
    }
}

// ---------------------------------------------------------------- OCI ----

const OCI_KEYS: &[&str] = &[
    "ociVersion",
    "id",
    "status",
    "pid",
    "bundle",
    "annotations",
    "palisade.io/namespace",
    "palisade.io/name",
    "palisade.io/labels",
    "palisade.io/label.app",
    "io.kubernetes.pod.namespace",
    "io.kubernetes.pod.name",
    "linux",
    "namespaces",
    "type",
    "path",
    "hooks",
    "createRuntime",
    "poststop",
    "process",
    "args",
    "root",
];

fn oci_state_seeds() -> Vec<Value> {
    vec![
        json!({
            "ociVersion": "1.0.2",
            "id": "c1",
            "status": "creating",
            "pid": 1234,
            "bundle": "/run/bundle",
            "annotations": {
                "palisade.io/namespace": "shop",
                "palisade.io/labels": "app=web,tier=db",
                "palisade.io/label.team": "a"
            }
        }),
        json!({
            "ociVersion": "1.0.2",
            "id": "c2",
            "status": "stopped",
            "bundle": "/run/bundle",
            "annotations": {"io.kubernetes.pod.namespace": "x", "io.kubernetes.pod.name": "a"}
        }),
    ]
}

fn oci_spec_seeds() -> Vec<Value> {
    vec![json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}]},
        "hooks": {"createRuntime": [{"path": "/usr/bin/palisade-hook"}]},
        "annotations": {"palisade.io/namespace": "shop"}
    })]
}

/// What the hook does with its stdin and the bundle before it touches
/// anything: the state, the identity from annotations, the spec, where
/// the network namespace is; and what `palisade-hook inject` does.
fn oci_parse(state: &[u8], spec: &[u8], dir: &Path) -> Result<(), String> {
    std::fs::write(dir.join("config.json"), spec).unwrap();
    let spec = oci::load_spec(dir).map_err(|e| e.to_string());
    let text = std::str::from_utf8(state).map_err(|e| e.to_string())?;
    let state = oci::parse_state(text).map_err(|e| e.to_string())?;
    let empty = HashMap::new();
    let ann = state.annotations().as_ref().unwrap_or(&empty);
    let _ = oci::identity(ann, state.id());
    let _ = oci::network_namespace(&state, spec.as_ref().ok().and_then(Option::as_ref));
    spec.map(|_| ())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn oci_state_and_bundle_near_valid(
        state in mutated(oci_state_seeds(), OCI_KEYS),
        spec in mutated(oci_spec_seeds(), OCI_KEYS),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let (state, spec_bytes) = (serde_json::to_vec(&state).unwrap(), serde_json::to_vec(&spec).unwrap());
        if let Err(e) = watchdog("OCI state", move || oci_parse(&state, &spec_bytes, &d)) {
            prop_assert!(!e.is_empty());
        }
        let mut spec = spec;
        let before = spec.clone();
        let changed = watchdog("inject", move || {
            let c = oci::inject_hooks(&mut spec, "/usr/bin/palisade-hook", &["--x".into()]);
            (c, spec)
        });
        if !changed.0 {
            prop_assert_eq!(&changed.1, &before, "unchanged when it says so");
        }
    }

    #[test]
    fn oci_state_byte_edited(
        state in byte_edits(oci_state_seeds().iter().map(Value::to_string).collect()),
        spec in byte_edits(oci_spec_seeds().iter().map(Value::to_string).collect()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        if let Err(e) = watchdog("OCI state bytes", move || oci_parse(&state, &spec, &d)) {
            prop_assert!(!e.is_empty());
        }
    }
}

// ------------------------------------------------------------- policy ----

const POLICY_KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "labels",
    "annotations",
    "spec",
    "podSelector",
    "namespaceSelector",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "policyTypes",
    "ingress",
    "egress",
    "from",
    "to",
    "ports",
    "port",
    "endPort",
    "protocol",
    "ipBlock",
    "cidr",
    "except",
    "toFQDNs",
    "matchName",
    "matchPattern",
    "rules",
    "dns",
    "http",
    "priority",
    "subject",
    "pods",
    "namespaces",
    "action",
    "tier",
    "domainNames",
    "networks",
    "containers",
];

fn policy_seeds() -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}, {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                             "ports": [{"port": 80}, {"port": "http", "protocol": "TCP"}, {"port": 9000, "endPort": 9100}]}],
                "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": 53, "protocol": "UDP"}]}]
            }
        }),
        json!({
            "apiVersion": "palisade.io/v1alpha1",
            "kind": "PalisadeNetworkPolicy",
            "metadata": {"name": "dns", "namespace": "shop"},
            "spec": {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [
                    {"toFQDNs": [{"matchName": "api.example.test"}, {"matchPattern": "**.example.test"}], "ports": [{"port": 443}]},
                    {"to": [{"ipBlock": {"cidr": "10.96.0.10/32"}}], "ports": [{"port": 53, "protocol": "UDP", "rules": {"dns": [{"matchPattern": "*"}]}}]}
                ]
            }
        }),
        json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha1",
            "kind": "AdminNetworkPolicy",
            "metadata": {"name": "a"},
            "spec": {"priority": 10, "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                     "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "ports": [{"portNumber": {"port": 22, "protocol": "TCP"}}]}]}
        }),
        json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "c"},
            "spec": {"tier": "Admin", "priority": 5, "subject": {"pods": {"namespaceSelector": {}, "podSelector": {}}},
                     "egress": [{"action": "Accept", "to": [{"domainNames": ["*.example.test"]}, {"networks": ["192.0.2.0/24"]}]}]}
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "a", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]}
        }),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}}),
    ]
}

/// `palisadectl apply` parsing and validation: every error names what to
/// fix (a message), none panics.
fn policy_parse(text: &str) -> Result<(), String> {
    policy::parse_documents(text, "fuzz.yaml")
        .map(|_| ())
        .map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn policies_near_valid_as_yaml_and_json(
        docs in prop::collection::vec(mutated(policy_seeds(), POLICY_KEYS), 1..3),
        yaml in any::<bool>(),
    ) {
        let text = if yaml {
            docs.iter().map(|d| serde_yaml::to_string(d).unwrap()).collect::<Vec<_>>().join("---\n")
        } else {
            docs.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
        };
        if let Err(e) = watchdog("policy", move || policy_parse(&text)) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn policies_byte_edited(
        b in byte_edits(policy_seeds().iter().map(|d| serde_yaml::to_string(d).unwrap()).collect())
    ) {
        let text = String::from_utf8_lossy(&b).into_owned();
        if let Err(e) = watchdog("policy bytes", move || policy_parse(&text)) {
            prop_assert!(!e.is_empty());
        }
    }
}

// --------------------------------------------------------- install-cni ----

const CONFLIST_KEYS: &[&str] = &[
    "cniVersion",
    "cniVersions",
    "name",
    "plugins",
    "type",
    "bridge",
    "ipam",
    "subnet",
    "capabilities",
    "portMappings",
    "disableCheck",
];

fn conflist_seeds() -> Vec<Value> {
    vec![
        json!({
            "cniVersion": "1.0.0",
            "name": "cbr0",
            "plugins": [
                {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        }),
        json!({"cniVersion": "0.4.0", "name": "bridge", "type": "bridge", "bridge": "cni0",
               "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}),
    ]
}

/// install-cni on a directory holding one fuzzed file: it installs
/// (the result is JSON with palisade last, and a backup of the original
/// exists) or refuses with a message and leaves the file as it was.
fn install_case(name: &str, content: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    let entry = cniconf::plugin_entry(None).unwrap();
    match cniconf::install(dir.path(), None, &entry, false) {
        Ok(cniconf::Outcome::Installed { file, contents, .. }) => {
            let v: Value = serde_json::from_str(&contents)
                .map_err(|e| format!("installed a file that is not JSON: {e}"))?;
            let last = v["plugins"].as_array().and_then(|p| p.last()).cloned();
            if last.as_ref().map(|l| &l["type"]) != Some(&json!("palisade")) {
                return Err(format!("palisade is not the last plugin: {contents}"));
            }
            if std::fs::read_to_string(&file).ok().as_deref() != Some(contents.as_str()) {
                return Err("the file on disk differs from what install reported".into());
            }
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty(), "an error without a message");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                content,
                "a refused file was changed ({msg})"
            );
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn install_cni_near_valid(
        v in mutated(conflist_seeds(), CONFLIST_KEYS),
        ext in prop::sample::select(vec!["10-net.conflist", "10-net.conf", "10-net.json"]),
    ) {
        let bytes = serde_json::to_vec(&v).unwrap();
        let r = watchdog("install-cni", move || install_case(ext, &bytes));
        prop_assert!(r.is_ok(), "{:?}", r);
    }

    #[test]
    fn install_cni_byte_edited(
        b in byte_edits(conflist_seeds().iter().map(Value::to_string).collect()),
        ext in prop::sample::select(vec!["10-net.conflist", "10-net.conf"]),
    ) {
        let r = watchdog("install-cni bytes", move || install_case(ext, &b));
        prop_assert!(r.is_ok(), "{:?}", r);
    }
}

// ----------------------------------------------------------- flow log ----

const FLOW_LINE: &str = concat!(
    r#"{"time":"2026-01-01T00:00:00.000Z","kind":"drop","verdict":"denied","#,
    r#""reason":"no policy rule allows it","direction":"ingress","#,
    r#""endpoint":{"kind":"pod","address":"10.0.0.2","namespace":"x","name":"a","#,
    r#""identity":256,"labels":{"app":"a"}},"#,
    r#""peer":{"kind":"world","address":"192.0.2.1","identity":2,"domains":["a.test"]},"#,
    r#""protocol":"TCP","sport":40000,"dport":7,"isolatedBy":["x/deny-all"]}"#
);

proptest! {
    #![proptest_config(config())]

    /// A flow log with damaged lines (a crash mid-write, a disk error, an
    /// edit): every intact line is still read, the damaged ones skipped.
    #[test]
    fn flow_logs_with_damaged_lines(
        lines in prop::collection::vec(
            prop_oneof![
                Just(FLOW_LINE.as_bytes().to_vec()),
                byte_edits(vec![FLOW_LINE.to_owned()]),
                mutated(vec![serde_json::from_str(FLOW_LINE).unwrap()], &["time", "kind", "verdict", "reason", "direction", "endpoint", "peer", "address", "identity", "labels", "domains", "dns", "sport", "dport"])
                    .prop_map(|v| v.to_string().into_bytes()),
            ],
            0..12,
        )
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut text = Vec::new();
        let mut intact = 0;
        for l in &lines {
            if l.as_slice() == FLOW_LINE.as_bytes() {
                intact += 1;
            }
            text.extend_from_slice(l);
            text.push(b'\n');
        }
        let log = dir.path().join(flows::LOG_NAME);
        std::fs::write(&log, b"").unwrap();
        let mut tail = flows::Tail::at_end(dir.path());
        std::fs::write(&log, &text).unwrap();
        let d = dir.path().to_owned();
        let read = watchdog("flow log", move || flows::read_log(&d));
        let count = |rs: &[flows::FlowRecord]| {
            rs.iter()
                .filter(|r| serde_json::to_string(r).unwrap() == FLOW_LINE)
                .count()
        };
        prop_assert!(count(&read) >= intact, "{} intact lines, {} read back", intact, count(&read));
        // `flows --follow`: the same lines, and it goes on past the damage.
        let polled = tail.poll();
        prop_assert!(count(&polled) >= intact, "{} intact lines, {} followed", intact, count(&polled));
        let mut more = text.clone();
        if more.last() != Some(&b'\n') {
            more.push(b'\n');
        }
        more.extend_from_slice(FLOW_LINE.as_bytes());
        more.push(b'\n');
        std::fs::write(&log, &more).unwrap();
        let next = tail.poll();
        prop_assert!(count(&next) >= 1, "a line after the damage is followed: {:?}", next);
    }
}
