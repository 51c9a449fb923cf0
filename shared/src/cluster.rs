//! Kubernetes cluster mode: what the agent takes from the API server, and
//! how API objects become the engine's inputs.
//!
//! The agent (`palisadectl daemon --kubernetes`) watches the resources in
//! [`WATCHED`] and nothing else; the ClusterRole shipped in
//! `packaging/kubernetes/` grants exactly `list` and `watch` on them (a
//! test checks both against this list).

/// One resource the agent lists and watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    /// API group (`""` for the core group).
    pub group: &'static str,
    pub version: &'static str,
    /// Plural resource name, as RBAC rules name it.
    pub resource: &'static str,
    pub kind: &'static str,
}

/// Every resource the agent watches, cluster-wide, with `list` and `watch`.
pub const WATCHED: &[Watched] = &[
    Watched {
        group: "",
        version: "v1",
        resource: "namespaces",
        kind: "Namespace",
    },
    Watched {
        group: "",
        version: "v1",
        resource: "pods",
        kind: "Pod",
    },
    Watched {
        group: "",
        version: "v1",
        resource: "nodes",
        kind: "Node",
    },
    Watched {
        group: "",
        version: "v1",
        resource: "services",
        kind: "Service",
    },
    Watched {
        group: "networking.k8s.io",
        version: "v1",
        resource: "networkpolicies",
        kind: "NetworkPolicy",
    },
    Watched {
        group: "discovery.k8s.io",
        version: "v1",
        resource: "endpointslices",
        kind: "EndpointSlice",
    },
    // Custom resources: watched where their CRDs are installed.
    Watched {
        group: "policy.networking.k8s.io",
        version: "v1alpha1",
        resource: "adminnetworkpolicies",
        kind: "AdminNetworkPolicy",
    },
    Watched {
        group: "policy.networking.k8s.io",
        version: "v1alpha1",
        resource: "baselineadminnetworkpolicies",
        kind: "BaselineAdminNetworkPolicy",
    },
    Watched {
        group: "policy.networking.k8s.io",
        version: "v1alpha2",
        resource: "clusternetworkpolicies",
        kind: "ClusterNetworkPolicy",
    },
    Watched {
        group: "palisade.io",
        version: "v1alpha1",
        resource: "palisadenetworkpolicies",
        kind: "PalisadeNetworkPolicy",
    },
];

/// The verbs the agent uses on every watched resource.
pub const VERBS: &[&str] = &["list", "watch"];

// ----- API objects as the engine's inputs -------------------------------------

use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Container, Namespace, Node as KubeNode, Pod, PodSpec, PodStatus, Service},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Serialize};

use crate::{
    abi::SvcKey,
    policy::{
        Kind, Object, ObjectError, ObjectRef, Policy, Valid,
        tier::{TierObject, TierPolicy},
        validate_namespace_object, validate_pod_object, validate_policy_object,
    },
    store::{RemoteNode, StoredNamespace, StoredPod},
};

/// The store setting that says this node is in cluster mode; its value is
/// the node's name.
pub const CLUSTER_NODE_SETTING: &str = "cluster_node";

/// Where a pod runs and which addresses it has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub node: Option<String>,
    pub host_network: bool,
    /// `status.podIPs` (else `status.podIP`).
    pub addresses: Vec<IpAddr>,
    /// Succeeded or Failed: its addresses are released.
    pub finished: bool,
}

impl Placement {
    pub fn of(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut addresses = Vec::new();
        let mut seen = BTreeSet::new();
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().map(|p| p.ip.clone()).collect::<Vec<_>>())
            .filter(|v| !v.is_empty())
            .or_else(|| status.and_then(|s| s.pod_ip.clone()).map(|ip| vec![ip]))
            .unwrap_or_default();
        for ip in ips {
            if let Ok(a) = ip.parse::<IpAddr>()
                && seen.insert(a)
            {
                addresses.push(a);
            }
        }
        Placement {
            node: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            addresses,
            finished: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
        }
    }

    /// The addresses that identify the pod as a peer from a node other
    /// than `this_node`: none for pods on this node (their endpoints do),
    /// host-network pods (the node's addresses) and finished pods.
    pub fn remote_addresses(&self, this_node: &str) -> Option<&[IpAddr]> {
        let elsewhere = self.node.as_deref().is_some_and(|n| n != this_node);
        (elsewhere && !self.host_network && !self.finished && !self.addresses.is_empty())
            .then_some(self.addresses.as_slice())
    }
}

