"""The retry policy shared by every step of the live path (load and rollups)."""

import dagster as dg

# Loads share the warehouse; an outage (PostgreSQL restart, object store down) is retried
# with backoff (5, 10, 20, 40, 80 s) instead of failing the hour. Raising the error is
# what applies the backoff: a bare RetryRequested would retry at once.
LOAD_RETRY = dg.RetryPolicy(max_retries=5, delay=5, backoff=dg.Backoff.EXPONENTIAL)
