#!/usr/bin/env bash
# The Docker secrets of docker-compose.yml: one file per secret under ./secrets/ (git-
# ignored), each a random value. Creates only what is missing, so running it again never
# changes a secret already in use (the CA passphrase and the PostgreSQL password are fixed
# into the volumes on the first `docker compose up`).
#
# Permissions: compose (without swarm) bind-mounts each file into the containers that use
# it, as is, and those run as other uids (postgres, grafana, 10001): the files are 0644 so
# those processes can read them, inside a directory that only you can enter (0700).
#
#   scripts/compose-secrets.sh            # then: docker compose up -d --build
#
# To choose a value yourself, write the file before running this (no trailing newline
# needed; one is ignored): printf '%s' 'my-passphrase' > secrets/ca_passphrase
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p secrets
chmod 700 secrets
for name in pg_password ca_passphrase minio_root_password s3_secret_key \
            grafana_admin_password grafana_db_password; do
  if [[ -s "secrets/$name" ]]; then
    echo "secrets/$name: kept"
  else
    python3 -c 'import secrets; print(secrets.token_urlsafe(32), end="")' > "secrets/$name"
    chmod 644 "secrets/$name"
    echo "secrets/$name: created"
  fi
done
