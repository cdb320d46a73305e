"""Secrets (storage tokens, S3 keys, passphrases, API keys) never show: not in API responses,
process logs, Celery task arguments (so not in Flower), job-history dumps, API job rows or
error messages, through a run that registers remote and cloud storage, backs up, copies,
schedules, fails on purpose and dumps the catalog."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from api.client import ApiError, JobFailed
from tests.service.conftest import Stack, free_port
from tests.service.test_storage_topologies import cloud_params, raw_volume, remote_params, start_host


class Recording(httpx.Client):
    """An httpx client that keeps every response body."""

    bodies: list[str]

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = super().send(request, **kwargs)
        response.read()
        self.bodies.append(response.text)
        return response


def test_no_secret_in_responses_logs_tasks_or_history(stack: Stack, start_storage_server: Any, s3_server: Any) -> None:
    flower_port = free_port()
    stack.spawn("flower", ["flower", "--port", str(flower_port)], env={"FLOWER_UNAUTHENTICATED_API": "true"})
    host = start_host(stack)
    stack.start_beat()
    client = stack.client
    recorder = Recording(base_url=client.base_url, headers={"authorization": f"Bearer {stack.key}"}, timeout=30)
    recorder.bodies = []
    client.http.close()
    client.http = recorder
    server = start_storage_server(stack.tmp / "remote")
    bucket = s3_server.make_bucket()
    cloud = cloud_params(s3_server, bucket, "p", passphrase="cloud-passphrase-" + "x" * 12)
    cloud["secretKey"] = "secret-key-" + "y" * 20
    secrets = {server.token, cloud["secretKey"], cloud["encryptionPassphrase"], stack.key}

    client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    for wrong in ({"name": "w", **remote_params(server, "wrong-" + server.token)},):
        try:
            client.create("backup-storage", wrong)
        except ApiError as exc:
            recorder.bodies.append(exc.description)
    secrets.add("wrong-" + server.token)
    remote = client.create("backup-storage", {"name": "remote", **remote_params(server)})
    store = client.create("backup-storage", {"name": "cloud", **cloud})
    volume, _ = raw_volume(stack, host, "v")
    backup = client.wait(client.backup_volume(volume["uuid"]), timeout=120)
    client.wait(client.sync_backup(backup["uuid"], remote["uuid"]), timeout=120)
    client.wait(client.sync_backup(backup["uuid"], store["uuid"]), timeout=120)
    group = client.create_job_group(
        "g", "volumeBackup", backupStorageUuids=[backup["backupStorageRefs"][0]["backupStorageUuid"], store["uuid"]]
    )
    client.add_targets(group["uuid"], [volume["uuid"]])
    client.run_job_group(group["uuid"])
    stack.wait_for("a history row", lambda: len(client.histories(f"schedulerJobGroupUuid={group['uuid']}")) == 1)
    client.wait(client.backup_database(name="catalog"), timeout=120)
    s3_server.down()  # a copy that fails: its error must not carry the keys either
    try:
        client.wait(client.sync_backup(backup["uuid"], store["uuid"]), timeout=180)
    except JobFailed as exc:
        recorder.bodies.append(exc.description)
    finally:
        s3_server.up()
    for collection in ("backup-storage", "volume-backups", "database-backups", "scheduler/jobhistories"):
        client.query(collection)

    # Flower's view of every task
    tasks: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(tasks) < 5:
        try:
            tasks = httpx.get(f"http://127.0.0.1:{flower_port}/api/tasks", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            tasks = {}
        time.sleep(1)
    assert len(tasks) >= 5, stack.log("flower")
    # the catalog's job rows and history dumps
    engine = create_engine(stack.env["BLOCKVAULT_DATABASE_URL"], poolclass=NullPool)
    with engine.connect() as conn:
        jobs = [dict(r._mapping) for r in conn.execute(text("SELECT params, result, error FROM api_job"))]
        history = [
            dict(r._mapping)
            for r in conn.execute(text('SELECT "requestDump", "resultDump" FROM scheduler_job_history'))
        ]
    engine.dispose()
    logs = [path.read_text(errors="replace") for path in stack.tmp.rglob("*.log")]
    places = {
        "API responses": "\n".join(recorder.bodies),
        "logs": "\n".join(logs),
        "Flower tasks": json.dumps(tasks),
        "API job rows": json.dumps(jobs, default=str),
        "history rows": json.dumps(history, default=str),
    }
    assert len(recorder.bodies) > 20 and len(logs) >= 4
    found = {where: [s for s in secrets if s in content] for where, content in places.items()}
    assert found == {where: [] for where in places}, found
