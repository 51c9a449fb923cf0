//! Flow records: the datapath's events with names attached (endpoints,
//! peers, policies), the bounded on-disk flow log the agent writes, and the
//! filters `palisadectl flows` applies.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Seek, SeekFrom, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::{
    abi::{self, Direction, Event, ID_HOST, ID_WORLD, Reason, Verdict, proto_name},
    identity::reserved_name,
    policy::{Labels, Mode, Policy},
    store::State,
};

/// One side of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowParty {
    /// `pod`, `host` (this node), `node` (another node of the cluster:
    /// `name` is the Node's), `world` or `cidr`.
    pub kind: String,
    pub address: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub identity: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Names the DNS proxy saw resolve to the address (outside peers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
}

impl FlowParty {
    /// `ns/name`, or the address for non-pods.
    pub fn display(&self) -> String {
        match (&self.namespace, &self.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            _ => match self.kind.as_str() {
                "host" => format!("{} (node)", self.address),
                "node" => match &self.name {
                    Some(n) => format!("{} (node {n})", self.address),
                    None => format!("{} (node)", self.address),
                },
                _ if !self.domains.is_empty() => {
                    format!("{} ({})", self.address, self.domains.join(", "))
                }
                _ => self.address.to_string(),
            },
        }
    }
}

/// A flow event with names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowRecord {
    /// RFC 3339, milliseconds.
    pub time: String,
    /// `flow` (a new connection was decided) or `drop`.
    pub kind: String,
    /// Written as `allowed`, `denied` or `audit`.
    pub verdict: Verdict,
    /// Written as its description ("no policy rule allows it").
    pub reason: Reason,
    pub direction: Direction,
    /// The container the event was seen at.
    pub endpoint: FlowParty,
    pub peer: FlowParty,
    pub protocol: String,
    pub sport: u16,
    pub dport: u16,
    /// The policy that decided: the NetworkPolicy whose rule allowed the
    /// flow, or the AdminNetworkPolicy / BaselineAdminNetworkPolicy /
    /// ClusterNetworkPolicy (`Kind/name`) whose rule allowed or denied it,
    /// or (verdict audit) whose audited Deny would have denied it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The deciding policy's tier: `Admin`, `NetworkPolicy` or `Baseline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// For denied and audited flows: the policies that isolate the
    /// endpoint in this direction (no rule of theirs allows the flow).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isolated_by: Vec<String>,
    /// A DNS query the node's DNS proxy answered (kind `dns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsInfo>,
    /// An HTTP request the node's L7 proxy judged (kind `http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpInfo>,
}

/// The HTTP part of an `http` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpInfo {
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The path with its query.
    pub path: String,
    /// The answer's status (403 for a denied request; 200 for a denied
    /// gRPC call, whose `grpcStatus` is 7).
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// Microseconds from the request's arrival at the proxy to its
    /// answer's headers.
    pub latency_micros: u64,
}

/// The DNS part of a `dns` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsInfo {
    pub name: String,
    pub qtype: String,
    /// The answer's response code (REFUSED when DNS rules denied the name).
    pub rcode: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<IpAddr>,
    /// Microseconds from the answer's arrival at the proxy to its
    /// addresses being in the datapath.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath_micros: Option<u64>,
}

impl FlowRecord {
    /// The side that opened the connection.
    pub fn client(&self) -> &FlowParty {
        match self.direction {
            Direction::Egress => &self.endpoint,
            Direction::Ingress => &self.peer,
        }
    }

    pub fn server(&self) -> &FlowParty {
        match self.direction {
            Direction::Egress => &self.peer,
            Direction::Ingress => &self.endpoint,
        }
    }

    /// `default deny (isolated by x/p)`, `x/allow-web`, or why it passed.
    pub fn decided_by(&self) -> String {
        if let Some(d) = &self.dns {
            let answers: Vec<String> = d.answers.iter().map(ToString::to_string).collect();
            return format!(
                "DNS {} {} -> {}{} ({})",
                d.qtype,
                d.name,
                d.rcode,
                if answers.is_empty() {
                    String::new()
                } else {
                    format!(" {}", answers.join(","))
                },
                self.policy.as_deref().unwrap_or("the DNS proxy")
            );
        }
        if let Some(h) = &self.http {
            return format!(
                "HTTP {} {} -> {}{} ({})",
                h.method,
                h.path,
                h.status,
                h.grpc_status
                    .map(|g| format!(" grpc-status {g}"))
                    .unwrap_or_default(),
                self.policy.as_deref().unwrap_or("the L7 proxy")
            );
        }
        if let Some(p) = &self.policy {
            return p.clone();
        }
        if !self.isolated_by.is_empty() {
            return format!("default deny (isolated by {})", self.isolated_by.join(", "));
        }
        self.reason.to_string()
    }
}

