//! The OCI runtime-hook side: who a container is (from its annotations),
//! where its network namespace is (from its bundle), which host veths it
//! has, and what to do at `createRuntime`/`prestart` and `poststop`.
//!
//! Identity annotations (documented in the README):
//! - `palisade.io/namespace`: the namespace policies see (default `default`);
//! - `palisade.io/name`: the endpoint's name (default: the runtime's name for
//!   a Kubernetes pod, else the first 12 characters of the container id);
//! - `palisade.io/labels`: `key=value,key=value`;
//! - `palisade.io/label.<key>`: one label per annotation.
//!
//! Kubernetes' own annotations (`io.kubernetes.pod.namespace`/`.name`, and
//! containerd's `io.kubernetes.cri.sandbox-*`) name the pod when present, so
//! Pod objects in the store supply its labels.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use oci_spec::runtime::{ContainerState, LinuxNamespaceType, Spec, State};
use thiserror::Error;

use crate::{
    daemon::NodeOps,
    netlink::{self, LinkFacts, NetlinkError},
    netns::{self, NetnsError},
    node::{AddOutcome, NewEndpoint, NodeError},
    policy::{DEFAULT_NAMESPACE, Labels, selector},
    store::{Endpoint, PendingIdentity, Source},
};

pub const ANNOTATION_NAMESPACE: &str = "palisade.io/namespace";
pub const ANNOTATION_NAME: &str = "palisade.io/name";
pub const ANNOTATION_LABELS: &str = "palisade.io/labels";
pub const ANNOTATION_LABEL_PREFIX: &str = "palisade.io/label.";
const K8S_NAMESPACE: &[&str] = &[
    "io.kubernetes.pod.namespace",
    "io.kubernetes.cri.sandbox-namespace",
];
const K8S_NAME: &[&str] = &["io.kubernetes.pod.name", "io.kubernetes.cri.sandbox-name"];

/// The network name of endpoints the hook registers.
pub const OCI_NETWORK: &str = "oci";

#[derive(Debug, Error)]
pub enum OciError {
    #[error("the OCI state on stdin is not valid JSON: {0}")]
    State(#[source] serde_json::Error),
    #[error("read the bundle's config.json {path}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: Box<oci_spec::OciSpecError>,
    },
    #[error("annotation {annotation}: {message}")]
    Annotation { annotation: String, message: String },
    #[error(
        "the container's network namespace is unknown: the state has no pid and the bundle names no network namespace path"
    )]
    NoNetns,
    #[error(
        "container interface {container_ifname}: its veth peer (ifindex {peer}) is not in this network namespace; run the hook in the host's network namespace"
    )]
    PeerElsewhere { container_ifname: String, peer: u32 },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// Who a container is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// Whether any `palisade.io/` annotation said so explicitly.
    pub explicit: bool,
    /// Kubernetes named the pod: its namespace, name and (through the Pod
    /// object) labels are Kubernetes'; `palisade.io/` annotations, which a
    /// pod author controls, are ignored.
    pub k8s: bool,
}

/// Read a container's identity from its annotations.
pub fn identity(
    annotations: &HashMap<String, String>,
    container_id: &str,
) -> Result<Identity, OciError> {
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| annotations.get(*k).filter(|v| !v.is_empty()).cloned())
    };
    if let (Some(namespace), Some(name)) = (get(K8S_NAMESPACE), get(K8S_NAME)) {
        return Ok(Identity {
            namespace,
            name,
            labels: Labels::new(),
            explicit: false,
            k8s: true,
        });
    }
    let bad = |annotation: &str, message: String| OciError::Annotation {
        annotation: annotation.to_owned(),
        message,
    };
    let mut labels = Labels::new();
    if let Some(list) = annotations.get(ANNOTATION_LABELS) {
        for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                bad(
                    ANNOTATION_LABELS,
                    format!("{pair:?} is not key=value (write app=web,tier=db)"),
                )
            })?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    for (k, v) in annotations {
        if let Some(key) = k.strip_prefix(ANNOTATION_LABEL_PREFIX) {
            labels.insert(key.to_owned(), v.clone());
        }
    }
    selector::validate_labels(&labels, "labels")
        .map_err(|e| bad(ANNOTATION_LABELS, e.to_string()))?;
    let namespace = get(&[ANNOTATION_NAMESPACE])
        .or_else(|| get(K8S_NAMESPACE))
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    if !selector::valid_dns_label(&namespace) {
        return Err(bad(
            ANNOTATION_NAMESPACE,
            format!("{namespace:?} is not a namespace name (lowercase letters, digits and '-')"),
        ));
    }
    let name = get(&[ANNOTATION_NAME])
        .or_else(|| get(K8S_NAME))
        .unwrap_or_else(|| container_id.chars().take(12).collect());
    let explicit = annotations.keys().any(|k| k.starts_with("palisade.io/"));
    Ok(Identity {
        namespace,
        name,
        labels,
        explicit,
        k8s: false,
    })
}

