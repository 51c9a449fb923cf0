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

/* lo has this index in every network namespace. */
#define PAL_LOOPBACK_IFINDEX 1

/* The parsed packet and conntrack key live in a per-CPU scratch area, not
 * on the stack: everything inlined into one program must fit the
 * verifier's 512-byte stack. A tc program runs to completion on its CPU
 * with bottom halves disabled, so one area per CPU is never shared. */
struct pal_scratch {
	struct pal_pkt p;
	struct pal_ct_key ck;
	struct pal_tuple orig;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pal_scratch);
} pal_scratch SEC(".maps");

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

/* The endpoint's fragment table for direction dir (0: none). */
static __always_inline void *pal_frag_table(__u32 ep_id, __u8 dir)
{
	__u32 k = PAL_CT_TABLE(ep_id, dir);

	return bpf_map_lookup_elem(&pal_frag_tables, &k);
}

static __always_inline int
pal_drop_by(struct __sk_buff *skb, const struct pal_config *cfg,
	    const struct pal_endpoint *ep, __u8 dir, const struct pal_tuple *t,
	    __s8 reason, __u32 peer_id, __u32 policy_id, __u64 now)
{
	pal_count(ep ? ep->ep_id : 0, dir, PAL_VERDICT_DENY, reason, skb->len);
	pal_emit(skb->ifindex, skb->len, cfg, ep, dir, t, PAL_EVENT_DROP,
		 PAL_VERDICT_DENY, reason, peer_id, policy_id, now);
	return PAL_DROP;
}

/* A drop no policy decided (policy_id 0). */
static __always_inline int pal_drop(struct __sk_buff *skb,
				    const struct pal_config *cfg,
				    const struct pal_endpoint *ep, __u8 dir,
				    const struct pal_tuple *t, __s8 reason,
				    __u32 peer_id, __u64 now)
{
	return pal_drop_by(skb, cfg, ep, dir, t, reason, peer_id, 0, now);
}

/* Whether a new flow goes to a Service frontend of this node. */
static __always_inline int pal_svc_frontend(const struct pal_tuple *t)
{
	struct pal_svc_key k = {};

	if (!pal_is_l4_ports(t->protocol))
		return 0;
	__builtin_memcpy(k.addr, t->daddr, 16);
	k.port = t->dport;
	k.protocol = t->protocol;
	return bpf_map_lookup_elem(&pal_svc, &k) != 0;
}

/* Tell pal_service which endpoint opened this flow to a frontend. */
static __always_inline void pal_svc_defer(const struct pal_endpoint *ep,
					  __u32 ifindex,
					  const struct pal_tuple *t)
{
	struct pal_svc_flow_key k = {};
	struct pal_svc_flow_value v = {.ifindex = ifindex, .ep_id = ep->ep_id};

	__builtin_memcpy(k.saddr, t->saddr, 16);
	__builtin_memcpy(k.daddr, t->daddr, 16);
	k.sport = t->sport;
	k.dport = t->dport;
	k.protocol = t->protocol;
	bpf_map_update_elem(&pal_svc_flows, &k, &v, BPF_ANY);
}

static __always_inline int pal_addr_eq(const __u8 *a, const __u8 *b)
{
	__u64 x[2], y[2];

	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1];
}

/* The tuple of the packet that opened ck's flow, in t (returned). */
static __always_inline struct pal_tuple *
pal_ct_tuple(const struct pal_ct_key *ck, struct pal_tuple *t)
{
	__builtin_memset(t, 0, sizeof(*t));
	__builtin_memcpy(t->saddr, ck->saddr, 16);
	__builtin_memcpy(t->daddr, ck->daddr, 16);
	t->sport = ck->sport;
	t->dport = ck->dport;
	t->protocol = ck->protocol;
	return t;
}

/*
 * A flow to a Service (t: as the client sent it, to the frontend), decided
 * on the backend pal_service allowed it to: whether policy denies it now
 * (d says why; t is left holding the flow to the backend). A flow
 * pal_service has not allowed has no backend: not denied here, pal_service
 * judges it when the node's conntrack sees it open.
 */
