/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Where the node's proxies listen and the mark that routes packets to them:
 * shared by the container programs and the L7 steering program on lo.
 */
#ifndef PALISADE_PROXY_MAP_H
#define PALISADE_PROXY_MAP_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "palisade_abi.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pal_proxy_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_proxy SEC(".maps");

/*
 * pal_svc_frontends: LRU_HASH, sized by the setting serviceFlows. For each
 * TCP connection the node's DNAT sent to a Service backend (written by
 * pal_service), keyed by the connection as it reaches the backend, the
 * connection as its client sent it (to the frontend, before any SNAT).
 * When such a connection goes to the L7 proxy, pal_l7_steer gives its
 * packets their original addresses back before the node's conntrack sees
 * them again: conntrack then finds the connection's own entry and applies
 * its NAT again, where it would otherwise track a second entry for the
 * translated addresses, which clashes with the first and is dropped.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PAL_SIZE_SVC_FLOWS);
	__type(key, struct pal_svc_flow_key);
	__type(value, struct pal_svc_flow_key);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_svc_frontends SEC(".maps");

/*
 * pal_svc_backends: LRU_HASH, sized by the setting serviceFlows. For each
 * flow to a Service that pal_service allowed, keyed by the flow as its
 * client sent it, the backend the node's DNAT chose: the veth program
 * decides the flow on it again when policy changes, and pal_l7_steer finds
 * with it the proxy's socket of a connection the client's veth steered to
 * the L7 proxy (that socket has the backend's address and port).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PAL_SIZE_SVC_FLOWS);
	__type(key, struct pal_svc_flow_key);
	__type(value, struct pal_svc_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_svc_backends SEC(".maps");

#endif /* PALISADE_PROXY_MAP_H */
