/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The per-packet path shared by both attach points:
 *   1. endpoint of this veth (by ifindex);
 *   2. conntrack: established, reply and related packets pass at once
 *      (after revalidation if policy changed since the flow was decided);
 *   3. peer address -> identity;
 *   4. policy -> verdict;
 *   5. allowed new flows enter conntrack; verdicts are counted and,
 *      rate-limited, reported as events.
 */
#ifndef PALISADE_DATAPATH_H
#define PALISADE_DATAPATH_H

#include <linux/pkt_cls.h>

#include "conntrack.h"
#include "events.h"
#include "maps.h"
#include "parse.h"
#include "policy.h"

/* "No objection": TC_ACT_UNSPEC in cls_bpf direct-action mode and TCX_NEXT
 * for TCX both hand the packet to the next program, or let it pass when
 * there is none, so palisade composes with other tc programs. */
#define PAL_PASS TC_ACT_UNSPEC
#define PAL_DROP TC_ACT_SHOT

static __always_inline void pal_frag_key_make(struct pal_frag_key *k,
					      __u32 ep_id, __u8 dir,
					      const struct pal_pkt *p)
{
	k->ep_id = ep_id;
	k->direction = dir;
	k->protocol = p->t.protocol;
	k->pad = 0;
	k->id = p->frag_id;
	__builtin_memcpy(k->saddr, p->t.saddr, 16);
	__builtin_memcpy(k->daddr, p->t.daddr, 16);
}

static __always_inline int pal_drop(struct __sk_buff *skb,
				    const struct pal_config *cfg,
				    const struct pal_endpoint *ep, __u8 dir,
				    const struct pal_tuple *t, __s8 reason,
				    __u32 peer_id, __u64 now)
{
	pal_count(ep ? ep->ep_id : 0, dir, PAL_VERDICT_DENY, reason, skb->len);
	pal_emit(skb, cfg, ep, dir, t, PAL_EVENT_DROP, PAL_VERDICT_DENY, reason,
		 peer_id, 0, now);
	return PAL_DROP;
}

