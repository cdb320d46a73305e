"""The query language of every collection ``GET`` (and of ZStack's ``APIQuery*Msg``), in one place.

A query is a list of conditions, all ANDed, plus paging, sorting and shaping knobs::

    GET /v1/volume-backups?q=size>1000&q=type=Root&sort=-createDate&limit=20&start=0

Conditions
    ``<field><op><value>``, or ``<field> is null`` / ``<field> not null``. Operators:

    ========  ==========================================================================
    ``=``     equal                       ``!=``   not equal
    ``>``     greater than                ``<``    less than
    ``>=``    greater than or equal       ``<=``   less than or equal
    ``?=``    in: the value is split on ``,``; items are verbatim (not trimmed), empty ones
              are dropped, 1 to 1000 must remain
    ``!?=``   not in
    ``~=``    like: ``%`` matches any run of characters, ``_`` any one character;
              ``\\`` escapes the next character (``\\%``, ``\\_``, ``\\\\``), a trailing
              ``\\`` is a literal backslash. Matching ignores case (as ZStack's MySQL does),
              identically on SQLite and PostgreSQL for ASCII letters.
    ``!~=``   not like
    ========  ==========================================================================

    In the REST form the field name ends at the first of ``= ! < > ? ~`` and the longest
    operator starting there wins (``a!?=x`` is "not in", ``a=<x`` is "equals ``<x``").
    ZStack's Java names of operators (``in``, ``not in``, ``like``, ``not like``,
    ``is not null``) are accepted as aliases.

    The negative operators (``!=``, ``!?=``, ``!~=``) are the exact complement of their
    positive twins: they also match rows where the field is null.

Fields
    The wire name of every mapped column of the resource (``metadata`` for the attribute
    ``metadata_``). Secret fields (``model.secret_fields``) do not exist for queries: they can
    be neither tested, sorted, selected nor grouped. JSON fields (``metadata``, ``jobData``,
    ...) can only be tested with ``is null`` / ``not null`` (and selected with ``fields``).
    Values are converted by the column's type: integers (decimal digits, within the column's
    width), booleans (``true`` / ``false``), timestamps (ISO 8601, naive means UTC; or Unix
    milliseconds, i.e. any all-digit value) and text (as given, but never a NUL character).
    Every value reaches the database as a bound parameter; field names never reach it at all
    (they are looked up among the model's mapped columns).

Nested fields
    ``<reference>.<field>`` goes through a relationship of the resource, one level deep:
    ``backupStorageRefs.status!=Ready`` matches backups having *at least one* reference whose
    status is not Ready (an ``EXISTS``); a backup without references matches no nested
    condition.

Tags
    ``__userTag__`` and ``__systemTag__`` test the resource's tags of that kind, with every
    operator. As in ZStack, the positive operators mean "has a tag that ..." and the negative
    ones mean "has no tag that ...": ``__userTag__!=prod`` is every resource not tagged
    ``prod`` (untagged ones included), ``__userTag__ is null`` every resource without user tags.

Knobs
    ``limit`` (0..10000, default 1000), ``start`` (>= 0), ``sort=+field|-field`` (a
    comma-separated list; a bare or space-prefixed name is ascending, since a URL's ``+``
    decodes to a space), ``count=true`` (only the total), ``replyWithCount=true`` (rows and
    the total, which ignores limit and start), ``fields=uuid,name`` (rows as dicts of these
    fields), ``groupBy=<field>`` (grouped counts).

    Without ``sort`` rows come newest first (``createDate`` descending) when the resource has a
    ``createDate``, else by primary key; the primary key always ends the order, so paging with
    ``start``/``limit`` is stable. Nulls sort as the smallest values on every database.

    With ``groupBy`` the items are groups ``{"<field>": value, "count": n}`` instead of rows,
    ordered by count descending then value; ``limit``, ``start``, ``count`` and
    ``replyWithCount`` apply to the groups exactly as they apply to rows (so the total is the
    number of groups), and ``sort`` may name the grouped field or ``count``.

Every mistake in a query raises :class:`~shared.errors.InvalidArgument` (a 400) whose message
names the offending field, operator or parameter.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    Numeric,
    Select,
    SmallInteger,
    String,
    func,
    or_,
    select,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import InstrumentedAttribute, Mapper, RelationshipProperty, Session, aliased
from sqlalchemy.sql.elements import ColumnElement, UnaryExpression
from sqlalchemy.types import JSON

from shared.catalog.models import Base, Tag
from shared.errors import InvalidArgument

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_IN_VALUES",
    "MAX_LIMIT",
    "OPERATORS",
    "SYSTEM_TAG",
    "USER_TAG",
    "Condition",
    "QueryResult",
    "QuerySpec",
    "parse_condition",
    "parse_rest",
    "parse_zstack",
    "run_query",
]

USER_TAG = "__userTag__"
SYSTEM_TAG = "__systemTag__"
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000
MAX_IN_VALUES = 1000
"""Most values one ``?=`` / ``!?=`` condition may list (keeps every statement within SQLite's limits)."""

OPERATORS: tuple[str, ...] = ("=", "!=", ">", "<", ">=", "<=", "?=", "!?=", "~=", "!~=", "is null", "not null")
"""Every operator, in their canonical spelling."""

_SYMBOLIC_LONGEST_FIRST = ("!?=", "!~=", "?=", "~=", "!=", ">=", "<=", "=", ">", "<")
_OP_CHARS = "=!<>?~"
_ALIASES = {"in": "?=", "not in": "!?=", "like": "~=", "not like": "!~=", "is not null": "not null"}
_NEGATIONS = {"!=": "=", "!?=": "?=", "!~=": "~=", "is null": "not null"}
_NULL_FORM = re.compile(r"\s*([^\s=!<>?~]+)\s+(is\s+null|not\s+null|is\s+not\s+null)\s*", re.IGNORECASE)
_OP_RUN = re.compile(r"[=!<>?~]+")
_INT = re.compile(r"[+-]?[0-9]{1,30}")  # bounded: int() refuses very long digit strings
_INT64 = (-(2**63), 2**63 - 1)
_DECODED_PLUS = re.compile(r"(\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d(?::?\d\d)?)$")
_TRUE_FALSE = {"true": True, "false": False}
_SHOW = 120

_Kind = Literal["int", "float", "decimal", "bool", "datetime", "str", "json", "other"]


# -- the request ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    """One condition: ``name`` is a field (``size``), a nested field (``backupStorageRefs.status``)
    or ``__userTag__`` / ``__systemTag__``; ``op`` one of :data:`OPERATORS`; ``value`` the raw
    string of the request (comma-separated for ``?=`` / ``!?=``, ``None`` for the null tests).
    Nothing is checked until :func:`run_query` resolves it against a model."""

    name: str
    op: str
    value: str | None = None


@dataclass
class QuerySpec:
    """Everything a query asks for; :func:`run_query` validates it against the model.

    ``sort`` is a list of ``(field, ascending)``; empty means the model's default order.
    ``limit`` must be 0..:data:`MAX_LIMIT`, ``start`` >= 0.
    """

    conditions: list[Condition] = field(default_factory=list)
    limit: int = DEFAULT_LIMIT
    start: int = 0
    sort: list[tuple[str, bool]] = field(default_factory=list)
    count: bool = False
    reply_with_count: bool = False
    fields: list[str] | None = None
    group_by: str | None = None


@dataclass
class QueryResult:
    """What a query found.

    ``rows``: ORM objects, or dicts of the requested ``fields`` (empty with ``count`` or
    ``group_by``). ``total``: the number of matching rows (of groups with ``group_by``)
    regardless of ``limit``/``start``, set only with ``count`` or ``reply_with_count``.
    ``groups``: with ``group_by`` only, ``[{"<field>": value, "count": n}, ...]``.
    ``fields``: the selected fields' wire names when ``fields`` was asked for.
    """

    rows: list[Any] = field(default_factory=list)
    total: int | None = None
    groups: list[dict[str, Any]] | None = None
    fields: list[str] | None = None


# -- parsing -------------------------------------------------------------------------------------
def _show(text: object) -> str:
    """``text`` quoted for an error message, cut short when long."""
    shown = str(text)
    if len(shown) > _SHOW:
        shown = shown[:_SHOW] + "..."
    return f"'{shown}'"


def _normalize_op(op: object) -> str:
    """The canonical spelling of ``op``; InvalidArgument naming it when it is no operator."""
    if not isinstance(op, str):
        raise InvalidArgument(detail=f"unknown operator {_show(op)}")
    canonical = " ".join(op.split()).lower() if op.strip()[:1].isalpha() else op.strip()
    canonical = _ALIASES.get(canonical, canonical)
    if canonical not in OPERATORS:
        raise InvalidArgument(detail=f"unknown operator {_show(op)}; operators are {', '.join(OPERATORS)}")
    return canonical


def parse_condition(text: str) -> Condition:
    """Parse the REST form of one condition.

    ``"size>1000"``, ``"name~=vm%"``, ``"parentUuid is null"``, ``"uuid?=a,b"``,
    ``"backupStorageRefs.backupStorageUuid=abc"``, ``"__userTag__=prod"``. The field name ends
    at the first operator character and the longest operator starting there wins; the rest is
    the value, verbatim (so ``"name="`` tests for the empty string). Raises InvalidArgument
    when there is no field name or no operator.
    """
    if not isinstance(text, str):
        raise InvalidArgument(detail=f"invalid condition {_show(text)}: expected text")
    null_form = _NULL_FORM.fullmatch(text)
    if null_form:
        return Condition(null_form.group(1), _normalize_op(null_form.group(2)), None)
    position = next((i for i, char in enumerate(text) if char in _OP_CHARS), None)
    if position is None:
        raise InvalidArgument(
            detail=f"invalid condition {_show(text)}: expected <field><operator><value>, e.g. size>1000"
        )
    name = text[:position].strip()
    if not name:
        raise InvalidArgument(detail=f"invalid condition {_show(text)}: no field name")
    for op in _SYMBOLIC_LONGEST_FIRST:
        if text.startswith(op, position):
            return Condition(name, op, text[position + len(op) :])
    run = _OP_RUN.match(text, position)
    raise InvalidArgument(
        detail=f"unknown operator {_show(run.group(0) if run else text[position])} in condition {_show(text)}"
    )


def _parse_int(value: str | int | None, param: str, default: int, low: int, high: int) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(detail=f"{param} must be an integer, got {_show(value)}")
    if isinstance(value, str):
        if not _INT.fullmatch(value.strip()):
            raise InvalidArgument(detail=f"{param} must be an integer, got {_show(value)}")
        value = int(value.strip())
    if not low <= value <= high:
        raise InvalidArgument(detail=f"{param} must be between {low} and {high}, got {value}")
    return value


def _parse_bool(value: str | bool | None, param: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if not text:
            return False
        if text in _TRUE_FALSE:
            return _TRUE_FALSE[text]
    raise InvalidArgument(detail=f"{param} must be true or false, got {_show(value)}")


def _split_names(value: str | Sequence[str] | None, param: str) -> list[str]:
    """Comma-separated names (or a list of such strings), stripped, empty items dropped."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidArgument(detail=f"{param} must be text, got {_show(item)}")
        names.extend(part.strip() for part in item.split(",") if part.strip())
    return names


def _parse_sort(value: str | Sequence[str] | None) -> list[tuple[str, bool]]:
    sort: list[tuple[str, bool]] = []
    for item in _split_names(value, "sort"):
        ascending = not item.startswith("-")
        name = item[1:].strip() if item[0] in "+-" else item
        if not name:
            raise InvalidArgument(detail=f"sort has an item without a field name: {_show(item)}")
        sort.append((name, ascending))
    return sort


def _optional_name(value: str | None, param: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(detail=f"{param} must be a field name, got {_show(value)}")
    return value.strip() or None


def parse_rest(
    q: Sequence[str] | None = None,
    sort: str | Sequence[str] | None = None,
    limit: str | int | None = None,
    start: str | int | None = None,
    count: str | bool | None = None,
    reply_with_count: str | bool | None = None,
    fields: str | Sequence[str] | None = None,
    group_by: str | None = None,
) -> QuerySpec:
    """A :class:`QuerySpec` from the REST query string (``q`` repeated, ``sort``, ``limit``,
    ``start``, ``count``, ``replyWithCount``, ``fields``, ``groupBy``), values as strings.

    Missing or empty parameters take their defaults. ``sort`` is ``+field``/``-field``/``field``,
    comma-separated; ``fields`` comma-separated. Booleans are ``true``/``false`` (any case).
    Raises InvalidArgument naming the offending parameter; field names are checked later, by
    :func:`run_query`.
    """
    if isinstance(q, str):
        q = [q]
    return QuerySpec(
        conditions=[parse_condition(text) for text in q or ()],
        limit=_parse_int(limit, "limit", DEFAULT_LIMIT, 0, MAX_LIMIT),
        start=_parse_int(start, "start", 0, 0, _INT64[1]),
        sort=_parse_sort(sort),
        count=_parse_bool(count, "count"),
        reply_with_count=_parse_bool(reply_with_count, "replyWithCount"),
        fields=_split_names(fields, "fields") or None,
        group_by=_optional_name(group_by, "groupBy"),
    )


def _zstack_value(value: object, index: int) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(item, str | int | float) for item in value):
        return ",".join(str(item) for item in value)
    raise InvalidArgument(detail=f"conditions[{index}].value must be text, got {_show(value)}")


def parse_zstack(params: Mapping[str, Any]) -> QuerySpec:
    """A :class:`QuerySpec` from the parameters of a ZStack query message.

    ``conditions: [{"name", "op", "value"}]`` (a list value is joined with commas, numbers and
    booleans are written as text), ``limit``, ``start``, ``count``, ``replyWithCount``,
    ``groupBy``, ``sortBy`` with ``sortDirection`` (``asc``, the default, or ``desc``) and
    ``fields`` (a list or comma-separated text). Raises InvalidArgument naming the parameter.
    """
    raw_conditions = params.get("conditions") or []
    if not isinstance(raw_conditions, list):
        raise InvalidArgument(detail="conditions must be a list of {name, op, value}")
    conditions: list[Condition] = []
    for index, raw in enumerate(raw_conditions):
        if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not raw.get("name"):
            raise InvalidArgument(detail=f"conditions[{index}] must be an object with a name, op and value")
        op = raw.get("op")
        if not isinstance(op, str):
            raise InvalidArgument(detail=f"conditions[{index}] ({_show(raw['name'])}) has no operator")
        conditions.append(Condition(raw["name"].strip(), _normalize_op(op), _zstack_value(raw.get("value"), index)))
    sort: list[tuple[str, bool]] = []
    sort_by = _optional_name(params.get("sortBy"), "sortBy")
    direction = params.get("sortDirection") or "asc"
    if not isinstance(direction, str) or direction.strip().lower() not in ("asc", "desc"):
        raise InvalidArgument(detail=f"sortDirection must be asc or desc, got {_show(direction)}")
    if sort_by:
        sort.append((sort_by, direction.strip().lower() == "asc"))
    return QuerySpec(
        conditions=conditions,
        limit=_parse_int(params.get("limit"), "limit", DEFAULT_LIMIT, 0, MAX_LIMIT),
        start=_parse_int(params.get("start"), "start", 0, 0, _INT64[1]),
        sort=sort,
        count=_parse_bool(params.get("count"), "count"),
        reply_with_count=_parse_bool(params.get("replyWithCount"), "replyWithCount"),
        fields=_split_names(params.get("fields"), "fields") or None,
        group_by=_optional_name(params.get("groupBy"), "groupBy"),
    )


# -- the model's fields --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Field:
    wire: str
    key: str
    kind: _Kind
    nullable: bool
    bits: int = 64
    """For integers: the column's width (a wider value would fail the database's cast)."""


def _kind(column: Column[Any]) -> _Kind:
    type_ = column.type
    if isinstance(type_, JSON):
        return "json"
    if isinstance(type_, Boolean):
        return "bool"
    if isinstance(type_, Integer):
        return "int"
    if isinstance(type_, Float):
        return "float"
    if isinstance(type_, Numeric):
        return "decimal"
    if isinstance(type_, DateTime):
        return "datetime"
    if isinstance(type_, String):
        return "str"
    return "other"


def _resource(model: type[Base]) -> str:
    return model.resource_type or model.__tablename__


@functools.cache
def _fields(model: type[Base]) -> dict[str, _Field]:
    """Wire name → field, for every mapped column of ``model`` but its secret ones."""
    mapper: Mapper[Any] = sa_inspect(model)
    result: dict[str, _Field] = {}
    for prop in mapper.column_attrs:
        if prop.key in model.secret_fields or len(prop.columns) != 1 or not isinstance(prop.columns[0], Column):
            continue
        column = prop.columns[0]
        wire = prop.key.rstrip("_") if prop.key.endswith("_") else prop.key
        if wire in model.secret_fields:
            continue
        bits = 64 if isinstance(column.type, BigInteger) else 16 if isinstance(column.type, SmallInteger) else 32
        result[wire] = _Field(wire, prop.key, _kind(column), bool(column.nullable), bits)
    return result


@functools.cache
def _relationships(model: type[Base]) -> dict[str, RelationshipProperty[Any]]:
    mapper: Mapper[Any] = sa_inspect(model)
    return {rel.key: rel for rel in mapper.relationships}


def _field(model: type[Base], name: str, purpose: str) -> _Field:
    found = _fields(model).get(name) if isinstance(name, str) else None
    if found is None:
        raise InvalidArgument(detail=f"unknown field {_show(name)} for {_resource(model)}{purpose}")
    return found


def _orderable(model: type[Base], name: str, purpose: str) -> _Field:
    """A top-level field that can be sorted, grouped: anything but JSON."""
    if isinstance(name, str) and "." in name and name.split(".", 1)[0] in _relationships(model):
        raise InvalidArgument(detail=f"field {_show(name)} cannot be used{purpose}: only top-level fields can")
    found = _field(model, name, purpose)
    if found.kind in ("json", "other"):
        raise InvalidArgument(detail=f"field {_show(name)} of {_resource(model)} cannot be used{purpose}")
    return found


def _attr(model: type[Any], key: str) -> InstrumentedAttribute[Any]:
    attr: InstrumentedAttribute[Any] = getattr(model, key)
    return attr


# -- values --------------------------------------------------------------------------------------
def _check_text(value: str, name: str) -> None:
    if "\x00" in value:
        raise InvalidArgument(detail=f"the value for field {_show(name)} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(detail=f"the value for field {_show(name)} is not valid Unicode text") from None


def _to_datetime(text: str, name: str) -> datetime:
    stripped = text.strip()
    try:
        if _INT.fullmatch(stripped):
            return datetime.fromtimestamp(int(stripped) / 1000, UTC)
        # A URL's "+02:00" arrives as " 02:00" when the client did not escape the "+".
        parsed = datetime.fromisoformat(_DECODED_PLUS.sub(r"\1+\2", stripped))
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidArgument(
            detail=f"field {_show(name)} expects a time (ISO 8601 or Unix milliseconds), got {_show(text)}"
        ) from None


def _convert(target: _Field, text: str, name: str) -> Any:
    """``text`` as a Python value of ``target``'s column type; InvalidArgument naming ``name``."""
    _check_text(text, name)
    if target.kind == "str":
        return text
    stripped = text.strip()
    if target.kind == "int":
        limit = 2 ** (target.bits - 1)
        if not _INT.fullmatch(stripped) or not -limit <= int(stripped) < limit:
            raise InvalidArgument(detail=f"field {_show(name)} expects a {target.bits}-bit integer, got {_show(text)}")
        return int(stripped)
    if target.kind == "bool":
        if stripped.lower() not in _TRUE_FALSE:
            raise InvalidArgument(detail=f"field {_show(name)} expects true or false, got {_show(text)}")
        return _TRUE_FALSE[stripped.lower()]
    if target.kind == "datetime":
        return _to_datetime(text, name)
    try:
        number = Decimal(stripped)
    except InvalidOperation:
        number = Decimal("nan")
    if not number.is_finite() or (target.kind == "float" and not math.isfinite(float(number))):
        raise InvalidArgument(detail=f"field {_show(name)} expects a number, got {_show(text)}")
    return float(number) if target.kind == "float" else number


def _like_pattern(text: str) -> str:
    """The user's pattern with ``\\`` as the escape character, made unambiguous for every
    database: ``\\x`` for x other than ``%``, ``_``, ``\\`` becomes ``x``; a trailing ``\\`` a
    literal backslash."""
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "\\":
            out.append(char)
            index += 1
        elif index + 1 == len(text):
            out.append("\\\\")
            index += 1
        else:
            following = text[index + 1]
            out.append("\\" + following if following in "%_\\" else following)
            index += 2
    return "".join(out)


# -- conditions ----------------------------------------------------------------------------------
def _column_clause(
    attr: InstrumentedAttribute[Any], target: _Field, op: str, value: str | None, name: str
) -> ColumnElement[bool]:
    """``op`` applied to one column (``op`` canonical; ``name`` is what messages call it)."""
    if op in ("is null", "not null"):
        if value not in (None, ""):
            raise InvalidArgument(detail=f"operator '{op}' takes no value (field {_show(name)})")
        return attr.is_(None) if op == "is null" else attr.is_not(None)
    if target.kind in ("json", "other"):
        raise InvalidArgument(detail=f"field {_show(name)} can only be tested with 'is null' or 'not null'")
    if value is None:
        raise InvalidArgument(detail=f"operator '{op}' needs a value (field {_show(name)})")
    negative = op in _NEGATIONS
    positive = _NEGATIONS.get(op, op)
    clause: ColumnElement[bool]
    if positive == "?=":
        items = [item for item in value.split(",") if item != ""]
        if not items:
            raise InvalidArgument(detail=f"operator '{op}' needs at least one value (field {_show(name)})")
        if len(items) > MAX_IN_VALUES:
            raise InvalidArgument(detail=f"operator '{op}' takes at most {MAX_IN_VALUES} values (field {_show(name)})")
        clause = attr.in_([_convert(target, item, name) for item in items])
    elif positive == "~=":
        if target.kind != "str":
            raise InvalidArgument(detail=f"operator '{op}' applies to text fields only, not to {_show(name)}")
        _check_text(value, name)
        clause = attr.ilike(_like_pattern(value), escape="\\")
    else:
        if target.kind == "bool" and positive != "=":
            # true and false have no order: SQL would refuse the comparison (a database error)
            raise InvalidArgument(detail=f"operator '{op}' does not apply to the boolean field {_show(name)}")
        converted = _convert(target, value, name)
        comparisons = {
            "=": attr.__eq__,
            ">": attr.__gt__,
            "<": attr.__lt__,
            ">=": attr.__ge__,
            "<=": attr.__le__,
        }
        clause = comparisons[positive](converted)
    if not negative:
        return clause
    return or_(~clause, attr.is_(None)) if target.nullable else ~clause


def _tag_clause(model: type[Base], name: str, op: str, value: str | None) -> ColumnElement[bool]:
    """``EXISTS`` (positive ``op``) or ``NOT EXISTS`` (negative ``op``) a tag of the kind."""
    if "uuid" not in _fields(model):
        raise InvalidArgument(detail=f"{_resource(model)} has no tags: {_show(name)} cannot be queried")
    tag = aliased(Tag)
    positive = _NEGATIONS.get(op, op)
    tag_field = _fields(Tag)["tag"]
    if positive == "not null" and value not in (None, ""):
        raise InvalidArgument(detail=f"operator '{op}' takes no value (field {_show(name)})")
    inner = (
        tag.tag.is_not(None) if positive == "not null" else _column_clause(tag.tag, tag_field, positive, value, name)
    )
    kind = "user" if name == USER_TAG else "system"
    exists = (
        select(tag.uuid)
        .where(tag.resourceUuid == _attr(model, _fields(model)["uuid"].key), tag.type == kind, inner)
        .exists()
    )
    return ~exists if op in _NEGATIONS else exists


def _condition_clause(model: type[Base], condition: Condition) -> ColumnElement[bool]:
    if not isinstance(condition, Condition):
        raise InvalidArgument(detail=f"invalid condition {_show(condition)}")
    name = condition.name
    op = _normalize_op(condition.op)
    if condition.value is not None and not isinstance(condition.value, str):
        raise InvalidArgument(detail=f"the value for field {_show(name)} must be text")
    if name in (USER_TAG, SYSTEM_TAG):
        return _tag_clause(model, name, op, condition.value)
    if isinstance(name, str) and "." in name:
        reference, _, nested = name.partition(".")
        relationship = _relationships(model).get(reference)
        if relationship is None:
            raise InvalidArgument(
                detail=f"unknown field {_show(name)} for {_resource(model)}: no reference {_show(reference)}"
            )
        target_model: type[Base] = relationship.mapper.class_
        found = _fields(target_model).get(nested)
        if found is None:
            raise InvalidArgument(
                detail=f"unknown field {_show(name)} for {_resource(model)}: {reference} has no field {_show(nested)}"
            )
        clause = _column_clause(_attr(target_model, found.key), found, op, condition.value, name)
        relation = _attr(model, relationship.key)
        return relation.any(clause) if relationship.uselist else relation.has(clause)
    found = _field(model, name, "")
    return _column_clause(_attr(model, found.key), found, op, condition.value, name)


# -- ordering ------------------------------------------------------------------------------------
def _ordered(
    attr: ColumnElement[Any] | InstrumentedAttribute[Any], ascending: bool, nullable: bool
) -> UnaryExpression[Any]:
    """Ascending or descending, nulls as the smallest values on every database."""
    if ascending:
        return attr.asc().nulls_first() if nullable else attr.asc()
    return attr.desc().nulls_last() if nullable else attr.desc()


def _order_by(model: type[Base], sort: list[tuple[str, bool]]) -> list[UnaryExpression[Any]]:
    """The requested order (or the default), then every primary-key column not yet in it."""
    mapper: Mapper[Any] = sa_inspect(model)
    requested = sort if sort else ([("createDate", False)] if "createDate" in _fields(model) else [])
    clauses: list[UnaryExpression[Any]] = []
    used: set[str] = set()
    for name, ascending in requested:
        found = _orderable(model, name, " for sorting")
        if found.key in used:
            continue
        used.add(found.key)
        clauses.append(_ordered(_attr(model, found.key), ascending, found.nullable))
    for column in mapper.primary_key:
        prop = mapper.get_property_by_column(column)
        if prop.key not in used:
            used.add(prop.key)
            clauses.append(_attr(model, prop.key).asc())
    return clauses


# -- running -------------------------------------------------------------------------------------
def _check_spec(spec: QuerySpec) -> None:
    if isinstance(spec.limit, bool) or not isinstance(spec.limit, int) or not 0 <= spec.limit <= MAX_LIMIT:
        raise InvalidArgument(detail=f"limit must be between 0 and {MAX_LIMIT}, got {_show(spec.limit)}")
    if isinstance(spec.start, bool) or not isinstance(spec.start, int) or not 0 <= spec.start <= _INT64[1]:
        raise InvalidArgument(detail=f"start must be 0 or more, got {_show(spec.start)}")
    if spec.fields is not None and spec.group_by is not None:
        raise InvalidArgument(detail="fields and groupBy cannot be combined")
    if spec.fields is not None and not spec.fields:
        raise InvalidArgument(detail="fields must name at least one field")


def _base(model: type[Base], base: Select[Any] | None, tag_type_filter: str | None) -> Select[Any]:
    if base is None:
        stmt: Select[Any] = select(model)
    else:
        described = base.column_descriptions
        if len(described) != 1 or described[0].get("entity") is not model:
            raise ValueError(f"base must be select({model.__name__}) with filters, got {described!r}")
        stmt = base.order_by(None)
    if tag_type_filter is not None:
        if model is not Tag or tag_type_filter not in ("user", "system"):
            raise ValueError("tag_type_filter is 'user' or 'system', and only for the Tag model")
        stmt = stmt.where(Tag.type == tag_type_filter)
    return stmt


def _count(session: Session, stmt: Select[Any]) -> int:
    return int(session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0)


def _groups(session: Session, model: type[Base], stmt: Select[Any], spec: QuerySpec) -> QueryResult:
    assert spec.group_by is not None
    grouped = _orderable(model, spec.group_by, " for groupBy")
    column = _attr(model, grouped.key)
    number = func.count().label("group_count")
    orders: list[UnaryExpression[Any]] = []
    used: set[str] = set()
    for name, ascending in spec.sort or [("count", False)]:
        if name not in ("count", grouped.wire):
            raise InvalidArgument(
                detail=f"with groupBy, sort may name only 'count' or {_show(grouped.wire)}, not {_show(name)}"
            )
        if name not in used:
            used.add(name)
            target: ColumnElement[Any] | InstrumentedAttribute[Any] = number if name == "count" else column
            orders.append(_ordered(target, ascending, grouped.nullable and name != "count"))
    if grouped.wire not in used:
        orders.append(_ordered(column, True, grouped.nullable))
    grouping = stmt.with_only_columns(column, number, maintain_column_froms=True).group_by(column)
    result = QueryResult(groups=[])
    if spec.count or spec.reply_with_count:
        result.total = _count(session, grouping)
    if not spec.count and spec.limit > 0:
        page = grouping.order_by(*orders).limit(spec.limit).offset(spec.start)
        result.groups = [{grouped.wire: value, "count": int(n)} for value, n in session.execute(page)]
    return result


def run_query(
    session: Session,
    model: type[Base],
    spec: QuerySpec,
    *,
    base: Select[Any] | None = None,
    tag_type_filter: Literal["user", "system"] | None = None,
) -> QueryResult:
    """Run ``spec`` on the rows of ``model``.

    ``base``: a ``select(model)`` carrying the caller's own filters (a project, an account);
    its ORDER BY is replaced, and it must have no LIMIT/OFFSET. Rows, counts and groups all
    respect it. ``tag_type_filter`` (only for :class:`~shared.catalog.models.Tag`, whose
    ``user-tags`` and ``system-tags`` collections share the table) restricts to that kind.

    Raises InvalidArgument (naming the field, operator or parameter) for anything in ``spec``
    that does not fit ``model``, before any SQL runs; ValueError for a ``base`` or
    ``tag_type_filter`` that does not fit ``model`` (a programming error). One statement per
    part of the result: the page of rows (plus the relationship loads the model declares),
    the total, the groups.
    """
    _check_spec(spec)
    stmt = _base(model, base, tag_type_filter)
    clauses = [_condition_clause(model, condition) for condition in spec.conditions]
    if clauses:
        stmt = stmt.where(*clauses)
    if spec.group_by is not None:
        return _groups(session, model, stmt, spec)
    orders = _order_by(model, spec.sort)
    selected = [_field(model, name, " in fields") for name in dict.fromkeys(spec.fields or [])]
    result = QueryResult(fields=[found.wire for found in selected] if spec.fields is not None else None)
    if spec.count or spec.reply_with_count:
        result.total = _count(session, stmt)
    if spec.count or spec.limit == 0:
        return result
    page = stmt.order_by(*orders).limit(spec.limit).offset(spec.start)
    if spec.fields is None:
        result.rows = list(session.scalars(page).all())
    else:
        columns = [_attr(model, found.key) for found in selected]
        rows = session.execute(page.with_only_columns(*columns, maintain_column_froms=True))
        result.rows = [dict(zip(result.fields or [], row, strict=True)) for row in rows]
    return result
