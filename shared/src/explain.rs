//! "Why was my packet dropped?": evaluate NetworkPolicy for one connection,
//! side by side, and say which policies decide. Uses the same matching
//! functions as the compiler, on the stored objects, so the answer is the
//! semantics; the CLI adds what the live maps say next to it.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use serde::Serialize;
use thiserror::Error;

use crate::{
    abi::{Direction, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, proto_name},
    compile::{PeerFacts, http_rules_of, peer_matches, ports_match},
    policy::{
        HttpRule, IpBlock, Labels, NamedPort, NamespaceInfo, Peer, Policy,
        tier::{Action, Tier, TierPort, TierRule},
    },
    store::{Endpoint, State},
    tiers::{self, TierRef},
};

#[derive(Debug, Error)]
pub enum ExplainError {
    #[error("{0:?} is neither NAMESPACE/POD, POD (namespace default) nor an IP address")]
    BadParty(String),
    #[error(
        "no pod {0}: palisade knows no endpoint and no Pod object by that name (see `palisadectl get endpoints`)"
    )]
    UnknownPod(String),
    #[error(
        "{0:?} is not a port: write PORT/PROTOCOL (80/TCP, 53/UDP, 9000/SCTP), PORT (TCP), or icmp"
    )]
    BadPort(String),
}

/// One end of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartyRef {
    Pod { namespace: String, name: String },
    Address(IpAddr),
}

impl PartyRef {
    pub fn parse(s: &str) -> Result<Self, ExplainError> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self::Address(ip));
        }
        let (ns, name) = match s.split_once('/') {
            Some((ns, name)) => (ns, name),
            None => (crate::policy::DEFAULT_NAMESPACE, s),
        };
        if ns.is_empty() || name.is_empty() || name.contains('/') {
            return Err(ExplainError::BadParty(s.to_owned()));
        }
        Ok(Self::Pod {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// `80/TCP`, `53/udp`, `80`, `icmp`.
pub fn parse_port(s: &str) -> Result<(u8, u16), ExplainError> {
    let bad = || ExplainError::BadPort(s.to_owned());
    if s.eq_ignore_ascii_case("icmp") {
        return Ok((PROTO_ICMP, 0));
    }
    let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let proto = match proto.to_ascii_uppercase().as_str() {
        "TCP" => PROTO_TCP,
        "UDP" => PROTO_UDP,
        "SCTP" => PROTO_SCTP,
        _ => return Err(bad()),
    };
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(bad)?;
    Ok((proto, port))
}

/// What is known about one party.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Party {
    /// `ns/name`, an address, `node` or `outside`.
    pub display: String,
    #[serde(skip)]
    pub pod: Option<PodFacts>,
    pub address: Option<IpAddr>,
    pub is_host: bool,
    /// The endpoint palisade enforces on, when the pod runs here.
    pub endpoint_id: Option<u32>,
    /// Another node of the cluster: its Node's labels.
    #[serde(skip)]
    pub node_labels: Option<Labels>,
}

#[derive(Debug, Clone)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ns_labels: Labels,
    pub ports: Vec<NamedPort>,
}

/// A rule that allows the connection.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Allow {
    pub policy: String,
    /// `ingress[0]`, `egress[2]`.
    pub rule: String,
    pub ports: String,
}

/// A tier rule that matched: the one that decided, passed, or (in audit
/// mode) would have denied.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TierMatch {
    /// `Admin` or `Baseline`.
    pub tier: String,
    /// `AdminNetworkPolicy/NAME` (kind and name).
    pub policy: String,
    /// `ingress[2]` (and the rule's name, if it has one).
    pub rule: String,
    /// `Allow`, `Deny` or `Pass`.
    pub action: String,
    /// The policy is in audit mode: the rule did not decide.
    pub audit: bool,
}

impl fmt::Display for TierMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.policy, self.rule)
    }
}

