/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The palisade datapath ABI: every map key and value, event, verdict and
 * drop reason shared between the tc programs and user space. Rust mirrors
 * each struct in shared/src/abi.rs; the build reads this header with
 * bindgen and fails when any struct's size, any field's offset or size, or
 * any constant differs between the two. Change both together.
 *
 * Rules: fixed-width types only, explicit padding fields (always zero), no
 * bool. Addresses are 16 bytes; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d)
 * so both families share one code path and one set of maps.
 */
#ifndef PALISADE_ABI_H
#define PALISADE_ABI_H

#include <linux/types.h>

/* Bump when a map's key or value layout changes. */
#define PAL_ABI_VERSION 1

/* Default capacities (max_entries) of the maps, for a small node; user
 * space may set others when it creates the maps (conflist `mapSizes`,
 * `palisadectl daemon --map-size`), and checks them against pinned maps. */
#define PAL_SIZE_ENDPOINTS    4096
#define PAL_SIZE_SRCGUARD     16384
#define PAL_SIZE_IPCACHE      65536
#define PAL_SIZE_IPCACHE_HOST 65536
#define PAL_SIZE_POLICY	      65536
#define PAL_SIZE_CT	      8192 /* flows per endpoint and direction */
#define PAL_SIZE_FRAG	      64   /* per endpoint and direction */
#define PAL_SIZE_COUNTERS     4096
#define PAL_SIZE_EVENTS	      (256 * 1024) /* bytes */
#define PAL_SIZE_SVC	      4096
#define PAL_SIZE_SVC_FLOWS    16384

/* Direction, always from the container's point of view. */
#define PAL_DIR_INGRESS 0 /* entering the container: host veth tc egress */
#define PAL_DIR_EGRESS	1 /* leaving the container: host veth tc ingress */

/* Reserved identities. Endpoint identities start at PAL_ID_LOCAL_MIN,
 * identities of ipBlock CIDRs at PAL_ID_CIDR_MIN. */
#define PAL_ID_ANY	 0 /* policy key wildcard: any peer */
#define PAL_ID_HOST	 1 /* the node itself */
#define PAL_ID_WORLD	 2 /* any address palisade knows nothing about */
#define PAL_ID_LOCAL_MIN 256
#define PAL_ID_CIDR_MIN	 0x01000000

/* Policy tiers, evaluated in this order. The admin tier (AdminNetworkPolicy,
 * ClusterNetworkPolicy tier Admin) decides first: ALLOW and DENY are final,
 * PASS (or no entry) goes on. NetworkPolicy then decides for the directions
 * it isolates; the baseline tier (BaselineAdminNetworkPolicy,
 * ClusterNetworkPolicy tier Baseline) only for the others, and what it does
 * not decide is allowed. Admin and baseline entries name exact peer
 * identities (never PAL_ID_ANY), and user space resolves priorities and rule
 * order into them: the longest entry found is the answer of its tier. */
#define PAL_TIER_ADMIN	  0
#define PAL_TIER_NETPOL	  1
#define PAL_TIER_BASELINE 2

/* Verdicts, as stored in policy values, conntrack, counters and events. */
#define PAL_VERDICT_NONE     0
#define PAL_VERDICT_ALLOW    1
#define PAL_VERDICT_DENY     2
#define PAL_VERDICT_AUDIT    3 /* would be denied; allowed because audited */
#define PAL_VERDICT_PASS     4 /* tier says: decide in the next tier */
#define PAL_VERDICT_REDIRECT 5 /* send to an L7 proxy (reserved) */

