//! palisade's own policy kind, `palisade.io/v1alpha1`
//! PalisadeNetworkPolicy: a NetworkPolicy (same podSelector, policyTypes,
//! ingress/egress, from/to and ports) whose egress rules may also name
//! destinations by domain (`toFQDNs`) and whose port-53 entries may limit
//! the names a pod may look up (`rules.dns`). Field names and matching
//! follow CiliumNetworkPolicy's, so a Cilium policy ports by changing its
//! envelope.
//!
//! The L3/L4 part validates exactly as a NetworkPolicy (it is one, with the
//! DNS parts taken out); a `toFQDNs` rule allows the addresses the node's
//! DNS proxy has seen answered for a matching name (see [`crate::fqdn`]).

use k8s_openapi::{
    api::networking::v1::{
        NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
        NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, apis::meta::v1::ObjectMeta},
};
use serde::{Deserialize, Serialize};

use super::{HeaderMatch, HttpRule, ObjectError, Policy, PolicyKind, PortMatch, Protocol};

pub const API_VERSION: &str = "palisade.io/v1alpha1";
pub const KIND: &str = "PalisadeNetworkPolicy";

/// The port DNS rules apply to.
pub const DNS_PORT: u16 = 53;
/// Limits on what one policy may list (keeps a policy's cost bounded).
const MAX_FQDNS: usize = 256;
const MAX_NAME_LEN: usize = 255;

// ---------------------------------------------------------------------
// Wire types.

/// A PalisadeNetworkPolicy as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PalisadeNetworkPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WireSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<WireIngress>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<WireEgress>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireIngress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<NetworkPolicyPeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<WirePort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireEgress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<NetworkPolicyPeer>>,
    #[serde(default, rename = "toFQDNs", skip_serializing_if = "Option::is_none")]
    pub to_fqdns: Option<Vec<WireFqdn>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<WirePort>>,
}

/// A NetworkPolicyPort with L7 rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WirePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<WireRules>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireRules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<WireFqdn>>,
    /// HTTP rules: the connections go through the node's L7 proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<WireHttpRule>>,
}

/// CiliumNetworkPolicy's PortRuleHTTP.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireHttpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `Name` (present) or `Name: value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_matches: Option<Vec<WireHeaderMatch>>,
}

/// CiliumNetworkPolicy's HeaderMatch; `secret` and `mismatch` are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireHeaderMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mismatch: Option<String>,
}

/// `matchName` or `matchPattern`, as in Cilium's FQDNSelector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireFqdn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_pattern: Option<String>,
}

// ---------------------------------------------------------------------
// Domain.

/// A name or a pattern that DNS names are matched against, lowercase and
/// without the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FqdnSelector {
    /// One exact name.
    Name(String),
    /// `*` matches any run of name characters within one label (`*` alone
    /// matches every name); a leading `**.` matches one or more labels.
    Pattern(String),
}

impl FqdnSelector {
    /// Whether `name` (any case, trailing dot or not) is selected.
    pub fn matches(&self, name: &str) -> bool {
        let name = normalize(name);
        match self {
            Self::Name(n) => *n == name,
            Self::Pattern(p) => pattern_matches(p, &name),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Name(n) | Self::Pattern(n) => n,
        }
    }
}

impl std::fmt::Display for FqdnSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Name(n) => write!(f, "matchName {n}"),
            Self::Pattern(p) => write!(f, "matchPattern {p}"),
        }
    }
}

/// A DNS name as compared: lowercase, without the root's trailing dot.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

fn pattern_matches(pattern: &str, name: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(rest) = pattern.strip_prefix("**.") {
        // One or more whole labels, then the rest.
        let mut tail = name;
        while let Some((_, after)) = tail.split_once('.') {
            if labels_match(rest, after) {
                return true;
            }
            tail = after;
        }
        return false;
    }
    labels_match(pattern, name)
}

fn labels_match(pattern: &str, name: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let n: Vec<&str> = name.split('.').collect();
    p.len() == n.len()
        && p.iter()
            .zip(&n)
            .all(|(p, n)| glob(p.as_bytes(), n.as_bytes()))
}

