"""Faults a long-running site meets at random points, each first as a deterministic test (the
soak runner, tests/bench/soak.py, then mixes them): messages delivered twice, a backup storage
that fills up, host clocks that disagree."""

from __future__ import annotations

import time
from collections.abc import Callable

from celery import Celery

from shared.catalog.models import new_uuid
from shared.failpoints import reached, release
from tests.service.conftest import Stack
from tests.service.test_storage_topologies import raw_volume


def wait_until(what: str, check: Callable[[], bool], stack: Stack, timeout: float = 120) -> None:
    stack.wait_for(what, check, timeout=timeout)


def test_a_job_runs_at_most_once_whatever_is_delivered_twice(stack: Stack, redis_url: str) -> None:
    """A Running job's message delivered again (Redis' visibility timeout, a requeue) to a second
    worker of the same host while the first still runs it, the same task sent twice, and sent once
    more after it finished: one run, one backup row, one ``job.started`` line."""
    host, gate = new_uuid(), stack.tmp / "gate"
    stack.start_worker(host, env={"BLOCKVAULT_FAILPOINTS": f"backup.chunk_stored=1:hold:{gate}"})
    stack.client.add_backup_storage("local", f"file://{stack.tmp / 'bs'}")
    volume, _path = raw_volume(stack, host, "v1")
    job = stack.client.backup_volume(volume["uuid"], name="once")
    wait_until("the backup Running, held after its first chunk", lambda: reached(gate), stack)

    # a second worker consuming the same host's queue, as a restarted or duplicated worker would
    other = stack.spawn("worker-b", ["worker", "--host-uuid", host, "--concurrency", "1"])
    wait_until("the second worker ready", lambda: "ready." in stack.log("worker-b"), stack)
    assert other.poll() is None, stack.log("worker-b")
    app = Celery(broker=redis_url)
    for _ in range(2):  # the Running job's message, delivered twice more
        app.send_task("blockvault.volume.backup", args=[job], task_id=job, queue=f"host.{host}")

    def logs() -> str:
        return stack.log(f"worker-{host[:8]}") + stack.log("worker-b")

    wait_until("the second worker to take a duplicate", lambda: f"uuid={job}" in stack.log("worker-b"), stack)
    assert f"job.started uuid={job}" not in stack.log("worker-b"), "a second run of a Running job"
    assert stack.client.job(job)["state"] == "Running"
    release(gate)
    done = stack.client.wait(job, timeout=180)
    assert done["status"] == "Ready"
    wait_until("both duplicates seen", lambda: logs().count(f"job.skipped uuid={job}") >= 2, stack)

    # and once more after it finished
    app.send_task("blockvault.volume.backup", args=[job], task_id=job, queue=f"host.{host}")
    wait_until("the late duplicate seen", lambda: logs().count(f"job.skipped uuid={job}") >= 3, stack)
    time.sleep(1)  # nothing else may start after it
    assert logs().count(f"job.started uuid={job}") == 1, logs()
    backups = stack.client.query("volume-backups", f"volumeUuid={volume['uuid']}")["inventories"]
    assert [b["status"] for b in backups] == ["Ready"]
    assert stack.client.job(job)["state"] == "Succeeded"
