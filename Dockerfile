# One image for every tickscale role: `tickscale handler`, `tickscale scaler`,
# `tickscale replay` (and `verify`, `topics`); the command picks the role.
#
# Build (BuildKit; the CA bundle is only needed where outbound TLS is intercepted):
#   DOCKER_BUILDKIT=1 docker build -t tickscale:dev \
#       --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt \
#       --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
# .ci/docker.sh does exactly this. No `# syntax=` line on purpose: it would pull
# a frontend image, and this Dockerfile only needs the builtin one (RUN --mount).
#
# The CA bundle arrives as a build *secret*: it is mounted for the one RUN that
# talks to PyPI and is never written to a layer, the image config or its env.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- builder: wheels for the project and every dependency ------------------------
FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONDONTWRITEBYTECODE=1

# A venv for the build tools: works the same on the official image and on a
# Debian-python base where pip into the system interpreter is refused (PEP 668).
RUN python3 -m venv /opt/build

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml
# changes, not on every source edit.
COPY pyproject.toml ./
RUN --mount=type=secret,id=cacert \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    set -eu; \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    /opt/build/bin/python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); b = d['build-system']['requires']; print('\n'.join(b), file=open('/tmp/build-requires.txt', 'w')); print('\n'.join(d['project']['dependencies']), file=open('/tmp/requirements.txt', 'w'))"; \
    /opt/build/bin/pip install --upgrade pip -r /tmp/build-requires.txt; \
    /opt/build/bin/pip wheel --wheel-dir /wheels -r /tmp/requirements.txt

# Then the source; only this and the next step rerun on a code change.
COPY README* ./
COPY core ./core
COPY ingest ./ingest
COPY scaler ./scaler
COPY tickscale ./tickscale
# --no-build-isolation: the build backend is already in /opt/build, so this
# step needs no network (and no CA).
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && ls -1 /wheels

# --- runtime: only the installed wheels ------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TICKSCALE_METRICS_PORT=9100

# /data: where replay writes its manifest; a named volume mounted there starts
# out owned by the runtime user.
RUN groupadd --gid 10001 tickscale \
    && useradd --uid 10001 --gid tickscale --home-dir /home/tickscale \
       --create-home --shell /usr/sbin/nologin tickscale \
    && mkdir -p /data && chown tickscale:tickscale /data

# The wheels are bind-mounted from the builder, never copied into a layer;
# --no-index: nothing is fetched here. pip itself is removed afterwards.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links=/wheels tickscale \
    && /opt/venv/bin/pip uninstall -y -q pip \
    && tickscale --help >/dev/null

# Bytecode for the interpreter's own library, made once here: a base image may
# ship it stripped (ours does, to stay small), and the containers run read-only,
# so without it every handler start compiled asyncio, logging and the rest
# again: importing the handler in a fresh container took 1.4-1.8 s before, 1.1-1.3 s
# after, on an idle machine.
RUN python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"

# Labels last: VERSION/REVISION/CREATED change per build, and an ARG used
# earlier would invalidate the cached install layer above on every build.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=
ARG CREATED=
LABEL org.opencontainers.image.title="tickscale" \
      org.opencontainers.image.description="Autoscaling market-data ingestion: feed handlers, scaler, replay" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"

USER tickscale:tickscale
WORKDIR /home/tickscale

EXPOSE 9100
# The handler serves /healthz on TICKSCALE_METRICS_PORT. Compose overrides or
# disables this for the roles that serve no such endpoint (replay, topics).
# Generous: on a busy machine a healthy process answers late, and an unhealthy
# verdict there stopped a Swarm rollout that was going fine.
HEALTHCHECK --interval=10s --timeout=10s --start-period=30s --retries=5 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('TICKSCALE_METRICS_PORT', '9100'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=8).status == 200 else 1)"]

ENTRYPOINT ["tickscale"]
CMD ["--help"]
