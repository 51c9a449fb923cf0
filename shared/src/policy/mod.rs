//! Kubernetes objects palisade understands (Namespace, Pod, NetworkPolicy)
//! and the validated domain model the compiler works on.
//!
//! Wire types are the `k8s-openapi` ones; documents are decoded strictly
//! (unknown fields are errors, like `kubectl apply --validate=strict`) and
//! validated with the API server's NetworkPolicy rules, then converted into
//! [`Policy`], [`PodInfo`] and [`NamespaceInfo`].

pub mod palisade;
pub mod selector;
pub mod tier;

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnetwork::IpNetwork;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod},
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;

pub use selector::{Labels, Selector};

use crate::abi::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

/// The label every namespace carries (Kubernetes sets it since 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The kinds `apply` takes, for error messages.
const KINDS: &str = "Namespace, Pod, NetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy and PalisadeNetworkPolicy";

/// Namespace of objects and endpoints that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Error)]
pub enum ObjectError {
    #[error("{source_name}: document {index}: {message}")]
    Document {
        source_name: String,
        index: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl ObjectError {
    pub fn invalid(path: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_owned(),
            message: message.into(),
        }
    }
}

/// Kinds of objects palisade stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    /// Another node of the cluster (cluster mode only; never applied).
    Node,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
    PalisadeNetworkPolicy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Pod => "Pod",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::Node => "Node",
            Self::AdminNetworkPolicy => "AdminNetworkPolicy",
            Self::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
            Self::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            Self::PalisadeNetworkPolicy => palisade::KIND,
        }
    }

    /// The tier policy kind this is, if it is one.
    pub fn tier_kind(self) -> Option<tier::TierKind> {
        match self {
            Self::AdminNetworkPolicy => Some(tier::TierKind::AdminNetworkPolicy),
            Self::BaselineAdminNetworkPolicy => Some(tier::TierKind::BaselineAdminNetworkPolicy),
            Self::ClusterNetworkPolicy => Some(tier::TierKind::ClusterNetworkPolicy),
            _ => None,
        }
    }
}

impl From<tier::TierKind> for Kind {
    fn from(k: tier::TierKind) -> Self {
        match k {
            tier::TierKind::AdminNetworkPolicy => Self::AdminNetworkPolicy,
            tier::TierKind::BaselineAdminNetworkPolicy => Self::BaselineAdminNetworkPolicy,
            tier::TierKind::ClusterNetworkPolicy => Self::ClusterNetworkPolicy,
        }
    }
}

/// An object as it was written (`object`, only ever displayed) and the
/// domain value it validated into (`value`, what palisade works with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Valid<W, D> {
    pub object: W,
    pub value: D,
}

/// A decoded, validated object.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Box<Valid<Namespace, NamespaceInfo>>),
    Pod(Box<Valid<Pod, PodInfo>>),
    NetworkPolicy(Box<Valid<NetworkPolicy, Policy>>),
    /// AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy.
    TierPolicy(Box<Valid<tier::TierObject, tier::TierPolicy>>),
    PalisadePolicy(Box<Valid<palisade::PalisadeNetworkPolicy, palisade::PalisadePolicy>>),
}

/// Which object: kind, namespace (empty for Namespace) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.as_str(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
        }
    }
}

impl Object {
    pub fn reference(&self) -> ObjectRef {
        match self {
            Object::Namespace(n) => ObjectRef {
                kind: Kind::Namespace,
                namespace: String::new(),
                name: n.value.name.clone(),
            },
            Object::Pod(p) => ObjectRef {
                kind: Kind::Pod,
                namespace: p.value.namespace.clone(),
                name: p.value.name.clone(),
            },
            Object::NetworkPolicy(p) => ObjectRef {
                kind: Kind::NetworkPolicy,
                namespace: p.value.namespace.clone(),
                name: p.value.name.clone(),
            },
            Object::TierPolicy(p) => ObjectRef {
                kind: p.value.kind.into(),
                namespace: String::new(),
                name: p.value.name.clone(),
            },
            Object::PalisadePolicy(p) => ObjectRef {
                kind: Kind::PalisadeNetworkPolicy,
                namespace: p.value.base.namespace.clone(),
                name: p.value.base.name.clone(),
            },
        }
    }
}

/// Decode every document of a YAML or JSON stream (multi-document YAML,
/// a JSON object, or a `kind: List`). `source_name` names the input in
/// errors. Either every document is valid, or nothing is returned.
pub fn parse_documents(text: &str, source_name: &str) -> Result<Vec<Object>, ObjectError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let doc_err = |message: String| ObjectError::Document {
            source_name: source_name.to_owned(),
            index,
            message,
        };
        let value = serde_json::Value::deserialize(doc)
            .map_err(|e| doc_err(format!("not valid YAML or JSON: {e}")))?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        decode_value(value, &mut out).map_err(|e| doc_err(e.to_string()))?;
    }
    Ok(out)
}