/// What palisade keeps of a Pod from the API: names, labels, named ports,
/// node and addresses. The rest (images, volumes, conditions) is dropped
/// before it is stored.
pub fn trim_pod(pod: &Pod) -> Pod {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    Pod {
        metadata: ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            labels: meta.labels.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            ..Default::default()
        },
        spec: spec.map(|s| PodSpec {
            node_name: s.node_name.clone(),
            host_network: s.host_network,
            containers: s
                .containers
                .iter()
                .map(|c| Container {
                    name: c.name.clone(),
                    ports: c.ports.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        status: status.map(|s| PodStatus {
            phase: s.phase.clone(),
            pod_ip: s.pod_ip.clone(),
            pod_ips: s.pod_ips.clone(),
            ..Default::default()
        }),
    }
}

/// An object from the API, validated.
#[derive(Debug, Clone)]
pub enum ApiObject {
    Namespace(Box<StoredNamespace>),
    Pod(Box<StoredPod>, Placement),
    NetworkPolicy(Box<Valid<NetworkPolicy, Policy>>),
    /// A node of the cluster: its addresses get the node identity (this
    /// node's own Node is ignored: its addresses are the host's).
    Node(RemoteNode),
    /// AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy.
    TierPolicy(Box<Valid<TierObject, TierPolicy>>),
    PalisadePolicy(
        Box<
            Valid<
                crate::policy::palisade::PalisadeNetworkPolicy,
                crate::policy::palisade::PalisadePolicy,
            >,
        >,
    ),
}

impl ApiObject {
    pub fn namespace(ns: Namespace) -> Result<Self, ObjectError> {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: ns.metadata.name,
                labels: ns.metadata.labels,
                annotations: ns.metadata.annotations,
                uid: ns.metadata.uid,
                resource_version: ns.metadata.resource_version,
                ..Default::default()
            },
            spec: None,
            status: None,
        };
        Ok(ApiObject::Namespace(Box::new(validate_namespace_object(
            ns,
        )?)))
    }

    pub fn pod(pod: &Pod) -> Result<Self, ObjectError> {
        let placement = Placement::of(pod);
        Ok(ApiObject::Pod(
            Box::new(validate_pod_object(trim_pod(pod))?),
            placement,
        ))
    }

    pub fn policy(np: NetworkPolicy) -> Result<Self, ObjectError> {
        Ok(ApiObject::NetworkPolicy(Box::new(validate_policy_object(
            np,
        )?)))
    }

    /// A custom resource (a tier policy or a PalisadeNetworkPolicy) as the
    /// API serves it (JSON with apiVersion and kind); what only the server
    /// uses (managedFields) is dropped.
    pub fn tier(mut value: serde_json::Value) -> Result<Self, ObjectError> {
        if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("managedFields");
        }
        match crate::policy::decode_object(value)? {
            Object::TierPolicy(t) => Ok(ApiObject::TierPolicy(t)),
            Object::PalisadePolicy(p) => Ok(ApiObject::PalisadePolicy(p)),
            other => Err(ObjectError::invalid(
                "kind",
                format!(
                    "expected a tier policy, got {}",
                    other.reference().kind.as_str()
                ),
            )),
        }
    }

    pub fn node(node: &KubeNode) -> Self {
        ApiObject::Node(RemoteNode {
            name: node.metadata.name.clone().unwrap_or_default(),
            addresses: node_identity_addresses(node),
            internal: node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
        })
    }

    pub fn reference(&self) -> ObjectRef {
        match self {
            ApiObject::Node(n) => ObjectRef {
                kind: Kind::Node,
                namespace: String::new(),
                name: n.name.clone(),
            },
            ApiObject::TierPolicy(t) => ObjectRef {
                kind: t.value.kind.into(),
                namespace: String::new(),
                name: t.value.name.clone(),
            },
            ApiObject::PalisadePolicy(p) => ObjectRef {
                kind: Kind::PalisadeNetworkPolicy,
                namespace: p.value.base.namespace.clone(),
                name: p.value.base.name.clone(),
            },
            ApiObject::Namespace(n) => ObjectRef {
                kind: Kind::Namespace,
                namespace: String::new(),
                name: n.value.name.clone(),
            },
            ApiObject::Pod(p, _) => ObjectRef {
                kind: Kind::Pod,
                namespace: p.value.namespace.clone(),
                name: p.value.name.clone(),
            },
            ApiObject::NetworkPolicy(p) => ObjectRef {
                kind: Kind::NetworkPolicy,
                namespace: p.value.namespace.clone(),
                name: p.value.name.clone(),
            },
        }
    }
}