/// One side's decision.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Side {
    pub direction: Direction,
    pub subject: String,
    /// Admin and baseline rules that matched, in the order they were
    /// evaluated (audited ones, a Pass, then the deciding one).
    pub tiers: Vec<TierMatch>,
    /// Policies that select the subject for this direction.
    pub isolated_by: Vec<String>,
    pub allowed_by: Vec<Allow>,
    pub allowed: bool,
    /// Allowed only because the isolating policies are in audit mode.
    pub audit: bool,
    pub reason: String,
    /// Allowed by NetworkPolicy rules that all carry HTTP rules: the
    /// connection goes through the node's L7 proxy, which allows the
    /// requests one of these (policy, rule) match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<(String, HttpRule)>>,
    /// Only audit-mode policies isolate the subject on this side: the L7
    /// proxy passes requests no HTTP rule allows, reported as audit.
    #[serde(skip)]
    pub http_audit: bool,
}

/// The whole answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub from: Party,
    pub to: Party,
    pub protocol: String,
    pub port: u16,
    pub allowed: bool,
    /// The sender's egress decision (only when the sender is a pod).
    pub egress: Option<Side>,
    /// The receiver's ingress decision (only when the receiver is a pod).
    pub ingress: Option<Side>,
    pub notes: Vec<String>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.port == 0 {
            self.protocol.clone()
        } else {
            format!("{}/{}", self.port, self.protocol)
        };
        writeln!(
            f,
            "{} -> {} {}: {}",
            self.from.display,
            self.to.display,
            what,
            if !self.allowed {
                "DENIED"
            } else if self.egress.iter().chain(&self.ingress).any(|s| s.audit) {
                "ALLOWED (audit mode: policy would deny it)"
            } else {
                "ALLOWED"
            }
        )?;
        for side in [&self.egress, &self.ingress].into_iter().flatten() {
            writeln!(
                f,
                "  {:<7} of {}: {} - {}",
                side.direction.as_str(),
                side.subject,
                if side.allowed { "allowed" } else { "denied" },
                side.reason
            )?;
            for t in &side.tiers {
                writeln!(
                    f,
                    "      {} tier: {} {} {}{}",
                    t.tier,
                    t.policy,
                    t.rule,
                    t.action,
                    if t.audit {
                        " (audit mode: would have denied; not enforced)"
                    } else {
                        ""
                    }
                )?;
            }
            for a in &side.allowed_by {
                writeln!(
                    f,
                    "      allowed by NetworkPolicy {} {} ({})",
                    a.policy, a.rule, a.ports
                )?;
            }
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        Ok(())
    }
}

fn all_blocks(policies: &[(u32, Policy)]) -> Vec<IpBlock> {
    let mut set = BTreeSet::new();
    for (_, p) in policies {
        for r in p.ingress.iter().chain(&p.egress) {
            for peer in &r.peers {
                if let Peer::IpBlock(b) = peer {
                    set.insert(b.clone());
                }
            }
        }
    }
    set.into_iter().collect()
}

