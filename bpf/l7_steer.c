// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Attached to tc ingress of the node's lo: the container programs move the
 * packets of L7 flows here (pal_to_l7_proxy), marked. Each is given to the
 * L7 proxy's socket: the connection's own socket once the proxy has one,
 * else (a connection opening) the proxy's transparent listener. The mark
 * routes the packet to the node's local table, so the stack then delivers
 * it to that socket whatever its destination address. A connection the
 * node's DNAT sent to a Service backend gets its original addresses back
 * (pal_restore_frontend). A client's connection to a Service frontend is
 * DNATed after this program: its socket is found by the backend
 * (pal_svc_backends). Unmarked packets are not looked at.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "proxy_map.h"

/*
 * A connection that opens with the tuple of an earlier proxied connection
 * still in TIME_WAIT at the proxy (a client reusing its source port within
 * the minute, as a busy client does): the kernel must retire that socket
 * and give the SYN to a listener, which its TIME_WAIT code looks up
 * normally, and no listener has the tuple's address and port. The SYN is
 * given to the TIME_WAIT socket and its tuple noted here; pal_l7_lookup,
 * run by that listener lookup, answers it with the proxy's listener
 * (pal_l7_listener, set by the proxy). Entries live from a SYN to its
 * lookup, microseconds: the table is small and fixed.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct pal_svc_flow_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_l7_tw SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_l7_listener SEC(".maps");

/* The connection as pal_svc_flow_key (IPv4 as v4-mapped IPv6). */
static __always_inline void pal_tuple_key(struct pal_svc_flow_key *k,
					  const struct bpf_sock_tuple *t,
					  __u32 len)
{
	k->protocol = IPPROTO_TCP;
	if (len == sizeof(t->ipv4)) {
		k->saddr[10] = k->saddr[11] = 0xff;
		k->daddr[10] = k->daddr[11] = 0xff;
		__builtin_memcpy(&k->saddr[12], &t->ipv4.saddr, 4);
		__builtin_memcpy(&k->daddr[12], &t->ipv4.daddr, 4);
		k->sport = t->ipv4.sport;
		k->dport = t->ipv4.dport;
	} else {
		__builtin_memcpy(k->saddr, t->ipv6.saddr, 16);
		__builtin_memcpy(k->daddr, t->ipv6.daddr, 16);
		k->sport = t->ipv6.sport;
		k->dport = t->ipv6.dport;
	}
}

/* The proxy listens on every address, IPv4 and IPv6 (one dual-stack
 * socket). */
static __always_inline struct bpf_sock *
pal_l7_socket(struct __sk_buff *skb, struct bpf_sock_tuple *t, __u32 len,
	      __u16 listen_port, int syn)
{
	struct pal_svc_flow_key k = {};
	struct pal_svc_backend *b;
	struct bpf_sock *sk;

	sk = bpf_skc_lookup_tcp(skb, t, len, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN)
			return sk;
		bpf_sk_release(sk);
	}
	if (!syn) {
		/* A connection to a Service the client's veth steered here:
		 * the node's DNAT (after this program) gave the proxy's socket
		 * the backend's address and port, which pal_service noted. */
		pal_tuple_key(&k, t, len);
		b = bpf_map_lookup_elem(&pal_svc_backends, &k);
		if (!b)
			return 0;
		if (len == sizeof(t->ipv4)) {
			__builtin_memcpy(&t->ipv4.daddr, &b->addr[12], 4);
			t->ipv4.dport = b->port;
		} else {
			__builtin_memcpy(t->ipv6.daddr, b->addr, 16);
			t->ipv6.dport = b->port;
		}
		sk = bpf_skc_lookup_tcp(skb, t, len, BPF_F_CURRENT_NETNS, 0);
		if (sk && sk->state == BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
			return 0;
		}
		return sk;
	}
	if (len == sizeof(t->ipv4)) {
		t->ipv4.daddr = 0;
		t->ipv4.dport = bpf_htons(listen_port);
	} else {
		__builtin_memset(t->ipv6.daddr, 0, sizeof(t->ipv6.daddr));
		t->ipv6.dport = bpf_htons(listen_port);
	}
	return bpf_skc_lookup_tcp(skb, t, len, BPF_F_CURRENT_NETNS, 0);
}

#define PAL_IP4_CSUM  (ETH_HLEN + 10)
#define PAL_IP4_ADDRS (ETH_HLEN + 12)
#define PAL_IP6_ADDRS (ETH_HLEN + 8)
#define PAL_TCP_CSUM  16

/*
 * A connection the node's DNAT sent to a Service backend: give the packet
 * the addresses and ports its client sent it with (pal_svc_frontends), so
 * the node's conntrack finds the connection's entry and translates it again
 * on the way to the proxy. 0 when there is nothing to restore; -1 when the
 * packet could not be rewritten.
 */
