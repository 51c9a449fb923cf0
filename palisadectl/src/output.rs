//! Rendering: kubectl-style tables (tab-aligned, no borders), JSON and YAML.

use std::{
    collections::BTreeMap,
    io::{self, Write},
};

use anyhow::{Context, Result};
use clap::ValueEnum;
use palisade::{
    abi::Direction,
    daemon::DaemonStatus,
    dataplane::{Dataplane, DataplaneStatus, kernel::KernelDataplane},
    explain::Explanation,
    identity::{IdentityKey, reserved_name},
    node::compile_state,
    policy::{Labels, NamespaceInfo, tier::TierKind},
    store::{Endpoint, State},
};
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Print, treating a closed pipe as the reader being done.
pub fn emit(s: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> Result<()> {
    let mut tw = tabwriter::TabWriter::new(Vec::new()).padding(3);
    writeln!(tw, "{}", header.join("\t"))?;
    for r in rows {
        writeln!(tw, "{}", r.join("\t"))?;
    }
    tw.flush()?;
    let bytes = tw.into_inner().context("format table")?;
    emit(&String::from_utf8_lossy(&bytes))
}

fn structured<T: Serialize>(value: &T, format: Format) -> Result<()> {
    match format {
        Format::Yaml => emit(&serde_yaml::to_string(value)?),
        _ => emit(&(serde_json::to_string_pretty(value)? + "\n")),
    }
}

fn labels_str(l: &Labels) -> String {
    if l.is_empty() {
        return "<none>".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn k8s_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EndpointOut<'a> {
    #[serde(flatten)]
    endpoint: &'a Endpoint,
    effective_labels: Labels,
    identity: u32,
}

pub fn endpoints(state: &State, ns: Option<&str>, format: Format) -> Result<()> {
    let mut scratch = state.clone();
    let compiled = compile_state(&mut scratch);
    let eps: Vec<&Endpoint> = state
        .endpoints
        .values()
        .filter(|e| ns.is_none_or(|n| e.namespace == n))
        .collect();
    if format != Format::Table {
        let out: Vec<EndpointOut<'_>> = eps
            .iter()
            .map(|e| EndpointOut {
                endpoint: e,
                effective_labels: state.effective_labels(e),
                identity: compiled
                    .endpoint_identities
                    .get(&e.id)
                    .copied()
                    .unwrap_or_default(),
            })
            .collect();
        return structured(&out, format);
    }
    let rows = eps
        .iter()
        .map(|e| {
            vec![
                e.namespace.clone(),
                e.name.clone(),
                e.id.to_string(),
                compiled
                    .endpoint_identities
                    .get(&e.id)
                    .map(u32::to_string)
                    .unwrap_or_default(),
                e.addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                format!("{} ({})", e.host_ifname, e.host_ifindex),
                e.attachment.mode_name().to_owned(),
                labels_str(&state.effective_labels(e)),
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "NAME",
            "ENDPOINT",
            "IDENTITY",
            "ADDRESSES",
            "HOST VETH",
            "ATTACH",
            "LABELS",
        ],
        rows,
    )
}

pub fn policies(state: &State, ns: Option<&str>, format: Format) -> Result<()> {
    let selected: Vec<_> = state
        .policies
        .iter()
        .filter(|(_, sp)| ns.is_none_or(|n| sp.policy.namespace == n))
        .collect();
    if format != Format::Table {
        let items = selected
            .iter()
            .map(|(_, sp)| serde_json::to_value(&sp.object))
            .collect::<Result<Vec<_>, _>>()?;
        return structured(&k8s_list(items), format);
    }
    let mut rows = Vec::new();
    for (_, sp) in selected {
        let p = &sp.policy;
        let selected_eps = state
            .endpoints
            .values()
            .filter(|e| p.selects(&e.namespace, &state.effective_labels(e)))
            .count();
        let mut types = Vec::new();
        if p.ingress_isolation {
            types.push("Ingress");
        }
        if p.egress_isolation {
            types.push("Egress");
        }
        rows.push(vec![
            p.namespace.clone(),
            p.name.clone(),
            sp.id.to_string(),
            p.pod_selector.describe(),
            types.join(","),
            format!("{}/{}", p.ingress.len(), p.egress.len()),
            selected_eps.to_string(),
        ]);
    }
    table(
        &[
            "NAMESPACE",
            "NAME",
            "ID",
            "POD-SELECTOR",
            "POLICY-TYPES",
            "RULES (IN/OUT)",
            "ENDPOINTS",
        ],
        rows,
    )
}

/// AdminNetworkPolicies, BaselineAdminNetworkPolicies or
/// ClusterNetworkPolicies, in the order they are evaluated.
/// `get palisadenetworkpolicies`.
pub fn palisade_policies(state: &State, ns: Option<&str>, format: Format) -> Result<()> {
    let selected: Vec<_> = state
        .palisade_policies
        .values()
        .filter(|sp| ns.is_none_or(|n| sp.policy.base.namespace == n))
        .collect();
    if format != Format::Table {
        let items = selected
            .iter()
            .map(|sp| serde_json::to_value(&sp.object))
            .collect::<Result<Vec<_>, _>>()?;
        return structured(&k8s_list(items), format);
    }
    let mut rows = Vec::new();
    for sp in selected {
        let p = &sp.policy.base;
        let selected_eps = state
            .endpoints
            .values()
            .filter(|e| p.selects(&e.namespace, &state.effective_labels(e)))
            .count();
        let fqdns: Vec<String> = sp
            .policy
            .fqdn_selectors()
            .map(|s| s.as_str().to_owned())
            .collect();
        let learned = state
            .fqdns
            .addresses(&sp.policy.fqdn_selectors().cloned().collect::<Vec<_>>());
        rows.push(vec![
            p.namespace.clone(),
            p.name.clone(),
            sp.id.to_string(),
            p.pod_selector.describe(),
            if fqdns.is_empty() {
                "-".into()
            } else {
                fqdns.join(",")
            },
            learned.len().to_string(),
            if sp.policy.dns.is_empty() {
                "no"
            } else {
                "yes"
            }
            .into(),
            selected_eps.to_string(),
        ]);
    }
    table(
        &[
            "NAMESPACE",
            "NAME",
            "ID",
            "POD-SELECTOR",
            "FQDNS",
            "ADDRESSES",
            "DNS-RULES",
            "ENDPOINTS",
        ],
        rows,
    )
}

/// `get fqdns`: what the DNS proxy learned, and until when.
pub fn fqdns(state: &State, format: Format) -> Result<()> {
    let entries: Vec<palisade::fqdn::Learned> = state.fqdns.entries().collect();
    if format != Format::Table {
        return structured(&serde_json::json!({ "items": entries }), format);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let rows = entries
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                l.address.to_string(),
                if l.expires >= now {
                    format!("{}s", l.expires - now)
                } else {
                    "expired (in use)".into()
                },
            ]
        })
        .collect();
    table(&["NAME", "ADDRESS", "EXPIRES-IN"], rows)
}

pub fn tier_policies(state: &State, kind: TierKind, format: Format) -> Result<()> {
    let mut selected: Vec<_> = state
        .tier_policies
        .values()
        .filter(|t| t.policy.kind == kind)
        .collect();
    selected.sort_by(|a, b| a.policy.rank().cmp(&b.policy.rank()));
    if format != Format::Table {
        let items = selected
            .iter()
            .map(|t| serde_json::to_value(&t.object))
            .collect::<Result<Vec<_>, _>>()?;
        return structured(&k8s_list(items), format);
    }
    let namespaces = state.namespace_map();
    let mut rows = Vec::new();
    for t in selected {
        let p = &t.policy;
        let selected_eps = state
            .endpoints
            .values()
            .filter(|e| {
                let ns = namespaces
                    .get(&e.namespace)
                    .map(|n| n.labels.clone())
                    .unwrap_or_else(|| NamespaceInfo::new(&e.namespace, None).labels);
                palisade::tiers::selects(p, &ns, &state.effective_labels(e))
            })
            .count();
        let subject = if p.subject.pods.is_empty() {
            format!("namespaces {}", p.subject.namespaces.describe())
        } else {
            format!(
                "pods {} in namespaces {}",
                p.subject.pods.describe(),
                p.subject.namespaces.describe()
            )
        };
        rows.push(vec![
            p.name.clone(),
            t.id.to_string(),
            p.tier.as_str().to_owned(),
            if kind == TierKind::BaselineAdminNetworkPolicy {
                "-".to_owned()
            } else {
                p.priority.to_string()
            },
            subject,
            format!("{}/{}", p.ingress.len(), p.egress.len()),
            p.mode.map(|m| m.as_str()).unwrap_or("-").to_owned(),
            selected_eps.to_string(),
        ]);
    }
    table(
        &[
            "NAME",
            "ID",
            "TIER",
            "PRIORITY",
            "SUBJECT",
            "RULES (IN/OUT)",
            "MODE",
            "ENDPOINTS",
        ],
        rows,
    )
}

#[derive(Serialize)]
struct IdentityOut<'a> {
    id: u32,
    #[serde(flatten)]
    key: &'a IdentityKey,
    addresses: Vec<String>,
}