/// `*` matches any run (maybe empty) of characters within the label.
fn glob(p: &[u8], n: &[u8]) -> bool {
    match p.split_first() {
        None => n.is_empty(),
        Some((b'*', rest)) => (0..=n.len()).any(|i| glob(rest, &n[i..])),
        Some((c, rest)) => n.first() == Some(c) && glob(rest, &n[1..]),
    }
}

/// The DNS rules of one egress rule's port-53 entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRule {
    /// Index of the egress rule in [`PalisadePolicy::base`].
    pub rule: usize,
    pub protocol: Protocol,
    pub names: Vec<FqdnSelector>,
}

/// A validated PalisadeNetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PalisadePolicy {
    /// The L3/L4 policy. An egress rule with `toFQDNs` has no peers here
    /// and allows only the addresses learned for its names (see
    /// [`crate::fqdn::expand`]), never every peer.
    pub base: Policy,
    /// Per egress rule of `base`, its `toFQDNs` (empty: an ordinary rule).
    pub egress_fqdns: Vec<Vec<FqdnSelector>>,
    /// Port-53 entries with DNS rules.
    pub dns: Vec<DnsRule>,
}

impl PalisadePolicy {
    /// Whether the pods this policy selects send DNS through the proxy
    /// (it learns addresses for them, or limits their names).
    pub fn uses_dns_proxy(&self) -> bool {
        !self.dns.is_empty() || self.egress_fqdns.iter().any(|f| !f.is_empty())
    }

    /// Every FQDN selector the policy's rules name.
    pub fn fqdn_selectors(&self) -> impl Iterator<Item = &FqdnSelector> {
        self.egress_fqdns.iter().flatten()
    }
}

// ---------------------------------------------------------------------
// Validation.

fn invalid(path: &str, message: impl Into<String>) -> ObjectError {
    ObjectError::invalid(path, message)
}