impl Object {
    /// The object as written, as JSON (with apiVersion and kind).
    pub fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            Object::Namespace(n) => serde_json::to_value(&n.object),
            Object::Pod(p) => serde_json::to_value(&p.object),
            Object::NetworkPolicy(p) => serde_json::to_value(&p.object),
            Object::TierPolicy(p) => serde_json::to_value(&p.object),
            Object::PalisadePolicy(p) => serde_json::to_value(&p.object),
        }
    }
}

/// A named stream of documents (a file, stdin), as a client read it: the
/// daemon parses and validates it where the work is done.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// Parse and validate every document of every source.
pub fn parse_sources(sources: &[Source]) -> Result<Vec<Object>, ObjectError> {
    let mut out = Vec::new();
    for s in sources {
        out.extend(parse_documents(&s.text, &s.name)?);
    }
    Ok(out)
}

fn decode_value(value: serde_json::Value, out: &mut Vec<Object>) -> Result<(), ObjectError> {
    let obj = value.as_object().ok_or_else(|| {
        ObjectError::invalid("<root>", "expected an object with apiVersion and kind")
    })?;
    let kind = obj.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
    let api = obj
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or_default();
    let want_api = |expected: &str| {
        if api == expected {
            Ok(())
        } else {
            Err(ObjectError::invalid(
                "apiVersion",
                format!("{kind} needs apiVersion {expected:?}, got {api:?}"),
            ))
        }
    };
    match kind {
        "Namespace" => {
            want_api("v1")?;
            let ns = validate_namespace_object(strict(value)?)?;
            out.push(Object::Namespace(Box::new(ns)));
        }
        "Pod" => {
            want_api("v1")?;
            let pod = validate_pod_object(strict(value)?)?;
            out.push(Object::Pod(Box::new(pod)));
        }
        "NetworkPolicy" => {
            want_api("networking.k8s.io/v1")?;
            let np = validate_policy_object(strict(value)?)?;
            out.push(Object::NetworkPolicy(Box::new(np)));
        }
        "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" => {
            want_api(tier::API_V1ALPHA1)?;
            let kind = if kind == "AdminNetworkPolicy" {
                tier::TierKind::AdminNetworkPolicy
            } else {
                tier::TierKind::BaselineAdminNetworkPolicy
            };
            let (object, value) = tier::validate_anp(strict(value)?, kind)?;
            out.push(Object::TierPolicy(Box::new(Valid {
                object: tier::TierObject::V1alpha1(object),
                value,
            })));
        }
        "ClusterNetworkPolicy" => {
            want_api(tier::API_V1ALPHA2)?;
            let (object, value) = tier::validate_cnp(strict(value)?)?;
            out.push(Object::TierPolicy(Box::new(Valid {
                object: tier::TierObject::V1alpha2(object),
                value,
            })));
        }
        palisade::KIND => {
            want_api(palisade::API_VERSION)?;
            let (object, value) = palisade::validate(strict(value)?)?;
            out.push(Object::PalisadePolicy(Box::new(Valid { object, value })));
        }
        "List"
        | "NamespaceList"
        | "PodList"
        | "NetworkPolicyList"
        | "AdminNetworkPolicyList"
        | "BaselineAdminNetworkPolicyList"
        | "ClusterNetworkPolicyList"
        | "PalisadeNetworkPolicyList" => {
            let items = obj
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                decode_value(item, out)
                    .map_err(|e| ObjectError::invalid(&format!("items[{i}]"), e.to_string()))?;
            }
        }
        "" => {
            return Err(ObjectError::invalid(
                "kind",
                format!("missing; palisade understands {KINDS}"),
            ));
        }
        other => {
            return Err(ObjectError::invalid(
                "kind",
                format!("unsupported kind {other:?}; palisade understands {KINDS}"),
            ));
        }
    }
    Ok(())
}

/// The objects a YAML or JSON stream names, for deletion: only
/// apiVersion, kind, metadata.name and metadata.namespace are read (as
/// `kubectl delete -f` does), so a document need not be a whole object.
pub fn parse_references(text: &str, source_name: &str) -> Result<Vec<ObjectRef>, ObjectError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let doc_err = |message: String| ObjectError::Document {
            source_name: source_name.to_owned(),
            index,
            message,
        };
        let value = serde_json::Value::deserialize(doc)
            .map_err(|e| doc_err(format!("not valid YAML or JSON: {e}")))?;
        if value.is_null() {
            continue;
        }
        reference_of(&value, &mut out).map_err(|e| doc_err(e.to_string()))?;
    }
    Ok(out)
}

