"""The filter evaluator agrees with PostgreSQL: random rows, random filters, same answer as SQL."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgbridge.filters import compile_filter

COLUMNS = {"i": "int", "n": "numeric", "t": "text", "b": "boolean", "ts": "timestamptz"}
BASE = datetime(2026, 1, 1, tzinfo=UTC)

ints = st.integers(-5, 5)
numerics = st.decimals(min_value=-3, max_value=3, places=2, allow_nan=False, allow_infinity=False)
texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=3)
bools = st.booleans()
instants = st.integers(0, 6).map(lambda h: BASE + timedelta(hours=h))
VALUES = {"i": ints, "n": numerics, "t": texts, "b": bools, "ts": instants}


def _json_operand(column: str, value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        offset = timezone(timedelta(hours=5, minutes=30))  # a different zone than the rows: compare instants
        return value.astimezone(offset).isoformat()
    return value


rows = st.lists(st.fixed_dictionaries({c: st.none() | s for c, s in VALUES.items()}), min_size=1, max_size=8)


@st.composite
def filters(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for column in draw(st.lists(st.sampled_from(list(COLUMNS)), min_size=1, max_size=3, unique=True)):
        same_type = VALUES[column]
        other = st.sampled_from([c for c in VALUES if c != column]).flatmap(lambda c: VALUES[c])
        operand = st.one_of(same_type, same_type, st.none(), other)
        op = draw(st.sampled_from(["bare", "eq", "neq", "lt", "lte", "gt", "gte", "in"]))
        if op == "in":
            spec[column] = {"in": [_json_operand(column, v) for v in draw(st.lists(operand, min_size=1, max_size=3))]}
            continue
        value = draw(operand)
        if op in ("lt", "lte", "gt", "gte") and value is None:
            value = draw(same_type)
        spec[column] = _json_operand(column, value) if op == "bare" else {op: _json_operand(column, value)}
    return spec


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    try:
        datetime.fromisoformat(value)
        return "timestamp"
    except ValueError:
        return "text"


_COLUMN_KIND = {"i": "number", "n": "number", "t": "text", "b": "boolean", "ts": "timestamp"}


def _sql(spec: dict[str, Any], params: list[Any]) -> str:
    """The filter's documented semantics, written as SQL over typed columns."""

    def literal(column: str, value: Any) -> str:
        if column == "ts" and _kind(value) == "text":
            params.append(value)
            return f"${len(params)}::text"
        if column == "ts":
            params.append(datetime.fromisoformat(value))
        elif column in ("i", "n"):
            params.append(Decimal(str(value)))
            return f"${len(params)}::numeric"
        else:
            params.append(value)
        return f"${len(params)}::{COLUMNS[column]}"

    def compare(column: str, op: str, value: Any) -> str:
        col = f'{column} COLLATE "C"' if column == "t" else column
        if value is None:
            return {"eq": f"{column} IS NULL", "neq": f"{column} IS NOT NULL"}.get(op, "FALSE")
        kind = _kind(value)
        if column == "ts" and kind == "text":  # a timestamp against any other string: as rendered text
            col = "(to_jsonb(ts) #>> '{}') COLLATE \"C\""
        elif kind != _COLUMN_KIND[column] and not (column == "t" and kind == "timestamp"):
            return "TRUE" if op == "neq" else "FALSE"
        sql_op = {"eq": "=", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}.get(op)
        if op == "neq":
            return f"({col} IS DISTINCT FROM {literal(column, value)})"
        return f"coalesce({col} {sql_op} {literal(column, value)}, FALSE)"

    parts = []
    for column, condition in spec.items():
        if not isinstance(condition, dict):
            condition = {"eq": condition}
        for op, value in condition.items():
            if op == "in":
                parts.append("(" + " OR ".join(compare(column, "eq", v) for v in value) + ")")
            else:
                parts.append(compare(column, op, value))
    return " AND ".join(parts)


class Database:
    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(dsn))
        self.loop.run_until_complete(
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS f (id int, " + ", ".join(f"{c} {t}" for c, t in COLUMNS.items()) + ")"
            )
        )

    def check(self, sample: list[dict[str, Any]], spec: dict[str, Any]) -> None:
        async def run() -> None:
            async with self.conn.transaction():
                await self.conn.execute("TRUNCATE f")
                await self.conn.executemany(
                    "INSERT INTO f VALUES ($1, $2, $3, $4, $5, $6)",
                    [(k, r["i"], r["n"], r["t"], r["b"], r["ts"]) for k, r in enumerate(sample)],
                )
                rendered = await self.conn.fetch("SELECT id, to_jsonb(f)::text AS j FROM f")
                params: list[Any] = []
                where = _sql(spec, params)
                expected = {r["id"] for r in await self.conn.fetch(f"SELECT id FROM f WHERE {where}", *params)}
            flt = compile_filter(spec)
            actual = {r["id"] for r in rendered if flt.matches(orjson.loads(r["j"]))}
            assert actual == expected, f"filter {spec} / SQL {where} {params}: python {actual} sql {expected}"

        self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def test_filters_agree_with_postgresql(sync_dsn: str) -> None:
    database = Database(sync_dsn)

    @settings(
        max_examples=int(os.environ.get("PGBRIDGE_FILTER_EXAMPLES", "300")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(rows, filters())
    def agree(sample: list[dict[str, Any]], spec: dict[str, Any]) -> None:
        database.check(sample, spec)

    try:
        agree()
    finally:
        database.close()
