/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Counters and flow events. Counters are per CPU and never lost. Events go
 * to a ring buffer through a per-CPU token bucket, so a flood of drops
 * cannot starve the node; every event not sent is counted in pal_evstats.
 */
#ifndef PALISADE_EVENTS_H
#define PALISADE_EVENTS_H

#include "maps.h"
#include "parse.h"

static __always_inline void pal_count(__u32 ep_id, __u8 dir, __u8 verdict,
				      __s8 reason, __u32 len)
{
	struct pal_counter_key k = {
		.ep_id = ep_id,
		.direction = dir,
		.verdict = verdict,
		.reason = reason < 0 ? -reason : reason,
	};
	struct pal_counter_value *v, init = {.packets = 1, .bytes = len};

	v = bpf_map_lookup_elem(&pal_counters, &k);
	if (v) {
		/* Per-CPU value: no other CPU writes it. */
		v->packets++;
		v->bytes += len;
		return;
	}
	bpf_map_update_elem(&pal_counters, &k, &init, BPF_NOEXIST);
}

static __always_inline void pal_evstat(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&pal_evstats, &idx);

	if (v)
		(*v)++;
}

/* Token bucket in nano-tokens: refills rate tokens a second up to burst. */
/* A token bucket per endpoint: one endpoint's flood of events spends only
 * its own tokens, never another endpoint's. */
static __always_inline int pal_rate_ok(const struct pal_config *cfg,
				       __u32 ep_id, __u64 now)
{
	__u64 elapsed, cap = (__u64)cfg->events_burst * PAL_NSEC;
	struct pal_ratelimit *rl, full = {.last_ns = now, .tokens = cap};

	rl = bpf_map_lookup_elem(&pal_ratelimit_ep, &ep_id);
	if (!rl) {
		bpf_map_update_elem(&pal_ratelimit_ep, &ep_id, &full,
				    BPF_NOEXIST);
		rl = bpf_map_lookup_elem(&pal_ratelimit_ep, &ep_id);
		if (!rl)
			return 0;
	}
	elapsed = now - rl->last_ns;
	if (elapsed > 10 * PAL_NSEC)
		elapsed = 10 * PAL_NSEC; /* keeps elapsed * rate in range */
	rl->last_ns = now;
	rl->tokens += elapsed * cfg->events_per_sec;
	if (rl->tokens > cap)
		rl->tokens = cap;
	if (rl->tokens < PAL_NSEC)
		return 0;
	rl->tokens -= PAL_NSEC;
	return 1;
}

static __always_inline void pal_emit(__u32 ifindex, __u32 pkt_len,
				     const struct pal_config *cfg,
				     const struct pal_endpoint *ep, __u8 dir,
				     const struct pal_tuple *t, __u8 type,
				     __u8 verdict, __s8 reason, __u32 peer_id,
				     __u32 policy_id, __u64 now)
{
	struct pal_event *e;

	if (!(cfg->flags & PAL_CFG_EVENTS))
		return;
	if (!pal_rate_ok(cfg, ep ? ep->ep_id : 0, now)) {
		pal_evstat(PAL_EVSTAT_RATE_LIMITED);
		return;
	}
	e = bpf_ringbuf_reserve(&pal_events, sizeof(*e), 0);
	if (!e) {
		pal_evstat(PAL_EVSTAT_RINGBUF_FULL);
		return;
	}
	e->ts_ns = now;
	e->ep_id = ep ? ep->ep_id : 0;
	e->ifindex = ifindex;
	e->identity = ep ? ep->identity : 0;
	e->peer_identity = peer_id;
	e->policy_id = policy_id;
	e->pkt_len = pkt_len;
	__builtin_memcpy(e->saddr, t->saddr, 16);
	__builtin_memcpy(e->daddr, t->daddr, 16);
	e->sport = t->sport;
	e->dport = t->dport;
	e->protocol = t->protocol;
	e->direction = dir;
	e->verdict = verdict;
	e->reason = reason;
	e->type = type;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	bpf_ringbuf_submit(e, 0);
	pal_evstat(PAL_EVSTAT_SENT);
}

#endif /* PALISADE_EVENTS_H */