static __always_inline int pal_handle(struct __sk_buff *skb, __u8 dir)
{
	__u32 ifindex = skb->ifindex, zero = 0;
	struct pal_decision d = {};
	struct pal_endpoint *ep;
	struct pal_config *cfg;
	struct pal_ct_value *ct;
	struct pal_ct_key ck;
	struct pal_pkt p = {};
	__u64 now;
	int rc, res;

	cfg = bpf_map_lookup_elem(&pal_config, &zero);
	if (!cfg)
		return PAL_DROP; /* an array always has element 0 */
	now = bpf_ktime_get_ns();

	ep = bpf_map_lookup_elem(&pal_endpoints, &ifindex);
	if (!ep)
		/* Attached but not (or no longer) registered: fail closed. */
		return pal_drop(skb, cfg, 0, dir, &p.t,
				PAL_DROP_UNKNOWN_ENDPOINT, 0, now);

	rc = pal_parse(skb, &p);
	if (rc == 1) {
		pal_count(ep->ep_id, dir, PAL_VERDICT_ALLOW, PAL_REASON_INFRA,
			  skb->len);
		return PAL_PASS;
	}
	if (rc < 0)
		return pal_drop(skb, cfg, ep, dir, &p.t, rc, 0, now);
	if (p.kind == PAL_PKT_INFRA) {
		pal_count(ep->ep_id, dir, PAL_VERDICT_ALLOW, PAL_REASON_INFRA,
			  skb->len);
		return PAL_PASS;
	}

	if (p.kind == PAL_PKT_FRAG_LATER) {
		struct pal_frag_key fk;
		struct pal_frag_value *fv;

		pal_frag_key_make(&fk, ep->ep_id, dir, &p);
		fv = bpf_map_lookup_elem(&pal_frag, &fk);
		if (!fv)
			return pal_drop(skb, cfg, ep, dir, &p.t,
					PAL_DROP_FRAG_NO_HEAD, 0, now);
		p.t.sport = fv->sport;
		p.t.dport = fv->dport;
	} else if (p.first_frag) {
		struct pal_frag_key fk;
		struct pal_frag_value fv = {
			.sport = p.t.sport,
			.dport = p.t.dport,
		};

		pal_frag_key_make(&fk, ep->ep_id, dir, &p);
		bpf_map_update_elem(&pal_frag, &fk, &fv, BPF_ANY);
	}

	if (p.kind == PAL_PKT_ICMP_ERROR) {
		/* The quoted packet went the other way: it is related if it
		 * belongs to a flow of this endpoint. */
		if (p.inner_valid && pal_ct_lookup(ep->ep_id, dir ^ 1, &p.inner,
						   now, &ck, &res)) {
			pal_count(ep->ep_id, dir, PAL_VERDICT_ALLOW,
				  PAL_REASON_RELATED, skb->len);
			return PAL_PASS;
		}
		/* Unsolicited: plain ICMP, judged by policy, never tracked. */
		pal_decide(ep, dir, &p.t, cfg, &d);
		if (d.verdict == PAL_VERDICT_DENY)
			return pal_drop(skb, cfg, ep, dir, &p.t, d.reason,
					d.peer_id, now);
		pal_count(ep->ep_id, dir, d.verdict, d.reason, skb->len);
		return PAL_PASS;
	}

	ct = pal_ct_lookup(ep->ep_id, dir, &p.t, now, &ck, &res);
	/* A bare SYN opens a connection: it is never a reply (that would let
	 * a reversed tuple ride on someone else's flow), and on a closed flow
	 * it starts a new one. Either way it is decided afresh. */
	if (ct && p.t.protocol == IPPROTO_TCP &&
	    (p.tcp_flags & (PAL_TCP_SYN | PAL_TCP_ACK)) == PAL_TCP_SYN &&
	    (res == PAL_CT_REPLY ||
	     (ct->flags & (PAL_CT_TCP_FIN | PAL_CT_TCP_RST))))
		ct = 0;
	if (ct) {
		if (ct->epoch != cfg->epoch) {
			/* Policy or identities changed since this flow was
			 * decided: decide it again as it was opened. */
			struct pal_tuple orig = {};

			__builtin_memcpy(orig.saddr, ck.saddr, 16);
			__builtin_memcpy(orig.daddr, ck.daddr, 16);
			orig.sport = ck.sport;
			orig.dport = ck.dport;
			orig.protocol = ck.protocol;
			pal_decide(ep, ck.direction, &orig, cfg, &d);
			if (d.verdict == PAL_VERDICT_DENY) {
				bpf_map_delete_elem(&pal_ct, &ck);
				return pal_drop(skb, cfg, ep, dir, &p.t,
						PAL_DROP_REVOKED, d.peer_id,
						now);
			}
			ct->epoch = cfg->epoch;
			ct->verdict = d.verdict;
			ct->policy_id = d.policy_id;
			ct->peer_id = d.peer_id;
		}
		pal_ct_touch(ct, res, p.tcp_flags, skb->len, now);
		pal_count(ep->ep_id, dir, ct->verdict, PAL_REASON_ESTABLISHED,
			  skb->len);
		return PAL_PASS;
	}

	pal_decide(ep, dir, &p.t, cfg, &d);
	if (d.verdict == PAL_VERDICT_DENY)
		return pal_drop(skb, cfg, ep, dir, &p.t, d.reason, d.peer_id,
				now);
	pal_ct_create(ep->ep_id, dir, &p.t, d.verdict, d.policy_id, d.peer_id,
		      cfg->epoch, skb->len, p.tcp_flags, now);
	pal_count(ep->ep_id, dir, d.verdict, d.reason, skb->len);
	pal_emit(skb, cfg, ep, dir, &p.t, PAL_EVENT_FLOW, d.verdict, d.reason,
		 d.peer_id, d.policy_id, now);
	return PAL_PASS;
}

#endif /* PALISADE_DATAPATH_H */
