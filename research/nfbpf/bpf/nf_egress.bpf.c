// SPDX-License-Identifier: GPL-2.0
//
// Prototype: NetFilter BPF program (BPF_PROG_TYPE_NETFILTER) attached at
// NF_INET_FORWARD. FORWARD runs after the whole PREROUTING hook (conntrack
// -200, DNAT -100), so the packet already carries the post-DNAT (backend)
// destination whatever priority is used here; the priority only orders us
// among FORWARD hooks (iptables/nft filter = 0).
//
// Verdict: drop NEW, DNATed flows whose post-DNAT destination is in the
// (externally created + pinned) deny maps; accept everything else.
//
// Four programs in one object (the loader attaches one of them):
//   nf_egress_dynptr  - packet via bpf_dynptr_from_skb/bpf_dynptr_slice kfuncs,
//                       skb->_nfct via direct (CO-RE relocated) BTF load,
//                       nf_conn->status via BPF_CORE_READ (bpf_probe_read_kernel)
//   nf_egress_core    - no kfuncs at all: skb->head + network_header via
//                       BPF_CORE_READ, headers via bpf_probe_read_kernel
//   nf_egress_fast    - like nf_egress_dynptr, but nf_conn is read through
//                       bpf_rdonly_cast(ptr, 0) + direct loads at CO-RE
//                       field offsets (no helper calls)
//   nf_accept_all     - returns NF_ACCEPT; baseline for cost measurements
//
// Build: clang -O2 -g -target bpf -D__TARGET_ARCH_x86 \
//          -I/usr/include/x86_64-linux-gnu -I. -c nf_egress.bpf.c -o nf_egress.bpf.o
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#define NF_DROP 0
#define NF_ACCEPT 1
#define NFCT_INFOMASK 7UL
#define NFCT_PTRMASK (~NFCT_INFOMASK)
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IP_MF_ 0x2000
#define IP_OFFSET_ 0x1FFF

char LICENSE[] SEC("license") = "GPL";

// kfuncs (bpftool 7.1's vmlinux.h does not emit kfunc prototypes)
extern int bpf_dynptr_from_skb(struct __sk_buff *skb, __u64 flags,
			       struct bpf_dynptr *ptr__uninit) __ksym;
extern void *bpf_dynptr_slice(const struct bpf_dynptr *ptr, __u32 offset,
			      void *buffer, __u32 buffer__szk) __ksym;
// generic kfunc: turns a scalar into a read-only PTR_TO_BTF_ID (untrusted), so
// fields can be read with plain (PROBE_MEM) loads instead of probe_read calls
extern void *bpf_rdonly_cast(const void *obj__ign, __u32 btf_id__k) __ksym;

// ---- maps -----------------------------------------------------------------
// Both deny maps are expected to be created and pinned by ANOTHER loader
// (palisade/aya); the loader calls bpf_map__reuse_fd()/reuse_pinned_map() on
// them before load, so these definitions only have to be *compatible*
// (type, key_size, value_size, max_entries, map_flags).
//
// Addresses are 16 bytes; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d).
struct addr16 {
	__u8 b[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct addr16);
	__type(value, __u32);
	__uint(max_entries, 1024);
} deny_addr SEC(".maps");

struct lpm_key {
	__u32 prefixlen; // IPv4: 96 + v4 prefix length
	struct addr16 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lpm_key);
	__type(value, __u32);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} deny_cidr SEC(".maps");

// counters (owned by this object; the loader pins it)
enum {
	ST_SEEN = 0,	  // program invocations
	ST_NOT_NEW,	  // ctinfo != IP_CT_NEW (established/related/reply) -> accept
	ST_NO_CT,	  // untracked / no conntrack entry -> accept
	ST_NEW_NO_DNAT,	  // NEW but not DNATed -> accept
	ST_NEW_DNAT_OK,	  // NEW + DNAT, backend allowed -> accept
	ST_NEW_DNAT_DROP, // NEW + DNAT, backend denied -> drop
	ST_PARSE_ERR,	  // could not parse headers -> accept (fail open)
	ST_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, ST_MAX);
} stats SEC(".maps");

// last denied flow (for the demo / debugging); a ringbuf would be used in prod
struct flow {
	struct addr16 saddr;
	struct addr16 daddr;      // post-DNAT (backend)
	struct addr16 orig_daddr; // pre-DNAT (ClusterIP), from the conntrack tuple
	__u16 sport, dport;       // host byte order
	__u16 orig_dport;
	__u8 l4proto;
	__u8 family;
	__u32 ctinfo;
	__u32 ct_status;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct flow);
	__uint(max_entries, 1);
} last_drop SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline void v4_mapped(struct addr16 *a, __u32 v4 /* network order */)
{
	__builtin_memset(a, 0, sizeof(*a));
	a->b[10] = 0xff;
	a->b[11] = 0xff;
	__builtin_memcpy(&a->b[12], &v4, 4);
}

