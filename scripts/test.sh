#!/usr/bin/env bash
# palisade's whole test suite, as CI runs it: installs what the tests need,
# checks formatting and lints, then runs the unit tests, the BPF verdict
# tests (BPF_PROG_TEST_RUN), and the privileged integration tests with real
# plugins and real traffic in hermetic network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
as_root "$0" "$@"
install_deps
start=$(date +%s)

step "formatting (rustfmt, clang-format)"
cargo fmt --all -- --check
clang-format --dry-run --Werror bpf/*.c bpf/include/*.h bpf/lib/*.h

step "lints (clippy -D warnings)"
cargo clippy --workspace --all-targets -- -D warnings

step "build"
cargo build --workspace --all-targets

step "unit tests (no root needed), incremental engine == full compile (property test)"
PALISADE_PROPTEST_CASES="${PALISADE_PROPTEST_CASES:-1000}" cargo test --workspace --lib --bins

step "fuzzed parsers, short run (CNI, CNI_ARGS, OCI, policies, conflists, flow logs; the plugin and hook binaries)"
cargo test -p palisade-shared --test fuzz
cargo test -p palisade-tests --test fuzz_bins

step "BPF verdict tests, CNI contract tests, datapath tests"
cargo test -p palisade-tests --no-fail-fast --test bpf_verdicts --test cni_contract --test datapath

step "attacks from a container: another container's address, a changed own address, ARP claiming another's address"
cargo test -p palisade-tests --test attack

step "crash consistency: ADD, DEL, apply, delete, upgrade and the daemon's commit killed at every step, then recovered"
cargo test -p palisade-tests --test crash -- --test-threads 2

step "flows, audit mode, learning, traffic graph, agent"
cargo test -p palisade-tests --test observe

step "web console in a real browser (headless chromium through chromedriver): live map, explain, filters, learn -> audit -> enforce, policies; screenshots in target/console-screenshots"
cargo test -p palisade-tests --test console

step "DNS-aware egress: toFQDNs and DNS rules through the node's DNS proxy, against a real unbound"
cargo test -p palisade-tests --test dns

step "L7: HTTP/1.1, HTTP/2 and gRPC rules through the node's L7 proxy (bridge and routed, IPv4 and IPv6, proxy killed and back)"
cargo test -p palisade-tests --test l7

step "runtimes: runc, Podman (CNI, netavark), containerd, dockerd, one DNS-aware egress case each (start-time overhead printed)"
cargo test -p palisade-tests --test runtimes -- --nocapture 2>&1 | tee /tmp/palisade-runtimes.log
grep 'median container start' /tmp/palisade-runtimes.log || true

step "node daemon: socket, kill -9 and restart under traffic, daemonless writes beside it"
cargo test -p palisade-tests --test daemon

step "hosts without Kubernetes sharing a real etcd (TLS, client certificates, roles): objects, endpoints across 3 hosts, member and cluster outages, a host stopping, Docker + Podman + runc on three hosts"
cargo test -p palisade-tests --test etcd

step "NetworkPolicy conformance (Kubernetes e2e cases and recipes) and the tiers (network-policy-api conformance), without the daemon"
cargo test -p palisade-tests --test netpol -- --test-threads 4

step "NetworkPolicy conformance again, every change through the node daemon"
PALISADE_TEST_DAEMON=1 cargo test -p palisade-tests --test netpol -- --test-threads 4

step "Kubernetes cluster mode: the test API server (list/watch double), manifests, multi-node agents, API failures"
cargo test -p palisade-tests --test kubeapi
cargo test -p palisade-shared --test manifests
cargo test -p palisade-tests --test cluster -- --test-threads 2

step "Services judged on their backend: kube-proxy's iptables and nftables rules, backends on several nodes"
cargo test -p palisade-tests --test services -- --test-threads 2

step "NetworkPolicy and tier conformance on 3 nodes in cluster mode (vxlan), probing one Service per pod through kube-proxy DNAT"
PALISADE_TEST_CLUSTER=vxlan PALISADE_TEST_SERVICES=1 cargo test -p palisade-tests --test netpol -- --test-threads 4

# The tier cases (tier-*: AdminNetworkPolicy, BaselineAdminNetworkPolicy,
# ClusterNetworkPolicy) run standalone, through the daemon and on vxlan above;
# their meaning does not depend on the topology, so the other two topologies
# run the NetworkPolicy cases only, to keep CI short. Everything everywhere:
#   PALISADE_TEST_CLUSTER=host-gw cargo test -p palisade-tests --test netpol
for topology in host-gw routed; do
	step "NetworkPolicy conformance on 3 nodes in cluster mode ($topology): policies through the API only"
	PALISADE_TEST_CLUSTER=$topology cargo test -p palisade-tests --test netpol -- --test-threads 4 --skip tier-
done

step "packages (debug binaries), install-cni, dpkg -i/-r/-P, live upgrade under traffic"
packaging/build.sh --debug
cargo test -p palisade-tests --test packaging --test upgrade -- --test-threads 1

step "benchmarks, short mode (every measurement must produce a number)"
bench/run --short --debug --out /tmp/palisade-bench-short.md

step "nothing left behind"
leftover_ns=$(ip netns list | awk '$1 ~ /^pt[0-9]+x[0-9]+/ {print $1}')
leftover_dirs=$(find /tmp/palisade-tests -mindepth 1 -maxdepth 1 2>/dev/null || true)
leftover_dirs="$leftover_dirs$(find /run/containerd/runc /var/lib/cni/results -mindepth 1 -maxdepth 1 -name '*pt[0-9]*x[0-9]*' 2>/dev/null || true)"
leftover_procs=$(pgrep -f '/tmp/palisade-tests/' || true)
if [ -n "$leftover_procs" ]; then
	echo "error: test processes left running: $leftover_procs" >&2
	exit 1
fi
if [ -n "$leftover_ns$leftover_dirs" ]; then
	echo "error: tests left namespaces or directories behind:" >&2
	echo "$leftover_ns $leftover_dirs" >&2
	exit 1
fi
echo "no test namespaces, mounts or directories remain"

step "all tests passed in $(($(date +%s) - start)) s"
