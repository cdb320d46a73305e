"""Adding a host is one command on it: ``blockvault worker`` with the catalog's and the
broker's URLs and, in its environment, the deployment's ``BLOCKVAULT_SECRET_KEY`` (it opens
storage with the credentials the API sealed); its data dir is its own."""

from __future__ import annotations

import time

import pytest

from shared.catalog.models import new_uuid
from tests.conftest import MiB
from tests.service.conftest import Stack
from tests.service.test_storage_topologies import raw_volume

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)


def test_a_new_host_joins_with_one_command_and_backs_up_its_volumes(stack: Stack) -> None:
    host = new_uuid()
    urls = {key: stack.env.pop(key) for key in ("BLOCKVAULT_DATABASE_URL", "BLOCKVAULT_BROKER_URL")}
    own = {"BLOCKVAULT_DATA_DIR": str(stack.tmp / "joined-host")}  # another machine's
    try:
        proc = stack.spawn(
            "worker-joined",
            [
                "worker",
                "--host-uuid",
                host,
                "--concurrency",
                "1",
                "--database-url",
                urls["BLOCKVAULT_DATABASE_URL"],
                "--broker-url",
                urls["BLOCKVAULT_BROKER_URL"],
            ],
            own,
        )
    finally:
        stack.env.update(urls)
    stack.wait_host(host, "Connected", proc=proc, name="worker-joined")
    deadline = time.monotonic() + 60
    while "ready." not in stack.log("worker-joined"):
        assert proc.poll() is None and time.monotonic() < deadline, stack.log("worker-joined")
        time.sleep(0.2)
    # an encrypted storage: the new host reads its passphrase, sealed under the shared secret
    stack.client.add_backup_storage("local", f"file://{stack.tmp / 'local'}", encryptionPassphrase="joined-pass")
    volume, path = raw_volume(stack, host, "joined", 8 * MiB)
    backup = stack.client.wait(stack.client.backup_volume(volume["uuid"]), timeout=120)
    assert backup["status"] == "Ready"
    target = stack.tmp / "joined-restored.raw"
    stack.client.wait(
        stack.client.create_volume_from_backup(backup["uuid"], name="r", hostUuid=host, installPath=str(target)),
        timeout=120,
    )
    assert target.read_bytes() == path.read_bytes()
    assert not (stack.tmp / "joined-host" / "secret.key").exists()  # the shared secret, none of its own
