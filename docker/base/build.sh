#!/usr/bin/env bash
# Builds a local Debian bookworm + Python 3.11 base image from Debian packages,
# because no image registry is reachable here (only Debian's mirrors, PyPI, ...).
#
# It stands in for the official slim Python image and is tagged as both
#   python:3.11-slim-bookworm   (what Dockerfile's ARG BASE_IMAGE defaults to)
#   tickscale/base:bookworm     (what docker/standins/*/Dockerfile build FROM)
#
# What it shares with python:3.11-slim-bookworm, as far as our images care:
# Debian bookworm, `python`/`python3` 3.11 on PATH with venv and pip, CA
# certificates, C.UTF-8 locale, apt sources for bookworm, -updates and -security.
# What differs: Python is Debian's /usr/bin/python3 (not /usr/local), and pip
# into the system interpreter is refused (PEP 668) -- our Dockerfile uses a venv.
#
# Idempotent: skips when both tags exist (FORCE=1 rebuilds); the debootstrap
# rootfs is cached as a tarball under $CACHE_DIR so a rebuild only re-imports.
#
# Env: CACHE_DIR (default ~/.cache/tickscale/docker), MIRROR, SECURITY_MIRROR
#      (default: read from /etc/apt/sources.list*), FORCE=1, DOCKER (client).
set -euo pipefail

SUITE=bookworm
TAGS=(python:3.11-slim-bookworm tickscale/base:bookworm)
CACHE_DIR="${CACHE_DIR:-${HOME}/.cache/tickscale/docker}"
ROOTFS_TAR="$CACHE_DIR/rootfs-$SUITE-py311.tar"
INCLUDE=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
# Debian's 20.10 client can do BuildKit builds without a buildx plugin; a newer
# client elsewhere on PATH may not. Reads/imports work with either.
DOCKER="${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}"

log() { printf '[base] %s\n' "$*" >&2; }

have_all_tags() {
    local t
    for t in "${TAGS[@]}"; do
        "$DOCKER" image inspect "$t" >/dev/null 2>&1 || return 1
    done
}

if [ "${FORCE:-0}" != 1 ] && have_all_tags; then
    log "images ${TAGS[*]} exist, skipping (FORCE=1 to rebuild)"
    exit 0
fi

# The machine's own Debian mirror (a deb822 URIs: line or a one-line `deb` entry).
sources_uris() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | awk '
            /^[[:space:]]*URIs:/ { for (i = 2; i <= NF; i++) print $i }
            /^[[:space:]]*deb[[:space:]]/ {
                for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i ~ /:\/\//) { print $i; break }
            }'
}
MIRROR="${MIRROR:-$(sources_uris | grep -E '/debian/?$' | head -n1 || true)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
MIRROR="${MIRROR%/}"
SECURITY_MIRROR="${SECURITY_MIRROR:-$(sources_uris | grep -E '/debian-security/?$' | head -n1 || true)}"
SECURITY_MIRROR="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SECURITY_MIRROR="${SECURITY_MIRROR%/}"

mkdir -p "$CACHE_DIR"
if [ ! -s "$ROOTFS_TAR" ] || [ "${FORCE:-0}" = 1 ]; then
    command -v debootstrap >/dev/null || { log "debootstrap missing (apt-get install debootstrap)"; exit 1; }
    root="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    trap 'rm -rf "$root"' EXIT
    log "debootstrap --variant=minbase $SUITE from $MIRROR (include: $INCLUDE)"
    start=$SECONDS
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$root" "$MIRROR" \
        >"$CACHE_DIR/debootstrap.log" 2>&1 || {
        tail -n 40 "$CACHE_DIR/debootstrap.log" >&2
        exit 1
    }
    log "debootstrap took $((SECONDS - start))s"

    # apt sources like the official images' (deb822), on this machine's mirror.
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # What Debian's docker images configure: no recommends, no docs/man/locales
    # from later installs, no apt caches kept, no daemons started by postinst.
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    cat >"$root/etc/apt/apt.conf.d/docker-no-recommends" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"

    # Make it small: no package lists, caches, docs, man pages, locales, logs.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
        "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.cache
    mkdir -p "$root/var/lib/apt/lists/partial" "$root/var/cache/apt/archives/partial"
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/*
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
        -exec rm -rf {} + 2>/dev/null || true
    find "$root/usr/lib/python3" "$root/usr/lib/python3.11" -name __pycache__ -type d \
        -exec rm -rf {} + 2>/dev/null || true
    # The container's hostname/resolv.conf/hosts are the engine's to provide.
    : >"$root/etc/resolv.conf"
    rm -f "$root/etc/hostname"

    tar -C "$root" --numeric-owner -cf "$ROOTFS_TAR.tmp" .
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    rm -rf "$root"
    trap - EXIT
else
    log "using cached rootfs $ROOTFS_TAR"
fi

start=$SECONDS
"$DOCKER" import \
    -c 'ENV LANG=C.UTF-8' \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV PYTHON_VERSION=3.11' \
    -c 'CMD ["python3"]' \
    -m "debootstrap minbase $SUITE + python3 (tickscale docker/base/build.sh)" \
    "$ROOTFS_TAR" "${TAGS[0]}" >/dev/null
for t in "${TAGS[@]:1}"; do "$DOCKER" tag "${TAGS[0]}" "$t"; done
log "imported in $((SECONDS - start))s: ${TAGS[*]}"
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "${TAGS[0]}" >&2
