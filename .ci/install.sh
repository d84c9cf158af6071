#!/usr/bin/env bash
# Installs everything tickscale's tests and local stack need, on Debian bookworm:
#   - redis-server and prometheus (Debian packages; the tests run their own copies
#     on random 127.0.0.1 ports, so the packaged services are never started)
#   - a Java 17 runtime and Maven, only if `java` / `mvn` are missing
#   - .venv with `pip install -e '.[dev]'`
#   - the Apache Kafka jars from Maven Central (~/.cache/tickscale, or $TICKSCALE_CACHE)
# Safe to re-run: every step is a no-op when already done.
# Usage: bash .ci/install.sh        (as root, or as a user with sudo)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "run as root or install sudo" >&2; exit 1; }
    SUDO="sudo"
fi

# --- system packages -------------------------------------------------------
pkgs=(redis-server prometheus)
command -v java >/dev/null || pkgs+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || pkgs+=(maven)
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || pkgs+=(python3)
# Debian splits venv/ensurepip out of python3.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then pkgs+=(python3-venv); fi

if ! command -v apt-get >/dev/null; then
    for tool in redis-server prometheus java mvn "$PYTHON"; do
        command -v "$tool" >/dev/null || { echo "missing $tool and no apt-get; install it by hand" >&2; exit 1; }
    done
else
    step "apt-get install ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' postinst would start system-wide redis (6379) and prometheus
    # (9090) daemons nobody asked for; a policy-rc.d that says "no" prevents
    # that, as Debian's container images do. Only ours is removed afterwards.
    policy=/usr/sbin/policy-rc.d
    added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
        added_policy=1
    fi
    cleanup_policy() { if [ "$added_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
    trap cleanup_policy EXIT
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" </dev/null
    cleanup_policy
    trap - EXIT
fi

java -version 2>&1 | sed -n 1p  # sed, not head: head exits early and pipefail sees SIGPIPE
mvn -v 2>/dev/null | sed -n 1p
redis-server --version
prometheus --version 2>&1 | sed -n 1p

# --- Python ----------------------------------------------------------------
step "Python venv (.venv)"
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"tickscale needs Python >= 3.11, {sys.executable} is {sys.version.split()[0]}")
PY
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

# --- Kafka -----------------------------------------------------------------
step "Kafka jars"
.venv/bin/python -m tickscale.localstack.kafka fetch

step "install done"