/// Where a container's network lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsLocation {
    Path(PathBuf),
    /// The container shares the host's network namespace.
    Host,
}

/// The container's network namespace: the bundle's `linux.namespaces`
/// network path, else `/proc/PID/ns/net`; no network namespace entry in the
/// spec means host networking.
pub fn network_namespace(state: &State, spec: Option<&Spec>) -> Result<NetnsLocation, OciError> {
    let pid_path = || {
        state
            .pid()
            .filter(|p| *p > 0)
            .map(|p| NetnsLocation::Path(PathBuf::from(format!("/proc/{p}/ns/net"))))
            .ok_or(OciError::NoNetns)
    };
    let Some(spec) = spec else {
        return pid_path();
    };
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    match namespaces
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)
    {
        None => Ok(NetnsLocation::Host),
        Some(ns) => match ns.path() {
            Some(p) if !p.as_os_str().is_empty() => Ok(NetnsLocation::Path(p.clone())),
            _ => pid_path(),
        },
    }
}

/// Load the bundle's config.json, if there is one.
pub fn load_spec(bundle: &Path) -> Result<Option<Spec>, OciError> {
    let path = bundle.join("config.json");
    if !path.exists() {
        return Ok(None);
    }
    Spec::load(&path)
        .map(Some)
        .map_err(|source| OciError::Bundle {
            path,
            source: Box::new(source),
        })
}

/// One veth of a container, with its host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerVeth {
    pub container_ifname: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
}

/// Every veth in the namespace at `netns`, paired with its host side among
/// `host_links`.
pub fn find_veths(netns: &Path, host_links: &[LinkFacts]) -> Result<Vec<ContainerVeth>, OciError> {
    let links = netlink::in_netns(netns, netlink::list_links)??;
    let mut out = Vec::new();
    for l in links.iter().filter(|l| l.is_veth) {
        let Some(peer) = l.peer_index else { continue };
        let host = host_links
            .iter()
            .find(|h| h.index == peer && h.is_veth)
            .ok_or_else(|| OciError::PeerElsewhere {
                container_ifname: l.name.clone(),
                peer,
            })?;
        out.push(ContainerVeth {
            container_ifname: l.name.clone(),
            host_ifname: host.name.clone(),
            host_ifindex: host.index,
        });
    }
    Ok(out)
}

/// What the create-time hook did.
#[derive(Debug, Clone, Default)]
pub struct CreateReport {
    pub host_network: bool,
    /// No veth yet; an explicit identity was kept for the CNI ADD.
    pub pending: bool,
    pub added: Vec<Endpoint>,
    /// Veths the CNI plugin already enforces (identity updated if the
    /// annotations say so).
    pub already_managed: Vec<Endpoint>,
}

impl CreateReport {
    pub fn describe(&self, container_id: &str) -> String {
        if self.host_network {
            return format!("container {container_id} uses the host's network: nothing to enforce");
        }
        let mut parts = Vec::new();
        for e in &self.added {
            parts.push(format!(
                "enforcing on {} as endpoint {} ({}/{}, {})",
                e.host_ifname,
                e.id,
                e.namespace,
                e.name,
                e.attachment.mode_name()
            ));
        }
        for e in &self.already_managed {
            parts.push(format!(
                "{} already enforced by the CNI plugin (endpoint {})",
                e.host_ifname, e.id
            ));
        }
        if parts.is_empty() {
            parts.push(if self.pending {
                "no veth yet; its identity is kept for the CNI plugin".to_owned()
            } else {
                "no veth (network none, or attached later by CNI): nothing to enforce".to_owned()
            });
        }
        format!("container {container_id}: {}", parts.join("; "))
    }
}

