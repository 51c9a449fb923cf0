//! What the node's L7 proxy decides: which HTTP rules govern a connection
//! the datapath steered to it, and whether one request is allowed.
//!
//! A connection is steered when, on a side this node enforces (the client's
//! egress, the server's ingress), every NetworkPolicy rule that allows it
//! carries HTTP rules ([`crate::explain::Side::http`]). A request is
//! allowed when, on each such side, one of that side's HTTP rules matches
//! it; a side whose rules do not all carry HTTP rules allows every request
//! (an L3/L4 rule allows every request, as everywhere else: the union).

use std::net::IpAddr;

use regex::Regex;
use serde::Serialize;

use crate::{
    abi::{Direction, PROTO_TCP},
    explain::{Explanation, PartyRef, explain},
    policy::{HttpRule, palisade::whole_match_regex},
    store::State,
};

/// One HTTP rule, compiled.
#[derive(Debug, Clone)]
pub struct Matcher {
    /// `KIND/namespace/name` of the policy the rule is in.
    pub policy: String,
    method: Option<Regex>,
    path: Option<Regex>,
    host: Option<Regex>,
    /// Lowercase names, and the exact value when one is required.
    headers: Vec<(String, Option<String>)>,
}

/// The parts of a request the rules look at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path with its query, as sent (HTTP/2: `:path`).
    pub path: &'a str,
    /// The Host header (HTTP/2: `:authority`), if any.
    pub host: Option<&'a str>,
}

impl Matcher {
    /// Compile a rule validation accepted (a pattern it would refuse makes
    /// a matcher that matches nothing, never everything).
    pub fn new(policy: &str, rule: &HttpRule) -> Self {
        let re = |s: &Option<String>| {
            s.as_ref().map(|s| {
                whole_match_regex(s)
                    .unwrap_or_else(|_| Regex::new("[^\\s\\S]").expect("empty class"))
            })
        };
        Self {
            policy: policy.to_owned(),
            method: re(&rule.method),
            path: re(&rule.path),
            host: re(&rule.host),
            headers: rule
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect(),
        }
    }

    /// Whether the request matches: every field the rule sets. `header`
    /// gives a header's values by lowercase name.
    pub fn matches<'h>(&self, req: &Request<'_>, header: &dyn Fn(&str) -> Vec<&'h str>) -> bool {
        if let Some(m) = &self.method
            && !m.is_match(req.method)
        {
            return false;
        }
        if let Some(p) = &self.path
            && !p.is_match(req.path)
        {
            return false;
        }
        if let Some(h) = &self.host {
            let Some(host) = req.host else { return false };
            // "api.example.com" also matches "api.example.com:8080".
            let bare = host
                .rsplit_once(':')
                .filter(|(h, port)| {
                    !h.is_empty() && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
                })
                .map_or(host, |(h, _)| h);
            if !h.is_match(host) && !h.is_match(bare) {
                return false;
            }
        }
        self.headers.iter().all(|(name, value)| {
            let values = header(name);
            match value {
                None => !values.is_empty(),
                Some(v) => values.iter().any(|x| x.trim() == v),
            }
        })
    }
}

/// The rules of one side this node enforces.
#[derive(Debug, Clone)]
pub struct SideRules {
    pub direction: Direction,
    /// `namespace/name` of the pod whose policy it is.
    pub subject: String,
    pub matchers: Vec<Matcher>,
    /// Only audit-mode policies isolate the subject on this side: a
    /// request no rule matches passes, reported as `audit`.
    pub audit: bool,
}

impl SideRules {
    /// The first matching rule's policy, or None.
    pub fn allows<'h>(
        &self,
        req: &Request<'_>,
        header: &dyn Fn(&str) -> Vec<&'h str>,
    ) -> Option<&str> {
        self.matchers
            .iter()
            .find(|m| m.matches(req, header))
            .map(|m| m.policy.as_str())
    }

    /// The policies whose rules this side has, for a denial's answer.
    pub fn policies(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.matchers.iter().map(|m| m.policy.as_str()).collect();
        out.dedup();
        out
    }
}