/// A batch of API events, applied in one transaction.
#[derive(Debug, Clone, Default)]
pub struct ApiChanges {
    /// Objects created or changed.
    pub upserts: Vec<ApiObject>,
    /// Objects deleted.
    pub deletes: Vec<ObjectRef>,
    /// Kinds listed in full (a first list, or a relist after a watch was
    /// lost): every stored object of these kinds that is not in
    /// `upserts` or `listed` is deleted.
    pub complete: Vec<Kind>,
    /// Objects of the `complete` kinds that the list delivered in earlier
    /// batches (the agent applies a long list as it arrives).
    pub listed: Vec<ObjectRef>,
}

impl ApiChanges {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty() && self.complete.is_empty()
    }
}

/// What a batch changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiReport {
    pub created: usize,
    pub changed: usize,
    pub deleted: usize,
    pub unchanged: usize,
    /// Map entries written and removed.
    pub upserted: usize,
    pub removed: usize,
}

/// The agent's connection to the API server, as `palisadectl status`
/// shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// This node's name.
    pub node: String,
    /// The API server's URL.
    pub api_server: String,
    /// Every watch is established (false during an outage or a relist).
    pub connected: bool,
    /// Every watched kind has been listed in full and applied once.
    pub synced: bool,
    /// Unix milliseconds of the first full sync, and of the last batch
    /// applied.
    pub first_sync_ms: Option<u64>,
    pub last_applied_ms: Option<u64>,
    /// Objects known, by kind.
    pub objects: std::collections::BTreeMap<String, usize>,
    /// Watches that ended with an error and were started again.
    pub watch_restarts: u64,
    /// Full relists after the first (410 Gone, reconnects).
    pub relists: u64,
    /// From an event's arrival to its change being in the maps, over the
    /// last batches: median and 99th percentile, milliseconds.
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    /// By resource: the highest resourceVersion among the events applied
    /// (a relist counts the objects it listed).
    pub applied_resource_versions: std::collections::BTreeMap<String, u64>,
    pub last_error: Option<String>,
    /// Service frontends in the datapath (`pal_svc`), and the netfilter
    /// hook that judges their flows on the backend (empty when not
    /// attached).
    #[serde(default)]
    pub service_frontends: usize,
    #[serde(default)]
    pub service_hook: String,
    /// Tier policy kinds whose CRD the API server does not serve (looked
    /// for again periodically; they count as synced and empty).
    #[serde(default)]
    pub not_installed: Vec<String>,
}

// ----- Services ---------------------------------------------------------------

/// The frontends of one Service, as the node's DNAT (kube-proxy) serves
/// them: its ClusterIPs, external IPs and load-balancer addresses with each
/// port, and its NodePorts (on this node's addresses, known from its Node).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceFrontends {
    pub fixed: Vec<SvcKey>,
    /// (protocol, NodePort).
    pub node_ports: Vec<(u8, u16)>,
}

/// The IP protocol number of a Service or container port's protocol
/// (TCP when unset, as the API defaults it).
pub fn protocol_number(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "SCTP" => Some(132),
        _ => None,
    }
}