static __always_inline int pal_svc_denied_now(const struct pal_endpoint *ep,
					      struct pal_tuple *t,
					      const struct pal_config *cfg,
					      struct pal_decision *d,
					      int proxied)
{
	struct pal_svc_flow_key k = {};
	struct pal_svc_backend *b;

	__builtin_memcpy(k.saddr, t->saddr, 16);
	__builtin_memcpy(k.daddr, t->daddr, 16);
	k.sport = t->sport;
	k.dport = t->dport;
	k.protocol = t->protocol;
	b = bpf_map_lookup_elem(&pal_svc_backends, &k);
	if (!b)
		return 0;
	__builtin_memcpy(t->daddr, b->addr, 16);
	t->dport = b->port;
	pal_decide_svc_backend(ep, t, cfg, d, proxied);
	return d->verdict == PAL_VERDICT_DENY;
}

/*
 * Who may report an error about a flow to a container: its peer, or a
 * router on the way (the node, the world: anything that is not a pod). A
 * third pod that quotes the container's flow is forging the error: it is
 * not related, and policy judges it as the plain ICMP it is.
 */
static __always_inline int pal_icmp_error_sender_ok(__u8 dir,
						    const struct pal_pkt *p)
{
	__u32 id;

	if (dir != PAL_DIR_INGRESS || pal_addr_eq(p->t.saddr, p->inner.daddr))
		return 1;
	id = pal_identity_of(p->t.saddr);
	return id < PAL_ID_LOCAL_MIN || id >= PAL_ID_CIDR_MIN;
}

static __always_inline int pal_addr_unspecified(const __u8 *a)
{
	__u32 w[4];

	__builtin_memcpy(w, a, 16);
	/* :: or the IPv4-mapped 0.0.0.0 */
	return w[0] == 0 && w[1] == 0 &&
	       (w[2] == 0 || w[2] == bpf_htonl(0x0000ffff)) && w[3] == 0;
}

static __always_inline int pal_addr_v6_link_local(const __u8 *a)
{
	return a[0] == 0xfe && (a[1] & 0xc0) == 0x80;
}

static __always_inline int pal_addr_v6_multicast(const __u8 *a)
{
	return a[0] == 0xff;
}

static __always_inline int pal_addr_v4_broadcast(const __u8 *a)
{
	return a[12] == 0xff && a[13] == 0xff && a[14] == 0xff && a[15] == 0xff;
}

/* ff02::1:2, All_DHCP_Relay_Agents_and_Servers (RFC 8415 section 7.1). */
static __always_inline int pal_addr_dhcp6_servers(const __u8 *a)
{
	__u32 w[4];

	__builtin_memcpy(w, a, 16);
	return w[0] == bpf_htonl(0xff020000) && w[1] == 0 && w[2] == 0 &&
	       w[3] == bpf_htonl(0x00010002);
}

/* An address on this node: the node itself or one of its endpoints. */
static __always_inline int pal_addr_local(const __u8 *a)
{
	__u32 id = pal_identity_of(a);

	return id == PAL_ID_HOST ||
	       (id >= PAL_ID_LOCAL_MIN && id < PAL_ID_CIDR_MIN);
}

/* Whether the endpoint owns this source address (anti-spoofing). */
static __always_inline int pal_owns(const struct pal_endpoint *ep,
				    const __u8 *addr)
{
	struct pal_srcguard_key k = {.ep_id = ep->ep_id};

	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(&pal_srcguard, &k) != 0;
}

/*
 * Neighbour discovery, MLD and DHCP are exempt from policy, but only in
 * their own scope, so they cannot carry traffic past it:
 * - ND (RFC 4861 section 7.1) must arrive with hop limit 255 (never
 *   routed) and talk to a multicast, link-local or on-node address; a
 *   container never sends router advertisements or redirects;
 * - MLD (RFC 2710, RFC 3810) has hop limit 1 and a link-local source;
 * - DHCPv4 clients broadcast and get broadcast replies; DHCPv6 clients
 *   send to ff02::1:2 and get replies on their link-local address.
 */
