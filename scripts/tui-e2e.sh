#!/usr/bin/env bash
# End-to-end test of the terminal console, driven the way a person would use it.
#
# Starts a gateway (target/release/wasmgate, daemonized, in a temporary prefix with its own
# config.yaml on free ports and the example plugin), a test upstream (python3 -m http.server),
# and `wasmgate tui` in a detached tmux session of 120x40. Then, by typing keys: creates a
# route with the plugin in the route editor (n, JSON, Ctrl-S), sends requests through the
# gateway with curl, checks on the Plugins screen that the request count moved, visits the
# other screens, deletes the route (d, y), checks with the Admin API that it is gone, and quits.
#
# Usage: cargo build --release && scripts/tui-e2e.sh
# Needs tmux, curl and python3. Exits non-zero with a message (and the screen) on any failure;
# bounded to 60 s; cleans up (tmux, gateway, upstream, temporary files) however it ends.
# WASMGATE_BIN overrides the binary; KEEP=1 keeps the temporary prefix for a look afterwards.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${WASMGATE_BIN:-$ROOT/target/release/wasmgate}
PLUGIN=$ROOT/plugins/example_headers.wasm
DEADLINE=$((SECONDS + 45))  # the waits; with the cleanup, under 60 s
SOCK=wasmgate-tui-e2e-$$
SESSION=tui
TMP=""
UP_PID=""

say() { echo "tui-e2e: $*"; }

screen() { tmux -u -L "$SOCK" capture-pane -p -t "$SESSION" 2>/dev/null || true; }

fail() {
    echo "tui-e2e: FAIL: $*" >&2
    if tmux -L "$SOCK" has-session -t "$SESSION" 2>/dev/null; then
        echo "---- the console's screen ----" >&2
        screen >&2
        echo "------------------------------" >&2
    fi
    if [ -n "$TMP" ] && [ -f "$TMP/logs/error.log" ]; then
        echo "---- the end of the gateway's error log ----" >&2
        tail -n 20 "$TMP/logs/error.log" >&2
    fi
    exit 1
}

cleanup() {
    local rc=$?
    tmux -L "$SOCK" kill-server 2>/dev/null || true
    pkill -f -- "--key gone-$$" 2>/dev/null || true
    if [ -n "$TMP" ]; then
        timeout 10 "$BIN" stop -p "$TMP" >/dev/null 2>&1 || true
    fi
    if [ -n "$UP_PID" ]; then
        kill "$UP_PID" 2>/dev/null || true
        wait "$UP_PID" 2>/dev/null || true
    fi
    if [ -n "$TMP" ] && [ -z "${KEEP:-}" ]; then
        rm -rf "$TMP"
    elif [ -n "$TMP" ]; then
        echo "tui-e2e: prefix kept in $TMP" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

for tool in tmux curl python3; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (apt-get install -y tmux curl python3)"
done
[ -x "$BIN" ] || fail "$BIN does not exist: run cargo build --release first"
[ -f "$PLUGIN" ] || fail "$PLUGIN is missing"

left() { echo $((DEADLINE - SECONDS)); }

# Waits up to $2 seconds (and never past the deadline) for the command $1 to succeed.
wait_until() {
    local what=$1 limit=$2
    shift 2
    local end=$((SECONDS + limit))
    while ! "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$end" ] || [ "$SECONDS" -ge "$DEADLINE" ]; then
            fail "timed out waiting for $what"
        fi
        sleep 0.2
    done
}

on_screen() { screen | grep -qF -- "$1"; }

# Waits for text on the console's screen.
wait_screen() {
    local text=$1 what=$2
    wait_until "$what (\"$text\" on the screen)" "${3:-10}" on_screen "$text"
}

keys() { tmux -L "$SOCK" send-keys -t "$SESSION" "$@"; }
type_text() { tmux -L "$SOCK" send-keys -t "$SESSION" -l -- "$1"; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

TMP=$(mktemp -d /tmp/wasmgate-tui-e2e.XXXXXX)
PROXY=$(free_port)
ADMIN=$(free_port)
UPSTREAM=$(free_port)

# --- the test upstream ------------------------------------------------------------------------
mkdir -p "$TMP/www" "$TMP/conf"
echo "hello from the upstream" >"$TMP/www/e2e"
python3 -m http.server "$UPSTREAM" --bind 127.0.0.1 --directory "$TMP/www" >"$TMP/upstream.log" 2>&1 &
UP_PID=$!
wait_until "the upstream on port $UPSTREAM" 10 curl -sf --max-time 2 "http://127.0.0.1:$UPSTREAM/e2e"

# --- the gateway --------------------------------------------------------------------------------
# The admin key is left empty: it is generated into data/admin_key, where `wasmgate tui -p`
# finds it.
cat >"$TMP/conf/config.yaml" <<EOF
apisix:
  node_listen:
    - {ip: 127.0.0.1, port: $PROXY}
deployment:
  admin:
    admin_key:
      - {name: admin, key: "", role: admin}
    admin_listen: {ip: 127.0.0.1, port: $ADMIN}
nginx_config:
  worker_processes: 2
  error_log_level: info
  worker_shutdown_timeout: 5s
plugin_attr:
  prometheus:
    enable_export_server: false
wasm:
  plugins:
    - name: example_headers
      priority: 1000
      file: $PLUGIN
EOF
say "gateway: proxy $PROXY, admin $ADMIN, upstream $UPSTREAM, prefix $TMP"
timeout 20 "$BIN" start -p "$TMP" >"$TMP/start.log" 2>&1 || fail "wasmgate start failed: $(cat "$TMP/start.log")"
[ -f "$TMP/data/admin_key" ] || fail "no generated key in $TMP/data/admin_key"
KEY=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["admin"])' "$TMP/data/admin_key")

