//! The Kubernetes manifests in `packaging/kubernetes/`: every document
//! parses strictly into its typed object, the ClusterRole grants exactly
//! what the agent watches ([`palisade::cluster::WATCHED`] ×
//! [`palisade::cluster::VERBS`]), and the DaemonSets are wired the way the
//! agent, the CNI plugin and the kubelet expect.

use std::{
    collections::BTreeSet,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Namespace, PodSpec, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use palisade::cluster::{VERBS, WATCHED};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The host's state directory and bpffs (under which the default bpf root
/// lies). The agent's containers mount them at the same paths, so that the
/// CNI plugin (on the host) and the daemon (in the pod) agree on the socket
/// and the pins.
const STATE_DIR: &str = "/var/lib/palisade";
const BPFFS: &str = "/sys/fs/bpf";
/// The host's CNI directories, where the container runtime looks.
const CNI_CONF_DIR: &str = "/etc/cni/net.d";
const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// `palisadectl install-cni`'s default `--cni-conf-dir`.
const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// One typed document, with where it came from.
#[derive(Debug)]
struct Doc {
    origin: String,
    object: Object,
}

#[derive(Debug)]
enum Object {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    DaemonSet(Box<DaemonSet>),
    CustomResourceDefinition(Box<CustomResourceDefinition>),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::DaemonSet(_) => "DaemonSet",
            Object::CustomResourceDefinition(_) => "CustomResourceDefinition",
        }
    }
}

fn manifest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes")
}

/// Every `.yaml`/`.yml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The first places where `typed` (the document after a round trip through
/// its Kubernetes type) differs from `raw` (the document as written): a
/// field the type does not know is dropped by the round trip, so a
/// misspelled or misplaced field shows up here.
fn differences(path: &str, raw: &Value, typed: &Value, out: &mut Vec<String>) {
    match (raw, typed) {
        (Value::Object(r), Value::Object(t)) => {
            for (k, rv) in r {
                let p = format!("{path}.{k}");
                match t.get(k) {
                    Some(tv) => differences(&p, rv, tv, out),
                    None => out.push(format!("{p}: unknown field (written as {rv})")),
                }
            }
            for k in t.keys().filter(|k| !r.contains_key(*k)) {
                out.push(format!("{path}.{k}: appears after the round trip"));
            }
        }
        (Value::Array(r), Value::Array(t)) if r.len() == t.len() => {
            for (i, (rv, tv)) in r.iter().zip(t).enumerate() {
                differences(&format!("{path}[{i}]"), rv, tv, out);
            }
        }
        _ if raw == typed => {}
        // JSON Schema bounds are floats in the type: 1 reads back as 1.0.
        (Value::Number(r), Value::Number(t)) if r.as_f64() == t.as_f64() => {}
        _ => out.push(format!("{path}: written as {raw}, reads back as {typed}")),
    }
}

/// Deserialise strictly: a type error names its path, and an unknown field
/// (which k8s-openapi ignores) fails the round-trip comparison.
fn strict<T: DeserializeOwned + Serialize>(origin: &str, raw: &Value) -> T {
    let typed: T = serde_path_to_error::deserialize(raw.clone())
        .unwrap_or_else(|e| panic!("{origin}: does not decode at {}: {}", e.path(), e.inner()));
    let back = serde_json::to_value(&typed)
        .unwrap_or_else(|e| panic!("{origin}: does not encode again: {e}"));
    let mut diffs = Vec::new();
    differences("", raw, &back, &mut diffs);
    assert!(
        diffs.is_empty(),
        "{origin}: fields lost or changed when decoded as its Kubernetes type \
         (misspelled, misplaced or of the wrong type?):\n  {}",
        diffs.join("\n  ")
    );
    typed
}

