//! The traffic map: observed flows as a Graphviz graph. Pods are grouped
//! in one box per namespace; the node and outside addresses have boxes of
//! their own; an edge per (client, server, verdict) is coloured by verdict
//! and labelled with its ports. Graphviz (`dot`) does the layout.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    abi::Verdict,
    flows::{FlowParty, FlowRecord, connections},
};

/// Edge colours, also used in the legend.
pub const COLOURS: &[(Verdict, &str)] = &[
    (Verdict::Allow, "#2e7d32"),
    (Verdict::Audit, "#ef6c00"),
    (Verdict::Deny, "#c62828"),
];

fn colour(verdict: Verdict) -> &'static str {
    COLOURS
        .iter()
        .find(|(v, _)| *v == verdict)
        .map(|(_, c)| *c)
        .unwrap_or("#757575")
}

/// A graph node: an id, its label and the box it sits in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Node {
    id: String,
    label: String,
    group: String,
}

fn node(p: &FlowParty) -> Node {
    match (&p.namespace, &p.name) {
        (Some(ns), Some(name)) => Node {
            id: format!("pod:{ns}/{name}"),
            label: name.clone(),
            group: format!("namespace {ns}"),
        },
        _ if p.kind == "host" => Node {
            id: "node".into(),
            label: "this node".into(),
            group: "node".into(),
        },
        (None, Some(name)) if p.kind == "node" => Node {
            id: format!("node:{name}"),
            label: format!("node {name}"),
            group: "nodes".into(),
        },
        _ => Node {
            id: format!("ext:{}", p.address),
            label: p.address.to_string(),
            group: "outside".into(),
        },
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// What the graph shows, for tests and summaries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub nodes: BTreeSet<String>,
    /// (client id, server id, verdict, ports)
    pub edges: BTreeSet<(String, String, Verdict, String)>,
}

/// Build the DOT text (and a summary) from flow records.
pub fn dot(records: &[FlowRecord]) -> (String, Summary) {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String, Verdict), BTreeSet<String>> = BTreeMap::new();
    // One edge per connection outcome: a pod-to-pod connection allowed by
    // the client's egress but denied by the server's ingress is denied.
    for r in connections(records) {
        let (c, s) = (node(&r.client), node(&r.server));
        let port = if r.dport == 0 {
            r.protocol.clone()
        } else {
            format!("{}/{}", r.dport, r.protocol)
        };
        edges
            .entry((c.id.clone(), s.id.clone(), r.verdict))
            .or_default()
            .insert(port);
        nodes.insert(c.id.clone(), c);
        nodes.insert(s.id.clone(), s);
    }
    let mut groups: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    for n in nodes.values() {
        groups.entry(&n.group).or_default().push(n);
    }
    let mut out = String::from(
        "digraph palisade {\n  rankdir=LR;\n  fontname=\"Helvetica\";\n  node [shape=box, style=\"rounded,filled\", fillcolor=\"#ffffff\", fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n",
    );
    for (i, (group, members)) in groups.iter().enumerate() {
        let fill = match *group {
            "outside" => "#fff3e0",
            "node" => "#eeeeee",
            _ => "#e3f2fd",
        };
        out.push_str(&format!(
            "  subgraph cluster_{i} {{\n    label=\"{}\";\n    style=\"rounded,filled\";\n    fillcolor=\"{fill}\";\n",
            esc(group)
        ));
        for n in members {
            out.push_str(&format!(
                "    \"{}\" [label=\"{}\"];\n",
                esc(&n.id),
                esc(&n.label)
            ));
        }
        out.push_str("  }\n");
    }
    let mut summary = Summary {
        nodes: nodes.keys().cloned().collect(),
        ..Default::default()
    };
    for ((c, s, v), ports) in &edges {
        let label = ports.iter().cloned().collect::<Vec<_>>().join(", ");
        let style = if *v == Verdict::Deny {
            ", style=dashed"
        } else {
            ""
        };
        out.push_str(&format!(
            "  \"{}\" -> \"{}\" [color=\"{}\", fontcolor=\"{}\", label=\"{} {}\"{style}];\n",
            esc(c),
            esc(s),
            colour(*v),
            colour(*v),
            esc(&label),
            esc(v.as_str())
        ));
        summary.edges.insert((c.clone(), s.clone(), *v, label));
    }
    out.push_str("}\n");
    (out, summary)
}

/// A self-contained HTML page around an SVG rendering.
pub fn html(svg: &str, title: &str, summary: &Summary) -> String {
    let legend: String = COLOURS
        .iter()
        .map(|(v, c)| format!("<span style=\"color:{c};margin-right:1.5em\">&#9632; {v}</span>"))
        .collect();
    let svg = svg.find("<svg").map_or(svg, |i| &svg[i..]);
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>body{{font-family:Helvetica,Arial,sans-serif;margin:2em}}svg{{max-width:100%;height:auto}}</style></head>\n<body><h1>{title}</h1>\n<p>{} nodes, {} edges. Edges: {legend} (denied edges are dashed).</p>\n{svg}\n</body></html>\n",
        summary.nodes.len(),
        summary.edges.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        abi::{Direction, Reason},
        policy::Labels,
    };

    fn party(ns: Option<&str>, name: Option<&str>, addr: &str, kind: &str) -> FlowParty {
        FlowParty {
            kind: kind.into(),
            address: addr.parse().unwrap(),
            namespace: ns.map(Into::into),
            name: name.map(Into::into),
            identity: 0,
            labels: Labels::new(),
            domains: Vec::new(),
        }
    }

    #[test]
    fn pods_are_grouped_by_namespace_and_edges_coloured_by_verdict() {
        let web = party(Some("shop"), Some("web"), "10.0.0.2", "pod");
        let out = party(None, None, "198.51.100.7", "world");
        let mk = |dir, ep: &FlowParty, peer: &FlowParty, verdict, port| FlowRecord {
            time: String::new(),
            kind: "flow".into(),
            verdict,
            reason: Reason::Policy,
            direction: dir,
            endpoint: ep.clone(),
            peer: peer.clone(),
            protocol: "TCP".into(),
            sport: 1,
            dport: port,
            policy: None,
            tier: None,
            isolated_by: vec![],
            dns: None,
            http: None,
        };
        let records = vec![
            mk(Direction::Ingress, &web, &out, Verdict::Allow, 443),
            mk(Direction::Ingress, &web, &out, Verdict::Allow, 80),
            mk(Direction::Egress, &web, &out, Verdict::Deny, 25),
        ];
        let (dot, summary) = dot(&records);
        assert!(dot.contains("label=\"namespace shop\""), "{dot}");
        assert!(dot.contains("label=\"outside\""), "{dot}");
        assert!(summary.edges.contains(&(
            "ext:198.51.100.7".into(),
            "pod:shop/web".into(),
            Verdict::Allow,
            "443/TCP, 80/TCP".into()
        )));
        assert!(
            dot.contains("#c62828") && dot.contains("style=dashed"),
            "{dot}"
        );
        let page = html("<?xml ...?><svg></svg>", "t", &summary);
        assert!(
            page.starts_with("<!DOCTYPE html>")
                && page.contains("<svg></svg>")
                && !page.contains("<?xml")
        );
    }
}