static __always_inline int pal_infra_ok(const struct pal_pkt *p, __u8 dir)
{
	if (p->kind == PAL_PKT_ND) {
		__u8 t = p->icmp_type;
		const __u8 *peer =
			dir == PAL_DIR_EGRESS ? p->t.daddr : p->t.saddr;

		if (t >= 133 && t <= 137) {
			if (dir == PAL_DIR_EGRESS && (t == 134 || t == 137))
				return 0;
			if (p->hop_limit != 255)
				return 0;
			return pal_addr_v6_multicast(peer) ||
			       pal_addr_v6_link_local(peer) ||
			       pal_addr_unspecified(peer) ||
			       pal_addr_local(peer);
		}
		return p->hop_limit == 1 &&
		       (pal_addr_v6_link_local(p->t.saddr) ||
			pal_addr_unspecified(p->t.saddr));
	}
	if (p->kind == PAL_PKT_DHCP) {
		__u16 s = bpf_ntohs(p->t.sport), d = bpf_ntohs(p->t.dport);

		if (!p->v6) {
			if (dir == PAL_DIR_EGRESS)
				return s == 68 && d == 67 &&
				       pal_addr_v4_broadcast(p->t.daddr);
			return s == 67 && d == 68 &&
			       pal_addr_v4_broadcast(p->t.daddr);
		}
		if (dir == PAL_DIR_EGRESS)
			return s == 546 && d == 547 &&
			       pal_addr_dhcp6_servers(p->t.daddr);
		return s == 547 && d == 546 &&
		       pal_addr_v6_link_local(p->t.daddr);
	}
	return 0;
}

/* An ARP packet from the container must announce one of its addresses
 * (or 0.0.0.0, an address probe, RFC 5227). */
/*
 * The Ethernet addresses of a frame at a container's veth: leaving it, the
 * source is the container's own MAC; entering it, a unicast destination is
 * (multicast and broadcast pass). Returns 0 when they are not.
 */
static __always_inline int pal_mac_ok(struct __sk_buff *skb, __u32 ifindex,
				      __u8 dir)
{
	struct pal_mac *own = bpf_map_lookup_elem(&pal_ep_mac, &ifindex);
	__u8 eth[12];
	const __u8 *mac;

	if (!own)
		return 1;
	if (bpf_skb_load_bytes(skb, 0, eth, sizeof(eth)) < 0)
		return 0;
	mac = dir == PAL_DIR_EGRESS ? &eth[6] : &eth[0];
	if (dir == PAL_DIR_INGRESS && (mac[0] & 1))
		return 1;
	return mac[0] == own->addr[0] && mac[1] == own->addr[1] &&
	       mac[2] == own->addr[2] && mac[3] == own->addr[3] &&
	       mac[4] == own->addr[4] && mac[5] == own->addr[5];
}

static __always_inline int pal_arp_ok(struct __sk_buff *skb,
				      const struct pal_endpoint *ep)
{
	__u8 hdr[18];
	__u8 addr[16];
	__be32 spa;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, hdr, sizeof(hdr)) < 0)
		return 0;
	/* htype Ethernet, ptype IPv4, hlen 6, plen 4 */
	if (hdr[0] != 0 || hdr[1] != 1 || hdr[2] != 0x08 || hdr[3] != 0 ||
	    hdr[4] != 6 || hdr[5] != 4)
		return 0;
	__builtin_memcpy(&spa, &hdr[14], 4);
	if (spa == 0)
		return 1;
	pal_v4_mapped(addr, spa);
	return pal_owns(ep, addr);
}

/* A neighbour advertisement a container sends speaks for one of its own
 * addresses (the target), as an ARP reply must (pal_arp_ok). Link-local
 * targets pass: palisade does not record them, and pod traffic is never
 * addressed to them. */
static __always_inline int pal_na_ok(struct __sk_buff *skb,
				     const struct pal_endpoint *ep,
				     const struct pal_pkt *p)
{
	__u8 target[16];

	if (bpf_skb_load_bytes(skb, p->l4_off + 8, target, sizeof(target)) < 0)
		return 0;
	return pal_addr_v6_link_local(target) || pal_owns(ep, target);
}

/* Whether an allowed packet leaving the container goes to the node's DNS
 * proxy instead of the server it names. */
static __always_inline int pal_is_dns_redirect(const struct pal_endpoint *ep,
					       __u8 dir,
					       const struct pal_pkt *p)
{
	return dir == PAL_DIR_EGRESS && (ep->flags & PAL_EP_DNS_PROXY) &&
	       (p->t.protocol == IPPROTO_UDP || p->t.protocol == IPPROTO_TCP) &&
	       p->t.dport == bpf_htons(53) && p->kind != PAL_PKT_FRAG_LATER;
}

