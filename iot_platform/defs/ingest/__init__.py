"""Ingest: the raw micro-batches the ingest daemon writes to object storage."""