/*
 * Why a packet was allowed or dropped. Drops are negative (the CLI decodes
 * them to words, see Reason in shared/src/abi.rs); counters store the
 * absolute value next to the verdict.
 *   POLICY            decided by the policy map
 *   NOT_ISOLATED      no policy selects the endpoint for this direction
 *   HOST              traffic to or from the node itself
 *   ESTABLISHED       conntrack: established or reply
 *   RELATED           conntrack: ICMP error about a known flow
 *   INFRA             ARP, ND, DHCP: never governed
 *   SERVICE           to a Service frontend: judged on the backend after
 *                     the node's DNAT (pal_service at netfilter FORWARD)
 *   DROP_POLICY       no rule allows the flow
 *   DROP_UNKNOWN_ENDPOINT  the program runs on a veth with no endpoint
 *   DROP_MALFORMED    truncated or invalid headers
 *   DROP_FRAG_NO_HEAD a later fragment whose first fragment was not seen
 *   DROP_UNSUPPORTED_L3  not IP/ARP, or an IPv6 header chain too long
 *   DROP_REVOKED      a tracked flow current policy no longer allows
 *   DROP_SPOOFED      a container sent from an address that is not its own
 */
#define PAL_REASON_POLICY	  0
#define PAL_REASON_NOT_ISOLATED	  1
#define PAL_REASON_HOST		  2
#define PAL_REASON_ESTABLISHED	  3
#define PAL_REASON_RELATED	  4
#define PAL_REASON_INFRA	  5
#define PAL_REASON_SERVICE	  6
#define PAL_DROP_POLICY		  (-1)
#define PAL_DROP_UNKNOWN_ENDPOINT (-2)
#define PAL_DROP_MALFORMED	  (-3)
#define PAL_DROP_FRAG_NO_HEAD	  (-4)
#define PAL_DROP_UNSUPPORTED_L3	  (-5)
#define PAL_DROP_REVOKED	  (-6)
#define PAL_DROP_SPOOFED	  (-7)
#define PAL_DROP_NO_PROXY	  (-8) /* redirected, but no proxy listens */
#define PAL_DROP_BUDGET		  (-9) /* the endpoint's conntrack table is full */
#define PAL_DROP_MISADDRESSED	  (-10) /* unicast to another MAC */
#define PAL_DROP_L7_SERVICE	  (-11) /* HTTP rules only, via a Service */

/* Endpoint flags (pal_endpoint.flags). */
#define PAL_EP_ISOLATE_INGRESS (1U << 0)
#define PAL_EP_ISOLATE_EGRESS  (1U << 1)
#define PAL_EP_AUDIT_INGRESS   (1U << 2) /* reserved for audit mode */
#define PAL_EP_AUDIT_EGRESS    (1U << 3) /* reserved for audit mode */
/* Which policy entry shapes exist for the endpoint, by direction: the
 * datapath skips lookups that cannot match. Set by the compiler; port-range
 * prefix lengths are in pal_endpoint.range_lens. */
#define PAL_EP_HAS_ANY_PORT_INGRESS  (1U << 4)
#define PAL_EP_HAS_ANY_PROTO_INGRESS (1U << 5)
#define PAL_EP_HAS_ANY_PORT_EGRESS   (1U << 6)
#define PAL_EP_HAS_ANY_PROTO_EGRESS  (1U << 7)
/* The endpoint has admin / baseline tier entries in this direction (else
 * that tier is not looked up at all). */
#define PAL_EP_ADMIN_INGRESS	(1U << 8)
#define PAL_EP_ADMIN_EGRESS	(1U << 9)
#define PAL_EP_BASELINE_INGRESS (1U << 10)
#define PAL_EP_BASELINE_EGRESS	(1U << 11)
/* The endpoint's DNS (UDP and TCP port 53) goes to the node's DNS proxy
 * (its policies name domains or limit what it may look up). */
#define PAL_EP_DNS_PROXY (1U << 12)
/* The endpoint has egress entries only HTTP rules allow: its new TCP
 * connections to a Service frontend go to the node's L7 proxy (the backend,
 * and so whether HTTP rules govern the connection, is chosen after the veth
 * program; the proxy relays as bytes those no HTTP rule governs). */
#define PAL_EP_L7_EGRESS (1U << 13)

