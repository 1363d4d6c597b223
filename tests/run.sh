#!/usr/bin/env bash
# Runs every test of citytsdb: formatting, lints, unit tests and the end-to-end suite
# (the real binary over HTTP, DuckDB as the SQL oracle). Installs what the tests need
# first; safe to run again and again. One build profile (dev), one build.
#
# What is installed, each only when missing:
# - Python packages of tests/requirements.txt (DuckDB for the SQL oracle), with pip;
# - Debian packages, with apt-get (as root; `apt-get update` runs only when something
#   is missing): prometheus-alertmanager, the real Alertmanager the alert tests
#   start (/usr/bin/prometheus-alertmanager), and mosquitto and mosquitto-clients,
#   the real MQTT broker and publisher of the MQTT tests. Their services are never started:
#   while installing, a policy-rc.d that forbids it is put in place if there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each phase's wall time goes to stderr, so a slow CI run says where its time went.
phase() { echo "run.sh: $1 done after ${SECONDS}s" >&2; }

# need_deb PACKAGE BINARY: installs Debian's PACKAGE unless BINARY is on PATH.
need_deb() {
    local package=$1 binary=$2
    command -v "$binary" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "run.sh: $binary is missing; install the Debian package $package as root" >&2
        return 1
    fi
    echo "run.sh: installing $package" >&2
    # Installing a package with a service would start it; forbid that unless a
    # policy is already in place (containers usually have one).
    local policy=/usr/sbin/policy-rc.d added_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
    fi
    local status=0
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "$package"
    } >/tmp/run-sh-apt-"$package".log 2>&1 || status=$?
    if [ -n "$added_policy" ]; then rm -f "$policy"; fi
    if [ "$status" -ne 0 ] || ! command -v "$binary" >/dev/null 2>&1; then
        cat /tmp/run-sh-apt-"$package".log >&2
        echo "run.sh: installing $package did not provide $binary" >&2
        return 1
    fi
}

need_deb prometheus-alertmanager prometheus-alertmanager
need_deb prometheus prometheus
need_deb mosquitto /usr/sbin/mosquitto
need_deb mosquitto-clients mosquitto_pub
python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
phase "installing"

cargo fmt --all -- --check
# One build of everything, linted as it compiles: clippy's driver wraps rustc for
# the workspace's own crates only (what `cargo clippy` does, but producing code
# too), so the dependencies are compiled once, not once to check and once to build.
export RUSTC_WORKSPACE_WRAPPER="${RUSTC_WORKSPACE_WRAPPER:-$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)}"
# clippy-driver's own encoding of its arguments: `-D warnings`.
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
# A fresh build gains nothing from incremental caches, and writing them costs time and disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# `--locked`: a Cargo.lock that does not match the manifests fails here rather than
# being rewritten by the build, so what is tested is what is committed.
cargo build --locked --workspace --all-targets
phase "formatting, lints and the build"
# The build is a few GB; say how much room is left, so a full disk is plain to see.
df -h "${CARGO_TARGET_DIR:-target}" | sed 's/^/run.sh: /' >&2
# The end-to-end tests start the binary of this very build.
CITYTSDB_BIN="${CARGO_TARGET_DIR:-$(pwd)/target}/debug/citytsdb" cargo test --locked --workspace --all-targets
phase "the tests"
