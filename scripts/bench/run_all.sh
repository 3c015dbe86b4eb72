#!/usr/bin/env bash
# Every benchmark in docs/BENCHMARKS.md, in one run, on this machine:
#
#   1. throughput.py  — nginx proxy_pass vs wasmgate (no plugin, 1, 3, a body plugin): req/s,
#                       p50/p99/p99.9, server CPU per request, ratios; a plot (SVG)
#   2. throughput.py  — the same with 1…N workers (N = cores), unpinned: the scaling run
#      bodies.py      — 64 KiB and 1 MiB answers streamed through, against nginx
#      handshakes.py  — new TLS connections, full and resumed, over 2 workers, against nginx
#                       with APISIX's session cache
#   3. footprint.py   — 1 / 100 / 10,000 routes with a plugin: RSS per worker, worker start,
#                       PluginContext creation
#   4. propagation.py — Admin API PUT → every worker serving it, p50/p99 over 1,000 edits,
#                       alone and among 10,000 other routes
#   5. criterion      — host round trip, header maps, plugin setup, snapshot path, router
#   6. instructions.sh — instructions per request through one plugin (callgrind; steady on a
#                       busy machine, for comparing commits)
#   7. worker_instructions.py — instructions per request in a whole worker under callgrind
#                       (no plugin, 1, 3), likewise steady
#   8. cpu_split.py   — a worker's CPU per request by component (kernel, hyper, tokio, the
#                       gateway, plugin code…) against nginx's, from perf samples
#
# usage: scripts/bench/run_all.sh [out-dir]   (default: bench-results/<date>)
# Needs: wrk, nginx (Debian: wrk nginx-light). Takes about 15 minutes on 2 cores; nothing else
# should run meanwhile (the figures are ratios measured in the same run, but a busy machine
# still widens them).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$root/bench-results/$(date +%Y%m%d-%H%M)}
mkdir -p "$out"
cd "$root"
cargo build --release -q
echo "== results in $out"
{
  echo "# $(date -u) — $(nproc) cores, $(uname -r)"
  echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
} >"$out/machine.txt"

echo "== throughput (1 worker, pinned)"
python3 scripts/bench/throughput.py --workers 1 --rounds 3 --duration 10 \
  --json "$out/throughput-1.json" --svg "$out/throughput-1.svg" | tee "$out/throughput-1.md"

echo "== scaling (1..$(nproc) workers, unpinned)"
for w in $(seq 1 "$(nproc)"); do
  python3 scripts/bench/throughput.py --workers "$w" --no-pin --rounds 1 --duration 8 \
    --connections $((32 * w)) --threads "$w" --json "$out/scaling-$w.json" |
    tee "$out/scaling-$w.md"
done

echo "== large bodies"
python3 scripts/bench/bodies.py --sizes 64k,1m --rounds 3 | tee "$out/bodies.md"

echo "== TLS handshakes"
python3 scripts/bench/handshakes.py --connections 3000 --rounds 2 | tee "$out/handshakes.md"
python3 scripts/bench/handshakes.py --connections 3000 --rounds 2 --rsa --tls12 |
  tee -a "$out/handshakes.md"

echo "== footprint"
python3 scripts/bench/footprint.py --routes 1,100,10000 --json "$out/footprint.json" |
  tee "$out/footprint.md"

echo "== propagation"
python3 scripts/bench/propagation.py --edits 1000 --reloads 20 | tee "$out/propagation.txt"
python3 scripts/bench/propagation.py --edits 1000 --reloads 5 --routes 10000 |
  tee -a "$out/propagation.txt"

echo "== criterion"
for b in "wasmgate-wasm host" "wasmgate-shared snapshot" "wasmgate-worker router"; do
  set -- $b
  cargo bench -q -p "$1" --bench "$2" -- --warm-up-time 1 --measurement-time 3 2>&1 |
    grep -E '^[a-zA-Z].*|time:' | tee -a "$out/criterion.txt"
done
if command -v valgrind >/dev/null; then
  echo "== instructions (callgrind)"
  scripts/bench/instructions.sh 2000 | tee "$out/instructions.txt"
  python3 scripts/bench/worker_instructions.py --requests 2000 | tee -a "$out/instructions.txt"
fi
if command -v perf >/dev/null; then
  echo "== CPU per request by component (perf)"
  python3 scripts/bench/cpu_split.py | tee "$out/cpu_split.md"
fi
echo "== done: $out"