fn reference_of(value: &serde_json::Value, out: &mut Vec<ObjectRef>) -> Result<(), ObjectError> {
    let kind = value["kind"].as_str().unwrap_or_default();
    if kind == "List" || kind.ends_with("List") {
        for (i, item) in value["items"].as_array().into_iter().flatten().enumerate() {
            reference_of(item, out)
                .map_err(|e| ObjectError::invalid(&format!("items[{i}]"), e.to_string()))?;
        }
        return Ok(());
    }
    let api = value["apiVersion"].as_str().unwrap_or_default();
    let (kind, api_wanted, namespaced) = match kind {
        "Namespace" => (Kind::Namespace, "v1", false),
        "Pod" => (Kind::Pod, "v1", true),
        "NetworkPolicy" => (Kind::NetworkPolicy, "networking.k8s.io/v1", true),
        "AdminNetworkPolicy" => (Kind::AdminNetworkPolicy, tier::API_V1ALPHA1, false),
        "BaselineAdminNetworkPolicy" => {
            (Kind::BaselineAdminNetworkPolicy, tier::API_V1ALPHA1, false)
        }
        "ClusterNetworkPolicy" => (Kind::ClusterNetworkPolicy, tier::API_V1ALPHA2, false),
        palisade::KIND => (Kind::PalisadeNetworkPolicy, palisade::API_VERSION, true),
        "" => {
            return Err(ObjectError::invalid(
                "kind",
                format!("missing; palisade understands {KINDS}"),
            ));
        }
        other => {
            return Err(ObjectError::invalid(
                "kind",
                format!("unsupported kind {other:?}; palisade understands {KINDS}"),
            ));
        }
    };
    if api != api_wanted {
        return Err(ObjectError::invalid(
            "apiVersion",
            format!(
                "{} needs apiVersion {api_wanted:?}, got {api:?}",
                kind.as_str()
            ),
        ));
    }
    let name = value["metadata"]["name"].as_str().unwrap_or_default();
    if name.is_empty() {
        return Err(ObjectError::invalid(
            "metadata.name",
            "missing: name the object to delete",
        ));
    }
    let namespace = if namespaced {
        value["metadata"]["namespace"]
            .as_str()
            .filter(|n| !n.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned()
    } else {
        String::new()
    };
    out.push(ObjectRef {
        kind,
        namespace,
        name: name.to_owned(),
    });
    Ok(())
}

/// Decode and validate one object given as JSON (with apiVersion and
/// kind), as the cluster agent receives it.
pub fn decode_object(value: serde_json::Value) -> Result<Object, ObjectError> {
    let mut out = Vec::new();
    decode_value(value, &mut out)?;
    match (out.pop(), out.is_empty()) {
        (Some(o), true) => Ok(o),
        _ => Err(ObjectError::invalid("<root>", "expected one object")),
    }
}

/// Decode with unknown fields rejected and the failing field named.
fn strict<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ObjectError> {
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(value, &mut record);
    let parsed: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = clean_path(&e.path().to_string());
        ObjectError::invalid(&path, e.into_inner().to_string())
    })?;
    if let Some(first) = unknown.first() {
        return Err(ObjectError::invalid(
            &clean_path(first),
            "unknown field (check the spelling against the Kubernetes API)",
        ));
    }
    Ok(parsed)
}

