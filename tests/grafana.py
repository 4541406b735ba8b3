"""The dashboards as Grafana reads them, and their SQL as Grafana's PostgreSQL datasource
sends it: template variables first (as the frontend does), then the backend's macros
(grafana/pkg/tsdb/grafana-postgresql-datasource/macros.go: ``$__timeFilter`` ->
``col BETWEEN '<RFC3339Nano>' AND '<RFC3339Nano>'``, ``$__timeGroup`` -> ``time_bucket``
with the datasource's TimescaleDB option, else ``floor(extract(epoch ...))``, ...).
A macro or variable this module does not know fails loudly instead of passing through."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
DATASOURCES_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "iot.yml"
SQL_TYPES = {"grafana-postgresql-datasource", "postgres"}

_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")  # Grafana's own sExpr
_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def datasources() -> dict[str, dict[str, Any]]:
    return {d["uid"]: d for d in yaml.safe_load(DATASOURCES_FILE.read_text())["datasources"]}


@dataclass(frozen=True)
class SqlQuery:
    where: str  # "<file> / <panel title> / <refId>" or "<file> / variable <name>"
    sql: str
    format: str  # table | time_series


def sql_queries() -> Iterator[SqlQuery]:
    """Every SQL the dashboards run: panel targets and query variables."""
    for name, board in dashboards().items():
        for variable in board.get("templating", {}).get("list", []):
            if variable.get("type") == "query" and variable["datasource"]["type"] in SQL_TYPES:
                yield SqlQuery(f"{name} / variable {variable['name']}", variable["query"], "table")
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                if "rawSql" in target:
                    where = f"{name} / {panel['title']} / {target['refId']}"
                    yield SqlQuery(where, target["rawSql"], target.get("format", "time_series"))


def _rfc3339nano(moment: dt.datetime) -> str:
    """Go's time.RFC3339Nano of a UTC time: trailing zeros of the fraction dropped."""
    text = moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def _interval_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d|w)", text.strip().strip("'"))
    if match is None:
        raise ValueError(f"Grafana cannot parse the interval {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _seconds(value: float) -> str:
    """Go's %v of a float64 (60 -> "60", 0.5 -> "0.5")."""
    return f"{value:g}"


def interpolate(
    query: str,
    *,
    start: dt.datetime,
    end: dt.datetime,
    timescaledb: bool,
    variables: Mapping[str, str] | None = None,
) -> str:
    """The SQL Grafana would send for ``query`` over [start, end]."""
    variables = dict(variables or {})

    def variable(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        fmt = match.group(2)
        if name.startswith("__"):
            return match.group(0)  # a macro, handled below
        if name not in variables:
            raise KeyError(f"unknown dashboard variable ${name}")
        value = variables[name]
        if fmt == "sqlstring":
            return "'" + value.replace("'", "''") + "'"
        if fmt is not None:
            raise KeyError(f"variable format {fmt!r} not emulated")
        return value

    text = _VARIABLE.sub(variable, query)

    def macro(match: re.Match[str]) -> str:
        name, args = match.group(1), [a.strip() for a in match.group(2).split(",")]
        if name == "__time":
            return f'{args[0]} AS "time"'
        if name == "__timeEpoch":
            return f'extract(epoch from {args[0]}) as "time"'
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{_rfc3339nano(start)}' AND '{_rfc3339nano(end)}'"
        if name == "__timeFrom":
            return f"'{_rfc3339nano(start)}'"
        if name == "__timeTo":
            return f"'{_rfc3339nano(end)}'"
        if name in ("__timeGroup", "__timeGroupAlias"):
            if len(args) not in (2, 3):
                raise ValueError(f"${name} needs a column and an interval")
            seconds = _interval_seconds(args[1])
            if timescaledb:
                group = f"time_bucket('{seconds:.3f}s',{args[0]})"
            else:
                group = (
                    f"floor(extract(epoch from {args[0]})/{_seconds(seconds)})*{_seconds(seconds)}"
                )
            return group + (' AS "time"' if name == "__timeGroupAlias" else "")
        if name == "__unixEpochFilter":
            lo, hi = int(start.timestamp()), int(end.timestamp())
            return f"{args[0]} >= {lo} AND {args[0]} <= {hi}"
        raise ValueError(f"macro ${name} not emulated")

    text = _MACRO.sub(macro, text)
    if "$" in re.sub(r"\$\$.*?\$\$", "", text, flags=re.S):
        raise ValueError(f"unresolved $ in {text!r}")
    return text
