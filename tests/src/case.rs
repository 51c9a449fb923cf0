//! Data-driven NetworkPolicy conformance cases (`tests/testdata/netpol`,
//! format in its README): build the topology on a fresh node, run the
//! steps, probe with real traffic, compare whole matrices.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, path::Path, sync::Arc};

use ipnet_lite::network;
use serde::Deserialize;

use crate::{
    cluster::{Cluster, Topology as ClusterTopology},
    matrix::{Matrix, Peer, probe_against},
    node::{Node, NodeOptions, Pod},
    probe::Proto,
};

/// Where a case runs.
#[derive(Debug)]
pub enum Backend {
    /// One node, objects given with `palisadectl apply`.
    Node(Box<Node>),
    /// Several nodes in cluster mode: objects go to the API server only,
    /// pods are spread over the nodes.
    Cluster(Box<Cluster>),
}

/// Nodes in a cluster run of a case.
pub const CLUSTER_NODES: usize = 3;

/// `PALISADE_TEST_CLUSTER=vxlan|host-gw|routed`: run cases on a cluster.
pub fn cluster_topology() -> Option<ClusterTopology> {
    let v = std::env::var("PALISADE_TEST_CLUSTER").ok()?;
    Some(
        ClusterTopology::ALL
            .into_iter()
            .find(|t| t.name() == v)
            .unwrap_or_else(|| {
                panic!("PALISADE_TEST_CLUSTER={v} is not one of vxlan, host-gw, routed")
            }),
    )
}

/// `PALISADE_TEST_SERVICES=1` (with `PALISADE_TEST_CLUSTER`): every pod
/// gets a Service of its own (a ClusterIP with every served port, TCP and
/// UDP) and every node kube-proxy's DNAT rules for it; TCP and UDP probes
/// go to the ClusterIPs, as the upstream e2e suite probes, so egress rules
/// are judged on the backend after DNAT. ICMP (ClusterIPs do not answer it)
/// and SCTP (spoken on raw sockets here, which the DNAT would not follow)
/// still go to the pods' own addresses.
pub fn services_mode() -> bool {
    std::env::var("PALISADE_TEST_SERVICES").is_ok_and(|v| v == "1")
}

/// One Service per pod, and the DNAT rules on every node; returns each
/// pod's ClusterIP.
fn set_up_services(
    c: &Cluster,
    pods: &BTreeMap<String, Arc<Pod>>,
    serve: &[u16],
    v6: bool,
) -> BTreeMap<String, IpAddr> {
    let mut vips = BTreeMap::new();
    let mut docs = Vec::new();
    let mut rules = String::from("*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n");
    for (i, (key, pod)) in pods.iter().enumerate() {
        let (ns, name) = key.split_once('/').expect("ns/name");
        let vip: IpAddr = if v6 {
            format!("fd00:96::1:{:x}", i + 1)
        } else {
            format!("10.96.1.{}", i + 1)
        }
        .parse()
        .expect("ClusterIP");
        let ports: Vec<String> = serve
            .iter()
            .flat_map(|p| {
                ["TCP", "UDP"].map(|proto| {
                    format!(
                        "  - {{name: {}-{p}, port: {p}, targetPort: {p}, protocol: {proto}}}",
                        proto.to_lowercase()
                    )
                })
            })
            .collect();
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{name}, namespace: {ns}}}\n\
             spec:\n  clusterIP: '{vip}'\n  clusterIPs: ['{vip}']\n  ports:\n{}\n",
            ports.join("\n")
        ));
        let len = if v6 { 128 } else { 32 };
        for proto in ["tcp", "udp"] {
            rules.push_str(&format!(
                "-A KUBE-SERVICES -d {vip}/{len} -p {proto} -j DNAT --to-destination {}\n",
                pod.addr(v6)
            ));
        }
        vips.insert(key.clone(), vip);
    }
    rules.push_str("COMMIT\n");
    c.apply_yaml(&docs.join("---\n"));
    c.settle();
    let restore = if v6 {
        "ip6tables-restore"
    } else {
        "iptables-restore"
    };
    for node in &c.nodes {
        // A backend on its client's bridge answers over the bridge: the
        // reply must pass netfilter to have the DNAT undone.
        node.netns.sysctl("net.bridge.bridge-nf-call-iptables", "1");
        node.netns
            .sysctl("net.bridge.bridge-nf-call-ip6tables", "1");
        let mut child = node
            .netns
            .command(restore)
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {restore}: {e}"));
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), rules.as_bytes())
            .expect("write rules");
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{restore} in {}: {}",
            node.netns.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    c.wait_service_frontends((pods.len() * serve.len() * 2) as u64);
    vips
}

