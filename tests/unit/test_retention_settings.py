"""Retention settings: defaults, "0 = forever", and the rules between tables."""

from __future__ import annotations

import pytest

from iot_platform.settings import RetentionSettings, SettingsError


def test_defaults_keep_raw_shorter_than_rollups_and_daily_rollups_forever(monkeypatch):
    for name in (
        "IOT_RETENTION_TELEMETRY_DAYS",
        "IOT_RETENTION_TELEMETRY_1M_DAYS",
        "IOT_RETENTION_TELEMETRY_1H_DAYS",
        "IOT_RETENTION_TELEMETRY_1D_DAYS",
        "IOT_RETENTION_LEDGER_DAYS",
        "IOT_HEALTH_RETENTION_DAYS",
        "IOT_TS_MAX_AGE_S",
    ):
        monkeypatch.delenv(name, raising=False)
    s = RetentionSettings.from_env()
    assert s.telemetry is not None and s.telemetry_1m is not None and s.telemetry_1h is not None
    assert s.telemetry < s.telemetry_1m < s.telemetry_1h
    assert s.telemetry_1d is None
    assert s.device_health == 30  # IOT_HEALTH_RETENTION_DAYS, as health evaluation prunes
    assert s.ledger is not None and s.ledger >= 7  # the de-duplication window's default


def test_zero_means_forever(monkeypatch):
    monkeypatch.setenv("IOT_RETENTION_DEVICE_EVENTS_DAYS", "0")
    assert RetentionSettings.from_env().device_events is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"IOT_RETENTION_TELEMETRY_1M_DAYS": "5"}, "IOT_RETENTION_TELEMETRY_1M_DAYS=5"),
        ({"IOT_RETENTION_TELEMETRY_1D_DAYS": "100"}, "IOT_RETENTION_TELEMETRY_1D_DAYS=100"),
        # telemetry kept forever, its minute rollup not: the rollup would be emptied
        ({"IOT_RETENTION_TELEMETRY_DAYS": "0"}, "IOT_RETENTION_TELEMETRY_1M_DAYS"),
        ({"IOT_RETENTION_LEDGER_DAYS": "3"}, "IOT_TS_MAX_AGE_S"),
        ({"IOT_RETENTION_LEDGER_DAYS": "-1"}, "IOT_RETENTION_LEDGER_DAYS"),
    ],
)
def test_a_rule_broken_names_the_variables(monkeypatch, env, named):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=named):
        RetentionSettings.from_env()


def test_a_rollup_may_keep_longer_and_the_ledger_follows_the_dedup_window(monkeypatch):
    monkeypatch.setenv("IOT_RETENTION_TELEMETRY_1H_DAYS", "0")
    monkeypatch.setenv("IOT_TS_MAX_AGE_S", str(2 * 86_400))
    monkeypatch.setenv("IOT_RETENTION_LEDGER_DAYS", "2")
    s = RetentionSettings.from_env()
    assert (s.telemetry_1h, s.ledger) == (None, 2)