/* Rewrite a layer 4 port (offset 0: source, 2: destination) and fix the
 * checksum. A UDP datagram over IPv4 without a checksum keeps none. */
static __always_inline int pal_set_port(struct __sk_buff *skb,
					const struct pal_pkt *p, __u32 which,
					__be16 from, __be16 to)
{
	__u32 csum_off = p->l4_off + (p->t.protocol == IPPROTO_TCP ? 16 : 6);
	__u64 flags = sizeof(to);

	if (p->t.protocol == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, csum_off, from, to, flags) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, p->l4_off + which, &to, sizeof(to), 0);
}

/*
 * Hand the packet to the DNS proxy: mark it, so that the node routes it to
 * itself (a policy rule sends marked packets to a table with `local
 * 0.0.0.0/0` and `local ::/0`), and move it to the proxy's port. Its
 * addresses stay: the proxy, listening on every address of that port,
 * reads the server's address as the packet's destination. 0, or -1 when no
 * proxy is set up.
 */
static __always_inline int pal_to_dns_proxy(struct __sk_buff *skb,
					    const struct pal_pkt *p)
{
	struct pal_proxy_config *pc;
	__u32 zero = 0;

	pc = bpf_map_lookup_elem(&pal_proxy, &zero);
	if (!pc || !pc->dns_port || !pc->mark)
		return -1;
	skb->mark |= pc->mark;
	return pal_set_port(skb, p, 2, p->t.dport, bpf_htons(pc->dns_port));
}

/*
 * The proxy's answers leave the node from its port: give them back port 53
 * before anything looks at them, so that they match the pod's flow. Only
 * packets the node itself sends (they carry their socket) are touched.
 */
static __always_inline void pal_from_dns_proxy(struct __sk_buff *skb,
					       const struct pal_endpoint *ep,
					       struct pal_pkt *p)
{
	struct pal_proxy_config *pc;
	__u32 zero = 0;

	if (!(ep->flags & PAL_EP_DNS_PROXY) || !skb->sk ||
	    (p->t.protocol != IPPROTO_UDP && p->t.protocol != IPPROTO_TCP) ||
	    p->kind == PAL_PKT_FRAG_LATER)
		return;
	pc = bpf_map_lookup_elem(&pal_proxy, &zero);
	if (!pc || !pc->dns_port || p->t.sport != bpf_htons(pc->dns_port))
		return;
	if (pal_set_port(skb, p, 0, p->t.sport, bpf_htons(53)) == 0)
		p->t.sport = bpf_htons(53);
}

/*
 * Hand a packet of an L7 flow to the node's L7 proxy: mark it (the mark
 * routes it to the node's local table) and move it to the ingress of lo,
 * where pal_l7_steer gives it to the proxy's socket. Its addresses and
 * ports stay, so the proxy reads the connection's real destination, and
 * its answers carry the server's address. -1 when no proxy is set up.
 */
