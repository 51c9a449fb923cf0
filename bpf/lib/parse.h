/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Packet parsing: Ethernet, IPv4/IPv6 (with extension headers and
 * fragments), TCP/UDP/SCTP ports, ICMP/ICMPv6 echo and error messages (with
 * the tuple of the packet quoted inside an error).
 *
 * Everything is read with bpf_skb_load_bytes(): offsets depend on IPv4
 * options and IPv6 extension headers, and the helper does the bounds check
 * at run time, which keeps the verifier's job small and the code one path
 * for both families.
 */
#ifndef PALISADE_PARSE_H
#define PALISADE_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "palisade_abi.h"

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif
#define PAL_NEXTHDR_HOP	     0
#define PAL_NEXTHDR_ROUTING  43
#define PAL_NEXTHDR_FRAGMENT 44
#define PAL_NEXTHDR_AUTH     51
#define PAL_NEXTHDR_DEST     60
#define PAL_MAX_IPV6_EXT     6

#define PAL_TCP_FIN 0x01
#define PAL_TCP_SYN 0x02
#define PAL_TCP_RST 0x04
#define PAL_TCP_ACK 0x10

/* What kind of packet this is, beyond its tuple. ND and DHCP are only
 * candidates here: the datapath checks scope and direction before it
 * exempts them from policy (see pal_infra_ok). */
#define PAL_PKT_NORMAL	   0
#define PAL_PKT_ND	   1 /* ICMPv6 ND or MLD message */
#define PAL_PKT_ICMP_ERROR 2 /* carries an inner tuple */
#define PAL_PKT_FRAG_LATER 3 /* later fragment: ports from pal_frag */
#define PAL_PKT_DHCP	   4 /* DHCP or DHCPv6 client/server ports */

struct pal_tuple {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 pad[3];
};

struct pal_pkt {
	struct pal_tuple t;
	struct pal_tuple inner; /* PAL_PKT_ICMP_ERROR: the quoted packet */
	__u32 frag_id;
	__u8 kind;
	__u8 tcp_flags;
	__u8 first_frag; /* first fragment of a fragmented datagram */
	__u8 inner_valid;
	__u8 hop_limit; /* IPv6 hop limit / IPv4 TTL */
	__u8 icmp_type;
	__u8 v6;
	__u8 pad;
	__u32 l4_off; /* where the layer 4 header starts */
};

static __always_inline void pal_v4_mapped(__u8 *dst, __be32 addr)
{
	__u32 w[4] = {0, 0, bpf_htonl(0x0000ffff), addr};

	__builtin_memcpy(dst, w, sizeof(w));
}

static __always_inline int pal_is_l4_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP ||
	       proto == IPPROTO_SCTP;
}

/* ICMP types that report an error about a packet quoted after the 8-byte
 * header (RFC 792, RFC 4443 section 2.1). */
static __always_inline int pal_icmp4_is_error(__u8 type)
{
	return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
}

static __always_inline int pal_icmp6_is_error(__u8 type)
{
	return type >= 1 && type <= 4;
}

/* Router/neighbour solicitation and advertisement, redirect (RFC 4861) and
 * multicast listener messages (RFC 2710, RFC 3810): link-local
 * housekeeping that must work under default deny, like ARP for IPv4. */
static __always_inline int pal_icmp6_is_infra(__u8 type)
{
	return (type >= 130 && type <= 137) || type == 143;
}

/* Ports of an echo message: the identifier goes on the requester's side,
 * so a reply's tuple is the exact reverse of its request's. */
static __always_inline void pal_echo_ports(struct pal_tuple *t, int request,
					   __be16 id)
{
	if (request) {
		t->sport = id;
		t->dport = 0;
	} else {
		t->sport = 0;
		t->dport = id;
	}
}

/* The quoted packet inside an ICMP error: its addresses and, when present,
 * its ports. Returns 0 when the inner tuple could be read. */
