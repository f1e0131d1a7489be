# saiproxy: OpenAI-compatible reverse proxy in front of SAI.
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TZ=America/Guayaquil \
    PORT=4000 \
    LOG_DIR=/app/logs

# tzdata follows the distribution's security updates, so it is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tzdata \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, so code changes reuse the cached layer.
COPY setup.cfg pyproject.toml README.md LICENSE ./
COPY saiproxy/__init__.py saiproxy/__init__.py
# The project itself, with uvloop (the "fast" extra) and the OpenTelemetry SDK
# ("otel": off until an OTEL_* variable names a collector); ranges live in setup.cfg.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[fast,otel]"
COPY saiproxy ./saiproxy
RUN pip install --no-cache-dir --no-deps . \
    && useradd --system --uid 10001 --no-create-home --home-dir /app saiproxy \
    && mkdir -p /app/logs \
    && chown saiproxy /app/logs
COPY config ./config

USER 10001
EXPOSE 4000

# Python is already in the image: no curl or wget needed for the check.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '4000'), timeout=2).status != 200)"]

STOPSIGNAL SIGTERM
CMD ["saiproxy"]
