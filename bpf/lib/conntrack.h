/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * palisade's own connection tracking: one LRU entry per flow per endpoint,
 * keyed by the direction and tuple of the packet that opened the flow. A
 * packet matches its flow either forwards (same direction, same tuple) or as
 * a reply (opposite direction, reversed tuple): two hash lookups, whatever
 * the number of flows.
 */
#ifndef PALISADE_CONNTRACK_H
#define PALISADE_CONNTRACK_H

#include "maps.h"
#include "parse.h"

#define PAL_NSEC 1000000000ULL
/* Idle timeouts, close to Linux nf_conntrack's defaults. */
#define PAL_CT_TCP_ESTABLISHED (6ULL * 3600 * PAL_NSEC)
#define PAL_CT_TCP_OPENING     (60ULL * PAL_NSEC)
#define PAL_CT_TCP_CLOSING     (10ULL * PAL_NSEC)
#define PAL_CT_OTHER	       (60ULL * PAL_NSEC)

#define PAL_CT_NEW	   0
#define PAL_CT_ESTABLISHED 1 /* same direction as the opening packet */
#define PAL_CT_REPLY	   2 /* opposite direction */

static __always_inline void pal_ct_key_make(struct pal_ct_key *k, __u32 ep_id,
					    __u8 dir, const struct pal_tuple *t,
					    int reverse)
{
	k->ep_id = ep_id;
	k->direction = dir;
	k->protocol = t->protocol;
	k->pad = 0;
	if (!reverse) {
		__builtin_memcpy(k->saddr, t->saddr, 16);
		__builtin_memcpy(k->daddr, t->daddr, 16);
		k->sport = t->sport;
		k->dport = t->dport;
	} else {
		__builtin_memcpy(k->saddr, t->daddr, 16);
		__builtin_memcpy(k->daddr, t->saddr, 16);
		k->sport = t->dport;
		k->dport = t->sport;
	}
}

static __always_inline int pal_ct_expired(const struct pal_ct_value *v,
					  __u8 proto, __u64 now)
{
	__u64 timeout = PAL_CT_OTHER;

	if (proto == IPPROTO_TCP) {
		if (PAL_CT_TCP_CLOSED(v->flags))
			timeout = PAL_CT_TCP_CLOSING;
		else if (v->flags & PAL_CT_SEEN_REPLY)
			timeout = PAL_CT_TCP_ESTABLISHED;
		else
			timeout = PAL_CT_TCP_OPENING;
	}
	return now - v->last_seen_ns > timeout;
}

/*
 * Find the flow of a packet travelling in direction dir at endpoint ep_id.
 * On a hit, *key holds the entry's key and the entry is returned.
 */
static __always_inline struct pal_ct_value *
pal_ct_lookup(__u32 ep_id, __u8 dir, const struct pal_tuple *t, __u64 now,
	      struct pal_ct_key *key, int *result)
{
	struct pal_ct_value *v;

	pal_ct_key_make(key, ep_id, dir, t, 0);
	v = bpf_map_lookup_elem(&pal_ct, key);
	if (v && !pal_ct_expired(v, t->protocol, now)) {
		*result = PAL_CT_ESTABLISHED;
		return v;
	}
	pal_ct_key_make(key, ep_id, dir ^ 1, t, 1);
	v = bpf_map_lookup_elem(&pal_ct, key);
	if (v && !pal_ct_expired(v, t->protocol, now)) {
		*result = PAL_CT_REPLY;
		return v;
	}
	*result = PAL_CT_NEW;
	return 0;
}

/* Account a packet to its flow and follow TCP's closing handshake. */
static __always_inline void pal_ct_touch(struct pal_ct_value *v, int result,
					 __u8 tcp_flags, __u32 len, __u64 now)
{
	v->last_seen_ns = now;
	v->packets++;
	v->bytes += len;
	if (result == PAL_CT_REPLY)
		v->flags |= PAL_CT_SEEN_REPLY;
	if (tcp_flags & PAL_TCP_RST)
		v->flags |= PAL_CT_TCP_RST;
	if (tcp_flags & PAL_TCP_FIN)
		v->flags |= result == PAL_CT_REPLY ? PAL_CT_TCP_FIN_REV
						   : PAL_CT_TCP_FIN_FWD;
}

static __always_inline void
pal_ct_create(__u32 ep_id, __u8 dir, const struct pal_tuple *t, __u8 verdict,
	      __u32 policy_id, __u32 peer_id, __u32 epoch, __u32 len,
	      __u8 tcp_flags, __u16 flags, __u64 now)
{
	struct pal_ct_key k = {};
	struct pal_ct_value v = {};

	pal_ct_key_make(&k, ep_id, dir, t, 0);
	v.created_ns = now;
	v.last_seen_ns = now;
	v.packets = 1;
	v.bytes = len;
	v.epoch = epoch;
	v.policy_id = policy_id;
	v.peer_id = peer_id;
	v.verdict = verdict;
	v.flags = flags;
	if (tcp_flags & PAL_TCP_RST)
		v.flags |= PAL_CT_TCP_RST;
	if (tcp_flags & PAL_TCP_FIN)
		v.flags |= PAL_CT_TCP_FIN_FWD;
	/* BPF_ANY: a closed flow reopened with a new SYN replaces its entry. */
	bpf_map_update_elem(&pal_ct, &k, &v, BPF_ANY);
}

#endif /* PALISADE_CONNTRACK_H */