/// One connection, however many endpoints reported it: a pod-to-pod
/// connection is seen by the client's egress and the server's ingress, and
/// it went through only if both allowed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub client: FlowParty,
    pub server: FlowParty,
    pub protocol: String,
    pub sport: u16,
    pub dport: u16,
    /// The worst verdict any side gave: denied, then audit, then allowed.
    pub verdict: Verdict,
}

/// Merge flow records into connections (keyed by both addresses, ports
/// and protocol), in the order they were first seen.
pub fn connections<'a>(records: impl IntoIterator<Item = &'a FlowRecord>) -> Vec<Connection> {
    let mut index: BTreeMap<(IpAddr, u16, IpAddr, u16, String), usize> = BTreeMap::new();
    let mut out: Vec<Connection> = Vec::new();
    for r in records
        .into_iter()
        .filter(|r| r.dns.is_none() && r.http.is_none())
    {
        let (c, s) = (r.client(), r.server());
        let key = (c.address, r.sport, s.address, r.dport, r.protocol.clone());
        match index.get(&key) {
            Some(&i) => {
                let conn = &mut out[i];
                if r.verdict.severity() > conn.verdict.severity() {
                    conn.verdict = r.verdict;
                }
                // Each side knows itself best (its own endpoint record).
                if conn.client.kind != "pod" && c.kind == "pod" {
                    conn.client = c.clone();
                }
                if conn.server.kind != "pod" && s.kind == "pod" {
                    conn.server = s.clone();
                }
            }
            None => {
                index.insert(key, out.len());
                out.push(Connection {
                    client: c.clone(),
                    server: s.clone(),
                    protocol: r.protocol.clone(),
                    sport: r.sport,
                    dport: r.dport,
                    verdict: r.verdict,
                });
            }
        }
    }
    out
}

/// Names for the numbers in events, from the store.
#[derive(Debug)]
pub struct Resolver {
    endpoints: BTreeMap<u32, (String, String, Labels, Vec<IpAddr>)>,
    by_address: BTreeMap<IpAddr, u32>,
    host: Vec<IpAddr>,
    /// Other nodes' addresses (cluster mode), with the node's name.
    nodes: BTreeMap<IpAddr, String>,
    /// Policy number → (name, tier).
    policy_names: BTreeMap<u32, (String, &'static str)>,
    policies: Vec<(Policy, Mode)>,
    /// Names learned for outside addresses.
    fqdns: crate::fqdn::FqdnCache,
}

impl Resolver {
    pub fn new(state: &State) -> Self {
        let mut endpoints = BTreeMap::new();
        let mut by_address = BTreeMap::new();
        for ep in state.endpoints.values() {
            for a in &ep.addresses {
                by_address.insert(*a, ep.id);
            }
            endpoints.insert(
                ep.id,
                (
                    ep.namespace.clone(),
                    ep.name.clone(),
                    state.effective_labels(ep),
                    ep.addresses.clone(),
                ),
            );
        }
        // Pods on other nodes (cluster mode): named, without their labels
        // (a cluster has many; the flow's identity says what matched).
        for r in state.remote.values() {
            for a in &r.addresses {
                by_address.entry(*a).or_insert(r.id);
            }
            endpoints.insert(
                r.id,
                (
                    r.namespace.clone(),
                    r.name.clone(),
                    Labels::new(),
                    r.addresses.clone(),
                ),
            );
        }
        let namespaces = state.namespace_map();
        let policies = state.policies();
        Self {
            endpoints,
            by_address,
            host: state.host_addresses.clone(),
            nodes: state
                .nodes
                .values()
                .flat_map(|n| n.addresses.iter().map(|a| (*a, n.name.clone())))
                .collect(),
            policy_names: state
                .policies
                .iter()
                .map(|(k, sp)| (sp.id, (k.clone(), "NetworkPolicy")))
                .chain(
                    state
                        .palisade_policies
                        .values()
                        .map(|sp| (sp.id, (sp.policy.base.key(), "NetworkPolicy"))),
                )
                .chain(state.tier_policies.values().map(|t| {
                    (
                        t.id,
                        (
                            format!("{}/{}", t.policy.kind.as_str(), t.policy.name),
                            t.policy.tier.as_str(),
                        ),
                    )
                }))
                .collect(),
            fqdns: state.fqdns.clone(),
            policies: policies
                .into_iter()
                .map(|(_, p)| {
                    let m = state.effective_mode(&p, &namespaces);
                    (p, m)
                })
                .collect(),
        }
    }

