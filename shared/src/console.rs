//! The web console's traffic map: flow records merged into connections,
//! then into nodes (pods, or their workloads or namespaces when there are
//! too many to draw) and edges by verdict, and the difference between two
//! maps that the console streams to browsers. Pure: the server in
//! `palisadectl` reads the records and the store, this module decides
//! what the map shows.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{
    abi::Verdict,
    flows::{FlowParty, FlowRecord, connections},
    learn::selector_of,
    policy::Labels,
};

/// With more pods than this, a map whose level is not chosen shows
/// workloads; with more workloads than this, namespaces.
pub const AUTO_LIMIT: usize = 300;

/// What a map node stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Pod,
    Workload,
    Namespace,
}

impl Level {
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        match s {
            "" | "auto" => Ok(None),
            "pod" => Ok(Some(Self::Pod)),
            "workload" => Ok(Some(Self::Workload)),
            "namespace" => Ok(Some(Self::Namespace)),
            other => Err(format!(
                "level {other:?}: use auto, pod, workload or namespace"
            )),
        }
    }
}

/// What the console knows of a pod beyond its flow records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMeta {
    /// How palisade learned of it: the CNI plugin (with the network's
    /// name) or the OCI hook; empty for pods of other nodes.
    pub runtime: String,
    /// The node it runs on.
    pub node: String,
}

/// Which records and edges a map shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct View {
    /// `None`: chosen by size ([`AUTO_LIMIT`]).
    pub level: Option<Level>,
    /// Only edges with a side in this namespace.
    pub namespace: Option<String>,
    /// Only edges of this pod (`ns/name`).
    pub pod: Option<String>,
    /// Only edges with this verdict (a connection's verdict is the worst
    /// any side gave).
    pub verdict: Option<Verdict>,
    /// Only connections to this port.
    pub port: Option<u16>,
}

impl View {
    fn keeps_record(&self, r: &FlowRecord) -> bool {
        crate::flows::Filter {
            verdict: None,
            pod: self.pod.clone(),
            namespace: self.namespace.clone(),
            port: self.port,
        }
        .matches(r)
    }
}

/// A node of the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MapNode {
    pub id: String,
    pub label: String,
    /// The box it is drawn in: its namespace, `node`, `nodes` or `outside`.
    pub group: String,
    /// `pod`, `workload`, `namespace`, `host`, `node` or `outside`.
    pub kind: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Pods it stands for (1 for a pod).
    pub pods: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<PodMeta>,
    /// The DNS names an outside address was looked up by.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
}

/// An edge: the connections from one node to another with one verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MapEdge {
    pub id: String,
    pub from: String,
    pub to: String,
    pub verdict: Verdict,
    /// `80/TCP`, `ICMP`, ...
    pub ports: BTreeSet<String>,
    /// Connections seen.
    pub connections: u64,
}

/// The whole map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Map {
    pub level: Option<Level>,
    pub nodes: BTreeMap<String, MapNode>,
    pub edges: BTreeMap<String, MapEdge>,
}

/// The id of the edge from `from` to `to` with `verdict`.
pub fn edge_id(from: &str, to: &str, verdict: Verdict) -> String {
    format!("{from}>{to}>{}", verdict.as_str())
}