fn parse_file(path: &Path) -> Vec<Doc> {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let raw: Value = serde_path_to_error::deserialize(de)
            .unwrap_or_else(|e| panic!("{name}, document {}: not valid YAML: {e}", i + 1));
        if raw.is_null() {
            // Only comments, or an empty document after `---`.
            continue;
        }
        let field = |f: &str| {
            raw.get(f)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{name}, document {}: no {f}", i + 1))
                .to_owned()
        };
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let object_name = raw
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?");
        let origin = format!("{name}, document {} ({kind} {object_name})", i + 1);
        let object = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => Object::Namespace(strict(&origin, &raw)),
            ("v1", "ServiceAccount") => Object::ServiceAccount(strict(&origin, &raw)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                Object::ClusterRole(strict(&origin, &raw))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                Object::ClusterRoleBinding(strict(&origin, &raw))
            }
            ("apps/v1", "DaemonSet") => Object::DaemonSet(strict(&origin, &raw)),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                Object::CustomResourceDefinition(strict(&origin, &raw))
            }
            (v, k) => panic!(
                "{origin}: {v} {k} is not a kind this test knows; add it to parse_file \
                 (and check it) if the manifests need it"
            ),
        };
        docs.push(Doc { origin, object });
    }
    docs
}

fn parse(file: &str) -> Vec<Doc> {
    let path = manifest_dir().join(file);
    assert!(path.is_file(), "{} is missing", path.display());
    parse_file(&path)
}

/// The one object of a kind in `docs`.
fn only<'a, T>(docs: &'a [Doc], kind: &str, pick: impl Fn(&'a Object) -> Option<&'a T>) -> &'a T {
    let found: Vec<&T> = docs.iter().filter_map(|d| pick(&d.object)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, found {}",
        found.len()
    );
    found[0]
}

fn daemonset<'a>(docs: &'a [Doc], name: &str) -> &'a DaemonSet {
    docs.iter()
        .find_map(|d| match &d.object {
            Object::DaemonSet(ds) if ds.metadata.name.as_deref() == Some(name) => Some(&**ds),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no DaemonSet {name}"))
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .unwrap_or_else(|| panic!("DaemonSet {:?} has no pod template spec", ds.metadata.name))
}

/// `command` then `args`, from the palisadectl binary on: the rest of the
/// command line of a container that runs palisadectl (directly or under
/// tini), or `None`.
fn palisadectl_args(c: &Container) -> Option<Vec<String>> {
    let argv: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect();
    let at = argv
        .iter()
        .position(|a| Path::new(a).file_name().is_some_and(|f| f == "palisadectl"))?;
    Some(argv[at + 1..].to_vec())
}

/// The value of `--flag VALUE` or `--flag=VALUE`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(name)?.strip_prefix('=')
        }
    })
}

/// The container whose palisadectl command starts with `subcommand`.
fn running<'a>(containers: &'a [Container], subcommand: &str) -> &'a Container {
    containers
        .iter()
        .find(|c| palisadectl_args(c).is_some_and(|a| a.first().is_some_and(|s| s == subcommand)))
        .unwrap_or_else(|| {
            panic!(
                "no container runs `palisadectl {subcommand}` (containers: {:?})",
                containers.iter().map(|c| &c.name).collect::<Vec<_>>()
            )
        })
}

/// The host path of the hostPath volume mounted at `mount_path` in `c`,
/// with the mount's propagation.
fn host_mount(spec: &PodSpec, c: &Container, mount_path: &str) -> Option<(String, Option<String>)> {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == mount_path)?;
    let v = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .unwrap_or_else(|| {
            panic!(
                "container {} mounts volume {}, which the pod does not define",
                c.name, m.name
            )
        });
    let hp = v.host_path.as_ref()?;
    Some((hp.path.clone(), m.mount_propagation.clone()))
}

