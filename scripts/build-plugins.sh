#!/usr/bin/env bash
# Rebuilds the Proxy-Wasm test plugins in tests/plugins/ (Rust SDK, AssemblyScript SDK, C with
# wasi-libc, Go) into tests/plugins/wasm/,
# and records a checksum manifest of sources and outputs (tests/plugins/wasm/MANIFEST) so a stale
# fixture is detected by the tests.
#
# The rustup toolchain has no wasm32 target; Debian's rustc ships the standard library's source,
# from which cargo builds std for wasm32 itself:
#   apt-get install -y rustc-web rust-web-src
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/tests/plugins"

if ! command -v /usr/bin/rustc >/dev/null || [ ! -d /usr/lib/rustlib/src/rust/library ]; then
  echo "needs Debian's rustc with the std source: apt-get install -y rustc-web rust-web-src" >&2
  exit 1
fi
lld="$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld"
remap="--remap-path-prefix=$HOME/.cargo/registry/src=/crates --remap-path-prefix=/usr/lib/rustlib/src/rust=/rust --remap-path-prefix=$root=/wasmgate"

RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTFLAGS="$remap" \
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="$lld" \
  cargo build --release --target wasm32-unknown-unknown -Zbuild-std=std,panic_abort

mkdir -p wasm
# The AssemblyScript SDK plugin, when node/npm are at hand; the C plugin, when clang and
# wasi-libc are; the Go plugin (it finds or installs Go itself). Their .wasm files are
# committed either way.
if command -v npm >/dev/null; then
  bash assemblyscript/build.sh
fi
if command -v clang >/dev/null; then
  bash c/build.sh || echo "c/build.sh failed: tests/plugins/wasm/c_headers.wasm left as it was" >&2
fi
bash go/build.sh || echo "go/build.sh failed: tests/plugins/wasm/go_headers.wasm left as it was" >&2
for crate in */Cargo.toml; do
  name=$(dirname "$crate")
  cp "target/wasm32-unknown-unknown/release/$name.wasm" "wasm/$name.wasm"
done
./manifest.sh > wasm/MANIFEST
# The example plugin of the default configuration is the header_rewrite fixture.
cp wasm/header_rewrite.wasm "$root/plugins/example_headers.wasm"
ls -l wasm/