impl ServiceFrontends {
    pub fn of(svc: &Service) -> Self {
        let mut out = Self::default();
        let Some(spec) = svc.spec.as_ref() else {
            return out;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return out;
        }
        let mut addresses: BTreeSet<IpAddr> = BTreeSet::new();
        let cluster_ips = spec
            .cluster_ips
            .clone()
            .filter(|v| !v.is_empty())
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default();
        let lb = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .map(|v| v.iter().filter_map(|i| i.ip.clone()).collect::<Vec<_>>())
            .unwrap_or_default();
        // "None" (headless) and anything else that is not an address
        // has no frontend.
        for a in cluster_ips
            .iter()
            .chain(spec.external_ips.iter().flatten())
            .chain(lb.iter())
        {
            if let Ok(ip) = a.parse::<IpAddr>() {
                addresses.insert(ip);
            }
        }
        let mut fixed = BTreeSet::new();
        let mut node_ports = BTreeSet::new();
        for port in spec.ports.iter().flatten() {
            let Some(proto) = protocol_number(port.protocol.as_deref()) else {
                continue;
            };
            if let Ok(p) = u16::try_from(port.port) {
                for a in &addresses {
                    fixed.insert(SvcKey::new(*a, proto, p));
                }
            }
            if let Some(np) = port.node_port.and_then(|n| u16::try_from(n).ok())
                && np != 0
            {
                node_ports.insert((proto, np));
            }
        }
        out.fixed = fixed.into_iter().collect();
        out.node_ports = node_ports.into_iter().collect();
        out
    }
}

/// A node's own addresses (InternalIP and ExternalIP), where its NodePorts
/// are served.
pub fn node_addresses(node: &KubeNode) -> Vec<IpAddr> {
    let mut out = BTreeSet::new();
    for a in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if matches!(a.type_.as_str(), "InternalIP" | "ExternalIP")
            && let Ok(ip) = a.address.parse::<IpAddr>()
        {
            out.insert(ip);
        }
    }
    out.into_iter().collect()
}

/// Annotations where network plugins record a node's tunnel addresses
/// (the source of what the node itself sends through the tunnel): Calico's
/// IP-in-IP, VXLAN and WireGuard interfaces, and its BGP address (a CIDR).
const TUNNEL_ANNOTATIONS: &[&str] = &[
    "projectcalico.org/IPv4Address",
    "projectcalico.org/IPv6Address",
    "projectcalico.org/IPv4IPIPTunnelAddr",
    "projectcalico.org/IPv4VXLANTunnelAddr",
    "projectcalico.org/IPv6VXLANTunnelAddr",
    "projectcalico.org/IPv4WireguardInterfaceAddr",
    "projectcalico.org/IPv6WireguardInterfaceAddr",
];

/// Flannel's annotation naming its backend; with `vxlan`, the node's
/// `flannel.1` device has the first address of each of its pod CIDRs.
const FLANNEL_BACKEND: &str = "flannel.alpha.coreos.com/backend-type";

/// Every address another node's own traffic can come from, and so the
/// addresses that get the node identity: its InternalIPs and ExternalIPs,
/// the tunnel addresses Calico records in annotations, and with Flannel's
/// VXLAN backend the first address of each pod CIDR (its `flannel.1`).
pub fn node_identity_addresses(node: &KubeNode) -> Vec<IpAddr> {
    let mut out: BTreeSet<IpAddr> = node_addresses(node).into_iter().collect();
    let annotations = node.metadata.annotations.as_ref();
    for key in TUNNEL_ANNOTATIONS {
        let Some(v) = annotations.and_then(|a| a.get(*key)) else {
            continue;
        };
        let addr = v.split('/').next().unwrap_or_default().trim();
        if let Ok(ip) = addr.parse::<IpAddr>() {
            out.insert(ip);
        }
    }
    if annotations
        .and_then(|a| a.get(FLANNEL_BACKEND))
        .is_some_and(|b| b == "vxlan")
    {
        let spec = node.spec.as_ref();
        let cidrs = spec
            .and_then(|s| s.pod_cidrs.clone())
            .filter(|c| !c.is_empty())
            .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
            .unwrap_or_default();
        for c in cidrs {
            if let Ok(net) = c.parse::<ipnetwork::IpNetwork>() {
                out.insert(net.network());
            }
        }
    }
    out.into_iter().collect()
}

