# audience-sync daemon image: `docker build -t audience-sync .`
#   docker run -d --name audience-sync --env-file .env \
#     -v "$PWD/audience-sync.toml:/config/audience-sync.toml:ro" -v audience-sync-data:/data \
#     -p 127.0.0.1:9464:9464 audience-sync
# README "Deployment". Not built in CI (it cannot pull base images).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md config.example.toml ./
COPY sync ./sync
COPY migrations ./migrations
# The PostgreSQL and MariaDB/MySQL drivers too: the state DB and sources may be either.
RUN pip install ".[postgres,mysql]" && rm -rf /src

# Not root: the daemon needs nothing but its config (read-only) and /data (SQLite state DB).
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin audience-sync \
    && mkdir -p /data /config && chown audience-sync /data
USER audience-sync
WORKDIR /data
VOLUME ["/data"]

# The config is mounted here; relative SQLite paths in it resolve against /config, so point
# [state] url at /data (AUDIENCE_SYNC_STATE_URL below does, with the config init writes).
ENV AUDIENCE_SYNC_CONFIG=/config/audience-sync.toml \
    AUDIENCE_SYNC_STATE_URL=sqlite:////data/audience-sync.db \
    AUDIENCE_SYNC_HTTP=0.0.0.0:9464
# /metrics, /healthz, /readyz and the status page ([daemon] http = "${AUDIENCE_SYNC_HTTP:-…}").
EXPOSE 9464

# Liveness: /healthz answers 200 while the process serves (slim images have no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]

# SIGTERM (docker stop) finishes the batches in flight within [daemon] shutdown_timeout:
# give `docker stop --time` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["audience-sync"]
CMD ["run"]
