// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * pal_service: the egress verdict of flows to a Service, on the backend the
 * node's DNAT chose (kube-proxy in iptables or nftables mode, or anything
 * else that DNATs in PREROUTING).
 *
 * The veth program cannot judge such a flow: it sees the frontend (a
 * ClusterIP, a NodePort), and the backend is chosen later, in netfilter's
 * PREROUTING. So it lets the flow's opening packets through and records in
 * pal_svc_flows which endpoint sent them. This program runs at netfilter
 * FORWARD (IPv4 and IPv6), after every DNAT: for the first packet of each
 * DNATed connection (conntrack NEW) that the veth program deferred, it finds
 * the endpoint, takes the backend from the conntrack entry's reply tuple and
 * decides exactly as the veth program would for a flow to that backend. A
 * denied packet is dropped before its conntrack entry is confirmed, so a
 * retransmission is balanced and judged again. An allowed flow's backend is
 * remembered (pal_svc_backends): once the flow is established this program
 * never sees it again, so the veth program decides it again there when
 * policy changes. Everything else (packets of
 * established connections, flows not DNATed, flows nobody deferred) is
 * accepted after reading one field of the skb. Every new DNATed TCP
 * connection is also remembered in pal_svc_frontends, for the L7 steering
 * program on lo (bpf/include/proxy_map.h).
 *
 * Also attached at LOCAL_IN (after the DNAT too): a client with egress HTTP
 * rules has its connections to frontends steered to the node's L7 proxy,
 * so they are DNATed on lo and delivered locally; they are judged here the
 * same way, HTTP rules allowed (the proxy judges the requests), and the
 * backend remembered in pal_svc_backends tells pal_l7_steer which of the
 * proxy's sockets holds the connection. A Service whose backend is the
 * node itself is judged here too.
 *
 * Loaded with libbpf (aya 0.14 cannot load netfilter programs); it shares
 * the pinned maps of the veth programs.
 */
#include <linux/netfilter/nf_conntrack_common.h>
#include <linux/netfilter/nf_conntrack_tuple_common.h>
#include <bpf/bpf_core_read.h>

#include "lib/conntrack.h" /* PAL_NSEC */
#include "lib/events.h"
#include "lib/policy.h"

#define NF_DROP	  0
#define NF_ACCEPT 1

#define NFCT_INFOMASK 7UL

#define PAL_AF_INET  2
#define PAL_AF_INET6 10

/* The kernel's types, reduced to the fields read here; CO-RE relocates each
 * access to the running kernel's layout. */
struct sk_buff {
	unsigned long _nfct;
	unsigned int len;
	__u32 mark;
} __attribute__((preserve_access_index));

struct nf_hook_state {
	__u8 hook;
} __attribute__((preserve_access_index));

#define PAL_NF_INET_LOCAL_IN 1

/* The context of a netfilter program (include/net/netfilter/nf_bpf_link.h). */
struct bpf_nf_ctx {
	const struct nf_hook_state *state;
	struct sk_buff *skb;
};

/* struct nf_conntrack_tuple: the layout of conntrack's tuple has not
 * changed since it was written; it is read whole (two reads per entry). */
struct pal_nf_tuple {
	__u32 src_addr[4];
	__be16 src_port;
	__u16 l3num;
	__u32 dst_addr[4];
	__be16 dst_port;
	__u8 protonum;
	__u8 dir;
};

struct nf_conntrack_tuple {
	int src;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple_hash {
	struct nf_conntrack_tuple tuple;
} __attribute__((preserve_access_index));

struct nf_conn {
	unsigned long status;
	struct nf_conntrack_tuple_hash tuplehash[2];
} __attribute__((preserve_access_index));

_Static_assert(sizeof(struct pal_nf_tuple) == 40,
	       "nf_conntrack_tuple is 40 bytes");

static __always_inline void pal_nf_addr(__u8 *dst, const __u32 *a, __u16 l3num)
{
	if (l3num == PAL_AF_INET)
		pal_v4_mapped(dst, a[0]);
	else
		__builtin_memcpy(dst, a, 16);
}

/*
 * A connection the client's veth sent to the node's L7 proxy (marked, see
 * pal_to_l7_proxy): it reaches the proxy's listener through LOCAL_IN after
 * the node's DNAT, and the proxy judges its requests on the backend.
 */
static __always_inline int pal_proxied(const struct bpf_nf_ctx *ctx,
				       int local_in)
{
	struct pal_proxy_config *pc;
	__u32 zero = 0, mark;

	pc = bpf_map_lookup_elem(&pal_proxy, &zero);
	if (!local_in || !pc || !pc->mark || !pc->http_port ||
	    bpf_core_read(&mark, sizeof(mark), &ctx->skb->mark))
		return 0;
	return (mark & pc->mark) != 0;
}

static __always_inline int pal_nf_addr_eq(const __u8 *a, const __u8 *b)
{
	__u64 x[2], y[2];

	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1];
}