fn resolve(state: &State, r: &PartyRef) -> Result<Party, ExplainError> {
    let namespaces = state.namespace_map();
    let pod_facts = |ep: Option<&Endpoint>, ns: &str, name: &str| -> Option<PodFacts> {
        let obj = state.pod_info(ns, name);
        if ep.is_none() && obj.is_none() {
            return None;
        }
        let labels = match ep {
            Some(e) => state.effective_labels(e),
            None => obj.as_ref().map(|p| p.labels.clone()).unwrap_or_default(),
        };
        Some(PodFacts {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            labels,
            ns_labels: namespaces
                .get(ns)
                .cloned()
                .unwrap_or_else(|| NamespaceInfo::new(ns, None))
                .labels,
            ports: obj.map(|p| p.ports.clone()).unwrap_or_default(),
        })
    };
    match r {
        PartyRef::Pod { namespace, name } => {
            let ep = state
                .endpoints
                .values()
                .find(|e| &e.namespace == namespace && &e.name == name);
            let pod = pod_facts(ep, namespace, name)
                .ok_or_else(|| ExplainError::UnknownPod(format!("{namespace}/{name}")))?;
            Ok(Party {
                display: format!("{namespace}/{name}"),
                pod: Some(pod),
                address: ep.map(|e| e.addresses.first().copied()).unwrap_or_else(|| {
                    state
                        .remote
                        .get(&format!("{namespace}/{name}"))
                        .and_then(|r| r.addresses.first().copied())
                }),
                is_host: false,
                endpoint_id: ep.map(|e| e.id),
                node_labels: None,
            })
        }
        PartyRef::Address(ip) => {
            if let Some(ep) = state.endpoints.values().find(|e| e.addresses.contains(ip)) {
                return Ok(Party {
                    display: format!("{}/{} ({ip})", ep.namespace, ep.name),
                    pod: pod_facts(Some(ep), &ep.namespace, &ep.name),
                    address: Some(*ip),
                    is_host: false,
                    endpoint_id: Some(ep.id),
                    node_labels: None,
                });
            }
            // A pod on another node (cluster mode).
            if let Some(r) = state.remote.values().find(|r| r.addresses.contains(ip)) {
                return Ok(Party {
                    display: format!("{}/{} ({ip}, on node {})", r.namespace, r.name, r.node),
                    pod: pod_facts(None, &r.namespace, &r.name),
                    address: Some(*ip),
                    is_host: false,
                    endpoint_id: None,
                    node_labels: None,
                });
            }
            let is_host = state.host_addresses.contains(ip);
            let node = state.nodes.values().find(|n| n.addresses.contains(ip));
            Ok(Party {
                display: match node {
                    _ if is_host => format!("{ip} (this node)"),
                    Some(n) => format!("{ip} (node {})", n.name),
                    // An outside address the DNS proxy saw answered.
                    None => match state.fqdns.names_of(*ip) {
                        names if names.is_empty() => ip.to_string(),
                        names => format!("{ip} ({})", names.join(", ")),
                    },
                },
                pod: None,
                address: Some(*ip),
                is_host,
                endpoint_id: None,
                node_labels: node.filter(|_| !is_host).map(|n| n.labels.clone()),
            })
        }
    }
}

/// Whether a tier rule's ports take (proto, port); named ports resolve on
/// the destination's `dest_ports`.
fn tier_ports_match(r: &TierRule, proto: u8, port: u16, dest_ports: &[NamedPort]) -> bool {
    match &r.ports {
        None => true,
        Some(list) => list.iter().any(|p| match p {
            TierPort::Range(pr, a, b) => pr.number() == proto && (*a..=*b).contains(&port),
            TierPort::Named(name) => dest_ports
                .iter()
                .any(|np| &np.name == name && np.protocol.number() == proto && np.port == port),
        }),
    }
}