fn pod_key(p: &FlowParty) -> Option<String> {
    match (&p.namespace, &p.name) {
        (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
        _ => None,
    }
}

/// The map node a flow's side belongs to at `level`.
pub fn node_of(p: &FlowParty, level: Level, meta: &BTreeMap<String, PodMeta>) -> MapNode {
    let outside = |id: String, label: String| MapNode {
        id,
        label,
        group: "outside".into(),
        kind: "outside".into(),
        labels: Labels::new(),
        pods: 0,
        meta: None,
        domains: p.domains.clone(),
    };
    let (Some(ns), Some(name)) = (&p.namespace, &p.name) else {
        return match (p.kind.as_str(), &p.name) {
            ("host", _) => MapNode {
                id: "host".into(),
                label: "this node".into(),
                group: "node".into(),
                kind: "host".into(),
                labels: Labels::new(),
                pods: 0,
                meta: None,
                domains: Vec::new(),
            },
            ("node", Some(n)) => MapNode {
                id: format!("node:{n}"),
                label: format!("node {n}"),
                group: "nodes".into(),
                kind: "node".into(),
                labels: Labels::new(),
                pods: 0,
                meta: None,
                domains: Vec::new(),
            },
            _ if level == Level::Namespace => outside("outside".into(), "outside".into()),
            _ => outside(format!("ext:{}", p.address), p.address.to_string()),
        };
    };
    let pod = || MapNode {
        id: format!("pod:{ns}/{name}"),
        label: name.clone(),
        group: ns.clone(),
        kind: "pod".into(),
        labels: p.labels.clone(),
        pods: 1,
        meta: meta.get(&format!("{ns}/{name}")).cloned(),
        domains: Vec::new(),
    };
    match level {
        Level::Pod => pod(),
        Level::Workload => {
            let selector = selector_of(&p.labels);
            if selector.is_empty() {
                return pod();
            }
            let text = selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let label = ["app.kubernetes.io/name", "app", "k8s-app", "name"]
                .iter()
                .find_map(|k| selector.get(*k).cloned())
                .unwrap_or_else(|| text.clone());
            MapNode {
                id: format!("wl:{ns}/{text}"),
                label,
                group: ns.clone(),
                kind: "workload".into(),
                labels: selector,
                pods: 0,
                meta: None,
                domains: Vec::new(),
            }
        }
        Level::Namespace => MapNode {
            id: format!("ns:{ns}"),
            label: ns.clone(),
            group: ns.clone(),
            kind: "namespace".into(),
            labels: Labels::new(),
            pods: 0,
            meta: None,
            domains: Vec::new(),
        },
    }
}

fn port_text(protocol: &str, dport: u16) -> String {
    if dport == 0 {
        protocol.to_owned()
    } else {
        format!("{dport}/{protocol}")
    }
}

/// The level a map of these records is drawn at when none is chosen.
fn auto_level(records: &[&FlowRecord]) -> Level {
    let mut pods = BTreeSet::new();
    let mut workloads = BTreeSet::new();
    for r in records {
        for p in [&r.endpoint, &r.peer] {
            if let Some(k) = pod_key(p) {
                pods.insert(k);
                let sel = selector_of(&p.labels);
                workloads.insert((p.namespace.clone(), sel));
            }
        }
    }
    if pods.len() <= AUTO_LIMIT {
        Level::Pod
    } else if workloads.len() <= AUTO_LIMIT {
        Level::Workload
    } else {
        Level::Namespace
    }
}

/// Build the map of `records` (already cut to the time window) as `view`
/// asks. Connection records (not DNS or HTTP ones) make the edges.
pub fn build<'a>(
    records: impl IntoIterator<Item = &'a FlowRecord>,
    view: &View,
    meta: &BTreeMap<String, PodMeta>,
) -> Map {
    let kept: Vec<&FlowRecord> = records
        .into_iter()
        .filter(|r| r.dns.is_none() && r.http.is_none() && view.keeps_record(r))
        .collect();
    let level = view.level.unwrap_or_else(|| auto_level(&kept));
    let mut map = Map {
        level: Some(level),
        ..Default::default()
    };
    let mut members: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in connections(kept) {
        if view.verdict.is_some_and(|v| v != c.verdict) {
            continue;
        }
        let (from, to) = (
            node_of(&c.client, level, meta),
            node_of(&c.server, level, meta),
        );
        let id = edge_id(&from.id, &to.id, c.verdict);
        let edge = map.edges.entry(id.clone()).or_insert_with(|| MapEdge {
            id,
            from: from.id.clone(),
            to: to.id.clone(),
            verdict: c.verdict,
            ports: BTreeSet::new(),
            connections: 0,
        });
        edge.ports.insert(port_text(&c.protocol, c.dport));
        edge.connections += 1;
        for (n, p) in [(from, &c.client), (to, &c.server)] {
            if let Some(k) = pod_key(p) {
                members.entry(n.id.clone()).or_default().insert(k);
            }
            map.nodes.entry(n.id.clone()).or_insert(n);
        }
    }
    for (id, pods) in members {
        if let Some(n) = map.nodes.get_mut(&id) {
            n.pods = pods.len();
        }
    }
    map
}