/// Assert that `c` mounts the host's `host_path` at the same path.
fn assert_same_path_mount(spec: &PodSpec, c: &Container, host_path: &str) -> Option<String> {
    let (path, propagation) = host_mount(spec, c, host_path).unwrap_or_else(|| {
        panic!(
            "container {} does not mount a hostPath volume at {host_path}",
            c.name
        )
    });
    assert_eq!(
        path, host_path,
        "container {} mounts host path {path} at {host_path}: the CNI plugin on the host and \
         palisade in the pod would see different directories",
        c.name
    );
    propagation
}

fn privileged(c: &Container) -> bool {
    c.security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false)
}

fn assert_tolerates_everything(ds: &DaemonSet) {
    let name = ds.metadata.name.as_deref().unwrap_or("?");
    let tolerations = pod_spec(ds).tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()
                && t.toleration_seconds.is_none()),
        "DaemonSet {name} must tolerate every taint (a toleration with operator Exists and no \
         key, effect or tolerationSeconds) so that it runs on every node; it has {tolerations:?}"
    );
}

/// Checks every pod spec must pass for the API server and the kubelet.
fn assert_pod_valid(ds: &DaemonSet) {
    let name = ds.metadata.name.as_deref().unwrap_or("?");
    let spec = ds.spec.as_ref().expect("DaemonSet has a spec");
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            template_labels.get(k),
            Some(v),
            "DaemonSet {name}: the selector's {k}={v} is not a label of the pod template"
        );
    }
    let pod = pod_spec(ds);
    let volumes: BTreeSet<&str> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
        assert!(
            c.image.as_deref().is_some_and(|i| i.contains(':')),
            "DaemonSet {name}, container {}: the image needs an explicit tag, has {:?}",
            c.name,
            c.image
        );
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(m.name.as_str()),
                "DaemonSet {name}, container {}: mounts undefined volume {}",
                c.name,
                m.name
            );
            if m.mount_propagation.as_deref() == Some("Bidirectional") {
                assert!(
                    privileged(c),
                    "DaemonSet {name}, container {}: Bidirectional propagation of {} is only \
                     allowed in a privileged container (the API server rejects the pod)",
                    c.name,
                    m.mount_path
                );
            }
        }
    }
}

/// The port number an HTTP probe targets (a named port is looked up in the
/// container's ports).
fn probe_port(c: &Container, probe: &Probe, which: &str) -> (String, i32) {
    let get = probe.http_get.as_ref().unwrap_or_else(|| {
        panic!(
            "container {}: the {which} probe must be an httpGet probe",
            c.name
        )
    });
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| {
                panic!(
                    "container {}: the {which} probe names port {name}, which it does not declare",
                    c.name
                )
            })
            .container_port,
    };
    (get.path.clone().unwrap_or_default(), port)
}

#[test]
fn every_manifest_parses_strictly_into_its_kubernetes_type() {
    let files = yaml_files(&manifest_dir());
    assert!(
        files.iter().any(|f| f.ends_with("palisade.yaml")),
        "no palisade.yaml in {} (found {files:?})",
        manifest_dir().display()
    );
    for f in files {
        let docs = parse_file(&f);
        assert!(!docs.is_empty(), "{} holds no object", f.display());
    }
}

#[test]
fn palisade_yaml_holds_its_objects_in_apply_order() {
    let docs = parse("palisade.yaml");
    let kinds: Vec<&str> = docs.iter().map(|d| d.object.kind()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet"
        ],
        "palisade.yaml must hold, in this order, the namespace (before what lives in it), the \
         service account, the role, the binding and the DaemonSet; documents: {:?}",
        docs.iter().map(|d| &d.origin).collect::<Vec<_>>()
    );
}