/// One tier's answer for one side: the matched rules (in order) and the
/// final action, if a rule of an enforced policy decided (Pass included).
fn tier_side(
    tier_pols: &[TierRef<'_>],
    tier: Tier,
    subject: &PodFacts,
    dir: Direction,
    facts: &PeerFacts<'_>,
    (proto, port, dest_ports): (u8, u16, &[NamedPort]),
) -> (Vec<TierMatch>, Option<Action>) {
    let mut matched = Vec::new();
    for t in tier_pols.iter().filter(|t| t.policy.tier == tier) {
        if !tiers::selects(t.policy, &subject.ns_labels, &subject.labels) {
            continue;
        }
        let rules = match dir {
            Direction::Ingress => &t.policy.ingress,
            Direction::Egress => &t.policy.egress,
        };
        for (i, r) in rules.iter().enumerate() {
            if !r
                .peers
                .iter()
                .any(|p| tiers::peer_matches_identity(p, facts))
                || !tier_ports_match(r, proto, port, dest_ports)
            {
                continue;
            }
            let m = TierMatch {
                tier: tier.as_str().to_owned(),
                policy: format!("{}/{}", t.policy.kind.as_str(), t.policy.name),
                rule: if r.name.is_empty() {
                    format!("{}[{i}]", dir.as_str())
                } else {
                    format!("{}[{i}] ({})", dir.as_str(), r.name)
                },
                action: match r.action {
                    Action::Allow => "Allow",
                    Action::Deny => "Deny",
                    Action::Pass => "Pass",
                }
                .to_owned(),
                audit: t.audit,
            };
            if t.audit {
                // Only an audited Deny is worth reporting; none decides.
                if r.action == Action::Deny && !matched.iter().any(|m: &TierMatch| m.audit) {
                    matched.push(m);
                }
                continue;
            }
            matched.push(m);
            return (matched, Some(r.action));
        }
    }
    (matched, None)
}

#[allow(
    clippy::too_many_arguments,
    reason = "one side of one connection, spelled out"
)]
fn side(
    policies: &[(u32, Policy)],
    tier_pols: &[TierRef<'_>],
    blocks: &[IpBlock],
    subject: &PodFacts,
    dir: Direction,
    peer: &Party,
    proto: u8,
    port: u16,
) -> Side {
    let subject_name = format!("{}/{}", subject.namespace, subject.name);
    let peer_blocks: BTreeSet<String> = match peer.address {
        Some(ip) => blocks
            .iter()
            .filter(|b| b.contains(ip))
            .map(IpBlock::canonical)
            .collect(),
        None => BTreeSet::new(),
    };
    let facts = PeerFacts {
        pod: peer
            .pod
            .as_ref()
            .map(|p| (p.namespace.as_str(), &p.ns_labels, &p.labels)),
        blocks: &peer_blocks,
        node: peer.node_labels.as_ref(),
    };
    // Named ports resolve on the destination.
    let empty = Vec::new();
    let dest_ports = match dir {
        Direction::Ingress => &subject.ports,
        Direction::Egress => peer.pod.as_ref().map(|p| &p.ports).unwrap_or(&empty),
    };
    let (mut tier_matches, admin) = tier_side(
        tier_pols,
        Tier::Admin,
        subject,
        dir,
        &facts,
        (proto, port, dest_ports),
    );
    let mut isolated_by = Vec::new();
    let mut allowed_by = Vec::new();
    let mut http: Option<Vec<(String, HttpRule)>> = None;
    let mut plain = false;
    let mut enforced = false;
    let mut sorted: Vec<&(u32, Policy)> = policies.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.1.namespace, &a.1.name, a.1.kind).cmp(&(&b.1.namespace, &b.1.name, b.1.kind))
    });
    for (_, p) in sorted {
        let isolates = match dir {
            Direction::Ingress => p.ingress_isolation,
            Direction::Egress => p.egress_isolation,
        };
        if !isolates || !p.selects(&subject.namespace, &subject.labels) {
            continue;
        }
        isolated_by.push(p.key());
        enforced |= p.mode.unwrap_or_default() == crate::policy::Mode::Enforce;
        let rules = match dir {
            Direction::Ingress => &p.ingress,
            Direction::Egress => &p.egress,
        };
        for (i, r) in rules.iter().enumerate() {
            let peer_ok = r.peers.is_empty()
                || r.peers
                    .iter()
                    .any(|x| peer_matches(x, &p.namespace, &facts));
            if !peer_ok {
                continue;
            }
            if let Some(ports) = ports_match(r, proto, port, dest_ports) {
                allowed_by.push(Allow {
                    policy: p.key(),
                    rule: format!("{}[{i}]", dir.as_str()),
                    ports,
                });
                match http_rules_of(r, proto, port, dest_ports) {
                    Some(rules) if !rules.is_empty() => http
                        .get_or_insert_with(Vec::new)
                        .extend(rules.into_iter().map(|h| (p.key(), h.clone()))),
                    _ => plain = true,
                }
            }
        }
    }
    let audited_deny = |m: &[TierMatch]| m.iter().find(|t| t.audit).map(ToString::to_string);
    let decided = |m: &[TierMatch]| m.last().map(ToString::to_string).unwrap_or_default();
    let mut baseline = None;
    if !peer.is_host
        && !matches!(admin, Some(Action::Allow | Action::Deny))
        && isolated_by.is_empty()
    {
        let (m, b) = tier_side(
            tier_pols,
            Tier::Baseline,
            subject,
            dir,
            &facts,
            (proto, port, dest_ports),
        );
        tier_matches.extend(m);
        baseline = b;
    }
    let tier_audit = audited_deny(&tier_matches);
    let (allowed, reason) = if peer.is_host {
        (
            true,
            "traffic between a pod and its own node is never governed (kubelet probes)".to_owned(),
        )
    } else if admin == Some(Action::Deny) {
        (
            false,
            format!(
                "denied by {} before any NetworkPolicy",
                decided(&tier_matches)
            ),
        )
    } else if admin == Some(Action::Allow) {
        (
            true,
            format!(
                "allowed by {} before any NetworkPolicy",
                decided(&tier_matches)
            ),
        )
    } else if isolated_by.is_empty() && baseline == Some(Action::Deny) {
        (
            false,
            format!(
                "no NetworkPolicy selects {subject_name} for {dir}; denied by {}",
                decided(&tier_matches)
            ),
        )
    } else if isolated_by.is_empty() && baseline == Some(Action::Allow) {
        (
            true,
            format!(
                "no NetworkPolicy selects {subject_name} for {dir}; allowed by {}",
                decided(&tier_matches)
            ),
        )
    } else if isolated_by.is_empty() {
        (
            true,
            format!("no NetworkPolicy selects {subject_name} for {dir}, so it is not isolated"),
        )
    } else if allowed_by.is_empty() && !enforced {
        (
            true,
            format!(
                "AUDIT: isolated for {dir} only by audit-mode {} ({}), and no rule allows {}: it would be denied; \
                 it is allowed and reported as audit",
                if isolated_by.len() == 1 {
                    "policy"
                } else {
                    "policies"
                },
                isolated_by.join(", "),
                peer.display
            ),
        )
    } else if allowed_by.is_empty() {
        (
            false,
            format!(
                "isolated for {dir} by {}, and no rule of {} allows {}",
                isolated_by.join(", "),
                if isolated_by.len() == 1 { "it" } else { "them" },
                peer.display
            ),
        )
    } else {
        (
            true,
            format!(
                "isolated for {dir} by {}, and a rule allows it",
                isolated_by.join(", ")
            ),
        )
    };
    // An audited tier Deny matched before what allowed it: reported as
    // audit, as the datapath does.
    let (audit_tier, reason) = match (&tier_audit, allowed && !peer.is_host) {
        (Some(by), true) => (
            true,
            format!("{reason}; AUDIT: {by} (audit mode) would deny it, so it is reported as audit"),
        ),
        _ => (false, reason),
    };
    let np_audit = allowed
        && admin.is_none_or(|a| a == Action::Pass)
        && allowed_by.is_empty()
        && !isolated_by.is_empty()
        && !enforced
        && !peer.is_host;
    // Through the L7 proxy: NetworkPolicy decided (no tier rule did, the
    // node is not the peer), and every rule that allows carries HTTP rules.
    let by_netpol = allowed
        && !peer.is_host
        && admin.is_none_or(|a| a == Action::Pass)
        && !isolated_by.is_empty()
        && !allowed_by.is_empty();
    let http = if by_netpol && !plain { http } else { None };
    let reason = match &http {
        Some(rules) => format!(
            "{reason}; only HTTP rules allow it, so it goes through the node's L7 proxy, which lets \
             through the requests one of {} HTTP {} matches",
            rules.len(),
            if rules.len() == 1 { "rule" } else { "rules" }
        ),
        None => reason,
    };
    Side {
        direction: dir,
        subject: subject_name,
        tiers: tier_matches,
        audit: np_audit || audit_tier,
        isolated_by,
        allowed_by,
        allowed,
        reason,
        http_audit: http.is_some() && !enforced,
        http,
    }
}

