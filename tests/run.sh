#!/usr/bin/env bash
# Runs every test of citytsdb: formatting, lints, unit tests and the end-to-end suite
# (the real binary over HTTP, DuckDB as the SQL oracle). Installs what the tests need
# first; safe to run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -r tests/oracle/requirements.txt

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# One build of everything (the binary the end-to-end tests start included), then the tests.
cargo build --workspace --all-targets
cargo test --workspace --all-targets