/// serde's paths mark `Option` layers with `?`; users never see those.
/// List indices are written as `[i]`, as Kubernetes writes them.
fn clean_path(p: &str) -> String {
    let mut out = String::new();
    for seg in p.split('.').filter(|seg| *seg != "?") {
        if !out.is_empty() && seg.parse::<usize>().is_ok() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

fn default_namespace(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
    }
}

fn validate_meta(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    kind: &str,
) -> Result<(), ObjectError> {
    let name = meta.name.as_deref().unwrap_or_default();
    if name.is_empty() {
        return Err(ObjectError::invalid(
            "metadata.name",
            format!("every {kind} needs a name"),
        ));
    }
    let ok = if kind == "Namespace" {
        selector::valid_dns_label(name)
    } else {
        selector::valid_dns_subdomain(name)
    };
    if !ok {
        return Err(ObjectError::invalid(
            "metadata.name",
            format!("{name:?} is not a valid {kind} name: use lowercase letters, digits and '-'"),
        ));
    }
    if let Some(ns) = meta.namespace.as_deref()
        && !selector::valid_dns_label(ns)
    {
        return Err(ObjectError::invalid(
            "metadata.namespace",
            format!("{ns:?} is not a valid namespace name: use lowercase letters, digits and '-'"),
        ));
    }
    if let Some(labels) = &meta.labels {
        selector::validate_labels(labels, "metadata.labels")?;
    }
    Ok(())
}

/// Validate a Namespace and keep what palisade needs of it.
pub fn validate_namespace_object(
    ns: Namespace,
) -> Result<Valid<Namespace, NamespaceInfo>, ObjectError> {
    validate_meta(&ns.metadata, "Namespace")?;
    let mode = mode_annotation(
        &ns.metadata,
        &format!("metadata.annotations[{MODE_ANNOTATION}]"),
    )?;
    let mut value = NamespaceInfo::new(
        ns.metadata.name.as_deref().unwrap_or_default(),
        ns.metadata.labels.as_ref(),
    );
    value.mode = mode;
    Ok(Valid { object: ns, value })
}

/// Validate a Pod (in `default` when it names no namespace).
pub fn validate_pod_object(mut pod: Pod) -> Result<Valid<Pod, PodInfo>, ObjectError> {
    default_namespace(&mut pod.metadata);
    validate_meta(&pod.metadata, "Pod")?;
    let value = PodInfo::from_k8s(&pod)?;
    Ok(Valid { object: pod, value })
}

/// Validate a NetworkPolicy (in `default` when it names no namespace).
pub fn validate_policy_object(
    mut np: NetworkPolicy,
) -> Result<Valid<NetworkPolicy, Policy>, ObjectError> {
    default_namespace(&mut np.metadata);
    let value = Policy::from_k8s(&np)?;
    Ok(Valid { object: np, value })
}

/// An IP protocol a NetworkPolicy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str, path: &str) -> Result<Self, ObjectError> {
        match s {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(ObjectError::invalid(
                path,
                format!("unsupported protocol {other:?}; use TCP, UDP or SCTP"),
            )),
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Sctp => PROTO_SCTP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

/// A container port with a name, which named-port rules refer to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// What the compiler needs of a Pod object.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ports: Vec<NamedPort>,
}

impl PodInfo {
    pub fn from_k8s(pod: &Pod) -> Result<Self, ObjectError> {
        let mut ports = Vec::new();
        if let Some(spec) = &pod.spec {
            let all = spec
                .containers
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("spec.containers[{i}]"), c.ports.as_ref()))
                .chain(
                    spec.init_containers
                        .iter()
                        .flatten()
                        .enumerate()
                        .map(|(i, c)| (format!("spec.initContainers[{i}]"), c.ports.as_ref())),
                );
            for (cpath, cports) in all {
                for (j, p) in cports.into_iter().flatten().enumerate() {
                    let path = format!("{cpath}.ports[{j}]");
                    let port = u16::try_from(p.container_port)
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| {
                            ObjectError::invalid(
                                &format!("{path}.containerPort"),
                                format!("{} is not a port number (1-65535)", p.container_port),
                            )
                        })?;
                    let protocol = Protocol::parse(
                        p.protocol.as_deref().unwrap_or("TCP"),
                        &format!("{path}.protocol"),
                    )?;
                    if let Some(name) = &p.name {
                        validate_port_name(name, &format!("{path}.name"))?;
                        if ports.iter().any(|n: &NamedPort| &n.name == name) {
                            return Err(ObjectError::invalid(
                                &format!("{path}.name"),
                                format!("port name {name:?} is used twice in this pod"),
                            ));
                        }
                        ports.push(NamedPort {
                            name: name.clone(),
                            port,
                            protocol,
                        });
                    }
                }
            }
        }
        Ok(Self {
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ports,
        })
    }
}

/// What the compiler needs of a Namespace: its labels, including the
/// implicit `kubernetes.io/metadata.name`, and its mode annotation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: Labels,
    pub mode: Option<Mode>,
}

impl NamespaceInfo {
    pub fn new(name: &str, labels: Option<&Labels>) -> Self {
        let mut labels = labels.cloned().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
        Self {
            name: name.to_owned(),
            labels,
            mode: None,
        }
    }
}

/// The annotation (on a NetworkPolicy or a Namespace) that sets audit or
/// enforce mode.
pub const MODE_ANNOTATION: &str = "palisade.io/mode";

