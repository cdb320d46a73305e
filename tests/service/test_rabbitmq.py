"""The service on RabbitMQ (``BLOCKVAULT_BROKER_URL=amqp://...``), as large sites run Celery:
a job runs once whatever is delivered twice, a lost message is sent again, and queue depths
reach /metrics. API and worker processes on PostgreSQL and a real RabbitMQ (a virtual host of
the test's own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from celery import Celery

from shared.catalog.models import new_uuid
from tests.rabbitmq_fixtures import queue_messages, rabbitmqctl
from tests.service.conftest import Stack
from tests.service.test_storage_topologies import raw_volume


@pytest.fixture
def amqp_stack(tmp_path: Path, pg_database: str, rabbitmq_url: str) -> Iterator[Stack]:
    deployment = Stack(tmp_path, pg_database, rabbitmq_url)
    # the test kills the worker and starts it again with a job queued: on a loaded machine the
    # gap outlasted the stacks' 15 s host timeout and the job failed HOST_DISCONNECTED, which is
    # what a host that long gone gets, not what this test is about (messages lost and resent)
    deployment.env["BLOCKVAULT_HOST_TIMEOUT_SECONDS"] = "600"
    try:
        deployment.start_api()
        yield deployment
    finally:
        deployment.stop_all()


def test_backups_run_once_and_lost_messages_come_back_on_rabbitmq(amqp_stack: Stack, rabbitmq_url: str) -> None:
    stack, client = amqp_stack, amqp_stack.client
    host = new_uuid()
    worker = f"worker-{host[:8]}"
    stack.start_worker(host)
    client.add_backup_storage("local", f"file://{stack.tmp / 'bs'}")
    volume, path = raw_volume(stack, host, "v1")
    job = client.backup_volume(volume["uuid"], name="first")
    backup = client.wait(job, timeout=120)
    restored = stack.tmp / "restored.raw"
    client.wait(client.create_volume_from_backup(backup["uuid"], name="r", installPath=str(restored), hostUuid=host))
    assert restored.read_bytes() == path.read_bytes()

    # the same message delivered again: found finished, never run twice
    app = Celery(broker=rabbitmq_url)
    app.send_task("blockvault.volume.backup", args=[job], task_id=job, queue=f"host.{host}")
    stack.wait_for("the duplicate to be seen", lambda: f"job.skipped uuid={job}" in stack.log(worker))
    assert stack.log(worker).count(f"job.started uuid={job}") == 1

    # a message lost while no worker ran (the queue purged): the job is sent again and runs once
    stack.kill(worker)
    lost = client.backup_volume(volume["uuid"], name="lost")
    assert queue_messages(rabbitmq_url, f"host.{host}") == 1
    metrics = httpx.get(f"http://127.0.0.1:{stack.port}/metrics", headers={"Authorization": f"Bearer {stack.key}"})
    assert f'blockvault_queue_depth{{queue="host.{host}"}} 1.0' in metrics.text
    rabbitmqctl("purge_queue", "-p", rabbitmq_url.rsplit("/", 1)[1], f"host.{host}")
    stack.start_worker(host)
    assert client.wait(lost, timeout=180)["status"] == "Ready"
    log = stack.log(worker)
    assert f"job.requeued uuid={lost}" in log and log.count(f"job.started uuid={lost}") == 1
