/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Identities and verdicts. A decision costs one ipcache lookup and at most
 * four policy searches: the admin tier (exact peer identity), NetworkPolicy
 * (exact peer, then "any peer") or else the baseline tier (exact peer), each
 * one hash lookup per entry shape the endpoint has (one port, each port-range
 * block size, all ports, all protocols), whatever the number of policies,
 * rules, endpoints or ports: rules are compiled into map entries by user
 * space, never looped over here.
 */
#ifndef PALISADE_POLICY_H
#define PALISADE_POLICY_H

#include "maps.h"
#include "parse.h"

struct pal_decision {
	__u32 peer_id;
	__u32 policy_id;
	__u8 verdict;
	__s8 reason;
	__u8 l7; /* allowed by L7 rules only: through the node's L7 proxy */
};

static __always_inline __u32 pal_identity_of(const __u8 *addr)
{
	struct pal_ipcache_key k = {.prefixlen = 128};
	struct pal_ipcache_value *v;

	/* Whole addresses (endpoints, /32 and /128 blocks) by hash; the trie
	 * holds only shorter prefixes. */
	__builtin_memcpy(k.addr, addr, 16);
	v = bpf_map_lookup_elem(&pal_ipcache_host, k.addr);
	if (!v)
		v = bpf_map_lookup_elem(&pal_ipcache, &k);
	return v ? v->identity : PAL_ID_WORLD;
}

#define PAL_SHAPE_ANY_PORT  (1U << 0)
#define PAL_SHAPE_ANY_PROTO (1U << 1)

/*
 * The longest entry for k's peer shorter than one port (k holds the full
 * key on entry and is clobbered), copied to out: port-range blocks from the
 * longest down (range_lens), then all ports of the protocol, then all
 * protocols (shapes). Every try is one hash lookup; lengths the endpoint has
 * no entries of are skipped.
 *
 * A global function: the verifier checks it once on its own, rather than at
 * every call site and along every combination of skipped lengths.
 */
__attribute__((noinline)) int pal_policy_search(struct pal_policy_key *k,
						__u32 range_lens, __u32 shapes,
						struct pal_policy_value *out)
{
	struct pal_policy_value *v;
	__u16 port;

	if (!k || !out)
		return 0;
	port = bpf_ntohs(k->m.dport);
	v = NULL;
	for (int n = 15; n >= 1 && range_lens && !v; n--) {
		if (!(range_lens & (1U << (n - 1))))
			continue;
		k->prefixlen = PAL_POLICY_PREFIX_ANY_PORT + n;
		k->m.dport = bpf_htons(port & (__u16)(0xffff << (16 - n)));
		v = bpf_map_lookup_elem(&pal_policy, k);
	}
	if (!v && (shapes & PAL_SHAPE_ANY_PORT)) {
		k->prefixlen = PAL_POLICY_PREFIX_ANY_PORT;
		k->m.dport = 0;
		v = bpf_map_lookup_elem(&pal_policy, k);
	}
	if (!v && (shapes & PAL_SHAPE_ANY_PROTO)) {
		k->prefixlen = PAL_POLICY_PREFIX_ANY_PROTO;
		k->m.protocol = 0;
		k->m.dport = 0;
		v = bpf_map_lookup_elem(&pal_policy, k);
	}
	if (!v)
		return 0;
	*out = *v;
	return 1;
}

/* k's peer: one port inline (the common case), then the wider shapes. */
static __always_inline int pal_policy_peer(struct pal_policy_key *k,
					   __u32 range_lens, __u32 shapes,
					   struct pal_policy_value *out)
{
	struct pal_policy_value *v = bpf_map_lookup_elem(&pal_policy, k);

	if (v) {
		*out = *v;
		return 1;
	}
	return (range_lens || shapes) &&
	       pal_policy_search(k, range_lens, shapes, out);
}

/* One tier: the exact peer identity first, then (NetworkPolicy only) the
 * wildcard. */
static __always_inline int pal_policy_lookup(const struct pal_endpoint *ep,
					     __u8 dir, __u8 tier, __u32 peer_id,
					     __u8 proto, __be16 dport,
					     struct pal_policy_value *out)
{
	__u32 egress = dir == PAL_DIR_EGRESS;
	__u32 range_lens = (ep->range_lens >> (egress ? 16 : 0)) & 0x7fff;
	__u32 shapes = 0;
	struct pal_policy_key k = {};

	if (ep->flags &
	    (egress ? PAL_EP_HAS_ANY_PORT_EGRESS : PAL_EP_HAS_ANY_PORT_INGRESS))
		shapes |= PAL_SHAPE_ANY_PORT;
	if (ep->flags & (egress ? PAL_EP_HAS_ANY_PROTO_EGRESS
				: PAL_EP_HAS_ANY_PROTO_INGRESS))
		shapes |= PAL_SHAPE_ANY_PROTO;
	k.prefixlen = PAL_POLICY_PREFIX_FULL;
	k.m.ep_id = ep->ep_id;
	k.m.direction = dir;
	k.m.tier = tier;
	k.m.peer_id = peer_id;
	k.m.protocol = proto;
	k.m.dport = dport;
	if (pal_policy_peer(&k, range_lens, shapes, out))
		return 1;
	if (tier != PAL_TIER_NETPOL)
		return 0;
	/* The search clobbered the shape fields: back to one port. */
	k.prefixlen = PAL_POLICY_PREFIX_FULL;
	k.m.peer_id = PAL_ID_ANY;
	k.m.protocol = proto;
	k.m.dport = dport;
	return pal_policy_peer(&k, range_lens, shapes, out);
}