static __always_inline int pal_parse_inner(struct __sk_buff *skb, __u32 off,
					   int v6, struct pal_tuple *in)
{
	__u32 l4off;
	__u8 proto;

	if (!v6) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
			return -1;
		if (ip.version != 4 || ip.ihl < 5)
			return -1;
		pal_v4_mapped(in->saddr, ip.saddr);
		pal_v4_mapped(in->daddr, ip.daddr);
		proto = ip.protocol;
		l4off = off + ip.ihl * 4;
	} else {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return -1;
		__builtin_memcpy(in->saddr, &ip6.saddr, 16);
		__builtin_memcpy(in->daddr, &ip6.daddr, 16);
		/* Extension headers in a quoted packet are rare; such an error
		 * is then judged as plain ICMP by policy instead. */
		proto = ip6.nexthdr;
		l4off = off + sizeof(ip6);
	}
	in->protocol = proto;
	if (pal_is_l4_ports(proto)) {
		__be16 ports[2];

		if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)) < 0)
			return -1;
		in->sport = ports[0];
		in->dport = ports[1];
		return 0;
	}
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		__u8 hdr[8];
		__u8 req = proto == IPPROTO_ICMP ? 8 : 128;
		__u8 rep = proto == IPPROTO_ICMP ? 0 : 129;

		if (bpf_skb_load_bytes(skb, l4off, hdr, sizeof(hdr)) < 0)
			return -1;
		if (hdr[0] != req && hdr[0] != rep)
			return -1;
		pal_echo_ports(in, hdr[0] == req, *(__be16 *)&hdr[4]);
		return 0;
	}
	return -1;
}

/* Layer 4 of a packet (or of a first fragment) at l4off. */
static __always_inline int pal_parse_l4(struct __sk_buff *skb, __u32 l4off,
					int v6, struct pal_pkt *p)
{
	__u8 proto = p->t.protocol;

	p->l4_off = l4off;
	if (proto == IPPROTO_TCP) {
		__u8 hdr[14];

		if (bpf_skb_load_bytes(skb, l4off, hdr, sizeof(hdr)) < 0)
			return PAL_DROP_MALFORMED;
		p->t.sport = *(__be16 *)&hdr[0];
		p->t.dport = *(__be16 *)&hdr[2];
		p->tcp_flags = hdr[13];
		return 0;
	}
	if (proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
		__be16 ports[2];

		if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)) < 0)
			return PAL_DROP_MALFORMED;
		p->t.sport = ports[0];
		p->t.dport = ports[1];
		if (proto == IPPROTO_UDP) {
			__u16 s = bpf_ntohs(ports[0]), d = bpf_ntohs(ports[1]);

			/* DHCP (RFC 2131) and DHCPv6 (RFC 8415) ports. */
			if ((s == 68 && d == 67) || (s == 67 && d == 68) ||
			    (s == 546 && d == 547) || (s == 547 && d == 546))
				p->kind = PAL_PKT_DHCP;
		}
		return 0;
	}
	/* ICMP only in IPv4 and ICMPv6 only in IPv6 have meaning; the other
	 * combination is judged like any protocol without ports. */
	if ((proto == IPPROTO_ICMP && !v6) || (proto == IPPROTO_ICMPV6 && v6)) {
		__u8 hdr[8];
		__u8 type;

		if (bpf_skb_load_bytes(skb, l4off, hdr, sizeof(hdr)) < 0)
			return PAL_DROP_MALFORMED;
		type = hdr[0];
		p->icmp_type = type;
		if (!v6 && (type == 8 || type == 0)) {
			pal_echo_ports(&p->t, type == 8, *(__be16 *)&hdr[4]);
			return 0;
		}
		if (v6 && (type == 128 || type == 129)) {
			pal_echo_ports(&p->t, type == 128, *(__be16 *)&hdr[4]);
			return 0;
		}
		if (v6 && pal_icmp6_is_infra(type)) {
			p->kind = PAL_PKT_ND;
			return 0;
		}
		if ((!v6 && pal_icmp4_is_error(type)) ||
		    (v6 && pal_icmp6_is_error(type))) {
			p->kind = PAL_PKT_ICMP_ERROR;
			p->inner_valid = pal_parse_inner(skb, l4off + 8, v6,
							 &p->inner) == 0;
			return 0;
		}
		/* Other ICMP messages: no ports; policy decides. */
		return 0;
	}
	/* Other protocols have no ports; policy rules without ports apply. */
	return 0;
}

