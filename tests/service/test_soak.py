"""A short soak (tests/bench/soak.py): three minutes of scheduled backups and copies through
random faults with a fixed seed, then the independent checks. It restarts PostgreSQL and Redis:
its own cluster and server (tests/services.py private_servers), so the rest of the suite runs on
beside it instead of waiting for it."""

from __future__ import annotations

from pathlib import Path

from tests.bench.soak import soak
from tests.services import private_servers

SEED = 18
MINUTES = 3.0


def test_a_short_soak_through_random_faults_breaks_no_invariant(tmp_path: Path) -> None:
    with private_servers(tmp_path / "servers") as (database, broker, pg_control, redis_control):
        report = soak(
            tmp_path / "soak",
            database,
            broker,
            seed=SEED,
            minutes=MINUTES,
            pg_control=pg_control,
            redis_control=redis_control,
        )
    print(report.line())
    assert not report.violations, (
        f"reproduce with: tests/bench/soak.py --seed {SEED} --minutes {MINUTES}\n{report.line()}"
    )
    assert sum(report.faults.values()) > 0 and report.backups_ready > 0, report.line()
