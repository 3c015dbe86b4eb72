#!/usr/bin/env bash
# Builds the AssemblyScript SDK test plugins (wasm/as_headers.wasm from assembly/index.ts,
# wasm/as_body.wasm from assembly/body.ts) with the versions pinned in package-lock.json
# (@solo-io/proxy-runtime 0.1.8, assemblyscript 0.14.13). Needs node + npm.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npx --no-install asc assembly/index.ts -b ../wasm/as_headers.wasm --use abort=abort_proc_exit --optimize
npx --no-install asc assembly/body.ts -b ../wasm/as_body.wasm --use abort=abort_proc_exit --optimize
