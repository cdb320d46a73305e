"""When triggers fire: pure functions of a trigger, its last fire and the time now.

``simple`` triggers fire at ``startTime + k * schedulerInterval`` for k = 0, 1, ... while
``k < repeatCount`` (no repeatCount: forever) and before ``stopTime``. ``cron`` triggers fire
at the times of a cron expression in ``timeZone`` (default UTC), between ``startTime`` and
``stopTime``: five fields (minute hour day-of-month month day-of-week), or Quartz's six or
seven (second first, year last; ``?``, ``L``, ``W``, ``#``, day-of-week 1 = Sunday), as ZStack's
scheduler (Quartz) takes them (:func:`cron_expression`).

Trigger times (``startTime``/``stopTime``) are Unix seconds, as ZStack's: :func:`from_seconds`
and :func:`to_seconds` are the one pair of conversions, :data:`MAX_SECONDS` the bound.

Misfire policy: when the scheduler was down over several fire times, it fires once on return,
for the newest of them, never once per missed time (:func:`due_fire`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from shared.errors import InvalidArgument

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime holds


@dataclass(frozen=True)
class TriggerSpec:
    """What decides a trigger's fire times (the columns of SchedulerTrigger)."""

    schedulerType: str
    schedulerInterval: int | None = None
    repeatCount: int | None = None
    startTime: int | None = None  # Unix seconds
    stopTime: int | None = None  # Unix seconds
    cron: str | None = None
    timeZone: str | None = None


def from_seconds(seconds: int) -> datetime:
    """A trigger time (Unix seconds) as an aware UTC datetime."""
    return EPOCH + timedelta(seconds=seconds)


def to_seconds(moment: datetime) -> int:
    """An aware datetime as a trigger time: whole Unix seconds (rounded down)."""
    return (moment - EPOCH) // timedelta(seconds=1)


def _zone(name: str | None) -> ZoneInfo:
    if name is not None and not isinstance(name, str):
        raise InvalidArgument(detail="timeZone must be a string such as Europe/Berlin")
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidArgument(detail=f"unknown timeZone {name!r}") from None


