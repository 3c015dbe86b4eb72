#!/usr/bin/env bash
# Instructions one request costs in the Proxy-Wasm host and the plugin, counted by callgrind:
# the `one_request` path of wasm/benches/host.rs (request head lent, HttpContext, request and
# response headers, a one-chunk response body, log, done) with the example_headers plugin, then
# with wasm/benches/noop.wat, whose callbacks do nothing: the second figure is the host's share
# (context bookkeeping, the calls into the VM and back), the difference the plugin's own code
# and the host functions it calls.
#
# Unlike timings, the count does not move with the machine's load, so two commits can be
# compared on a shared machine: run this on each and compare the figures.
#
# usage: scripts/bench/instructions.sh [requests]   (default 2000; needs valgrind)
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-2000}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo bench -p wasmgate-wasm --bench host --no-run >/dev/null 2>&1
bin=$(ls -t target/release/deps/host-* | grep -v '\.d$' | head -1)
out=$(mktemp)
trap 'rm -f "$out"' EXIT

# Instructions per request of `one_request` with the plugin in $1 (empty: the default one).
# Counted only inside one_request (plugin start-up and module loading are left out); JIT code
# is followed with --smc-check.
count() {
    (cd wasm && WASMGATE_BENCH_PLUGIN=$1 WASMGATE_BENCH_REQUESTS=$n valgrind --tool=callgrind \
        --smc-check=all-non-file --collect-atstart=no '--toggle-collect=*one_request*' \
        --callgrind-out-file="$out" "../$bin" --bench >/dev/null 2>&1)
    echo $(($(grep -m1 '^summary:\|^totals:' "$out" | awk '{print $2}') / n))
}
full=$(count "$PWD/plugins/example_headers.wasm")
host=$(count "$PWD/wasm/benches/noop.wat")
echo "one request through one plugin (example_headers): $full instructions ($n requests, callgrind)"
echo "  the host's share (the same request through a plugin that does nothing): $host"
echo "  the plugin's code and the host functions it calls: $((full - host))"