#[test]
fn cluster_role_grants_exactly_list_and_watch_on_the_watched_resources() {
    let docs = parse("palisade.yaml");
    let role = only(&docs, "ClusterRole", |o| match o {
        Object::ClusterRole(r) => Some(&**r),
        _ => None,
    });
    let name = role.metadata.name.as_deref().unwrap_or("?");
    assert!(
        role.aggregation_rule.is_none(),
        "ClusterRole {name} must not aggregate other roles' rules"
    );
    let mut granted = BTreeSet::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        assert!(
            rule.non_resource_urls.is_none(),
            "ClusterRole {name}, rule {i}: grants non-resource URLs {:?}; the agent needs none",
            rule.non_resource_urls
        );
        assert!(
            rule.resource_names.is_none(),
            "ClusterRole {name}, rule {i}: restricted to resourceNames {:?}; the agent lists \
             and watches whole collections",
            rule.resource_names
        );
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        for (what, values) in [
            ("apiGroups", groups),
            ("resources", resources),
            ("verbs", &rule.verbs[..]),
        ] {
            assert!(
                !values.iter().any(|v| v.contains('*')),
                "ClusterRole {name}, rule {i}: wildcard in {what} {values:?}"
            );
            assert!(
                !values.is_empty(),
                "ClusterRole {name}, rule {i}: empty {what} (grants nothing: a mistake?)"
            );
        }
        for g in groups {
            for r in resources {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let wanted: BTreeSet<(String, String, String)> = WATCHED
        .iter()
        .flat_map(|w| {
            VERBS
                .iter()
                .map(|v| (w.group.to_owned(), w.resource.to_owned(), (*v).to_owned()))
        })
        .collect();
    let missing: Vec<_> = wanted.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&wanted).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "ClusterRole {name} must grant exactly palisade::cluster::WATCHED x VERBS, as \
         (apiGroup, resource, verb):\n  missing: {missing:?}\n  not needed: {extra:?}"
    );
}

/// `policy-crds.yaml` defines exactly the custom resources the agent
/// watches (group, version, plural, kind): the tiers cluster-scoped,
/// PalisadeNetworkPolicy namespaced, served and stored, with the schema
/// limits palisade's validation also applies.
#[test]
fn the_policy_crds_define_exactly_the_custom_resources_the_agent_watches() {
    let docs = parse("policy-crds.yaml");
    let mut defined = BTreeSet::new();
    for d in &docs {
        let Object::CustomResourceDefinition(crd) = &d.object else {
            panic!("{}: policy-crds.yaml holds only CRDs", d.origin);
        };
        let spec = &crd.spec;
        let ours = spec.group == "palisade.io";
        assert_eq!(
            spec.scope,
            if ours { "Namespaced" } else { "Cluster" },
            "{}: scope",
            d.origin
        );
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{}.{}", spec.names.plural, spec.group).as_str()),
            "{}: a CRD's name is plural.group",
            d.origin
        );
        for v in &spec.versions {
            assert!(
                v.served && v.storage,
                "{}: {} served and stored",
                d.origin,
                v.name
            );
            let schema = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .unwrap_or_else(|| panic!("{}: no schema", d.origin));
            let spec_schema = &schema.properties.as_ref().expect("properties")["spec"];
            let props = spec_schema.properties.as_ref().expect("spec properties");
            if let Some(p) = props.get("priority") {
                assert_eq!(
                    (p.minimum, p.maximum),
                    (Some(0.0), Some(1000.0)),
                    "{}",
                    d.origin
                );
            }
            defined.insert((
                spec.group.clone(),
                v.name.clone(),
                spec.names.plural.clone(),
                spec.names.kind.clone(),
            ));
            if ours {
                // A NetworkPolicy's shape; palisade validates the rules.
                assert!(props.contains_key("egress") && props.contains_key("podSelector"));
                continue;
            }
            let ingress = props["ingress"].items.as_ref().expect("ingress items");
            let ingress = match ingress {
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s) => s,
                other => panic!("{}: {other:?}", d.origin),
            };
            let actions = ingress.properties.as_ref().expect("rule")["action"]
                .enum_
                .clone()
                .unwrap_or_default();
            let actions: Vec<String> = actions
                .iter()
                .filter_map(|a| a.0.as_str().map(str::to_owned))
                .collect();
            let want: &[&str] = match spec.names.kind.as_str() {
                "AdminNetworkPolicy" => &["Allow", "Deny", "Pass"],
                "BaselineAdminNetworkPolicy" => &["Allow", "Deny"],
                _ => &["Accept", "Deny", "Pass"],
            };
            assert_eq!(actions, want, "{}: rule actions", d.origin);
        }
    }
    let watched: BTreeSet<(String, String, String, String)> = WATCHED
        .iter()
        .filter(|w| w.group == "policy.networking.k8s.io" || w.group == "palisade.io")
        .map(|w| {
            (
                w.group.to_owned(),
                w.version.to_owned(),
                w.resource.to_owned(),
                w.kind.to_owned(),
            )
        })
        .collect();
    assert_eq!(defined, watched, "CRDs and the agent's custom resources");
}

