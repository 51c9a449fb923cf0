// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Attached to tc ingress of the node's lo: the container programs move the
 * packets of L7 flows here (pal_to_l7_proxy), marked. Each is given to the
 * L7 proxy's socket: the connection's own socket once the proxy has one,
 * else (a connection opening) the proxy's transparent listener. The mark
 * routes the packet to the node's local table, so the stack then delivers
 * it to that socket whatever its destination address. Unmarked packets
 * are not looked at.
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

/* The proxy listens on every address, IPv4 and IPv6 (one dual-stack
 * socket). */
static __always_inline struct bpf_sock *
pal_l7_socket(struct __sk_buff *skb, struct bpf_sock_tuple *t, __u32 len,
	      __u16 listen_port, int syn)
{
	struct bpf_sock *sk;

	sk = bpf_skc_lookup_tcp(skb, t, len, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN)
			return sk;
		bpf_sk_release(sk);
	}
	if (!syn)
		return 0;
	if (len == sizeof(t->ipv4)) {
		t->ipv4.daddr = 0;
		t->ipv4.dport = bpf_htons(listen_port);
	} else {
		__builtin_memset(t->ipv6.daddr, 0, sizeof(t->ipv6.daddr));
		t->ipv6.dport = bpf_htons(listen_port);
	}
	return bpf_skc_lookup_tcp(skb, t, len, BPF_F_CURRENT_NETNS, 0);
}

SEC("classifier")
int pal_l7_steer(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_sock_tuple t = {};
	struct pal_proxy_config *pc;
	struct tcphdr *th;
	struct bpf_sock *sk;
	__u32 zero = 0, len;
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
	sk = pal_l7_socket(skb, &t, len, pc->http_port, th->syn && !th->ack);
	if (!sk)
		/* No proxy (or the connection is not one of its own): closed.
		 */
		return TC_ACT_SHOT;
	rc = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return rc == 0 ? TC_ACT_OK : TC_ACT_SHOT;
}

char _license[] SEC("license") = "Dual BSD/GPL";
