#!/usr/bin/env bash
# Builds local stand-ins for the public images compose/docker-compose.yml names,
# FROM the local Debian base (docker/base/build.sh), and tags them with the
# exact public names so the compose file under test is the one users run:
#
#   apache/kafka:<KAFKA_VERSION>           Kafka jars from Maven Central + Debian JRE 17
#   redis:7.0-bookworm                     Debian redis-server 7.0
#   prom/prometheus:v2.42.0                Debian prometheus 2.42.0
#
# Every stand-in carries the label io.tickscale.standin=true. A tag that already
# exists WITHOUT that label is a real public image: it is left alone.
# (The Docker socket is reached through the project's own gate, tickscale.gate,
# which runs from the tickscale image: no socket-proxy image is needed.)
# Re-running is cheap (Docker's build cache). Usage: build.sh [kafka redis prometheus]
# Env: DOCKER (client), CACERT (CA bundle passed as build secret, default the system's),
#      TICKSCALE_CACHE (where the Kafka jars are, default ~/.cache/tickscale).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
DOCKER="${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}"
CACERT="${CACERT:-/etc/ssl/certs/ca-certificates.crt}"
BASE_IMAGE="${BASE_IMAGE:-tickscale/base:bookworm}"

KAFKA_VERSION="$(sed -n 's/^KAFKA_VERSION = "\(.*\)"$/\1/p' "$repo/tickscale/localstack/kafka.py")"
[ -n "$KAFKA_VERSION" ] || { echo "cannot read KAFKA_VERSION from tickscale/localstack/kafka.py" >&2; exit 1; }

declare -A TAG=(
    [kafka]="apache/kafka:$KAFKA_VERSION"
    [redis]="redis:7.0-bookworm"
    [prometheus]="prom/prometheus:v2.42.0"
)

log() { printf '[standins] %s\n' "$*" >&2; }

secret_args=()
if [ -s "$CACERT" ]; then secret_args=(--secret "id=cacert,src=$CACERT"); fi

build_one() {
    local name="$1" tag="${TAG[$1]}" ctx="$here/$1" start=$SECONDS
    if "$DOCKER" image inspect "$tag" >/dev/null 2>&1 &&
        [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "io.tickscale.standin"}}' "$tag")" != true ]; then
        log "$tag exists and is not a stand-in (a real image?): leaving it alone"
        return 0
    fi
    local tmp=""
    if [ "$name" = kafka ]; then
        local libs="${TICKSCALE_CACHE:-$HOME/.cache/tickscale}/kafka-$KAFKA_VERSION/libs"
        if ! ls "$libs"/kafka_*.jar >/dev/null 2>&1; then
            log "Kafka $KAFKA_VERSION jars missing in $libs: fetching"
            local py="$repo/.venv/bin/python"
            [ -x "$py" ] || py=python3
            (cd "$repo" && "$py" -m tickscale.localstack.kafka fetch)
        fi
        # The context is this directory plus the jars; assembled outside the repo.
        tmp="$(mktemp -d)"
        cp -a "$ctx/." "$tmp/"
        mkdir -p "$tmp/libs"
        cp "$libs"/*.jar "$tmp/libs/"
        ctx="$tmp"
    fi
    log "building $tag"
    DOCKER_BUILDKIT=1 "$DOCKER" build -q "${secret_args[@]}" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg KAFKA_VERSION="$KAFKA_VERSION" \
        --label io.tickscale.standin=true -t "$tag" "$ctx" >/dev/null
    [ -z "$tmp" ] || rm -rf "$tmp"
    log "$tag built in $((SECONDS - start))s ($("$DOCKER" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
}

"$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 || bash "$repo/docker/base/build.sh"

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(kafka redis prometheus)
for n in "${names[@]}"; do
    [ -n "${TAG[$n]:-}" ] || { echo "unknown stand-in: $n" >&2; exit 2; }
    build_one "$n"
done