static __always_inline int denied(struct flow *f)
{
	if (bpf_map_lookup_elem(&deny_addr, &f->daddr))
		return 1;
	struct lpm_key k = { .prefixlen = 128 };
	k.addr = f->daddr;
	if (bpf_map_lookup_elem(&deny_cidr, &k))
		return 1;
	return 0;
}

// ---- conntrack (shared by all variants) -----------------------------------
// Returns 1 if the caller must judge the packet (NEW + DNATed), 0 to accept.
static __always_inline int ct_needs_verdict(struct sk_buff *skb, struct flow *f,
					    struct nf_conn **ctp, const int fast)
{
	// Direct load through the trusted PTR_TO_BTF_ID ctx->skb; vmlinux.h's
	// preserve_access_index makes it a CO-RE relocated field access.
	unsigned long nfct = skb->_nfct;
	__u32 ctinfo = nfct & NFCT_INFOMASK;
	struct nf_conn *ct = (struct nf_conn *)(nfct & NFCT_PTRMASK);

	f->ctinfo = ctinfo;
	if (!ct) { // no conntrack, or IP_CT_UNTRACKED (ptr NULL, info 7)
		count(ST_NO_CT);
		return 0;
	}
	if (ctinfo != IP_CT_NEW) {
		count(ST_NOT_NEW);
		return 0;
	}
	unsigned long status;
	if (fast) {
		// bpf_rdonly_cast(ptr, 0) -> rdonly_untrusted_mem: plain loads at
		// CO-RE relocated offsets, no helper call. (A typed cast with
		// bpf_core_type_id_kernel(struct nf_conn) fails in libbpf with
		// "relocation decision ambiguity": vmlinux BTF also has nf_conn___init.)
		const char *m = bpf_rdonly_cast(ct, 0);
		status = *(const unsigned long *)(m + bpf_core_field_offset(struct nf_conn, status));
		ct = (struct nf_conn *)m;
	} else {
		// nfct is a scalar for the verifier -> BPF_CORE_READ (probe_read_kernel)
		status = BPF_CORE_READ(ct, status);
	}
	f->ct_status = status;
	if (!(status & IPS_DST_NAT)) {
		count(ST_NEW_NO_DNAT);
		return 0;
	}
	*ctp = ct;
	return 1;
}

static __always_inline void ct_orig_dst(struct nf_conn *ct, struct flow *f, const int fast)
{
	// original direction tuple still holds the pre-DNAT destination (ClusterIP)
	if (fast) { // ct is rdonly_untrusted_mem here (see ct_needs_verdict)
		const char *m = (const char *)ct;
		const __u32 *a = (const __u32 *)(m + bpf_core_field_offset(struct nf_conn,
				tuplehash[IP_CT_DIR_ORIGINAL].tuple.dst.u3));
		const __be16 *p = (const __be16 *)(m + bpf_core_field_offset(struct nf_conn,
				tuplehash[IP_CT_DIR_ORIGINAL].tuple.dst.u.all));
		if (f->family == NFPROTO_IPV4) {
			v4_mapped(&f->orig_daddr, a[0]);
		} else {
			__u32 *d = (__u32 *)&f->orig_daddr;
			d[0] = a[0];
			d[1] = a[1];
			d[2] = a[2];
			d[3] = a[3];
		}
		f->orig_dport = bpf_ntohs(*p);
		return;
	}
	union nf_inet_addr a = BPF_CORE_READ(ct, tuplehash[IP_CT_DIR_ORIGINAL].tuple.dst.u3);
	if (f->family == NFPROTO_IPV4)
		v4_mapped(&f->orig_daddr, a.ip);
	else
		__builtin_memcpy(&f->orig_daddr, &a, 16);
	f->orig_dport = bpf_ntohs(BPF_CORE_READ(ct, tuplehash[IP_CT_DIR_ORIGINAL].tuple.dst.u.all));
}

static __always_inline int judge(struct nf_conn *ct, struct flow *f, const int fast)
{
	if (!denied(f)) {
		count(ST_NEW_DNAT_OK);
		return NF_ACCEPT;
	}
	ct_orig_dst(ct, f, fast);
	__u32 z = 0;
	bpf_map_update_elem(&last_drop, &z, f, BPF_ANY);
	count(ST_NEW_DNAT_DROP);
	return NF_DROP;
}

