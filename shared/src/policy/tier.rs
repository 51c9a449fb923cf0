//! Cluster-wide tier policies: AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy (`policy.networking.k8s.io/v1alpha1`) and
//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`).
//!
//! The wire types follow the CRDs of kubernetes-sigs/network-policy-api
//! field for field; validation applies the CRDs' schema (enums, limits,
//! exactly-one-of fields, the CEL rules) with the field path in every error.
//! Both API versions become one [`TierPolicy`]: a tier, a priority, a
//! subject and ordered rules.

use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

use super::{
    IpBlock, Mode, NamespaceScope, ObjectError, Peer, Protocol, Selector, mode_annotation,
    palisade::FqdnSelector, parse_cidr, selector, validate_port_name,
};

pub const API_V1ALPHA1: &str = "policy.networking.k8s.io/v1alpha1";
pub const API_V1ALPHA2: &str = "policy.networking.k8s.io/v1alpha2";

/// The name every BaselineAdminNetworkPolicy must have (it is a singleton).
pub const BANP_NAME: &str = "default";

/// The three kinds, in the order palisade breaks priority ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TierKind {
    ClusterNetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
}

impl TierKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            Self::AdminNetworkPolicy => "AdminNetworkPolicy",
            Self::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Self::ClusterNetworkPolicy => API_V1ALPHA2,
            _ => API_V1ALPHA1,
        }
    }
}

/// Where a tier policy is evaluated: before NetworkPolicy, or after it for
/// what no NetworkPolicy isolates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Tier {
    Admin,
    Baseline,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "Admin",
            Self::Baseline => "Baseline",
        }
    }
}

/// What a rule does with what it matches (Allow is CNP's Accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
    Pass,
}

/// The pods a policy applies to: pods matching `pods` in namespaces
/// matching `namespaces` (a `namespaces` subject has an empty `pods`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TierSubject {
    pub namespaces: Selector,
    pub pods: Selector,
}

/// A rule's peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TierPeer {
    /// Pods (a `namespaces` peer is every pod of the namespaces it
    /// selects) or one `networks` CIDR, as NetworkPolicy peers.
    Peer(Peer),
    /// Nodes by their labels (their addresses, egress only).
    Nodes(Selector),
}

/// A rule's port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TierPort {
    /// An inclusive range (one port is a range of one).
    Range(Protocol, u16, u16),
    /// A container port name, resolved on the destination pod with the
    /// container port's protocol.
    Named(String),
}

/// One rule. `ports: None` matches all traffic (every protocol).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TierRule {
    pub name: String,
    pub action: Action,
    pub peers: Vec<TierPeer>,
    pub ports: Option<Vec<TierPort>>,
    /// `domainNames` peers (egress, Accept only): the addresses the DNS
    /// proxy learned for them become peers (see [`crate::fqdn`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<FqdnSelector>,
}

/// A validated ANP, BANP or CNP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierPolicy {
    pub kind: TierKind,
    pub name: String,
    pub tier: Tier,
    /// 0–1000, lower first; 0 for a BANP (there is one).
    pub priority: u32,
    /// The `palisade.io/mode` annotation, if any.
    pub mode: Option<Mode>,
    pub subject: TierSubject,
    pub ingress: Vec<TierRule>,
    pub egress: Vec<TierRule>,
}

impl TierPolicy {
    /// Whether the pods it selects send DNS through the node's DNS proxy
    /// (a rule names domains).
    pub fn uses_dns_proxy(&self) -> bool {
        self.egress.iter().any(|r| !r.domains.is_empty())
    }

    /// Precedence within a tier: priority, then kind, then name (the API
    /// leaves equal priorities undefined; palisade fixes this order).
    pub fn rank(&self) -> (u32, TierKind, &str) {
        (self.priority, self.kind, &self.name)
    }
}

// ---------------------------------------------------------------------
// Wire types (both versions share subject and peer shapes).

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    pub pod_selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireSubject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// Ingress and egress peers of both versions (ingress ones may only set
/// `namespaces` or `pods`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WirePeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<Vec<String>>,
}

/// v1alpha1 `portNumber`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PortNumber {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub port: i64,
}

/// v1alpha1 `portRange` (with a protocol) and v1alpha2 `range` (without).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct WireRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub start: i64,
    pub end: i64,
}

/// v1alpha1 port: exactly one of the three.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_number: Option<PortNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<WireRange>,
}

/// v1alpha1 rule (ANP and BANP): `from` for ingress, `to` for egress.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AnpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<WirePeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<WirePeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<AnpPort>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AnpSpec {
    /// Absent in a BANP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    pub subject: WireSubject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<AnpRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<AnpRule>>,
}

/// v1alpha2 `destinationPort`: a number or a range.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CnpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<WireRange>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CnpProtocolPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<CnpPort>,
}