/// How the proxy treats one connection.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// `ns/name` or an address, as `explain` names them.
    pub client: String,
    pub server: String,
    /// The client's egress rules and the server's ingress rules, for the
    /// sides this node enforces and that go through the proxy. Empty: no
    /// side does (any more): every request is allowed.
    pub sides: Vec<SideRules>,
}

/// A request's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    /// Allowed only because the side that would deny it is in audit mode.
    pub audit: bool,
    /// The deciding policies: the matching rules' when allowed, the
    /// denying side's when denied (or audited).
    pub policies: Vec<String>,
    /// The side whose rules decided: the denying one, else the last.
    pub direction: Option<Direction>,
}

impl Verdict {
    /// `allowed`, `denied` or `audit`.
    pub fn as_str(&self) -> &'static str {
        match (self.allowed, self.audit) {
            (false, _) => "denied",
            (true, true) => "audit",
            (true, false) => "allowed",
        }
    }
}

/// One request the proxy judged, for the flow log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpRecord {
    pub client: std::net::SocketAddr,
    pub server: std::net::SocketAddr,
    /// The side whose rules decided.
    pub direction: Direction,
    pub method: String,
    pub host: Option<String>,
    pub path: String,
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// `allowed`, `denied` or `audit`.
    pub verdict: String,
    pub policy: Option<String>,
    pub latency_micros: u64,
}

impl Connection {
    /// What the proxy judges with when the rules cannot be read (fail
    /// closed): one side with no rule, which allows nothing.
    pub fn deny_all(client: IpAddr, server: IpAddr) -> Self {
        Self {
            client: client.to_string(),
            server: server.to_string(),
            sides: vec![SideRules {
                direction: Direction::Ingress,
                subject: server.to_string(),
                matchers: Vec::new(),
                audit: false,
            }],
        }
    }

    pub fn judge<'h>(&self, req: &Request<'_>, header: &dyn Fn(&str) -> Vec<&'h str>) -> Verdict {
        let mut policies = Vec::new();
        let mut audit: Option<(Vec<String>, Direction)> = None;
        let mut direction = None;
        for side in &self.sides {
            direction = Some(side.direction);
            match side.allows(req, header) {
                Some(p) => policies.push(p.to_owned()),
                None if side.audit => {
                    audit.get_or_insert_with(|| {
                        (
                            side.policies().into_iter().map(str::to_owned).collect(),
                            side.direction,
                        )
                    });
                }
                None => {
                    return Verdict {
                        allowed: false,
                        audit: false,
                        policies: side.policies().into_iter().map(str::to_owned).collect(),
                        direction: Some(side.direction),
                    };
                }
            }
        }
        match audit {
            Some((policies, dir)) => Verdict {
                allowed: true,
                audit: true,
                policies,
                direction: Some(dir),
            },
            None => Verdict {
                allowed: true,
                audit: false,
                policies,
                direction,
            },
        }
    }
}

/// The rules for a connection from `client` to `server` on TCP `port`.
pub fn connection(state: &State, client: IpAddr, server: IpAddr, port: u16) -> Connection {
    match explain(
        state,
        &PartyRef::Address(client),
        &PartyRef::Address(server),
        PROTO_TCP,
        port,
    ) {
        Ok(e) => from_explanation(&e, true),
        Err(_) => Connection::deny_all(client, server),
    }
}

