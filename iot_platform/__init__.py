"""IoT platform: the Dagster code location (``iot_platform.definitions``) and its library.

This package's ``__init__`` imports nothing heavy, so the ingest daemon can reuse the
object-store and raw-batch modules without importing Dagster.
"""