/// v1alpha2 protocol match: exactly one field.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CnpProtocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<CnpProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<CnpProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<CnpProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CnpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<WirePeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<WirePeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<CnpProtocol>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CnpSpec {
    pub tier: String,
    pub priority: i64,
    pub subject: WireSubject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<CnpRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<CnpRule>>,
}

/// An ANP or BANP object as written.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnpObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: AnpSpec,
    /// Written by implementations; kept as given, never read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// A CNP object as written.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CnpObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: CnpSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// A tier policy object as written, either version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TierObject {
    V1alpha1(AnpObject),
    V1alpha2(CnpObject),
}

// ---------------------------------------------------------------------
// Validation.

/// The limits of one API version's schema.
struct Limits {
    rules: usize,
    peers: usize,
    ports: usize,
}

const V1ALPHA1_LIMITS: Limits = Limits {
    rules: 100,
    peers: 100,
    ports: 100,
};
const V1ALPHA2_LIMITS: Limits = Limits {
    rules: 25,
    peers: 25,
    ports: 25,
};
const MAX_NETWORKS: usize = 25;
const MAX_RULE_NAME: usize = 100;
const MAX_CIDR_LEN: usize = 43;

fn invalid(path: &str, message: impl Into<String>) -> ObjectError {
    ObjectError::invalid(path, message)
}

fn count(path: &str, len: usize, min: usize, max: usize) -> Result<(), ObjectError> {
    if len < min {
        return Err(invalid(
            path,
            format!("needs at least {min} item(s), has {len}"),
        ));
    }
    if len > max {
        return Err(invalid(path, format!("at most {max} items, has {len}")));
    }
    Ok(())
}

fn meta_name(meta: &mut ObjectMeta, kind: TierKind) -> Result<String, ObjectError> {
    let name = meta.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(invalid(
            "metadata.name",
            format!("every {} needs a name", kind.as_str()),
        ));
    }
    if !selector::valid_dns_subdomain(&name) {
        return Err(invalid(
            "metadata.name",
            format!(
                "{name:?} is not a valid {} name: use lowercase letters, digits, '-' and '.'",
                kind.as_str()
            ),
        ));
    }
    // Cluster-scoped: a namespace means nothing (kubectl drops it too).
    meta.namespace = None;
    if let Some(labels) = &meta.labels {
        selector::validate_labels(labels, "metadata.labels")?;
    }
    Ok(name)
}

fn one_of(path: &str, set: &[(&str, bool)]) -> Result<(), ObjectError> {
    let given: Vec<&str> = set.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
    let names: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
    match given.len() {
        1 => Ok(()),
        0 => Err(invalid(
            path,
            format!("set exactly one of {}", names.join(", ")),
        )),
        _ => Err(invalid(
            path,
            format!(
                "set only one of {} (found {})",
                names.join(", "),
                given.join(" and ")
            ),
        )),
    }
}

fn subject(s: &WireSubject, path: &str, v2: bool) -> Result<TierSubject, ObjectError> {
    one_of(
        path,
        &[
            ("namespaces", s.namespaces.is_some()),
            ("pods", s.pods.is_some()),
        ],
    )?;
    if let Some(ns) = &s.namespaces {
        return Ok(TierSubject {
            namespaces: Selector::from_k8s(ns, &format!("{path}.namespaces"))?,
            pods: Selector::default(),
        });
    }
    let (namespaces, pods) = namespaced_pod(s.pods.as_ref(), &format!("{path}.pods"), v2)?;
    Ok(TierSubject { namespaces, pods })
}

fn namespaced_pod(
    p: Option<&NamespacedPod>,
    path: &str,
    v2: bool,
) -> Result<(Selector, Selector), ObjectError> {
    let p = p.ok_or_else(|| invalid(path, "missing"))?;
    let namespaces = match &p.namespace_selector {
        Some(s) => Selector::from_k8s(s, &format!("{path}.namespaceSelector"))?,
        // Optional in v1alpha2 (all namespaces), required in v1alpha1.
        None if v2 => Selector::default(),
        None => {
            return Err(invalid(
                &format!("{path}.namespaceSelector"),
                "required (use {} for every namespace)",
            ));
        }
    };
    let pods = match &p.pod_selector {
        Some(s) => Selector::from_k8s(s, &format!("{path}.podSelector"))?,
        None => {
            return Err(invalid(
                &format!("{path}.podSelector"),
                "required (use {} for every pod)",
            ));
        }
    };
    Ok((namespaces, pods))
}