    /// A record of a request the L7 proxy judged, seen at the endpoint
    /// whose rules decided (the server's for ingress rules).
    pub fn resolve_http(&self, r: &crate::l7::HttpRecord, time: SystemTime) -> FlowRecord {
        let (at, other) = match r.direction {
            Direction::Egress => (r.client, r.server),
            Direction::Ingress => (r.server, r.client),
        };
        let verdict = match r.verdict.as_str() {
            "denied" => Verdict::Deny,
            "audit" => Verdict::Audit,
            _ => Verdict::Allow,
        };
        FlowRecord {
            time: humantime::format_rfc3339_millis(time).to_string(),
            kind: "http".into(),
            verdict,
            reason: if verdict == Verdict::Allow {
                Reason::Policy
            } else {
                Reason::DropPolicy
            },
            direction: r.direction,
            endpoint: self.party(at.ip(), 0, None),
            peer: self.party(other.ip(), 0, None),
            protocol: "TCP".into(),
            sport: r.client.port(),
            dport: r.server.port(),
            policy: r.policy.clone(),
            tier: None,
            isolated_by: Vec::new(),
            dns: None,
            http: Some(HttpInfo {
                method: r.method.clone(),
                host: r.host.clone(),
                path: r.path.clone(),
                status: r.status,
                grpc_status: r.grpc_status,
                latency_micros: r.latency_micros,
            }),
        }
    }

    /// A record of a query the DNS proxy answered.
    pub fn resolve_dns(&self, r: &crate::dnsproxy::DnsRecord, time: SystemTime) -> FlowRecord {
        let endpoint = self.party(r.client, 0, None);
        let peer = self.party(r.server.ip(), 0, None);
        let verdict = match r.verdict.as_str() {
            "denied" => Verdict::Deny,
            _ => Verdict::Allow,
        };
        FlowRecord {
            time: humantime::format_rfc3339_millis(time).to_string(),
            kind: "dns".into(),
            verdict,
            reason: if verdict == Verdict::Deny {
                Reason::DropPolicy
            } else {
                Reason::Policy
            },
            direction: Direction::Egress,
            endpoint,
            peer,
            protocol: r.protocol.clone(),
            sport: 0,
            dport: r.server.port(),
            policy: r.policy.clone(),
            tier: None,
            isolated_by: Vec::new(),
            dns: Some(DnsInfo {
                name: r.name.clone(),
                qtype: r.qtype.clone(),
                rcode: r.rcode.clone(),
                answers: r.answers.clone(),
                datapath_micros: (!r.answers.is_empty()).then_some(r.learn_micros),
            }),
            http: None,
        }
    }

    fn party(&self, addr: IpAddr, identity: u32, ep_id: Option<u32>) -> FlowParty {
        let ep = ep_id
            .or_else(|| self.by_address.get(&addr).copied())
            .and_then(|id| self.endpoints.get(&id));
        if let Some((ns, name, labels, _)) = ep {
            return FlowParty {
                kind: "pod".into(),
                address: addr,
                namespace: Some(ns.clone()),
                name: Some(name.clone()),
                identity,
                labels: labels.clone(),
                domains: Vec::new(),
            };
        }
        let node = self.nodes.get(&addr);
        let kind = if identity == ID_HOST || self.host.contains(&addr) {
            "host"
        } else if node.is_some() {
            "node"
        } else if identity == ID_WORLD || reserved_name(identity).is_some() {
            "world"
        } else {
            "cidr"
        };
        FlowParty {
            kind: kind.into(),
            address: addr,
            namespace: None,
            name: (kind == "node").then(|| node.cloned()).flatten(),
            identity,
            labels: Labels::new(),
            domains: if matches!(kind, "world" | "cidr") {
                self.fqdns.names_of(addr)
            } else {
                Vec::new()
            },
        }
    }

    /// Attach names to an event that happened at `time`.
    /// Whether the endpoint an event was seen at is one this resolver
    /// names (a newer one needs the store read again).
    pub fn knows_endpoint(&self, ep_id: u32) -> bool {
        self.endpoints.contains_key(&ep_id)
    }

