"""Alerts: one notification per health/PKI check transition (``sensor``)."""