fn peers(
    list: Option<&Vec<WirePeer>>,
    path: &str,
    egress: bool,
    limits: &Limits,
    allow_domain_names: bool,
    v2: bool,
) -> Result<(Vec<TierPeer>, Vec<FqdnSelector>), ObjectError> {
    let list = list.ok_or_else(|| invalid(path, "required: the rule's peers"))?;
    count(path, list.len(), 1, limits.peers)?;
    let mut out = Vec::new();
    let mut domains = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let here = format!("{path}[{i}]");
        let mut fields = vec![
            ("namespaces", p.namespaces.is_some()),
            ("pods", p.pods.is_some()),
        ];
        if egress {
            fields.push(("nodes", p.nodes.is_some()));
            fields.push(("networks", p.networks.is_some()));
            if allow_domain_names {
                fields.push(("domainNames", p.domain_names.is_some()));
            }
        } else {
            for (name, set) in [
                ("nodes", p.nodes.is_some()),
                ("networks", p.networks.is_some()),
                ("domainNames", p.domain_names.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        &format!("{here}.{name}"),
                        "not allowed in an ingress peer (use namespaces or pods)",
                    ));
                }
            }
        }
        if !allow_domain_names && p.domain_names.is_some() {
            return Err(invalid(
                &format!("{here}.domainNames"),
                "not a field of this kind (ClusterNetworkPolicy has domainNames)",
            ));
        }
        one_of(&here, &fields)?;
        if let Some(ns) = &p.namespaces {
            out.push(TierPeer::Peer(Peer::Pods {
                namespaces: NamespaceScope::Matching(Selector::from_k8s(
                    ns,
                    &format!("{here}.namespaces"),
                )?),
                pods: Selector::default(),
            }));
        } else if let Some(pods) = &p.pods {
            let (namespaces, pods) = namespaced_pod(Some(pods), &format!("{here}.pods"), v2)?;
            out.push(TierPeer::Peer(Peer::Pods {
                namespaces: NamespaceScope::Matching(namespaces),
                pods,
            }));
        } else if let Some(nodes) = &p.nodes {
            out.push(TierPeer::Nodes(Selector::from_k8s(
                nodes,
                &format!("{here}.nodes"),
            )?));
        } else if let Some(nets) = &p.networks {
            let npath = format!("{here}.networks");
            count(&npath, nets.len(), 1, MAX_NETWORKS)?;
            let mut seen: Vec<IpNetwork> = Vec::new();
            for (j, c) in nets.iter().enumerate() {
                let cpath = format!("{npath}[{j}]");
                if c.len() > MAX_CIDR_LEN {
                    return Err(invalid(
                        &cpath,
                        format!("at most {MAX_CIDR_LEN} characters"),
                    ));
                }
                if !c.contains('/') {
                    return Err(invalid(
                        &cpath,
                        format!("{c:?} is not a CIDR; write it like 10.0.0.0/16 or fd00::/64"),
                    ));
                }
                let net = parse_cidr(c, &cpath)?;
                if seen.contains(&net) {
                    return Err(invalid(&cpath, format!("{c:?} is listed twice")));
                }
                seen.push(net);
                out.push(TierPeer::Peer(Peer::IpBlock(IpBlock {
                    cidr: net,
                    except: Vec::new(),
                })));
            }
        } else if let Some(names) = &p.domain_names {
            let dpath = format!("{here}.domainNames");
            count(&dpath, names.len(), 1, MAX_NETWORKS)?;
            for (j, n) in names.iter().enumerate() {
                let d = domain_name(n, &format!("{dpath}[{j}]"))?;
                if domains.contains(&d) {
                    return Err(invalid(
                        &format!("{dpath}[{j}]"),
                        format!("{n:?} is listed twice"),
                    ));
                }
                domains.push(d);
            }
        }
    }
    Ok((out, domains))
}

/// A `DomainName`: a name of two or more labels, or `*.` and such a name,
/// where `*` stands for one or more whole labels.
fn domain_name(n: &str, path: &str) -> Result<FqdnSelector, ObjectError> {
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && l.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
    };
    let (wild, rest) = match n.strip_prefix("*.") {
        Some(r) => (true, r),
        None => (false, n),
    };
    let rest = rest.strip_suffix('.').unwrap_or(rest);
    let labels: Vec<&str> = rest.split('.').collect();
    if n.len() > 253 || labels.len() < 2 || !labels.iter().all(|l| label_ok(l)) {
        return Err(invalid(
            path,
            format!(
                "{n:?} is not a domain name: two or more labels of letters, digits, '-' and '_' \
                 (e.g. api.example.com), optionally after '*.' for its subdomains"
            ),
        ));
    }
    let name = rest.to_ascii_lowercase();
    Ok(if wild {
        FqdnSelector::Pattern(format!("**.{name}"))
    } else {
        FqdnSelector::Name(name)
    })
}

fn port_number(n: i64, path: &str) -> Result<u16, ObjectError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| invalid(path, format!("{n} is not a port number (1-65535)")))
}