def validate(spec: TriggerSpec) -> None:
    """InvalidArgument naming the first thing wrong with ``spec``."""
    if spec.schedulerType not in ("simple", "cron"):
        raise InvalidArgument(detail="schedulerType must be simple or cron")
    for name in ("schedulerInterval", "repeatCount", "startTime", "stopTime"):
        value = getattr(spec, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidArgument(detail=f"{name} must be a non-negative integer")
    for name in ("startTime", "stopTime"):
        value = getattr(spec, name)
        if value is not None and value > MAX_SECONDS:
            raise InvalidArgument(
                detail=f"{name} must be Unix seconds before the year 10000 (at most {MAX_SECONDS}), got {value}"
            )
    if spec.repeatCount == 0:
        raise InvalidArgument(detail="repeatCount must be at least 1 (leave it out to repeat forever)")
    if spec.timeZone is not None:
        _zone(spec.timeZone)
    if spec.startTime is not None and spec.stopTime is not None and spec.stopTime <= spec.startTime:
        raise InvalidArgument(detail="stopTime must be after startTime")
    if spec.schedulerType == "simple":
        if not spec.schedulerInterval:
            raise InvalidArgument(detail="a simple trigger needs schedulerInterval (seconds, at least 1)")
        if spec.cron:
            raise InvalidArgument(detail="cron belongs to cron triggers")
        return
    expression, seconds_first = cron_expression(spec.cron)
    if not croniter.is_valid(expression, second_at_beginning=seconds_first):
        raise InvalidArgument(detail=f"cron must be a valid cron expression, got {spec.cron!r}")
    try:
        croniter(expression, datetime(2000, 1, 1, tzinfo=UTC), second_at_beginning=seconds_first).get_next(datetime)
    except CroniterBadDateError:
        raise InvalidArgument(detail=f"cron {spec.cron!r} names no date that exists") from None


QUARTZ_DAY_OF_WEEK = re.compile(r"^(\*|\?|[1-7]|[A-Z]{3})(-([1-7]|[A-Z]{3}))?(/\d+|#[1-5]|L)?$")


def _quartz_day_of_week(field: str, expression: str) -> str:
    """Quartz's day-of-week (1 = Sunday ... 7 = Saturday, ``6L`` the last Friday, ``6#3`` the
    third) in croniter's spelling (0 = Sunday, ``L5``, ``5#3``)."""
    out = []
    for part in field.upper().split(","):
        match = QUARTZ_DAY_OF_WEEK.fullmatch(part)
        if match is None:
            raise InvalidArgument(detail=f"cron {expression!r}: day-of-week {field!r} is not one Quartz accepts")
        first, last, suffix = match.group(1), match.group(3), match.group(4) or ""
        if suffix == "L":
            if last is not None or not first.isdigit():
                raise InvalidArgument(detail=f"cron {expression!r}: {part!r} names no last weekday (1L to 7L)")
            out.append(f"L{_cron_day(first)}")
            continue
        out.append(_cron_day(first) + (f"-{_cron_day(last)}" if last is not None else "") + suffix)
    return ",".join(out)


def _cron_day(day: str) -> str:
    """A Quartz day of the week (1 = Sunday) as croniter's (0 = Sunday); names unchanged."""
    return str(int(day) - 1) if day.isdigit() else day


def cron_expression(text: str | None) -> tuple[str, bool]:
    """A trigger's ``cron`` as croniter reads it, and whether its first field is seconds.

    Five fields are classic cron. Six or seven are Quartz's (ZStack's scheduler): seconds,
    minutes, hours, day-of-month, month, day-of-week, [year]; exactly one of the two day fields
    is ``?``. What croniter cannot compute the same way (``LW``, ``L-3``, a weekday ``W`` list)
    is refused (InvalidArgument), never run differently."""
    if not isinstance(text, str):
        raise InvalidArgument(detail=f"cron must be a cron expression (5 fields, or Quartz's 6 or 7), got {text!r}")
    fields = text.split()
    if len(fields) == 5:
        if "?" in text:
            raise InvalidArgument(detail=f"cron {text!r}: '?' belongs to Quartz's six- or seven-field expressions")
        return " ".join(fields), False
    if len(fields) not in (6, 7):
        raise InvalidArgument(detail=f"cron must have 5 fields, or Quartz's 6 or 7, got {len(fields)} in {text!r}")
    day_of_month, day_of_week = fields[3].upper(), fields[5].upper()
    if (day_of_month == "?") == (day_of_week == "?"):
        raise InvalidArgument(detail=f"cron {text!r}: exactly one of day-of-month and day-of-week must be '?'")
    special = day_of_month not in ("?", "L") and ("W" in day_of_month or "L" in day_of_month)
    if special and not re.fullmatch(r"([1-9]|[12]\d|3[01])W", day_of_month):
        raise InvalidArgument(detail=f"cron {text!r}: day-of-month {fields[3]!r} is not supported (nW or L only)")
    fields[3] = "*" if day_of_month == "?" else day_of_month
    fields[5] = "*" if day_of_week == "?" else _quartz_day_of_week(day_of_week, text)
    return " ".join(fields), True


def _cron(spec: TriggerSpec, base: datetime, *, backwards: bool = False) -> datetime:
    """The next (or previous) time of the trigger's cron expression after ``base``."""
    expression, seconds_first = cron_expression(spec.cron)
    moments = croniter(expression, base, second_at_beginning=seconds_first)
    moment: datetime = moments.get_prev(datetime) if backwards else moments.get_next(datetime)
    return moment


def _start(spec: TriggerSpec, created: datetime) -> datetime:
    return from_seconds(spec.startTime) if spec.startTime is not None else created


def fire_times_after(spec: TriggerSpec, created: datetime, after: datetime | None) -> datetime | None:
    """The first fire time strictly after ``after`` (or the very first one), or None."""
    start = _start(spec, created)
    stop = from_seconds(spec.stopTime) if spec.stopTime is not None else None
    if spec.schedulerType == "simple":
        assert spec.schedulerInterval
        interval = timedelta(seconds=spec.schedulerInterval)
        k = 0 if after is None or after < start else (after - start) // interval + 1
        if spec.repeatCount and k >= spec.repeatCount:
            return None
        moment = start + k * interval
    else:
        zone = _zone(spec.timeZone)
        base = max(start - timedelta(microseconds=1), after) if after is not None else start - timedelta(microseconds=1)
        try:
            moment = _cron(spec, base.astimezone(zone)).astimezone(UTC)
        except (CroniterBadDateError, OverflowError, ValueError, InvalidArgument):
            return None
    if stop is not None and moment >= stop:
        return None
    return moment


def next_fire_times(spec: TriggerSpec, created: datetime, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` fire times strictly after ``after`` (fewer when the trigger ends)."""
    times: list[datetime] = []
    moment: datetime | None = after
    while len(times) < count and moment is not None:
        moment = fire_times_after(spec, created, moment)
        if moment is not None:
            times.append(moment)
    return times


def due_fire(spec: TriggerSpec, created: datetime, last_fire: datetime | None, now: datetime) -> datetime | None:
    """The fire time to run now: the newest one in (last_fire, now], or None. Times missed
    while the scheduler was down collapse into this one fire."""
    moment = fire_times_after(spec, created, last_fire)
    if moment is None or moment > now:
        return None
    if spec.schedulerType == "simple":
        assert spec.schedulerInterval
        start = _start(spec, created)
        interval = timedelta(seconds=spec.schedulerInterval)
        k = (now - start) // interval
        if spec.repeatCount:
            k = min(k, spec.repeatCount - 1)
        if spec.stopTime is not None:
            k = min(k, (from_seconds(spec.stopTime) - start - timedelta(microseconds=1)) // interval)
        return max(moment, start + k * interval)
    until = min(now, from_seconds(spec.stopTime) - timedelta(microseconds=1)) if spec.stopTime else now
    newest = _cron_newest(spec, until)
    return max(moment, newest) if newest is not None else moment


def _cron_newest(spec: TriggerSpec, until: datetime) -> datetime | None:
    """The newest cron time at or before ``until`` (croniter's get_prev, from just after it)."""
    zone = _zone(spec.timeZone)
    try:
        newest = _cron(spec, (until + timedelta(microseconds=1)).astimezone(zone), backwards=True)
    except (CroniterBadDateError, OverflowError, ValueError, InvalidArgument):
        return None
    return newest.astimezone(UTC)


def fire_count(spec: TriggerSpec) -> int | None:
    """How many times the trigger fires at most (None: unbounded)."""
    return spec.repeatCount if spec.schedulerType == "simple" and spec.repeatCount else None