static __always_inline int pal_restore_frontend(struct __sk_buff *skb,
						struct bpf_sock_tuple *t,
						__u32 len, __u32 l4)
{
	struct pal_svc_flow_key k = {}, *o;
	__u32 csum = l4 + PAL_TCP_CSUM;
	__be16 ports[2];

	pal_tuple_key(&k, t, len);
	o = bpf_map_lookup_elem(&pal_svc_frontends, &k);
	if (!o)
		return 0;
	if (len == sizeof(t->ipv4)) {
		__be32 addrs[2];

		__builtin_memcpy(&addrs[0], &o->saddr[12], 4);
		__builtin_memcpy(&addrs[1], &o->daddr[12], 4);
		if (bpf_l4_csum_replace(skb, csum, t->ipv4.saddr, addrs[0],
					BPF_F_PSEUDO_HDR | 4) ||
		    bpf_l4_csum_replace(skb, csum, t->ipv4.daddr, addrs[1],
					BPF_F_PSEUDO_HDR | 4) ||
		    bpf_l3_csum_replace(skb, PAL_IP4_CSUM, t->ipv4.saddr,
					addrs[0], 4) ||
		    bpf_l3_csum_replace(skb, PAL_IP4_CSUM, t->ipv4.daddr,
					addrs[1], 4) ||
		    bpf_skb_store_bytes(skb, PAL_IP4_ADDRS, addrs,
					sizeof(addrs), 0))
			return -1;
	} else {
		__s64 diff = bpf_csum_diff((__be32 *)t->ipv6.saddr, 32,
					   (__be32 *)o->saddr, 32, 0);

		if (diff < 0 ||
		    bpf_l4_csum_replace(skb, csum, 0, diff, BPF_F_PSEUDO_HDR) ||
		    bpf_skb_store_bytes(skb, PAL_IP6_ADDRS, o->saddr, 32, 0))
			return -1;
	}
	ports[0] = o->sport;
	ports[1] = o->dport;
	if (bpf_l4_csum_replace(skb, csum, k.sport, ports[0], 2) ||
	    bpf_l4_csum_replace(skb, csum, k.dport, ports[1], 2) ||
	    bpf_skb_store_bytes(skb, l4, ports, sizeof(ports), 0))
		return -1;
	return 0;
}

SEC("classifier")
int pal_l7_steer(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_sock_tuple t = {}, orig;
	struct pal_proxy_config *pc;
	struct tcphdr *th;
	struct bpf_sock *sk;
	__u32 zero = 0, len, l4;
	int syn;
	long rc;

	pc = bpf_map_lookup_elem(&pal_proxy, &zero);
	if (!pc || !pc->mark || !(skb->mark & pc->mark))
		return TC_ACT_UNSPEC;
	if ((void *)(eth + 1) > end)
		return TC_ACT_SHOT;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP ||
		    ip->ihl != 5)
			return TC_ACT_SHOT;
		th = (void *)(ip + 1);
		t.ipv4.saddr = ip->saddr;
		t.ipv4.daddr = ip->daddr;
		len = sizeof(t.ipv4);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
			return TC_ACT_SHOT;
		th = (void *)(ip6 + 1);
		__builtin_memcpy(t.ipv6.saddr, &ip6->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, &ip6->daddr, 16);
		len = sizeof(t.ipv6);
	} else {
		return TC_ACT_SHOT;
	}
	if ((void *)(th + 1) > end)
		return TC_ACT_SHOT;
	if (len == sizeof(t.ipv4)) {
		t.ipv4.sport = th->source;
		t.ipv4.dport = th->dest;
	} else {
		t.ipv6.sport = th->source;
		t.ipv6.dport = th->dest;
	}
	/* lo's address is all zeroes: the frame's destination was the
	 * container's or the gateway's, which would make it another host's. */
	if (skb->pkt_type != 0 /* PACKET_HOST */)
		bpf_skb_change_type(skb, 0);
	l4 = (__u32)((void *)th - data);
	syn = th->syn && !th->ack;
	/* Kept: the socket lookup for a SYN overwrites the destination. */
	__builtin_memcpy(&orig, &t, sizeof(orig));
	sk = pal_l7_socket(skb, &t, len, pc->http_port, syn);
	if (!sk)
		/* No proxy (or the connection is not one of its own): closed.
		 */
		return TC_ACT_SHOT;
	if (syn && sk->state == BPF_TCP_TIME_WAIT) {
		struct pal_svc_flow_key k = {};
		__u8 one = 1;

		pal_tuple_key(&k, &orig, len);
		bpf_map_update_elem(&pal_l7_tw, &k, &one, BPF_ANY);
	}
	rc = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (rc != 0 || pal_restore_frontend(skb, &orig, len, l4) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/*
 * Run by the node's socket lookups (attached to its network namespace):
 * answers the listener lookup of a SYN that met a TIME_WAIT socket of the
 * proxy (pal_l7_tw) with the proxy's listener. Every other lookup goes on
 * as usual.
 */
SEC("sk_lookup")
int pal_l7_lookup(struct bpf_sk_lookup *ctx)
{
	struct pal_svc_flow_key k = {};
	struct bpf_sock *sk;
	__u32 zero = 0;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	k.protocol = IPPROTO_TCP;
	if (ctx->family == 2 /* AF_INET */) {
		__u32 a;

		k.saddr[10] = k.saddr[11] = 0xff;
		k.daddr[10] = k.daddr[11] = 0xff;
		a = ctx->remote_ip4;
		__builtin_memcpy(&k.saddr[12], &a, 4);
		a = ctx->local_ip4;
		__builtin_memcpy(&k.daddr[12], &a, 4);
	} else {
		__u32 a[4];

		a[0] = ctx->remote_ip6[0];
		a[1] = ctx->remote_ip6[1];
		a[2] = ctx->remote_ip6[2];
		a[3] = ctx->remote_ip6[3];
		__builtin_memcpy(k.saddr, a, 16);
		a[0] = ctx->local_ip6[0];
		a[1] = ctx->local_ip6[1];
		a[2] = ctx->local_ip6[2];
		a[3] = ctx->local_ip6[3];
		__builtin_memcpy(k.daddr, a, 16);
	}
	k.sport = ctx->remote_port;
	k.dport = bpf_htons((__u16)ctx->local_port);
	if (!bpf_map_lookup_elem(&pal_l7_tw, &k))
		return SK_PASS;
	bpf_map_delete_elem(&pal_l7_tw, &k);
	sk = bpf_map_lookup_elem(&pal_l7_listener, &zero);
	if (!sk)
		return SK_PASS;
	bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return SK_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
