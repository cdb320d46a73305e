"""pytest plugin: the real RabbitMQ server that tests/harness/ensure-services keeps up.

``rabbitmq_url`` (function)
    ``amqp://guest:guest@127.0.0.1:5672/<vhost>``: a virtual host of this test's own (its
    queues, ``storage`` included, are no other test's), deleted when the test ends. A server
    that does not answer FAILS the test.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

AMQP = "amqp://guest:guest@127.0.0.1:5672"


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(
            f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[:500]}\n"
            "run tests/harness/ensure-services (it starts RabbitMQ)",
            pytrace=False,
        )
    return done.stdout


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    vhost = f"bv-test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{AMQP}/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60, check=False)


def queue_messages(url: str, queue: str) -> int:
    """Messages ready in ``queue`` of the virtual host of ``url``."""
    vhost = url.rsplit("/", 1)[1]
    for line in rabbitmqctl("list_queues", "-p", vhost, "name", "messages_ready").splitlines():
        name, _, count = line.partition("\t")
        if name == queue:
            return int(count)
    return 0
