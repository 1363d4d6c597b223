#!/usr/bin/env bash
# Runs every test of citytsdb: formatting, lints, unit tests and the end-to-end suite
# (the real binary over HTTP, DuckDB as the SQL oracle). Installs what the tests need
# first; safe to run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# One build of everything, then the tests; the end-to-end tests start the binary of
# this very build (without CITYTSDB_BIN they build it themselves).
cargo build --workspace --all-targets
CITYTSDB_BIN="${CARGO_TARGET_DIR:-$(pwd)/target}/debug/citytsdb" cargo test --workspace --all-targets