pub fn identities(state: &State, ns: Option<&str>, format: Format) -> Result<()> {
    let mut scratch = state.clone();
    let compiled = compile_state(&mut scratch);
    let mut by_id: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (prefix, v) in &compiled.desired.ipcache {
        by_id
            .entry(v.identity)
            .or_default()
            .push(prefix.to_string());
    }
    let ids: Vec<(u32, &IdentityKey)> = scratch
        .identities
        .iter()
        .map(|(k, id)| (id, k))
        .filter(|(_, k)| ns.is_none_or(|n| k.namespace.as_deref() == Some(n)))
        .collect();
    if format != Format::Table {
        let out: Vec<IdentityOut<'_>> = ids
            .iter()
            .map(|(id, k)| IdentityOut {
                id: *id,
                key: k,
                addresses: by_id.get(id).cloned().unwrap_or_default(),
            })
            .collect();
        return structured(&out, format);
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    if ns.is_none() {
        for id in [palisade::abi::ID_HOST, palisade::abi::ID_WORLD] {
            rows.push(vec![
                id.to_string(),
                "<reserved>".into(),
                reserved_name(id).unwrap_or_default().to_owned(),
                String::new(),
                by_id
                    .get(&id)
                    .map(|a| a.join(","))
                    .unwrap_or_else(|| "(default)".into()),
            ]);
        }
    }
    for (id, k) in ids {
        let extra: Vec<String> = k
            .blocks
            .iter()
            .map(|b| format!("in {b}"))
            .chain(k.ports.iter().map(|p| format!("port {p}")))
            .collect();
        rows.push(vec![
            id.to_string(),
            k.namespace.clone().unwrap_or_else(|| "<cidr>".into()),
            if k.is_endpoint() {
                labels_str(&k.labels)
            } else {
                String::new()
            },
            extra.join(" "),
            by_id.get(&id).map(|a| a.join(",")).unwrap_or_default(),
        ]);
    }
    table(
        &["ID", "NAMESPACE", "LABELS", "REFINED BY", "ADDRESSES"],
        rows,
    )
}

pub fn namespaces(state: &State, format: Format) -> Result<()> {
    let map = state.namespace_map();
    if format != Format::Table {
        let items = map
            .values()
            .map(|ns| {
                state
                    .namespaces
                    .get(&ns.name)
                    .map(|n| serde_json::to_value(&n.object))
                    .unwrap_or_else(|| {
                        Ok(json!({"apiVersion": "v1", "kind": "Namespace",
                                  "metadata": {"name": ns.name, "labels": ns.labels}}))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        return structured(&k8s_list(items), format);
    }
    let rows = map
        .values()
        .map(|ns: &NamespaceInfo| {
            vec![
                ns.name.clone(),
                if state.namespaces.contains_key(&ns.name) {
                    "object"
                } else {
                    "implicit"
                }
                .to_owned(),
                state
                    .endpoints
                    .values()
                    .filter(|e| e.namespace == ns.name)
                    .count()
                    .to_string(),
                state
                    .policies
                    .values()
                    .filter(|p| p.policy.namespace == ns.name)
                    .count()
                    .to_string(),
                labels_str(&ns.labels),
            ]
        })
        .collect();
    table(&["NAME", "SOURCE", "ENDPOINTS", "POLICIES", "LABELS"], rows)
}

pub fn pods(state: &State, ns: Option<&str>, format: Format) -> Result<()> {
    let pods: Vec<_> = state
        .pods
        .values()
        .filter(|p| ns.is_none_or(|n| p.value.namespace == n))
        .collect();
    if format != Format::Table {
        let items = pods
            .iter()
            .map(|p| serde_json::to_value(&p.object))
            .collect::<Result<Vec<_>, _>>()?;
        return structured(&k8s_list(items), format);
    }
    let rows = pods
        .iter()
        .map(|p| &p.value)
        .map(|p| {
            let running = state
                .endpoints
                .values()
                .any(|e| e.namespace == p.namespace && e.name == p.name);
            vec![
                p.namespace.clone(),
                p.name.clone(),
                if running { "yes" } else { "no" }.to_owned(),
                p.ports
                    .iter()
                    .map(|np| format!("{}={}/{}", np.name, np.port, np.protocol.as_str()))
                    .collect::<Vec<_>>()
                    .join(","),
                labels_str(&p.labels),
            ]
        })
        .collect();
    table(
        &["NAMESPACE", "NAME", "RUNNING", "NAMED PORTS", "LABELS"],
        rows,
    )
}

#[derive(Serialize)]
struct StatusOut<'a> {
    loaded: bool,
    daemon: Option<DaemonStatus>,
    datapath: Option<DataplaneStatus>,
    endpoints: Vec<EndpointStatus<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EndpointStatus<'a> {
    id: u32,
    namespace: &'a str,
    name: &'a str,
    host_veth: &'a str,
    attach: &'a str,
    enforcing: bool,
    problem: Option<String>,
}

/// Cluster mode's part of `status`.
fn cluster_lines(c: &palisade::cluster::ClusterStatus) -> String {
    let ago = |ms: Option<u64>| match ms {
        Some(ms) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or_default();
            format!("{} s ago", now.saturating_sub(ms) / 1000)
        }
        None => "never".into(),
    };
    let objects: Vec<String> = c.objects.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let mut out = format!(
        "cluster: node {} with API server {}: {}, {}\n  first full sync: {}; last change applied: {}\n  objects: {}\n  event to datapath: p50 {:.1} ms, p99 {:.1} ms; watch restarts {}, relists {}\n",
        c.node,
        c.api_server,
        if c.connected {
            "connected"
        } else {
            "NOT connected (enforcing the last state)"
        },
        if c.synced {
            "synced"
        } else {
            "first sync not complete"
        },
        ago(c.first_sync_ms),
        ago(c.last_applied_ms),
        objects.join(", "),
        c.lag_p50_ms,
        c.lag_p99_ms,
        c.watch_restarts,
        c.relists,
    );
    out.push_str(&format!(
        "  Services: {} frontends judged on their backend; hook: {}\n",
        c.service_frontends,
        if c.service_hook.is_empty() {
            "NOT attached"
        } else {
            c.service_hook.as_str()
        }
    ));
    if !c.not_installed.is_empty() {
        out.push_str(&format!(
            "  not installed in the cluster (CRD missing; looked for again every few seconds): {}\n",
            c.not_installed.join(", ")
        ));
    }
    if let Some(e) = &c.last_error {
        out.push_str(&format!("  last error: {e}\n"));
    }
    out
}

pub fn status(
    state: &State,
    dp: &KernelDataplane,
    loaded: bool,
    daemon: Option<DaemonStatus>,
    format: Format,
) -> Result<()> {
    let daemon_line = match &daemon {
        Some(d) => format!(
            "daemon: running (pid {}), {} requests served, store generation {}\n",
            d.pid, d.requests, d.generation
        ),
        None => "daemon: not running (commands, the CNI plugin and the OCI hook do the work themselves)\n".into(),
    };
    let daemon_line = match daemon.as_ref().and_then(|d| d.cluster.as_ref()) {
        Some(c) => format!("{daemon_line}{}", cluster_lines(c)),
        None => daemon_line,
    };
    let datapath = if loaded { Some(dp.status()?) } else { None };
    let endpoints: Vec<EndpointStatus<'_>> = state
        .endpoints
        .values()
        .map(|e| {
            let problem = if loaded {
                dp.verify(&e.attachment, &e.host_ifname)
                    .err()
                    .map(|x| x.to_string())
            } else {
                Some("datapath not loaded".into())
            };
            EndpointStatus {
                id: e.id,
                namespace: &e.namespace,
                name: &e.name,
                host_veth: &e.host_ifname,
                attach: e.attachment.mode_name(),
                enforcing: problem.is_none(),
                problem,
            }
        })
        .collect();
    if format != Format::Table {
        return structured(
            &StatusOut {
                loaded,
                daemon,
                datapath,
                endpoints,
            },
            format,
        );
    }
    let Some(dpst) = datapath else {
        return emit(&format!(
            "{daemon_line}datapath: not loaded under {} (it is loaded when the first container is added)\nendpoints: {}\n",
            dp.root().display(),
            state.endpoints.len()
        ));
    };
    let px = &dpst.proxies;
    let port = |p: u16| {
        if p == 0 {
            "none (redirected traffic is dropped)".to_owned()
        } else {
            format!("port {p}")
        }
    };
    emit(&format!(
        "{daemon_line}datapath: loaded under {}, policy epoch {}\nflow events: {} sent, {} rate-limited, {} lost (ring buffer full)\nproxies (mark {:#x}): DNS {}, L7 {}{}\n\n",
        dpst.bpf_root.display(),
        dpst.epoch,
        dpst.events_sent,
        dpst.events_rate_limited,
        dpst.events_ringbuf_full,
        px.mark,
        port(px.dns_port),
        port(px.http_port),
        if px.http_port != 0 && !px.l7_steering {
            " (the steering program on lo is not this build's: start the daemon)"
        } else {
            ""
        }
    ))?;
    table(
        &["PROGRAM", "ID", "TAG"],
        dpst.programs
            .iter()
            .map(|p| vec![p.name.clone(), p.id.to_string(), p.tag.clone()])
            .collect(),
    )?;
    emit("\n")?;
    table(
        &["MAP", "ENTRIES", "MAX", "FILL"],
        dpst.maps
            .iter()
            .map(|m| {
                vec![
                    m.name.clone(),
                    m.entries.to_string(),
                    m.max_entries.to_string(),
                    format!(
                        "{:.1}%",
                        100.0 * m.entries as f64 / f64::from(m.max_entries.max(1))
                    ),
                ]
            })
            .collect(),
    )?;
    emit("\n")?;
    table(
        &[
            "ENDPOINT",
            "NAMESPACE",
            "NAME",
            "HOST VETH",
            "ATTACH",
            "ENFORCING",
        ],
        endpoints
            .iter()
            .map(|e| {
                vec![
                    e.id.to_string(),
                    e.namespace.to_owned(),
                    e.name.to_owned(),
                    e.host_veth.to_owned(),
                    e.attach.to_owned(),
                    match &e.problem {
                        None => "yes".to_owned(),
                        Some(p) => format!("NO: {p}"),
                    },
                ]
            })
            .collect(),
    )?;
    budget_lines(&dpst.budgets, &endpoints)
}

/// Endpoints whose conntrack budget is spent or has refused flows.
fn budget_lines(
    budgets: &[palisade::dataplane::BudgetFill],
    endpoints: &[EndpointStatus<'_>],
) -> Result<()> {
    let spent: Vec<_> = budgets
        .iter()
        .filter(|b| b.full() || b.refused > 0)
        .collect();
    if spent.is_empty() {
        return emit("\nconntrack budgets: no endpoint is at its limit\n");
    }
    emit(
        "\nconntrack budgets at their limit (new flows beyond them are dropped: \"budget exceeded\"):\n",
    )?;
    table(
        &[
            "ENDPOINT",
            "NAME",
            "FLOWS OPENED",
            "TRACKED",
            "BUDGET",
            "REFUSED",
            "STATE",
        ],
        spent
            .iter()
            .map(|b| {
                let name = endpoints
                    .iter()
                    .find(|e| e.id == b.ep_id)
                    .map_or_else(String::new, |e| format!("{}/{}", e.namespace, e.name));
                vec![
                    b.ep_id.to_string(),
                    name,
                    match b.direction {
                        Direction::Egress => "by it (egress)".into(),
                        Direction::Ingress => "towards it (ingress)".into(),
                    },
                    b.flows.to_string(),
                    b.budget.to_string(),
                    b.refused.to_string(),
                    if b.full() { "FULL" } else { "refused earlier" }.to_owned(),
                ]
            })
            .collect(),
    )
}

/// What the live maps say for one side of an explained connection.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DatapathAnswer {
    pub direction: Direction,
    pub endpoint: u32,
    pub peer_identity: u32,
    pub allowed: bool,
    pub policy_id: Option<u32>,
    pub agrees: bool,
}

/// `explain --http`: one request judged against the HTTP rules.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub method: String,
    pub path: String,
    /// Some side's rules are HTTP rules only (the connection goes
    /// through the L7 proxy).
    pub governed: bool,
    pub verdict: palisade::l7::Verdict,
}

pub fn explanation(
    e: &Explanation,
    datapath: &[DatapathAnswer],
    http: Option<&HttpAnswer>,
    state: &State,
    format: Format,
) -> Result<()> {
    let http_allowed = http.is_none_or(|h| h.verdict.allowed);
    if format != Format::Table {
        let mut v = serde_json::to_value(e)?;
        v["verdict"] = json!(if e.allowed && http_allowed {
            "allowed"
        } else {
            "denied"
        });
        v["datapath"] = serde_json::to_value(datapath)?;
        if let Some(h) = http {
            v["http"] = json!({
                "method": h.method,
                "path": h.path,
                "throughL7Proxy": h.governed,
                "verdict": h.verdict.as_str(),
                "policies": h.verdict.policies,
                "direction": h.verdict.direction.map(|d| d.as_str()),
            });
        }
        return structured(&v, format);
    }
    let mut out = e.to_string();
    if let Some(h) = http {
        let line = if !e.allowed {
            format!(
                "HTTP {} {}: never reaches HTTP rules (the connection is denied)\n",
                h.method, h.path
            )
        } else if !h.governed {
            format!(
                "HTTP {} {}: allowed (no side allows this connection by HTTP rules only: every request passes)\n",
                h.method, h.path
            )
        } else {
            format!(
                "HTTP {} {}: {} ({} {})\n",
                h.method,
                h.path,
                match h.verdict.as_str() {
                    "denied" => "DENIED with 403 by the node's L7 proxy",
                    "audit" =>
                        "AUDIT: no HTTP rule matches; passed, as its policies are in audit mode",
                    _ => "allowed by the node's L7 proxy",
                },
                if h.verdict.allowed && !h.verdict.audit {
                    "rule of"
                } else {
                    "no rule of"
                },
                h.verdict.policies.join(", ")
            )
        };
        out.push_str(&line);
    }
    for d in datapath {
        let policy = d.policy_id.and_then(|id| {
            state
                .policies
                .iter()
                .find(|(_, p)| p.id == id)
                .map(|(k, _)| k.clone())
        });
        out.push_str(&format!(
            "  datapath {} on endpoint {}: peer identity {}, {}{}{}\n",
            d.direction,
            d.endpoint,
            d.peer_identity,
            if d.allowed { "allowed" } else { "denied" },
            policy.map(|p| format!(" by {p}")).unwrap_or_default(),
            if d.agrees {
                ""
            } else {
                "  << DISAGREES with policy: run `palisadectl sync`"
            }
        ));
    }
    emit(&out)
}

/// What `palisadectl upgrade` did.
pub fn upgrade(report: &palisade::node::UpgradeReport, hash: &str, format: Format) -> Result<()> {
    if format != Format::Table {
        let failed: Vec<Value> = report
            .failed
            .iter()
            .map(|(k, e)| json!({"endpoint": k, "error": e}))
            .collect();
        return structured(
            &json!({
                "programs": hash,
                "upgraded": report.upgraded,
                "current": report.current,
                "stale": report.stale,
                "failed": failed,
            }),
            format,
        );
    }
    let mut s = format!(
        "programs {hash}: {} endpoint(s) upgraded, {} already current, {} with their veth gone, {} failed\n",
        report.upgraded.len(),
        report.current.len(),
        report.stale.len(),
        report.failed.len()
    );
    for (k, e) in &report.failed {
        s.push_str(&format!("  {k}: {e} (it keeps its previous programs)\n"));
    }
    emit(&s)
}
