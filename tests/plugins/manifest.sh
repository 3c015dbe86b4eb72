#!/usr/bin/env bash
# Prints the checksums of the plugin sources and the built .wasm files (see
# scripts/build-plugins.sh); tests compare it with wasm/MANIFEST to catch stale fixtures.
set -euo pipefail
cd "$(dirname "$0")"
sha256sum Cargo.toml */Cargo.toml */src/*.rs assemblyscript/assembly/*.ts assemblyscript/package*.json c/*.c c/build.sh go/go.mod go/build.sh go/*/*.go wasm/*.wasm | LC_ALL=C sort -k2