type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub families: Vec<String>,
    #[serde(default)]
    pub topology: Option<Topology>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub serve: Option<Vec<u16>>,
    pub namespaces: Option<BTreeMap<String, Option<Labels>>>,
    pub pods: Option<BTreeMap<String, PodSpec>>,
    #[serde(default)]
    pub world: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    #[serde(default)]
    pub labels: Labels,
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSpec {
    pub name: String,
    pub container_port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Step {
    pub apply: Option<String>,
    pub delete: Option<String>,
    pub relabel_pod: Option<RelabelPod>,
    pub relabel_namespace: Option<RelabelNamespace>,
    #[serde(default)]
    pub probes: Vec<ProbeSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelabelPod {
    pub pod: String,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelabelNamespace {
    pub namespace: String,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    pub port: Option<u16>,
    pub protocol: String,
    #[serde(default)]
    pub expect: Vec<ExpectRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectRule {
    pub from: String,
    pub to: String,
    pub allow: bool,
}

impl Case {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let case: Case =
            serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(case)
    }

    pub fn families(&self) -> Vec<bool> {
        if self.families.is_empty() {
            return vec![false];
        }
        self.families.iter().map(|f| f == "ipv6").collect()
    }

    /// The topology with defaults filled in (the e2e model).
    pub fn resolved_topology(
        &self,
    ) -> (
        Vec<u16>,
        BTreeMap<String, Labels>,
        BTreeMap<String, PodSpec>,
        bool,
    ) {
        let t = self.topology.clone().unwrap_or_default();
        let serve = t.serve.unwrap_or_else(|| vec![80, 81]);
        let namespaces = match t.namespaces {
            Some(ns) => ns
                .into_iter()
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect(),
            None => ["x", "y", "z"]
                .iter()
                .map(|n| (n.to_string(), [("ns".to_string(), n.to_string())].into()))
                .collect(),
        };
        let pods = match t.pods {
            Some(p) => p,
            None => ["x", "y", "z"]
                .iter()
                .flat_map(|ns| ["a", "b", "c"].iter().map(move |p| (ns, p)))
                .map(|(ns, p)| {
                    (
                        format!("{ns}/{p}"),
                        PodSpec {
                            labels: [("pod".to_string(), p.to_string())].into(),
                            ports: None,
                        },
                    )
                })
                .collect(),
        };
        (serve, namespaces, pods, t.world)
    }
}

fn default_ports(serve: &[u16]) -> Vec<PortSpec> {
    serve
        .iter()
        .flat_map(|p| {
            ["TCP", "UDP", "SCTP"].iter().map(move |proto| PortSpec {
                name: format!("serve-{p}-{}", proto.to_lowercase()),
                container_port: *p,
                protocol: proto.to_string(),
            })
        })
        .collect()
}

fn namespace_yaml(name: &str, labels: &Labels) -> String {
    serde_json::to_string(&serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels}
    }))
    .expect("json")
}

fn pod_yaml(ns: &str, name: &str, labels: &Labels, ports: &[PortSpec]) -> String {
    serde_json::to_string(&serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "server", "ports": ports}]}
    }))
    .expect("json")
}

/// Small IP helpers for placeholders.
mod ipnet_lite {
    use std::net::IpAddr;

    /// The network of `ip` with `len` bits.
    pub fn network(ip: IpAddr, len: u8) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                let mask = if len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(len))
                };
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(len))
                };
                IpAddr::V6((bits & mask).into())
            }
        }
    }
}

/// A running case.
#[derive(Debug)]
pub struct Run<'a> {
    pub case: &'a Case,
    pub v6: bool,
    pub backend: Backend,
    pub pods: BTreeMap<String, Arc<Pod>>,
    pub ports: BTreeMap<String, Vec<PortSpec>>,
    pub serve: Vec<u16>,
    /// Each pod's ClusterIP, in services mode.
    pub vips: BTreeMap<String, IpAddr>,
}

impl<'a> Run<'a> {
    pub fn start(case: &'a Case, v6: bool) -> Self {
        match cluster_topology() {
            Some(t) => Self::start_cluster(case, v6, t),
            None => Self::start_node(case, v6),
        }
    }