/// Whether a policy drops what it does not allow, or only reports it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl Mode {
    pub fn parse(s: &str, path: &str) -> Result<Self, ObjectError> {
        match s {
            "enforce" => Ok(Self::Enforce),
            "audit" => Ok(Self::Audit),
            other => Err(ObjectError::invalid(
                path,
                format!("{MODE_ANNOTATION} is {other:?}; use audit or enforce"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

/// A policy's effective mode: its own annotation, else its namespace's,
/// else the node's default.
pub fn effective_mode(own: Option<Mode>, namespace: Option<Mode>, node: Mode) -> Mode {
    own.or(namespace).unwrap_or(node)
}

/// An endpoint's effective labels: the runtime's, overlaid by the Pod
/// object's when there is one.
pub fn effective_labels(runtime: &Labels, pod: Option<&PodInfo>) -> Labels {
    let mut labels = runtime.clone();
    if let Some(pod) = pod {
        labels.extend(pod.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    labels
}

/// The mode a Namespace or NetworkPolicy object's annotation asks for.
pub fn mode_annotation(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    path: &str,
) -> Result<Option<Mode>, ObjectError> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(MODE_ANNOTATION))
        .map(|v| Mode::parse(v, path))
        .transpose()
}

/// Which kind of object a [`Policy`] came from (both are namespaced and
/// read alike; the kind tells two of the same name apart).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub enum PolicyKind {
    #[default]
    NetworkPolicy,
    PalisadeNetworkPolicy,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NetworkPolicy => "NetworkPolicy",
            Self::PalisadeNetworkPolicy => palisade::KIND,
        }
    }
}

/// A validated NetworkPolicy (or the L3/L4 part of a
/// PalisadeNetworkPolicy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(default)]
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    /// The policy's own `palisade.io/mode` annotation, if any (the
    /// namespace's and the node's default apply otherwise).
    pub mode: Option<Mode>,
    pub pod_selector: Selector,
    /// Whether the policy isolates selected pods for ingress / egress
    /// (policyTypes, with the API server's default).
    pub ingress_isolation: bool,
    pub egress_isolation: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    /// The selected pods' DNS goes through the node's DNS proxy (a
    /// PalisadeNetworkPolicy with `toFQDNs` or DNS rules).
    #[serde(default)]
    pub dns_proxy: bool,
}

/// One ingress or egress rule. Empty `peers` means every peer; empty
/// `ports` every port of every protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Peer {
    /// Pods matching `pods` in the namespaces `namespaces` selects.
    Pods {
        namespaces: NamespaceScope,
        pods: Selector,
    },
    IpBlock(IpBlock),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NamespaceScope {
    /// The policy's own namespace (no namespaceSelector).
    Own,
    Matching(Selector),
}

/// A CIDR with exceptions, normalised to network addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IpBlock {
    pub cidr: IpNetwork,
    pub except: Vec<IpNetwork>,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }

    /// A canonical text form, used to name the block in identities.
    pub fn canonical(&self) -> String {
        let mut s = self.cidr.to_string();
        for e in &self.except {
            s.push('!');
            s.push_str(&e.to_string());
        }
        s
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cidr)?;
        if !self.except.is_empty() {
            let ex: Vec<String> = self.except.iter().map(ToString::to_string).collect();
            write!(f, " except {}", ex.join(", "))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRule {
    pub protocol: Protocol,
    pub port: PortMatch,
    /// HTTP rules (a PalisadeNetworkPolicy's `rules.http`): connections
    /// this entry alone allows go through the node's L7 proxy, which lets
    /// through the requests one of them matches. Empty: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
}

/// One HTTP rule, as CiliumNetworkPolicy's `rules.http[]`: every field it
/// sets must match. `method`, `path` and `host` are regular expressions
/// matched against the whole value; `headers` must be present (with the
/// value, when one is given).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HttpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// A header that must be present: by name (any case), and with exactly
/// `value` when one is given.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PortMatch {
    /// Every port of the protocol.
    All,
    /// An inclusive range; a single port is `Range(p, p)`.
    Range(u16, u16),
    /// A container port name, resolved on the destination pod.
    Named(String),
}

impl fmt::Display for PortRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            PortMatch::All => write!(f, "all {} ports", self.protocol.as_str()),
            PortMatch::Range(a, b) if a == b => write!(f, "{a}/{}", self.protocol.as_str()),
            PortMatch::Range(a, b) => write!(f, "{a}-{b}/{}", self.protocol.as_str()),
            PortMatch::Named(n) => write!(f, "{n}/{}", self.protocol.as_str()),
        }
    }
}

/// An IANA service name, as Kubernetes requires for named ports.
fn validate_port_name(name: &str, path: &str) -> Result<(), ObjectError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(ObjectError::invalid(
            path,
            format!(
                "{name:?} is not a valid port name: at most 15 lowercase letters, digits and '-', \
                 with at least one letter and no leading, trailing or double '-'"
            ),
        ))
    }
}

fn parse_cidr(s: &str, path: &str) -> Result<IpNetwork, ObjectError> {
    let net: IpNetwork = s.parse().map_err(|_| {
        ObjectError::invalid(
            path,
            format!("{s:?} is not a CIDR; write it like 10.0.0.0/16 or fd00::/64"),
        )
    })?;
    // Kubernetes accepts host bits in a CIDR and means the network.
    IpNetwork::new(net.network(), net.prefix())
        .map_err(|e| ObjectError::invalid(path, e.to_string()))
}