/* An admin or baseline entry's answer, when it is final (ALLOW or DENY;
 * policy_id names the deciding policy). An entry marked PAL_POLICY_F_AUDIT
 * also says that an audited Deny of the policy in policy_id came first:
 * remembered in audit_by, and reported if the flow ends up allowed. */
static __always_inline int pal_tier_final(const struct pal_policy_value *v,
					  struct pal_decision *d,
					  __u32 *audit_by)
{
	__u32 audit = (v->flags & PAL_POLICY_F_AUDIT) ? v->policy_id : 0;

	if (audit && !*audit_by)
		*audit_by = audit;
	switch (v->verdict) {
	case PAL_VERDICT_ALLOW:
		d->verdict = PAL_VERDICT_ALLOW;
		d->reason = PAL_REASON_POLICY;
		break;
	case PAL_VERDICT_DENY:
		d->verdict = PAL_VERDICT_DENY;
		d->reason = PAL_DROP_POLICY;
		break;
	default:
		return 0;
	}
	d->policy_id = audit ? 0 : v->policy_id;
	return 1;
}

/* The tiers, without the audit report (see pal_decide). */
static __always_inline void pal_decide_tiers(const struct pal_endpoint *ep,
					     __u8 dir,
					     const struct pal_tuple *t,
					     struct pal_decision *d,
					     __u32 *audit_by)
{
	__u32 egress = dir == PAL_DIR_EGRESS;
	__be16 dport = pal_is_l4_ports(t->protocol) ? t->dport : 0;
	struct pal_policy_value v = {};

	/* The admin tier: ALLOW and DENY are final, PASS goes on. */
	if ((ep->flags &
	     (egress ? PAL_EP_ADMIN_EGRESS : PAL_EP_ADMIN_INGRESS)) &&
	    pal_policy_lookup(ep, dir, PAL_TIER_ADMIN, d->peer_id, t->protocol,
			      dport, &v) &&
	    pal_tier_final(&v, d, audit_by))
		return;

	if (!(ep->flags &
	      (egress ? PAL_EP_ISOLATE_EGRESS : PAL_EP_ISOLATE_INGRESS))) {
		/* The baseline tier governs only directions that no
		 * NetworkPolicy isolates; what it leaves is allowed. */
		if ((ep->flags & (egress ? PAL_EP_BASELINE_EGRESS
					 : PAL_EP_BASELINE_INGRESS)) &&
		    pal_policy_lookup(ep, dir, PAL_TIER_BASELINE, d->peer_id,
				      t->protocol, dport, &v) &&
		    pal_tier_final(&v, d, audit_by))
			return;
		d->verdict = PAL_VERDICT_ALLOW;
		d->reason = PAL_REASON_NOT_ISOLATED;
		return;
	}
	if (pal_policy_lookup(ep, dir, PAL_TIER_NETPOL, d->peer_id, t->protocol,
			      dport, &v) &&
	    v.verdict == PAL_VERDICT_ALLOW) {
		d->verdict = PAL_VERDICT_ALLOW;
		d->reason = PAL_REASON_POLICY;
		d->policy_id = v.policy_id;
		d->l7 = (v.flags & PAL_POLICY_F_L7) != 0;
		return;
	}

	d->reason = PAL_DROP_POLICY;
	d->verdict = (ep->flags &
		      (egress ? PAL_EP_AUDIT_EGRESS : PAL_EP_AUDIT_INGRESS))
			     ? PAL_VERDICT_AUDIT
			     : PAL_VERDICT_DENY;
}

/*
 * Decide a flow opened in direction dir at endpoint ep with tuple t (as
 * seen in that direction). The peer is the destination of egress flows and
 * the source of ingress flows; the port is always the destination port.
 * A flow allowed after an audited tier policy's Deny matched it is
 * reported as audit (would be denied), naming that policy.
 */
static __always_inline void pal_decide(const struct pal_endpoint *ep, __u8 dir,
				       const struct pal_tuple *t,
				       const struct pal_config *cfg,
				       struct pal_decision *d)
{
	const __u8 *peer = dir == PAL_DIR_EGRESS ? t->daddr : t->saddr;
	__u32 audit_by = 0;

	d->peer_id = pal_identity_of(peer);
	d->policy_id = 0;
	d->l7 = 0;

	if (d->peer_id == PAL_ID_HOST && (cfg->flags & PAL_CFG_ALLOW_HOST)) {
		d->verdict = PAL_VERDICT_ALLOW;
		d->reason = PAL_REASON_HOST;
		return;
	}
	pal_decide_tiers(ep, dir, t, d, &audit_by);
	if (audit_by && d->verdict == PAL_VERDICT_ALLOW) {
		d->verdict = PAL_VERDICT_AUDIT;
		d->reason = PAL_DROP_POLICY;
		d->policy_id = audit_by;
	}
}

/*
 * The egress decision of a flow to a Service, on the backend the node's
 * DNAT chose (t: the flow to that backend). A flow only HTTP rules allow
 * is allowed when it goes through the L7 proxy (proxied: the client's veth
 * steered it there, PAL_EP_L7_EGRESS); any other is refused (fail closed),
 * as nothing would judge its requests.
 */
static __always_inline void
pal_decide_svc_backend(const struct pal_endpoint *ep, const struct pal_tuple *t,
		       const struct pal_config *cfg, struct pal_decision *d,
		       int proxied)
{
	pal_decide(ep, PAL_DIR_EGRESS, t, cfg, d);
	if (d->verdict != PAL_VERDICT_DENY && d->l7 && !proxied) {
		d->verdict = PAL_VERDICT_DENY;
		d->reason = PAL_DROP_L7_SERVICE;
	}
}

#endif /* PALISADE_POLICY_H */
