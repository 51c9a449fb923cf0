//! A hermetic Kubernetes cluster: node namespaces (each a full test
//! [`Node`] with its own pod subnet, state dir, bpffs and palisade daemon
//! in cluster mode) joined through a "fabric" namespace that stands in for
//! the physical network, and the test API server (a list/watch double, see
//! [`crate::kubeapi`]) listening in the fabric namespace. Nothing touches
//! the machine's own interfaces.
//!
//! Topologies, as the common network plugins set nodes up:
//! - [`Topology::Vxlan`]: Flannel's VXLAN backend (a `flannel.1` VXLAN
//!   device per node, routes to other nodes' pod subnets through it with
//!   static neighbour and FDB entries), pods on a bridge;
//! - [`Topology::HostGw`]: Flannel's host-gw backend (routes to other
//!   nodes' pod subnets via their addresses), pods on a bridge;
//! - [`Topology::Routed`]: Calico's shape (a veth per pod routed by the
//!   host: the `ptp` plugin; routes between nodes as BGP would install).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerPort, Namespace, Node as KubeNodeObject, NodeAddress, NodeSpec,
            NodeStatus, Pod as KubePod, PodIP, PodSpec, PodStatus,
        },
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    kubeapi::ApiServer,
    node::{KubeNode, Node, NodeOptions, Pod, Primary},
    sys::{self, Netns},
};

/// How nodes reach each other's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Vxlan,
    HostGw,
    Routed,
}

impl Topology {
    pub const ALL: [Topology; 3] = [Topology::Vxlan, Topology::HostGw, Topology::Routed];

    pub fn name(self) -> &'static str {
        match self {
            Topology::Vxlan => "vxlan",
            Topology::HostGw => "host-gw",
            Topology::Routed => "routed",
        }
    }
}

/// The fabric's addresses: node i is .(i+1), the API server .254.
const FABRIC_V4: &str = "192.168.250";
const FABRIC_V6: &str = "fd00:250::";
const API_V4: &str = "192.168.250.254";

fn node_v4(i: usize) -> String {
    format!("{FABRIC_V4}.{}", i + 1)
}

fn node_v6(i: usize) -> String {
    format!("{FABRIC_V6}{:x}", i + 1)
}

/// The source address of what node `i` itself sends to pods on other
/// nodes: its `flannel.1` address over VXLAN, else its fabric address.
pub fn node_source(topology: Topology, i: usize, v6: bool) -> IpAddr {
    match (topology, v6) {
        (Topology::Vxlan, false) => format!("10.100.{i}.0").parse().expect("address"),
        (Topology::Vxlan, true) => net6(i).parse().expect("address"),
        _ => node_address(i, v6),
    }
}

/// Node `i`'s own address on the fabric (where its NodePorts are served).
pub fn node_address(i: usize, v6: bool) -> IpAddr {
    let a = if v6 { node_v6(i) } else { node_v4(i) };
    a.parse().expect("node address")
}

/// Node i's IPv4 pod subnet.
pub fn subnet_v4(i: usize) -> String {
    format!("10.100.{i}.0/24")
}

/// Node i's IPv6 pod subnet.
pub fn subnet_v6(i: usize) -> String {
    // Laid out like the IPv4 subnets (10.100.i.0/24): one /112 holds every
    // node's pods, as 10.100.0.0/16 does, so cases' ipBlocks read the same.
    format!("{}/120", net6(i))
}

/// The first address of node i's IPv6 pod subnet.
fn net6(i: usize) -> String {
    format!("fd00:100::{:x}", i * 256)
}

fn vtep_mac(i: usize) -> String {
    format!("02:00:00:00:00:{:02x}", i + 1)
}

