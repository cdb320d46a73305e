"""A short soak (tests/bench/soak.py): three minutes of scheduled backups and copies through
random faults with a fixed seed, then the independent checks. It stops PostgreSQL and Redis, so
it holds the machine-wide lock of tests/services.py exclusively (pg_control, redis_control)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tests.bench.soak import soak
from tests.services import PgControl, RedisControl

SEED = 18
MINUTES = 3.0


def test_a_short_soak_through_random_faults_breaks_no_invariant(
    tmp_path: Path, pg_database: str, redis_url: str, pg_control: PgControl, redis_control: RedisControl
) -> None:
    report = soak(
        tmp_path / "soak",
        pg_database,
        redis_url,
        seed=SEED,
        minutes=MINUTES,
        pg_control=pg_control,
        redis_control=redis_control,
        servers_lock=contextlib.nullcontext,
    )
    print(report.line())
    assert not report.violations, (
        f"reproduce with: tests/bench/soak.py --seed {SEED} --minutes {MINUTES}\n{report.line()}"
    )
    assert sum(report.faults.values()) > 0 and report.backups_ready > 0, report.line()