/// `createRuntime` / `prestart` (and the Docker wrapper's `start`):
/// register and attach every veth of the container that nobody enforces.
pub fn on_create(
    node: &mut impl NodeOps,
    state: &State,
    spec: Option<&Spec>,
) -> Result<CreateReport, OciError> {
    let annotations = state.annotations().clone().unwrap_or_default();
    let who = identity(&annotations, state.id())?;
    let mut report = CreateReport::default();
    let netns_path = match network_namespace(state, spec)? {
        NetnsLocation::Host => {
            report.host_network = true;
            return Ok(report);
        }
        NetnsLocation::Path(p) => p,
    };
    let host_links = netlink::list_links()?;
    let veths = find_veths(&netns_path, &host_links)?;
    if veths.is_empty() {
        if who.explicit {
            let inode = std::fs::metadata(&netns_path)
                .map_err(|e| {
                    OciError::Netns(NetnsError::Netlink(NetlinkError::OpenNetns {
                        path: netns_path.display().to_string(),
                        source: e,
                    }))
                })?
                .ino();
            node.record_pending(
                inode,
                PendingIdentity {
                    container_id: state.id().to_owned(),
                    namespace: who.namespace.clone(),
                    name: who.name.clone(),
                    labels: who.labels.clone(),
                    created: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or_default(),
                },
            )?;
            report.pending = true;
        }
        return Ok(report);
    }
    let host_addresses = netns::host_addresses()?;
    for v in veths {
        let key = Endpoint::key_for(OCI_NETWORK, state.id(), &v.container_ifname);
        if node.is_enforced(&key, v.host_ifindex)? {
            continue; // this hook already ran for the container (e.g. prestart after createRuntime)
        }
        let addresses = netns::container_addresses(&netns_path, &v.container_ifname)?;
        let outcome = node.add_endpoint(NewEndpoint {
            source: Source::Oci,
            network: OCI_NETWORK.to_owned(),
            container_id: state.id().to_owned(),
            ifname: v.container_ifname.clone(),
            namespace: who.namespace.clone(),
            name: who.name.clone(),
            labels: who.labels.clone(),
            netns: netns_path.display().to_string(),
            host_ifname: v.host_ifname.clone(),
            host_ifindex: v.host_ifindex,
            addresses,
            host_addresses: Some(host_addresses.clone()),
            netns_inode: None,
            k8s: who.k8s,
            mac: netns::container_mac(&netns_path, &v.container_ifname)?,
        })?;
        match outcome {
            AddOutcome::Added(e) => report.added.push(e),
            AddOutcome::AlreadyManaged(mut e) => {
                // Not double work: only the identity the annotations give,
                // and never over one Kubernetes gave.
                if who.explicit && !e.k8s {
                    node.set_identity(&e.key(), &who.namespace, &who.name, &who.labels)?;
                    e.namespace = who.namespace.clone();
                    e.name = who.name.clone();
                    e.labels = who.labels.clone();
                }
                report.already_managed.push(e);
            }
        }
    }
    Ok(report)
}

/// `poststop`: forget the container. Works after its process and namespace
/// are gone (everything needed was recorded at create time). Idempotent.
pub fn on_poststop(node: &mut impl NodeOps, state: &State) -> Result<Vec<Endpoint>, OciError> {
    Ok(node.remove_container(state.id())?)
}

/// Which hook stage to act as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Create,
    Poststop,
    /// A stage palisade has nothing to do in.
    Other,
}

impl Stage {
    /// From the hook's argument, or (`auto`) from the state's status: the
    /// runtime reports `creating`/`created` before the process runs and
    /// `stopped` after it ended.
    pub fn resolve(arg: Option<&str>, state: &State) -> Self {
        match arg {
            Some("createRuntime" | "prestart" | "create") => Self::Create,
            Some("poststop") => Self::Poststop,
            Some("auto") | None => match state.status() {
                ContainerState::Creating | ContainerState::Created => Self::Create,
                ContainerState::Stopped => Self::Poststop,
                ContainerState::Running => Self::Other,
            },
            Some(_) => Self::Other,
        }
    }
}

/// Parse the OCI state a runtime writes to a hook's stdin.
pub fn parse_state(text: &str) -> Result<State, OciError> {
    serde_json::from_str(text).map_err(OciError::State)
}

