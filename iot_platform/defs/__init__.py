"""Dagster definitions split by concern: resources, assets, sensors, checks, jobs."""
