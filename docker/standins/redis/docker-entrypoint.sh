#!/bin/sh
# The argument rules of the public redis image's entrypoint (without the
# root -> redis privilege drop: this image already runs as redis).
set -e
# `docker run redis -flag` or `docker run redis some.conf` => redis-server ...
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
    # Like the public image: protected mode off unless a config file sets it,
    # since a container's port is reached from other hosts by design.
    protected=1
    for a in "$@"; do
        case "$a" in
            --protected-mode) protected= ;;
            *.conf) if [ -f "$a" ] && grep -q '^protected-mode' "$a"; then protected=; fi ;;
        esac
    done
    if [ -n "$protected" ]; then set -- "$@" --protected-mode no; fi
    umask 0077
fi
exec "$@"