/// Explain a connection from `from` to `to` on (protocol, port).
pub fn explain(
    state: &State,
    from: &PartyRef,
    to: &PartyRef,
    proto: u8,
    port: u16,
) -> Result<Explanation, ExplainError> {
    let mut policies = state.policies();
    let namespaces = state.namespace_map();
    for (_, p) in &mut policies {
        p.mode = Some(state.effective_mode(p, &namespaces));
    }
    let mut blocks = all_blocks(&policies);
    let expanded_tiers = state.tier_policies();
    for (_, t) in &expanded_tiers {
        blocks.extend(tiers::blocks(t));
    }
    blocks.sort();
    blocks.dedup();
    let mut tier_pols: Vec<TierRef<'_>> = expanded_tiers
        .iter()
        .map(|(id, t)| TierRef::new(*id, t, state.mode))
        .collect();
    tiers::sort(&mut tier_pols);
    let from = resolve(state, from)?;
    let to = resolve(state, to)?;
    let proto = if proto == PROTO_ICMP && matches!(to.address.or(from.address), Some(IpAddr::V6(_)))
    {
        PROTO_ICMPV6
    } else {
        proto
    };
    let egress = from.pod.as_ref().map(|p| {
        side(
            &policies,
            &tier_pols,
            &blocks,
            p,
            Direction::Egress,
            &to,
            proto,
            port,
        )
    });
    let ingress = to.pod.as_ref().map(|p| {
        side(
            &policies,
            &tier_pols,
            &blocks,
            p,
            Direction::Ingress,
            &from,
            proto,
            port,
        )
    });
    let mut notes = Vec::new();
    for party in [&from, &to] {
        if party.pod.is_some() && party.endpoint_id.is_none() {
            notes.push(format!(
                "{} has a Pod object but no running endpoint on this node; the answer is what policy says once it runs",
                party.display
            ));
        }
        if party.pod.is_some() && party.address.is_none() {
            notes.push(format!(
                "{} has no known address, so ipBlock rules cannot match it",
                party.display
            ));
        }
    }
    if from.pod.is_none() && to.pod.is_none() {
        notes.push("neither end is a pod: palisade does not govern this traffic".into());
    }
    let allowed =
        egress.as_ref().is_none_or(|s| s.allowed) && ingress.as_ref().is_none_or(|s| s.allowed);
    Ok(Explanation {
        from,
        to,
        protocol: proto_name(proto),
        port: if matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
            port
        } else {
            0
        },
        allowed,
        egress,
        ingress,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        node::compile_state,
        policy::{Object, parse_documents},
        store::{Endpoint, Source, StoredPolicy},
    };

    fn state() -> State {
        let mut st = State::default();
        let mut add = |id: u32, name: &str, labels: &[(&str, &str)], addr: &str| {
            let ep = Endpoint {
                id,
                source: Source::Cni,
                network: "n".into(),
                container_id: name.into(),
                ifname: "eth0".into(),
                namespace: "default".into(),
                name: name.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                netns: String::new(),
                host_ifname: format!("veth{id}"),
                host_ifindex: 10 + id,
                addresses: vec![addr.parse().unwrap()],
                k8s: false,
                mac: None,
                attachment: crate::dataplane::Attachment::Tcx {
                    from_container: "/x".into(),
                    to_container: "/y".into(),
                },
                created: 0,
            };
            st.endpoints.insert(ep.key(), ep);
        };
        add(
            1,
            "api",
            &[("app", "bookstore"), ("role", "api")],
            "10.0.0.2",
        );
        add(
            2,
            "frontend",
            &[("app", "bookstore"), ("role", "frontend")],
            "10.0.0.3",
        );
        add(3, "coffee", &[("app", "coffeeshop")], "10.0.0.4");
        st.host_addresses = vec!["10.0.0.1".parse().unwrap()];
        let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-allow}
spec:
  podSelector: {matchLabels: {app: bookstore, role: api}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: bookstore}}}]