fn protocol(p: Option<&str>, path: &str) -> Result<Protocol, ObjectError> {
    Protocol::parse(p.unwrap_or("TCP"), path)
}

fn range(r: &WireRange, proto: Protocol, path: &str) -> Result<TierPort, ObjectError> {
    let start = port_number(r.start, &format!("{path}.start"))?;
    let end = port_number(r.end, &format!("{path}.end"))?;
    if start >= end {
        return Err(invalid(
            path,
            format!(
                "start ({start}) must be less than end ({end}); use a single port for one port"
            ),
        ));
    }
    Ok(TierPort::Range(proto, start, end))
}

fn anp_ports(
    list: Option<&Vec<AnpPort>>,
    path: &str,
) -> Result<Option<Vec<TierPort>>, ObjectError> {
    let Some(list) = list else { return Ok(None) };
    count(path, list.len(), 1, V1ALPHA1_LIMITS.ports)?;
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let here = format!("{path}[{i}]");
        one_of(
            &here,
            &[
                ("portNumber", p.port_number.is_some()),
                ("namedPort", p.named_port.is_some()),
                ("portRange", p.port_range.is_some()),
            ],
        )?;
        if let Some(n) = &p.port_number {
            let proto = protocol(
                n.protocol.as_deref(),
                &format!("{here}.portNumber.protocol"),
            )?;
            let port = port_number(n.port, &format!("{here}.portNumber.port"))?;
            out.push(TierPort::Range(proto, port, port));
        } else if let Some(name) = &p.named_port {
            validate_port_name(name, &format!("{here}.namedPort"))?;
            out.push(TierPort::Named(name.clone()));
        } else if let Some(r) = &p.port_range {
            let rpath = format!("{here}.portRange");
            let proto = protocol(r.protocol.as_deref(), &format!("{rpath}.protocol"))?;
            out.push(range(r, proto, &rpath)?);
        }
    }
    Ok(Some(out))
}

fn cnp_protocols(
    list: Option<&Vec<CnpProtocol>>,
    path: &str,
) -> Result<Option<Vec<TierPort>>, ObjectError> {
    let Some(list) = list else { return Ok(None) };
    count(path, list.len(), 1, V1ALPHA2_LIMITS.ports)?;
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let here = format!("{path}[{i}]");
        one_of(
            &here,
            &[
                ("tcp", p.tcp.is_some()),
                ("udp", p.udp.is_some()),
                ("sctp", p.sctp.is_some()),
                ("destinationNamedPort", p.destination_named_port.is_some()),
            ],
        )?;
        if let Some(name) = &p.destination_named_port {
            validate_port_name(name, &format!("{here}.destinationNamedPort"))?;
            out.push(TierPort::Named(name.clone()));
            continue;
        }
        let (field, proto, pp) = match (&p.tcp, &p.udp, &p.sctp) {
            (Some(pp), _, _) => ("tcp", Protocol::Tcp, pp),
            (_, Some(pp), _) => ("udp", Protocol::Udp, pp),
            (_, _, Some(pp)) => ("sctp", Protocol::Sctp, pp),
            _ => unreachable!("one_of checked that one field is set"),
        };
        let ppath = format!("{here}.{field}");
        let Some(dp) = &pp.destination_port else {
            return Err(invalid(
                &ppath,
                "set destinationPort (leave the protocol entry out to match every port of every protocol)",
            ));
        };
        let dpath = format!("{ppath}.destinationPort");
        one_of(
            &dpath,
            &[
                ("number", dp.number.is_some()),
                ("range", dp.range.is_some()),
            ],
        )?;
        if let Some(n) = dp.number {
            let port = port_number(n, &format!("{dpath}.number"))?;
            out.push(TierPort::Range(proto, port, port));
        } else if let Some(r) = &dp.range {
            let rpath = format!("{dpath}.range");
            if r.protocol.is_some() {
                return Err(invalid(
                    &format!("{rpath}.protocol"),
                    format!("unknown field (the protocol is {field})"),
                ));
            }
            out.push(range(r, proto, &rpath)?);
        }
    }
    Ok(Some(out))
}

fn rule_name(name: Option<&String>, path: &str) -> Result<String, ObjectError> {
    let name = name.cloned().unwrap_or_default();
    if name.len() > MAX_RULE_NAME {
        return Err(invalid(
            &format!("{path}.name"),
            format!("at most {MAX_RULE_NAME} characters, has {}", name.len()),
        ));
    }
    Ok(name)
}

fn action(s: &str, path: &str, allowed: &[(&str, Action)]) -> Result<Action, ObjectError> {
    allowed
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, a)| *a)
        .ok_or_else(|| {
            let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
            invalid(
                &format!("{path}.action"),
                format!("{s:?} is not an action here; use {}", names.join(", ")),
            )
        })
}

