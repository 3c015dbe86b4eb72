#!/usr/bin/env bash
# Builds the C test plugin ../wasm/c_headers.wasm from c_headers.c with clang + wasi-libc, as a
# plugin author using C (or the toolchain of the C++ SDK) builds one: a WASI reactor
# (`_initialize`), -O2, host functions imported from "env", callbacks exported by name, and
# wasi-libc's malloc handed to the host as `proxy_on_memory_allocate`.
#
# Needs (Debian 12): clang lld wasi-libc libclang-rt-dev-wasm32 (it installs nothing itself).
# The output is reproducible: no machine path is recorded and every custom section (names,
# producers, debug info) is stripped, so two builds with the same toolchain are byte-identical.
set -euo pipefail
cd "$(dirname "$0")"

CC=${CC:-clang}
TARGET=${TARGET:-wasm32-wasi}
OUT=../wasm/c_headers.wasm

missing=()
if ! command -v "$CC" >/dev/null 2>&1; then
    missing+=(clang)
else
    command -v wasm-ld >/dev/null 2>&1 || missing+=(lld)
    # clang answers a bare name when it finds no such file in the target's sysroot.
    libc=$("$CC" --target="$TARGET" -print-file-name=libc.a)
    reactor=$("$CC" --target="$TARGET" -print-file-name=crt1-reactor.o)
    [[ -f $libc && -f $reactor ]] || missing+=(wasi-libc)
    builtins=$("$CC" --target="$TARGET" -print-libgcc-file-name)
    [[ -f $builtins ]] || missing+=(libclang-rt-dev-wasm32)
fi
if ((${#missing[@]})); then
    echo "build.sh: missing packages: ${missing[*]}" >&2
    echo "  apt-get install -y ${missing[*]}" >&2
    exit 1
fi

tmp=$(mktemp "$OUT.XXXXXX")
trap 'rm -f "$tmp"' EXIT
"$CC" --target="$TARGET" -mexec-model=reactor -O2 -std=c11 \
    -Wall -Wextra \
    -ffile-prefix-map="$PWD"=. -fdebug-prefix-map="$PWD"=. \
    -Wl,--strip-all \
    -o "$tmp" c_headers.c
chmod 644 "$tmp"
mv "$tmp" "$OUT"
trap - EXIT
echo "built $(cd .. && pwd)/wasm/c_headers.wasm ($(wc -c <"$OUT") bytes, sha256 $(sha256sum "$OUT" | cut -d' ' -f1))"
