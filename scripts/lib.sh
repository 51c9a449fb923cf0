# Shared by scripts/demo.sh and scripts/test.sh. Source it; do not run it.

# Debian packages palisade builds and tests with.
PALISADE_PACKAGES=(
	clang llvm libbpf-dev clang-format    # compiling and checking the eBPF C
	libclang-dev                          # bindgen reads the datapath ABI header (build.rs)
	libelf-dev zlib1g-dev pkg-config make # libbpf (built from the libbpf-sys crate) for the netfilter program
	containernetworking-plugins           # the reference bridge/host-local plugins
	iproute2                              # ip, tc
	runc podman containerd docker.io      # the runtimes the OCI hook is tested with
	netavark aardvark-dns iptables        # Podman's netavark backend; kube-proxy-style DNAT in tests
	nftables                              # kube-proxy's nftables mode in tests (nft)
	busybox-static                        # container root filesystems (no registry images)
	graphviz                              # palisadectl graph (layout and rendering)
	chromium chromium-driver              # the web console's browser tests (headless, WebDriver)
	iperf3 ipset                          # benchmarks (bench/run)
	rpm man-db                            # package tests (rpm -qpl, man -w)
	bpftool                               # a foreign pinned map in cni_contract
	unbound                               # the DNS server the DNS proxy tests ask
	protobuf-compiler libprotobuf-dev     # protoc and its well-known types (descriptor.proto): the etcd client's gRPC code (etcd-client's build.rs)
	etcd-server etcd-client openssl       # the etcd datastore tests (a real etcd cluster, TLS certificates)
)

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# Re-run this script as root (network namespaces, bpffs and eBPF need it),
# keeping the invoking user's Rust toolchain on PATH.
as_root() {
	if [ "$(id -u)" -eq 0 ]; then
		return
	fi
	if ! command -v sudo >/dev/null; then
		echo "error: run this as root (it creates network namespaces and loads eBPF programs)" >&2
		exit 1
	fi
	exec sudo env PATH="$PATH" \
		CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}" \
		RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" \
		CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-}" \
		"$@"
}

# Install whichever of PALISADE_PACKAGES is missing.
install_deps() {
	local missing=()
	for p in "${PALISADE_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	if [ "${#missing[@]}" -gt 0 ]; then
		step "installing ${missing[*]}"
		export DEBIAN_FRONTEND=noninteractive
		# Installing the runtimes must not start their system daemons:
		# the tests run private ones.
		local made_policy=""
		if [ ! -e /usr/sbin/policy-rc.d ]; then
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
			chmod +x /usr/sbin/policy-rc.d
			made_policy=1
		fi
		apt-get update -q
		apt-get install -y -q --no-install-recommends "${missing[@]}"
		if [ -n "$made_policy" ]; then
			rm -f /usr/sbin/policy-rc.d
		fi
	fi
	if ! command -v cargo >/dev/null; then
		echo "error: cargo not found; install Rust (https://rustup.rs) and run this again" >&2
		exit 1
	fi
	if [ -z "${CARGO_TARGET_DIR:-}" ]; then
		unset CARGO_TARGET_DIR
	fi
}
