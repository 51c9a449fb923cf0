#!/bin/bash
# kube-proxy (iptables mode) style DNAT for the fake ClusterIPs, in nfb-node.
# `iptables` here is iptables-nft 1.8.9 (Debian 12 default); iptables-legacy works the same way.
set -e
IPT=${IPT:-iptables}; IP6T=${IP6T:-ip6tables}
X="ip netns exec nfb-node"
rules() { # $1=cmd $2=clusterip $3=be1 $4=be2
  local T="$X $1 -t nat"
  $T -N KUBE-SERVICES; $T -N KUBE-SVC-DEMO; $T -N KUBE-SEP-B1; $T -N KUBE-SEP-B2
  $T -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
  $T -A KUBE-SERVICES -d $2 -p tcp --dport 80 -j KUBE-SVC-DEMO
  $T -A KUBE-SERVICES -d $2 -p udp --dport 80 -j KUBE-SVC-DEMO
  $T -A KUBE-SVC-DEMO -m statistic --mode random --probability 0.5 -j KUBE-SEP-B1
  $T -A KUBE-SVC-DEMO -j KUBE-SEP-B2
  $T -A KUBE-SEP-B1 -p tcp -j DNAT --to-destination $3
  $T -A KUBE-SEP-B1 -p udp -j DNAT --to-destination $3
  $T -A KUBE-SEP-B2 -p tcp -j DNAT --to-destination $4
  $T -A KUBE-SEP-B2 -p udp -j DNAT --to-destination $4
}
case "$1" in
  up)
    rules $IPT  10.96.0.10/32  10.200.2.2:8080      10.200.3.2:8080
    rules $IP6T fd00:96::10/128 [fd00:200:2::2]:8080 [fd00:200:3::2]:8080 ;;
  down)
    for t in $IPT $IP6T; do $X $t -t nat -F; $X $t -t nat -X; done
    # iptables-nft leaves the (now empty) tables behind
    $X nft delete table ip nat 2>/dev/null || true; $X nft delete table ip6 nat 2>/dev/null || true ;;
  show) $X $IPT-save -t nat; $X $IP6T-save -t nat ;;
esac
