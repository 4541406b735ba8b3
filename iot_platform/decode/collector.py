"""Where every family's verdicts go, and the shape of a verdict.

A rule is a ``(condition, reason, detail)`` triple of Polars expressions; a list of them
is applied in order and the first that holds decides (``first_failure``), so each family
states its checks once, in the documented order, and they run vectorised over all rows.
The ``Collector`` gathers accepted rows and rejects keyed by input position (``_row``) and
finally de-duplicates, orders and shapes them into ``DecodedFrames``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from iot_platform.decode.schema import (
    EVENTS_SCHEMA,
    EXCERPT_BYTES,
    MAX_ABS_VALUE,
    MESSAGES_SCHEMA,
    TELEMETRY_SCHEMA,
    DecodedFrames,
)


class Collector:
    def __init__(self, base: pl.DataFrame) -> None:
        self.base = base
        self.rejects: list[pl.DataFrame] = []
        self.telemetry: list[pl.DataFrame] = []
        self.events: list[pl.DataFrame] = []
        self.messages: list[pl.DataFrame] = []
        self.duplicates = 0

    def reject(self, frame: pl.DataFrame) -> None:
        """``frame``: _row, reason, detail."""
        if frame.height:
            self.rejects.append(
                frame.select(
                    pl.col("_row").cast(pl.Int64),
                    pl.col("reason").cast(pl.String),
                    pl.col("detail").cast(pl.String),
                )
            )

    def reject_where(
        self, rows: pl.DataFrame, checks: Sequence[tuple[pl.Expr, str, pl.Expr]]
    ) -> pl.DataFrame:
        """Reject rows by the first failing check; return the rows that pass them all."""
        reason, detail = first_failure(checks)
        flagged = rows.with_columns(_reason=reason, _detail=detail)
        self.reject(
            flagged.filter(pl.col("_reason").is_not_null()).select(
                "_row", reason="_reason", detail="_detail"
            )
        )
        return flagged.filter(pl.col("_reason").is_null()).drop("_reason", "_detail")

    def finish(self) -> DecodedFrames:
        telemetry = _concat(
            self.telemetry, {"_row": pl.Int64, "_pos": pl.Int64, **TELEMETRY_SCHEMA}
        )
        telemetry = telemetry.sort("_row", "_pos", maintain_order=True)
        before = telemetry.height
        telemetry = telemetry.unique(
            subset=["device_id", "metric", "ts"], keep="first", maintain_order=True
        )
        self.duplicates += before - telemetry.height

        events = _concat(self.events, {"_row": pl.Int64, **EVENTS_SCHEMA}).sort(
            "_row", maintain_order=True
        )
        before = events.height
        events = events.unique(
            subset=["device_id", "msg_type", "seq", "ts", "body"], keep="first", maintain_order=True
        )
        self.duplicates += before - events.height

        messages = _concat(self.messages, {"_row": pl.Int64, **MESSAGES_SCHEMA}).sort(
            "_row", maintain_order=True
        )
        rejects = _concat(
            self.rejects, {"_row": pl.Int64, "reason": pl.String, "detail": pl.String}
        ).sort("_row", maintain_order=True)
        rejects = self._reject_rows(rejects)
        return DecodedFrames(
            telemetry=telemetry.select(TELEMETRY_SCHEMA.names()),
            messages=messages.select(MESSAGES_SCHEMA.names()),
            events=events.select(EVENTS_SCHEMA.names()),
            rejects=rejects,
            duplicates=self.duplicates,
        )

    def _reject_rows(self, rejects: pl.DataFrame) -> pl.DataFrame:
        joined = rejects.join(
            self.base.select(
                "_row", "received_at", "topic", pl.col("payload").bin.head(EXCERPT_BYTES)
            ),
            on="_row",
            how="left",
            maintain_order="left",
        )
        # decoding with replacement has no vectorised equivalent; this runs per reject only
        excerpts = [
            bytes(p).decode("utf-8", errors="replace") for p in joined.get_column("payload")
        ]
        nul = "\x00"
        return joined.with_columns(payload_excerpt=pl.Series(excerpts, dtype=pl.String)).select(
            "received_at",
            *[
                pl.col(c).str.replace_all(nul, "\ufffd", literal=True)
                for c in ("topic", "reason", "detail", "payload_excerpt")
            ],
        )


def _concat(parts: list[pl.DataFrame], schema: dict[str, Any]) -> pl.DataFrame:
    """The parts in ``schema``; a column a part lacks (seq of scalar telemetry) is null."""
    if not parts:
        return pl.DataFrame(schema=schema)
    return pl.concat(
        [
            p.select(
                pl.col(c).cast(t) if c in p.columns else pl.lit(None, t).alias(c)
                for c, t in schema.items()
            )
            for p in parts
        ]
    )


def first_failure(checks: Sequence[tuple[pl.Expr, Any, Any]]) -> tuple[pl.Expr, pl.Expr]:
    """(reason, detail) expressions of the first check whose condition holds, else null."""

    def lit(value: Any) -> pl.Expr:
        return value if isinstance(value, pl.Expr) else pl.lit(str(value))

    reason_chain: Any = pl
    detail_chain: Any = pl
    for condition, reason, detail in checks:
        cond = condition.fill_null(False)
        reason_chain = reason_chain.when(cond).then(lit(reason))
        detail_chain = detail_chain.when(cond).then(lit(detail))
    return (
        reason_chain.otherwise(pl.lit(None, pl.String)),
        detail_chain.otherwise(pl.lit(None, pl.String)),
    )


def show(expr: pl.Expr, width: int = 64) -> pl.Expr:
    """A value for a human-readable detail: text, cut to ``width`` characters."""
    return expr.cast(pl.String).str.slice(0, width)


def out_of_range(value: pl.Expr) -> pl.Expr:
    """A reading no family stores: NaN, infinite, or beyond ±MAX_ABS_VALUE."""
    return value.is_nan() | value.is_infinite() | (value.abs() > MAX_ABS_VALUE)