admin() { # METHOD PATH → prints the status code
    curl -s -o "$TMP/admin.out" -w '%{http_code}' --max-time 5 -X "$1" -H "X-API-KEY: $KEY" \
        "http://127.0.0.1:$ADMIN$2"
}
workers_running() {
    curl -sf --max-time 2 -H "X-API-KEY: $KEY" "http://127.0.0.1:$ADMIN/wasmgate/status" |
        python3 -c 'import json, sys; w = json.load(sys.stdin)["workers"]; sys.exit(not (len(w) == 2 and all(x["state"] == "running" for x in w)))'
}
wait_until "the gateway's workers" 20 workers_running

# --- the console --------------------------------------------------------------------------------
tmux -u -L "$SOCK" -f /dev/null new-session -d -s "$SESSION" -x 120 -y 40 \
    "env LANG=C.UTF-8 TERM=xterm-256color '$BIN' tui -p '$TMP'; echo \"console exited with \$?\"; sleep 60"
wait_screen "Routes (0)" "the console's first poll"
on_screen "127.0.0.1:$ADMIN" || fail "the status bar does not show the Admin API address"
on_screen "disconnected" && fail "the console says it is disconnected"

# A new route, typed into the editor: clear the template, type the JSON, set the id, Ctrl-S.
keys n
wait_screen "New route" "the route editor"
for _ in $(seq 1 20); do keys C-k; done
type_text "{\"uri\": \"/e2e\", \"plugins\": {\"example_headers\": {\"conf\": {\"response_set\": {\"x-e2e\": \"yes\"}}}}, \"upstream\": {\"type\": \"roundrobin\", \"nodes\": {\"127.0.0.1:$UPSTREAM\": 1}}}"
keys Tab C-u
type_text "e2e"
keys Tab
wait_screen "\"127.0.0.1:$UPSTREAM\": 1}}}" "the typed JSON"
keys C-s
wait_screen "route e2e saved" "the saved route"
wait_screen "/e2e" "the route in the table"
[ "$(admin GET /apisix/admin/routes/e2e)" = 200 ] || fail "the Admin API does not have route e2e"

# Requests through the gateway, with the plugin's header.
REQUESTS=5
for i in $(seq 1 $REQUESTS); do
    code=$(curl -s -o /dev/null -D "$TMP/headers" -w '%{http_code}' --max-time 5 "http://127.0.0.1:$PROXY/e2e") ||
        fail "request $i through the gateway failed"
    [ "$code" = 200 ] || fail "request $i through the gateway: status $code"
    grep -qi '^x-e2e: yes' "$TMP/headers" || fail "request $i: no x-e2e header from the plugin"
done
say "$REQUESTS requests proxied"

# The Plugins screen: the context of example_headers on route e2e counted them.
keys 2
wait_screen "Plugin contexts" "the Plugins screen"
requests_shown() {
    # The row: plugin, "route e2e", req/s, requests, ...
    screen | python3 -c '
import sys
want = int(sys.argv[1])
for line in sys.stdin:
    cells = line.strip("│ \n").split()
    if cells[:3] == ["example_headers", "route", "e2e"] and len(cells) > 4:
        sys.exit(0 if cells[4] == str(want) else 1)
sys.exit(1)' "$1"
}
wait_until "example_headers on route e2e to show $REQUESTS requests" 10 requests_shown "$REQUESTS"
say "the Plugins screen shows $REQUESTS requests for example_headers on route e2e"

# The other screens draw.
keys 3
wait_screen "Workers (2)" "the Workers screen"
keys 4
wait_screen "logs/error.log" "the Log screen"
keys ?
wait_screen "Keys" "the help"
keys Escape

# Delete the route: d asks, y confirms.
keys 1
wait_screen "Routes (1)" "the Routes screen"
keys d
wait_screen "Delete route e2e" "the confirmation"
keys y
wait_screen "route e2e deleted" "the deletion"
[ "$(admin GET /apisix/admin/routes/e2e)" = 404 ] || fail "route e2e is still in the Admin API after deleting it"
say "route e2e deleted through the console"

# q quits, and the console exits cleanly.
keys q
wait_screen "console exited with 0" "the console to quit"

# A console whose terminal goes away (its tmux session killed, a terminal window closed) ends
# too, rather than spin on an input that reads as an endless end of file.
tmux -L "$SOCK" new-session -d -s gone -x 100 -y 30 \
    "env LANG=C.UTF-8 TERM=xterm-256color '$BIN' tui -p '$TMP' --key gone-$$; true"
console_running() { pgrep -f -- "--key gone-$$" >/dev/null; }
wait_until "the second console to start" 10 console_running
sleep 1
tmux -L "$SOCK" kill-session -t gone
console_gone() { ! console_running; }
wait_until "the console to end once its terminal went away" 5 console_gone
say "a console whose terminal went away ended"
say "PASS ($SECONDS s)"