/* Global configuration flags (pal_config.flags): node <-> pod traffic is
 * never governed; flow events go to the ring buffer. */
#define PAL_CFG_ALLOW_HOST (1U << 0)
#define PAL_CFG_EVENTS	   (1U << 1)

/* pal_endpoints: HASH, key = __u32 ifindex of the host-side veth. */
struct pal_endpoint {
	__u32 ep_id; /* palisade's endpoint number, keys policy and conntrack */
	__u32 identity; /* the endpoint's own identity (for events) */
	__u32 flags;	/* PAL_EP_* */
	/* Port-range prefix lengths the endpoint's policy entries use: bit
	 * n - 1 for PAL_POLICY_PREFIX_ANY_PORT + n (n = 1..15), ingress in
	 * bits 0..14, egress in bits 16..30. */
	__u32 range_lens;
};

/* pal_ipcache: LPM_TRIE, address prefix -> identity, for prefixes shorter
 * than a whole address (ipBlock CIDRs). Whole addresses (every endpoint,
 * ipBlock /32 and /128) live in pal_ipcache_host, a hash keyed by the
 * address alone: a whole address is always the longest match, so a hit
 * there is the answer and the trie is only walked on a miss. */
struct pal_ipcache_key {
	__u32 prefixlen; /* 0..128; IPv4 prefixes are 96 + len */
	__u8 addr[16];
};

struct pal_ipcache_host_key {
	__u8 addr[16];
};

struct pal_ipcache_value {
	__u32 identity;
	__u32 flags; /* reserved */
};

/* pal_policy: HASH of policy entries, keyed by a prefix length and a
 * match. Every field of the match up to and including pad2 is always
 * matched exactly; the prefix length then selects:
 *   PAL_POLICY_PREFIX_ANY_PROTO  all protocols and ports
 *   PAL_POLICY_PREFIX_ANY_PORT   one protocol, all ports
 *   PAL_POLICY_PREFIX_FULL       one protocol and port (or a protocol
 *                                without ports, dport 0)
 *   PAL_POLICY_PREFIX_ANY_PORT + n (n = 1..15)  one protocol, ports
 *                                sharing the top n bits (port ranges are
 *                                split into aligned blocks)
 * dport is in network byte order, and the bits a prefix does not cover are
 * zero. A lookup tries the lengths from longest to shortest, skipping those
 * the endpoint has no entries of (PAL_EP_HAS_* flags, range_lens): each try
 * is one hash lookup, so the cost never depends on the number of rules. */
struct pal_policy_match {
	__u32 ep_id;
	__u8 direction; /* PAL_DIR_* */
	__u8 tier;	/* PAL_TIER_* */
	__u16 pad1;
	__u32 peer_id; /* peer identity, or PAL_ID_ANY */
	__u8 pad2;
	__u8 protocol; /* IPPROTO_* */
	__be16 dport;
};

struct pal_policy_key {
	__u32 prefixlen;
	struct pal_policy_match m;
};

#define PAL_POLICY_PREFIX_ANY_PROTO 104 /* bits of ep_id..pad2 */
#define PAL_POLICY_PREFIX_ANY_PORT  112 /* ... plus protocol */
#define PAL_POLICY_PREFIX_FULL	    128 /* ... plus dport */

struct pal_policy_value {
	__u32 policy_id; /* which policy allowed it (for events and explain) */
	__u8 verdict;	 /* PAL_VERDICT_* */
	__u8 flags;	 /* PAL_POLICY_F_* */
	__u16 pad;
};

/* Admin and baseline entries: an audited Deny of policy_id matched before
 * the rule that decided (verdict); reported if the flow ends up allowed. */
#define PAL_POLICY_F_AUDIT (1U << 0)
/* NetworkPolicy entries: every rule that allows the traffic carries HTTP
 * rules, so its connections go through the node's L7 proxy. */
#define PAL_POLICY_F_L7 (1U << 1)

