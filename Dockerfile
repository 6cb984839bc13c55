# ClearSky tile server image. Multi-stage: Python deps, then npm front-end deps, then a slim runtime.
# Serves the stacks mounted at /data on port 8000 (README: Docker):
#   docker build -t clearsky .
#   docker run -p 8000:8000 -v "$PWD/data/demo:/data:ro" clearsky
# The server needs no PyTorch (it reads the cloud masks `clearsky mask` wrote into the stacks),
# so the image installs ClearSky without the `masks` extra.
FROM python:3.11-slim AS python-deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY compositor compositor
COPY tileserver tileserver
RUN python -m venv /venv && /venv/bin/pip install --upgrade pip && /venv/bin/pip install .

FROM node:20-slim AS web-deps
WORKDIR /web
COPY static/package.json static/package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

FROM python:3.11-slim
RUN useradd --create-home clearsky && mkdir /data && chown clearsky /data
COPY --from=python-deps /venv /venv
COPY static /app/static
COPY --from=web-deps /web/node_modules /app/static/node_modules
ENV PATH=/venv/bin:$PATH \
    CLEARSKY_DATA_DIR=/data \
    CLEARSKY_STATIC_DIR=/app/static \
    NUMBA_CACHE_DIR=/tmp/numba
USER clearsky
EXPOSE 8000
# Each start compiles the numba kernels while warming up (~16 s here, more on a small host):
# the start period keeps those first probes from counting as failures. /health answers 200 once
# the server listens (with "status": "no data" when nothing is mounted at /data).
HEALTHCHECK --start-period=120s --interval=30s --timeout=5s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
CMD ["clearsky", "serve", "--host", "0.0.0.0", "--port", "8000", "--data", "/data"]
