//! The admin and baseline tiers resolved into policy entries.
//!
//! AdminNetworkPolicy, BaselineAdminNetworkPolicy and ClusterNetworkPolicy
//! rules are read in order (priority, then rule order) and the first rule
//! that matches a connection decides it. The datapath cannot walk rules, so
//! user space resolves them here, one *cell* at a time: one endpoint, one
//! direction, one tier and one exact peer identity. The rules that apply to
//! a cell, in precedence order, become entries whose longest match (the
//! datapath's search: one port, port blocks from the longest, all ports of
//! the protocol, all protocols) gives, for every protocol and port, the
//! action of the first matching rule. Where no rule matches but a shorter
//! entry would, an entry with verdict "none" says so, and the datapath goes
//! on to the next tier as it does on "pass".
//!
//! Rules of a policy in audit mode never decide: the rest of the rules do,
//! as if the audited ones were absent. An audited Deny that would have come
//! first is remembered on the entry ([`POLICY_F_AUDIT`], its policy in
//! `policy_id`): if the connection ends up allowed, the datapath reports it
//! as "audit" (would be denied) naming that policy.

use crate::{
    abi::{
        POLICY_F_AUDIT, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, PROTO_SCTP, PROTO_TCP,
        PROTO_UDP, PolicyValue, Verdict,
    },
    compile::port_prefixes,
};

pub use crate::policy::tier::Action;
use crate::{
    abi::{Direction, PolicyKey, PolicyKeyData, TIER_ADMIN, TIER_BASELINE},
    compile::{PeerFacts, peer_matches},
    policy::{
        IpBlock, Labels, Mode, NamedPort, Peer, Protocol,
        tier::{Tier, TierPeer, TierPolicy, TierPort},
    },
};

/// The tiers and their `PAL_TIER_*` numbers.
pub const TIERS: [(Tier, u8); 2] = [(Tier::Admin, TIER_ADMIN), (Tier::Baseline, TIER_BASELINE)];

/// A tier policy as the compilers take it: its id and effective mode.
#[derive(Debug, Clone, Copy)]
pub struct TierRef<'a> {
    pub id: u32,
    pub policy: &'a TierPolicy,
    pub audit: bool,
}

impl<'a> TierRef<'a> {
    pub fn new(id: u32, policy: &'a TierPolicy, node_mode: Mode) -> Self {
        Self {
            id,
            policy,
            audit: policy.mode.unwrap_or(node_mode) == Mode::Audit,
        }
    }
}