/// The CEL rule of every version: named ports cannot go with peers that
/// have no pods (networks, nodes).
fn no_named_ports_without_pods(
    rule: &TierRule,
    path: &str,
    field: &str,
) -> Result<(), ObjectError> {
    let named = rule
        .ports
        .iter()
        .flatten()
        .any(|p| matches!(p, TierPort::Named(_)));
    let podless = rule
        .peers
        .iter()
        .any(|p| matches!(p, TierPeer::Nodes(_) | TierPeer::Peer(Peer::IpBlock(_))));
    if named && podless {
        return Err(invalid(
            &format!("{path}.{field}"),
            "networks and nodes peers cannot be used with named ports (they have none); \
             put them in a rule of their own with port numbers",
        ));
    }
    Ok(())
}

fn priority(p: Option<i64>, path: &str) -> Result<u32, ObjectError> {
    let p = p.ok_or_else(|| invalid(path, "required: 0 to 1000, lower first"))?;
    u32::try_from(p).ok().filter(|p| *p <= 1000).ok_or_else(|| {
        invalid(
            path,
            format!("{p} is out of range: use 0 to 1000, lower first"),
        )
    })
}

/// What the rules of both API versions have in common.
trait WireRule {
    fn name(&self) -> Option<&String>;
    fn action(&self) -> &str;
    fn from(&self) -> Option<&Vec<WirePeer>>;
    fn to(&self) -> Option<&Vec<WirePeer>>;
    /// The field the rule's ports are written in.
    const PORTS_FIELD: &'static str;
    /// The rule's ports (`None`: every protocol and port).
    fn ports(&self, path: &str) -> Result<Option<Vec<TierPort>>, ObjectError>;
}

impl WireRule for AnpRule {
    fn name(&self) -> Option<&String> {
        self.name.as_ref()
    }
    fn action(&self) -> &str {
        &self.action
    }
    fn from(&self) -> Option<&Vec<WirePeer>> {
        self.from.as_ref()
    }
    fn to(&self) -> Option<&Vec<WirePeer>> {
        self.to.as_ref()
    }
    const PORTS_FIELD: &'static str = "ports";
    fn ports(&self, path: &str) -> Result<Option<Vec<TierPort>>, ObjectError> {
        anp_ports(self.ports.as_ref(), path)
    }
}

impl WireRule for CnpRule {
    fn name(&self) -> Option<&String> {
        self.name.as_ref()
    }
    fn action(&self) -> &str {
        &self.action
    }
    fn from(&self) -> Option<&Vec<WirePeer>> {
        self.from.as_ref()
    }
    fn to(&self) -> Option<&Vec<WirePeer>> {
        self.to.as_ref()
    }
    const PORTS_FIELD: &'static str = "protocols";
    fn ports(&self, path: &str) -> Result<Option<Vec<TierPort>>, ObjectError> {
        cnp_protocols(self.protocols.as_ref(), path)
    }
}

/// Both directions' rules of a spec, validated, in order. `v2`: the
/// v1alpha2 schema (domainNames peers, optional namespaceSelector).
fn rules<R: WireRule>(
    ingress: Option<&Vec<R>>,
    egress: Option<&Vec<R>>,
    actions: &[(&str, Action)],
    limits: &Limits,
    v2: bool,
) -> Result<(Vec<TierRule>, Vec<TierRule>), ObjectError> {
    let mut dirs = [Vec::new(), Vec::new()];
    for (d, (field, rules, egress)) in [("ingress", ingress, false), ("egress", egress, true)]
        .into_iter()
        .enumerate()
    {
        let rules = rules.map(Vec::as_slice).unwrap_or_default();
        count(&format!("spec.{field}"), rules.len(), 0, limits.rules)?;
        for (i, r) in rules.iter().enumerate() {
            let path = format!("spec.{field}[{i}]");
            let (peer_field, list, wrong) = if egress {
                ("to", r.to(), r.from().is_some().then_some("from"))
            } else {
                ("from", r.from(), r.to().is_some().then_some("to"))
            };
            if let Some(w) = wrong {
                return Err(invalid(
                    &format!("{path}.{w}"),
                    format!("unknown field ({field} rules have {peer_field})"),
                ));
            }
            let (peers, domains) = peers(
                list,
                &format!("{path}.{peer_field}"),
                egress,
                limits,
                v2,
                v2,
            )?;
            let rule = TierRule {
                name: rule_name(r.name(), &path)?,
                action: action(r.action(), &path, actions)?,
                peers,
                ports: r.ports(&format!("{path}.{}", R::PORTS_FIELD))?,
                domains,
            };
            if !rule.domains.is_empty() && rule.action != Action::Allow {
                return Err(invalid(
                    &format!("{path}.action"),
                    "domainNames may only be used with the Accept action",
                ));
            }
            no_named_ports_without_pods(&rule, &path, R::PORTS_FIELD)?;
            dirs[d].push(rule);
        }
    }
    let [ingress, egress] = dirs;
    Ok((ingress, egress))
}