impl Policy {
    /// Validate a NetworkPolicy the way the API server does and convert it.
    pub fn from_k8s(np: &NetworkPolicy) -> Result<Self, ObjectError> {
        validate_meta(&np.metadata, "NetworkPolicy")?;
        let namespace = np
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let name = np.metadata.name.clone().unwrap_or_default();
        let mode = mode_annotation(
            &np.metadata,
            &format!("metadata.annotations[{MODE_ANNOTATION}]"),
        )?;
        let spec = np.spec.clone().unwrap_or_default();

        let pod_selector = match &spec.pod_selector {
            Some(s) => Selector::from_k8s(s, "spec.podSelector")?,
            None => Selector::default(),
        };

        let (ingress_isolation, egress_isolation) = match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                let mut ing = false;
                let mut eg = false;
                for (i, t) in types.iter().enumerate() {
                    let path = format!("spec.policyTypes[{i}]");
                    let seen = match t.as_str() {
                        "Ingress" => std::mem::replace(&mut ing, true),
                        "Egress" => std::mem::replace(&mut eg, true),
                        other => {
                            return Err(ObjectError::invalid(
                                &path,
                                format!("unknown policy type {other:?}; use Ingress or Egress"),
                            ));
                        }
                    };
                    if seen {
                        return Err(ObjectError::invalid(&path, format!("{t} is listed twice")));
                    }
                }
                (ing, eg)
            }
            // The API server's default: Ingress always, Egress when there
            // are egress rules (an empty list adds nothing).
            _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        };

        let mut ingress = Vec::new();
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let path = format!("spec.ingress[{i}]");
            ingress.push(Rule::convert(
                r.from.as_deref(),
                r.ports.as_deref(),
                &path,
                "from",
            )?);
        }
        let mut egress = Vec::new();
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let path = format!("spec.egress[{i}]");
            egress.push(Rule::convert(
                r.to.as_deref(),
                r.ports.as_deref(),
                &path,
                "to",
            )?);
        }

        Ok(Self {
            kind: PolicyKind::NetworkPolicy,
            namespace,
            name,
            mode,
            pod_selector,
            ingress_isolation,
            egress_isolation,
            ingress,
            egress,
            dns_proxy: false,
        })
    }

    /// How flows and explain name the policy: `namespace/name` for a
    /// NetworkPolicy, `PalisadeNetworkPolicy/namespace/name` otherwise.
    pub fn key(&self) -> String {
        match self.kind {
            PolicyKind::NetworkPolicy => format!("{}/{}", self.namespace, self.name),
            kind => format!("{}/{}/{}", kind.as_str(), self.namespace, self.name),
        }
    }

    /// The name policies are ordered by, after their namespace: a
    /// PalisadeNetworkPolicy comes right after the NetworkPolicy of the
    /// same name (no object name holds the separator).
    pub fn order_name(&self) -> String {
        match self.kind {
            PolicyKind::NetworkPolicy => self.name.clone(),
            PolicyKind::PalisadeNetworkPolicy => format!("{}\u{1}", self.name),
        }
    }

    /// Whether this policy applies to a pod, i.e. selects it.
    pub fn selects(&self, namespace: &str, labels: &Labels) -> bool {
        self.namespace == namespace && self.pod_selector.matches(labels)
    }
}

impl Rule {
    fn convert(
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
        path: &str,
        peer_field: &str,
    ) -> Result<Self, ObjectError> {
        let mut out_peers = Vec::new();
        for (i, p) in peers.into_iter().flatten().enumerate() {
            let ppath = format!("{path}.{peer_field}[{i}]");
            out_peers.push(convert_peer(p, &ppath)?);
        }
        let mut out_ports = Vec::new();
        for (i, p) in ports.into_iter().flatten().enumerate() {
            let ppath = format!("{path}.ports[{i}]");
            out_ports.push(convert_port(p, &ppath)?);
        }
        Ok(Self {
            peers: out_peers,
            ports: out_ports,
        })
    }
}

fn convert_peer(p: &NetworkPolicyPeer, path: &str) -> Result<Peer, ObjectError> {
    match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
        (Some(b), None, None) => {
            let cidr = parse_cidr(&b.cidr, &format!("{path}.ipBlock.cidr"))?;
            let mut except = Vec::new();
            for (i, e) in b.except.iter().flatten().enumerate() {
                let epath = format!("{path}.ipBlock.except[{i}]");
                let ex = parse_cidr(e, &epath)?;
                let same_family = ex.is_ipv4() == cidr.is_ipv4();
                if !same_family || !cidr.contains(ex.network()) || ex.prefix() <= cidr.prefix() {
                    return Err(ObjectError::invalid(
                        &epath,
                        format!("{e} must be a strict subset of the cidr {}", b.cidr),
                    ));
                }
                except.push(ex);
            }
            except.sort();
            except.dedup();
            Ok(Peer::IpBlock(IpBlock { cidr, except }))
        }
        (Some(_), _, _) => Err(ObjectError::invalid(
            path,
            "ipBlock cannot be combined with podSelector or namespaceSelector in one peer; \
             list them as separate peers",
        )),
        (None, None, None) => Err(ObjectError::invalid(
            path,
            "a peer needs podSelector, namespaceSelector or ipBlock (an empty peer selects nothing); \
             to allow every peer, leave the from/to list out",
        )),
        (None, pods, nss) => {
            let pods = match pods {
                Some(s) => Selector::from_k8s(s, &format!("{path}.podSelector"))?,
                None => Selector::default(),
            };
            let namespaces = match nss {
                Some(s) => NamespaceScope::Matching(Selector::from_k8s(
                    s,
                    &format!("{path}.namespaceSelector"),
                )?),
                None => NamespaceScope::Own,
            };
            Ok(Peer::Pods { namespaces, pods })
        }
    }
}

