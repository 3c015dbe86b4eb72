#!/usr/bin/env bash
# Checks the dependency tree against deny.toml with cargo-deny: licenses, sources (crates.io
# only), bans, and RustSec advisories (vulnerable, unmaintained or yanked versions).
#
# cargo-deny is installed (pinned, --locked) when missing. The advisory database is fetched
# from GitHub; where GitHub cannot be reached the advisory check is reported as not run — loudly,
# never as passed — and the other checks still decide the outcome.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DENY_VERSION=0.20.2

if ! cargo deny --version >/dev/null 2>&1; then
  echo "== installing cargo-deny $CARGO_DENY_VERSION"
  cargo install "cargo-deny@$CARGO_DENY_VERSION" --locked
fi

# Errors only: duplicate versions are warnings (deny.toml) and would bury the verdict.
cargo deny --log-level error check licenses bans sources

if cargo deny fetch db >/dev/null 2>&1; then
  cargo deny check advisories
else
  echo "!! RustSec advisory database unreachable (github.com): advisories NOT checked"
fi