    /// On a cluster: pods round-robin over the nodes, so that every
    /// namespace spans nodes and most pairs cross them.
    pub fn start_cluster(case: &'a Case, v6: bool, topology: ClusterTopology) -> Self {
        let (serve, namespaces, pods, world) = case.resolved_topology();
        let c = Cluster::with_world(
            CLUSTER_NODES,
            topology,
            v6,
            serde_json::Map::new(),
            world.then(|| serve.clone()),
        );
        for (ns, labels) in &namespaces {
            let l: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            c.namespace(ns, &l);
        }
        let mut ports = BTreeMap::new();
        let mut running = BTreeMap::new();
        for (i, (key, spec)) in pods.iter().enumerate() {
            let (ns, name) = key
                .split_once('/')
                .unwrap_or_else(|| panic!("pod key {key} is not ns/name"));
            let p = spec.ports.clone().unwrap_or_else(|| default_ports(&serve));
            let obj =
                serde_json::from_str(&pod_yaml(ns, name, &spec.labels, &p)).expect("Pod object");
            running.insert(key.clone(), c.start_pod(i % CLUSTER_NODES, obj, &serve));
            ports.insert(key.clone(), p);
        }
        c.settle();
        let vips = if services_mode() {
            set_up_services(&c, &running, &serve, v6)
        } else {
            BTreeMap::new()
        };
        Self {
            case,
            v6,
            backend: Backend::Cluster(Box::new(c)),
            pods: running,
            ports,
            serve,
            vips,
        }
    }

    pub fn start_node(case: &'a Case, v6: bool) -> Self {
        let (serve, namespaces, pods, world) = case.resolved_topology();
        let node = Node::new(NodeOptions {
            ipv6: v6,
            world,
            world_ports: serve.clone(),
            ..Default::default()
        });
        // Objects first, as a cluster would have them; then the containers.
        let mut docs = Vec::new();
        for (ns, labels) in &namespaces {
            docs.push(namespace_yaml(ns, labels));
        }
        let mut ports = BTreeMap::new();
        for (key, spec) in &pods {
            let (ns, name) = key
                .split_once('/')
                .unwrap_or_else(|| panic!("pod key {key} is not ns/name"));
            let p = spec.ports.clone().unwrap_or_else(|| default_ports(&serve));
            docs.push(pod_yaml(ns, name, &spec.labels, &p));
            ports.insert(key.clone(), p);
        }
        node.apply(&docs.join("\n---\n"));
        let mut running = BTreeMap::new();
        for key in pods.keys() {
            let (ns, name) = key.split_once('/').expect("ns/name");
            running.insert(key.clone(), node.add_pod(ns, name, &serve));
        }
        Self {
            case,
            v6,
            backend: Backend::Node(Box::new(node)),
            pods: running,
            ports,
            serve,
            vips: BTreeMap::new(),
        }
    }

    /// The node with the outside host.
    fn world_node(&self) -> &Node {
        match &self.backend {
            Backend::Node(n) => n,
            Backend::Cluster(c) => &c.nodes[0],
        }
    }

    fn apply(&self, text: &str) {
        match &self.backend {
            Backend::Node(n) => {
                n.apply(text);
            }
            Backend::Cluster(c) => {
                c.apply_yaml(text);
                c.settle();
            }
        }
    }

    fn delete(&self, text: &str) {
        match &self.backend {
            Backend::Node(n) => n.delete(text),
            Backend::Cluster(c) => {
                c.delete_yaml(text);
                c.settle();
            }
        }
    }

    fn addr_of(&self, who: &str) -> IpAddr {
        if who == "world" {
            return self.world_node().world_addr(self.v6);
        }
        self.pods
            .get(who)
            .unwrap_or_else(|| panic!("case {} names unknown pod {who}", self.case.name))
            .addr(self.v6)
    }

    /// Replace `${ip:..}` and `${cidr:..:N}` placeholders.
    pub fn substitute(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let end = rest[start..]
                .find('}')
                .map(|e| start + e)
                .unwrap_or_else(|| panic!("unterminated placeholder in case {}", self.case.name));
            let inner = &rest[start + 2..end];
            let value = if let Some(who) = inner.strip_prefix("ip:") {
                self.addr_of(who).to_string()
            } else if let Some(spec) = inner.strip_prefix("cidr:") {
                let (who, len) = spec
                    .rsplit_once(':')
                    .unwrap_or_else(|| panic!("bad placeholder ${{{inner}}}"));
                let len: u8 = len
                    .parse()
                    .unwrap_or_else(|_| panic!("bad prefix in ${{{inner}}}"));
                let addr = self.addr_of(who);
                let len = if addr.is_ipv6() { 96 + len } else { len };
                format!("{}/{len}", network(addr, len))
            } else {
                panic!(
                    "unknown placeholder ${{{inner}}} in case {}",
                    self.case.name
                )
            };
            out.push_str(&value);
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        out
    }

