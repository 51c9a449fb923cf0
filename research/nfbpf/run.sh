#!/bin/bash
# Prototype driver: netfilter-BPF egress verdict after kube-proxy DNAT.
#
#   ./run.sh build     clang the BPF object, cargo build the loader
#   ./run.sh demo      namespaces + iptables DNAT demo + nft DNAT demo + LPM + established-flow check
#   ./run.sh bench     per-packet cost (bpf_stats) for nf_accept_all / nf_egress_{dynptr,fast,core}
#   ./run.sh cleanup   detach/unpin everything, stop servers, delete namespaces
#   ./run.sh all       build demo bench cleanup
#
# Everything runs in namespaces nfb-{node,client,b1,b2}; nothing uses real interfaces.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
BIN=$ROOT/loader/target/release
OBJ=$ROOT/bpf/nf_egress.bpf.o
MAPS=/sys/fs/bpf/palisade   # "owned by palisade/aya" (simulated by palisade-sim)
PIN=/sys/fs/bpf/nfbpf       # our link + stats pins
SIM="$BIN/palisade-sim $MAPS"
NFBPF=$BIN/nfbpf
S=$ROOT/scripts
CLIENT="ip netns exec nfb-client /usr/bin/python3"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

build() {
  say build
  cd "$ROOT/bpf"
  [ -s vmlinux.h ] || bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux.h
  clang -O2 -g -Wall -target bpf -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu -I. \
    -c nf_egress.bpf.c -o nf_egress.bpf.o
  cd "$ROOT/loader" && cargo build --release 2>&1 | tail -1
}

setup() {
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
  "$S/netns.sh" up
  for b in b1 b2; do
    ip netns exec nfb-$b /usr/bin/python3 "$S/server.py" $b >/dev/null 2>&1 &
    echo $! > /tmp/nfb-srv-$b.pid
  done
  sleep 0.5
  $SIM create
}

attach() { # prog [priority] [pin-dir]
  $NFBPF attach --obj "$OBJ" --prog "$1" --maps-dir $MAPS --pin-dir "${3:-$PIN}" \
    --netns /var/run/netns/nfb-node --priority "${2:--99}"
}

conns() { for h in 10.96.0.10 fd00:96::10; do $CLIENT "$S/client.py" conn $h ${1:-20}; done; }
conns4() { $CLIENT "$S/client.py" conn 10.96.0.10 ${1:-20}; }

established_check() {
  say "established flow is not re-judged (ctinfo != NEW)"
  $SIM deny-del 10.200.2.2 2>/dev/null || true; $SIM deny-del 10.200.3.2 2>/dev/null || true
  local out=/tmp/nfb-hold.out
  $CLIENT -u "$S/client.py" hold 10.96.0.10 4 > $out 2>&1 &
  local hp=$!
  for i in $(seq 50); do grep -q connected $out && break; sleep 0.1; done
  local be; be=$(sed -n 's/hold: connected to //p' $out)
  local ip=10.200.2.2; [ "$be" = b2 ] && ip=10.200.3.2
  sleep 1
  $SIM deny-add $ip
  echo "t=1s: long-lived connection is on $be; added $be ($ip) to deny_addr"
  conns4 10
  wait $hp; cat $out
  $SIM deny-del $ip
}

demo() {
  setup
  say "attach nf_egress_dynptr at FORWARD prio -99 (v4+v6), reusing aya-pinned maps; loader exits"
  attach nf_egress_dynptr -99
  $NFBPF info --pin-dir $PIN
  bpftool link show | grep -A0 "type 10" || true

  say "iptables (nft backend) kube-proxy-style DNAT; no deny entries"
  "$S/dnat-iptables.sh" up
  conns 20
  say "deny backend b1 (10.200.2.2, fd00:200:2::2) via the aya side"
  $SIM deny-add 10.200.2.2; $SIM deny-add fd00:200:2::2; $SIM list
  conns 20
  $NFBPF stats --pin-dir $PIN --last-drop 1
  $SIM deny-del 10.200.2.2; $SIM deny-del fd00:200:2::2
  say "LPM: deny 10.200.3.0/24 + fd00:200:3::/64 (backend b2)"
  $SIM cidr-add 10.200.3.0/24; $SIM cidr-add fd00:200:3::/64
  conns 20
  $SIM cidr-del 10.200.3.0/24; $SIM cidr-del fd00:200:3::/64
  established_check
  $NFBPF stats --pin-dir $PIN
  say "pitfall: a dropped SYN is retransmitted -> fresh conntrack entry -> load-balanced again"
  $SIM deny-add 10.200.2.2
  $CLIENT "$S/syn_retry.py" 10.96.0.10 12
  $SIM deny-del 10.200.2.2
  "$S/dnat-iptables.sh" down

  say "nftables DNAT (numgen random mod 2 map), deny b1"
  ip netns exec nfb-node nft -f "$S/dnat-nft.nft"
  ip netns exec nfb-node nft list table inet kube-demo | grep dnat
  $SIM deny-add 10.200.2.2; $SIM deny-add fd00:200:2::2
  conns 20
  $NFBPF stats --pin-dir $PIN --last-drop 1
  $SIM deny-del 10.200.2.2; $SIM deny-del fd00:200:2::2
  established_check
  ip netns exec nfb-node nft delete table inet kube-demo

  say "bpf_link_update on a netfilter link"
  $NFBPF update --obj "$OBJ" --prog nf_egress_core --maps-dir $MAPS --pin-dir $PIN 2>&1 | grep link_update
  say "second link at the same priority"
  attach nf_egress_core -99 /sys/fs/bpf/nfbpf-b 2>&1 | grep -E "Error|File exists" || true
  say "detach (BPF_LINK_DETACH via pinned link) -> no more drops"
  $NFBPF detach --pin-dir $PIN
  "$S/dnat-iptables.sh" up
  $SIM deny-add 10.200.2.2
  conns4 10
  $SIM deny-del 10.200.2.2

  say "aya + libbpf-rs in ONE process: aya-created (unpinned) maps adopted by fd; link pinned"
  $BIN/palisade-sim /sys/fs/bpf/nfbpf-inproc inproc-attach "$OBJ" nf_egress_fast /var/run/netns/nfb-node 10.200.2.2
  conns4 20
  $NFBPF detach --pin-dir /sys/fs/bpf/nfbpf-inproc
  "$S/dnat-iptables.sh" down

  say "verifier stats per program"
  for p in nf_accept_all nf_egress_dynptr nf_egress_fast nf_egress_core; do
    attach $p -99 >/dev/null 2>&1
    echo "$p: $($NFBPF info --pin-dir $PIN | sed -n 1p)"
    $NFBPF detach --pin-dir $PIN >/dev/null
  done
}