fn convert_port(p: &NetworkPolicyPort, path: &str) -> Result<PortRule, ObjectError> {
    let protocol = Protocol::parse(
        p.protocol.as_deref().unwrap_or("TCP"),
        &format!("{path}.protocol"),
    )?;
    let port_num = |v: i32, field: &str| -> Result<u16, ObjectError> {
        u16::try_from(v).ok().filter(|v| *v > 0).ok_or_else(|| {
            ObjectError::invalid(
                &format!("{path}.{field}"),
                format!("{v} is not a port number (1-65535)"),
            )
        })
    };
    let port = match (&p.port, p.end_port) {
        (None, None) => PortMatch::All,
        (None, Some(_)) => {
            return Err(ObjectError::invalid(
                &format!("{path}.endPort"),
                "endPort needs a numeric port to start the range",
            ));
        }
        (Some(IntOrString::Int(n)), end) => {
            let start = port_num(*n, "port")?;
            let end = match end {
                Some(e) => port_num(e, "endPort")?,
                None => start,
            };
            if end < start {
                return Err(ObjectError::invalid(
                    &format!("{path}.endPort"),
                    format!("endPort {end} is below port {start}"),
                ));
            }
            PortMatch::Range(start, end)
        }
        (Some(IntOrString::String(s)), end) => {
            if end.is_some() {
                return Err(ObjectError::invalid(
                    &format!("{path}.endPort"),
                    "endPort cannot be used with a named port",
                ));
            }
            // A number written as a string is a number (kubectl does this).
            if let Ok(n) = s.parse::<i32>() {
                let p = port_num(n, "port")?;
                PortMatch::Range(p, p)
            } else {
                validate_port_name(s, &format!("{path}.port"))?;
                PortMatch::Named(s.clone())
            }
        }
    };
    Ok(PortRule {
        protocol,
        port,
        http: Vec::new(),
    })
}

/// Labels by namespace name, for every namespace mentioned by objects or
/// endpoints.
pub type NamespaceMap = BTreeMap<String, NamespaceInfo>;

#[cfg(test)]
mod tests {
    use super::*;

    fn one_policy(yaml: &str) -> Policy {
        let objs = parse_documents(yaml, "test").unwrap();
        match &objs[..] {
            [Object::NetworkPolicy(np)] => np.value.clone(),
            other => panic!("expected one NetworkPolicy, got {other:?}"),
        }
    }

    /// `delete -f` reads only what names an object, as kubectl does.
    #[test]
    fn references_need_only_kind_and_name() {
        let refs = parse_references(
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: a}\n\
             ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b}\n\
             ---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: c, namespace: x}\n",
            "test",
        )
        .expect("names");
        let got: Vec<String> = refs.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "AdminNetworkPolicy a",
                "NetworkPolicy default/b",
                "ClusterNetworkPolicy c"
            ]
        );
        let e = parse_references("apiVersion: v1\nkind: Pod\nmetadata: {}\n", "test")
            .expect_err("no name");
        assert!(e.to_string().contains("metadata.name"), "{e}");
        let e = parse_references(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: AdminNetworkPolicy\nmetadata: {name: a}\n",
            "test",
        )
        .expect_err("wrong version");
        assert!(e.to_string().contains("v1alpha1"), "{e}");
    }

    fn parse_err(yaml: &str) -> String {
        parse_documents(yaml, "test").unwrap_err().to_string()
    }

    #[test]
    fn policy_types_default_to_ingress_plus_egress_when_egress_rules_exist() {
        let p = one_policy(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec:\n  podSelector: {}\n",
        );
        assert!(p.ingress_isolation && !p.egress_isolation);
        assert_eq!(p.namespace, "default");

        let p = one_policy(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec:\n  podSelector: {}\n  egress: [{}]\n",
        );
        assert!(p.ingress_isolation && p.egress_isolation);

        // An empty egress list adds no Egress type.
        let p = one_policy(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec:\n  podSelector: {}\n  egress: []\n",
        );
        assert!(p.ingress_isolation && !p.egress_isolation);

        let p = one_policy(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n",
        );
        assert!(!p.ingress_isolation && p.egress_isolation);
    }

    #[test]
    fn peers_ports_and_ip_blocks_convert() {
        let p = one_policy(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: a}}
      podSelector: {matchLabels: {role: client}}
    - podSelector: {}
    - ipBlock: {cidr: 10.0.0.7/16, except: [10.0.1.0/24]}
    ports:
    - port: 80
    - {protocol: UDP, port: 1000, endPort: 2000}
    - {port: http}
    - {protocol: SCTP}
    - {port: "8080"}
