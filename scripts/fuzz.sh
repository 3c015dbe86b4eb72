#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) for a while; fails on any crash.
#
#   scripts/fuzz.sh [seconds-per-target]      (default 20)
#
# Environment:
#   FUZZ_TARGETS="a b"   only these targets (default: all, as `cargo fuzz list` names them)
#   FUZZ_KEEP=DIR        keep the inputs found during the run under DIR/<target>/ (default: a
#                        temporary directory, removed at the end; the committed seeds in
#                        fuzz/corpus/ are only read, never written)
#
# Needs: the stable toolchain (RUSTC_BOOTSTRAP=1 lets it accept cargo-fuzz's -Z flags), g++
# (libfuzzer-sys builds libFuzzer), and cargo-fuzz, installed here if missing. A crash leaves its
# input under fuzz/artifacts/<target>/ and the run exits 1 after printing its path; reproduce it
# with `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <path>`. See docs/FUZZING.md.
set -euo pipefail

secs="${1:-20}"
case "$secs" in
'' | *[!0-9]*)
  echo "usage: $0 [seconds-per-target]" >&2
  exit 2
  ;;
esac

cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
CARGO_FUZZ_VERSION=0.13.2

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install "cargo-fuzz@$CARGO_FUZZ_VERSION" --locked
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"

echo "== building fuzz targets (release, debug assertions, AddressSanitizer)"
build_start=$(date +%s)
# One build for all targets; `cargo fuzz run` below then finds them fresh.
cargo fuzz build
echo "== build took $(($(date +%s) - build_start)) s"

# Extra libFuzzer flags for some targets.
extra_flags() {
  case "$1" in
  # Long operation sequences from the start: state (full arenas, compaction) builds up.
  plugin_shm) echo "-max_len=8192 -len_control=0" ;;
  # Field names, operators and syntax: structure that byte mutations rarely produce.
  admin_objects | config_yaml) echo "-dict=fuzz/dicts/$1.dict" ;;
  esac
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
keep="${FUZZ_KEEP:-}"

failed=()
summary=()
for t in $targets; do
  corpus="$work/corpus/$t"
  [ -n "$keep" ] && corpus="$keep/$t"
  mkdir -p "$corpus" "fuzz/artifacts/$t"
  log="$work/$t.log"
  echo "== $t: ${secs}s"
  rc=0
  # New inputs go to the first directory; fuzz/corpus/$t (the committed seeds) is only read.
  cargo fuzz run "$t" "$corpus" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -timeout=30 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" $(extra_flags "$t") >"$log" 2>&1 || rc=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  cov="$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2 || true)"
  if [ "$rc" -ne 0 ]; then
    tail -n 60 "$log"
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)"
    echo "!! $t FAILED (exit $rc); crash input: ${artifact:-none written}"
    echo "!! reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run $t ${artifact:-<input>}"
    failed+=("$t")
    summary+=("$(printf '%-16s %12s %8s  FAILED: %s' "$t" "${execs:-?}" "${cov:-?}" "${artifact:-?}")")
  else
    summary+=("$(printf '%-16s %12s %8s  ok' "$t" "${execs:-?}" "${cov:-?}")")
  fi
done

echo
echo "== fuzz summary (${secs}s per target)"
printf '%-16s %12s %8s  %s\n' target execs coverage result
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "!! crashes in: ${failed[*]} (inputs under fuzz/artifacts/)"
  exit 1
fi
