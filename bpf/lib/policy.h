/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Identities and verdicts. A decision costs one ipcache lookup and at most
 * two policy lookups per tier (exact peer identity, then "any peer"), each
 * one to three hash lookups and, for endpoints with port-range rules, a trie
 * lookup, whatever the number of policies, rules, endpoints or ports: rules
 * are compiled into map entries by user space, never looped over here.
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

/*
 * The longest entry matching k (prefix length FULL on entry; k is
 * clobbered). Fixed shapes by hash, port ranges in the trie; shapes the
 * endpoint has no entries of are not looked up.
 */
static __always_inline struct pal_policy_value *
pal_policy_find(struct pal_policy_key *k, __u32 has_range, __u32 has_any_port,
		__u32 has_any_proto)
{
	struct pal_policy_value *v;

	v = bpf_map_lookup_elem(&pal_policy_exact, k);
	if (v)
		return v;
	if (has_range) {
		v = bpf_map_lookup_elem(&pal_policy, k);
		if (v)
			return v;
	}
	if (has_any_port) {
		k->prefixlen = PAL_POLICY_PREFIX_ANY_PORT;
		k->m.dport = 0;
		v = bpf_map_lookup_elem(&pal_policy_exact, k);
		if (v)
			return v;
	}
	if (has_any_proto) {
		k->prefixlen = PAL_POLICY_PREFIX_ANY_PROTO;
		k->m.protocol = 0;
		k->m.dport = 0;
		v = bpf_map_lookup_elem(&pal_policy_exact, k);
	}
	return v;
}

/* One tier: the exact peer identity first, then the wildcard. */
static __always_inline struct pal_policy_value *
pal_policy_lookup(const struct pal_endpoint *ep, __u8 dir, __u8 tier,
		  __u32 peer_id, __u8 proto, __be16 dport)
{
	__u32 egress = dir == PAL_DIR_EGRESS;
	__u32 has_range = ep->flags & (egress ? PAL_EP_HAS_RANGE_EGRESS
					      : PAL_EP_HAS_RANGE_INGRESS);
	__u32 has_any_port = ep->flags & (egress ? PAL_EP_HAS_ANY_PORT_EGRESS
						 : PAL_EP_HAS_ANY_PORT_INGRESS);
	__u32 has_any_proto =
		ep->flags & (egress ? PAL_EP_HAS_ANY_PROTO_EGRESS
				    : PAL_EP_HAS_ANY_PROTO_INGRESS);
	struct pal_policy_key k = {};
	struct pal_policy_value *v;

	k.prefixlen = PAL_POLICY_PREFIX_FULL;
	k.m.ep_id = ep->ep_id;
	k.m.direction = dir;
	k.m.tier = tier;
	k.m.peer_id = peer_id;
	k.m.protocol = proto;
	k.m.dport = dport;
	v = pal_policy_find(&k, has_range, has_any_port, has_any_proto);
	if (v)
		return v;
	k.prefixlen = PAL_POLICY_PREFIX_FULL;
	k.m.peer_id = PAL_ID_ANY;
	k.m.protocol = proto;
	k.m.dport = dport;
	return pal_policy_find(&k, has_range, has_any_port, has_any_proto);
}

/*
 * Decide a flow opened in direction dir at endpoint ep with tuple t (as
 * seen in that direction). The peer is the destination of egress flows and
 * the source of ingress flows; the port is always the destination port.
 */
static __always_inline void pal_decide(const struct pal_endpoint *ep, __u8 dir,
				       const struct pal_tuple *t,
				       const struct pal_config *cfg,
				       struct pal_decision *d)
{
	const __u8 *peer = dir == PAL_DIR_EGRESS ? t->daddr : t->saddr;
	__u32 isolate = dir == PAL_DIR_EGRESS ? PAL_EP_ISOLATE_EGRESS
					      : PAL_EP_ISOLATE_INGRESS;
	__u32 audit = dir == PAL_DIR_EGRESS ? PAL_EP_AUDIT_EGRESS
					    : PAL_EP_AUDIT_INGRESS;
	__be16 dport = pal_is_l4_ports(t->protocol) ? t->dport : 0;
	struct pal_policy_value *v;

	d->peer_id = pal_identity_of(peer);
	d->policy_id = 0;

	if (d->peer_id == PAL_ID_HOST && (cfg->flags & PAL_CFG_ALLOW_HOST)) {
		d->verdict = PAL_VERDICT_ALLOW;
		d->reason = PAL_REASON_HOST;
		return;
	}

	/* Tier PAL_TIER_ADMIN (AdminNetworkPolicy) is looked up here once it
	 * exists: ALLOW and DENY are final, PASS falls through. */

	if (!(ep->flags & isolate)) {
		/* Tier PAL_TIER_BASELINE (BaselineAdminNetworkPolicy) is
		 * consulted here: it only governs directions that no
		 * NetworkPolicy isolates. */
		d->verdict = PAL_VERDICT_ALLOW;
		d->reason = PAL_REASON_NOT_ISOLATED;
		return;
	}
	v = pal_policy_lookup(ep, dir, PAL_TIER_NETPOL, d->peer_id, t->protocol,
			      dport);
	if (v && v->verdict == PAL_VERDICT_ALLOW) {
		d->verdict = PAL_VERDICT_ALLOW;
		d->reason = PAL_REASON_POLICY;
		d->policy_id = v->policy_id;
		return;
	}

	d->reason = PAL_DROP_POLICY;
	d->verdict = (ep->flags & audit) ? PAL_VERDICT_AUDIT : PAL_VERDICT_DENY;
}

#endif /* PALISADE_POLICY_H */