/// Validate an AdminNetworkPolicy or BaselineAdminNetworkPolicy.
pub fn validate_anp(
    mut obj: AnpObject,
    kind: TierKind,
) -> Result<(AnpObject, TierPolicy), ObjectError> {
    let name = meta_name(&mut obj.metadata, kind)?;
    let baseline = kind == TierKind::BaselineAdminNetworkPolicy;
    if baseline && name != BANP_NAME {
        return Err(invalid(
            "metadata.name",
            format!(
                "a BaselineAdminNetworkPolicy must be named {BANP_NAME:?} (there is one per cluster), not {name:?}"
            ),
        ));
    }
    let mode = mode_annotation(
        &obj.metadata,
        &format!("metadata.annotations[{}]", super::MODE_ANNOTATION),
    )?;
    let spec = &obj.spec;
    let prio = if baseline {
        if spec.priority.is_some() {
            return Err(invalid(
                "spec.priority",
                "unknown field (a BaselineAdminNetworkPolicy has no priority)",
            ));
        }
        0
    } else {
        priority(spec.priority, "spec.priority")?
    };
    let subject = subject(&spec.subject, "spec.subject", false)?;
    let actions: &[(&str, Action)] = if baseline {
        &[("Allow", Action::Allow), ("Deny", Action::Deny)]
    } else {
        &[
            ("Allow", Action::Allow),
            ("Deny", Action::Deny),
            ("Pass", Action::Pass),
        ]
    };
    let (ingress, egress) = rules(
        spec.ingress.as_ref(),
        spec.egress.as_ref(),
        actions,
        &V1ALPHA1_LIMITS,
        false,
    )?;
    let value = TierPolicy {
        kind,
        name,
        tier: if baseline {
            Tier::Baseline
        } else {
            Tier::Admin
        },
        priority: prio,
        mode,
        subject,
        ingress,
        egress,
    };
    Ok((obj, value))
}

/// Validate a ClusterNetworkPolicy.
pub fn validate_cnp(mut obj: CnpObject) -> Result<(CnpObject, TierPolicy), ObjectError> {
    let kind = TierKind::ClusterNetworkPolicy;
    let name = meta_name(&mut obj.metadata, kind)?;
    let mode = mode_annotation(
        &obj.metadata,
        &format!("metadata.annotations[{}]", super::MODE_ANNOTATION),
    )?;
    let spec = &obj.spec;
    let tier = match spec.tier.as_str() {
        "Admin" => Tier::Admin,
        "Baseline" => Tier::Baseline,
        other => {
            return Err(invalid(
                "spec.tier",
                format!("{other:?} is not a tier; use Admin or Baseline"),
            ));
        }
    };
    let prio = priority(Some(spec.priority), "spec.priority")?;
    let subject = subject(&spec.subject, "spec.subject", true)?;
    let actions: &[(&str, Action)] = &[
        ("Accept", Action::Allow),
        ("Deny", Action::Deny),
        ("Pass", Action::Pass),
    ];
    let (ingress, egress) = rules(
        spec.ingress.as_ref(),
        spec.egress.as_ref(),
        actions,
        &V1ALPHA2_LIMITS,
        true,
    )?;
    let value = TierPolicy {
        kind,
        name,
        tier,
        priority: prio,
        mode,
        subject,
        ingress,
        egress,
    };
    Ok((obj, value))
}

#[cfg(test)]
mod domain_tests {
    use super::*;