    pub fn peers(&self) -> Vec<Peer> {
        self.peers_for(Proto::Icmp)
    }

    /// The peers, addressed as probes of `proto` reach them: through the
    /// pods' ClusterIPs for TCP and UDP in services mode.
    pub fn peers_for(&self, proto: Proto) -> Vec<Peer> {
        let through_service = matches!(proto, Proto::Tcp | Proto::Udp);
        let mut peers: Vec<Peer> = self
            .pods
            .iter()
            .map(|(k, p)| Peer {
                name: k.clone(),
                netns: p.netns.clone(),
                addr: match self.vips.get(k) {
                    Some(vip) if through_service => *vip,
                    _ => p.addr(self.v6),
                },
            })
            .collect();
        if let Some(w) = &self.world_node().world {
            peers.push(Peer {
                name: "world".into(),
                netns: w.netns.path.clone(),
                addr: self.world_node().world_addr(self.v6),
            });
        }
        peers
    }

    fn matches(pattern: &str, name: &str) -> bool {
        match pattern {
            "*" => name != "world",
            p if p.ends_with("/*") => name
                .split_once('/')
                .is_some_and(|(ns, _)| ns == &p[..p.len() - 2]),
            p => p == name,
        }
    }

    pub fn expected(&self, rules: &[ExpectRule]) -> Matrix {
        let peers = self.peers();
        let names: Vec<String> = peers.iter().map(|p| p.name.clone()).collect();
        let mut m = Matrix::new(&names);
        for from in &names {
            for to in &names {
                if from == to {
                    continue;
                }
                let mut allow = true;
                for r in rules {
                    if Self::matches(&r.from, from) && Self::matches(&r.to, to) {
                        allow = r.allow;
                    }
                }
                m.set(from, to, allow);
            }
        }
        m
    }

    fn relabel_pod(&self, r: &RelabelPod) {
        let (ns, name) = r.pod.split_once('/').expect("ns/name");
        let ports = self
            .ports
            .get(&r.pod)
            .cloned()
            .unwrap_or_else(|| default_ports(&self.serve));
        match &self.backend {
            Backend::Node(n) => {
                n.apply(&pod_yaml(ns, name, &r.labels, &ports));
            }
            Backend::Cluster(c) => {
                let pod = self.pods.get(&r.pod).expect("relabelled pod runs");
                let l: Vec<(&str, &str)> = r
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                c.relabel_pod(pod, &l);
                c.settle();
            }
        }
    }

    /// Run every step; return a report of every mismatch (empty: passed).
    pub fn run_steps(&self) -> String {
        let mut failures = String::new();
        for (i, step) in self.case.steps.iter().enumerate() {
            if let Some(r) = &step.relabel_namespace {
                match &self.backend {
                    Backend::Node(n) => {
                        n.apply(&namespace_yaml(&r.namespace, &r.labels));
                    }
                    Backend::Cluster(c) => {
                        let l: Vec<(&str, &str)> = r
                            .labels
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect();
                        c.namespace(&r.namespace, &l);
                        c.settle();
                    }
                }
            }
            if let Some(r) = &step.relabel_pod {
                self.relabel_pod(r);
            }
            if let Some(d) = &step.delete {
                self.delete(&self.substitute(d));
            }
            if let Some(a) = &step.apply {
                self.apply(&self.substitute(a));
            }
            for p in &step.probes {
                let proto = Proto::parse(&p.protocol).unwrap_or_else(|| {
                    panic!("case {}: unknown protocol {}", self.case.name, p.protocol)
                });
                let port = p.port.unwrap_or(0);
                let expected = self.expected(&p.expect);
                let observed = probe_against(&self.peers_for(proto), proto, port, &expected);
                let diff = observed.diff(&expected);
                if !diff.is_empty() {
                    let _ = writeln!(
                        failures,
                        "step {} ({} {port}), IPv{}: {} pair(s) differ:",
                        i + 1,
                        proto.as_str(),
                        if self.v6 { 6 } else { 4 },
                        diff.len()
                    );
                    for (f, t, want, got) in &diff {
                        let _ = writeln!(
                            failures,
                            "  {f} -> {t}: expected {}, observed {}",
                            if *want { "reachable" } else { "blocked" },
                            if *got { "reachable" } else { "blocked" }
                        );
                    }
                    let _ = writeln!(failures, "expected:\n{expected}\nobserved:\n{observed}\n");
                }
            }
        }
        failures
    }
}