"#;
        for o in parse_documents(yaml, "t").unwrap() {
            if let Object::NetworkPolicy(np) = o {
                st.policies.insert(
                    "default/api-allow".into(),
                    StoredPolicy {
                        id: 1,
                        object: np.object,
                        policy: np.value,
                    },
                );
            }
        }
        compile_state(&mut st);
        st
    }

    #[test]
    fn names_the_policy_that_denies_and_the_one_that_allows() {
        let st = state();
        let p = |s: &str| PartyRef::parse(s).unwrap();
        let e = explain(&st, &p("default/coffee"), &p("default/api"), PROTO_TCP, 80).unwrap();
        assert!(!e.allowed);
        let ing = e.ingress.as_ref().unwrap();
        assert_eq!(ing.isolated_by, vec!["default/api-allow"]);
        assert!(
            ing.reason.contains("no rule of it allows default/coffee"),
            "{}",
            ing.reason
        );
        assert!(e.egress.as_ref().unwrap().allowed);
        let text = e.to_string();
        assert!(text.contains("DENIED"), "{text}");

        let e = explain(&st, &p("frontend"), &p("10.0.0.2"), PROTO_TCP, 80).unwrap();
        assert!(e.allowed);
        assert_eq!(
            e.ingress.as_ref().unwrap().allowed_by[0].policy,
            "default/api-allow"
        );
        assert_eq!(e.ingress.as_ref().unwrap().allowed_by[0].rule, "ingress[0]");

        // The node itself is never governed.
        let e = explain(&st, &p("10.0.0.1"), &p("default/api"), PROTO_TCP, 80).unwrap();
        assert!(e.allowed);
    }

    /// The tiers in explain: an admin Deny decides before the
    /// NetworkPolicy, a Pass hands over to it, the baseline decides only
    /// where no NetworkPolicy isolates, and an audited Deny is reported.
    #[test]
    fn names_the_deciding_tier_policy_and_rule() {
        use crate::store::StoredTierPolicy;
        let mut st = state();
        let yaml = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: guard}
