"""The real-service fixtures work as the rest of the suite expects."""

from __future__ import annotations

import io
import secrets

import psycopg
import pytest

pytestmark = pytest.mark.integration


def test_postgres_accepts_connections_with_password_only(postgres_server, postgres_db):
    with psycopg.connect(postgres_db) as conn:
        assert conn.execute("SELECT current_user, version()").fetchone()[0] == "iot"
    wrong = postgres_server.conninfo("postgres").replace("password=", "password=x")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong)


def test_s3_server_round_trips_an_object_through_the_minio_sdk(s3_server):
    client = s3_server.client()
    body = secrets.token_bytes(4096)
    key = f"raw/v1/date=2026-01-01/hour=00/{secrets.token_hex(4)}.parquet"
    client.put_object(
        s3_server.bucket,
        key,
        io.BytesIO(body),
        len(body),
        content_type="application/vnd.apache.parquet",
    )
    response = client.get_object(s3_server.bucket, key)
    try:
        assert response.read() == body
    finally:
        response.close()
        response.release_conn()
    listed = [
        o.object_name
        for o in client.list_objects(s3_server.bucket, prefix="raw/v1/", recursive=True)
    ]
    assert key in listed
