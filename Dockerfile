# Gateway image: Twilio Media Streams <-> Gemini Live.
#   docker build -t gateway .
#   docker run --rm -p 8080:8080 --env-file deploy/gateway.env gateway
# Every Python package comes from a hashed lock (requirements.lock for the runtime,
# requirements-build.lock for the build backend), so a build installs nothing unpinned.

FROM python:3.13-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Dependencies first: this layer is rebuilt only when a lock file changes.
COPY requirements.lock requirements-build.lock ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes -r requirements.lock \
    && python -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes -r requirements-build.lock

# README.m[d]: copied when present (pyproject names it), without failing when absent.
COPY pyproject.toml README.m[d] ./
COPY gateway ./gateway
# Build the wheel with the locked setuptools (no isolated, unpinned build env),
# then install only the project itself: its dependencies are already in the venv.
# (-I: import the installed package, not ./gateway.)
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
    && /opt/venv/bin/pip install --no-deps /tmp/dist/gateway-*.whl \
    && /opt/venv/bin/python -I -c "import gateway.__main__, gateway.outbound, audioop, orjson, uvloop"


FROM python:3.13-slim

# Numeric UID/GID so Kubernetes runAsNonRoot can verify the user without a name lookup.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway

COPY --from=builder /opt/venv /opt/venv
# Documented defaults (config/gateway.toml); environment variables override each key.
COPY config/gateway.toml /app/config/gateway.toml

# Bytecode was compiled at install time; nothing is written at run time, so a
# read-only root filesystem works.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    LOG_FORMAT=json \
    GATEWAY_CONFIG=/app/config/gateway.toml

WORKDIR /app
USER 10001:10001
EXPOSE 8080

# The app drains on SIGTERM: readiness fails at once, calls in progress run on for up
# to DRAIN_TIMEOUT seconds. Give `docker stop` a matching --time / stop_grace_period.
STOPSIGNAL SIGTERM

# slim has no curl: probe liveness with the standard library. Any non-2xx raises -> exit 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/healthz', timeout=2)"]

CMD ["python", "-m", "gateway"]