/// A cluster of nodes and its API server. Dropping it removes everything.
#[derive(Debug)]
pub struct Cluster {
    pub topology: Topology,
    pub ipv6: bool,
    // Nodes go first (their daemons stop), then the API server, then the
    // fabric.
    pub nodes: Vec<Node>,
    pub api: ApiServer,
    pub fabric: Netns,
    pub kubeconfig: PathBuf,
    /// By resource: the resourceVersion of the last change made through
    /// this cluster (what [`Cluster::settle`] waits for).
    expected: Mutex<BTreeMap<&'static str, u64>>,
    dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    #[derive(Debug)]
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Cluster {
    /// `n` nodes named `node-0`…, each with its daemon in cluster mode.
    /// `palisade` adds settings to every node's palisade plugin entry.
    pub fn new(
        n: usize,
        topology: Topology,
        ipv6: bool,
        palisade: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        Self::with_world(n, topology, ipv6, palisade, None)
    }

    /// Like [`Cluster::new`], with an outside host ("world") serving
    /// `world` ports, routed through node 0 (every node routes it there).
    pub fn with_world(
        n: usize,
        topology: Topology,
        ipv6: bool,
        palisade: serde_json::Map<String, serde_json::Value>,
        world: Option<Vec<u16>>,
    ) -> Self {
        Self::with_daemon_args(n, topology, ipv6, palisade, world, Vec::new())
    }

    /// Like [`Cluster::with_world`], with more arguments for every node's
    /// `palisadectl daemon`.
    pub fn with_daemon_args(
        n: usize,
        topology: Topology,
        ipv6: bool,
        palisade: serde_json::Map<String, serde_json::Value>,
        world: Option<Vec<u16>>,
        daemon_args: Vec<String>,
    ) -> Self {
        sys::require_root();
        sys::sweep_stale();
        let prefix = sys::unique_prefix();
        let dir = PathBuf::from(crate::TEST_ROOT).join(format!("{prefix}k"));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let dir = tempdir::Dir(dir);
        let fabric = Netns::new(&format!("{prefix}f"));
        let f = &fabric.name;
        fabric.sysctl("net.ipv6.conf.all.accept_dad", "0");
        fabric.sysctl("net.ipv6.conf.default.accept_dad", "0");
        sys::ip(&["-n", f, "link", "add", "br0", "type", "bridge"]);
        sys::ip(&["-n", f, "link", "set", "br0", "up"]);
        sys::ip(&[
            "-n",
            f,
            "addr",
            "add",
            &format!("{API_V4}/24"),
            "dev",
            "br0",
        ]);
        let api = fabric
            .run(|| ApiServer::start(&format!("{API_V4}:0")))
            .expect("start the test API server in the fabric namespace");
        let kubeconfig = dir.0.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");

        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("node-{i}");
            // The Node object exists before its agent starts, as in a
            // cluster where the kubelet registered first.
            api.apply(&node_object(&name, i, ipv6, topology));
            let node = Node::new(NodeOptions {
                ipv6,
                world: i == 0 && world.is_some(),
                world_ports: world.clone().unwrap_or_default(),
                pod_subnet_v4: subnet_v4(i),
                pod_subnet_v6: subnet_v6(i),
                primary: match topology {
                    Topology::Routed => Primary::Ptp,
                    _ => Primary::Bridge,
                },
                palisade: palisade.clone(),
                daemon: true,
                kube: Some(KubeNode {
                    kubeconfig: kubeconfig.clone(),
                    node_name: name,
                }),
                defer_daemon: true,
                daemon_args: daemon_args.clone(),
                ..Default::default()
            });
            wire(&fabric, &node, i);
            node.start_daemon();
            nodes.push(node);
        }
        for (i, node) in nodes.iter().enumerate() {
            route(node, i, n, topology, ipv6);
            if i > 0 && world.is_some() {
                let ns = node.netns.name.as_str();
                sys::ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    "203.0.113.0/24",
                    "via",
                    &node_v4(0),
                ]);
                if ipv6 {
                    sys::ip(&[
                        "-n",
                        ns,
                        "-6",
                        "route",
                        "add",
                        "2001:db8:cafe::/64",
                        "via",
                        &node_v6(0),
                    ]);
                }
            }
        }
        let c = Cluster {
            topology,
            ipv6,
            nodes,
            api,
            fabric,
            kubeconfig,
            expected: Mutex::new(BTreeMap::new()),
            dir,
        };
        for node in &c.nodes {
            c.wait_synced(node);
        }
        c
    }

    /// Wait until a node's agent says it has synced with the API server.
    pub fn wait_synced(&self, node: &Node) {
        let start = std::time::Instant::now();
        loop {
            let out = node.ctl(&["status", "-o", "json"], None);
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                && v["daemon"]["cluster"]["synced"] == serde_json::Value::Bool(true)
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the agent of {} did not sync with the API server within 60 s:\n{}\n{}\n{}",
                node.prefix,
                sys::describe(&out),
                node.daemon_output(),
                self.paths(node)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The network between a node and the API server, for failure
    /// messages: the node's addresses, routes and neighbours, its sockets,
    /// and the fabric's bridge and listening sockets.
    fn paths(&self, node: &Node) -> String {
        let show = |ns: &str, args: &[&str]| {
            let mut all = vec!["netns", "exec", ns];
            all.extend_from_slice(args);
            let out = std::process::Command::new("ip").args(&all).output();
            match out {
                Ok(o) => format!(
                    "{ns}$ {}\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => format!("{ns}$ {}: {e}\n", args.join(" ")),
            }
        };
        let n = node.netns.name.as_str();
        let f = self.fabric.name.as_str();
        [
            show(n, &["ip", "-br", "addr"]),
            show(n, &["ip", "route"]),
            show(n, &["ip", "neigh"]),
            show(n, &["ss", "-tanp"]),
            show(f, &["ip", "-br", "link"]),
            show(f, &["bridge", "link"]),
            show(f, &["ss", "-tlnp"]),
            show(f, &["ip", "neigh"]),
        ]
        .concat()
    }

    fn changed(&self, resource: &'static str, rv: u64) {
        self.expected.lock().expect("lock").insert(resource, rv);
    }

    /// Create a Namespace object.
    pub fn namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let rv = self.api.apply(&Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(label_map(name, labels, true)),
                ..Default::default()
            },
            ..Default::default()
        });
        self.changed("namespaces", rv.parse().unwrap_or(0));
    }

    /// Start a pod on node `node` the way a kubelet does: the Pod object
    /// first (scheduled, no address), then the sandbox (CNI ADD, which
    /// waits for the agent to know the pod), then the pod's addresses in
    /// its status.
    pub fn add_pod(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        serve: &[u16],
    ) -> Arc<Pod> {
        let obj = pod_object(namespace, name, labels, node, serve);
        self.start_pod(node, obj, serve)
    }

    /// [`Cluster::add_pod`] for a Pod object written by the caller (its
    /// node name is set here).
    pub fn start_pod(&self, node: usize, mut obj: KubePod, serve: &[u16]) -> Arc<Pod> {
        let namespace = obj.metadata.namespace.clone().unwrap_or_default();
        let name = obj.metadata.name.clone().unwrap_or_default();
        obj.spec.get_or_insert_with(Default::default).node_name = Some(format!("node-{node}"));
        self.api.apply(&obj);
        let (namespace, name) = (namespace.as_str(), name.as_str());
        let pod = self.nodes[node].add_pod(namespace, name, serve);
        let ips: Vec<IpAddr> = pod.v4.into_iter().chain(pod.v6).collect();
        obj.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: ips.first().map(ToString::to_string),
            pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
            ..Default::default()
        });
        let rv = self.api.apply(&obj);
        self.changed("pods", rv.parse().unwrap_or(0));
        pod
    }

    /// Replace a pod's labels in the API.
    pub fn relabel_pod(&self, pod: &Pod, labels: &[(&str, &str)]) {
        let mut obj: KubePod = self
            .api
            .get::<KubePod>(Some(&pod.namespace), &pod.name)
            .expect("the pod exists in the API");
        obj.metadata.labels = Some(label_map(&pod.name, labels, false));
        let rv = self.api.apply(&obj);
        self.changed("pods", rv.parse().unwrap_or(0));
    }

    /// Create or replace every object of a YAML stream.
    pub fn apply_yaml(&self, text: &str) {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value =
                <serde_json::Value as serde::Deserialize>::deserialize(doc).expect("YAML document");
            if value.is_null() {
                continue;
            }
            let resource = resource_of(&value);
            let rv = self
                .api
                .apply_value(value)
                .unwrap_or_else(|e| panic!("apply to the test API server: {e}"));
            self.changed(resource, rv.parse().unwrap_or(0));
        }
    }

    /// Delete every object a YAML stream names.
    pub fn delete_yaml(&self, text: &str) {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value =
                <serde_json::Value as serde::Deserialize>::deserialize(doc).expect("YAML document");
            if value.is_null() {
                continue;
            }
            let ns = value["metadata"]["namespace"].as_str();
            let name = value["metadata"]["name"].as_str().expect("metadata.name");
            let resource = resource_of(&value);
            let found = match resource {
                "networkpolicies" => self
                    .api
                    .delete::<NetworkPolicy>(Some(ns.unwrap_or("default")), name),
                "pods" => self
                    .api
                    .delete::<KubePod>(Some(ns.unwrap_or("default")), name),
                "namespaces" => self.api.delete::<Namespace>(None, name),
                "adminnetworkpolicies"
                | "baselineadminnetworkpolicies"
                | "clusternetworkpolicies" => self.api.delete_named(
                    value["apiVersion"].as_str().unwrap_or_default(),
                    value["kind"].as_str().unwrap_or_default(),
                    None,
                    name,
                ),
                other => panic!("the cluster test bed cannot delete {other}"),
            };
            assert!(found, "{resource} {name} was not in the API");
            self.changed(resource, self.api.resource_version());
        }
    }

    /// Create or replace a NetworkPolicy from YAML.
    pub fn apply_policy(&self, yaml: &str) {
        let np: NetworkPolicy = serde_yaml::from_str(yaml).expect("NetworkPolicy YAML");
        let rv = self.api.apply(&np);
        self.changed("networkpolicies", rv.parse().unwrap_or(0));
    }

    pub fn delete_policy(&self, namespace: &str, name: &str) {
        assert!(
            self.api.delete::<NetworkPolicy>(Some(namespace), name),
            "policy {namespace}/{name} was not in the API"
        );
        self.changed("networkpolicies", self.api.resource_version());
    }

    /// Wait until every node's agent has applied every change made
    /// through this cluster (by resource, the resourceVersion of the last
    /// one).
    pub fn settle(&self) {
        let expected = self.expected.lock().expect("lock").clone();
        for node in &self.nodes {
            let start = std::time::Instant::now();
            loop {
                let applied = applied_rvs(node);
                let behind: Vec<String> = expected
                    .iter()
                    .filter(|(r, rv)| applied.get(**r).copied().unwrap_or(0) < **rv)
                    .map(|(r, rv)| format!("{r} {rv}"))
                    .collect();
                if behind.is_empty() {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "the agent of {} did not apply the API's changes within 30 s (still waiting for {}; applied {applied:?}):\n{}",
                    node.prefix,
                    behind.join(", "),
                    node.daemon_output()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir.0
    }

    /// Wait until every node's agent has written at least `at_least`
    /// Service frontends, with its Service hook attached for both families.
    pub fn wait_service_frontends(&self, at_least: u64) {
        for node in &self.nodes {
            let start = std::time::Instant::now();
            loop {
                let out = node.ctl(&["status", "-o", "json"], None);
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let cluster = &v["daemon"]["cluster"];
                if cluster["serviceFrontends"].as_u64().unwrap_or(0) >= at_least {
                    assert!(
                        cluster["serviceHook"]
                            .as_str()
                            .is_some_and(|h| h.contains("service-v4") && h.contains("service-v6")),
                        "{}: the Service hook is not attached: {cluster}",
                        node.prefix
                    );
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "{}: {at_least} Service frontends were not written within 30 s: {cluster}\n{}",
                    node.prefix,
                    node.daemon_output()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The resource (plural) of an object by its kind.
fn resource_of(value: &serde_json::Value) -> &'static str {
    match value["kind"].as_str() {
        Some("NetworkPolicy") => "networkpolicies",
        Some("Pod") => "pods",
        Some("Namespace") => "namespaces",
        Some("Node") => "nodes",
        Some("Service") => "services",
        Some("EndpointSlice") => "endpointslices",
        Some("AdminNetworkPolicy") => "adminnetworkpolicies",
        Some("BaselineAdminNetworkPolicy") => "baselineadminnetworkpolicies",
        Some("ClusterNetworkPolicy") => "clusternetworkpolicies",
        Some("PalisadeNetworkPolicy") => "palisadenetworkpolicies",
        other => panic!("the cluster test bed does not know kind {other:?}"),
    }
}

/// By resource, the highest resourceVersion a node's agent has applied.
fn applied_rvs(node: &Node) -> BTreeMap<String, u64> {
    let out = node.ctl(&["status", "-o", "json"], None);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| {
            serde_json::from_value(v["daemon"]["cluster"]["appliedResourceVersions"].clone()).ok()
        })
        .unwrap_or_default()
}

fn label_map(name: &str, labels: &[(&str, &str)], namespace: bool) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    if namespace {
        // What the API server adds to every namespace.
        m.insert("kubernetes.io/metadata.name".into(), name.into());
    }
    m
}

/// Node `i` as its kubelet registers it, with the pod CIDRs the
/// controller manager assigns, and with Flannel's VXLAN backend its
/// annotation (Flannel gives `flannel.1` the first address of each).
fn node_object(name: &str, i: usize, ipv6: bool, topology: Topology) -> KubeNodeObject {
    let mut addresses = vec![NodeAddress {
        type_: "InternalIP".into(),
        address: node_v4(i),
    }];
    if ipv6 {
        addresses.push(NodeAddress {
            type_: "InternalIP".into(),
            address: node_v6(i),
        });
    }
    let mut cidrs = vec![subnet_v4(i)];
    if ipv6 {
        cidrs.push(subnet_v6(i));
    }
    KubeNodeObject {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/hostname".to_owned(),
                name.to_owned(),
            )])),
            annotations: (topology == Topology::Vxlan).then(|| {
                BTreeMap::from([(
                    "flannel.alpha.coreos.com/backend-type".to_owned(),
                    "vxlan".to_owned(),
                )])
            }),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(subnet_v4(i)),
            pod_cidrs: Some(cidrs),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(addresses),
            ..Default::default()
        }),
    }
}

