//! Policy learning: observed flows in, ready-to-apply NetworkPolicy out.
//! One policy per workload (pods of a namespace with the same labels),
//! selecting by labels, never by pod address; peers as pod and namespace
//! selectors, outside peers as ipBlocks aggregated per /24 (IPv4) or /64
//! (IPv6) when several addresses share one; exact ports; DNS egress kept.
//! The output is sorted and carries no timestamps or counts, so learning
//! again later shows only what changed; counts go to the report.
//!
//! HTTP requests the node's L7 proxy judged (records of kind `http`)
//! become HTTP rules on the server's ingress port entries (then a
//! PalisadeNetworkPolicy): one rule per method and path shape, path
//! segments that vary like identifiers (numbers, UUIDs, long hex or
//! mixed strings) becoming `[^/]+`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    abi::{Reason, Verdict},
    flows::{FlowParty, FlowRecord},
    policy::{Labels, MODE_ANNOTATION, Mode, NAMESPACE_NAME_LABEL},
};

/// Pod labels that differ between pods of one workload and must not be in
/// a selector.
const VOLATILE_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
];

/// What to learn from.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Also allow what was denied (by default, denied attempts stay denied).
    pub include_denied: bool,
    /// Annotate the policies with this mode (e.g. audit, to stage them).
    pub mode: Option<Mode>,
    /// Only learn for workloads in this namespace.
    pub namespace: Option<String>,
    /// Also emit a BaselineAdminNetworkPolicy that denies what no
    /// NetworkPolicy decides: every pod the learned policies do not isolate
    /// (one never seen talking) is cut off, the learned workloads keep
    /// exactly what was observed.
    pub baseline: bool,
}

/// A workload: the pods of one namespace sharing the selector labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Workload {
    pub namespace: String,
    pub selector: Labels,
}

/// The other side of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum PeerKey {
    Pods(Workload),
    Cidr(String),
    /// Outside addresses the DNS proxy saw answered for these names.
    Domains(Vec<String>),
}

/// One learned connection: who opened it, to whom, on what.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Conn {
    client: Side,
    server: Side,
    protocol: String,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Side {
    Pod(Workload, String),
    Host,
    Outside(IpAddr),
    /// An outside address with the names it was looked up by.
    Domain(Vec<String>, IpAddr),
    Unlabelled(String),
}

/// The labels that select a pod's workload: its own, less those that
/// differ between pods of one workload (`pod-template-hash`, ...).
pub fn selector_of(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| !VOLATILE_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn side(p: &FlowParty) -> Side {
    match (&p.namespace, &p.name, p.kind.as_str()) {
        (Some(ns), Some(name), _) => {
            let sel = selector_of(&p.labels);
            if sel.is_empty() {
                Side::Unlabelled(format!("{ns}/{name}"))
            } else {
                Side::Pod(
                    Workload {
                        namespace: ns.clone(),
                        selector: sel,
                    },
                    format!("{ns}/{name}"),
                )
            }
        }
        (_, _, "host") => Side::Host,
        _ if !p.domains.is_empty() => Side::Domain(p.domains.clone(), p.address),
        _ => Side::Outside(p.address),
    }
}

/// The result: YAML and a report of what each rule covers.
#[derive(Debug, Clone, Default)]
pub struct Learned {
    pub yaml: String,
    pub report: Vec<String>,
    pub policies: usize,
}

/// Aggregate outside addresses: a /24 (/64) covers addresses that share
/// one, a lone address is a /32 (/128).
fn aggregate(addrs: &BTreeSet<IpAddr>) -> BTreeMap<IpAddr, String> {
    let net_of = |a: &IpAddr| -> (IpAddr, u8) {
        match a {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                (IpAddr::V4(std::net::Ipv4Addr::new(o[0], o[1], o[2], 0)), 24)
            }
            IpAddr::V6(v6) => {
                let s = v6.segments();
                (
                    IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)),
                    64,
                )
            }
        }
    };
    let mut groups: BTreeMap<(IpAddr, u8), Vec<IpAddr>> = BTreeMap::new();
    for a in addrs {
        groups.entry(net_of(a)).or_default().push(*a);
    }
    let mut out = BTreeMap::new();
    for ((net, len), members) in groups {
        for a in &members {
            let cidr = if members.len() > 1 {
                format!("{net}/{len}")
            } else if a.is_ipv4() {
                format!("{a}/32")
            } else {
                format!("{a}/128")
            };
            out.insert(*a, cidr);
        }
    }
    out
}

