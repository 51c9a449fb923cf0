/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * palisade's own connection tracking: one entry per flow per endpoint,
 * keyed by the direction and tuple of the packet that opened the flow, in
 * the endpoint's own table for that direction (pal_ct_tables). A packet
 * matches its flow either forwards (same direction, same tuple) or as a
 * reply (opposite direction, reversed tuple): two hash lookups, whatever
 * the number of flows.
 *
 * A table's capacity is the endpoint's budget. When it is full, expired
 * flows are swept from it (at most once per PAL_CT_SWEEP_INTERVAL) and, if
 * it is still full, the new flow is refused: a flood fills its own table
 * and never touches another endpoint's.
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

/* A full table is swept of expired flows at most this often. */
#define PAL_CT_SWEEP_INTERVAL (1ULL * PAL_NSEC)

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

/* The endpoint's table of flows opened in direction dir (0: none). */
static __always_inline void *pal_ct_table(__u32 ep_id, __u8 dir)
{
	__u32 k = PAL_CT_TABLE(ep_id, dir);

	return bpf_map_lookup_elem(&pal_ct_tables, &k);
}

/* Forget the flow whose key is key (its policy no longer allows it). */
static __always_inline void pal_ct_delete(const struct pal_ct_key *key)
{
	void *table = pal_ct_table(key->ep_id, key->direction);

	if (table)
		bpf_map_delete_elem(table, key);
}

/*
 * Find the flow of a packet travelling in direction dir at endpoint ep_id:
 * in fwd, the endpoint's table of flows opened in direction dir (0: none),
 * or as a reply in its table for the other direction. On a hit, *key holds
 * the entry's key and the entry is returned. A bare TCP SYN opens a
 * connection and is never a reply: its reply lookup is skipped.
 */
static __always_inline struct pal_ct_value *
pal_ct_lookup(void *fwd, __u32 ep_id, __u8 dir, const struct pal_tuple *t,
	      __u8 tcp_flags, __u64 now, struct pal_ct_key *key, int *result)
{
	struct pal_ct_value *v;
	void *rev;

	*result = PAL_CT_NEW;
	pal_ct_key_make(key, ep_id, dir, t, 0);
	v = fwd ? bpf_map_lookup_elem(fwd, key) : 0;
	if (v && !pal_ct_expired(v, t->protocol, now)) {
		*result = PAL_CT_ESTABLISHED;
		return v;
	}
	if (t->protocol == IPPROTO_TCP &&
	    (tcp_flags & (PAL_TCP_SYN | PAL_TCP_ACK)) == PAL_TCP_SYN)
		return 0;
	rev = pal_ct_table(ep_id, dir ^ 1);
	if (!rev)
		return 0;
	pal_ct_key_make(key, ep_id, dir ^ 1, t, 1);
	v = bpf_map_lookup_elem(rev, key);
	if (v && !pal_ct_expired(v, t->protocol, now)) {
		*result = PAL_CT_REPLY;
		return v;
	}
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

struct bpf_map;

struct pal_ct_sweep {
	__u64 now;
	__u32 freed; /* a flag, not a count: the verifier's states converge */
};

/* bpf_for_each_map_elem callback: drop one expired flow. */
static long pal_ct_sweep_one(struct bpf_map *table, struct pal_ct_key *key,
			     struct pal_ct_value *v, struct pal_ct_sweep *ctx)
{
	if (pal_ct_expired(v, key->protocol, ctx->now) &&
	    bpf_map_delete_elem(table, key) == 0)
		ctx->freed = 1;
	return 0;
}

/*
 * The table of key's endpoint and direction is full: sweep it of expired
 * flows, unless that was done less than PAL_CT_SWEEP_INTERVAL ago. Returns
 * whether anything was freed; counts the refusal otherwise.
 */
static __always_inline int pal_ct_make_room(void *table, __u32 table_id,
					    __u64 now)
{
	struct pal_ct_sweep ctx = {.now = now};
	struct pal_budget fresh = {}, *b;

	b = bpf_map_lookup_elem(&pal_budget, &table_id);
	if (!b) {
		bpf_map_update_elem(&pal_budget, &table_id, &fresh,
				    BPF_NOEXIST);
		b = bpf_map_lookup_elem(&pal_budget, &table_id);
		if (!b)
			return 0;
	}
	if (now - b->swept_ns >= PAL_CT_SWEEP_INTERVAL) {
		b->swept_ns = now;
		bpf_for_each_map_elem(table, pal_ct_sweep_one, &ctx, 0);
		if (ctx.freed)
			return 1;
	}
	__sync_fetch_and_add(&b->refused, 1);
	b->last_refused_ns = now;
	return 0;
}

/* Track a new flow in table, the endpoint's table for direction dir.
 * Returns 0, or -1 when the endpoint's budget for this direction is spent
 * (or it has no table: fail closed). */
static __always_inline int pal_ct_create(void *table, __u32 ep_id, __u8 dir,
					 const struct pal_tuple *t,
					 __u8 verdict, __u32 policy_id,
					 __u32 peer_id, __u32 epoch, __u32 len,
					 __u8 tcp_flags, __u16 flags, __u64 now)
{
	__u32 table_id = PAL_CT_TABLE(ep_id, dir);
	struct pal_ct_key k = {};
	struct pal_ct_value v = {};

	if (!table)
		return -1;
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
	if (bpf_map_update_elem(table, &k, &v, BPF_ANY) == 0)
		return 0;
	if (!pal_ct_make_room(table, table_id, now))
		return -1;
	return bpf_map_update_elem(table, &k, &v, BPF_ANY) == 0 ? 0 : -1;
}

#endif /* PALISADE_CONNTRACK_H */
