# The platform image: one image for every service of ours in docker-compose.yml
# (pki-init, dagster-code, dagster-analytics, dagster-webserver, dagster-daemon, ingest).
#
#   docker compose build        # or: docker build -t iot-platform:local .
#
# Runs as the unprivileged user `iot` (uid/gid 10001). Mosquitto runs as the same uid in
# compose so it can read the broker key that pki-init writes with mode 0600.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    IOT_HOME=/var/lib/iot \
    IOT_CERTS_DIR=/certs \
    DAGSTER_HOME=/var/lib/iot/dagster_home

RUN groupadd --system --gid 10001 iot \
    && useradd --system --uid 10001 --gid iot --home-dir /var/lib/iot --no-create-home \
       --shell /usr/sbin/nologin iot

WORKDIR /opt/iot-platform
# The locked dependencies (scripts/lock.sh) in a layer of their own, before any source:
# a code change rebuilds from the COPY below, this layer only when the lock changes.
COPY requirements/runtime.txt requirements/runtime.txt
RUN pip install --no-cache-dir -r requirements/runtime.txt
# Sources only (see .dockerignore: no .venv, .iot, certs, tests, .git, .env).
COPY . .
# The project itself, without dependencies (all locked above; pip check proves the lock
# still satisfies pyproject.toml). Editable: the dbt project (dbt_models/) stays next to
# the code that loads it, and its manifest is made here, at build time (no database
# needed), never when Dagster loads.
RUN pip install --no-cache-dir --no-deps -e . \
    && pip check \
    && dbt parse --quiet --project-dir dbt_models --profiles-dir dbt_models \
    && install -d -o iot -g iot dbt_models/target dbt_models/logs \
    && chown -R iot:iot dbt_models/target dbt_models/logs \
    && iot-platform --help >/dev/null \
    && for tool in iot-ingest dagster dagster-webserver dagster-daemon; do \
         command -v "$tool" >/dev/null || exit 1; \
       done

# Mount points of the compose volumes, created here so a fresh named volume is
# initialised owned by `iot` (Docker copies the image directory's owner into it).
RUN install -d -o iot -g iot -m 0750 \
        /var/lib/iot /var/lib/iot/spool /var/lib/iot/dagster_home \
        /var/lib/iot/dagster_home/storage /certs \
    && install -d -o iot -g iot -m 0755 /mosquitto /mosquitto/config /mosquitto/data

USER 10001:10001
WORKDIR /var/lib/iot
CMD ["iot-platform", "--help"]