/*
 * Parse an IPv4 or IPv6 packet. Returns 0 on success, 1 for a frame that
 * is not IP but must pass (ARP), or a negative PAL_DROP_* reason.
 */
static __always_inline int pal_parse(struct __sk_buff *skb, struct pal_pkt *p)
{
	__u16 eth_proto = bpf_ntohs(skb->protocol);
	__u32 off = ETH_HLEN;

	if (eth_proto == ETH_P_ARP || eth_proto == ETH_P_RARP)
		return 1;

	if (eth_proto == ETH_P_IP) {
		struct iphdr ip;
		__u16 frag;

		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
			return PAL_DROP_MALFORMED;
		if (ip.version != 4 || ip.ihl < 5)
			return PAL_DROP_MALFORMED;
		pal_v4_mapped(p->t.saddr, ip.saddr);
		pal_v4_mapped(p->t.daddr, ip.daddr);
		p->t.protocol = ip.protocol;
		p->hop_limit = ip.ttl;
		frag = bpf_ntohs(ip.frag_off);
		p->frag_id = bpf_ntohs(ip.id);
		if (frag & 0x1fff) {
			/* Later fragments carry no layer 4 header (RFC 791). */
			p->kind = PAL_PKT_FRAG_LATER;
			return 0;
		}
		if (frag & 0x2000)
			p->first_frag = 1;
		return pal_parse_l4(skb, off + ip.ihl * 4, 0, p);
	}

	if (eth_proto == ETH_P_IPV6) {
		struct ipv6hdr ip6;
		__u8 nexthdr;
		int i;

		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return PAL_DROP_MALFORMED;
		if (ip6.version != 6)
			return PAL_DROP_MALFORMED;
		__builtin_memcpy(p->t.saddr, &ip6.saddr, 16);
		__builtin_memcpy(p->t.daddr, &ip6.daddr, 16);
		p->hop_limit = ip6.hop_limit;
		p->v6 = 1;
		nexthdr = ip6.nexthdr;
		off += sizeof(ip6);

		/* Walk extension headers (RFC 8200 section 4). A bounded
		 * loop the verifier can unroll; a chain longer than this is
		 * not something a container legitimately sends. */
#pragma unroll
		for (i = 0; i < PAL_MAX_IPV6_EXT; i++) {
			__u8 hdr[8];

			if (nexthdr != PAL_NEXTHDR_HOP &&
			    nexthdr != PAL_NEXTHDR_ROUTING &&
			    nexthdr != PAL_NEXTHDR_FRAGMENT &&
			    nexthdr != PAL_NEXTHDR_AUTH &&
			    nexthdr != PAL_NEXTHDR_DEST)
				break;
			if (bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)) < 0)
				return PAL_DROP_MALFORMED;
			if (nexthdr == PAL_NEXTHDR_FRAGMENT) {
				__u16 fo = bpf_ntohs(*(__be16 *)&hdr[2]);

				p->frag_id = bpf_ntohl(*(__be32 *)&hdr[4]);
				nexthdr = hdr[0];
				off += 8;
				if (fo & 0xfff8) {
					p->t.protocol = nexthdr;
					p->kind = PAL_PKT_FRAG_LATER;
					return 0;
				}
				if (fo & 1)
					p->first_frag = 1;
				continue;
			}
			if (nexthdr == PAL_NEXTHDR_AUTH)
				off += (hdr[1] + 2) * 4;
			else
				off += (hdr[1] + 1) * 8;
			nexthdr = hdr[0];
		}
		if (nexthdr == PAL_NEXTHDR_HOP ||
		    nexthdr == PAL_NEXTHDR_ROUTING ||
		    nexthdr == PAL_NEXTHDR_FRAGMENT ||
		    nexthdr == PAL_NEXTHDR_AUTH || nexthdr == PAL_NEXTHDR_DEST)
			return PAL_DROP_UNSUPPORTED_L3;
		p->t.protocol = nexthdr;
		return pal_parse_l4(skb, off, 1, p);
	}

	/* Anything else (VLAN-tagged frames, unknown ethertypes) could carry
	 * traffic past policy: fail closed. */
	return PAL_DROP_UNSUPPORTED_L3;
}

#endif /* PALISADE_PARSE_H */