    #[test]
    fn domain_names_match_as_the_api_defines_them() {
        let wild = domain_name("*.Kubernetes.io", "p").unwrap();
        for (n, want) in [
            ("www.kubernetes.io", true),
            ("latest.blog.kubernetes.io.", true),
            ("kubernetes.io", false),
            ("wikipedia.org", false),
        ] {
            assert_eq!(wild.matches(n), want, "{n}");
        }
        let exact = domain_name("blog.kubernetes.io.", "p").unwrap();
        assert!(exact.matches("blog.kubernetes.io"));
        assert!(!exact.matches("www.kubernetes.io"));
        for bad in [
            "localhost",
            "*kubernetes.io",
            "a.*.io",
            "-a.io",
            "a..io",
            "*.",
            "a b.io",
        ] {
            let e = domain_name(bad, "spec.egress[0].to[0].domainNames[0]").unwrap_err();
            assert!(
                e.to_string()
                    .contains("spec.egress[0].to[0].domainNames[0]"),
                "{bad}: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anp(yaml: &str) -> Result<TierPolicy, ObjectError> {
        let obj: AnpObject = serde_yaml::from_str(yaml).expect("wire");
        let kind = if obj.kind == "BaselineAdminNetworkPolicy" {
            TierKind::BaselineAdminNetworkPolicy
        } else {
            TierKind::AdminNetworkPolicy
        };
        validate_anp(obj, kind).map(|(_, v)| v)
    }

    fn cnp(yaml: &str) -> Result<TierPolicy, ObjectError> {
        let obj: CnpObject = serde_yaml::from_str(yaml).expect("wire");
        validate_cnp(obj).map(|(_, v)| v)
    }

    fn err(r: Result<TierPolicy, ObjectError>) -> String {
        r.expect_err("must be refused").to_string()
    }

    const ANP: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: tenants}
spec:
  priority: 10
  subject: {namespaces: {matchLabels: {tenant: a}}}
  ingress:
  - name: deny-b
    action: Deny
    from: [{namespaces: {matchLabels: {tenant: b}}}]
  - action: Pass
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: mon}}}}]
    ports: [{portNumber: {port: 9090}}, {portRange: {protocol: UDP, start: 5000, end: 5010}}, {namedPort: web}]
  egress:
  - action: Allow
    to: [{networks: [10.0.0.0/8, "fd00::/64"]}, {pods: {namespaceSelector: {}, podSelector: {}}}, {nodes: {matchLabels: {role: infra}}}]
