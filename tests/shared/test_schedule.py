"""shared.schedule: when simple and cron triggers fire, and the misfire policy.

Every test drives the pure functions with a fake clock: explicit aware datetimes handed in as
``now``, and each fire that ``due_fire`` returns fed back as the trigger's ``last_fire``, the
way ``shared.service.scheduled_runs.tick`` does. Nothing sleeps and nothing reads the real time.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.errors import InvalidArgument
from shared.schedule import (
    MAX_SECONDS,
    TriggerSpec,
    cron_expression,
    due_fire,
    fire_count,
    fire_times_after,
    from_seconds,
    to_seconds,
    validate,
)

# A fixed "creation time" for the triggers; every other moment is derived from it.
T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
BERLIN = ZoneInfo("Europe/Berlin")


def simple(
    interval: int | None = 60,
    *,
    repeat: int | None = None,
    start: datetime | None = None,
    stop: datetime | None = None,
) -> TriggerSpec:
    return TriggerSpec(
        schedulerType="simple",
        schedulerInterval=interval,
        repeatCount=repeat,
        startTime=None if start is None else to_seconds(start),
        stopTime=None if stop is None else to_seconds(stop),
    )


def cron(
    expression: str,
    *,
    zone: str | None = None,
    start: datetime | None = None,
    stop: datetime | None = None,
) -> TriggerSpec:
    return TriggerSpec(
        schedulerType="cron",
        cron=expression,
        timeZone=zone,
        startTime=None if start is None else to_seconds(start),
        stopTime=None if stop is None else to_seconds(stop),
    )


def clock(start: datetime, end: datetime, step: timedelta) -> Iterable[datetime]:
    """start, start + step, ... up to and including end."""
    moment = start
    while moment <= end:
        yield moment
        moment += step


def run(
    spec: TriggerSpec,
    created: datetime,
    moments: Iterable[datetime],
    last: datetime | None = None,
) -> list[tuple[datetime, datetime]]:
    """Call due_fire at each moment of a fake clock, feeding every fire back as the last one.

    Returns (clock, fire) pairs and checks on the way what must hold at every single step:
    a fire is never at or before the last one, never after the clock, and is the newest fire
    time due (nothing else falls in (fire, clock]); no fire means nothing is due yet."""
    fires: list[tuple[datetime, datetime]] = []
    for now in moments:
        fire = due_fire(spec, created, last, now)
        following = fire_times_after(spec, created, fire if fire is not None else last)
        assert following is None or following > now, (now, fire, following)
        if fire is None:
            continue
        assert fire <= now, (now, fire)
        assert last is None or fire > last, (now, fire, last)
        fires.append((now, fire))
        last = fire
    return fires


def fire_times(pairs: list[tuple[datetime, datetime]]) -> list[datetime]:
    return [fire for _, fire in pairs]


def assert_strictly_increasing(times: list[datetime]) -> None:
    assert all(a < b for a, b in pairwise(times)), times
    assert len(set(times)) == len(times), times


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# --------------------------------------------------------------------------- from_seconds / to_seconds


def test_from_seconds_is_utc_aware() -> None:
    assert from_seconds(0) == utc(1970, 1, 1)
    assert from_seconds(0).tzinfo is UTC
    assert from_seconds(to_seconds(T0)) == T0
    assert from_seconds(1_767_614_400) == utc(2026, 1, 5, 12, 0, 0)
    assert from_seconds(MAX_SECONDS) == utc(9999, 12, 31, 23, 59, 59)


def test_to_seconds_converts_any_aware_datetime_and_drops_fractions() -> None:
    assert to_seconds(utc(1970, 1, 1)) == 0
    assert to_seconds(T0) == 1_767_614_400
    assert to_seconds(T0.astimezone(BERLIN)) == to_seconds(T0)
    assert to_seconds(T0 + timedelta(milliseconds=999)) == to_seconds(T0)
    assert to_seconds(T0 + timedelta(milliseconds=1_999)) == to_seconds(T0) + 1


@given(st.integers(min_value=0, max_value=MAX_SECONDS))
@example(2_187_578_731)  # 2039-04-28 04:45:31 UTC
@example(264_693)  # 1970-01-04 01:31:33 UTC
def test_seconds_round_trip(seconds: int) -> None:
    assert to_seconds(from_seconds(seconds)) == seconds


# --------------------------------------------------------------------------- simple triggers


def test_simple_first_fire_is_start_time() -> None:
    start = T0 + timedelta(hours=1)
    spec = simple(60, start=start)
    assert fire_times_after(spec, T0, None) == start
    assert fire_times_after(spec, T0, T0) == start
    assert fire_times_after(spec, T0, start - timedelta(microseconds=1)) == start
    assert due_fire(spec, T0, None, start - timedelta(microseconds=1)) is None
    assert due_fire(spec, T0, None, start) == start


def test_simple_without_start_time_starts_at_creation() -> None:
    created = T0 + timedelta(seconds=17, milliseconds=250)
    spec = simple(30)
    assert fire_times_after(spec, created, None) == created
    assert due_fire(spec, created, None, created - SECOND) is None
    assert due_fire(spec, created, None, created) == created
    assert fire_times_after(spec, created, created) == created + timedelta(seconds=30)


@pytest.mark.parametrize(
    ("after", "expected_k"),
    [
        (None, 0),
        (timedelta(seconds=-1), 0),
        (timedelta(0), 1),
        (timedelta(microseconds=1), 1),
        (timedelta(seconds=45), 1),
        (timedelta(seconds=90) - timedelta(microseconds=1), 1),
        (timedelta(seconds=90), 2),
        (timedelta(seconds=90, microseconds=1), 2),
        (timedelta(seconds=5 * 90) - timedelta(microseconds=1), 5),
        (timedelta(seconds=5 * 90), 6),
        (timedelta(days=30), 30 * 86400 // 90 + 1),
    ],
)
def test_simple_fires_at_start_plus_multiples_of_interval(after: timedelta | None, expected_k: int) -> None:
    start = T0 + timedelta(minutes=10)
    spec = simple(90, start=start)
    moment = fire_times_after(spec, T0, None if after is None else start + after)
    assert moment == start + expected_k * timedelta(seconds=90)


def test_simple_stepping_the_clock_fires_on_every_interval() -> None:
    spec = simple(7, start=T0)
    pairs = run(spec, T0, clock(T0 - 10 * SECOND, T0 + 70 * SECOND, SECOND))
    assert fire_times(pairs) == [T0 + k * 7 * SECOND for k in range(11)]
    # With a 1 s clock, every fire happens exactly at its time: nothing is late.
    assert all(now == fire for now, fire in pairs)


@pytest.mark.parametrize("repeat", [1, 2, 3, 20])
def test_simple_repeat_count_limits_number_of_fires(repeat: int) -> None:
    start = T0 + timedelta(minutes=1)
    spec = simple(60, repeat=repeat, start=start)
    assert fire_count(spec) == repeat
    # A long window (well beyond repeat * interval) stepped one second at a time.
    pairs = run(spec, T0, clock(T0, T0 + timedelta(hours=2), SECOND))
    assert fire_times(pairs) == [start + k * MINUTE for k in range(repeat)]
    last = start + (repeat - 1) * MINUTE
    assert fire_times_after(spec, T0, last) is None
    assert due_fire(spec, T0, last, T0 + timedelta(days=365)) is None


def test_simple_repeat_count_three_fires_exactly_three_times() -> None:
    spec = simple(5, repeat=3)
    pairs = run(spec, T0, clock(T0, T0 + timedelta(hours=1), SECOND))
    assert fire_times(pairs) == [T0, T0 + 5 * SECOND, T0 + 10 * SECOND]


def test_fire_count() -> None:
    assert fire_count(simple(60)) is None
    assert fire_count(simple(60, repeat=4)) == 4
    assert fire_count(cron("*/5 * * * *")) is None


def test_repeat_count_zero_is_rejected() -> None:
    # The module docstring: simple triggers fire "for k = 0, 1, ... while k < repeatCount
    # (no repeatCount: forever)"; docs/api.md: repeatCount is "at least 1; none: forever". 0 would
    # read as "never" or, falsy, as "forever": it is refused instead.
    with pytest.raises(InvalidArgument) as refused:
        validate(simple(60, repeat=0))
    assert "repeatCount" in str(refused.value)


def test_simple_stop_time_excludes_fires_at_or_after_it() -> None:
    start = T0
    stop = start + 3 * MINUTE  # exactly on the 4th fire time: that one is excluded
    spec = simple(60, start=start, stop=stop)
    pairs = run(spec, T0, clock(T0, T0 + timedelta(hours=1), SECOND))
    assert fire_times(pairs) == [start, start + MINUTE, start + 2 * MINUTE]
    assert fire_times_after(spec, T0, start + 2 * MINUTE) is None

    one_second_later = simple(60, start=start, stop=stop + SECOND)
    pairs = run(one_second_later, T0, clock(T0, T0 + timedelta(hours=1), SECOND))
    assert fire_times(pairs) == [start + k * MINUTE for k in range(4)]


def test_simple_start_time_in_future_nothing_due_before_it() -> None:
    start = T0 + timedelta(hours=6)
    spec = simple(60, start=start)
    assert run(spec, T0, clock(T0, start - SECOND, timedelta(seconds=13))) == []
    assert due_fire(spec, T0, None, start - timedelta(microseconds=1)) is None
    assert due_fire(spec, T0, None, start) == start


def test_simple_stop_time_one_second_after_start_allows_only_the_first_fire() -> None:
    spec = simple(60, start=T0, stop=T0 + SECOND)
    assert due_fire(spec, T0, None, T0) == T0
    assert due_fire(spec, T0, T0, T0 + timedelta(days=10)) is None


def test_simple_misfire_collapses_into_the_newest_missed_time() -> None:
    interval = timedelta(seconds=300)
    spec = simple(300, start=T0)
    t0 = T0 + 4 * interval  # the last fire before the downtime
    now = t0 + 10 * interval
    assert due_fire(spec, T0, t0, now) == t0 + 10 * interval
    # Half an interval later the newest missed time is still t0 + 10 intervals.
    assert due_fire(spec, T0, t0, now + interval / 2) == t0 + 10 * interval
    # Having fired, nothing until the next interval, then exactly that one.
    last = t0 + 10 * interval
    assert run(spec, T0, clock(now, now + interval - SECOND, SECOND), last=last) == []
    assert due_fire(spec, T0, last, now + interval) == t0 + 11 * interval


def test_simple_misfire_over_a_long_downtime_fires_once() -> None:
    spec = simple(60, start=T0)
    t0 = T0 + 3 * MINUTE
    pairs = run(spec, T0, [t0 + timedelta(days=40, seconds=30), t0 + timedelta(days=40, seconds=59)], last=t0)
    assert fire_times(pairs) == [t0 + timedelta(days=40)]


def test_simple_misfire_never_goes_beyond_the_last_allowed_fire() -> None:
    interval = timedelta(seconds=60)
    spec = simple(60, repeat=5, start=T0)
    # Fired once (k=0), then down for 100 intervals: one fire, for k=4, the last allowed.
    assert due_fire(spec, T0, T0, T0 + 100 * interval) == T0 + 4 * interval
    assert due_fire(spec, T0, T0 + 4 * interval, T0 + 1000 * interval) is None
    # Down from before the first fire: the same single fire.
    assert due_fire(spec, T0, None, T0 + 100 * interval) == T0 + 4 * interval
    # Down in the middle of the allowed fires.
    assert due_fire(spec, T0, T0 + 2 * interval, T0 + 3 * interval + SECOND) == T0 + 3 * interval


def test_simple_misfire_never_goes_beyond_stop_time() -> None:
    interval = timedelta(seconds=60)
    stop = T0 + 5 * interval + SECOND
    spec = simple(60, start=T0, stop=stop)
    assert due_fire(spec, T0, T0, T0 + 100 * interval) == T0 + 5 * interval
    assert due_fire(spec, T0, T0 + 5 * interval, T0 + 100 * interval) is None
    exact = simple(60, start=T0, stop=T0 + 5 * interval)
    assert due_fire(exact, T0, T0, T0 + 100 * interval) == T0 + 4 * interval
    # repeatCount and stopTime together: the tighter bound wins.
    both = simple(60, repeat=3, start=T0, stop=stop)
    assert due_fire(both, T0, None, T0 + 100 * interval) == T0 + 2 * interval
    both = simple(60, repeat=30, start=T0, stop=stop)
    assert due_fire(both, T0, None, T0 + 100 * interval) == T0 + 5 * interval


def test_simple_clock_behind_last_fire_returns_nothing() -> None:
    spec = simple(60, start=T0)
    last = T0 + 10 * MINUTE
    for now in (last, last - SECOND, T0, T0 - timedelta(days=1)):
        assert due_fire(spec, T0, last, now) is None


def test_simple_last_fire_off_the_grid() -> None:
    # A last fire that is not start + k*interval (say, the trigger's interval was edited).
    spec = simple(60, start=T0)
    last = T0 + timedelta(seconds=150)
    assert fire_times_after(spec, T0, last) == T0 + 3 * MINUTE
    assert due_fire(spec, T0, last, T0 + 3 * MINUTE - SECOND) is None
    assert due_fire(spec, T0, last, T0 + 3 * MINUTE) == T0 + 3 * MINUTE
    assert due_fire(spec, T0, last, T0 + 10 * MINUTE + SECOND) == T0 + 10 * MINUTE


def test_simple_due_fire_never_after_now_nor_at_or_before_last() -> None:
    spec = simple(45, repeat=12, start=T0 + timedelta(seconds=20), stop=T0 + timedelta(minutes=8))
    lasts: list[datetime | None] = [None, *clock(T0 - MINUTE, T0 + timedelta(minutes=10), timedelta(seconds=7))]
    for last in lasts:
        for now in clock(T0 - MINUTE, T0 + timedelta(minutes=10), timedelta(seconds=11)):
            fire = due_fire(spec, T0, last, now)
            if fire is None:
                continue
            assert fire <= now
            assert last is None or fire > last
            assert (fire - (T0 + timedelta(seconds=20))) % timedelta(seconds=45) == timedelta(0)


# --------------------------------------------------------------------------- cron triggers


def test_cron_every_five_minutes_fires_on_minute_multiples_of_five() -> None:
    spec = cron("*/5 * * * *")
    created = T0 + timedelta(seconds=1)  # 12:00:01: 12:00 is before the trigger existed
    pairs = run(spec, created, clock(created, T0 + timedelta(hours=2, seconds=1), timedelta(seconds=20)))
    times = fire_times(pairs)
    assert times == [T0 + k * 5 * MINUTE for k in range(1, 25)]
    assert all(t.minute % 5 == 0 and t.second == 0 and t.microsecond == 0 for t in times)
    assert fire_times_after(spec, created, T0 + timedelta(minutes=3, seconds=17)) == T0 + 5 * MINUTE
    assert fire_times_after(spec, created, T0 + 5 * MINUTE) == T0 + 10 * MINUTE


def test_cron_first_fire_may_be_the_creation_moment_itself() -> None:
    spec = cron("*/5 * * * *")
    assert fire_times_after(spec, T0, None) == T0
    assert due_fire(spec, T0, None, T0) == T0


def test_cron_default_time_zone_is_utc() -> None:
    assert fire_times_after(cron("30 2 * * *"), T0, None) == utc(2026, 1, 6, 2, 30)
    assert fire_times_after(cron("30 2 * * *", zone="UTC"), T0, None) == utc(2026, 1, 6, 2, 30)


@pytest.mark.parametrize(
    ("day", "expected"),
    [
        (utc(2026, 1, 15), utc(2026, 1, 15, 1, 30)),  # CET, UTC+1
        (utc(2026, 3, 28), utc(2026, 3, 28, 1, 30)),  # the last winter day
        (utc(2026, 3, 30), utc(2026, 3, 30, 0, 30)),  # the first whole summer day
        (utc(2026, 7, 15), utc(2026, 7, 15, 0, 30)),  # CEST, UTC+2
        (utc(2026, 10, 24), utc(2026, 10, 24, 0, 30)),  # the last whole summer day
        (utc(2026, 10, 26), utc(2026, 10, 26, 1, 30)),  # the first winter day
        (utc(2026, 12, 24), utc(2026, 12, 24, 1, 30)),
    ],
)
def test_cron_in_berlin_follows_local_time(day: datetime, expected: datetime) -> None:
    spec = cron("30 2 * * *", zone="Europe/Berlin")
    created = day - timedelta(days=30)
    assert fire_times_after(spec, created, day - timedelta(hours=3)) == expected
    assert expected.astimezone(BERLIN).strftime("%H:%M") == "02:30"


def berlin_daily(start: datetime, end: datetime, expression: str = "30 2 * * *") -> list[datetime]:
    spec = cron(expression, zone="Europe/Berlin")
    times = fire_times(run(spec, start, clock(start, end, 5 * MINUTE)))
    assert_strictly_increasing(times)
    return times


def test_cron_berlin_spring_forward_day() -> None:
    # 2026-03-29: at 02:00 CET the clocks jump to 03:00 CEST, so 02:30 local does not exist.
    # croniter fires at the moment the clocks jump (03:00 CEST = 01:00 UTC): the day still
    # gets its one fire, at the first local time after the missing 02:30.
    times = berlin_daily(utc(2026, 3, 26), utc(2026, 4, 1))
    assert times == [
        utc(2026, 3, 26, 1, 30),
        utc(2026, 3, 27, 1, 30),
        utc(2026, 3, 28, 1, 30),
        utc(2026, 3, 29, 1, 0),
        utc(2026, 3, 30, 0, 30),
        utc(2026, 3, 31, 0, 30),
    ]
    local_days = [t.astimezone(BERLIN).date() for t in times]
    assert len(set(local_days)) == len(local_days)  # one fire per local day, no day skipped
    assert times[3].astimezone(BERLIN).strftime("%H:%M %Z") == "03:00 CEST"


def test_cron_berlin_spring_forward_no_fire_lost_around_the_gap() -> None:
    # Whatever croniter does about 02:30, the fires just before and after the gap stay put.
    assert berlin_daily(utc(2026, 3, 28, 12), utc(2026, 3, 30, 12), "30 1 * * *") == [
        utc(2026, 3, 29, 0, 30),  # 01:30 CET
        utc(2026, 3, 29, 23, 30),  # 01:30 CEST on the 30th
    ]
    assert berlin_daily(utc(2026, 3, 28, 12), utc(2026, 3, 30, 12), "30 3 * * *") == [
        utc(2026, 3, 29, 1, 30),  # 03:30 CEST
        utc(2026, 3, 30, 1, 30),
    ]


def test_cron_berlin_fall_back_day() -> None:
    # 2026-10-25: at 03:00 CEST the clocks go back to 02:00 CET, so 02:30 local happens twice.
    # croniter fires at both of them (00:30 UTC in CEST and 01:30 UTC in CET): two distinct,
    # increasing instants; a daily 02:30 trigger runs twice on that day (Vixie cron would run
    # it once). Every other day has exactly one fire.
    times = berlin_daily(utc(2026, 10, 22), utc(2026, 10, 28))
    assert times == [
        utc(2026, 10, 22, 0, 30),
        utc(2026, 10, 23, 0, 30),
        utc(2026, 10, 24, 0, 30),
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 25, 1, 30),
        utc(2026, 10, 26, 1, 30),
        utc(2026, 10, 27, 1, 30),
    ]
    assert all(t.astimezone(BERLIN).strftime("%H:%M") == "02:30" for t in times)


def test_cron_berlin_fall_back_outside_the_repeated_hour_fires_once() -> None:
    assert berlin_daily(utc(2026, 10, 24, 12), utc(2026, 10, 26, 12), "30 1 * * *") == [
        utc(2026, 10, 24, 23, 30),  # 01:30 CEST on the 25th
        utc(2026, 10, 26, 0, 30),  # 01:30 CET on the 26th
    ]
    assert berlin_daily(utc(2026, 10, 24, 12), utc(2026, 10, 26, 12), "30 3 * * *") == [
        utc(2026, 10, 25, 2, 30),  # 03:30 CET
        utc(2026, 10, 26, 2, 30),
    ]


@pytest.mark.parametrize("day", [utc(2026, 3, 28, 12), utc(2026, 10, 24, 12)])
def test_cron_berlin_hourly_is_every_utc_hour_across_dst(day: datetime) -> None:
    times = berlin_daily(day, day + timedelta(days=1), "0 * * * *")
    assert times == [day + k * timedelta(hours=1) for k in range(25)]


def test_cron_start_and_stop_time_bound_the_fires() -> None:
    start = T0 + timedelta(minutes=7)
    stop = T0 + timedelta(minutes=30)  # exactly a fire time: excluded
    spec = cron("*/5 * * * *", start=start, stop=stop)
    pairs = run(spec, T0, clock(T0, T0 + timedelta(hours=1), timedelta(seconds=30)))
    assert fire_times(pairs) == [T0 + timedelta(minutes=m) for m in (10, 15, 20, 25)]
    assert fire_times_after(spec, T0, T0 + timedelta(minutes=25)) is None


def test_cron_start_time_on_a_fire_time_is_inclusive() -> None:
    start = T0 + timedelta(minutes=10)
    spec = cron("*/5 * * * *", start=start)
    assert fire_times_after(spec, T0, None) == start
    assert fire_times_after(spec, T0, T0) == start
    assert due_fire(spec, T0, None, start - timedelta(microseconds=1)) is None
    assert due_fire(spec, T0, None, start) == start


def test_cron_start_time_in_future_nothing_due_before_it() -> None:
    start = T0 + timedelta(days=2, minutes=2)
    spec = cron("*/5 * * * *", start=start)
    assert run(spec, T0, clock(T0, start - timedelta(microseconds=1), timedelta(minutes=7))) == []
    assert due_fire(spec, T0, None, start + 3 * MINUTE) == start + 3 * MINUTE


def test_cron_misfire_after_three_days_fires_once_for_the_newest() -> None:
    spec = cron("*/5 * * * *")
    last = T0
    now = T0 + timedelta(days=3, minutes=2, seconds=30)
    assert due_fire(spec, T0, last, now) == T0 + timedelta(days=3)
    newest = T0 + timedelta(days=3)
    # Then nothing until the next fire time, which fires on time.
    later = clock(now, T0 + timedelta(days=3, minutes=5), timedelta(seconds=10))
    assert fire_times(run(spec, T0, later, last=newest)) == [T0 + timedelta(days=3, minutes=5)]


def test_cron_misfire_in_berlin_after_three_days_spanning_dst() -> None:
    spec = cron("30 2 * * *", zone="Europe/Berlin")
    last = utc(2026, 3, 27, 1, 30)
    now = utc(2026, 3, 30, 9, 0)  # missed 28th, 29th (the shifted one), 30th
    assert due_fire(spec, last, last, now) == utc(2026, 3, 30, 0, 30)
    assert due_fire(spec, last, utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 29)) is None


def test_cron_misfire_never_goes_beyond_stop_time() -> None:
    stop = T0 + timedelta(hours=1, minutes=2)
    spec = cron("*/5 * * * *", stop=stop)
    assert due_fire(spec, T0, T0, T0 + timedelta(days=3)) == T0 + timedelta(hours=1)
    assert due_fire(spec, T0, T0 + timedelta(hours=1), T0 + timedelta(days=30)) is None


def test_cron_misfire_never_earlier_than_start_time() -> None:
    start = T0 + timedelta(days=1, minutes=1)
    spec = cron("0 * * * *", start=start)
    assert due_fire(spec, T0, None, start + timedelta(minutes=58)) is None
    assert due_fire(spec, T0, None, start + timedelta(days=2)) == T0 + timedelta(days=3)


def test_cron_misfire_after_a_long_downtime_still_fires_once_for_the_newest() -> None:
    # The docstring promises one fire for the newest missed time, never one per missed time:
    # an every-minute trigger down for 30 days (43,200 missed times) fires once, for the newest.
    spec = cron("* * * * *")
    now = T0 + timedelta(days=30, seconds=30)
    assert due_fire(spec, T0, T0, now) == T0 + timedelta(days=30)
    assert due_fire(spec, T0, T0 + timedelta(days=30), now) is None


# --------------------------------------------------------------------------- validate()


VALID: list[dict[str, Any]] = [
    {"schedulerType": "simple", "schedulerInterval": 1},
    {"schedulerType": "simple", "schedulerInterval": 3600, "repeatCount": 5},
    {"schedulerType": "simple", "schedulerInterval": 60, "startTime": 0, "stopTime": 1},
    {"schedulerType": "simple", "schedulerInterval": 60, "startTime": to_seconds(T0), "stopTime": to_seconds(T0) + 1},
    {"schedulerType": "simple", "schedulerInterval": 60, "stopTime": to_seconds(T0)},
    {"schedulerType": "simple", "schedulerInterval": 60, "cron": ""},
    {"schedulerType": "cron", "cron": "*/5 * * * *"},
    {"schedulerType": "cron", "cron": "30 2 * * *", "timeZone": "Europe/Berlin"},
    {"schedulerType": "cron", "cron": "0 0 * * MON", "timeZone": "UTC"},
    {"schedulerType": "cron", "cron": "0 0 * * 7", "timeZone": "America/New_York"},
    {"schedulerType": "cron", "cron": "0 12 1-7 JAN-MAR *", "startTime": 1, "stopTime": 2},
    {"schedulerType": "cron", "cron": "  0   12 * * *  "},
]


@pytest.mark.parametrize("fields", VALID)
def test_validate_accepts(fields: dict[str, Any]) -> None:
    validate(TriggerSpec(**fields))


INVALID: list[tuple[dict[str, Any], str]] = [
    # schedulerType
    ({"schedulerType": "weekly", "schedulerInterval": 60}, "schedulerType"),
    ({"schedulerType": "", "schedulerInterval": 60}, "schedulerType"),
    ({"schedulerType": "Simple", "schedulerInterval": 60}, "schedulerType"),
    ({"schedulerType": None, "schedulerInterval": 60}, "schedulerType"),
    # schedulerInterval
    ({"schedulerType": "simple"}, "schedulerInterval"),
    ({"schedulerType": "simple", "schedulerInterval": 0}, "schedulerInterval"),
    ({"schedulerType": "simple", "schedulerInterval": -1}, "schedulerInterval"),
    ({"schedulerType": "simple", "schedulerInterval": True}, "schedulerInterval"),
    ({"schedulerType": "simple", "schedulerInterval": False}, "schedulerInterval"),
    ({"schedulerType": "simple", "schedulerInterval": 1.5}, "schedulerInterval"),
    ({"schedulerType": "simple", "schedulerInterval": "60"}, "schedulerInterval"),
    ({"schedulerType": "cron", "cron": "* * * * *", "schedulerInterval": -5}, "schedulerInterval"),
    # repeatCount
    ({"schedulerType": "simple", "schedulerInterval": 60, "repeatCount": -1}, "repeatCount"),
    ({"schedulerType": "simple", "schedulerInterval": 60, "repeatCount": True}, "repeatCount"),
    ({"schedulerType": "simple", "schedulerInterval": 60, "repeatCount": 2.0}, "repeatCount"),
    # startTime / stopTime
    ({"schedulerType": "simple", "schedulerInterval": 60, "startTime": -1}, "startTime"),
    ({"schedulerType": "simple", "schedulerInterval": 60, "startTime": False}, "startTime"),
    ({"schedulerType": "simple", "schedulerInterval": 60, "startTime": "0"}, "startTime"),
    ({"schedulerType": "simple", "schedulerInterval": 60, "stopTime": -1}, "stopTime"),
    ({"schedulerType": "simple", "schedulerInterval": 60, "stopTime": True}, "stopTime"),
    ({"schedulerType": "simple", "schedulerInterval": 60, "startTime": 1000, "stopTime": 1000}, "stopTime"),
    ({"schedulerType": "simple", "schedulerInterval": 60, "startTime": 1000, "stopTime": 999}, "stopTime"),
    ({"schedulerType": "cron", "cron": "* * * * *", "startTime": 5, "stopTime": 0}, "stopTime"),
    # cron
    ({"schedulerType": "cron"}, "cron"),
    ({"schedulerType": "cron", "cron": ""}, "cron"),
    ({"schedulerType": "cron", "cron": "   "}, "cron"),
    ({"schedulerType": "cron", "cron": "garbage"}, "cron"),
    ({"schedulerType": "cron", "cron": "* * * *"}, "cron"),
    ({"schedulerType": "cron", "cron": "0 */5 * * * *"}, "cron"),  # six fields (seconds)
    ({"schedulerType": "cron", "cron": "* * * * * * *"}, "cron"),
    ({"schedulerType": "cron", "cron": "61 * * * *"}, "cron"),
    ({"schedulerType": "cron", "cron": "* 24 * * *"}, "cron"),
    ({"schedulerType": "cron", "cron": "*/0 * * * *"}, "cron"),
    ({"schedulerType": "cron", "cron": "* * * * 8"}, "cron"),
    ({"schedulerType": "cron", "cron": "@daily"}, "cron"),
    ({"schedulerType": "cron", "cron": "H * * * *"}, "cron"),
    ({"schedulerType": "simple", "schedulerInterval": 60, "cron": "*/5 * * * *"}, "cron"),
    # timeZone
    ({"schedulerType": "cron", "cron": "* * * * *", "timeZone": "Mars/Olympus_Mons"}, "timeZone"),
    ({"schedulerType": "cron", "cron": "* * * * *", "timeZone": "Europe"}, "timeZone"),
    ({"schedulerType": "cron", "cron": "* * * * *", "timeZone": "europe/berlin"}, "timeZone"),
    ({"schedulerType": "cron", "cron": "* * * * *", "timeZone": "Europe/Berlin "}, "timeZone"),
    ({"schedulerType": "cron", "cron": "* * * * *", "timeZone": "../../etc/passwd"}, "timeZone"),
    ({"schedulerType": "cron", "cron": "* * * * *", "timeZone": "/etc/localtime"}, "timeZone"),
    ({"schedulerType": "cron", "cron": "* * * * *", "timeZone": "UTC\x00"}, "timeZone"),
]


@pytest.mark.parametrize(("fields", "field"), INVALID)
def test_validate_rejects_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate(TriggerSpec(**fields))
    assert field in str(caught.value)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.http_status == 400


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        # Trigger parameters arrive as decoded JSON (shared.service.jobgroups.create_trigger passes them on
        # unchecked), so a wrongly typed value must be an InvalidArgument, not a crash.
        ({"schedulerType": "cron", "cron": 5}, "cron"),
        ({"schedulerType": "cron", "cron": ["*", "*", "*", "*", "*"]}, "cron"),
        ({"schedulerType": "cron", "cron": "* * * * *", "timeZone": 5}, "timeZone"),
    ],
)
def test_validate_rejects_wrongly_typed_cron_fields(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate(TriggerSpec(**fields))
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        # Cron expressions that are well formed but name no date that exists.
        ({"schedulerType": "cron", "cron": "0 0 31 2 *"}, "cron"),
        ({"schedulerType": "cron", "cron": "0 0 30 2 *"}, "cron"),
        # Times validate() lets through but datetime cannot represent (stopTime=Long.MAX_VALUE
        # is a common way of saying "never stop").
        ({"schedulerType": "simple", "schedulerInterval": 60, "stopTime": 2**63 - 1}, "stopTime"),
        ({"schedulerType": "simple", "schedulerInterval": 60, "startTime": 10**18}, "startTime"),
        ({"schedulerType": "cron", "cron": "* * * * *", "stopTime": 2**63 - 1}, "stopTime"),
    ],
)
def test_a_trigger_the_schedule_cannot_compute_is_refused(fields: dict[str, Any], field: str) -> None:
    # An exception out of fire_times_after/due_fire would abort shared.service.scheduled_runs.tick
    # for every other trigger too, so validate() refuses these (docs/scheduling.md), naming the field.
    with pytest.raises(InvalidArgument) as refused:
        validate(TriggerSpec(**fields))
    assert field in str(refused.value)


# --------------------------------------------------------------------------- properties

HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Each cron step may walk hundreds of missed times through croniter: fewer, slower examples.
HYPOTHESIS_CRON = settings(HYPOTHESIS, max_examples=100)


@st.composite
def simple_specs(draw: st.DrawFn) -> TriggerSpec:
    interval = draw(st.integers(min_value=1, max_value=3600))
    repeat = draw(st.none() | st.integers(min_value=1, max_value=20))
    start_offset = draw(st.none() | st.integers(min_value=-2 * 86400, max_value=2 * 86400))
    start = None if start_offset is None else to_seconds(T0) + start_offset
    stop = None
    if draw(st.booleans()):
        stop = (start if start is not None else to_seconds(T0)) + draw(st.integers(min_value=1, max_value=40 * 3600))
    spec = TriggerSpec(
        schedulerType="simple", schedulerInterval=interval, repeatCount=repeat, startTime=start, stopTime=stop
    )
    validate(spec)
    return spec


@HYPOTHESIS
@given(
    spec=simple_specs(),
    created_offset_ms=st.integers(min_value=-86400 * 1000, max_value=86400 * 1000),
    first_ms=st.integers(min_value=-3 * 86400 * 1000, max_value=3 * 86400 * 1000),
    steps_ms=st.lists(st.integers(min_value=0, max_value=4 * 3600 * 1000), min_size=1, max_size=60),
)
def test_property_simple_fires_on_the_grid_increasing_and_bounded(
    spec: TriggerSpec, created_offset_ms: int, first_ms: int, steps_ms: list[int]
) -> None:
    created = T0 + timedelta(milliseconds=created_offset_ms)
    start = from_seconds(spec.startTime) if spec.startTime is not None else created
    interval = timedelta(seconds=spec.schedulerInterval or 0)
    stop = from_seconds(spec.stopTime) if spec.stopTime is not None else None

    moments = [T0 + timedelta(milliseconds=first_ms)]
    for step in steps_ms:
        moments.append(moments[-1] + timedelta(milliseconds=step))

    last: datetime | None = None
    fires: list[datetime] = []
    for now in moments:
        fire = due_fire(spec, created, last, now)
        if fire is None:
            # Nothing due means nothing to catch up on.
            following = fire_times_after(spec, created, last)
            assert following is None or following > now
            continue
        assert fire <= now
        assert last is None or fire > last
        k, remainder = divmod(fire - start, interval)
        assert remainder == timedelta(0), (fire, start, interval)
        assert k >= 0
        if spec.repeatCount is not None:
            assert k < spec.repeatCount
        if stop is not None:
            assert fire < stop
        # Misfire policy: the fire is the newest one due, nothing else is left in (fire, now].
        following = fire_times_after(spec, created, fire)
        assert following is None or following > now
        fires.append(fire)
        last = fire

    assert_strictly_increasing(fires)
    if spec.repeatCount is not None:
        assert len(fires) <= spec.repeatCount


CRON_EXPRESSIONS = ["*/5 * * * *", "30 2 * * *", "0 * * * *", "15,45 1-3 * * *", "0 0 * * 0", "*/7 2 * * *"]
ZONES = [None, "UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
# Days with a DST change in one of the zones above, so the property runs across the gaps/overlaps.
DST_DAYS = [
    utc(2026, 3, 8),  # New York spring forward
    utc(2026, 3, 28),  # Berlin spring forward (29th)
    utc(2026, 4, 4),  # Lord Howe goes back 30 minutes (5th)
    utc(2026, 10, 3),  # Lord Howe goes forward 30 minutes (4th)
    utc(2026, 10, 24),  # Berlin fall back (25th)
    utc(2026, 11, 1),  # New York fall back
]


@HYPOTHESIS_CRON
@given(
    expression=st.sampled_from(CRON_EXPRESSIONS),
    zone=st.sampled_from(ZONES),
    day=st.sampled_from(DST_DAYS),
    first_minutes=st.integers(min_value=-24 * 60, max_value=24 * 60),
    steps_s=st.lists(st.integers(min_value=1, max_value=36 * 3600), min_size=1, max_size=40),
)
def test_property_cron_fires_increasing_newest_and_never_after_the_clock(
    expression: str, zone: str | None, day: datetime, first_minutes: int, steps_s: list[int]
) -> None:
    spec = cron(expression, zone=zone)
    validate(spec)
    created = day - timedelta(days=2)
    moments = [day + timedelta(minutes=first_minutes)]
    for step in steps_s:
        moments.append(moments[-1] + timedelta(seconds=step))
    pairs = run(spec, created, moments)
    times = fire_times(pairs)
    assert_strictly_increasing(times)
    for fire in times:
        assert fire.second == 0 and fire.microsecond == 0
        assert fire >= created


def test_property_cron_every_fire_matches_the_expression_outside_dst_gaps() -> None:
    # A plain sweep (not hypothesis): over a whole year in Berlin every fire of "15,45 1-3 * * *"
    # is at a local time the expression names, except the one croniter moves out of the
    # spring-forward gap (02:15 and 02:45 CET do not exist on 2026-03-29).
    spec = cron("15,45 1-3 * * *", zone="Europe/Berlin")
    created = utc(2026, 1, 1)
    times: list[datetime] = []
    last: datetime | None = None
    while True:
        nxt = fire_times_after(spec, created, last)
        assert nxt is not None
        if nxt >= utc(2027, 1, 1):
            break
        assert last is None or nxt > last
        times.append(nxt)
        last = nxt
    local = [t.astimezone(BERLIN) for t in times]
    off = [t for t in local if not (t.hour in (1, 2, 3) and t.minute in (15, 45))]
    assert [t.strftime("%Y-%m-%d %H:%M %Z") for t in off] == ["2026-03-29 03:00 CEST"]
    # 6 fires a day, 2 fewer on the spring-forward day (02:15, 02:45 collapse into 03:00 plus
    # 03:15, 03:45), 2 more on the fall-back day (02:15 and 02:45 twice).
    assert len(times) == 365 * 6 - 1 + 2


# --------------------------------------------------------------------------- Quartz cron (ZStack's)


@pytest.mark.parametrize(
    ("expression", "first_three"),
    [
        # seconds first; '?' in one day field (T0 is Monday 2026-01-05 12:00 UTC)
        ("0 0 2 * * ?", [utc(2026, 1, 6, 2), utc(2026, 1, 7, 2), utc(2026, 1, 8, 2)]),
        (
            "30 15 12 ? * MON-FRI",
            [utc(2026, 1, 5, 12, 15, 30), utc(2026, 1, 6, 12, 15, 30), utc(2026, 1, 7, 12, 15, 30)],
        ),
        # Quartz numbers the days from 1 = Sunday: 2-6 is Monday to Friday, 1,7 the weekend
        ("0 0 3 ? * 2-6", [utc(2026, 1, 6, 3), utc(2026, 1, 7, 3), utc(2026, 1, 8, 3)]),
        ("0 0 3 ? * 1,7", [utc(2026, 1, 10, 3), utc(2026, 1, 11, 3), utc(2026, 1, 17, 3)]),
        # L: the last day of the month; 6L: the last Friday; 6#3: the third Friday
        ("0 0 1 L * ?", [utc(2026, 1, 31, 1), utc(2026, 2, 28, 1), utc(2026, 3, 31, 1)]),
        ("0 0 1 ? * 6L", [utc(2026, 1, 30, 1), utc(2026, 2, 27, 1), utc(2026, 3, 27, 1)]),
        ("0 0 1 ? * 6#3", [utc(2026, 1, 16, 1), utc(2026, 2, 20, 1), utc(2026, 3, 20, 1)]),
        # 15W: the weekday nearest the 15th (2026-02-15 is a Sunday: Monday the 16th)
        ("0 0 1 15W * ?", [utc(2026, 1, 15, 1), utc(2026, 2, 16, 1), utc(2026, 3, 16, 1)]),
        # a seventh field: the year
        ("0 0 0 1 1 ? 2028", [utc(2028, 1, 1)]),
        ("0 */20 * * * ?", [utc(2026, 1, 5, 12, 20), utc(2026, 1, 5, 12, 40), utc(2026, 1, 5, 13)]),
    ],
)
def test_quartz_cron_fires_as_quartz_does(expression: str, first_three: list[datetime]) -> None:
    spec = cron(expression)
    validate(spec)
    assert _times(spec, T0, 3) == first_three


def _times(spec: TriggerSpec, after: datetime, count: int) -> list[datetime]:
    times: list[datetime] = []
    moment: datetime | None = after
    while len(times) < count:
        moment = fire_times_after(spec, T0, moment)
        if moment is None:
            break
        times.append(moment)
    return times


@pytest.mark.parametrize(
    ("expression", "word"),
    [
        ("0 0 2 * * MON", "exactly one"),  # Quartz: one day field must be '?'
        ("0 0 2 ? * ?", "exactly one"),
        ("0 0 12 LW * ?", "not supported"),  # refused, never run differently
        ("0 0 12 L-3 * ?", "not supported"),
        ("0 0 12 ? * 8", "day-of-week"),
        ("0 0 12 ? * 2-3L", "last weekday"),
        ("0 2 ? * *", "Quartz"),  # '?' in a five-field expression
        ("0 0 2 * *  * ? 2027 9", "fields"),
        ("61 0 2 * * ?", "cron"),
        ("0 0 0 30 2 ?", "no date"),
    ],
)
def test_quartz_cron_refused_with_the_reason(expression: str, word: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate(cron(expression))
    assert word in str(caught.value)


def test_cron_expression_translation_is_visible() -> None:
    assert cron_expression("0 0 3 ? * 6L") == ("0 0 3 * * L5", True)
    assert cron_expression(" 0  3 * * * ") == ("0 3 * * *", False)


@pytest.mark.parametrize("field", ["startTime", "stopTime"])
def test_trigger_times_beyond_the_bound_or_negative_are_refused(field: str) -> None:
    for value in (MAX_SECONDS + 1, 1_767_614_400_000, -1):  # the second: milliseconds sent by mistake
        with pytest.raises(InvalidArgument) as caught:
            validate(TriggerSpec(schedulerType="simple", schedulerInterval=60, **{field: value}))
        assert field in str(caught.value)
    validate(TriggerSpec(schedulerType="simple", schedulerInterval=60, **{field: MAX_SECONDS}))