#[test]
fn binding_gives_the_role_to_the_agents_service_account() {
    let docs = parse("palisade.yaml");
    let ns = only(&docs, "Namespace", |o| match o {
        Object::Namespace(n) => Some(&**n),
        _ => None,
    });
    let ns_name = ns
        .metadata
        .name
        .as_deref()
        .expect("the Namespace has a name");
    let sa = only(&docs, "ServiceAccount", |o| match o {
        Object::ServiceAccount(s) => Some(&**s),
        _ => None,
    });
    assert_eq!(
        sa.metadata.namespace.as_deref(),
        Some(ns_name),
        "the ServiceAccount must live in the namespace {ns_name} that palisade.yaml creates"
    );
    let role = only(&docs, "ClusterRole", |o| match o {
        Object::ClusterRole(r) => Some(&**r),
        _ => None,
    });
    let binding = only(&docs, "ClusterRoleBinding", |o| match o {
        Object::ClusterRoleBinding(b) => Some(&**b),
        _ => None,
    });
    assert_eq!(
        (
            binding.role_ref.api_group.as_str(),
            binding.role_ref.kind.as_str(),
            Some(binding.role_ref.name.as_str())
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            role.metadata.name.as_deref()
        ),
        "the ClusterRoleBinding must refer to the ClusterRole palisade.yaml defines"
    );
    let subjects: Vec<_> = binding
        .subjects
        .iter()
        .flatten()
        .map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()))
        .collect();
    assert_eq!(
        subjects,
        [(
            "ServiceAccount",
            sa.metadata
                .name
                .as_deref()
                .expect("the ServiceAccount has a name"),
            Some(ns_name)
        )],
        "the ClusterRoleBinding must bind the role to the agent's ServiceAccount in {ns_name}, \
         and to nothing else"
    );
}