SEC("netfilter")
int pal_service(struct bpf_nf_ctx *ctx)
{
	struct sk_buff *skb = ctx->skb;
	unsigned long nfct = skb->_nfct;
	struct nf_conn *ct = (struct nf_conn *)(nfct & ~NFCT_INFOMASK);
	struct pal_nf_tuple orig, reply;
	struct pal_svc_flow_key fk = {};
	struct pal_svc_flow_value *fv;
	struct pal_svc_backend b = {};
	struct pal_decision d = {};
	struct pal_endpoint *ep;
	struct pal_config *cfg;
	struct pal_tuple t = {};
	unsigned long status;
	__u32 len, zero = 0;
	int local_in;
	__u8 hook;
	__u64 now;

	/* Untracked, or not the opening of a connection. */
	if (!ct || (nfct & NFCT_INFOMASK) != IP_CT_NEW)
		return NF_ACCEPT;
	if (bpf_core_read(&status, sizeof(status), &ct->status) ||
	    !(status & IPS_DST_NAT))
		return NF_ACCEPT;
	if (bpf_core_read(&orig, sizeof(orig),
			  &ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple) ||
	    bpf_core_read(&reply, sizeof(reply),
			  &ct->tuplehash[IP_CT_DIR_REPLY].tuple))
		return NF_DROP; /* cannot happen for a live entry: fail closed
				 */
	if (orig.l3num != PAL_AF_INET && orig.l3num != PAL_AF_INET6)
		return NF_ACCEPT;

	/* The flow as the client sent it: was it deferred by a veth? */
	pal_nf_addr(fk.saddr, orig.src_addr, orig.l3num);
	pal_nf_addr(fk.daddr, orig.dst_addr, orig.l3num);
	fk.sport = orig.src_port;
	fk.dport = orig.dst_port;
	fk.protocol = orig.protonum;
	if (orig.protonum == IPPROTO_TCP) {
		/* Remembered by the connection as it reaches the backend (the
		 * reply tuple reversed: after the DNAT and any SNAT), in case
		 * the backend's HTTP rules send it to the L7 proxy. */
		struct pal_svc_flow_key bk = {};

		pal_nf_addr(bk.saddr, reply.dst_addr, reply.l3num);
		pal_nf_addr(bk.daddr, reply.src_addr, reply.l3num);
		bk.sport = reply.dst_port;
		bk.dport = reply.src_port;
		bk.protocol = IPPROTO_TCP;
		bpf_map_update_elem(&pal_svc_frontends, &bk, &fk, BPF_ANY);
	}
	fv = bpf_map_lookup_elem(&pal_svc_flows, &fk);
	if (!fv)
		return NF_ACCEPT;

	cfg = bpf_map_lookup_elem(&pal_config, &zero);
	if (!cfg)
		return NF_DROP;
	now = bpf_ktime_get_ns();
	len = skb->len;

	/* The same flow towards the backend: the reply tuple's source is the
	 * address and port the DNAT chose. */
	__builtin_memcpy(t.saddr, fk.saddr, 16);
	pal_nf_addr(t.daddr, reply.src_addr, reply.l3num);
	t.sport = fk.sport;
	t.dport = reply.src_port;
	t.protocol = fk.protocol;

	/* At LOCAL_IN, a connection allowed at FORWARD already (to a backend
	 * on this node whose HTTP rules then sent it to the proxy) is not
	 * judged twice. */
	local_in = !bpf_core_read(&hook, sizeof(hook), &ctx->state->hook) &&
		   hook == PAL_NF_INET_LOCAL_IN;
	if (local_in) {
		struct pal_svc_backend *seen;

		seen = bpf_map_lookup_elem(&pal_svc_backends, &fk);
		if (seen && seen->port == t.dport &&
		    pal_nf_addr_eq(seen->addr, t.daddr))
			return NF_ACCEPT;
	}

	ep = bpf_map_lookup_elem(&pal_endpoints, &fv->ifindex);
	if (!ep || ep->ep_id != fv->ep_id) {
		/* The endpoint went away between its veth and here. */
		pal_count(fv->ep_id, PAL_DIR_EGRESS, PAL_VERDICT_DENY,
			  PAL_DROP_UNKNOWN_ENDPOINT, len);
		return NF_DROP;
	}
	pal_decide_svc_backend(ep, &t, cfg, &d, pal_proxied(ctx, local_in));
	if (d.verdict != PAL_VERDICT_DENY) {
		/* Remembered for the veth program, which decides the flow
		 * again on it when policy changes; a flow that could not be
		 * remembered could not be revoked: refused (fail closed), its
		 * next packet tries again. */
		__builtin_memcpy(b.addr, t.daddr, 16);
		b.port = t.dport;
		if (bpf_map_update_elem(&pal_svc_backends, &fk, &b, BPF_ANY)) {
			d.verdict = PAL_VERDICT_DENY;
			d.reason = PAL_DROP_BUDGET;
		}
	}
	if (d.verdict == PAL_VERDICT_DENY) {
		pal_count(ep->ep_id, PAL_DIR_EGRESS, PAL_VERDICT_DENY, d.reason,
			  len);
		pal_emit(fv->ifindex, len, cfg, ep, PAL_DIR_EGRESS, &t,
			 PAL_EVENT_DROP, PAL_VERDICT_DENY, d.reason, d.peer_id,
			 d.policy_id, now);
		return NF_DROP;
	}
	pal_count(ep->ep_id, PAL_DIR_EGRESS, d.verdict, d.reason, len);
	pal_emit(fv->ifindex, len, cfg, ep, PAL_DIR_EGRESS, &t, PAL_EVENT_FLOW,
		 d.verdict, d.reason, d.peer_id, d.policy_id, now);
	return NF_ACCEPT;
}

char _license[] SEC("license") = "Dual BSD/GPL";