    pub fn resolve(&self, e: &Event, time: SystemTime) -> FlowRecord {
        let direction = Direction::from_u8(e.direction).unwrap_or(Direction::Ingress);
        let (src, dst) = (abi::ip_from16(e.saddr), abi::ip_from16(e.daddr));
        let (own, peer_addr) = match direction {
            Direction::Egress => (src, dst),
            Direction::Ingress => (dst, src),
        };
        let endpoint = self.party(own, e.identity, Some(e.ep_id));
        let peer = self.party(peer_addr, e.peer_identity, None);
        let verdict = Verdict::from_u8(e.verdict);
        let decided = (e.policy_id != 0)
            .then(|| self.policy_names.get(&e.policy_id).cloned())
            .flatten();
        let by_tier = decided.as_ref().is_some_and(|d| d.1 != "NetworkPolicy");
        let (policy, tier) = match decided {
            Some((name, tier)) => (Some(name), Some(tier.to_owned())),
            None => (None, None),
        };
        let isolated_by = if !by_tier
            && matches!(verdict, Verdict::Deny | Verdict::Audit)
            && Reason::from_code(e.reason) == Reason::DropPolicy
        {
            let (ns, labels) = (
                endpoint.namespace.clone().unwrap_or_default(),
                endpoint.labels.clone(),
            );
            self.policies
                .iter()
                .filter(|(p, _)| {
                    p.selects(&ns, &labels)
                        && match direction {
                            Direction::Ingress => p.ingress_isolation,
                            Direction::Egress => p.egress_isolation,
                        }
                })
                .map(|(p, m)| {
                    if *m == Mode::Audit {
                        format!("{} (audit)", p.key())
                    } else {
                        p.key()
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        FlowRecord {
            time: humantime::format_rfc3339_millis(time).to_string(),
            kind: if e.kind == abi::EVENT_DROP {
                "drop"
            } else {
                "flow"
            }
            .into(),
            verdict,
            reason: Reason::from_code(e.reason),
            direction,
            endpoint,
            peer,
            protocol: proto_name(e.protocol),
            sport: u16::from_be(e.sport_be),
            dport: u16::from_be(e.dport_be),
            policy,
            tier,
            isolated_by,
            dns: None,
            http: None,
        }
    }
}

/// What `palisadectl flows` shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub verdict: Option<Verdict>,
    /// `ns/name` on either side.
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub port: Option<u16>,
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        let sides = [&r.endpoint, &r.peer];
        self.verdict.is_none_or(|v| r.verdict == v)
            && self.port.is_none_or(|p| r.dport == p)
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| sides.iter().any(|s| s.namespace.as_deref() == Some(ns)))
            && self.pod.as_deref().is_none_or(|pod| {
                let (ns, name) = pod.split_once('/').unwrap_or(("default", pod));
                sides
                    .iter()
                    .any(|s| s.namespace.as_deref() == Some(ns) && s.name.as_deref() == Some(name))
            })
    }
}

/// A size-capped flow log: `flows.log` plus rotated `flows.log.1` ...
/// `flows.log.{files-1}`; all of them together never exceed `max_bytes`.
#[derive(Debug)]
pub struct FlowLog {
    dir: PathBuf,
    max_bytes: u64,
    files: u32,
    current: Option<File>,
    size: u64,
}

pub const LOG_NAME: &str = "flows.log";

impl FlowLog {
    pub fn open(dir: &Path, max_bytes: u64, files: u32) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(LOG_NAME);
        let f = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = f.metadata()?.len();
        Ok(Self {
            dir: dir.to_owned(),
            max_bytes,
            files: files.max(1),
            current: Some(f),
            size,
        })
    }