#[test]
fn agent_daemonset_is_wired_for_the_node_the_kubelet_and_prometheus() {
    let docs = parse("palisade.yaml");
    let ns = only(&docs, "Namespace", |o| match o {
        Object::Namespace(n) => Some(&**n),
        _ => None,
    });
    let sa = only(&docs, "ServiceAccount", |o| match o {
        Object::ServiceAccount(s) => Some(&**s),
        _ => None,
    });
    let ds = daemonset(&docs, "palisade");
    assert_eq!(
        ds.metadata.namespace, ns.metadata.name,
        "the DaemonSet must live in the namespace palisade.yaml creates"
    );
    assert_pod_valid(ds);
    assert_tolerates_everything(ds);
    let pod = pod_spec(ds);
    assert_eq!(
        pod.service_account_name, sa.metadata.name,
        "the agent's pods must run as the ServiceAccount the ClusterRole is bound to"
    );
    assert_eq!(
        pod.host_network,
        Some(true),
        "the agent attaches programs to host veths and serves the host's CNI plugin: \
         hostNetwork must be true"
    );
    assert_ne!(
        pod.automount_service_account_token,
        Some(false),
        "the agent needs its service account token to reach the API server"
    );

    // The agent in cluster mode.
    let agent = running(&pod.containers, "daemon");
    let args = palisadectl_args(agent).expect("the agent runs palisadectl");
    assert!(
        args.iter().any(|a| a == "--kubernetes"),
        "the agent must run `palisadectl daemon --kubernetes`, runs {args:?}"
    );
    let env_node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .unwrap_or_else(|| panic!("the agent has no NODE_NAME environment variable"));
    let field = env_node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        field,
        Some("spec.nodeName"),
        "NODE_NAME must come from the downward API's spec.nodeName"
    );
    if let Some(node) = flag(&args, "--node-name") {
        assert_eq!(
            node, "$(NODE_NAME)",
            "--node-name must be the pod's node, $(NODE_NAME)"
        );
    }
    for f in ["--state-dir", "--bpf-root", "--socket"] {
        assert!(
            flag(&args, f).is_none(),
            "the agent must use the default {f}, which the CNI plugin on the host uses too"
        );
    }

    // What the daemon listens on, what the kubelet probes, what Prometheus
    // scrapes: the same port, reachable on the pod (= node) IP.
    let listen = flag(&args, "--listen").unwrap_or_else(|| {
        panic!(
            "the agent needs --listen: the default 127.0.0.1:9970 is not reachable by the kubelet"
        )
    });
    let addr: SocketAddr = listen
        .parse()
        .unwrap_or_else(|e| panic!("--listen {listen} is not an address and port: {e}"));
    assert!(
        !addr.ip().is_loopback(),
        "--listen {listen}: the kubelet probes the pod's IP (the node's), not loopback"
    );
    let port = i32::from(addr.port());
    let readiness = agent
        .readiness_probe
        .as_ref()
        .expect("the agent has a readiness probe");
    assert_eq!(
        probe_port(agent, readiness, "readiness"),
        ("/readyz".to_owned(), port),
        "the readiness probe must GET /readyz on the port the daemon listens on ({listen})"
    );
    let liveness = agent
        .liveness_probe
        .as_ref()
        .expect("the agent has a liveness probe");
    assert_eq!(
        probe_port(agent, liveness, "liveness"),
        ("/healthz".to_owned(), port),
        "the liveness probe must GET /healthz on the port the daemon listens on ({listen})"
    );
    if let Some(startup) = &agent.startup_probe {
        assert_eq!(
            probe_port(agent, startup, "startup"),
            ("/healthz".to_owned(), port),
            "the startup probe must GET /healthz on the port the daemon listens on ({listen})"
        );
    }
    let annotations = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    let port_text = port.to_string();
    for (k, v) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", port_text.as_str()),
        ("prometheus.io/path", "/metrics"),
    ] {
        assert_eq!(
            annotations.get(k).map(String::as_str),
            Some(v),
            "pod annotation {k} must be {v:?} (the daemon serves /metrics on {listen})"
        );
    }
    let memory_limit = agent
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"));
    assert!(memory_limit.is_some(), "the agent needs a memory limit");

    // The host directories, at the paths the host uses.
    assert_eq!(
        assert_same_path_mount(pod, agent, BPFFS).as_deref(),
        Some("HostToContainer"),
        "the agent must see a bpffs mounted on the host after it started"
    );
    assert_same_path_mount(pod, agent, STATE_DIR);
    let init = pod.init_containers.as_deref().unwrap_or_default();
    assert!(
        init.iter().chain(&pod.containers).any(|c| {
            host_mount(pod, c, BPFFS)
                .is_some_and(|(p, prop)| p == BPFFS && prop.as_deref() == Some("Bidirectional"))
        }),
        "some container must mount the host's {BPFFS} with Bidirectional propagation, so that \
         a bpffs it mounts there is the host's and the pins outlive the pod"
    );

    // The init container that adds palisade to the node's CNI network.
    let install = running(init, "install-cni");
    let install_args = palisadectl_args(install).expect("install-cni runs palisadectl");
    let conf_dir = flag(&install_args, "--cni-conf-dir").unwrap_or(DEFAULT_CNI_CONF_DIR);
    let (host, _) = host_mount(pod, install, conf_dir).unwrap_or_else(|| {
        panic!(
            "install-cni edits {conf_dir}, where container {} mounts no hostPath volume",
            install.name
        )
    });
    assert_eq!(
        host, CNI_CONF_DIR,
        "install-cni must edit the host's {CNI_CONF_DIR}, edits host path {host}"
    );
    assert!(
        !install_args.iter().any(|a| a == "--dry-run"),
        "install-cni must not run with --dry-run"
    );
    let install_at = init
        .iter()
        .position(|c| c.name == install.name)
        .expect("install-cni is an init container");
    let bin_installed = init[..=install_at].iter().any(|c| {
        c.volume_mounts.iter().flatten().any(|m| {
            m.read_only != Some(true)
                && host_mount(pod, c, &m.mount_path).is_some_and(|(p, _)| p == CNI_BIN_DIR)
        })
    });
    assert!(
        bin_installed,
        "an init container (before install-cni, or install-cni itself) must write the plugin \
         binary into the host's {CNI_BIN_DIR}: install-cni only edits the conflist"
    );
    let image = agent.image.as_deref();
    for c in init.iter().chain(&pod.containers) {
        assert_eq!(
            c.image.as_deref(),
            image,
            "container {} must use the agent's image (one version of palisadectl, the plugin \
             and the programs)",
            c.name
        );
    }
}

