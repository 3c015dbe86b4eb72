#!/usr/bin/env bash
# Per-request cost of Proxy-Wasm plugins, against baselines measured in the same run.
#
# One wasmgate worker (so the worker's core is the bottleneck and 1/throughput is its time per
# request), an nginx upstream answering `return 200`, wrk on loopback. Measures: nginx
# proxy_pass (1 worker, upstream keepalive) as the baseline, wasmgate without plugin, with one
# plugin (example_headers), with three. Prints requests/s, latency, and the time each plugin
# adds per request. Needs: wrk, nginx (Debian: wrk, nginx-light), target/release/wasmgate.
#
# usage: scripts/bench/plugin-cost.sh [seconds=10] [connections=32]
set -euo pipefail
secs=${1:-10}
conns=${2:-32}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release/wasmgate"
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v wrk >/dev/null && command -v nginx >/dev/null || { echo "needs wrk and nginx" >&2; exit 1; }
work=$(mktemp -d)
trap 'nginx -p "$work/nginx" -c nginx.conf -s stop 2>/dev/null || true; "$bin" stop -p "$work/gw" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

up=18980; base=18981; gwport=18982; admin=18983; key=bench-key-0123456789
mkdir -p "$work/nginx/logs" "$work/gw/conf" "$work/gw/plugins"
cat > "$work/nginx/nginx.conf" <<NGX
worker_processes 1;
error_log logs/error.log;
pid logs/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  upstream backend { server 127.0.0.1:$up; keepalive 64; }
  server { listen 127.0.0.1:$up; location / { return 200 "ok\n"; } }
  server { listen 127.0.0.1:$base;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
NGX
nginx -p "$work/nginx" -c nginx.conf
cp "$root/plugins/example_headers.wasm" "$work/gw/plugins/"
cat > "$work/gw/conf/config.yaml" <<YAML
apisix:
  node_listen: [{ip: 127.0.0.1, port: $gwport}]
deployment:
  admin:
    admin_key: [{name: admin, key: $key}]
    admin_listen: {ip: 127.0.0.1, port: $admin}
nginx_config:
  worker_processes: 1
  http: {access_log: "off"}
plugin_attr:
  prometheus: {enable_export_server: false}
wasm:
  plugins:
    - {name: p1, priority: 3, file: plugins/example_headers.wasm}
    - {name: p2, priority: 2, file: plugins/example_headers.wasm}
    - {name: p3, priority: 1, file: plugins/example_headers.wasm}
YAML
"$bin" start -p "$work/gw"
put() { curl -sf -o /dev/null "http://127.0.0.1:$admin/apisix/admin/routes/$1" -H "X-API-KEY: $key" -X PUT -d "$2"; }
node="\"upstream\": {\"nodes\": {\"127.0.0.1:$up\": 1}}"
conf='{"conf": {"set": {"x-a": "1"}, "response_set": {"x-b": "2"}}}'
put 0 "{\"uri\": \"/none\", $node}"
put 1 "{\"uri\": \"/one\", \"plugins\": {\"p1\": $conf}, $node}"
put 3 "{\"uri\": \"/three\", \"plugins\": {\"p1\": $conf, \"p2\": $conf, \"p3\": $conf}, $node}"
sleep 0.5

# CPU time (user + system, in clock ticks) of the process serving $1's port: the wasmgate
# worker or the nginx worker. Per request it is a steadier measure than 1/throughput on a
# shared machine, since it does not count time spent waiting for a core.
server_pid() {
  case "$1" in
    nginx*) pgrep -f "nginx: worker process" | head -1 ;;
    *) pgrep -f "wasmgate: worker process" | head -1 ;;
  esac
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

run() { # name url -> "rps p50 p99 cpu_us_per_request"
  wrk -t1 -c"$conns" -d2s "$2" >/dev/null   # warm-up
  local pid c0 out c1
  pid=$(server_pid "$1"); c0=$(cpu_ticks "$pid")
  out=$(wrk -t1 -c"$conns" -d"${secs}s" --latency "$2")
  c1=$(cpu_ticks "$pid")
  echo "$out" | awk -v n="$1" -v ticks=$((c1 - c0)) -v hz="$hz" '
    /requests in/ {reqs=$1} /Requests\/sec/ {rps=$2} / 50%/ {p50=$2} / 99%/ {p99=$2}
    END {printf "%s %s %s %s %.2f\n", n, rps, p50, p99, ticks * 1e6 / hz / reqs}'
}
results=$( {
  run nginx-proxy_pass "http://127.0.0.1:$base/none"
  run wasmgate-no-plugin "http://127.0.0.1:$gwport/none"
  run wasmgate-1-plugin "http://127.0.0.1:$gwport/one"
  run wasmgate-3-plugins "http://127.0.0.1:$gwport/three"
} )
echo "machine: $(nproc) cores; 1 worker each; wrk -t1 -c$conns -d${secs}s"
echo "$results" | awk '
  NR==1 {base=$2}
  {rps[NR]=$2; cpu[NR]=$5; printf "%-20s %10.0f req/s  %5.2fx nginx  p50 %-8s p99 %-8s server CPU %6.2f us/req\n", $1, $2, $2/base, $3, $4, $5}
  END {
    none=1e6/rps[2]
    printf "added per request vs no plugin (1/throughput): 1 plugin %.2f us, 3 plugins %.2f us (%.2f us per plugin)\n",
      1e6/rps[3]-none, 1e6/rps[4]-none, (1e6/rps[4]-none)/3
    printf "added per request vs no plugin (worker CPU):   1 plugin %.2f us, 3 plugins %.2f us (%.2f us per plugin)\n",
      cpu[3]-cpu[2], cpu[4]-cpu[2], (cpu[4]-cpu[2])/3 }'