/// Sort into precedence order (see [`TierPolicy::rank`]).
pub fn sort(pols: &mut [TierRef<'_>]) {
    pols.sort_by(|a, b| a.policy.rank().cmp(&b.policy.rank()));
}

/// Whether a tier policy applies to a pod in namespace `ns` (with
/// `ns_labels`) labelled `labels`.
pub fn selects(p: &TierPolicy, ns_labels: &Labels, labels: &Labels) -> bool {
    p.subject.namespaces.matches(ns_labels) && p.subject.pods.matches(labels)
}

/// Whether a rule peer matches a peer identity (`nodes` peers: another
/// node's address, by its Node's labels).
pub fn peer_matches_identity(peer: &TierPeer, facts: &PeerFacts<'_>) -> bool {
    match peer {
        TierPeer::Peer(p) => peer_matches(p, "", facts),
        TierPeer::Nodes(sel) => facts.node.is_some_and(|labels| sel.matches(labels)),
    }
}

/// The rules of `pols` (those that select the endpoint, in precedence
/// order) for one cell: tier, direction and peer. Named ports resolve on
/// the destination: the endpoint's own ports for ingress, the peer's
/// (`peer_port`) for egress.
pub fn cell_rules(
    pols: &[TierRef<'_>],
    tier: Tier,
    dir: Direction,
    ep_ports: &[NamedPort],
    peer: &PeerFacts<'_>,
    peer_port: &dyn Fn(&str, Protocol) -> Option<u16>,
) -> Vec<CellRule> {
    let mut out = Vec::new();
    for t in pols.iter().filter(|t| t.policy.tier == tier) {
        let rules = match dir {
            Direction::Ingress => &t.policy.ingress,
            Direction::Egress => &t.policy.egress,
        };
        for r in rules {
            if !r.peers.iter().any(|p| peer_matches_identity(p, peer)) {
                continue;
            }
            let traffic = match &r.ports {
                None => Traffic::All,
                Some(ports) => {
                    let mut items = Vec::new();
                    for p in ports {
                        match p {
                            TierPort::Range(proto, a, b) => items.push((proto.number(), *a, *b)),
                            TierPort::Named(name) if dir == Direction::Ingress => items.extend(
                                ep_ports
                                    .iter()
                                    .filter(|np| &np.name == name)
                                    .map(|np| (np.protocol.number(), np.port, np.port)),
                            ),
                            TierPort::Named(name) => {
                                for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                                    if let Some(n) = peer_port(name, proto) {
                                        items.push((proto.number(), n, n));
                                    }
                                }
                            }
                        }
                    }
                    Traffic::Ports(items)
                }
            };
            out.push(CellRule {
                action: r.action,
                traffic,
                policy_id: t.id,
                audit: t.audit,
            });
        }
    }
    out
}

/// A cell's entries as policy map keys and values.
pub fn cell_entries(
    ep_id: u32,
    dir: Direction,
    tier: u8,
    peer_id: u32,
    rules: &[CellRule],
) -> Vec<(PolicyKey, PolicyValue)> {
    resolve(rules)
        .into_iter()
        .map(|e| {
            (
                PolicyKey {
                    prefixlen: e.prefixlen,
                    data: PolicyKeyData {
                        ep_id,
                        direction: dir as u8,
                        tier,
                        pad1: 0,
                        peer_id,
                        pad2: 0,
                        protocol: e.protocol,
                        dport_be: e.port.to_be(),
                    },
                },
                e.value,
            )
        })
        .collect()
}

/// The `PAL_EP_*` flag an endpoint needs for entries of this tier and
/// direction.
pub fn ep_flag(tier: u8, dir: u8) -> u32 {
    use crate::abi::{EP_ADMIN_EGRESS, EP_ADMIN_INGRESS, EP_BASELINE_EGRESS, EP_BASELINE_INGRESS};
    let egress = dir == Direction::Egress as u8;
    match (tier == TIER_ADMIN, egress) {
        (true, false) => EP_ADMIN_INGRESS,
        (true, true) => EP_ADMIN_EGRESS,
        (false, false) => EP_BASELINE_INGRESS,
        (false, true) => EP_BASELINE_EGRESS,
    }
}

/// The `networks` CIDRs of tier policies, as ipBlocks (they refine
/// identities like NetworkPolicy's ipBlocks).
pub fn blocks(p: &TierPolicy) -> Vec<IpBlock> {
    let mut out: Vec<IpBlock> = p
        .ingress
        .iter()
        .chain(&p.egress)
        .flat_map(|r| &r.peers)
        .filter_map(|peer| match peer {
            TierPeer::Peer(Peer::IpBlock(b)) => Some(b.clone()),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Named ports egress rules resolve on peers, for every protocol (a tier
/// policy's named port takes the container port's protocol).
pub fn egress_names(p: &TierPolicy) -> Vec<(String, Protocol)> {
    let mut out: Vec<(String, Protocol)> = p
        .egress
        .iter()
        .flat_map(|r| r.ports.iter().flatten())
        .filter_map(|port| match port {
            TierPort::Named(n) => Some(n),
            TierPort::Range(..) => None,
        })
        .flat_map(|n| {
            [Protocol::Tcp, Protocol::Udp, Protocol::Sctp].map(|proto| (n.clone(), proto))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The protocols whose ports tier rules can name.
pub const PORT_PROTOCOLS: [u8; 3] = [PROTO_TCP, PROTO_UDP, PROTO_SCTP];

/// The traffic a rule matches towards one peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Traffic {
    /// Every protocol and port (a rule without ports).
    All,
    /// These inclusive port ranges of these protocols (`PORT_PROTOCOLS`);
    /// named ports already resolved for the peer. Empty matches nothing.
    Ports(Vec<(u8, u16, u16)>),
}

/// One rule as it applies to a cell, in precedence order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CellRule {
    pub action: Action,
    pub traffic: Traffic,
    /// The rule's policy (what flow records and `explain` name).
    pub policy_id: u32,
    /// The policy is in audit mode.
    pub audit: bool,
}

/// The answer for one protocol and port: the first enforced rule's action
/// (if any rule matches) and the first audited Deny before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    pub decided: Option<(Action, u32)>,
    pub audit_deny: Option<u32>,
}

impl Outcome {
    /// The entry that stores this outcome.
    pub fn value(self) -> PolicyValue {
        let verdict = match self.decided {
            Some((Action::Allow, _)) => Verdict::Allow,
            Some((Action::Deny, _)) => Verdict::Deny,
            Some((Action::Pass, _)) => Verdict::Pass,
            None => Verdict::None,
        };
        let (policy_id, flags) = match (self.audit_deny, self.decided) {
            // An enforced Deny stands; the audited one changes nothing.
            (Some(audit), d) if !matches!(d, Some((Action::Deny, _))) => (audit, POLICY_F_AUDIT),
            (_, Some((_, id))) => (id, 0),
            (_, None) => (0, 0),
        };
        PolicyValue {
            policy_id,
            verdict: verdict as u8,
            flags,
            pad: 0,
        }
    }
}

/// Whether `t` matches protocol `proto`, port `port` (0 for protocols
/// without ports).
fn covers(t: &Traffic, proto: u8, port: u16) -> bool {
    match t {
        Traffic::All => true,
        Traffic::Ports(items) => items
            .iter()
            .any(|&(p, start, end)| p == proto && (start..=end).contains(&port)),
    }
}

/// First match, the reference meaning of a cell: what the entries must
/// reproduce for every protocol and port.
pub fn evaluate(rules: &[CellRule], proto: u8, port: u16) -> Outcome {
    let mut out = Outcome::default();
    for r in rules.iter().filter(|r| covers(&r.traffic, proto, port)) {
        if r.audit {
            if r.action == Action::Deny && out.audit_deny.is_none() {
                out.audit_deny = Some(r.policy_id);
            }
            continue;
        }
        out.decided = Some((r.action, r.policy_id));
        break;
    }
    out
}

/// One entry of a cell: prefix length, protocol (0 with
/// `POLICY_PREFIX_ANY_PROTO`), first port of the block, value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellEntry {
    pub prefixlen: u32,
    pub protocol: u8,
    pub port: u16,
    pub value: PolicyValue,
}

/// The entries of one cell. Empty when no rule can match.
pub fn resolve(rules: &[CellRule]) -> Vec<CellEntry> {
    let mut out = Vec::new();
    if rules.is_empty() {
        return out;
    }
    // Every protocol without ports (and any protocol the rules do not
    // name) follows the first rule that matches all traffic.
    let other = evaluate(rules, 0, 0);
    let nothing = Outcome::default();
    if other != nothing {
        out.push(CellEntry {
            prefixlen: POLICY_PREFIX_ANY_PROTO,
            protocol: 0,
            port: 0,
            value: other.value(),
        });
    }
    for proto in PORT_PROTOCOLS {
        let named = rules.iter().any(|r| match &r.traffic {
            Traffic::All => false,
            Traffic::Ports(items) => items.iter().any(|i| i.0 == proto),
        });
        if !named {
            // Only all-traffic rules reach this protocol: the entry for
            // all protocols answers it.
            continue;
        }
        let pieces = pieces(rules, proto);
        // The background for the protocol: the outcome covering the most
        // ports, so that exceptions are few.
        let mut weights: Vec<(Outcome, u32)> = Vec::new();
        for &(start, end, o) in &pieces {
            let n = u32::from(end) - u32::from(start) + 1;
            match weights.iter_mut().find(|(w, _)| *w == o) {
                Some((_, total)) => *total += n,
                None => weights.push((o, n)),
            }
        }
        let background = weights
            .iter()
            .max_by_key(|(_, n)| *n)
            .map(|(o, _)| *o)
            .unwrap_or_default();
        if background != other {
            out.push(CellEntry {
                prefixlen: POLICY_PREFIX_ANY_PORT,
                protocol: proto,
                port: 0,
                value: background.value(),
            });
        }
        for (start, end, o) in pieces {
            if o == background {
                continue;
            }
            for (port, bits) in port_prefixes(start, end) {
                out.push(CellEntry {
                    prefixlen: POLICY_PREFIX_ANY_PORT + bits,
                    protocol: proto,
                    port,
                    value: o.value(),
                });
            }
        }
    }
    out
}

/// The ports 0..=65535 of `proto` cut where the outcome changes, as
/// (first, last, outcome), in order.
fn pieces(rules: &[CellRule], proto: u8) -> Vec<(u16, u16, Outcome)> {
    // The outcome can only change at the edges of the rules' ranges.
    let mut cuts = vec![0u32, 1 << 16];
    for r in rules {
        if let Traffic::Ports(items) = &r.traffic {
            for &(p, start, end) in items {
                if p == proto {
                    cuts.push(u32::from(start));
                    cuts.push(u32::from(end) + 1);
                }
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(u16, u16, Outcome)> = Vec::new();
    for w in cuts.windows(2) {
        let (start, end) = (w[0] as u16, (w[1] - 1) as u16);
        let o = evaluate(rules, proto, start);
        match out.last_mut() {
            Some(last) if last.2 == o && u32::from(last.1) + 1 == u32::from(start) => last.1 = end,
            _ => out.push((start, end, o)),
        }
    }
    out
}

/// What the datapath finds among a cell's entries: the longest entry for
/// (proto, port), as `pal_policy_search` tries them (port 0 for protocols
/// without ports).
pub fn lookup(entries: &[CellEntry], proto: u8, port: u16) -> Option<PolicyValue> {
    let mut best: Option<&CellEntry> = None;
    for e in entries {
        let hit = if e.prefixlen == POLICY_PREFIX_ANY_PROTO {
            true
        } else if e.protocol != proto {
            false
        } else {
            let bits = e.prefixlen - POLICY_PREFIX_ANY_PORT;
            let mask = if bits == 0 {
                0
            } else {
                u16::MAX << (16 - bits)
            };
            port & mask == e.port
        };
        if hit && best.is_none_or(|b| e.prefixlen > b.prefixlen) {
            best = Some(e);
        }
    }
    best.map(|e| e.value)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ports(items: &[(u8, u16, u16)]) -> Traffic {
        Traffic::Ports(items.to_vec())
    }

    fn rule(action: Action, traffic: Traffic, policy_id: u32) -> CellRule {
        CellRule {
            action,
            traffic,
            policy_id,
            audit: false,
        }
    }

    /// What the datapath concludes from a cell: a final verdict, or none
    /// (go on to the next tier).
    fn found(entries: &[CellEntry], proto: u8, port: u16) -> PolicyValue {
        lookup(entries, proto, port).unwrap_or_default()
    }

    #[test]
    fn a_later_wider_rule_does_not_override_an_earlier_narrower_one() {
        // Allow TCP 80 first, then deny everything: 80 allowed, the rest
        // denied, ICMP denied.
        let rules = [
            rule(Action::Allow, ports(&[(PROTO_TCP, 80, 80)]), 1),
            rule(Action::Deny, Traffic::All, 2),
        ];
        let e = resolve(&rules);
        assert_eq!(found(&e, PROTO_TCP, 80).verdict, Verdict::Allow as u8);
        assert_eq!(found(&e, PROTO_TCP, 80).policy_id, 1);
        assert_eq!(found(&e, PROTO_TCP, 81).verdict, Verdict::Deny as u8);
        assert_eq!(found(&e, PROTO_UDP, 80).verdict, Verdict::Deny as u8);
        assert_eq!(found(&e, 1, 0).verdict, Verdict::Deny as u8);
    }

    #[test]
    fn an_earlier_wider_rule_shadows_a_later_narrower_one() {
        // Pass all TCP first: a later deny of TCP 22 never decides; UDP 53
        // is denied; what no rule matches stays undecided ("none"), also
        // where a shorter entry exists.
        let rules = [
            rule(Action::Pass, ports(&[(PROTO_TCP, 0, 65535)]), 1),
            rule(Action::Deny, ports(&[(PROTO_TCP, 22, 22)]), 2),
            rule(Action::Deny, ports(&[(PROTO_UDP, 53, 53)]), 3),
        ];
        let e = resolve(&rules);
        assert_eq!(found(&e, PROTO_TCP, 22).verdict, Verdict::Pass as u8);
        assert_eq!(found(&e, PROTO_UDP, 53).verdict, Verdict::Deny as u8);
        assert_eq!(found(&e, PROTO_UDP, 54).verdict, Verdict::None as u8);
        assert_eq!(found(&e, 1, 0).verdict, Verdict::None as u8);
        assert!(e.len() <= 3, "one entry per protocol suffices here: {e:?}");
    }

    #[test]
    fn ranges_become_aligned_blocks_with_exceptions_cut_out() {
        // Deny 1000-1999 but allow 1500 (first): 1500 allowed, 1000 and
        // 1999 denied, 999 and 2000 undecided.
        let rules = [
            rule(Action::Allow, ports(&[(PROTO_TCP, 1500, 1500)]), 1),
            rule(Action::Deny, ports(&[(PROTO_TCP, 1000, 1999)]), 2),
        ];
        let e = resolve(&rules);
        for (port, want) in [
            (1500, Verdict::Allow),
            (1000, Verdict::Deny),
            (1999, Verdict::Deny),
            (1499, Verdict::Deny),
            (1501, Verdict::Deny),
            (999, Verdict::None),
            (2000, Verdict::None),
        ] {
            assert_eq!(
                found(&e, PROTO_TCP, port).verdict,
                want as u8,
                "port {port}"
            );
        }
    }

    #[test]
    fn audited_denies_never_decide_but_mark_what_would_have_been_denied() {
        let audited = CellRule {
            audit: true,
            ..rule(Action::Deny, ports(&[(PROTO_TCP, 80, 80)]), 7)
        };
        let rules = [audited, rule(Action::Allow, Traffic::All, 8)];
        let e = resolve(&rules);
        let v = found(&e, PROTO_TCP, 80);
        assert_eq!(
            (v.verdict, v.flags, v.policy_id),
            (Verdict::Allow as u8, POLICY_F_AUDIT, 7),
            "allowed by 8, reported as denied by the audited 7"
        );
        let v = found(&e, PROTO_TCP, 81);
        assert_eq!(
            (v.verdict, v.flags, v.policy_id),
            (Verdict::Allow as u8, 0, 8)
        );
        // An enforced deny after the audited one simply denies.
        let rules = [audited_deny_all(7), rule(Action::Deny, Traffic::All, 9)];
        let v = found(&resolve(&rules), PROTO_UDP, 5);
        assert_eq!(
            (v.verdict, v.flags, v.policy_id),
            (Verdict::Deny as u8, 0, 9)
        );
    }

    fn audited_deny_all(id: u32) -> CellRule {
        CellRule {
            audit: true,
            ..rule(Action::Deny, Traffic::All, id)
        }
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![Just(Action::Allow), Just(Action::Deny), Just(Action::Pass)]
    }

    /// Ports near a few edges, so that ranges overlap often.
    fn port() -> impl Strategy<Value = u16> {
        prop_oneof![
            0u16..8,
            78u16..86,
            1020u16..1030,
            65530u16..=65535,
            any::<u16>()
        ]
    }

    fn traffic() -> impl Strategy<Value = Traffic> {
        let item = (
            prop::sample::select(PORT_PROTOCOLS.to_vec()),
            port(),
            port(),
        )
            .prop_map(|(p, a, b)| (p, a.min(b), a.max(b)));
        prop_oneof![
            1 => Just(Traffic::All),
            4 => prop::collection::vec(item, 0..4).prop_map(Traffic::Ports),
        ]
    }

    fn cell_rule() -> impl Strategy<Value = CellRule> {
        (action(), traffic(), 1u32..6, prop::bool::weighted(0.2)).prop_map(
            |(action, traffic, policy_id, audit)| CellRule {
                action,
                traffic,
                policy_id,
                audit,
            },
        )
    }

    proptest! {
        /// The entries answer every protocol and port as first match does.
        #[test]
        fn entries_agree_with_first_match(rules in prop::collection::vec(cell_rule(), 0..7)) {
            let entries = resolve(&rules);
            let mut probes: Vec<u16> = vec![0, 1, 65535];
            for r in &rules {
                if let Traffic::Ports(items) = &r.traffic {
                    for &(_, s, e) in items {
                        probes.extend([s, e, s.saturating_sub(1), e.saturating_add(1)]);
                    }
                }
            }
            for proto in PORT_PROTOCOLS {
                for &p in &probes {
                    let want = evaluate(&rules, proto, p).value();
                    prop_assert_eq!(found(&entries, proto, p), want, "proto {} port {}", proto, p);
                }
            }
            for proto in [1u8, 58, 47] {
                let want = evaluate(&rules, proto, 0).value();
                prop_assert_eq!(found(&entries, proto, 0), want, "proto {}", proto);
            }
        }
    }
}
