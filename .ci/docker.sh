#!/usr/bin/env bash
# Docker images for tickscale, on Debian bookworm as root, non-interactive.
# Idempotent: every step is a no-op (or a cached build) when already done.
#
#   1. apt: docker.io, debootstrap, docker-compose (v1), if missing
#   2. dockerd: started in the background if `docker info` fails (log below)
#   3. docker/base/build.sh      local python:3.11-slim-bookworm + tickscale/base:bookworm
#   4. docker/standins/build.sh  apache/kafka, redis, prom/prometheus, socket proxy
#   5. the tickscale image       tickscale:dev (what compose uses) + tickscale:<version>
#   6. `docker-compose config`   validates compose/docker-compose.yml
#
# No image registry is reachable here, hence 3 and 4: everything is built from
# Debian packages, PyPI and Maven Central. The machine's CA bundle is passed to
# builds as a BuildKit secret only (never stored in an image).
#
# Env: DOCKERD_LOG (default /var/log/tickscale-dockerd.log), CACERT, SKIP_STANDINS=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec </dev/null
export DEBIAN_FRONTEND=noninteractive

T0=$SECONDS
t_step=$SECONDS
step() {
    if [ -n "${cur:-}" ]; then printf '    (%s: %ss)\n' "$cur" "$((SECONDS - t_step))"; fi
    cur="$*"; t_step=$SECONDS
    printf '\n==> [docker %4ss] %s\n' "$((SECONDS - T0))" "$*"
}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# --- 1. packages ---------------------------------------------------------------------
step "packages"
pkgs=()
command -v dockerd >/dev/null || pkgs+=(docker.io)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || pkgs+=(debootstrap)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || pkgs+=(docker-compose)
if [ ${#pkgs[@]} -gt 0 ]; then
    echo "apt-get install ${pkgs[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
# Debian's 20.10 client does BuildKit builds without a buildx plugin; a newer
# `docker` earlier on PATH may not, so the scripts use this one when present.
DOCKER="$(command -v /usr/bin/docker || command -v docker)"
export DOCKER
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
"$DOCKER" --version
"${COMPOSE[@]}" version 2>/dev/null | head -n1 || true

# --- 2. engine -----------------------------------------------------------------------
step "docker engine"
if ! "$DOCKER" info >/dev/null 2>&1; then
    log="${DOCKERD_LOG:-/var/log/tickscale-dockerd.log}"
    echo "starting dockerd (log: $log)"
    # setsid: the daemon must outlive this script and not get its signals.
    $SUDO setsid nohup dockerd >"$log" 2>&1 </dev/null &
    for _ in $(seq 60); do
        "$DOCKER" info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! "$DOCKER" info >/dev/null 2>&1; then
        echo "dockerd did not come up; last lines of $log:" >&2
        tail -n 30 "$log" >&2 || true
        exit 1
    fi
fi
"$DOCKER" info --format 'engine {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}'

# --- 3. base image -------------------------------------------------------------------
step "base image (docker/base/build.sh)"
bash docker/base/build.sh

# --- 4. stand-ins --------------------------------------------------------------------
if [ "${SKIP_STANDINS:-0}" != 1 ]; then
    step "stand-in images (docker/standins/build.sh)"
    bash docker/standins/build.sh
fi

# --- 5. tickscale image --------------------------------------------------------------
step "tickscale image"
CACERT="${CACERT:-/etc/ssl/certs/ca-certificates.crt}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
source_url="$(git remote get-url origin 2>/dev/null || true)"
case "$source_url" in *@*) source_url="" ;; esac  # never put credentials in a label
secret=()
if [ -s "$CACERT" ]; then secret=(--secret "id=cacert,src=$CACERT"); fi
DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain "${secret[@]}" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    --build-arg SOURCE="$source_url" --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -t tickscale:dev -t "tickscale:$version" . >/tmp/tickscale-image-build.log 2>&1 || {
    tail -n 60 /tmp/tickscale-image-build.log >&2
    exit 1
}
"$DOCKER" run --rm tickscale:dev --help >/dev/null

# --- 6. compose file -----------------------------------------------------------------
step "compose config"
envf="$(mktemp)"
trap 'rm -f "$envf"' EXIT
cp compose/.env.example "$envf"
# The example leaves SECRETS_DIR empty on purpose (compose refuses it): any folder will do here.
printf 'SECRETS_DIR=%s\n' "$(dirname "$envf")/tickscale-secrets" >>"$envf"
"${COMPOSE[@]}" -f compose/docker-compose.yml --env-file "$envf" config -q
echo "compose/docker-compose.yml: valid"

step "images"
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' \
    | grep -E '^(tickscale|python:3.11-slim-bookworm|apache/kafka|redis|prom/prometheus|tecnativa/)' | sort
cur=""
printf '\n==> [docker %4ss] docker images ready\n' "$((SECONDS - T0))"
