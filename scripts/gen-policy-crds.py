#!/usr/bin/env python3
"""Write packaging/kubernetes/policy-crds.yaml: CustomResourceDefinitions for
AdminNetworkPolicy and BaselineAdminNetworkPolicy (policy.networking.k8s.io
v1alpha1) and ClusterNetworkPolicy (v1alpha2), as palisade reads them.

The schemas carry the limits palisade also checks (shared/src/policy/tier.rs:
enums, priority range, list lengths, one-of fields) so that the API server
refuses what palisade would; label selectors are left open (palisade validates
them). Clusters that install the upstream network-policy-api CRDs instead
need not apply this file: palisade watches the same resources.

Run from the repository root: scripts/gen-policy-crds.py
"""
import json

GROUP = "policy.networking.k8s.io"


def obj(props, required=(), **extra):
    o = {"type": "object", "properties": props}
    if required:
        o["required"] = list(required)
    o.update(extra)
    return o


def arr(items, min_items=None, max_items=None):
    a = {"type": "array", "items": items}
    if min_items is not None:
        a["minItems"] = min_items
    if max_items is not None:
        a["maxItems"] = max_items
    return a


def one_of(props, **extra):
    """An object of which exactly one property is set."""
    return obj(props, minProperties=1, maxProperties=1, **extra)


selector = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
namespaced_pod_v1 = obj(
    {"namespaceSelector": selector, "podSelector": selector},
    required=("namespaceSelector", "podSelector"),
)
namespaced_pod_v2 = obj(
    {"namespaceSelector": selector, "podSelector": selector}, required=("podSelector",)
)
port_number = {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535}
protocol = {"type": "string", "enum": ["TCP", "UDP", "SCTP"], "default": "TCP"}
cidr = {"type": "string", "maxLength": 43}


def subject(pod):
    return one_of({"namespaces": selector, "pods": pod})


def anp_ports():
    return arr(
        one_of(
            {
                "portNumber": obj(
                    {"protocol": protocol, "port": port_number}, required=("port",)
                ),
                "namedPort": {"type": "string"},
                "portRange": obj(
                    {"protocol": protocol, "start": port_number, "end": port_number},
                    required=("start", "end"),
                ),
            }
        ),
        1,
        100,
    )


def cnp_protocols():
    dest = one_of(
        {
            "number": port_number,
            "range": obj({"start": port_number, "end": port_number}, required=("start", "end")),
        }
    )
    per_proto = obj({"destinationPort": dest}, minProperties=1)
    return arr(
        one_of(
            {
                "tcp": per_proto,
                "udp": per_proto,
                "sctp": per_proto,
                "destinationNamedPort": {"type": "string"},
            }
        ),
        1,
        25,
    )


def rules(peer_field, peer, actions, max_rules, max_peers, ports_field, ports):
    rule = obj(
        {
            "name": {"type": "string", "maxLength": 100},
            "action": {"type": "string", "enum": actions},
            peer_field: arr(peer, 1, max_peers),
            ports_field: ports,
        },
        required=("action", peer_field),
    )
    return arr(rule, None, max_rules)


def ingress_peer(pod):
    return one_of({"namespaces": selector, "pods": pod})


def egress_peer(pod, domain_names):
    props = {
        "namespaces": selector,
        "pods": pod,
        "nodes": selector,
        "networks": arr(cidr, 1, 25),
    }
    if domain_names:
        props["domainNames"] = arr({"type": "string"}, 1, 25)
    return one_of(props)


def crd(kind, plural, short, version, spec, columns):
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "palisade"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": kind + "List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
            },
            "scope": "Cluster",
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns
                    + [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                    "schema": {
                        "openAPIV3Schema": obj(
                            {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                            required=("metadata", "spec"),
                        )
                    },
                }
            ],
        },
    }


priority = {"type": "integer", "format": "int32", "minimum": 0, "maximum": 1000}
priority_col = {"name": "Priority", "type": "integer", "jsonPath": ".spec.priority"}