spec:
  priority: 3
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {role: api}}}}
  ingress:
  - name: frontend-to-np
    action: Pass
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {role: frontend}}}}]
  - name: no-8080
    action: Deny
    from: [{namespaces: {}}]
    ports: [{portNumber: {port: 8080}}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default, annotations: {palisade.io/mode: audit}}
spec:
  subject: {namespaces: {}}
  ingress:
  - name: nothing-from-pods
    action: Deny
    from: [{namespaces: {}}]
"#;
        for (i, o) in parse_documents(yaml, "t").unwrap().into_iter().enumerate() {
            if let Object::TierPolicy(t) = o {
                st.tier_policies.insert(
                    format!("{}/{}", t.value.kind.as_str(), t.value.name),
                    StoredTierPolicy {
                        id: 10 + i as u32,
                        object: t.object,
                        policy: t.value,
                    },
                );
            }
        }
        compile_state(&mut st);
        let p = |s: &str| PartyRef::parse(s).unwrap();
        // coffee -> api:8080: the ANP's second rule, before any NetworkPolicy.
        let e = explain(&st, &p("coffee"), &p("api"), PROTO_TCP, 8080).unwrap();
        assert!(!e.allowed);
        let ing = e.ingress.as_ref().unwrap();
        assert_eq!(
            ing.reason,
            "denied by AdminNetworkPolicy/guard ingress[1] (no-8080) before any NetworkPolicy"
        );
        // frontend -> api:8080: passed on (rule 0 first), the NP allows.
        let e = explain(&st, &p("frontend"), &p("api"), PROTO_TCP, 8080).unwrap();
        assert!(e.allowed, "{e}");
        let ing = e.ingress.as_ref().unwrap();
        assert_eq!(ing.tiers[0].action, "Pass");
        assert_eq!(ing.allowed_by[0].policy, "default/api-allow");
        // coffee -> frontend: no NetworkPolicy isolates frontend; the
        // audited baseline would deny: allowed, reported as audit.
        let e = explain(&st, &p("coffee"), &p("frontend"), PROTO_TCP, 80).unwrap();
        assert!(e.allowed, "{e}");
        let ing = e.ingress.as_ref().unwrap();
        assert!(ing.audit, "{e}");
        assert!(
            ing.reason.contains("BaselineAdminNetworkPolicy/default ingress[0] (nothing-from-pods) (audit mode) would deny it"),
            "{}",
            ing.reason
        );
        assert!(e.to_string().contains("ALLOWED (audit mode"), "{e}");
    }

    #[test]
    fn pods_and_nodes_elsewhere_in_the_cluster_are_named_and_matched() {
        let mut st = state();
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: shop, namespace: default, \
                    labels: {app: bookstore}}\n";
        for o in parse_documents(yaml, "t").unwrap() {
            if let Object::Pod(pod) = o {
                st.pods.insert("default/shop".into(), *pod);
            }
        }
        st.remote.insert(
            "default/shop".into(),
            crate::store::RemotePod {
                id: 50,
                namespace: "default".into(),
                name: "shop".into(),
                node: "node-b".into(),
                addresses: vec!["10.1.0.5".parse().unwrap()],
            },
        );
        st.nodes.insert(
            "node-b".into(),
            crate::store::RemoteNode {
                name: "node-b".into(),
                addresses: vec!["192.168.250.2".parse().unwrap()],
                internal: Vec::new(),
                labels: Default::default(),
            },
        );
        let p = |s: &str| PartyRef::parse(s).unwrap();
        // The remote pod's labels come from its Pod object: the policy's
        // podSelector admits it.
        let e = explain(&st, &p("10.1.0.5"), &p("default/api"), PROTO_TCP, 80).unwrap();
        assert!(e.allowed, "{e}");
        assert_eq!(e.from.display, "default/shop (10.1.0.5, on node node-b)");
        // Another node is no pod: no selector admits it.
        let e = explain(&st, &p("192.168.250.2"), &p("default/api"), PROTO_TCP, 80).unwrap();
        assert!(!e.allowed, "{e}");
        assert_eq!(e.from.display, "192.168.250.2 (node node-b)");
    }

    #[test]
    fn parties_and_ports_parse_or_say_what_to_write() {
        assert_eq!(parse_port("80/TCP").unwrap(), (PROTO_TCP, 80));
        assert_eq!(parse_port("53/udp").unwrap(), (PROTO_UDP, 53));
        assert_eq!(parse_port("8080").unwrap(), (PROTO_TCP, 8080));
        assert_eq!(parse_port("icmp").unwrap(), (PROTO_ICMP, 0));
        assert!(
            parse_port("http")
                .unwrap_err()
                .to_string()
                .contains("PORT/PROTOCOL")
        );
        assert_eq!(
            PartyRef::parse("web").unwrap(),
            PartyRef::Pod {
                namespace: "default".into(),
                name: "web".into()
            }
        );
        assert!(PartyRef::parse("a/b/c").is_err());
        let st = state();
        let err = explain(
            &st,
            &PartyRef::parse("nope/x").unwrap(),
            &PartyRef::parse("api").unwrap(),
            PROTO_TCP,
            80,
        )
        .unwrap_err();
        assert!(err.to_string().contains("palisadectl get endpoints"));
    }
}
