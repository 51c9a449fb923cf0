//! Kubernetes cluster mode: what the agent takes from the API server, and
//! how API objects become the engine's inputs.
//!
//! The agent (`palisadectl daemon --kubernetes`) watches the resources in
//! [`WATCHED`] and nothing else; the ClusterRole shipped in
//! `packaging/kubernetes/` grants exactly `list` and `watch` on them (a
//! test checks both against this list).

/// One resource the agent lists and watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    /// API group (`""` for the core group).
    pub group: &'static str,
    pub version: &'static str,
    /// Plural resource name, as RBAC rules name it.
    pub resource: &'static str,
    pub kind: &'static str,
}

/// Every resource the agent watches, cluster-wide, with `list` and `watch`.
pub const WATCHED: &[Watched] = &[
    Watched {
        group: "",
        version: "v1",
        resource: "namespaces",
        kind: "Namespace",
    },
    Watched {
        group: "",
        version: "v1",
        resource: "pods",
        kind: "Pod",
    },
    Watched {
        group: "",
        version: "v1",
        resource: "nodes",
        kind: "Node",
    },
    Watched {
        group: "",
        version: "v1",
        resource: "services",
        kind: "Service",
    },
    Watched {
        group: "networking.k8s.io",
        version: "v1",
        resource: "networkpolicies",
        kind: "NetworkPolicy",
    },
    Watched {
        group: "discovery.k8s.io",
        version: "v1",
        resource: "endpointslices",
        kind: "EndpointSlice",
    },
];

/// The verbs the agent uses on every watched resource.
pub const VERBS: &[&str] = &["list", "watch"];