/// Every frontend of this node: each Service's fixed ones, and its
/// NodePorts on each of the node's addresses.
pub fn frontend_set<'a>(
    services: impl IntoIterator<Item = &'a ServiceFrontends>,
    node_addresses: &[IpAddr],
) -> BTreeSet<SvcKey> {
    let mut out = BTreeSet::new();
    for s in services {
        out.extend(s.fixed.iter().copied());
        for (proto, port) in &s.node_ports {
            for a in node_addresses {
                out.insert(SvcKey::new(*a, *proto, *port));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("Service YAML")
    }

    #[test]
    fn frontends_of_a_dual_stack_nodeport_service() {
        let s = service(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  externalIPs: [192.0.2.7]
  ports:
  - {name: http, port: 80, targetPort: web, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
status:
  loadBalancer: {ingress: [{ip: 198.51.100.9}, {hostname: lb.example}]}
"#,
        );
        let f = ServiceFrontends::of(&s);
        let want: Vec<SvcKey> = ["10.96.0.10", "fd00:96::10", "192.0.2.7", "198.51.100.9"]
            .iter()
            .flat_map(|a| {
                let ip: IpAddr = a.parse().unwrap();
                [SvcKey::new(ip, 6, 80), SvcKey::new(ip, 17, 53)]
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(f.fixed, want);
        assert_eq!(f.node_ports, vec![(6, 30080)]);

        let node: IpAddr = "192.168.250.1".parse().unwrap();
        let set = frontend_set([&f], &[node]);
        assert!(set.contains(&SvcKey::new(node, 6, 30080)));
        assert_eq!(set.len(), want.len() + 1);
    }

    #[test]
    fn a_nodes_identity_addresses_include_its_tunnel_addresses() {
        let node: KubeNode = serde_yaml::from_str(
            r#"
apiVersion: v1
kind: Node
metadata:
  name: n1
  annotations:
    projectcalico.org/IPv4Address: 192.168.1.5/24
    projectcalico.org/IPv4IPIPTunnelAddr: 10.244.3.0
    projectcalico.org/IPv6VXLANTunnelAddr: "fd00:244::3:0"
    projectcalico.org/IPv4VXLANTunnelAddr: not-an-address
spec: {podCIDR: 10.245.3.0/24, podCIDRs: [10.245.3.0/24]}
status:
  addresses:
  - {type: InternalIP, address: 192.168.1.5}
  - {type: ExternalIP, address: 203.0.113.5}
  - {type: Hostname, address: n1}
"#,
        )
        .unwrap();
        let want: Vec<IpAddr> = ["10.244.3.0", "192.168.1.5", "203.0.113.5", "fd00:244::3:0"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(node_identity_addresses(&node), want);
        // NodePorts are served on the node's own addresses only.
        assert_eq!(node_addresses(&node).len(), 2);

        // Flannel's VXLAN backend: flannel.1 has the pod CIDRs' first
        // addresses; without the annotation they are pods' range only.
        let mut flannel = node.clone();
        flannel.metadata.annotations = Some(
            [(FLANNEL_BACKEND.to_owned(), "vxlan".to_owned())]
                .into_iter()
                .collect(),
        );
        let got = node_identity_addresses(&flannel);
        assert!(got.contains(&"10.245.3.0".parse().unwrap()), "{got:?}");
        assert!(
            !node_identity_addresses(&KubeNode {
                metadata: ObjectMeta::default(),
                ..node
            })
            .contains(&"10.245.3.0".parse().unwrap())
        );
    }

    #[test]
    fn headless_and_external_name_services_have_no_frontends() {
        for yaml in [
            "{apiVersion: v1, kind: Service, metadata: {name: h}, spec: {clusterIP: None, ports: [{port: 80}]}}",
            "{apiVersion: v1, kind: Service, metadata: {name: e}, spec: {type: ExternalName, externalName: example.com}}",
        ] {
            assert_eq!(
                ServiceFrontends::of(&service(yaml)),
                ServiceFrontends::default()
            );
        }
    }
}