// ---- variant 1: dynptr ----------------------------------------------------
static __always_inline int egress_dynptr(struct bpf_nf_ctx *ctx, const int fast)
{
	struct sk_buff *skb = ctx->skb;
	struct nf_conn *ct = NULL;
	struct flow f = {};
	struct bpf_dynptr ptr;
	__u32 l4off;

	count(ST_SEEN);
	f.family = ctx->state->pf;
	if (!ct_needs_verdict(skb, &f, &ct, fast))
		return NF_ACCEPT;

	// at netfilter hooks skb->data points at the network header
	if (bpf_dynptr_from_skb((struct __sk_buff *)skb, 0, &ptr))
		goto parse_err;

	if (f.family == NFPROTO_IPV4) {
		struct iphdr ibuf, *ip;
		ip = bpf_dynptr_slice(&ptr, 0, &ibuf, sizeof(ibuf));
		if (!ip)
			goto parse_err;
		v4_mapped(&f.saddr, ip->saddr);
		v4_mapped(&f.daddr, ip->daddr);
		f.l4proto = ip->protocol;
		l4off = ip->ihl * 4;
		if (ip->frag_off & bpf_htons(IP_OFFSET_)) // non-first fragment
			return judge(ct, &f, fast);
	} else if (f.family == NFPROTO_IPV6) {
		struct ipv6hdr i6buf, *ip6;
		ip6 = bpf_dynptr_slice(&ptr, 0, &i6buf, sizeof(i6buf));
		if (!ip6)
			goto parse_err;
		__builtin_memcpy(&f.saddr, &ip6->saddr, 16);
		__builtin_memcpy(&f.daddr, &ip6->daddr, 16);
		f.l4proto = ip6->nexthdr; // prototype: no extension-header walk
		l4off = sizeof(struct ipv6hdr);
	} else {
		return NF_ACCEPT;
	}

	if (f.l4proto == IPPROTO_TCP_ || f.l4proto == IPPROTO_UDP_) {
		__be16 pbuf[2], *p;
		p = bpf_dynptr_slice(&ptr, l4off, pbuf, sizeof(pbuf));
		if (p) {
			f.sport = bpf_ntohs(p[0]);
			f.dport = bpf_ntohs(p[1]);
		}
	}
	return judge(ct, &f, fast);

parse_err:
	count(ST_PARSE_ERR);
	return NF_ACCEPT;
}

SEC("netfilter")
int nf_egress_dynptr(struct bpf_nf_ctx *ctx)
{
	return egress_dynptr(ctx, 0);
}

SEC("netfilter")
int nf_egress_fast(struct bpf_nf_ctx *ctx)
{
	return egress_dynptr(ctx, 1);
}

// ---- variant 2: CO-RE / probe_read only -------------------------------------
SEC("netfilter")
int nf_egress_core(struct bpf_nf_ctx *ctx)
{
	struct sk_buff *skb = ctx->skb;
	struct nf_conn *ct = NULL;
	struct flow f = {};
	unsigned char *head;
	__u16 nh;
	__u32 l4off;

	count(ST_SEEN);
	f.family = BPF_CORE_READ(ctx, state, pf);
	if (!ct_needs_verdict(skb, &f, &ct, 0))
		return NF_ACCEPT;

	head = BPF_CORE_READ(skb, head);
	nh = BPF_CORE_READ(skb, network_header);
	// NB: only valid while the headers are in the linear area (skb_headlen);
	// true for normal forwarded TCP/UDP, not guaranteed in general.
	if (f.family == NFPROTO_IPV4) {
		struct iphdr ip;
		if (bpf_probe_read_kernel(&ip, sizeof(ip), head + nh))
			goto parse_err;
		v4_mapped(&f.saddr, ip.saddr);
		v4_mapped(&f.daddr, ip.daddr);
		f.l4proto = ip.protocol;
		l4off = nh + ip.ihl * 4;
		if (ip.frag_off & bpf_htons(IP_OFFSET_))
			return judge(ct, &f, 0);
	} else if (f.family == NFPROTO_IPV6) {
		struct ipv6hdr ip6;
		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh))
			goto parse_err;
		__builtin_memcpy(&f.saddr, &ip6.saddr, 16);
		__builtin_memcpy(&f.daddr, &ip6.daddr, 16);
		f.l4proto = ip6.nexthdr;
		l4off = nh + sizeof(struct ipv6hdr);
	} else {
		return NF_ACCEPT;
	}
	if (f.l4proto == IPPROTO_TCP_ || f.l4proto == IPPROTO_UDP_) {
		__be16 p[2];
		if (!bpf_probe_read_kernel(p, sizeof(p), head + l4off)) {
			f.sport = bpf_ntohs(p[0]);
			f.dport = bpf_ntohs(p[1]);
		}
	}
	return judge(ct, &f, 0);

parse_err:
	count(ST_PARSE_ERR);
	return NF_ACCEPT;
}

// ---- baseline ---------------------------------------------------------------
SEC("netfilter")
int nf_accept_all(struct bpf_nf_ctx *ctx)
{
	return NF_ACCEPT;
}
