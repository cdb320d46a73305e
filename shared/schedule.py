"""When triggers fire: pure functions of a trigger, its last fire and the time now.

``simple`` triggers fire at ``startTime + k * schedulerInterval`` for k = 0, 1, ... while
``k < repeatCount`` (no repeatCount: forever) and before ``stopTime``. ``cron`` triggers fire
at the times of a five-field cron expression in ``timeZone`` (default UTC), between
``startTime`` and ``stopTime``.

Misfire policy: when the scheduler was down over several fire times, it fires once on return,
for the newest of them, never once per missed time (:func:`due_fire`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from shared.errors import InvalidArgument

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z, the last instant a datetime holds


@dataclass(frozen=True)
class TriggerSpec:
    """What decides a trigger's fire times (the columns of SchedulerTrigger)."""

    schedulerType: str
    schedulerInterval: int | None = None
    repeatCount: int | None = None
    startTime: int | None = None  # Unix ms
    stopTime: int | None = None  # Unix ms
    cron: str | None = None
    timeZone: str | None = None


def from_ms(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def to_ms(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(milliseconds=1)


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
        if value is not None and value > MAX_MS:
            raise InvalidArgument(detail=f"{name} must be Unix milliseconds before the year 10000")
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
    if not isinstance(spec.cron, str) or len(spec.cron.split()) != 5 or not croniter.is_valid(spec.cron):
        raise InvalidArgument(detail=f"cron must be a valid five-field cron expression, got {spec.cron!r}")
    try:
        croniter(spec.cron, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterBadDateError:
        raise InvalidArgument(detail=f"cron {spec.cron!r} names no date that exists") from None


def _start(spec: TriggerSpec, created: datetime) -> datetime:
    return from_ms(spec.startTime) if spec.startTime is not None else created


def fire_times_after(spec: TriggerSpec, created: datetime, after: datetime | None) -> datetime | None:
    """The first fire time strictly after ``after`` (or the very first one), or None."""
    start = _start(spec, created)
    stop = from_ms(spec.stopTime) if spec.stopTime is not None else None
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
            moment = croniter(spec.cron, base.astimezone(zone)).get_next(datetime).astimezone(UTC)
        except (CroniterBadDateError, OverflowError, ValueError):
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
            k = min(k, (from_ms(spec.stopTime) - start - timedelta(microseconds=1)) // interval)
        return max(moment, start + k * interval)
    until = min(now, from_ms(spec.stopTime) - timedelta(microseconds=1)) if spec.stopTime else now
    newest = _cron_newest(spec, until)
    return max(moment, newest) if newest is not None else moment


def _cron_newest(spec: TriggerSpec, until: datetime) -> datetime | None:
    """The newest cron time at or before ``until`` (croniter's get_prev, from just after it)."""
    zone = _zone(spec.timeZone)
    try:
        newest: datetime = croniter(spec.cron, (until + timedelta(microseconds=1)).astimezone(zone)).get_prev(datetime)
    except (CroniterBadDateError, OverflowError, ValueError):
        return None
    return newest.astimezone(UTC)


def fire_count(spec: TriggerSpec) -> int | None:
    """How many times the trigger fires at most (None: unbounded)."""
    return spec.repeatCount if spec.schedulerType == "simple" and spec.repeatCount else None