/// The records behind one edge of a map built with `view` (newest last),
/// at most `limit` of them: the records of the connections between its
/// two nodes whose verdict (the worst of both sides) is the edge's.
pub fn edge_records<'a>(
    records: impl IntoIterator<Item = &'a FlowRecord>,
    view: &View,
    level: Level,
    edge: &MapEdge,
    limit: usize,
) -> Vec<&'a FlowRecord> {
    let none = BTreeMap::new();
    let between: Vec<&FlowRecord> = records
        .into_iter()
        .filter(|r| r.dns.is_none() && r.http.is_none() && view.keeps_record(r))
        .filter(|r| {
            node_of(r.client(), level, &none).id == edge.from
                && node_of(r.server(), level, &none).id == edge.to
        })
        .collect();
    let key = |r: &FlowRecord| {
        (
            r.client().address,
            r.sport,
            r.server().address,
            r.dport,
            r.protocol.clone(),
        )
    };
    let verdicts: BTreeMap<_, Verdict> = connections(between.iter().copied())
        .into_iter()
        .map(|c| {
            (
                (
                    c.client.address,
                    c.sport,
                    c.server.address,
                    c.dport,
                    c.protocol,
                ),
                c.verdict,
            )
        })
        .collect();
    let mut out: Vec<&FlowRecord> = between
        .into_iter()
        .filter(|r| verdicts.get(&key(r)) == Some(&edge.verdict))
        .collect();
    let skip = out.len().saturating_sub(limit);
    out.drain(..skip);
    out
}

/// What changed from one map to the next, as the console streams it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Delta {
    /// The browser drops what it has first (the first message, or a
    /// change of level).
    pub full: bool,
    pub level: Option<Level>,
    pub nodes: Vec<MapNode>,
    pub edges: Vec<MapEdge>,
    pub removed_nodes: Vec<String>,
    pub removed_edges: Vec<String>,
}