    fn per_file(&self) -> u64 {
        self.max_bytes / u64::from(self.files)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.current = None;
        let name = |i: u32| {
            if i == 0 {
                self.dir.join(LOG_NAME)
            } else {
                self.dir.join(format!("{LOG_NAME}.{i}"))
            }
        };
        let last = self.files - 1;
        if last == 0 {
            fs::remove_file(name(0)).or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        } else {
            let _ = fs::remove_file(name(last));
            for i in (0..last).rev() {
                match fs::rename(name(i), name(i + 1)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.current = Some(OpenOptions::new().create(true).append(true).open(name(0))?);
        self.size = 0;
        Ok(())
    }

    /// Append one record (a JSON line). A record larger than a whole file
    /// is dropped rather than break the cap.
    pub fn append(&mut self, r: &FlowRecord) -> io::Result<bool> {
        let mut line = serde_json::to_vec(r).map_err(io::Error::other)?;
        line.push(b'\n');
        let len = line.len() as u64;
        if len > self.per_file() {
            return Ok(false);
        }
        if self.size + len > self.per_file() {
            self.rotate()?;
        }
        let f = self
            .current
            .as_mut()
            .ok_or_else(|| io::Error::other("flow log closed"))?;
        f.write_all(&line)?;
        self.size += len;
        Ok(true)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.current {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// The log's files, oldest first.
pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(u32, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix(&format!("{LOG_NAME}."))?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let current = dir.join(LOG_NAME);
    if current.exists() {
        out.push(current);
    }
    out
}

/// Every record in the log, oldest first (malformed lines, including
/// bytes that are not UTF-8, are skipped; the lines after them are read).
pub fn read_log(dir: &Path) -> Vec<FlowRecord> {
    let mut out = Vec::new();
    for f in log_files(dir) {
        if let Ok(file) = File::open(&f) {
            for line in BufReader::new(file).split(b'\n').map_while(Result::ok) {
                if let Ok(r) = serde_json::from_slice(&line) {
                    out.push(r);
                }
            }
        }
    }
    out
}

/// Follows the current log file across rotations.
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    pos: u64,
    inode: u64,
}

impl Tail {
    /// Start at the end of the log (only new records).
    pub fn at_end(dir: &Path) -> Self {
        let path = dir.join(LOG_NAME);
        let (pos, inode) = fs::metadata(&path)
            .map(|m| (m.len(), std::os::unix::fs::MetadataExt::ino(&m)))
            .unwrap_or((0, 0));
        Self { path, pos, inode }
    }

    /// Records appended since the last call.
    pub fn poll(&mut self) -> Vec<FlowRecord> {
        let Ok(meta) = fs::metadata(&self.path) else {
            return Vec::new();
        };
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        if inode != self.inode || meta.len() < self.pos {
            // Rotated: the new file starts from the beginning.
            self.inode = inode;
            self.pos = 0;
        }
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut reader = BufReader::new(f);
        let mut line = Vec::new();
        // Bytes, not text: a damaged line (not UTF-8) is skipped like any
        // malformed one instead of stopping the tail there for good.
        while let Ok(n) = reader.read_until(b'\n', &mut line) {
            if n == 0 || line.last() != Some(&b'\n') {
                break; // a partial line is read again next time
            }
            self.pos += n as u64;
            if let Ok(r) = serde_json::from_slice(&line) {
                out.push(r);
            }
            line.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u16) -> FlowRecord {
        FlowRecord {
            time: "2026-01-01T00:00:00.000Z".into(),
            kind: "flow".into(),
            verdict: Verdict::Allow,
            reason: Reason::Policy,
            direction: Direction::Ingress,
            endpoint: FlowParty {
                kind: "pod".into(),
                address: "10.0.0.2".parse().unwrap(),
                namespace: Some("x".into()),
                name: Some("a".into()),
                identity: 256,
                labels: Labels::new(),
                domains: Vec::new(),
            },
            peer: FlowParty {
                kind: "world".into(),
                address: "192.0.2.1".parse().unwrap(),
                namespace: None,
                name: None,
                identity: 2,
                labels: Labels::new(),
                domains: Vec::new(),
            },
            protocol: "TCP".into(),
            sport: 40000,
            dport: i,
            policy: None,
            tier: None,
            isolated_by: vec![],
            dns: None,
            http: None,
        }
    }

    #[test]
    fn the_log_rotates_and_never_exceeds_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FlowLog::open(dir.path(), 4096, 3).unwrap();
        for i in 0..500 {
            log.append(&rec(i)).unwrap();
        }
        log.flush().unwrap();
        let total: u64 = log_files(dir.path())
            .iter()
            .map(|f| fs::metadata(f).unwrap().len())
            .sum();
        assert!(total <= 4096, "{total} bytes");
        assert_eq!(log_files(dir.path()).len(), 3);
        let back = read_log(dir.path());
        assert!(!back.is_empty());
        // Oldest first, newest last, nothing out of order.
        assert!(
            back.windows(2).all(|w| w[0].dport < w[1].dport),
            "{:?}",
            back.iter().map(|r| r.dport).collect::<Vec<_>>()
        );
        assert_eq!(back.last().unwrap().dport, 499);
    }

    #[test]
    fn tail_follows_across_rotation_and_filters_match_either_side() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FlowLog::open(dir.path(), 2000, 2).unwrap();
        let mut tail = Tail::at_end(dir.path());
        let mut seen = Vec::new();
        for i in 0..40 {
            log.append(&rec(i)).unwrap();
            log.flush().unwrap();
            seen.extend(tail.poll().into_iter().map(|r| r.dport));
        }
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
        let f = Filter {
            pod: Some("x/a".into()),
            port: Some(7),
            ..Default::default()
        };
        assert!(f.matches(&rec(7)));
        assert!(!f.matches(&rec(8)));
        assert!(
            !Filter {
                namespace: Some("y".into()),
                ..Default::default()
            }
            .matches(&rec(7))
        );
        let denied = Filter {
            verdict: Some(Verdict::Deny),
            ..Default::default()
        };
        assert!(!denied.matches(&rec(7)));
        assert!(denied.matches(&FlowRecord {
            verdict: Verdict::Deny,
            ..rec(7)
        }));
    }

    /// A line as the string-typed records wrote it.
    const DENIED_LINE: &str = concat!(
        r#"{"time":"2026-01-01T00:00:00.000Z","kind":"drop","verdict":"denied","#,
        r#""reason":"no policy rule allows it","direction":"ingress","#,
        r#""endpoint":{"kind":"pod","address":"10.0.0.2","namespace":"x","name":"a","#,
        r#""identity":256,"labels":{"app":"a"}},"#,
        r#""peer":{"kind":"world","address":"192.0.2.1","identity":2},"#,
        r#""protocol":"TCP","sport":40000,"dport":7,"isolatedBy":["x/deny-all"]}"#
    );

    #[test]
    fn records_read_and_write_the_same_words_as_before() {
        let r: FlowRecord = serde_json::from_str(DENIED_LINE).unwrap();
        assert_eq!((r.verdict, r.reason), (Verdict::Deny, Reason::DropPolicy));
        assert_eq!(serde_json::to_string(&r).unwrap(), DENIED_LINE);
        for v in [Verdict::Allow, Verdict::Audit] {
            let mut r = rec(7);
            r.verdict = v;
            r.reason = Reason::NotIsolated;
            let line = serde_json::to_string(&r).unwrap();
            assert!(
                line.contains(&format!(
                    r#""verdict":"{v}","reason":"no policy isolates the endpoint in this direction""#
                )),
                "{line}"
            );
            assert_eq!(serde_json::from_str::<FlowRecord>(&line).unwrap(), r);
        }
    }

    #[test]
    fn a_log_with_words_from_another_version_still_reads_whole() {
        let dir = tempfile::tempdir().unwrap();
        let other = DENIED_LINE
            .replace("no policy rule allows it", "dropped by a future rule")
            .replace(r#""verdict":"denied""#, r#""verdict":"rerouted""#);
        let unknown_code =
            DENIED_LINE.replace("no policy rule allows it", "unknown reason (code -9)");
        fs::write(
            dir.path().join(LOG_NAME),
            format!("{DENIED_LINE}\n{other}\n{unknown_code}\n"),
        )
        .unwrap();
        let back: Vec<_> = read_log(dir.path())
            .into_iter()
            .map(|r| (r.verdict, r.reason))
            .collect();
        assert_eq!(
            back,
            [
                (Verdict::Deny, Reason::DropPolicy),
                (Verdict::None, Reason::Unrecognised),
                (Verdict::Deny, Reason::Unknown(-9)),
            ]
        );
    }

    #[test]
    fn a_connection_takes_the_worst_verdict_of_its_two_ends() {
        let allowed_out = FlowRecord {
            direction: Direction::Egress,
            ..rec(80)
        };
        let mut denied_in = FlowRecord {
            verdict: Verdict::Deny,
            reason: Reason::DropPolicy,
            ..allowed_out.clone()
        };
        // The server's ingress sees the same connection from its side.
        denied_in.direction = Direction::Ingress;
        std::mem::swap(&mut denied_in.endpoint, &mut denied_in.peer);
        let conns = connections(&[allowed_out, denied_in]);
        assert_eq!(conns.len(), 1, "{conns:?}");
        assert_eq!(conns[0].verdict, Verdict::Deny);
    }
}