fn fqdn(w: &WireFqdn, path: &str) -> Result<FqdnSelector, ObjectError> {
    let (field, raw, pattern) = match (&w.match_name, &w.match_pattern) {
        (Some(n), None) => ("matchName", n, false),
        (None, Some(p)) => ("matchPattern", p, true),
        (Some(_), Some(_)) => {
            return Err(invalid(
                path,
                "set only one of matchName and matchPattern (found both)",
            ));
        }
        (None, None) => {
            return Err(invalid(path, "set exactly one of matchName, matchPattern"));
        }
    };
    let fpath = format!("{path}.{field}");
    let value = normalize(raw.trim());
    if value.is_empty() {
        return Err(invalid(
            &fpath,
            "empty: write a DNS name such as api.example.com",
        ));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(invalid(
            &fpath,
            format!(
                "{} characters; a DNS name has at most {MAX_NAME_LEN}",
                value.len()
            ),
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if let Some(bad) = value
        .chars()
        .find(|c| !(allowed(*c) || (pattern && *c == '*')))
    {
        let hint = if bad == '*' {
            " ('*' is for matchPattern)"
        } else {
            ""
        };
        return Err(invalid(
            &fpath,
            format!(
                "{raw:?} has {bad:?}: use letters, digits, '-', '_' and '.'{hint}{}",
                if pattern { " and '*'" } else { "" }
            ),
        ));
    }
    let labels = value.strip_prefix("**.").unwrap_or(&value);
    if value != "*" && labels.split('.').any(str::is_empty) {
        return Err(invalid(&fpath, format!("{raw:?} has an empty label")));
    }
    if labels.contains("**") {
        return Err(invalid(
            &fpath,
            format!("{raw:?}: '**' may only start a pattern, as '**.' (any number of labels)"),
        ));
    }
    Ok(if pattern {
        FqdnSelector::Pattern(value)
    } else {
        FqdnSelector::Name(value)
    })
}

/// Limits on one port's HTTP rules (keeps a policy's cost bounded).
const MAX_HTTP_RULES: usize = 256;
const MAX_REGEX_LEN: usize = 1024;

/// A regular expression matched against a whole value, compiled as the
/// proxy compiles it.
pub fn whole_match_regex(re: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .build()
}

fn http_regex(value: &Option<String>, path: &str) -> Result<Option<String>, ObjectError> {
    let Some(re) = value else { return Ok(None) };
    if re.is_empty() {
        return Err(invalid(
            path,
            "empty: give a regular expression, or leave the field out to match every value",
        ));
    }
    if re.len() > MAX_REGEX_LEN {
        return Err(invalid(
            path,
            format!("{} characters; at most {MAX_REGEX_LEN}", re.len()),
        ));
    }
    if let Err(e) = whole_match_regex(re) {
        let detail = e.to_string();
        let last = detail.lines().last().unwrap_or("").trim().to_string();
        return Err(invalid(
            path,
            format!("{re:?} is not a valid regular expression: {last}"),
        ));
    }
    Ok(Some(re.clone()))
}

fn header_name(name: &str, path: &str) -> Result<String, ObjectError> {
    let name = name.trim();
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(invalid(
            path,
            format!("{name:?} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"),
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// The HTTP rules of one port entry (empty when it has none).
fn http_rules(p: &WirePort, ppath: &str) -> Result<Vec<HttpRule>, ObjectError> {
    let Some(list) = p.rules.as_ref().and_then(|r| r.http.as_ref()) else {
        return Ok(Vec::new());
    };
    let hpath = format!("{ppath}.rules.http");
    if list.is_empty() {
        return Err(invalid(
            &hpath,
            "empty: list at least one HTTP rule ({} allows every request), or leave rules out",
        ));
    }
    if list.len() > MAX_HTTP_RULES {
        return Err(invalid(
            &hpath,
            format!(
                "{} rules; a port may list at most {MAX_HTTP_RULES}",
                list.len()
            ),
        ));
    }
    let port = super::convert_port(&plain_port(p), ppath)?;
    if port.protocol != Protocol::Tcp {
        return Err(invalid(
            &format!("{ppath}.protocol"),
            "HTTP rules apply to TCP ports; set protocol: TCP (or leave it out)",
        ));
    }
    match port.port {
        PortMatch::Range(a, b) if a == b => {}
        PortMatch::Named(_) => {}
        PortMatch::All => {
            return Err(invalid(
                &format!("{ppath}.port"),
                "HTTP rules need the port the HTTP server listens on: set port",
            ));
        }
        PortMatch::Range(..) => {
            return Err(invalid(
                &format!("{ppath}.endPort"),
                "HTTP rules apply to one port: remove endPort (write one entry per port)",
            ));
        }
    }
    let mut out = Vec::new();
    for (k, w) in list.iter().enumerate() {
        let rpath = format!("{hpath}[{k}]");
        let mut rule = HttpRule {
            method: http_regex(&w.method, &format!("{rpath}.method"))?,
            path: http_regex(&w.path, &format!("{rpath}.path"))?,
            host: http_regex(&w.host, &format!("{rpath}.host"))?,
            headers: Vec::new(),
        };
        for (h, text) in w.headers.iter().flatten().enumerate() {
            let path = format!("{rpath}.headers[{h}]");
            let (name, value) = match text.split_once(':') {
                Some((n, v)) => (n, Some(v.trim().to_string())),
                None => (text.as_str(), None),
            };
            rule.headers.push(HeaderMatch {
                name: header_name(name, &path)?,
                value,
            });
        }
        for (h, m) in w.header_matches.iter().flatten().enumerate() {
            let path = format!("{rpath}.headerMatches[{h}]");
            if m.secret.is_some() {
                return Err(invalid(
                    &format!("{path}.secret"),
                    "header values from secrets are not supported: give value",
                ));
            }
            if m.mismatch.is_some() {
                return Err(invalid(
                    &format!("{path}.mismatch"),
                    "mismatch actions are not supported: a request whose header does not match is denied",
                ));
            }
            let Some(name) = &m.name else {
                return Err(invalid(
                    &format!("{path}.name"),
                    "missing: name the header to match",
                ));
            };
            rule.headers.push(HeaderMatch {
                name: header_name(name, &format!("{path}.name"))?,
                value: m.value.clone(),
            });
        }
        out.push(rule);
    }
    Ok(out)
}

/// Give each port entry of `rules` its HTTP rules (`http[i][j]` for port
/// `j` of rule `i`; the conversion keeps rules and ports in order).
fn attach_http(rules: &mut [super::Rule], http: Vec<Vec<Vec<HttpRule>>>) {
    for (rule, per_port) in rules.iter_mut().zip(http) {
        for (port, h) in rule.ports.iter_mut().zip(per_port) {
            port.http = h;
        }
    }
}

fn plain_port(p: &WirePort) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: p.protocol.clone(),
        port: p.port.clone(),
        end_port: p.end_port,
    }
}

/// Validate a PalisadeNetworkPolicy; the object is returned with its
/// namespace defaulted.
pub fn validate(
    mut obj: PalisadeNetworkPolicy,
) -> Result<(PalisadeNetworkPolicy, PalisadePolicy), ObjectError> {
    super::default_namespace(&mut obj.metadata);
    let spec = &obj.spec;
    // DNS rules are about what a pod may resolve: egress only. HTTP rules
    // go on either side.
    let mut ingress_http = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let mut per_port = Vec::new();
        for (j, p) in r.ports.iter().flatten().enumerate() {
            let ppath = format!("spec.ingress[{i}].ports[{j}]");
            let Some(rules) = &p.rules else {
                per_port.push(Vec::new());
                continue;
            };
            if rules.dns.is_some() {
                return Err(invalid(
                    &format!("{ppath}.rules.dns"),
                    "DNS rules limit what the selected pods look up: put them on an egress port 53",
                ));
            }
            per_port.push(http_rules(p, &ppath)?);
        }
        ingress_http.push(per_port);
    }
    let mut egress_http = Vec::new();
    let mut egress_fqdns = Vec::new();
    let mut dns = Vec::new();
    let mut fqdn_count = 0;
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        let mut names = Vec::new();
        if let Some(list) = &r.to_fqdns {
            if list.is_empty() {
                return Err(invalid(
                    &format!("{path}.toFQDNs"),
                    "empty: list at least one matchName or matchPattern, or leave toFQDNs out",
                ));
            }
            if r.to.is_some() {
                return Err(invalid(
                    &format!("{path}.toFQDNs"),
                    "toFQDNs cannot be combined with to in one rule; write them as separate egress rules",
                ));
            }
            for (j, f) in list.iter().enumerate() {
                names.push(fqdn(f, &format!("{path}.toFQDNs[{j}]"))?);
            }
            fqdn_count += names.len();
        }
        let mut per_port = Vec::new();
        for (j, p) in r.ports.iter().flatten().enumerate() {
            let ppath = format!("{path}.ports[{j}]");
            let Some(rules) = &p.rules else {
                per_port.push(Vec::new());
                continue;
            };
            if rules.http.is_some() {
                if rules.dns.is_some() {
                    return Err(invalid(
                        &format!("{ppath}.rules"),
                        "give either rules.dns or rules.http, not both (DNS rules are for port 53)",
                    ));
                }
                per_port.push(http_rules(p, &ppath)?);
                continue;
            }
            per_port.push(Vec::new());
            let Some(list) = &rules.dns else {
                return Err(invalid(
                    &format!("{ppath}.rules"),
                    "empty: give rules.dns, or leave rules out",
                ));
            };
            let port = super::convert_port(&plain_port(p), &ppath)?;
            if port.port != PortMatch::Range(DNS_PORT, DNS_PORT) {
                return Err(invalid(
                    &format!("{ppath}.port"),
                    format!("DNS rules apply to port {DNS_PORT} only; set port: {DNS_PORT}"),
                ));
            }
            if port.protocol == Protocol::Sctp {
                return Err(invalid(
                    &format!("{ppath}.protocol"),
                    "DNS rules apply to UDP and TCP",
                ));
            }
            if list.is_empty() {
                return Err(invalid(
                    &format!("{ppath}.rules.dns"),
                    "empty: list the names the pods may look up (matchPattern: \"*\" for any)",
                ));
            }
            let mut rule_names = Vec::new();
            for (k, f) in list.iter().enumerate() {
                rule_names.push(fqdn(f, &format!("{ppath}.rules.dns[{k}]"))?);
            }
            fqdn_count += rule_names.len();
            dns.push(DnsRule {
                rule: i,
                protocol: port.protocol,
                names: rule_names,
            });
        }
        egress_fqdns.push(names);
        egress_http.push(per_port);
    }
    if fqdn_count > MAX_FQDNS {
        return Err(invalid(
            "spec",
            format!("{fqdn_count} names and patterns; a policy may list at most {MAX_FQDNS}"),
        ));
    }

    // The L3/L4 part is a NetworkPolicy and validates as one.
    let np = NetworkPolicy {
        metadata: obj.metadata.clone(),
        spec: Some(NetworkPolicySpec {
            pod_selector: spec.pod_selector.clone(),
            policy_types: spec.policy_types.clone(),
            ingress: spec.ingress.as_ref().map(|rules| {
                rules
                    .iter()
                    .map(|r| NetworkPolicyIngressRule {
                        from: r.from.clone(),
                        ports: r
                            .ports
                            .as_ref()
                            .map(|ps| ps.iter().map(plain_port).collect()),
                    })
                    .collect()
            }),
            egress: spec.egress.as_ref().map(|rules| {
                rules
                    .iter()
                    .map(|r| NetworkPolicyEgressRule {
                        to: r.to.clone(),
                        ports: r
                            .ports
                            .as_ref()
                            .map(|ps| ps.iter().map(plain_port).collect()),
                    })
                    .collect()
            }),
        }),
    };
    let mut base = Policy::from_k8s(&np).map_err(|e| match e {
        ObjectError::Invalid { path, message } => ObjectError::Invalid {
            path,
            message: message.replace("NetworkPolicy", KIND),
        },
        other => other,
    })?;
    base.kind = PolicyKind::PalisadeNetworkPolicy;
    attach_http(&mut base.ingress, ingress_http);
    attach_http(&mut base.egress, egress_http);
    let mut policy = PalisadePolicy {
        base,
        egress_fqdns,
        dns,
    };
    policy.base.dns_proxy = policy.uses_dns_proxy();
    Ok((obj, policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> FqdnSelector {
        if s.contains('*') {
            FqdnSelector::Pattern(s.into())
        } else {
            FqdnSelector::Name(s.into())
        }
    }

    #[test]
    fn http_rules_on_a_to_fqdns_rule_stay_with_the_learned_addresses() {
        let p = parse(&format!(
            "{HEAD}spec:\n  egress:\n  - toFQDNs: [{{matchName: shop.example.test}}]\n    ports: [{{port: 8080, rules: {{http: [{{method: GET}}]}}}}]\n"
        ))
        .unwrap();
        assert_eq!(p.base.egress[0].ports[0].http.len(), 1);
        let mut cache = crate::fqdn::FqdnCache::default();
        cache.learn(
            "shop.example.test",
            "203.0.113.40".parse().unwrap(),
            u64::MAX,
            8,
        );
        let expanded = crate::fqdn::expand(&p, &cache);
        assert_eq!(expanded.egress[0].peers.len(), 1);
        assert_eq!(expanded.egress[0].ports[0].http.len(), 1);
    }

    #[test]
    fn http_rules_are_kept_on_their_port_entries() {
        let p = parse(&format!(
            "{HEAD}spec:\n  ingress:\n  - ports:\n    - port: 80\n      rules:\n        http:\n        - method: GET\n          path: /books/.*\n          headers: ['X-Team: blue', X-Trace]\n          headerMatches: [{{name: X-Env, value: prod}}]\n    - port: 81\n"
        ))
        .unwrap();
        let ports = &p.base.ingress[0].ports;
        assert_eq!(ports.len(), 2);
        assert!(ports[1].http.is_empty());
        let h = &ports[0].http[0];
        assert_eq!(h.method.as_deref(), Some("GET"));
        assert_eq!(h.path.as_deref(), Some("/books/.*"));
        let headers: Vec<(&str, Option<&str>)> = h
            .headers
            .iter()
            .map(|m| (m.name.as_str(), m.value.as_deref()))
            .collect();
        assert_eq!(
            headers,
            [
                ("x-team", Some("blue")),
                ("x-trace", None),
                ("x-env", Some("prod"))
            ]
        );
        assert!(whole_match_regex("/books/.*").unwrap().is_match("/books/1"));
        assert!(!whole_match_regex("/books").unwrap().is_match("/books/1"));
    }

    #[test]
    fn names_and_patterns_match_as_cilium_defines_them() {
        let cases = [
            ("api.example.com", "api.example.com", true),
            ("api.example.com", "API.Example.com.", true),
            ("api.example.com", "x.api.example.com", false),
            ("*", "anything.at.all", true),
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "a.b.example.com", false),
            ("api-*.example.com", "api-1.example.com", true),
            ("api-*.example.com", "api-.example.com", true),
            ("api-*.example.com", "web.example.com", false),
            ("**.example.com", "a.example.com", true),
            ("**.example.com", "a.b.c.example.com", true),
            ("**.example.com", "example.com", false),
            ("**.example.com", "a.example.org", false),
            ("**.*.example.com", "a.b.example.com", true),
            ("**.*.example.com", "b.example.com", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(sel(p).matches(n), want, "{p} vs {n}");
        }
    }

    fn parse(yaml: &str) -> Result<PalisadePolicy, ObjectError> {
        let v: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        match super::super::decode_object(v)? {
            super::super::Object::PalisadePolicy(p) => Ok(p.value),
            other => panic!("not a PalisadeNetworkPolicy: {other:?}"),
        }
    }

    const HEAD: &str = "apiVersion: palisade.io/v1alpha1\nkind: PalisadeNetworkPolicy\nmetadata: {name: p, namespace: app}\n";

    #[test]
    fn fqdn_rules_and_dns_rules_validate_into_the_domain() {
        let p = parse(&format!(
            "{HEAD}spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  egress:\n  - toFQDNs: [{{matchName: API.example.com.}}, {{matchPattern: '*.cdn.example.com'}}]\n    ports: [{{port: 443}}]\n  - ports:\n    - {{port: 53, protocol: UDP, rules: {{dns: [{{matchPattern: '*.example.com'}}]}}}}\n"
        ))
        .unwrap();
        assert_eq!(p.base.kind, PolicyKind::PalisadeNetworkPolicy);
        assert!(p.base.egress_isolation && p.base.ingress_isolation);
        assert_eq!(
            p.egress_fqdns,
            vec![
                vec![
                    FqdnSelector::Name("api.example.com".into()),
                    FqdnSelector::Pattern("*.cdn.example.com".into())
                ],
                vec![]
            ]
        );
        assert!(p.base.egress[0].peers.is_empty());
        assert_eq!(p.dns.len(), 1);
        assert_eq!(p.dns[0].rule, 1);
        assert_eq!(p.dns[0].protocol, Protocol::Udp);
        assert!(p.uses_dns_proxy());
    }

    #[test]
    fn bad_input_is_refused_with_the_field_path() {
        let cases = [
            (
                "  egress:\n  - toFQDNs: [{matchName: 'a*.example.com'}]\n",
                "spec.egress[0].toFQDNs[0].matchName",
                "matchPattern",
            ),
            (
                "  egress:\n  - toFQDNs: [{matchName: a.com, matchPattern: '*'}]\n",
                "spec.egress[0].toFQDNs[0]",
                "only one",
            ),
            (
                "  egress:\n  - toFQDNs: [{}]\n",
                "spec.egress[0].toFQDNs[0]",
                "exactly one",
            ),
            (
                "  egress:\n  - toFQDNs: []\n",
                "spec.egress[0].toFQDNs",
                "at least one",
            ),
            (
                "  egress:\n  - to: [{podSelector: {}}]\n    toFQDNs: [{matchName: a.com}]\n",
                "spec.egress[0].toFQDNs",
                "separate",
            ),
            (
                "  egress:\n  - toFQDNs: [{matchPattern: 'a.**.com'}]\n",
                "spec.egress[0].toFQDNs[0].matchPattern",
                "'**'",
            ),
            (
                "  egress:\n  - toFQDNs: [{matchName: 'a..com'}]\n",
                "spec.egress[0].toFQDNs[0].matchName",
                "empty label",
            ),
            (
                "  egress:\n  - ports: [{port: 5353, protocol: UDP, rules: {dns: [{matchPattern: '*'}]}}]\n",
                "spec.egress[0].ports[0].port",
                "port 53",
            ),
            (
                "  egress:\n  - ports: [{port: 53, protocol: SCTP, rules: {dns: [{matchPattern: '*'}]}}]\n",
                "spec.egress[0].ports[0].protocol",
                "UDP and TCP",
            ),
            (
                "  egress:\n  - ports: [{port: 53, rules: {dns: []}}]\n",
                "spec.egress[0].ports[0].rules.dns",
                "names",
            ),
            (
                "  ingress:\n  - ports: [{port: 80, rules: {http: [{path: '/api/(v1'}]}}]\n",
                "spec.ingress[0].ports[0].rules.http[0].path",
                "not a valid regular expression",
            ),
            (
                "  egress:\n  - ports: [{port: 80, rules: {http: [{method: ''}]}}]\n",
                "spec.egress[0].ports[0].rules.http[0].method",
                "empty",
            ),
            (
                "  ingress:\n  - ports: [{port: 80, rules: {http: []}}]\n",
                "spec.ingress[0].ports[0].rules.http",
                "at least one HTTP rule",
            ),
            (
                "  ingress:\n  - ports: [{port: 80, protocol: UDP, rules: {http: [{}]}}]\n",
                "spec.ingress[0].ports[0].protocol",
                "TCP",
            ),
            (
                "  ingress:\n  - ports: [{port: 80, endPort: 90, rules: {http: [{}]}}]\n",
                "spec.ingress[0].ports[0].endPort",
                "one port",
            ),
            (
                "  ingress:\n  - ports: [{protocol: TCP, rules: {http: [{}]}}]\n",
                "spec.ingress[0].ports[0].port",
                "set port",
            ),
            (
                "  ingress:\n  - ports: [{port: 80, rules: {http: [{headers: ['X Bad: 1']}]}}]\n",
                "spec.ingress[0].ports[0].rules.http[0].headers[0]",
                "not an HTTP header name",
            ),
            (
                "  ingress:\n  - ports: [{port: 80, rules: {http: [{headerMatches: [{name: a, secret: {name: s}}]}]}}]\n",
                "spec.ingress[0].ports[0].rules.http[0].headerMatches[0].secret",
                "not supported",
            ),
            (
                "  ingress:\n  - ports: [{port: 80, rules: {http: [{headerMatches: [{name: a, mismatch: LOG}]}]}}]\n",
                "spec.ingress[0].ports[0].rules.http[0].headerMatches[0].mismatch",
                "not supported",
            ),
            (
                "  ingress:\n  - ports: [{port: 80, rules: {http: [{verb: GET}]}}]\n",
                "spec.ingress[0].ports[0].rules.http[0].verb",
                "unknown field",
            ),
            (
                "  egress:\n  - ports: [{port: 53, rules: {dns: [{matchPattern: '*'}], http: [{}]}}]\n",
                "spec.egress[0].ports[0].rules",
                "not both",
            ),
            (
                "  ingress:\n  - ports: [{port: 53, rules: {dns: [{matchPattern: '*'}]}}]\n",
                "spec.ingress[0].ports[0].rules.dns",
                "egress",
            ),
            (
                "  egress:\n  - toFQDNs: [{matchName: a.com}]\n    ports: [{port: 0}]\n",
                "spec.egress[0].ports[0].port",
                "port number",
            ),
            (
                "  egress:\n  - toFQDNs: [{matchNames: a.com}]\n",
                "spec.egress[0].toFQDNs[0].matchNames",
                "unknown field",
            ),
            (
                "  policyTypes: [Sideways]\n",
                "spec.policyTypes[0]",
                "unknown policy type",
            ),
        ];
        for (spec, path, words) in cases {
            let e = parse(&format!("{HEAD}spec:\n{spec}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(path), "{spec}: {e} (wanted path {path})");
            assert!(e.contains(words), "{spec}: {e} (wanted {words:?})");
        }
    }
}