#[test]
fn uninstall_daemonset_takes_palisade_out_then_resets_every_node() {
    let palisade = parse("palisade.yaml");
    let ns = only(&palisade, "Namespace", |o| match o {
        Object::Namespace(n) => Some(&**n),
        _ => None,
    });
    let docs = parse("palisade-uninstall.yaml");
    let ds = daemonset(&docs, "palisade-uninstall");
    assert_eq!(
        ds.metadata.namespace, ns.metadata.name,
        "the uninstall DaemonSet must live in palisade's namespace (deleted with it at the end)"
    );
    assert_pod_valid(ds);
    assert_tolerates_everything(ds);
    let pod = pod_spec(ds);
    assert_eq!(
        pod.host_network,
        Some(true),
        "reset detaches programs from host veths: hostNetwork must be true"
    );
    let init = pod.init_containers.as_deref().unwrap_or_default();
    let position = |sub: &str| {
        let c = running(init, sub);
        init.iter()
            .position(|i| i.name == c.name)
            .expect("found among the init containers")
    };
    let (uninstall, reset) = (position("uninstall-cni"), position("reset"));
    assert!(
        uninstall < reset,
        "uninstall-cni must run before reset, so that no container gets palisade while it is \
         being detached"
    );
    let uninstall_c = &init[uninstall];
    let args = palisadectl_args(uninstall_c).expect("uninstall-cni runs palisadectl");
    let conf_dir = flag(&args, "--cni-conf-dir").unwrap_or(DEFAULT_CNI_CONF_DIR);
    assert_eq!(
        host_mount(pod, uninstall_c, conf_dir)
            .map(|(p, _)| p)
            .as_deref(),
        Some(CNI_CONF_DIR),
        "uninstall-cni must edit the host's {CNI_CONF_DIR} (it edits {conf_dir})"
    );
    let reset_c = &init[reset];
    let reset_args = palisadectl_args(reset_c).expect("reset runs palisadectl");
    assert!(
        reset_args.iter().any(|a| a == "--yes"),
        "reset does nothing without --yes: {reset_args:?}"
    );
    assert_same_path_mount(pod, reset_c, BPFFS);
    assert_same_path_mount(pod, reset_c, STATE_DIR);
}
