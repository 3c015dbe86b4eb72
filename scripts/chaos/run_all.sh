#!/usr/bin/env bash
# Runs every chaos script with its full-length defaults against target/release/wasmgate and
# prints their SUMMARY lines (also written to $OUT, default /tmp/wasmgate-chaos-summary.txt).
# Loopback only; about 4 minutes in all. Some cases need root (chattr, mount): they are skipped
# or reported otherwise. Exit status: the number of scripts that reported FAIL.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-/tmp/wasmgate-chaos-summary.txt}
[ -x "$root/target/release/wasmgate" ] || { echo "build first: cargo build --release" >&2; exit 1; }
: > "$out"
fails=0
for s in kill_workers sighup_storm admin_storm kill_master disk_faults hostile_clients \
         hostile_plugins security; do
  echo "== $s" >&2
  start=$(date +%s)
  if ! python3 "$here/$s.py" | tee -a "$out"; then
    fails=$((fails + 1))
  fi
  echo "   ($s: $(( $(date +%s) - start )) s)" >&2
done
echo "== summaries ($out)" >&2
cat "$out"
exit $fails