/* Conntrack: one entry per flow per endpoint, keyed by the direction and
 * tuple of the packet that opened it. The client's and the server's
 * endpoints each keep their own entry, so one side's decision never lets the
 * other side skip its own check.
 *
 * Every endpoint has two tables of its own (pal_ct_tables, a hash of maps
 * keyed by PAL_CT_TABLE(ep_id, direction)): the flows it opened (egress)
 * and the flows opened towards it (ingress). Each is a hash without
 * preallocation whose max_entries is the endpoint's budget: a full table
 * refuses new flows of that endpoint and direction (PAL_DROP_BUDGET), and
 * nothing one endpoint does can evict another endpoint's flows. */
#define PAL_CT_TABLE(ep_id, dir) (((__u32)(ep_id) << 1) | ((dir)&1))
struct pal_ct_key {
	__u32 ep_id;
	__u8 direction; /* direction of the opening packet */
	__u8 protocol;
	__u16 pad;
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport; /* ICMP echo: the identifier on the requester's side */
	__be16 dport;
};

/* FINs are tracked per direction: a half-closed connection stays open. */
#define PAL_CT_SEEN_REPLY  (1U << 0)
#define PAL_CT_TCP_FIN_FWD (1U << 1)
#define PAL_CT_TCP_RST	   (1U << 2)
#define PAL_CT_TCP_FIN_REV (1U << 3)
/* Opened to a Service frontend: the verdict belongs to the backend, decided
 * by pal_service after DNAT, so the entry is not revalidated against the
 * frontend address. */
#define PAL_CT_SERVICE (1U << 4)
/* The flow goes through the node's L7 proxy: packets the node did not send
 * are steered to it (pal_to_l7_proxy), both ways. Set on a flow an L7 entry
 * allowed, and on a flow the proxy itself opened towards a local endpoint
 * (sent by the node from an address that is not the node's), whose
 * answers must reach the proxy rather than the address it borrowed. */
#define PAL_CT_L7 (1U << 5)
/* With PAL_CT_L7: the answers of a connection the L7 proxy opened from the
 * endpoint's address to a server elsewhere (for the endpoint's egress HTTP
 * rules). The proxy judged that connection; policy does not decide these
 * packets again at the endpoint. */
#define PAL_CT_L7_UPSTREAM (1U << 6)
#define PAL_CT_TCP_CLOSED(f)                                                   \
	(((f)&PAL_CT_TCP_RST) ||                                               \
	 ((f) & (PAL_CT_TCP_FIN_FWD | PAL_CT_TCP_FIN_REV)) ==                  \
		 (PAL_CT_TCP_FIN_FWD | PAL_CT_TCP_FIN_REV))

struct pal_ct_value {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u64 packets;
	__u64 bytes;
	__u32 epoch;	 /* pal_config.epoch when last validated */
	__u32 policy_id; /* policy that allowed the flow */
	__u32 peer_id;	 /* identity of the peer when validated */
	__u8 verdict;	 /* PAL_VERDICT_ALLOW or PAL_VERDICT_AUDIT */
	__u8 pad;
	__u16 flags; /* PAL_CT_* */
};

/* pal_ep_mac: HASH, host veth ifindex -> the container interface's MAC.
 * Frames the container sends carry it as their source; unicast frames
 * delivered to it carry it as their destination. No entry: not checked. */
struct pal_mac {
	__u8 addr[6];
	__u16 pad;
};

/* pal_budget: HASH, keyed by PAL_CT_TABLE(ep_id, direction). User space
 * writes it with the table (capacity); the datapath keeps the rest. */
struct pal_budget {
	__u64 swept_ns; /* last sweep of expired flows from the full table */
	__u64 refused;	/* new flows refused since the table was created */
	__u64 last_refused_ns;
	__u32 capacity; /* the table's max_entries */
	__u32 pad;
};

/* pal_srcguard: HASH. The addresses each endpoint owns: a container may
 * only send from these (anti-spoofing). Value is reserved (0). */