fn pod_object(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    node: usize,
    serve: &[u16],
) -> KubePod {
    KubePod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(label_map(name, labels, false)),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(format!("node-{node}")),
            containers: vec![Container {
                name: "c".into(),
                ports: Some(
                    serve
                        .iter()
                        .map(|p| ContainerPort {
                            name: Some(format!("serve-{p}")),
                            container_port: i32::from(*p),
                            protocol: Some("TCP".into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// Join a node to the fabric (a namespace with bridge `br0`) with its own
/// link; its fabric address is 192.168.250.(i+1).
pub fn wire(fabric: &Netns, node: &Node, i: usize) {
    let n = &node.netns.name;
    let peer = format!("n{i}");
    sys::ip(&[
        "-n",
        n,
        "link",
        "add",
        "fab0",
        "type",
        "veth",
        "peer",
        "name",
        &peer,
        "netns",
        &fabric.name,
    ]);
    sys::ip(&["-n", &fabric.name, "link", "set", &peer, "master", "br0"]);
    sys::ip(&["-n", &fabric.name, "link", "set", &peer, "up"]);
    sys::ip(&[
        "-n",
        n,
        "addr",
        "add",
        &format!("{}/24", node_v4(i)),
        "dev",
        "fab0",
    ]);
    sys::ip(&[
        "-n",
        n,
        "addr",
        "add",
        &format!("{}/64", node_v6(i)),
        "dev",
        "fab0",
        "nodad",
    ]);
    sys::ip(&["-n", n, "link", "set", "fab0", "up"]);
}

/// Routes from node `i` to every other node's pods.
pub fn route(node: &Node, i: usize, n: usize, topology: Topology, ipv6: bool) {
    let ns = &node.netns.name;
    if topology == Topology::Vxlan {
        sys::ip(&[
            "-n",
            ns,
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &node_v4(i),
            "dev",
            "fab0",
            "dstport",
            "8472",
            "nolearning",
        ]);
        sys::ip(&[
            "-n",
            ns,
            "link",
            "set",
            "flannel.1",
            "address",
            &vtep_mac(i),
        ]);
        sys::ip(&["-n", ns, "link", "set", "flannel.1", "up"]);
        sys::ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.100.{i}.0/32"),
            "dev",
            "flannel.1",
        ]);
        if ipv6 {
            sys::ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/128", net6(i)),
                "dev",
                "flannel.1",
                "nodad",
            ]);
        }
    }
    for j in (0..n).filter(|&j| j != i) {
        match topology {
            Topology::Vxlan => {
                let gw4 = format!("10.100.{j}.0");
                sys::ip(&[
                    "-n",
                    ns,
                    "neigh",
                    "add",
                    &gw4,
                    "lladdr",
                    &vtep_mac(j),
                    "dev",
                    "flannel.1",
                    "nud",
                    "permanent",
                ]);
                sys::run(
                    "bridge",
                    &[
                        "-n",
                        ns,
                        "fdb",
                        "append",
                        &vtep_mac(j),
                        "dev",
                        "flannel.1",
                        "dst",
                        &node_v4(j),
                    ],
                );
                sys::ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &subnet_v4(j),
                    "via",
                    &gw4,
                    "dev",
                    "flannel.1",
                    "onlink",
                ]);
                if ipv6 {
                    let gw6 = net6(j);
                    sys::ip(&[
                        "-n",
                        ns,
                        "-6",
                        "neigh",
                        "add",
                        &gw6,
                        "lladdr",
                        &vtep_mac(j),
                        "dev",
                        "flannel.1",
                        "nud",
                        "permanent",
                    ]);
                    sys::ip(&[
                        "-n",
                        ns,
                        "-6",
                        "route",
                        "add",
                        &subnet_v6(j),
                        "via",
                        &gw6,
                        "dev",
                        "flannel.1",
                        "onlink",
                    ]);
                }
            }
            Topology::HostGw | Topology::Routed => {
                sys::ip(&["-n", ns, "route", "add", &subnet_v4(j), "via", &node_v4(j)]);
                if ipv6 {
                    sys::ip(&[
                        "-n",
                        ns,
                        "-6",
                        "route",
                        "add",
                        &subnet_v6(j),
                        "via",
                        &node_v6(j),
                    ]);
                }
            }
        }
    }
}
