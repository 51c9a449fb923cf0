// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Attached to tc ingress of a container's host-side veth: everything the
 * container sends passes here, so this enforces the container's egress
 * policy (and lets replies to its allowed ingress flows out).
 */
#include "lib/datapath.h"

SEC("classifier")
int pal_from_container(struct __sk_buff *skb)
{
	return pal_handle(skb, PAL_DIR_EGRESS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
