/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map of the datapath. All are pinned by name, so both programs (and
 * every later load of them) share one instance per pin directory, and the
 * maps outlive the processes that created them. Sizes here are the
 * defaults (PAL_SIZE_*); user space may set others when it creates them.
 */
#ifndef PALISADE_MAPS_H
#define PALISADE_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "palisade_abi.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_SIZE_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct pal_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_SIZE_SRCGUARD);
	__type(key, struct pal_srcguard_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_srcguard SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, PAL_SIZE_IPCACHE);
	__type(key, struct pal_ipcache_key);
	__type(value, struct pal_ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_SIZE_IPCACHE_HOST);
	__type(key, struct pal_ipcache_host_key);
	__type(value, struct pal_ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory follows the entries */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_ipcache_host SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_SIZE_POLICY);
	__type(key, struct pal_policy_key);
	__type(value, struct pal_policy_value);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory follows the entries */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_policy SEC(".maps");

/* The template of every endpoint's conntrack table (user space creates one
 * per endpoint and direction with the endpoint's budget as max_entries). */
struct pal_ct_table {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_SIZE_CT);
	/* Sizes, not types: the types would reach BTF only as forward
	 * declarations here, which aya's loader cannot size. */
	__uint(key_size, sizeof(struct pal_ct_key));
	__uint(value_size, sizeof(struct pal_ct_value));
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory follows the flows */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 2 * PAL_SIZE_ENDPOINTS); /* two per endpoint */
	__type(key, __u32); /* PAL_CT_TABLE(ep_id, direction) */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct pal_ct_table);
} pal_ct_tables SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_SIZE_ENDPOINTS);
	__type(key, __u32); /* host veth ifindex */
	__type(value, struct pal_mac);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_ep_mac SEC(".maps");

/* Per endpoint and direction: when its table was last swept of expired
 * flows, and how many new flows its budget refused. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * PAL_SIZE_ENDPOINTS);
	__type(key, __u32); /* PAL_CT_TABLE(ep_id, direction) */
	__type(value, struct pal_budget);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_budget SEC(".maps");

/* The template of every endpoint's fragment table: an LRU of its own, so a
 * fragment flood pushes out only the flooding endpoint's entries. */
struct pal_frag_table {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PAL_SIZE_FRAG);
	__uint(key_size, sizeof(struct pal_frag_key));
	__uint(value_size, sizeof(struct pal_frag_value));
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 2 * PAL_SIZE_ENDPOINTS); /* two per endpoint */
	__type(key, __u32); /* PAL_CT_TABLE(ep_id, direction) */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct pal_frag_table);
} pal_frag_tables SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pal_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, PAL_SIZE_COUNTERS);
	__type(key, struct pal_counter_key);
	__type(value, struct pal_counter_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, PAL_SIZE_EVENTS); /* bytes */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PAL_EVSTAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_evstats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, PAL_SIZE_ENDPOINTS);
	__type(key, __u32); /* ep_id (0: no endpoint) */
	__type(value, struct pal_ratelimit);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_ratelimit_ep SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_SIZE_SVC);
	__type(key, struct pal_svc_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory follows the entries */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PAL_SIZE_SVC_FLOWS);
	__type(key, struct pal_svc_flow_key);
	__type(value, struct pal_svc_flow_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_svc_flows SEC(".maps");

#include "proxy_map.h"

#endif /* PALISADE_MAPS_H */