/// Add palisade's hooks to an OCI spec (as JSON, keeping every field the
/// runtime wrote): `createRuntime` and `prestart` (runtimes that predate
/// createRuntime) and `poststop`, each running `hook_path hook_args...`.
/// Returns whether anything changed (injection is idempotent).
pub fn inject_hooks(spec: &mut serde_json::Value, hook_path: &str, hook_args: &[String]) -> bool {
    let Some(obj) = spec.as_object_mut() else {
        return false;
    };
    let hooks = obj.entry("hooks").or_insert_with(|| serde_json::json!({}));
    let Some(hooks) = hooks.as_object_mut() else {
        return false;
    };
    let mut changed = false;
    for (stage, stage_arg) in [("createRuntime", "createRuntime"), ("poststop", "poststop")] {
        let list = hooks.entry(stage).or_insert_with(|| serde_json::json!([]));
        let Some(list) = list.as_array_mut() else {
            continue;
        };
        if list.iter().any(|h| h["path"] == hook_path) {
            continue;
        }
        let mut args = vec!["palisade-hook".to_owned()];
        args.extend(hook_args.iter().cloned());
        args.push(stage_arg.to_owned());
        list.push(serde_json::json!({ "path": hook_path, "args": args }));
        changed = true;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn identity_comes_from_palisade_annotations_then_kubernetes_then_defaults() {
        let id = identity(
            &ann(&[
                ("palisade.io/namespace", "shop"),
                ("palisade.io/labels", "app=web, tier=front"),
                ("palisade.io/label.team", "a"),
            ]),
            "0123456789abcdef",
        )
        .unwrap();
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.name, "0123456789ab");
        assert_eq!(id.labels.len(), 3);
        assert!(id.explicit);

        // A pod author's palisade.io annotations cannot override the
        // identity Kubernetes gave the pod.
        let k8s = identity(
            &ann(&[
                ("io.kubernetes.pod.namespace", "prod"),
                ("io.kubernetes.pod.name", "web-1"),
                ("palisade.io/namespace", "kube-system"),
                ("palisade.io/labels", "role=admin"),
            ]),
            "x",
        )
        .unwrap();
        assert_eq!(
            (k8s.namespace.as_str(), k8s.name.as_str()),
            ("prod", "web-1")
        );
        assert!(k8s.k8s && !k8s.explicit && k8s.labels.is_empty());

        let none = identity(&HashMap::new(), "abc").unwrap();
        assert_eq!(
            (none.namespace.as_str(), none.name.as_str()),
            ("default", "abc")
        );
    }

    #[test]
    fn bad_identity_annotations_say_what_to_write() {
        let e = identity(&ann(&[("palisade.io/labels", "app")]), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("app=web,tier=db"), "{e}");
        let e = identity(&ann(&[("palisade.io/namespace", "Not_Valid")]), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("namespace name"), "{e}");
        let e = identity(&ann(&[("palisade.io/label.-x", "y")]), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid label key"), "{e}");
    }

    #[test]
    fn stages_resolve_from_arguments_or_status() {
        let state = |status: &str| {
            parse_state(&format!(
                r#"{{"ociVersion":"1.0.2","id":"c","status":"{status}","bundle":"/b"}}"#
            ))
            .unwrap()
        };
        assert_eq!(Stage::resolve(None, &state("creating")), Stage::Create);
        assert_eq!(
            Stage::resolve(Some("auto"), &state("stopped")),
            Stage::Poststop
        );
        assert_eq!(
            Stage::resolve(Some("poststop"), &state("creating")),
            Stage::Poststop
        );
        assert_eq!(
            Stage::resolve(Some("poststart"), &state("running")),
            Stage::Other
        );
    }

    #[test]
    fn host_network_and_namespace_paths_come_from_the_bundle() {
        let state = parse_state(
            r#"{"ociVersion":"1.0.2","id":"c","status":"creating","pid":42,"bundle":"/b"}"#,
        )
        .unwrap();
        let spec_with = |ns: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":[{ns}]}}}}"#
            ))
            .unwrap()
        };
        assert_eq!(
            network_namespace(&state, Some(&spec_with(r#"{"type":"pid"}"#))).unwrap(),
            NetnsLocation::Host
        );
        assert_eq!(
            network_namespace(&state, Some(&spec_with(r#"{"type":"network"}"#))).unwrap(),
            NetnsLocation::Path("/proc/42/ns/net".into())
        );
        assert_eq!(
            network_namespace(
                &state,
                Some(&spec_with(r#"{"type":"network","path":"/run/netns/x"}"#))
            )
            .unwrap(),
            NetnsLocation::Path("/run/netns/x".into())
        );
    }

    #[test]
    fn hook_injection_keeps_other_hooks_and_is_idempotent() {
        let mut spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "hooks": {"poststop": [{"path": "/other"}]},
            "vendorField": {"kept": true}
        });
        assert!(inject_hooks(
            &mut spec,
            "/usr/bin/palisade-hook",
            &["--state-dir=/s".into()]
        ));
        assert!(!inject_hooks(&mut spec, "/usr/bin/palisade-hook", &[]));
        assert_eq!(spec["hooks"]["poststop"].as_array().unwrap().len(), 2);
        assert_eq!(
            spec["hooks"]["createRuntime"][0]["args"][1],
            "--state-dir=/s"
        );
        assert_eq!(
            spec["hooks"]["createRuntime"][0]["args"][2],
            "createRuntime"
        );
        assert_eq!(spec["vendorField"]["kept"], true);
    }
}