"#;

    #[test]
    fn an_admin_network_policy_becomes_ordered_rules() {
        let p = anp(ANP).expect("valid");
        assert_eq!(
            (p.kind, p.tier, p.priority),
            (TierKind::AdminNetworkPolicy, Tier::Admin, 10)
        );
        assert_eq!(p.ingress.len(), 2);
        assert_eq!(p.ingress[0].name, "deny-b");
        assert_eq!(p.ingress[0].action, Action::Deny);
        assert_eq!(p.ingress[0].ports, None, "no ports: all traffic");
        assert_eq!(
            p.ingress[1].ports,
            Some(vec![
                TierPort::Range(Protocol::Tcp, 9090, 9090),
                TierPort::Range(Protocol::Udp, 5000, 5010),
                TierPort::Named("web".into()),
            ])
        );
        assert_eq!(p.egress[0].peers.len(), 4, "two networks, pods and nodes");
        assert!(matches!(p.egress[0].peers[3], TierPeer::Nodes(_)));
        assert!(matches!(
            p.egress[0].peers[0],
            TierPeer::Peer(Peer::IpBlock(_))
        ));
    }

    #[test]
    fn a_cluster_network_policy_reads_the_same_way() {
        let p = cnp(r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: base}
spec:
  tier: Baseline
  priority: 3
  subject: {pods: {podSelector: {matchLabels: {app: db}}}}
  egress:
  - action: Accept
    to: [{pods: {podSelector: {}}}]
    protocols: [{tcp: {destinationPort: {number: 5432}}}, {udp: {destinationPort: {range: {start: 53, end: 54}}}}, {destinationNamedPort: dns}]
  - action: Deny
    to: [{namespaces: {}}]
"#)
        .expect("valid");
        assert_eq!((p.tier, p.priority), (Tier::Baseline, 3));
        assert!(
            p.subject.namespaces.is_empty(),
            "namespaceSelector is optional in v1alpha2"
        );
        assert_eq!(p.egress[0].action, Action::Allow, "Accept is Allow");
        assert_eq!(
            p.egress[0].ports,
            Some(vec![
                TierPort::Range(Protocol::Tcp, 5432, 5432),
                TierPort::Range(Protocol::Udp, 53, 54),
                TierPort::Named("dns".into()),
            ])
        );
    }

    #[test]
    fn schema_violations_name_the_field() {
        let with = |from: &str, to: &str| ANP.replacen(from, to, 1);
        for (yaml, path, words) in [
            (
                with("priority: 10", "priority: 1001"),
                "spec.priority",
                "0 to 1000",
            ),
            (with("  priority: 10\n", ""), "spec.priority", "required"),
            (
                with("action: Deny", "action: Reject"),
                "spec.ingress[0].action",
                "Allow, Deny, Pass",
            ),
            (
                with(
                    "subject: {namespaces: {matchLabels: {tenant: a}}}",
                    "subject: {}",
                ),
                "spec.subject",
                "exactly one of namespaces, pods",
            ),
            (
                with(
                    "from: [{namespaces: {matchLabels: {tenant: b}}}]",
                    "from: []",
                ),
                "spec.ingress[0].from",
                "at least 1",
            ),
            (
                with("{portNumber: {port: 9090}}", "{portNumber: {port: 0}}"),
                "spec.ingress[1].ports[0].portNumber.port",
                "1-65535",
            ),
            (
                with("start: 5000, end: 5010", "start: 5010, end: 5000"),
                "spec.ingress[1].ports[1].portRange",
                "less than end",
            ),
            (
                with("protocol: UDP", "protocol: ICMP"),
                "spec.ingress[1].ports[1].portRange.protocol",
                "TCP, UDP or SCTP",
            ),
            (
                with("networks: [10.0.0.0/8", "networks: [10.0.0.0/33"),
                "spec.egress[0].to[0].networks[0]",
                "not a CIDR",
            ),
            (
                with("networks: [10.0.0.0/8", "networks: [10.0.0.1"),
                "spec.egress[0].to[0].networks[0]",
                "not a CIDR",
            ),
            (
                with(
                    "- action: Allow\n    to: [{networks",
                    "- action: Allow\n    ports: [{namedPort: web}]\n    to: [{networks",
                ),
                "spec.egress[0].ports",
                "named ports",
            ),
            (
                with(
                    "from: [{namespaces: {matchLabels: {tenant: b}}}]",
                    "from: [{networks: [10.0.0.0/8]}]",
                ),
                "spec.ingress[0].from[0].networks",
                "ingress peer",
            ),
        ] {
            let e = match serde_yaml::from_str::<AnpObject>(&yaml) {
                Ok(obj) => validate_anp(obj, TierKind::AdminNetworkPolicy)
                    .map(|(_, v)| v)
                    .expect_err(&format!("{path} must be refused"))
                    .to_string(),
                // Unknown fields are refused by the strict decoder of
                // parse_documents, not by the wire types.
                Err(e) => e.to_string(),
            };
            assert!(e.contains(path), "{path}: {e}");
            assert!(e.contains(words), "{path}: {e}");
        }
    }

    #[test]
    fn a_baseline_policy_is_the_singleton_default_without_priority_or_pass() {
        let banp = |name: &str, extra: &str, action: &str| {
            format!(
                "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\n\
                 metadata: {{name: {name}}}\nspec:\n  {extra}subject: {{namespaces: {{}}}}\n  \
                 ingress: [{{action: {action}, from: [{{namespaces: {{}}}}]}}]\n"
            )
        };
        let p = anp(&banp("default", "", "Deny")).expect("valid");
        assert_eq!((p.tier, p.priority), (Tier::Baseline, 0));
        assert!(err(anp(&banp("other", "", "Deny"))).contains("must be named \"default\""));
        assert!(err(anp(&banp("default", "priority: 5\n  ", "Deny"))).contains("no priority"));
        assert!(err(anp(&banp("default", "", "Pass"))).contains("use Allow, Deny"));
    }

    #[test]
    fn cluster_network_policy_limits_and_enums() {
        let base = |tier: &str, action: &str, n: usize| {
            let rules: Vec<String> = (0..n)
                .map(|_| format!("{{action: {action}, from: [{{namespaces: {{}}}}]}}"))
                .collect();
            format!(
                "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n\
                 metadata: {{name: c}}\nspec:\n  tier: {tier}\n  priority: 1\n  \
                 subject: {{namespaces: {{}}}}\n  ingress: [{}]\n",
                rules.join(", ")
            )
        };
        assert!(cnp(&base("Admin", "Accept", 25)).is_ok());
        assert!(err(cnp(&base("Admin", "Accept", 26))).contains("spec.ingress: at most 25"));
        assert!(err(cnp(&base("Tenant", "Accept", 1))).contains("use Admin or Baseline"));
        assert!(err(cnp(&base("Admin", "Allow", 1))).contains("use Accept, Deny, Pass"));
        let with_protocols = base("Admin", "Deny", 1).replace(
            "from: [{namespaces: {}}]}",
            "from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80}}, udp: {destinationPort: {number: 53}}}]}",
        );
        assert!(
            err(cnp(&with_protocols))
                .contains("set only one of tcp, udp, sctp, destinationNamedPort")
        );
        let domains = base("Admin", "Accept", 0).replace(
            "ingress: []",
            "egress: [{action: Accept, to: [{domainNames: [example.com]}]}]",
        );
        // Accepted (DNS-aware egress), but only with Accept.
        assert_eq!(
            cnp(&domains).unwrap().egress[0].domains,
            vec![FqdnSelector::Name("example.com".into())]
        );
        let deny = domains.replace("action: Accept, to", "action: Deny, to");
        assert!(err(cnp(&deny)).contains("only be used with the Accept action"));
    }
}

#[cfg(test)]
mod examples {
    /// The shipped example (conf/examples/tenant-isolation.yaml) is valid.
    #[test]
    fn the_tenant_isolation_example_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../conf/examples/tenant-isolation.yaml"
        );
        let text = std::fs::read_to_string(path).expect("the example");
        let objs = crate::policy::parse_documents(&text, path).expect("valid");
        assert_eq!(objs.len(), 3);
    }
}
