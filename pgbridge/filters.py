"""Row filters: the ``filter`` of a ``subscribe`` message, validated once and evaluated per row.

A filter is an object ``{column: condition}``; every condition must hold. A condition is a bare
scalar (equality) or an object of operators, all of which must hold: ``eq, neq, lt, lte, gt, gte, in``.

Comparisons are typed, never coercing: numbers with numbers, strings with strings, booleans with
booleans (false < true). Two strings that are both ISO 8601 timestamps (both with a time zone, or
both without) compare as points in time; other strings compare by code point. Values of different
types are never equal and never ordered. ``null`` equals only ``null``; ``neq`` is "is distinct from",
so a null column matches ``{"neq": 5}``; ordering operators never match null. A condition on a
column the published row does not have never matches, so hidden columns cannot be probed.

So that routing costs what the matches cost, a filter names the condition the router can look it up
by (:attr:`RowFilter.index`): the values of an equality or ``in``, else a numeric bound.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from pgbridge.errors import ProtocolError

OPERATORS = ("eq", "neq", "lt", "lte", "gt", "gte", "in")
MAX_CONDITIONS = 32
MAX_IN_VALUES = 100
MAX_DEPTH = 3
"""A filter is at most ``{column: {operator: [values]}}`` deep."""

_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}(:?\d{2})?)?", re.ASCII)
_MISSING = object()

Predicate = Callable[[Any], bool]


@functools.lru_cache(maxsize=4096)  # rows carry the same instants over and over (a created_at, an updated_at)
def _instant(value: str) -> datetime | None:
    if _TIMESTAMP.fullmatch(value):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def value_key(value: Any) -> Hashable:
    """A key under which values that a filter's equality holds equal are equal, and no others.

    Lists and objects get a key of their own that no filter value has: equality never holds for them.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    if isinstance(value, str):
        when = _instant(value)
        if when is not None:
            return ("t", when.tzinfo is not None, when)
        return ("s", value)
    return ("x", id(value))


_NUMBER = (int, float)  # rows are decoded by orjson: exact types, and a bool is never an int here
_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "lt": operator.lt, "lte": operator.le, "gt": operator.gt, "gte": operator.ge,
}  # fmt: skip


def _ordering(op: str, operand: Any) -> Predicate:
    """``row value <op> operand``, typed: a value of another type never matches."""
    before = _ORDER[op]
    if isinstance(operand, bool):
        return lambda v: type(v) is bool and before(v, operand)
    if _is_number(operand):
        return lambda v: type(v) in _NUMBER and before(v, operand)
    instant = _instant(operand)
    if instant is None:
        return lambda v: type(v) is str and before(v, operand)
    aware = instant.tzinfo is not None

    def timed(v: Any) -> bool:
        if type(v) is not str:
            return False
        when = _instant(v)
        if when is not None and (when.tzinfo is not None) == aware:
            return before(when, instant)
        return before(v, operand)  # a timestamp and a string that is not one (or of the other kind): by code point

    return timed


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


@dataclass(frozen=True, slots=True)
class Equality:
    """The filter holds only for rows whose ``column`` has one of these :func:`value_key` keys."""

    column: str
    keys: frozenset[Hashable]


@dataclass(frozen=True, slots=True)
class Bound:
    """The filter holds only for rows whose ``column`` is a number beyond ``value`` on one side."""

    column: str
    value: float
    lower: bool
    """True for ``gt``/``gte`` (the row's value is above), False for ``lt``/``lte``."""
    inclusive: bool


Index = Equality | Bound | None


