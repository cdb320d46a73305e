"""``GET /metrics`` and job-tagged logs with the real processes: the API and Celery workers on
PostgreSQL and Redis. A backup shows in the counts, sizes and last-backup time; a job sent to
a host whose worker stopped waits in that host's queue; every line a worker logs while a job
runs, the engine's included, names the job."""

from __future__ import annotations

import re
from datetime import datetime

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.client import JobFailed
from shared.celery_app import host_queue
from tests.conftest import MiB
from tests.service.conftest import Stack
from tests.service.test_storage_topologies import raw_volume, start_host

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(stack: Stack) -> Samples:
    response = httpx.get(
        f"http://127.0.0.1:{stack.port}/metrics", headers={"Authorization": f"Bearer {stack.key}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def one(samples: Samples, name: str, **labels: str) -> float:
    """The value of the only sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, have), v in samples.items() if n == name and set(labels.items()) <= have]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def job_lines(log: str, job: str) -> list[str]:
    """The lines a pool process logged from the job's start to its end."""
    lines = [line for line in log.splitlines() if " ForkPoolWorker-" in line]
    start = next(i for i, line in enumerate(lines) if f"job.started uuid={job}" in line)
    end = next(i for i, line in enumerate(lines) if f"job.succeeded uuid={job}" in line)
    return lines[start : end + 1]


def test_metrics_and_job_logs_with_real_workers(stack: Stack) -> None:
    host = start_host(stack)
    client = stack.client
    master = client.add_backup_storage("master", f"file://{stack.tmp / 'master'}")
    standby = client.add_backup_storage("standby", f"file://{stack.tmp / 'standby'}", role="standby")
    volume, _path = raw_volume(stack, host, "vol-metrics")
    job = client.backup_volume(volume["uuid"], name="b1")
    backup = client.wait(job, timeout=120)

    # a second host whose worker stops: the job sent to it waits in its queue
    idle = start_host(stack)
    idle_volume, _ = raw_volume(stack, idle, "vol-idle", seed=4)
    stack.kill(f"worker-{idle[:8]}")
    waiting = client.backup_volume(idle_volume["uuid"], name="b-idle")
    samples = scrape(stack)  # before the reaper fails the job (BLOCKVAULT_HOST_TIMEOUT_SECONDS=15 in these stacks)
    assert one(samples, "blockvault_queue_depth", queue=host_queue(idle)) >= 1
    assert one(samples, "blockvault_queue_depth", queue="storage") == 0  # copies to the standby ran in the job
    assert one(samples, "blockvault_catalog_up") == 1 and one(samples, "blockvault_broker_up") == 1

    assert one(samples, "blockvault_volume_backups", mode="full", status="Ready") == 1
    assert one(samples, "blockvault_volume_backups", mode="full", status="Creating") == 1  # the waiting one
    assert one(samples, "blockvault_volume_backup_size_bytes", mode="full") == 16 * MiB == backup["size"]
    stats = backup["stats"]  # what the engine did, as the job reported it
    assert one(samples, "blockvault_volume_backup_read_bytes", mode="full") == stats["bytesRead"] > 0
    assert one(samples, "blockvault_volume_backup_written_bytes", mode="full") == stats["bytesWritten"] > 0
    assert one(samples, "blockvault_volume_backup_chunks", mode="full", kind="new") == stats["newChunks"]
    deduplicated = stats["chunks"] - stats["newChunks"]
    assert one(samples, "blockvault_volume_backup_chunks", mode="full", kind="deduplicated") == deduplicated
    created = datetime.fromisoformat(backup["createDate"].replace("Z", "+00:00")).timestamp()
    last = one(samples, "blockvault_volume_last_backup_timestamp_seconds", volume=volume["uuid"])
    assert abs(last - created) < 0.002  # the inventory's date has milliseconds
    assert one(samples, "blockvault_volume_last_backup_timestamp_seconds", volume=idle_volume["uuid"]) == 0
    ok = {"action": "createVolumeBackup", "state": "Succeeded"}
    assert one(samples, "blockvault_job_duration_seconds_count", **ok) == 1
    assert 0 < one(samples, "blockvault_job_duration_seconds_sum", **ok) < 120
    assert one(samples, "blockvault_jobs_in_progress", action="createVolumeBackup", state="Pending") == 1
    assert one(samples, "blockvault_host_connected", host=host) == 1
    assert one(samples, "blockvault_storage_total_bytes", storage=master["uuid"]) > 0
    assert one(samples, "blockvault_storage_connected", storage=standby["uuid"], role="standby") == 1
    assert one(samples, "blockvault_storage_sync_lag_backups", storage=standby["uuid"]) == 0  # replicated in the job
    assert one(samples, "blockvault_storage_sync_lag_seconds", storage=standby["uuid"]) == 0

    # the reaper fails the waiting job once the host is Disconnected; its message stays queued
    with pytest.raises(JobFailed) as failed:
        client.wait(waiting, timeout=90)
    assert failed.value.code == "HOST_DISCONNECTED"
    samples = scrape(stack)
    assert one(samples, "blockvault_host_connected", host=idle) == 0
    assert one(samples, "blockvault_volume_backups", mode="full", status="Failed") == 1

    # every line the pool process logged while the job ran names it, the engine's included
    lines = job_lines(stack.log(f"worker-{host[:8]}"), job)
    assert len(lines) >= 3, lines
    missing = [line for line in lines if f" job={job} task={job} " not in line]
    assert not missing, missing
    assert any(re.search(r" shared\.repository\.\w+ ", line) for line in lines), lines