"#,
        );
        let r = &p.ingress[0];
        assert_eq!(r.peers.len(), 3);
        match &r.peers[0] {
            Peer::Pods {
                namespaces: NamespaceScope::Matching(ns),
                pods,
            } => {
                assert_eq!(ns.describe(), "team=a");
                assert_eq!(pods.describe(), "role=client");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&r.peers[1], Peer::Pods { namespaces: NamespaceScope::Own, pods } if pods.is_empty())
        );
        match &r.peers[2] {
            Peer::IpBlock(b) => {
                assert_eq!(b.cidr.to_string(), "10.0.0.0/16");
                assert_eq!(b.canonical(), "10.0.0.0/16!10.0.1.0/24");
                assert!(b.contains("10.0.2.1".parse().unwrap()));
                assert!(!b.contains("10.0.1.1".parse().unwrap()));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            r.ports,
            vec![
                PortRule {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Range(80, 80),
                    http: Vec::new(),
                },
                PortRule {
                    protocol: Protocol::Udp,
                    port: PortMatch::Range(1000, 2000),
                    http: Vec::new(),
                },
                PortRule {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Named("http".into()),
                    http: Vec::new(),
                },
                PortRule {
                    protocol: Protocol::Sctp,
                    port: PortMatch::All,
                    http: Vec::new(),
                },
                PortRule {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Range(8080, 8080),
                    http: Vec::new(),
                },
            ]
        );
    }

    #[test]
    fn invalid_policies_name_the_field_and_the_fix() {
        let base = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec:\n  podSelector: {}\n";
        let e = parse_err(&format!(
            "{base}  ingress:\n  - ports: [{{port: 80, endPort: 70}}]\n"
        ));
        assert!(
            e.contains("spec.ingress[0].ports[0].endPort") && e.contains("below port 80"),
            "{e}"
        );
        let e = parse_err(&format!(
            "{base}  ingress:\n  - ports: [{{protocol: ICMP}}]\n"
        ));
        assert!(e.contains("use TCP, UDP or SCTP"), "{e}");
        let e = parse_err(&format!(
            "{base}  ingress:\n  - from: [{{ipBlock: {{cidr: 10.0.0.0/24, except: [10.1.0.0/28]}}}}]\n"
        ));
        assert!(e.contains("strict subset"), "{e}");
        let e = parse_err(&format!(
            "{base}  ingress:\n  - from: [{{ipBlock: {{cidr: banana}}}}]\n"
        ));
        assert!(e.contains("not a CIDR"), "{e}");
        let e = parse_err(&format!("{base}  ingress:\n  - from: [{{}}]\n"));
        assert!(
            e.contains("needs podSelector, namespaceSelector or ipBlock"),
            "{e}"
        );
        let e = parse_err(&format!("{base}  podSelecter: {{}}\n"));
        assert!(
            e.contains("spec.podSelecter") && e.contains("unknown field"),
            "{e}"
        );
        let e = parse_err(&format!("{base}  policyTypes: [Inbound]\n"));
        assert!(e.contains("use Ingress or Egress"), "{e}");
        let e = parse_err("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n");
        assert!(e.contains("unsupported kind \"Service\""), "{e}");
        let e = parse_err("apiVersion: v1\nkind: NetworkPolicy\nmetadata: {name: a}\n");
        assert!(e.contains("networking.k8s.io/v1"), "{e}");
        let e = parse_err("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {}\n");
        assert!(e.contains("metadata.name"), "{e}");
        let e = parse_err("{ not yaml");
        assert!(e.contains("document 1"), "{e}");
    }

    #[test]
    fn multi_document_yaml_json_and_lists_decode() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  containers:
  - name: web
    ports: [{name: http, containerPort: 8080}]
---
"#;
        let objs = parse_documents(text, "t").unwrap();
        assert_eq!(objs.len(), 2);
        let Object::Pod(pod) = &objs[1] else { panic!() };
        let pod = &pod.object;
        let info = PodInfo::from_k8s(pod).unwrap();
        assert_eq!(
            info.ports,
            vec![NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp
            }]
        );

        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a"}},
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"b"}}]}"#;
        assert_eq!(parse_documents(json, "t").unwrap().len(), 2);
    }

    #[test]
    fn namespaces_always_carry_their_name_label() {
        let ns = NamespaceInfo::new("shop", None);
        assert_eq!(
            ns.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
            Some("shop")
        );
    }
}