struct pal_srcguard_key {
	__u32 ep_id;
	__u8 addr[16];
};

/* Fragment tables: ports of fragmented datagrams, recorded from the first
 * fragment so later fragments get the same verdict. One LRU per endpoint
 * and direction (pal_frag_tables, keyed like pal_ct_tables), of
 * PAL_SIZE_FRAG entries by default. */
struct pal_frag_key {
	__u32 ep_id;
	__u8 direction;
	__u8 protocol;
	__u16 pad;
	__u32 id; /* IPv4 id (16 bits) or IPv6 fragment identification */
	__u8 saddr[16];
	__u8 daddr[16];
};

struct pal_frag_value {
	__be16 sport;
	__be16 dport;
	__u32 pad;
};

/* pal_config: ARRAY with one element. */
struct pal_config {
	__u32 epoch; /* bumped by every sync; conntrack entries revalidate */
	__u32 flags; /* PAL_CFG_* */
	__u32 events_per_sec; /* per endpoint and CPU */
	__u32 events_burst;
	__u64 sync_token; /* written by user space after each complete sync */
};

/* pal_proxy: ARRAY of one element: where redirected connections go. A
 * redirected packet gets `mark` (a policy routing rule sends marked
 * packets to the node's `local` table) and destination port `dns_port`,
 * where the proxy listens on every address. Zero until a proxy runs:
 * redirected traffic is then dropped (fail closed). */
struct pal_proxy_config {
	__u32 mark;
	__u16 dns_port;
	__u16 http_port; /* the L7 proxy's transparent listener (0: none) */
};

/* pal_counters: PERCPU_HASH. */
struct pal_counter_key {
	__u32 ep_id;
	__u8 direction;
	__u8 verdict;
	__u8 reason; /* absolute value of PAL_REASON_* / PAL_DROP_* */
	__u8 pad;
};

struct pal_counter_value {
	__u64 packets;
	__u64 bytes;
};

/* pal_events: RINGBUF of struct pal_event. */
#define PAL_EVENT_FLOW 1 /* a new flow was decided (allowed or audited) */
#define PAL_EVENT_DROP 2 /* a packet was dropped */

struct pal_event {
	__u64 ts_ns; /* bpf_ktime_get_ns() */
	__u32 ep_id;
	__u32 ifindex;
	__u32 identity;	     /* the endpoint's identity */
	__u32 peer_identity; /* the peer's identity */
	__u32 policy_id;
	__u32 pkt_len;
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 direction;
	__u8 verdict;
	__s8 reason;
	__u8 type; /* PAL_EVENT_* */
	__u8 pad[7];
};

/* pal_evstats: PERCPU_ARRAY indexed by PAL_EVSTAT_*. */
#define PAL_EVSTAT_SENT		0
#define PAL_EVSTAT_RATE_LIMITED 1
#define PAL_EVSTAT_RINGBUF_FULL 2
#define PAL_EVSTAT_MAX		3

/* pal_ratelimit_ep: PERCPU_HASH keyed by ep_id, one token bucket per
 * endpoint (and CPU): one endpoint's flood spends only its own events.
 * (pal_ratelimit, one bucket for the node, is what earlier builds used.) */
struct pal_ratelimit {
	__u64 last_ns;
	__u64 tokens;
};

/* pal_svc: HASH. Service frontends of this node (ClusterIPs, external and
 * load-balancer addresses, this node's addresses with each NodePort), by
 * address, protocol and port. A new egress flow to one is not judged on
 * the veth: it is judged after the node's DNAT, on the backend chosen.
 * Value is reserved (0). */
struct pal_svc_key {
	__u8 addr[16];
	__be16 port;
	__u8 protocol;
	__u8 pad;
};

/* pal_svc_flows: LRU_HASH. Flows the veth program deferred to pal_service,
 * keyed by their tuple before DNAT (as the client sent it), written while
 * the flow opens, so the netfilter program knows which endpoint sent it. */
