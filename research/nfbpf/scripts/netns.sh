#!/bin/bash
# Topology (all in namespaces created here; nothing touches real interfaces):
#
#   nfb-client (10.200.1.2, fd00:200:1::2)
#        | veth
#   nfb-node   (router: ip_forward=1; 10.200.1.1 / .2.1 / .3.1; kube-proxy-like DNAT)
#      |                      |
#   nfb-b1 (10.200.2.2,        nfb-b2 (10.200.3.2,
#           fd00:200:2::2)             fd00:200:3::2)
#
# Fake ClusterIP: 10.96.0.10:80 and [fd00:96::10]:80 -> backends :8080
set -e
NS="nfb-node nfb-client nfb-b1 nfb-b2"

up() {
  for n in $NS; do
    ip netns add $n; ip -n $n link set lo up
    # no DAD on link-local addresses either: otherwise IPv6 ND is stalled for
    # ~1-2s after link-up and the first connections time out
    ip netns exec $n sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0
  done
  ip netns exec nfb-node sysctl -qw net.ipv4.ip_forward=1
  ip netns exec nfb-node sysctl -qw net.ipv6.conf.all.forwarding=1
  local i=1
  for peer in client b1 b2; do
    ip link add nfb-h$i netns nfb-node type veth peer name eth0 netns nfb-$peer
    ip -n nfb-node addr add 10.200.$i.1/24 dev nfb-h$i
    ip -n nfb-node addr add fd00:200:$i::1/64 dev nfb-h$i nodad
    ip -n nfb-node link set nfb-h$i up
    ip -n nfb-$peer addr add 10.200.$i.2/24 dev eth0
    ip -n nfb-$peer addr add fd00:200:$i::2/64 dev eth0 nodad
    ip -n nfb-$peer link set eth0 up
    ip -n nfb-$peer route add default via 10.200.$i.1
    ip -n nfb-$peer -6 route add default via fd00:200:$i::1
    i=$((i+1))
  done
}

down() {
  for n in $NS; do
    ip netns pids $n 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del $n 2>/dev/null || true
  done
}

case "$1" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down"; exit 2 ;;
esac
