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

#endif /* PALISADE_PROXY_MAP_H */