static __always_inline int pal_to_l7_proxy(struct __sk_buff *skb)
{
	struct pal_proxy_config *pc;
	__u32 zero = 0;

	pc = bpf_map_lookup_elem(&pal_proxy, &zero);
	if (!pc || !pc->http_port || !pc->mark)
		return -1;
	skb->mark |= pc->mark;
	return bpf_redirect(PAL_LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

#define PAL_AF_INET  2
#define PAL_AF_INET6 10

/* Sent to the container by the node itself: the packet carries the node's
 * socket that sent it (forwarded packets carry none; a kernel's test run
 * gives every packet a socket without a port). */
static __always_inline int pal_sent_by_node(const struct __sk_buff *skb,
					    const struct pal_pkt *p)
{
	struct bpf_sock *sk = skb->sk;

	return sk &&
	       (sk->family == PAL_AF_INET || sk->family == PAL_AF_INET6) &&
	       sk->src_port == bpf_ntohs(p->t.sport);
}

/*
 * A packet to a container that answers a connection the node's L7 proxy
 * opened from the container's address (to a server on another node or
 * outside, for the container's egress HTTP rules): the node holds an
 * established socket for it. Looked up only for TCP packets that open no
 * connection and that the container's table does not know.
 */
static __always_inline int pal_to_proxy_upstream(struct __sk_buff *skb,
						 const struct pal_pkt *p)
{
	struct bpf_sock_tuple st = {};
	struct bpf_sock *sk;
	__u32 len;
	int found;

	if (p->v6) {
		__builtin_memcpy(st.ipv6.saddr, p->t.saddr, 16);
		__builtin_memcpy(st.ipv6.daddr, p->t.daddr, 16);
		st.ipv6.sport = p->t.sport;
		st.ipv6.dport = p->t.dport;
		len = sizeof(st.ipv6);
	} else {
		__builtin_memcpy(&st.ipv4.saddr, &p->t.saddr[12], 4);
		__builtin_memcpy(&st.ipv4.daddr, &p->t.daddr[12], 4);
		st.ipv4.sport = p->t.sport;
		st.ipv4.dport = p->t.dport;
		len = sizeof(st.ipv4);
	}
	sk = bpf_skc_lookup_tcp(skb, &st, len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	found = sk->state != BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return found;
}

/* Whether a packet of an L7 flow goes to the proxy: everything a container
 * sends (it may still carry the container's socket here), and what is sent
 * to it unless the node sent it (the proxy's own packets). */
static __always_inline int pal_l7_steered(const struct __sk_buff *skb,
					  const struct pal_pkt *p, __u8 dir)
{
	return dir == PAL_DIR_EGRESS || !pal_sent_by_node(skb, p);
}

/*
 * A build tag: two builds of the same sources can differ in their code
 * (the live-upgrade test swaps one for the other under traffic). It costs
 * one register move.
 */
#ifndef PALISADE_BUILD_TAG
#define PALISADE_BUILD_TAG 0
#endif

static __always_inline void pal_build_tag(void)
{
	__u32 tag = PALISADE_BUILD_TAG;

	asm volatile("" : "+r"(tag));
}

static __always_inline int pal_handle(struct __sk_buff *skb, __u8 dir)
{
	__u32 ifindex = skb->ifindex, zero = 0;
	struct pal_decision d = {};
	struct pal_endpoint *ep;
	struct pal_config *cfg;
	struct pal_ct_value *ct;
	void *ct_fwd;
	struct pal_scratch *sc;
	struct pal_ct_key *ck;
	struct pal_pkt *p;
	__u16 ct_flags = 0;
	__u64 now;
	int rc, res;

	pal_build_tag();
	cfg = bpf_map_lookup_elem(&pal_config, &zero);
	sc = bpf_map_lookup_elem(&pal_scratch, &zero);
	if (!cfg || !sc)
		return PAL_DROP; /* an array always has element 0 */
	p = &sc->p;
	ck = &sc->ck;
	__builtin_memset(p, 0, sizeof(*p));
	now = bpf_ktime_get_ns();

	ep = bpf_map_lookup_elem(&pal_endpoints, &ifindex);
	if (!ep)
		/* Attached but not (or no longer) registered: fail closed. */
		return pal_drop(skb, cfg, 0, dir, &p->t,
				PAL_DROP_UNKNOWN_ENDPOINT, 0, now);

	if (!pal_mac_ok(skb, ifindex, dir))
		return pal_drop(skb, cfg, ep, dir, &p->t,
				dir == PAL_DIR_EGRESS ? PAL_DROP_SPOOFED
						      : PAL_DROP_MISADDRESSED,
				0, now);

	rc = pal_parse(skb, p);
	if (rc == 1) {
		if (dir == PAL_DIR_EGRESS && !pal_arp_ok(skb, ep))
			return pal_drop(skb, cfg, ep, dir, &p->t,
					PAL_DROP_SPOOFED, 0, now);
		pal_count(ep->ep_id, dir, PAL_VERDICT_ALLOW, PAL_REASON_INFRA,
			  skb->len);
		return PAL_PASS;
	}
	if (rc < 0)
		return pal_drop(skb, cfg, ep, dir, &p->t, rc, 0, now);

	/* A container sends only from its own addresses; the unspecified
	 * and link-local ones only for ND, MLD and DHCP in their scope. */
	if (dir == PAL_DIR_EGRESS && !pal_owns(ep, p->t.saddr) &&
	    !((pal_addr_unspecified(p->t.saddr) ||
	       pal_addr_v6_link_local(p->t.saddr)) &&
	      pal_infra_ok(p, dir)))
		return pal_drop(skb, cfg, ep, dir, &p->t, PAL_DROP_SPOOFED, 0,
				now);

	if (dir == PAL_DIR_EGRESS && p->kind == PAL_PKT_ND &&
	    p->icmp_type == 136 && !pal_na_ok(skb, ep, p))
		return pal_drop(skb, cfg, ep, dir, &p->t, PAL_DROP_SPOOFED, 0,
				now);

	if ((p->kind == PAL_PKT_ND || p->kind == PAL_PKT_DHCP) &&
	    pal_infra_ok(p, dir)) {
		pal_count(ep->ep_id, dir, PAL_VERDICT_ALLOW, PAL_REASON_INFRA,
			  skb->len);
		return PAL_PASS;
	}

	if (dir == PAL_DIR_INGRESS)
		pal_from_dns_proxy(skb, ep, p);

	if (p->kind == PAL_PKT_FRAG_LATER) {
		void *frags = pal_frag_table(ep->ep_id, dir);
		struct pal_frag_value *fv;
		struct pal_frag_key fk;

		pal_frag_key_make(&fk, ep->ep_id, dir, p);
		fv = frags ? bpf_map_lookup_elem(frags, &fk) : 0;
		if (!fv)
			return pal_drop(skb, cfg, ep, dir, &p->t,
					PAL_DROP_FRAG_NO_HEAD, 0, now);
		p->t.sport = fv->sport;
		p->t.dport = fv->dport;
	} else if (p->first_frag) {
		void *frags = pal_frag_table(ep->ep_id, dir);
		struct pal_frag_value fv = {
			.sport = p->t.sport,
			.dport = p->t.dport,
		};
		struct pal_frag_key fk;

		pal_frag_key_make(&fk, ep->ep_id, dir, p);
		if (frags)
			bpf_map_update_elem(frags, &fk, &fv, BPF_ANY);
	}

	if (p->kind == PAL_PKT_ICMP_ERROR) {
		/* The quoted packet went the other way: the error is related
		 * if it goes back to the quoted packet's sender and quotes a
		 * flow of this endpoint that current policy has confirmed. */
		struct pal_ct_value *rel = 0;

		if (p->inner_valid && pal_addr_eq(p->t.daddr, p->inner.saddr) &&
		    pal_icmp_error_sender_ok(dir, p))
			rel = pal_ct_lookup(pal_ct_table(ep->ep_id, dir ^ 1),
					    ep->ep_id, dir ^ 1, &p->inner, 0,
					    now, ck, &res);
		if (rel && (rel->epoch == cfg->epoch ||
			    (rel->flags & PAL_CT_SERVICE))) {
			pal_count(ep->ep_id, dir, PAL_VERDICT_ALLOW,
				  PAL_REASON_RELATED, skb->len);
			return PAL_PASS;
		}
		/* Unsolicited: plain ICMP, judged by policy, never tracked. */
		pal_decide(ep, dir, &p->t, cfg, &d);
		if (d.verdict == PAL_VERDICT_DENY)
			return pal_drop_by(skb, cfg, ep, dir, &p->t, d.reason,
					   d.peer_id, d.policy_id, now);
		pal_count(ep->ep_id, dir, d.verdict, d.reason, skb->len);
		return PAL_PASS;
	}

	/* The endpoint's table of flows opened in this packet's direction:
	 * where it is found, or tracked if it is new. */
	ct_fwd = pal_ct_table(ep->ep_id, dir);
	ct = pal_ct_lookup(ct_fwd, ep->ep_id, dir, &p->t, p->tcp_flags, now, ck,
			   &res);
	/* A bare SYN opens a connection: it is never a reply (that would let
	 * a reversed tuple ride on someone else's flow), and on a closed flow
	 * it starts a new one. Either way it is decided afresh. */
	if (ct && p->t.protocol == IPPROTO_TCP &&
	    (p->tcp_flags & (PAL_TCP_SYN | PAL_TCP_ACK)) == PAL_TCP_SYN &&
	    (res == PAL_CT_REPLY || PAL_CT_TCP_CLOSED(ct->flags)))
		ct = 0;
	if (ct) {
		if (ct->flags & PAL_CT_SERVICE) {
			/* Decided on its backend by pal_service; until the
			 * first reply, each packet of the opening (a SYN
			 * retransmitted, UDP) may be balanced anew, so the
			 * deferral is renewed for it. */
			if (res == PAL_CT_ESTABLISHED &&
			    !(ct->flags & PAL_CT_SEEN_REPLY))
				pal_svc_defer(ep, ifindex, &p->t);
			/* Policy changed since: decided again on the backend
			 * pal_service allowed it to (none yet: pal_service
			 * judges its next packet). */
			if (ct->epoch != cfg->epoch &&
			    pal_svc_denied_now(ep, pal_ct_tuple(ck, &sc->orig),
					       cfg, &d,
					       ct->flags & PAL_CT_L7)) {
				pal_ct_delete(ck);
				return pal_drop_by(skb, cfg, ep, dir, &p->t,
						   PAL_DROP_REVOKED, d.peer_id,
						   d.policy_id, now);
			}
			ct->epoch = cfg->epoch;
		} else if (ct->epoch != cfg->epoch &&
			   (ct->flags & PAL_CT_L7_UPSTREAM)) {
			/* The proxy's own connection: nothing to decide here.
			 */
			ct->epoch = cfg->epoch;
		} else if (ct->epoch != cfg->epoch) {
			/* Policy or identities changed since this flow was
			 * decided: decide it again as it was opened. */
			pal_decide(ep, ck->direction,
				   pal_ct_tuple(ck, &sc->orig), cfg, &d);
			if (d.verdict == PAL_VERDICT_DENY) {
				pal_ct_delete(ck);
				return pal_drop_by(skb, cfg, ep, dir, &p->t,
						   PAL_DROP_REVOKED, d.peer_id,
						   d.policy_id, now);
			}
			/* Now allowed through the L7 proxy only: a connection
			 * cannot move there while open, so it is cut (the
			 * client's next one goes through the proxy). */
			if (d.l7 && !(ct->flags & PAL_CT_L7)) {
				pal_ct_delete(ck);
				return pal_drop_by(skb, cfg, ep, dir, &p->t,
						   PAL_DROP_REVOKED, d.peer_id,
						   d.policy_id, now);
			}
			ct->epoch = cfg->epoch;
			ct->verdict = d.verdict;
			ct->policy_id = d.policy_id;
			ct->peer_id = d.peer_id;
		}
		pal_ct_touch(ct, res, p->tcp_flags, skb->len, now);
		/* Packets the node sends to the container (the proxy's own)
		 * go on; the others of an L7 flow, both ways, go to the
		 * proxy. A Service flow's answers can only come from the
		 * proxy, which took the connection at its first packet (with
		 * the frontend's address and port, which its socket lacks). */
		if ((ct->flags & PAL_CT_L7) &&
		    !(dir == PAL_DIR_INGRESS && (ct->flags & PAL_CT_SERVICE)) &&
		    pal_l7_steered(skb, p, dir)) {
			rc = pal_to_l7_proxy(skb);
			if (rc < 0)
				return pal_drop_by(skb, cfg, ep, dir, &p->t,
						   PAL_DROP_NO_PROXY,
						   ct->peer_id, ct->policy_id,
						   now);
			pal_count(ep->ep_id, dir, ct->verdict,
				  PAL_REASON_ESTABLISHED, skb->len);
			return rc;
		}
		if (pal_is_dns_redirect(ep, dir, p) &&
		    pal_to_dns_proxy(skb, p) < 0)
			return pal_drop_by(skb, cfg, ep, dir, &p->t,
					   PAL_DROP_NO_PROXY, ct->peer_id,
					   ct->policy_id, now);
		pal_count(ep->ep_id, dir, ct->verdict, PAL_REASON_ESTABLISHED,
			  skb->len);
		return PAL_PASS;
	}

	if (dir == PAL_DIR_EGRESS && pal_svc_frontend(&p->t)) {
		/* To a Service: the backend is chosen by the node's DNAT after
		 * this hook, so pal_service judges the flow there. A packet
		 * that does not open a connection may belong to one the
		 * node's conntrack holds (one this table forgot or revoked),
		 * which pal_service does not see again: it is decided on the
		 * backend pal_service allowed it to, if any. */
		if (!(p->t.protocol == IPPROTO_TCP &&
		      (p->tcp_flags & (PAL_TCP_SYN | PAL_TCP_ACK)) ==
			      PAL_TCP_SYN)) {
			__builtin_memcpy(&sc->orig, &p->t, sizeof(sc->orig));
			if (pal_svc_denied_now(ep, &sc->orig, cfg, &d, 0))
				return pal_drop_by(skb, cfg, ep, dir, &p->t,
						   PAL_DROP_REVOKED, d.peer_id,
						   d.policy_id, now);
		}
		pal_svc_defer(ep, ifindex, &p->t);
		d.verdict = PAL_VERDICT_ALLOW;
		d.reason = PAL_REASON_SERVICE;
		d.peer_id = pal_identity_of(p->t.daddr);
		ct_flags = PAL_CT_SERVICE;
		/* The endpoint's egress HTTP rules may govern the backend the
		 * DNAT picks: the connection goes to the L7 proxy, where the
		 * node's DNAT happens (on lo) and pal_service judges it on
		 * that backend (at LOCAL_IN). */
		if ((ep->flags & PAL_EP_L7_EGRESS) &&
		    p->t.protocol == IPPROTO_TCP)
			ct_flags |= PAL_CT_L7;
	} else if (dir == PAL_DIR_INGRESS && p->t.protocol == IPPROTO_TCP &&
		   (p->tcp_flags & (PAL_TCP_SYN | PAL_TCP_ACK)) !=
			   PAL_TCP_SYN &&
		   !pal_sent_by_node(skb, p) && pal_to_proxy_upstream(skb, p)) {
		/* The server's answer to the L7 proxy, which judged the
		 * connection: tracked, and steered to the proxy below. */
		d.verdict = PAL_VERDICT_ALLOW;
		d.reason = PAL_REASON_ESTABLISHED;
		d.peer_id = pal_identity_of(p->t.saddr);
		ct_flags = PAL_CT_L7 | PAL_CT_L7_UPSTREAM;
	} else {
		pal_decide(ep, dir, &p->t, cfg, &d);
		if (d.verdict == PAL_VERDICT_DENY)
			return pal_drop_by(skb, cfg, ep, dir, &p->t, d.reason,
					   d.peer_id, d.policy_id, now);
	}
	if (pal_is_dns_redirect(ep, dir, p) && pal_to_dns_proxy(skb, p) < 0)
		return pal_drop_by(skb, cfg, ep, dir, &p->t, PAL_DROP_NO_PROXY,
				   d.peer_id, d.policy_id, now);
	/* An L7 flow; or one the L7 proxy opens to this endpoint from the
	 * address of the client it speaks for (the node sends it, from an
	 * address that is not the node's): its answers go to the proxy. */
	if (p->t.protocol == IPPROTO_TCP &&
	    (d.l7 || (dir == PAL_DIR_INGRESS && pal_sent_by_node(skb, p) &&
		      d.peer_id != PAL_ID_HOST)))
		ct_flags |= PAL_CT_L7;
	if ((ct_flags & PAL_CT_L7) && pal_l7_steered(skb, p, dir)) {
		rc = pal_to_l7_proxy(skb);
		if (rc < 0)
			return pal_drop_by(skb, cfg, ep, dir, &p->t,
					   PAL_DROP_NO_PROXY, d.peer_id,
					   d.policy_id, now);
	} else {
		rc = PAL_PASS;
	}
	if (pal_ct_create(ct_fwd, ep->ep_id, dir, &p->t, d.verdict, d.policy_id,
			  d.peer_id, cfg->epoch, skb->len, p->tcp_flags,
			  ct_flags, now) < 0)
		return pal_drop_by(skb, cfg, ep, dir, &p->t, PAL_DROP_BUDGET,
				   d.peer_id, d.policy_id, now);
	pal_count(ep->ep_id, dir, d.verdict, d.reason, skb->len);
	pal_emit(skb->ifindex, skb->len, cfg, ep, dir, &p->t, PAL_EVENT_FLOW,
		 d.verdict, d.reason, d.peer_id, d.policy_id, now);
	return rc;
}

#endif /* PALISADE_DATAPATH_H */
