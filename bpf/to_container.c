// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Attached to tc egress of a container's host-side veth: everything sent
 * to the container passes here, so this enforces the container's ingress
 * policy (and lets replies to its allowed egress flows in).
 */
#include "lib/datapath.h"

SEC("classifier")
int pal_to_container(struct __sk_buff *skb)
{
	return pal_handle(skb, PAL_DIR_INGRESS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