/// The HTTP rules an explanation's sides carry: of the sides this node
/// enforces (`local_only`, as the proxy judges), or of both (what policy
/// says, as `explain --http` answers).
pub fn from_explanation(e: &Explanation, local_only: bool) -> Connection {
    let mut sides = Vec::new();
    let local = [
        (
            e.egress.as_ref(),
            !local_only || e.from.endpoint_id.is_some(),
        ),
        (
            e.ingress.as_ref(),
            !local_only || e.to.endpoint_id.is_some(),
        ),
    ];
    for (side, here) in local {
        let Some(side) = side else { continue };
        let Some(rules) = side.http.as_ref().filter(|_| here) else {
            continue;
        };
        sides.push(SideRules {
            direction: side.direction,
            subject: side.subject.clone(),
            matchers: rules.iter().map(|(p, r)| Matcher::new(p, r)).collect(),
            audit: side.http_audit,
        });
    }
    Connection {
        client: e.from.display.clone(),
        server: e.to.display.clone(),
        sides,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::HeaderMatch;

    fn rule(method: Option<&str>, path: Option<&str>, host: Option<&str>) -> HttpRule {
        HttpRule {
            method: method.map(Into::into),
            path: path.map(Into::into),
            host: host.map(Into::into),
            headers: Vec::new(),
        }
    }

    fn req<'a>(method: &'a str, path: &'a str, host: Option<&'a str>) -> Request<'a> {
        Request { method, path, host }
    }

    #[test]
    fn fields_match_whole_values_as_regular_expressions() {
        let none = |_: &str| Vec::new();
        let m = Matcher::new("p", &rule(Some("GET|HEAD"), Some("/books/[0-9]+"), None));
        assert!(m.matches(&req("GET", "/books/12", None), &none));
        assert!(m.matches(&req("HEAD", "/books/1", None), &none));
        assert!(!m.matches(&req("DELETE", "/books/12", None), &none));
        assert!(!m.matches(&req("GET", "/books/12/x", None), &none));
        assert!(!m.matches(&req("GET", "/x/books/12", None), &none));
        // The query is part of the path, as in CiliumNetworkPolicy.
        assert!(!m.matches(&req("GET", "/books/12?a=1", None), &none));
        let any = Matcher::new("p", &rule(None, None, None));
        assert!(any.matches(&req("PATCH", "/anything", None), &none));
        let host = Matcher::new("p", &rule(None, None, Some("api\\.example\\.com")));
        assert!(host.matches(&req("GET", "/", Some("api.example.com")), &none));
        assert!(host.matches(&req("GET", "/", Some("api.example.com:8080")), &none));
        assert!(!host.matches(&req("GET", "/", Some("evil.com")), &none));
        assert!(!host.matches(&req("GET", "/", None), &none));
    }

    #[test]
    fn headers_must_be_present_with_the_value_given() {
        let mut r = rule(None, None, None);
        r.headers = vec![
            HeaderMatch {
                name: "x-team".into(),
                value: Some("blue".into()),
            },
            HeaderMatch {
                name: "x-trace".into(),
                value: None,
            },
        ];
        let m = Matcher::new("p", &r);
        let both = |n: &str| match n {
            "x-team" => vec!["blue"],
            "x-trace" => vec!["1"],
            _ => Vec::new(),
        };
        let wrong = |n: &str| match n {
            "x-team" => vec!["red"],
            "x-trace" => vec!["1"],
            _ => Vec::new(),
        };
        let missing = |n: &str| match n {
            "x-team" => vec!["blue"],
            _ => Vec::new(),
        };
        assert!(m.matches(&req("GET", "/", None), &both));
        assert!(!m.matches(&req("GET", "/", None), &wrong));
        assert!(!m.matches(&req("GET", "/", None), &missing));
    }

    #[test]
    fn every_governing_side_must_allow() {
        let none = |_: &str| Vec::new();
        let side = |dir, method: &str, policy: &str| SideRules {
            direction: dir,
            subject: "a/b".into(),
            matchers: vec![Matcher::new(policy, &rule(Some(method), None, None))],
            audit: false,
        };
        let c = Connection {
            client: "a/web".into(),
            server: "a/api".into(),
            sides: vec![
                side(Direction::Egress, "GET|POST", "PNP/a/out"),
                side(Direction::Ingress, "GET", "PNP/a/in"),
            ],
        };
        assert!(c.judge(&req("GET", "/", None), &none).allowed);
        let post = c.judge(&req("POST", "/", None), &none);
        assert!(!post.allowed);
        assert_eq!(post.policies, ["PNP/a/in"]);
        assert_eq!(post.direction, Some(Direction::Ingress));
        assert!(
            Connection::default()
                .judge(&req("DELETE", "/", None), &none)
                .allowed
        );
        // A side isolated only by audit-mode policies passes what it would
        // deny, reported as audit.
        let mut audited = c.clone();
        audited.sides[1].audit = true;
        let v = audited.judge(&req("POST", "/", None), &none);
        assert_eq!((v.allowed, v.as_str()), (true, "audit"));
        assert_eq!(v.policies, ["PNP/a/in"]);
    }
}