struct pal_svc_flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 pad[3];
};

struct pal_svc_flow_value {
	__u32 ifindex; /* key of pal_endpoints */
	__u32 ep_id;   /* the endpoint then; another one there fails closed */
};

/* pal_svc_backends: LRU_HASH, keyed like pal_svc_flows. The backend a
 * deferred flow was DNATed to, written by pal_service when it allows the
 * flow: the node's conntrack never shows pal_service an established flow
 * again, so when policy changes the veth program decides the flow again on
 * this backend (and cuts it if it is denied now). Sized like
 * pal_svc_flows (setting serviceFlows). */
struct pal_svc_backend {
	__u8 addr[16];
	__be16 port;
	__u16 pad;
};

/* The sizes user space relies on: a change here must be deliberate (bump
 * PAL_ABI_VERSION). shared/src/abi.rs is checked against this header,
 * field by field, when it is built. */
_Static_assert(sizeof(struct pal_endpoint) == 16,
	       "struct pal_endpoint changed size");
_Static_assert(sizeof(struct pal_ipcache_key) == 20,
	       "struct pal_ipcache_key changed size");
_Static_assert(sizeof(struct pal_ipcache_host_key) == 16,
	       "struct pal_ipcache_host_key changed size");
_Static_assert(sizeof(struct pal_ipcache_value) == 8,
	       "struct pal_ipcache_value changed size");
_Static_assert(sizeof(struct pal_policy_match) == 16,
	       "struct pal_policy_match changed size");
_Static_assert(sizeof(struct pal_policy_key) == 20,
	       "struct pal_policy_key changed size");
_Static_assert(sizeof(struct pal_policy_value) == 8,
	       "struct pal_policy_value changed size");
_Static_assert(sizeof(struct pal_ct_key) == 44,
	       "struct pal_ct_key changed size");
_Static_assert(sizeof(struct pal_ct_value) == 48,
	       "struct pal_ct_value changed size");
_Static_assert(sizeof(struct pal_mac) == 8, "struct pal_mac changed size");
_Static_assert(sizeof(struct pal_budget) == 32,
	       "struct pal_budget changed size");
_Static_assert(sizeof(struct pal_srcguard_key) == 20,
	       "struct pal_srcguard_key changed size");
_Static_assert(sizeof(struct pal_frag_key) == 44,
	       "struct pal_frag_key changed size");
_Static_assert(sizeof(struct pal_frag_value) == 8,
	       "struct pal_frag_value changed size");
_Static_assert(sizeof(struct pal_config) == 24,
	       "struct pal_config changed size");
_Static_assert(sizeof(struct pal_proxy_config) == 8,
	       "struct pal_proxy_config changed size");
_Static_assert(sizeof(struct pal_counter_key) == 8,
	       "struct pal_counter_key changed size");
_Static_assert(sizeof(struct pal_counter_value) == 16,
	       "struct pal_counter_value changed size");
_Static_assert(sizeof(struct pal_event) == 80, "struct pal_event changed size");
_Static_assert(sizeof(struct pal_ratelimit) == 16,
	       "struct pal_ratelimit changed size");
_Static_assert(sizeof(struct pal_svc_key) == 20,
	       "struct pal_svc_key changed size");
_Static_assert(sizeof(struct pal_svc_flow_key) == 40,
	       "struct pal_svc_flow_key changed size");
_Static_assert(sizeof(struct pal_svc_flow_value) == 8,
	       "struct pal_svc_flow_value changed size");
_Static_assert(sizeof(struct pal_svc_backend) == 20,
	       "struct pal_svc_backend changed size");
_Static_assert(__builtin_offsetof(struct pal_policy_key, m) == 4,
	       "the LPM prefix length precedes the match");
_Static_assert(__builtin_offsetof(struct pal_event, saddr) == 32,
	       "struct pal_event changed layout");

#endif /* PALISADE_ABI_H */
