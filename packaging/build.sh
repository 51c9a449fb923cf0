#!/usr/bin/env bash
# Builds palisade's DEB and RPM packages into target/packages/:
#
#   packaging/build.sh           from a release build
#   packaging/build.sh --debug   from debug binaries (quicker; what the tests use)
#
# Installs what it needs: cargo-deb and cargo-generate-rpm (crates.io), and
# the Debian packages of scripts/lib.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
as_root "$0" "$@"
install_deps

profile=release
if [ "${1:-}" = --debug ]; then
	profile=debug
fi

for tool in cargo-deb@3.8.0 cargo-generate-rpm@0.21.1; do
	name=${tool%@*}
	if ! command -v "$name" >/dev/null; then
		step "installing $tool"
		cargo install --locked "$tool"
	fi
done

step "build ($profile)"
if [ "$profile" = release ]; then
	# The shipped crates alone: the test crate turns on the fault points
	# (palisade::fault) for the crash tests, which a release never carries.
	cargo build --release -p palisadectl -p palisade-cni -p palisade-oci --bins
	cargo_profile=release
else
	cargo build --workspace --bins
	cargo_profile=dev
fi
target="${CARGO_TARGET_DIR:-target}"
bin="$target/$profile"

step "man pages and shell completions (from palisadectl's CLI definition)"
assets="$target/assets"
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$bin/palisadectl" manpages "$assets/man"
gzip -9n "$assets/man"/*.8
"$bin/palisadectl" completions bash > "$assets/completions/palisadectl.bash"
"$bin/palisadectl" completions zsh > "$assets/completions/_palisadectl"
"$bin/palisadectl" completions fish > "$assets/completions/palisadectl.fish"
# Where Debian's runtimes look for CNI plugins, pointing at /opt/cni/bin.
ln -s /opt/cni/bin/palisade "$assets/palisade-cni-link"

step "packages"
out="$target/packages"
rm -rf "$out"
mkdir -p "$out"
cargo deb -p palisadectl --no-build --profile "$cargo_profile" --output "$out/"
# Debug binaries are large and zstd (the default) slow on them: gzip.
rpm_compress=zstd
if [ "$profile" = debug ]; then
	rpm_compress=gzip
fi
cargo generate-rpm -p palisadectl --profile "$cargo_profile" --payload-compress "$rpm_compress" --output "$out/"
ls -l "$out"
