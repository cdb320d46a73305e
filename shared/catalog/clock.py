"""The catalog's clock: every time written to the catalog or compared with one read from it
(``createDate``/``lastOpDate``, heartbeats, session expiry, fire times, retention's order) is
on one clock, the catalog server's, so that hosts whose clocks are minutes apart still agree
on who heartbeat last, which backup is newest and when a session ends.

Each process measures how far its clock is from PostgreSQL's (``clock_timestamp()`` against the
middle of the round trip) at most every ``MEASURE_EVERY`` seconds and adds that to its own
clock: no extra query per timestamp. An SQLite catalog lives on this host: no offset. While
the catalog cannot be reached the last offset stands.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import UTC, datetime

from shared.failpoints import wall_clock
from shared.forksafe import ForkSafeLock

log = logging.getLogger(__name__)
MEASURE_EVERY = 30.0  # seconds between two measurements in one process
REPORT_OVER = 1.0  # an offset over this many seconds is logged (once per change)
_lock = ForkSafeLock(threading.RLock)  # re-entrant: nothing _measure calls can deadlock on it

RETRY_UNKNOWN = 1.0  # seconds between two attempts while no measurement has succeeded yet
_state = {"offset": 0.0, "measured": -math.inf, "reported": 0.0, "known": 0.0}


def catalog_now() -> datetime:
    """Now on the catalog's clock (UTC)."""
    return datetime.fromtimestamp(wall_clock() + offset(), UTC)


def offset() -> float:
    """Seconds to add to this host's clock to read the catalog's (measured when due). Until one
    measurement has succeeded every reader waits for the one in progress (a beat's fire thread
    must not read its own clock while its notification thread measures: a beat minutes ahead
    would fire a trigger early), and a failed first attempt is tried again after a second."""
    known = bool(_state["known"])
    every = MEASURE_EVERY if known else RETRY_UNKNOWN
    if time.monotonic() - _state["measured"] >= every and _lock.acquire(blocking=not known):
        try:
            if time.monotonic() - _state["measured"] >= every:  # not measured meanwhile by the thread waited for
                _state["measured"] = time.monotonic()  # one attempt per period, whatever happens
                measured = _measure()
                if measured is not None:
                    _state["offset"], _state["known"] = measured, 1.0
                    if abs(measured - _state["reported"]) > REPORT_OVER:
                        log.warning("clock.offset seconds=%.3f (this host's clock against the catalog's)", measured)
                        _state["reported"] = measured
        finally:
            _lock.release()
    elif not known and _lock.acquire():  # another thread measures right now: wait for its result
        _lock.release()
    return _state["offset"]


def _measure() -> float | None:
    from sqlalchemy import text

    from shared.catalog import db
    from shared.config import get_settings

    try:
        url = get_settings().catalog_url
        if not url.startswith("postgresql"):
            return 0.0
        with db.engine(url).connect() as connection:
            sent = wall_clock()
            server = float(connection.scalar(text("SELECT extract(epoch FROM clock_timestamp())")))
            received = wall_clock()
        return server - (sent + received) / 2
    except Exception:
        log.debug("clock.unmeasured", exc_info=True)
        return None


def reset() -> None:
    """Measure again at the next reading (a forked process, a test)."""
    _state["measured"] = -math.inf
