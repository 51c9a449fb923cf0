#!/usr/bin/env bash
# palisade's demo on a built-in sandbox: builds, installs missing packages,
# creates a sandbox node namespace with a bridge network and three labelled
# containers, prints the connectivity matrix, applies the api-allow
# NetworkPolicy, prints the matrix again, then shows the api-http
# PalisadeNetworkPolicy's HTTP rules at work (GET allowed, DELETE denied),
# and cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
as_root "$0" "$@"
install_deps

step "building palisade"
cargo build --workspace --bins

step "running the demo"
exec cargo run --quiet -p palisade-tests --bin palisade-demo