/// The change from `old` (what the browser has) to `new`, or `None` when
/// there is none.
pub fn diff(old: Option<&Map>, new: &Map) -> Option<Delta> {
    let Some(old) = old.filter(|o| o.level == new.level) else {
        return Some(Delta {
            full: true,
            level: new.level,
            nodes: new.nodes.values().cloned().collect(),
            edges: new.edges.values().cloned().collect(),
            removed_nodes: Vec::new(),
            removed_edges: Vec::new(),
        });
    };
    let d = Delta {
        full: false,
        level: new.level,
        nodes: new
            .nodes
            .values()
            .filter(|n| old.nodes.get(&n.id) != Some(n))
            .cloned()
            .collect(),
        edges: new
            .edges
            .values()
            .filter(|e| old.edges.get(&e.id) != Some(e))
            .cloned()
            .collect(),
        removed_nodes: old
            .nodes
            .keys()
            .filter(|k| !new.nodes.contains_key(*k))
            .cloned()
            .collect(),
        removed_edges: old
            .edges
            .keys()
            .filter(|k| !new.edges.contains_key(*k))
            .cloned()
            .collect(),
    };
    let empty = d.nodes.is_empty()
        && d.edges.is_empty()
        && d.removed_nodes.is_empty()
        && d.removed_edges.is_empty();
    (!empty).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{Direction, Reason};

    fn pod(ns: &str, name: &str, addr: &str, labels: &[(&str, &str)]) -> FlowParty {
        FlowParty {
            kind: "pod".into(),
            address: addr.parse().unwrap(),
            namespace: Some(ns.into()),
            name: Some(name.into()),
            identity: 0,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            domains: Vec::new(),
        }
    }

    fn record(
        direction: Direction,
        endpoint: &FlowParty,
        peer: &FlowParty,
        verdict: Verdict,
        sport: u16,
        dport: u16,
    ) -> FlowRecord {
        FlowRecord {
            time: String::new(),
            kind: "flow".into(),
            verdict,
            reason: Reason::Policy,
            direction,
            endpoint: endpoint.clone(),
            peer: peer.clone(),
            protocol: "TCP".into(),
            sport,
            dport,
            policy: None,
            tier: None,
            isolated_by: vec![],
            dns: None,
            http: None,
        }
    }

    /// Two web pods of one workload call the api; one connection is
    /// denied at the api's ingress after the web's egress allowed it.
    fn shop() -> Vec<FlowRecord> {
        let web1 = pod(
            "shop",
            "web-1",
            "10.0.0.2",
            &[("app", "web"), ("pod-template-hash", "a1")],
        );
        let web2 = pod(
            "shop",
            "web-2",
            "10.0.0.3",
            &[("app", "web"), ("pod-template-hash", "b2")],
        );
        let api = pod("shop", "api", "10.0.0.4", &[("app", "api")]);
        let db = pod("data", "db", "10.0.1.5", &[("app", "db")]);
        vec![
            record(Direction::Egress, &web1, &api, Verdict::Allow, 1000, 80),
            record(Direction::Ingress, &api, &web1, Verdict::Allow, 1000, 80),
            record(Direction::Egress, &web2, &api, Verdict::Allow, 1001, 80),
            record(Direction::Ingress, &api, &web2, Verdict::Deny, 1001, 80),
            record(Direction::Egress, &api, &db, Verdict::Audit, 1002, 5432),
        ]
    }

    #[test]
    fn a_connection_takes_the_worst_verdict_of_its_two_sides() {
        let map = build(&shop(), &View::default(), &BTreeMap::new());
        assert_eq!(map.level, Some(Level::Pod));
        let edges: BTreeSet<&str> = map.edges.keys().map(String::as_str).collect();
        assert_eq!(
            edges,
            [
                "pod:shop/web-1>pod:shop/api>allowed",
                "pod:shop/web-2>pod:shop/api>denied",
                "pod:shop/api>pod:data/db>audit",
            ]
            .into()
        );
        let e = &map.edges["pod:shop/api>pod:data/db>audit"];
        assert_eq!(e.ports, ["5432/TCP".to_owned()].into());
        assert_eq!(e.connections, 1);
        assert_eq!(map.nodes["pod:data/db"].group, "data");
    }

    #[test]
    fn workloads_gather_their_pods_and_keep_each_verdict_apart() {
        let view = View {
            level: Some(Level::Workload),
            ..Default::default()
        };
        let map = build(&shop(), &view, &BTreeMap::new());
        let web = &map.nodes["wl:shop/app=web"];
        assert_eq!((web.label.as_str(), web.pods), ("web", 2));
        assert!(
            map.edges
                .contains_key("wl:shop/app=web>wl:shop/app=api>allowed")
        );
        assert!(
            map.edges
                .contains_key("wl:shop/app=web>wl:shop/app=api>denied")
        );
        let ns = build(
            &shop(),
            &View {
                level: Some(Level::Namespace),
                ..Default::default()
            },
            &BTreeMap::new(),
        );
        assert_eq!(ns.nodes["ns:shop"].pods, 3);
        assert!(ns.edges.contains_key("ns:shop>ns:data>audit"));
    }

    #[test]
    fn filters_cut_edges_by_verdict_namespace_pod_and_port() {
        let meta = BTreeMap::new();
        let only = |view: View| -> BTreeSet<String> {
            build(&shop(), &view, &meta).edges.into_keys().collect()
        };
        // The verdict is the connection's, not a record's: web-2's
        // connection is denied though its egress record says allowed.
        assert_eq!(
            only(View {
                verdict: Some(Verdict::Allow),
                ..Default::default()
            }),
            ["pod:shop/web-1>pod:shop/api>allowed".to_owned()].into()
        );
        assert_eq!(
            only(View {
                namespace: Some("data".into()),
                ..Default::default()
            }),
            ["pod:shop/api>pod:data/db>audit".to_owned()].into()
        );
        assert_eq!(
            only(View {
                pod: Some("shop/web-2".into()),
                ..Default::default()
            }),
            ["pod:shop/web-2>pod:shop/api>denied".to_owned()].into()
        );
        assert_eq!(
            only(View {
                port: Some(5432),
                ..Default::default()
            })
            .len(),
            1
        );
    }

    #[test]
    fn many_pods_are_drawn_as_workloads_unless_a_level_is_chosen() {
        let api = pod("shop", "api", "10.0.0.4", &[("app", "api")]);
        let records: Vec<FlowRecord> = (0..=AUTO_LIMIT)
            .map(|i| {
                let web = pod(
                    "shop",
                    &format!("web-{i}"),
                    &format!("10.0.{}.{}", 2 + i / 250, 1 + i % 250),
                    &[("app", "web"), ("pod-template-hash", &format!("h{i}"))],
                );
                record(Direction::Egress, &web, &api, Verdict::Allow, 1000, 80)
            })
            .collect();
        let map = build(&records, &View::default(), &BTreeMap::new());
        assert_eq!(map.level, Some(Level::Workload));
        assert_eq!(map.nodes.len(), 2);
        assert_eq!(map.nodes["wl:shop/app=web"].pods, AUTO_LIMIT + 1);
        let pods = build(
            &records,
            &View {
                level: Some(Level::Pod),
                ..Default::default()
            },
            &BTreeMap::new(),
        );
        assert_eq!(pods.nodes.len(), AUTO_LIMIT + 2);
    }

    #[test]
    fn a_diff_carries_only_what_changed_and_nothing_when_nothing_did() {
        let meta = BTreeMap::new();
        let records = shop();
        let before = build(&records[..2], &View::default(), &meta);
        let first = diff(None, &before).unwrap();
        assert!(first.full);
        assert_eq!(first.edges.len(), 1);
        assert_eq!(diff(Some(&before), &before), None);

        // The same connection reported again changes nothing; a new one
        // counts.
        let mut more = records[..2].to_vec();
        more.push(records[0].clone());
        assert_eq!(
            diff(Some(&before), &build(&more, &View::default(), &meta)),
            None
        );
        let mut again = records[0].clone();
        again.sport = 2000;
        more.push(again);
        let counted = build(&more, &View::default(), &meta);
        let d = diff(Some(&before), &counted).unwrap();
        assert!(!d.full && d.nodes.is_empty());
        assert_eq!(d.edges.len(), 1);
        assert_eq!(d.edges[0].connections, 2, "a second connection");

        let after = build(&records[2..], &View::default(), &meta);
        let d = diff(Some(&before), &after).unwrap();
        assert_eq!(d.removed_edges, vec!["pod:shop/web-1>pod:shop/api>allowed"]);
        assert_eq!(d.removed_nodes, vec!["pod:shop/web-1"]);
        assert!(d.edges.iter().any(|e| e.verdict == Verdict::Deny));
    }

    #[test]
    fn an_edge_lists_the_records_of_both_sides() {
        let records = shop();
        let map = build(&records, &View::default(), &BTreeMap::new());
        let e = &map.edges["pod:shop/web-2>pod:shop/api>denied"];
        let behind = edge_records(&records, &View::default(), Level::Pod, e, 10);
        assert_eq!(behind.len(), 2);
        assert!(behind.iter().any(|r| r.verdict == Verdict::Deny));
        assert_eq!(
            edge_records(&records, &View::default(), Level::Pod, e, 1).len(),
            1
        );
    }

    #[test]
    fn an_edge_lists_only_the_connections_with_its_verdict() {
        // web-1 -> api: port 80 allowed, port 443 denied at the api.
        let mut records = shop();
        let mut denied = records[1].clone();
        denied.dport = 443;
        denied.sport = 1500;
        denied.verdict = Verdict::Deny;
        records.push(denied);
        let map = build(&records, &View::default(), &BTreeMap::new());
        let allowed = &map.edges["pod:shop/web-1>pod:shop/api>allowed"];
        let behind = edge_records(&records, &View::default(), Level::Pod, allowed, 10);
        assert_eq!(behind.len(), 2, "both sides of the port-80 connection");
        assert!(
            behind
                .iter()
                .all(|r| r.dport == 80 && r.verdict == Verdict::Allow)
        );
        let refused = &map.edges["pod:shop/web-1>pod:shop/api>denied"];
        let behind = edge_records(&records, &View::default(), Level::Pod, refused, 10);
        assert_eq!(behind.len(), 1);
        assert_eq!(behind[0].dport, 443);
    }
}