def _predicate(column: str, op: str, operand: Any) -> tuple[Predicate, Index]:
    def bad(expected: str) -> ProtocolError:
        return ProtocolError(f"Invalid filter: {column}.{op} expects {expected}")

    if op in ("eq", "neq"):
        if not _scalar(operand):
            raise bad("a string, number, boolean or null")
        key = value_key(operand)
        if op == "eq":
            return (lambda v: value_key(v) == key), Equality(column, frozenset((key,)))
        return (lambda v: value_key(v) != key), None
    if op == "in":
        if not isinstance(operand, list) or not operand or len(operand) > MAX_IN_VALUES:
            raise bad(f"a list of 1 to {MAX_IN_VALUES} values")
        if not all(_scalar(x) for x in operand):
            raise bad("a list of strings, numbers, booleans or nulls")
        keys = frozenset(value_key(x) for x in operand)
        return (lambda v: value_key(v) in keys), Equality(column, keys)
    if operand is None or not _scalar(operand):
        raise bad("a string, number or boolean")
    bound = Bound(column, operand, op in ("gt", "gte"), op in ("gte", "lte")) if _is_number(operand) else None
    return _ordering(op, operand), bound


@dataclass(frozen=True, slots=True)
class RowFilter:
    """A validated filter. Equal filters have equal :attr:`key`, so subscribers can share one evaluation."""

    key: bytes
    conditions: tuple[tuple[str, Predicate], ...]
    index: Index = None
    """The condition to look this filter up by: equalities narrow best, then numeric bounds."""
    cost: int = 0
    """What evaluating the filter can cost: its conditions, counting each ``in`` value as one."""

    def matches(self, row: Mapping[str, Any]) -> bool:
        for column, predicate in self.conditions:
            value = row.get(column, _MISSING)
            if value is _MISSING or not predicate(value):
                return False
        return True


MATCH_ALL = RowFilter(b"{}", ())


def compile_filter(spec: object) -> RowFilter:
    """Validate a client's filter; raise :class:`ProtocolError` naming the problem.

    Equal filters (as JSON with sorted keys) compile once: many clients often ask for the same one.
    """
    if spec is None:
        return MATCH_ALL
    if not isinstance(spec, dict):
        raise ProtocolError("Invalid filter: must be an object mapping column names to conditions")
    if _depth(spec, MAX_DEPTH) > MAX_DEPTH:  # before anything recurses into it
        raise ProtocolError(
            f"Invalid filter: nested too deep (at most {MAX_DEPTH} levels: {{column: {{operator: [values]}}}})"
        )
    return _compiled(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS))


def _depth(value: dict[str, Any], limit: int) -> int:
    """How deep ``value`` nests, counted no further than one past ``limit`` (without recursion)."""
    depth = 0
    level: list[Any] = [value]
    while level and depth <= limit:
        depth += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, dict | list)]
    return depth


@functools.lru_cache(maxsize=4096)
def _compiled(key: bytes) -> RowFilter:
    return _compile(orjson.loads(key), key)


def _compile(spec: dict[str, Any], key: bytes) -> RowFilter:
    conditions: list[tuple[str, Predicate]] = []
    indexes: list[Index] = []
    cost = 0
    for column, condition in spec.items():
        if not column:
            raise ProtocolError("Invalid filter: column names must be non-empty strings")
        if isinstance(condition, dict):
            if not condition:
                raise ProtocolError(f"Invalid filter: {column} has no operator")
            for op, operand in condition.items():
                if op not in OPERATORS:
                    raise ProtocolError(
                        f"Invalid filter: unknown operator {op!r} on {column} (use one of {', '.join(OPERATORS)})"
                    )
                predicate, index = _predicate(column, op, operand)
                conditions.append((column, predicate))
                indexes.append(index)
                cost += len(operand) if op == "in" else 1
        elif _scalar(condition):
            predicate, index = _predicate(column, "eq", condition)
            conditions.append((column, predicate))
            indexes.append(index)
            cost += 1
        else:
            raise ProtocolError(f"Invalid filter: {column} must be a value or an object of operators")
    if len(conditions) > MAX_CONDITIONS:
        raise ProtocolError(f"Invalid filter: at most {MAX_CONDITIONS} conditions")
    if not conditions:
        return MATCH_ALL
    equalities = [i for i in indexes if isinstance(i, Equality)]
    bounds = [i for i in indexes if isinstance(i, Bound)]
    best: Index = min(equalities, key=lambda e: len(e.keys)) if equalities else (bounds[0] if bounds else None)
    return RowFilter(key, tuple(conditions), best, cost)