anp = crd(
    "AdminNetworkPolicy",
    "adminnetworkpolicies",
    "anp",
    "v1alpha1",
    obj(
        {
            "priority": priority,
            "subject": subject(namespaced_pod_v1),
            "ingress": rules("from", ingress_peer(namespaced_pod_v1), ["Allow", "Deny", "Pass"], 100, 100, "ports", anp_ports()),
            "egress": rules("to", egress_peer(namespaced_pod_v1, False), ["Allow", "Deny", "Pass"], 100, 100, "ports", anp_ports()),
        },
        required=("priority", "subject"),
    ),
    [priority_col],
)
banp = crd(
    "BaselineAdminNetworkPolicy",
    "baselineadminnetworkpolicies",
    "banp",
    "v1alpha1",
    obj(
        {
            "subject": subject(namespaced_pod_v1),
            "ingress": rules("from", ingress_peer(namespaced_pod_v1), ["Allow", "Deny"], 100, 100, "ports", anp_ports()),
            "egress": rules("to", egress_peer(namespaced_pod_v1, False), ["Allow", "Deny"], 100, 100, "ports", anp_ports()),
        },
        required=("subject",),
    ),
    [],
)
# There is one BaselineAdminNetworkPolicy, named default.
banp["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"] = [
    {"rule": "self.metadata.name == 'default'", "message": "a BaselineAdminNetworkPolicy must be named default"}
]
cnp = crd(
    "ClusterNetworkPolicy",
    "clusternetworkpolicies",
    "cnp",
    "v1alpha2",
    obj(
        {
            "tier": {"type": "string", "enum": ["Admin", "Baseline"]},
            "priority": priority,
            "subject": subject(namespaced_pod_v2),
            "ingress": rules("from", ingress_peer(namespaced_pod_v2), ["Accept", "Deny", "Pass"], 25, 25, "protocols", cnp_protocols()),
            "egress": rules("to", egress_peer(namespaced_pod_v2, True), ["Accept", "Deny", "Pass"], 25, 25, "protocols", cnp_protocols()),
        },
        required=("tier", "priority", "subject"),
    ),
    [{"name": "Tier", "type": "string", "jsonPath": ".spec.tier"}, priority_col],
)

# palisade's own kind: a NetworkPolicy with DNS-aware egress (toFQDNs,
# rules.dns). palisade validates it whole; the schema only keeps the shape.
open_obj = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
pnp = crd(
    "PalisadeNetworkPolicy",
    "palisadenetworkpolicies",
    "pnp",
    "v1alpha1",
    obj(
        {
            "podSelector": selector,
            "policyTypes": arr({"type": "string", "enum": ["Ingress", "Egress"]}, None, 2),
            "ingress": arr(open_obj),
            "egress": arr(open_obj),
        }
    ),
    [],
)
pnp["metadata"]["name"] = "palisadenetworkpolicies.palisade.io"
pnp["spec"]["group"] = "palisade.io"
pnp["spec"]["scope"] = "Namespaced"
pnp["spec"]["versions"][0].pop("subresources", None)

header = (
    "# CustomResourceDefinitions for the cluster-wide policy tiers palisade enforces:\n"
    "# AdminNetworkPolicy and BaselineAdminNetworkPolicy (policy.networking.k8s.io/v1alpha1)\n"
    "# and ClusterNetworkPolicy (v1alpha2), and palisade's own PalisadeNetworkPolicy\n"
    "# (palisade.io/v1alpha1, DNS-aware egress). Written by scripts/gen-policy-crds.py; do not edit.\n"
    "# Apply before (or after) palisade.yaml: the agent picks the kinds up within seconds\n"
    "# of their CRDs appearing. Clusters that already have the network-policy-api CRDs\n"
    "# installed do not need this file.\n"
)
try:
    import yaml  # PyYAML (python3-yaml); JSON is YAML too, if it is missing

    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    def dump(d):
        return yaml.dump(d, Dumper=NoAliases, sort_keys=False, width=100)
except ImportError:

    def dump(d):
        return json.dumps(d, indent=2) + "\n"

with open("packaging/kubernetes/policy-crds.yaml", "w") as f:
    f.write(header)
    f.write("---\n".join(dump(d) for d in [anp, banp, cnp, pnp]))