/// Per (peer, port): the HTTP rules (method, path regex) with how many
/// requests each covers.
type HttpRules = BTreeMap<(PeerKey, u16), BTreeMap<(String, String), usize>>;

/// A path's shape as a regular expression: literal segments escaped,
/// segments that vary like identifiers as `[^/]+`.
fn path_shape(path: &str) -> String {
    let looks_like_id = |seg: &str| {
        let digits = seg.bytes().filter(u8::is_ascii_digit).count();
        let hex = seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        !seg.is_empty()
            && (seg.bytes().all(|b| b.is_ascii_digit())
                || (hex && seg.len() >= 8 && digits > 0)
                || (seg.len() >= 16
                    && digits > 0
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')))
    };
    path.split('/')
        .map(|seg| {
            if looks_like_id(seg) {
                "[^/]+".to_owned()
            } else {
                regex::escape(seg)
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn slug(w: &Workload) -> String {
    let raw: Vec<String> = w.selector.values().cloned().collect();
    let mut s: String = raw
        .join("-")
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s = s.trim_matches('-');
    let mut name = format!("learned-{s}");
    name.truncate(253);
    name.trim_end_matches('-').to_owned()
}

fn labels_yaml(l: &Labels) -> serde_json::Value {
    serde_json::Value::Object(
        l.iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect(),
    )
}

/// Learn policies from flow records.
pub fn learn(records: &[FlowRecord], opts: &Options) -> Learned {
    // Connections (by client port), each counted once however many
    // endpoints reported it.
    let mut seen: BTreeMap<Conn, BTreeSet<(IpAddr, u16)>> = BTreeMap::new();
    let mut unlabelled = BTreeSet::new();
    // A connection counts when it went through: allowed (or audited) at
    // both ends; one denied at either end only with include_denied, and
    // never one denied for another reason than policy (spoofed, malformed).
    let denied_otherwise: BTreeSet<(IpAddr, u16, IpAddr, u16, String)> = records
        .iter()
        .filter(|r| r.verdict == Verdict::Deny && r.reason != Reason::DropPolicy)
        .map(|r| {
            (
                r.client().address,
                r.sport,
                r.server().address,
                r.dport,
                r.protocol.clone(),
            )
        })
        .collect();
    for r in crate::flows::connections(records) {
        let counts = match r.verdict {
            Verdict::Allow | Verdict::Audit => true,
            Verdict::Deny => {
                opts.include_denied
                    && !denied_otherwise.contains(&(
                        r.client.address,
                        r.sport,
                        r.server.address,
                        r.dport,
                        r.protocol.clone(),
                    ))
            }
            Verdict::None | Verdict::Pass | Verdict::Redirect => false,
        };
        if !counts {
            continue;
        }
        let c = Conn {
            client: side(&r.client),
            server: side(&r.server),
            protocol: r.protocol.clone(),
            port: r.dport,
        };
        for s in [&c.client, &c.server] {
            if let Side::Unlabelled(n) = s {
                unlabelled.insert(n.clone());
            }
        }
        seen.entry(c)
            .or_default()
            .insert((r.client.address, r.sport));
    }
    let conns: BTreeMap<Conn, usize> = seen.into_iter().map(|(c, s)| (c, s.len())).collect();

    // HTTP requests, by the connection they went over (server side):
    // (method, path shape) -> count, and whether any had a query.
    let mut http: BTreeMap<Conn, BTreeMap<(String, String), usize>> = BTreeMap::new();
    let mut queries: BTreeSet<(Conn, String, String)> = BTreeSet::new();
    for r in records {
        let Some(h) = &r.http else { continue };
        let counts = match r.verdict {
            Verdict::Allow | Verdict::Audit => true,
            Verdict::Deny => opts.include_denied,
            _ => false,
        };
        if !counts {
            continue;
        }
        let c = Conn {
            client: side(r.client()),
            server: side(r.server()),
            protocol: r.protocol.clone(),
            port: r.dport,
        };
        let (path, query) = match h.path.split_once('?') {
            Some((p, _)) => (p, true),
            None => (h.path.as_str(), false),
        };
        let shape = path_shape(path);
        if query {
            queries.insert((c.clone(), h.method.clone(), shape.clone()));
        }
        *http
            .entry(c)
            .or_default()
            .entry((h.method.clone(), shape))
            .or_default() += 1;
    }

    let mut outside: BTreeSet<IpAddr> = BTreeSet::new();
    let mut workloads: BTreeSet<Workload> = BTreeSet::new();
    for c in conns.keys() {
        for (s, other) in [(&c.client, &c.server), (&c.server, &c.client)] {
            match s {
                // A pod that only the node talks to (or only pods without
                // labels) gets no rule from it: a policy would isolate it
                // and allow nothing it was seen doing.
                Side::Pod(w, _)
                    if matches!(other, Side::Pod(..) | Side::Outside(_) | Side::Domain(..)) =>
                {
                    workloads.insert(w.clone());
                }
                Side::Outside(a) | Side::Domain(_, a) => {
                    outside.insert(*a);
                }
                _ => {}
            }
        }
    }
    let cidrs = aggregate(&outside);
    // A client is named by its address; a server looked up by name, by
    // the name (egress to a domain becomes a toFQDNs rule).
    let peer_key = |s: &Side, server: bool| -> Option<PeerKey> {
        match s {
            Side::Pod(w, _) => Some(PeerKey::Pods(w.clone())),
            Side::Domain(names, _) if server => Some(PeerKey::Domains(names.clone())),
            Side::Outside(a) | Side::Domain(_, a) => cidrs.get(a).map(|c| PeerKey::Cidr(c.clone())),
            Side::Host | Side::Unlabelled(_) => None,
        }
    };

    let mut docs = Vec::new();
    let mut report = Vec::new();
    for n in &unlabelled {
        report.push(format!(
            "{n} has no labels: no policy can select it by label, so none was learned for it (label it and learn again)"
        ));
    }
    for w in workloads
        .iter()
        .filter(|w| opts.namespace.as_deref().is_none_or(|ns| ns == w.namespace))
    {
        let name = slug(w);
        // peer -> (ports, flow count)
        let mut ingress: BTreeMap<PeerKey, (BTreeSet<(String, u16)>, usize)> = BTreeMap::new();
        // (peer, port) -> HTTP rules (method, path regex) and request counts
        let mut ingress_http: HttpRules = BTreeMap::new();
        let mut egress: BTreeMap<PeerKey, (BTreeSet<(String, u16)>, usize)> = BTreeMap::new();
        for (c, n) in &conns {
            if let Side::Pod(sw, _) = &c.server
                && sw == w
                && let Some(k) = peer_key(&c.client, false)
            {
                if let Some(reqs) = http.get(c) {
                    let e = ingress_http.entry((k.clone(), c.port)).or_default();
                    for ((method, shape), count) in reqs {
                        let any_query =
                            queries.contains(&(c.clone(), method.clone(), shape.clone()));
                        let path = if any_query {
                            format!("{shape}(\\?.*)?")
                        } else {
                            shape.clone()
                        };
                        *e.entry((method.clone(), path)).or_default() += count;
                    }
                }
                let e = ingress.entry(k).or_default();
                e.0.insert((c.protocol.clone(), c.port));
                e.1 += n;
            }
            if let Side::Pod(cw, _) = &c.client
                && cw == w
                && let Some(k) = peer_key(&c.server, true)
            {
                let e = egress.entry(k).or_default();
                e.0.insert((c.protocol.clone(), c.port));
                e.1 += n;
            }
        }
        let peer_json = |k: &PeerKey| -> serde_json::Value {
            match k {
                PeerKey::Pods(pw) if pw.namespace == w.namespace => {
                    serde_json::json!({"podSelector": {"matchLabels": labels_yaml(&pw.selector)}})
                }
                PeerKey::Pods(pw) => serde_json::json!({
                    "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: pw.namespace}},
                    "podSelector": {"matchLabels": labels_yaml(&pw.selector)}
                }),
                PeerKey::Cidr(c) => serde_json::json!({"ipBlock": {"cidr": c}}),
                PeerKey::Domains(names) => serde_json::json!(
                    names
                        .iter()
                        .map(|n| serde_json::json!({"matchName": n}))
                        .collect::<Vec<_>>()
                ),
            }
        };
        let describe = |k: &PeerKey| match k {
            PeerKey::Pods(pw) => format!(
                "pods {} in {}",
                pw.selector
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                pw.namespace
            ),
            PeerKey::Cidr(c) => c.clone(),
            PeerKey::Domains(names) => format!("domains {}", names.join(", ")),
        };
        let ports_json = |k: &PeerKey,
                          ports: &BTreeSet<(String, u16)>,
                          http: Option<&HttpRules>|
         -> Vec<serde_json::Value> {
            ports
                .iter()
                .filter(|(p, _)| matches!(p.as_str(), "TCP" | "UDP" | "SCTP"))
                .map(|(p, n)| {
                    let mut entry = serde_json::json!({"protocol": p, "port": n});
                    if let Some(reqs) = http
                        .and_then(|h| h.get(&(k.clone(), *n)))
                        .filter(|_| p == "TCP")
                    {
                        entry["rules"] = serde_json::json!({"http": reqs
                            .keys()
                            .map(|(m, path)| serde_json::json!({"method": m, "path": path}))
                            .collect::<Vec<_>>()});
                    }
                    entry
                })
                .collect()
        };
        // One rule per peer: "from" peers for ingress, "to" peers for egress.
        let mut rules = |peers: &BTreeMap<_, (BTreeSet<(String, u16)>, usize)>,
                         http: Option<&HttpRules>,
                         field: &str,
                         section: &str| {
            let mut out = Vec::new();
            for (i, (k, (ports, n))) in peers.iter().enumerate() {
                let mut rule = match k {
                    PeerKey::Domains(_) => serde_json::json!({ "toFQDNs": peer_json(k) }),
                    _ => serde_json::json!({ field: [peer_json(k)] }),
                };
                let pj = ports_json(k, ports, http);
                if !pj.is_empty() && pj.len() == ports.len() {
                    rule["ports"] = serde_json::json!(pj);
                }
                for ((hk, port), reqs) in http.into_iter().flatten() {
                    if hk != k {
                        continue;
                    }
                    report.push(format!(
                        "{}/{name} {section}[{i}]: HTTP on {port}/TCP: {}",
                        w.namespace,
                        reqs.iter()
                            .map(|((m, p), c)| format!("{m} {p} ({c} request(s))"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                out.push(rule);
                report.push(format!(
                    "{}/{name} {section}[{i}]: {field} {} on {} covers {n} observed connection(s)",
                    w.namespace,
                    describe(k),
                    ports
                        .iter()
                        .map(|(p, n)| format!("{n}/{p}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            out
        };
        let ingress_rules = rules(&ingress, Some(&ingress_http), "from", "ingress");
        let mut egress_rules = rules(&egress, None, "to", "egress");
        // Name resolution keeps working wherever the resolver is.
        egress_rules.push(serde_json::json!({"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}));
        report.push(format!(
            "{}/{name} egress[{}]: DNS (UDP and TCP 53) to anywhere, so name resolution keeps working",
            w.namespace,
            egress_rules.len() - 1
        ));
        let mut meta = serde_json::json!({"name": name, "namespace": w.namespace});
        if let Some(m) = opts.mode {
            meta["annotations"] = serde_json::json!({MODE_ANNOTATION: m.as_str()});
        }
        // Egress by domain and HTTP rules need palisade's own kind.
        let by_name = egress.keys().any(|k| matches!(k, PeerKey::Domains(_)));
        let (api, kind) = if by_name || !ingress_http.is_empty() {
            (
                crate::policy::palisade::API_VERSION,
                crate::policy::palisade::KIND,
            )
        } else {
            ("networking.k8s.io/v1", "NetworkPolicy")
        };
        let policy = serde_json::json!({
            "apiVersion": api,
            "kind": kind,
            "metadata": meta,
            "spec": {
                "podSelector": {"matchLabels": labels_yaml(&w.selector)},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": ingress_rules,
                "egress": egress_rules,
            }
        });
        docs.push(serde_yaml::to_string(&policy).unwrap_or_default());
    }
    if opts.baseline {
        let subject = match &opts.namespace {
            Some(ns) => {
                serde_json::json!({"namespaces": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}}})
            }
            None => serde_json::json!({"namespaces": {}}),
        };
        let mut meta = serde_json::json!({"name": crate::policy::tier::BANP_NAME});
        if let Some(m) = opts.mode {
            meta["annotations"] = serde_json::json!({MODE_ANNOTATION: m.as_str()});
        }
        let banp = serde_json::json!({
            "apiVersion": crate::policy::tier::API_V1ALPHA1,
            "kind": "BaselineAdminNetworkPolicy",
            "metadata": meta,
            "spec": {
                "subject": subject,
                "ingress": [{"name": "default-deny", "action": "Deny", "from": [{"namespaces": {}}]}],
                "egress": [{"name": "default-deny", "action": "Deny",
                            "to": [{"networks": ["0.0.0.0/0", "::/0"]}]}],
            }
        });
        report.push(
            "BaselineAdminNetworkPolicy/default: denies ingress from every pod and egress to every \
             address for pods that no NetworkPolicy isolates (the learned workloads are isolated \
             by their own policies, which keep the observed traffic); ingress from outside the \
             cluster cannot be named in a baseline policy and stays as it is"
                .to_owned(),
        );
        docs.push(serde_yaml::to_string(&banp).unwrap_or_default());
    }
    Learned {
        policies: docs.len(),
        yaml: docs.join("---\n"),
        report,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        abi::Direction,
        policy::{Object, Policy, parse_documents},
    };

    fn pod(ns: &str, name: &str, addr: &str, labels: &[(&str, &str)]) -> FlowParty {
        FlowParty {
            kind: "pod".into(),
            address: addr.parse().unwrap(),
            namespace: Some(ns.into()),
            name: Some(name.into()),
            identity: 300,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            domains: Vec::new(),
        }
    }

    fn world(addr: &str) -> FlowParty {
        FlowParty {
            kind: "world".into(),
            address: addr.parse().unwrap(),
            namespace: None,
            name: None,
            identity: 2,
            labels: Labels::new(),
            domains: Vec::new(),
        }
    }

    fn flow(
        dir: Direction,
        endpoint: FlowParty,
        peer: FlowParty,
        proto: &str,
        port: u16,
    ) -> FlowRecord {
        FlowRecord {
            time: "2026-01-01T00:00:00.000Z".into(),
            kind: "flow".into(),
            verdict: Verdict::Allow,
            reason: Reason::NotIsolated,
            direction: dir,
            endpoint,
            peer,
            protocol: proto.into(),
            sport: 40000,
            dport: port,
            policy: None,
            tier: None,
            isolated_by: vec![],
            dns: None,
            http: None,
        }
    }

    fn http_record(client: FlowParty, server: FlowParty, method: &str, path: &str) -> FlowRecord {
        let mut r = flow(Direction::Ingress, server, client, "TCP", 80);
        r.kind = "http".into();
        r.http = Some(crate::flows::HttpInfo {
            method: method.into(),
            host: None,
            path: path.into(),
            status: 200,
            grpc_status: None,
            latency_micros: 100,
        });
        r
    }

    #[test]
    fn observed_http_requests_become_http_rules_with_ids_grouped() {
        let web = pod("shop", "web-1", "10.0.0.2", &[("app", "web")]);
        let api = pod("shop", "api-1", "10.0.0.3", &[("app", "api")]);
        let mut records = vec![
            flow(Direction::Ingress, api.clone(), web.clone(), "TCP", 80),
            flow(Direction::Ingress, api.clone(), web.clone(), "TCP", 81),
        ];
        for path in ["/books/1", "/books/27", "/books/9f8e7d6c5b4a3f2e", "/books"] {
            records.push(http_record(web.clone(), api.clone(), "GET", path));
        }
        records.push(http_record(web.clone(), api.clone(), "GET", "/search?q=x"));
        records.push(http_record(
            web.clone(),
            api.clone(),
            "POST",
            "/books/550e8400-e29b-41d4-a716-446655440000/reviews",
        ));
        let l = learn(&records, &Options::default());
        let docs = parse_documents(&l.yaml, "learned").unwrap();
        let api_policy = docs
            .iter()
            .find_map(|d| match d {
                Object::PalisadePolicy(p) if p.value.base.name == "learned-api" => {
                    Some(p.value.clone())
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no PalisadeNetworkPolicy for api:\n{}", l.yaml));
        let ports = &api_policy.base.ingress[0].ports;
        let p80 = ports
            .iter()
            .find(|p| p.port == crate::policy::PortMatch::Range(80, 80))
            .unwrap();
        let rules: Vec<(String, String)> = p80
            .http
            .iter()
            .map(|h| (h.method.clone().unwrap(), h.path.clone().unwrap()))
            .collect();
        assert_eq!(
            rules,
            [
                ("GET".to_string(), "/books".to_string()),
                ("GET".to_string(), "/books/[^/]+".to_string()),
                ("GET".to_string(), "/search(\\?.*)?".to_string()),
                ("POST".to_string(), "/books/[^/]+/reviews".to_string()),
            ]
        );
        // Port 81 saw no HTTP: it stays an L3/L4 entry.
        let p81 = ports
            .iter()
            .find(|p| p.port == crate::policy::PortMatch::Range(81, 81))
            .unwrap();
        assert!(p81.http.is_empty());
        assert!(
            l.report.iter().any(|r| r.contains("HTTP on 80/TCP")),
            "{:?}",
            l.report
        );
        // The learned rules allow what was seen and nothing else.
        let m = |method: &str, path: &str| {
            p80.http.iter().any(|h| {
                crate::l7::Matcher::new("p", h).matches(
                    &crate::l7::Request {
                        method,
                        path,
                        host: None,
                    },
                    &|_| Vec::new(),
                )
            })
        };
        assert!(m("GET", "/books/12345"));
        assert!(m("GET", "/search?q=y"));
        assert!(!m("DELETE", "/books/1"));
        assert!(!m("GET", "/admin"));
    }

    fn sample() -> Vec<FlowRecord> {
        let web = pod(
            "shop",
            "web-1",
            "10.0.0.2",
            &[("app", "web"), ("pod-template-hash", "abc")],
        );
        let api = pod("shop", "api-1", "10.0.0.3", &[("app", "api")]);
        let db = pod("data", "db-1", "10.0.0.4", &[("app", "db")]);
        vec![
            // web -> api:8080, seen at both ends.
            flow(Direction::Egress, web.clone(), api.clone(), "TCP", 8080),
            flow(Direction::Ingress, api.clone(), web.clone(), "TCP", 8080),
            // api -> db:5432 across namespaces.
            flow(Direction::Egress, api.clone(), db.clone(), "TCP", 5432),
            // outside -> web:443 from two addresses of one /24 and one lone address.
            flow(
                Direction::Ingress,
                web.clone(),
                world("198.51.100.7"),
                "TCP",
                443,
            ),
            flow(
                Direction::Ingress,
                web.clone(),
                world("198.51.100.9"),
                "TCP",
                443,
            ),
            flow(
                Direction::Ingress,
                web.clone(),
                world("203.0.113.5"),
                "TCP",
                443,
            ),
            // api -> outside DNS-less service.
            flow(
                Direction::Egress,
                api.clone(),
                world("192.0.2.10"),
                "UDP",
                123,
            ),
        ]
    }

    #[test]
    fn egress_to_names_the_dns_proxy_saw_becomes_to_fqdns() {
        let mut records = sample();
        let web = pod("shop", "web-1", "10.0.0.2", &[("app", "web")]);
        let api = FlowParty {
            domains: vec!["api.example.com".into()],
            ..world("198.51.100.20")
        };
        records.push(flow(Direction::Egress, web, api, "TCP", 443));
        let l = learn(&records, &Options::default());
        let objs =
            parse_documents(&l.yaml, "learned").unwrap_or_else(|e| panic!("{e}\n{}", l.yaml));
        let pnp = objs
            .iter()
            .find_map(|o| match o {
                Object::PalisadePolicy(p) => Some(p.value.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no PalisadeNetworkPolicy:\n{}", l.yaml));
        assert_eq!(pnp.base.name, "learned-web");
        assert!(
            pnp.egress_fqdns
                .iter()
                .flatten()
                .any(|s| s.matches("api.example.com")),
            "{}",
            l.yaml
        );
        assert!(
            !l.yaml.contains("198.51.100.20"),
            "named, not by address:\n{}",
            l.yaml
        );
        assert!(
            l.report
                .iter()
                .any(|r| r.contains("domains api.example.com"))
        );
    }

    #[test]
    fn a_pod_only_the_node_talks_to_gets_no_policy() {
        let mut records = sample();
        let idle = pod("data", "idle-1", "10.0.0.9", &[("app", "idle")]);
        let node = FlowParty {
            kind: "host".into(),
            ..world("10.0.0.1")
        };
        records.push(flow(Direction::Ingress, idle, node, "TCP", 80));
        let l = learn(&records, &Options::default());
        assert_eq!(l.policies, 3, "{}", l.yaml);
        assert!(!l.yaml.contains("idle"), "{}", l.yaml);
    }

    #[test]
    fn learned_policies_select_by_labels_and_parse_as_network_policies() {
        let l = learn(&sample(), &Options::default());
        assert_eq!(l.policies, 3, "{}", l.yaml);
        let objs = parse_documents(&l.yaml, "learned").unwrap();
        let policies: Vec<Policy> = objs
            .iter()
            .map(|o| match o {
                Object::NetworkPolicy(np) => np.value.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        let web = policies.iter().find(|p| p.name == "learned-web").unwrap();
        assert!(web.ingress_isolation && web.egress_isolation);
        assert_eq!(
            web.pod_selector.describe(),
            "app=web",
            "volatile labels are not selected"
        );
        assert!(
            !l.yaml.contains("10.0.0."),
            "never selects pods by address:\n{}",
            l.yaml
        );
        assert!(
            l.yaml.contains("198.51.100.0/24") && l.yaml.contains("203.0.113.5/32"),
            "{}",
            l.yaml
        );
        assert!(
            l.yaml.contains("kubernetes.io/metadata.name: data"),
            "{}",
            l.yaml
        );
        assert!(
            l.report.iter().any(|r| r.contains("learned-api ingress[0]")
                && r.contains("covers 1 observed connection")),
            "one connection seen at both ends counts once: {:?}",
            l.report
        );
        assert!(l.report.iter().any(|r| r.contains("DNS")));
    }

    /// With `baseline`, a BANP default-deny follows the NetworkPolicies.
    /// Checked by meaning: for a pod no learned policy isolates, the
    /// baseline denies everything; the learned workloads are isolated by
    /// their own policies, so the baseline never applies to them.
    #[test]
    fn a_baseline_default_deny_comes_with_the_learned_policies() {
        use crate::policy::tier::{Action, Tier, TierPeer, TierPolicy};
        let l = learn(
            &sample(),
            &Options {
                baseline: true,
                ..Options::default()
            },
        );
        assert_eq!(l.policies, 4, "{}", l.yaml);
        let objs = parse_documents(&l.yaml, "learned").unwrap();
        let banp: Vec<&TierPolicy> = objs
            .iter()
            .filter_map(|o| match o {
                Object::TierPolicy(t) => Some(&t.value),
                _ => None,
            })
            .collect();
        assert_eq!(banp.len(), 1, "{}", l.yaml);
        let b = banp[0];
        assert_eq!((b.tier, b.name.as_str()), (Tier::Baseline, "default"));
        assert!(b.subject.namespaces.is_empty() && b.subject.pods.is_empty());
        for rules in [&b.ingress, &b.egress] {
            assert_eq!(rules.len(), 1);
            assert_eq!(rules[0].action, Action::Deny);
            assert_eq!(rules[0].ports, None, "every protocol and port");
        }
        assert!(matches!(b.ingress[0].peers[0], TierPeer::Peer(_)));
        let nps = objs
            .iter()
            .filter(|o| matches!(o, Object::NetworkPolicy(np) if np.value.ingress_isolation && np.value.egress_isolation))
            .count();
        assert_eq!(nps, 3, "every learned workload is isolated both ways");
        assert!(
            l.report
                .iter()
                .any(|r| r.contains("BaselineAdminNetworkPolicy/default"))
        );
        // Limited to a namespace, the baseline's subject is that namespace.
        let one = learn(
            &sample(),
            &Options {
                baseline: true,
                namespace: Some("shop".into()),
                ..Options::default()
            },
        );
        assert!(
            one.yaml.contains("kubernetes.io/metadata.name: shop"),
            "{}",
            one.yaml
        );
    }

    #[test]
    fn learning_is_deterministic_and_ignores_denied_attempts() {
        let mut flows = sample();
        let a = learn(&flows, &Options::default());
        flows.reverse();
        let b = learn(&flows, &Options::default());
        assert_eq!(a.yaml, b.yaml);
        let mut denied = flow(
            Direction::Ingress,
            pod("shop", "web-1", "10.0.0.2", &[("app", "web")]),
            pod("shop", "evil", "10.0.0.9", &[("app", "evil")]),
            "TCP",
            22,
        );
        denied.verdict = Verdict::Deny;
        flows.push(denied);
        assert_eq!(learn(&flows, &Options::default()).yaml, a.yaml);
        let staged = learn(
            &flows,
            &Options {
                mode: Some(Mode::Audit),
                ..Default::default()
            },
        );
        assert!(staged.yaml.contains("palisade.io/mode: audit"));
    }
}