prog_stats() { # prog_id -> "run_time_ns run_cnt"
  bpftool prog show id "$1" -j | python3 -c \
    'import json,sys; d=json.load(sys.stdin); print(d.get("run_time_ns",0), d.get("run_cnt",0))'
}

measure() { # label prog_id cmd...
  local label=$1 id=$2; shift 2
  read -r t0 c0 < <(prog_stats "$id")
  "$@" >/dev/null
  read -r t1 c1 < <(prog_stats "$id")
  local dt=$((t1 - t0)) dc=$((c1 - c0))
  printf '  %-34s runs=%-8d total=%-10d ns  => %6.1f ns/run\n' "$label" $dc $dt \
    "$(python3 -c "print($dt/max($dc,1))")"
}

bench() {
  [ -e /var/run/netns/nfb-node ] || setup
  local old; old=$(sysctl -n kernel.bpf_stats_enabled)
  trap "sysctl -qw kernel.bpf_stats_enabled=$old" EXIT   # restore even on failure
  sysctl -qw kernel.bpf_stats_enabled=1
  "$S/dnat-iptables.sh" up
  for prog in nf_accept_all nf_egress_dynptr nf_egress_fast nf_egress_core; do
    attach $prog -99 >/dev/null
    local id; id=$($NFBPF info --pin-dir $PIN | sed -n 's/.*link_v4: .*prog_id=\([0-9]*\).*/\1/p')
    [ -n "$id" ] || { echo "no prog id"; exit 1; }
    say "$prog (prog id $id)"
    for rep in 1 2; do
      $SIM deny-del 10.200.2.2 2>/dev/null || true; $SIM deny-del 10.200.3.2 2>/dev/null || true
      measure "tcp pingpong v4 (established)" $id $CLIENT "$S/bench.py" pingpong 10.96.0.10 20000
      measure "tcp pingpong v6 (established)" $id $CLIENT "$S/bench.py" pingpong fd00:96::10 20000
      measure "tcp 2000 short conns v4 (mix)" $id $CLIENT "$S/bench.py" conns 10.96.0.10 2000
      measure "udp v4 NEW+DNAT, allowed" $id $CLIENT "$S/bench.py" udp 10.96.0.10 50000
      measure "udp v6 NEW+DNAT, allowed" $id $CLIENT "$S/bench.py" udp fd00:96::10 50000
      $SIM deny-add 10.200.2.2; $SIM deny-add 10.200.3.2
      measure "udp v4 NEW+DNAT, denied (drop)" $id $CLIENT "$S/bench.py" udp 10.96.0.10 50000
      $SIM deny-del 10.200.2.2; $SIM deny-del 10.200.3.2
    done
    $NFBPF detach --pin-dir $PIN >/dev/null
  done
  "$S/dnat-iptables.sh" down
  sysctl -qw kernel.bpf_stats_enabled="$old"
}

cleanup() {
  say cleanup
  for d in $PIN /sys/fs/bpf/nfbpf-b /sys/fs/bpf/nfbpf-inproc; do [ -d $d ] && $NFBPF detach --pin-dir $d || true; done
  for b in b1 b2; do
    [ -f /tmp/nfb-srv-$b.pid ] && kill "$(cat /tmp/nfb-srv-$b.pid)" 2>/dev/null || true
    rm -f /tmp/nfb-srv-$b.pid
  done
  $SIM destroy 2>/dev/null || true
  "$S/netns.sh" down
  rm -f /tmp/nfb-hold.out
  ls /sys/fs/bpf; ip netns list
}

case "${1:-}" in
  build) build ;;
  demo) demo ;;
  bench) bench ;;
  cleanup) cleanup ;;
  all) build; demo; bench; cleanup ;;
  *) sed -n 2,12p "$0"; exit 2 ;;
esac
