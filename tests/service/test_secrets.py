"""Secrets (storage tokens, S3 keys, passphrases, API keys, session tokens, passwords) never
show: not in API responses, process logs, Celery task arguments (so not in Flower), job-history
dumps or API job rows, and not at rest either: the catalog (a ``pg_dump`` of it, or the SQLite
file itself) and the database backups taken of it hold none, through runs that register
remote and cloud storage, back up, copy, schedule, fail on purpose and dump the catalog, on
PostgreSQL and on the embedded SQLite catalog."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from api.client import ApiError, Client, JobFailed
from shared.dbdump import libpq_url
from shared.repository.repo import Repository
from shared.repository.stream import restore_stream
from tests.service.conftest import Stack, free_port
from tests.service.test_storage_topologies import cloud_params, raw_volume, remote_params, start_host

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)

PASSWORD = "account-password-" + "w" * 12


class Recording(httpx.Client):
    """An httpx client that keeps every response body."""

    bodies: list[str]

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = super().send(request, **kwargs)
        response.read()
        self.bodies.append(response.text)
        return response


def record_responses(stack: Stack) -> Recording:
    client = stack.client
    recorder = Recording(base_url=client.base_url, headers={"authorization": f"Bearer {stack.key}"}, timeout=30)
    recorder.bodies = []
    client.http.close()
    client.http = recorder
    return recorder


@dataclass
class Run:
    """What :func:`back_up_and_copy` did: its storages, the backup and every secret it used."""

    client: Client
    recorder: Recording
    local: dict[str, Any]
    remote: dict[str, Any]
    store: dict[str, Any]
    backup: dict[str, Any]
    secrets: set[str]


def back_up_and_copy(stack: Stack, start_storage_server: Any, s3_server: Any) -> Run:
    """A host; the local master, a Remote and a PublicCloud storage with known secrets (a wrong
    token tried first); an account's sessions and key; a volume backed up and copied to both
    (the worker opens them with the credentials the API sealed). Every response is recorded."""
    host = start_host(stack)
    client = stack.client
    recorder = record_responses(stack)
    server = start_storage_server(stack.tmp / "remote")
    local = client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    bucket = s3_server.make_bucket()
    cloud = cloud_params(s3_server, bucket, "p", passphrase="cloud-passphrase-" + "x" * 12)
    cloud["accessKey"] = "access-key-" + "z" * 16
    cloud["secretKey"] = "secret-key-" + "y" * 20
    with pytest.raises(ApiError) as refused:  # docs/storage.md: registering checks the token at once
        client.create("backup-storage", {"name": "w", **remote_params(server, "wrong-" + server.token)})
    assert (refused.value.status, refused.value.code) == (400, "STORAGE_AUTH_FAILED"), refused.value.description
    recorder.bodies.append(refused.value.description)
    remote = client.create("backup-storage", {"name": "remote", **remote_params(server)})
    store = client.create("backup-storage", {"name": "cloud", **cloud})
    secrets = {server.token, "wrong-" + server.token, cloud["accessKey"], cloud["secretKey"]}
    secrets |= {cloud["encryptionPassphrase"], stack.key, *sessions_and_keys(stack)}
    if "BLOCKVAULT_SECRET_KEY" in stack.env:
        secrets.add(stack.env["BLOCKVAULT_SECRET_KEY"])
    volume, _ = raw_volume(stack, host, "v")
    backup = client.wait(client.backup_volume(volume["uuid"]), timeout=120)
    for target in (remote, store):
        client.wait(client.sync_backup(backup["uuid"], target["uuid"]), timeout=120)
    return Run(client, recorder, local, remote, store, backup, secrets)


def sessions_and_keys(stack: Stack) -> set[str]:
    """An account with a password, logged in twice (one session logged out), and an API key of
    its own: the password, its SHA-512 and the tokens. The answers that show a token or key (once,
    by design) do not go through the recording client."""
    account = stack.client.create("accounts", {"name": "ops", "password": PASSWORD})
    created = httpx.post(
        f"{stack.client.base_url}/v1/api-keys",
        json={"params": {"accountUuid": account["uuid"]}},
        headers={"Authorization": f"Bearer {stack.key}"},
        timeout=30,
    )
    key = created.json()["inventory"]["key"]
    digest = hashlib.sha512(PASSWORD.encode()).hexdigest()
    tokens = []
    for _ in range(2):
        response = httpx.put(
            f"{stack.client.base_url}/v1/accounts/login",
            json={"logInByAccount": {"accountName": "ops", "password": digest}},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        tokens.append(response.json()["inventory"]["uuid"])
    opened = httpx.get(f"{stack.client.base_url}/v1/projects", headers={"Authorization": f"OAuth {tokens[1]}"})
    assert opened.status_code == 200, opened.text
    assert httpx.delete(f"{stack.client.base_url}/v1/accounts/sessions/{tokens[0]}", timeout=30).status_code == 200
    return {PASSWORD, digest, key, *tokens}


def restored_dump(folder: Path, database_backup: dict[str, Any], storage_uuid: str) -> str:
    """The catalog dump a database backup holds on the (plain) ImageStore at ``folder``, as text."""
    (ref,) = [r for r in database_backup["backupStorageRefs"] if r["backupStorageUuid"] == storage_uuid]
    repo = Repository.open(str(folder))
    try:
        out = io.BytesIO()
        restore_stream(repo, ref["installPath"].rsplit("/", 1)[-1], out)
    finally:
        repo.close()
    dump = out.getvalue().decode(errors="replace")
    assert "backup_storage" in dump and len(dump) > 10_000, dump[:2000]
    return dump


def logs(stack: Stack) -> str:
    found = [path.read_text(errors="replace") for path in stack.tmp.rglob("*.log")]
    assert len(found) >= 2
    return "\n".join(found)


def assert_nowhere(secrets: set[str], places: dict[str, str]) -> None:
    assert all(len(secret) >= 16 for secret in secrets), "short values would match by chance"
    found = {where: sorted(s for s in secrets if s in content) for where, content in places.items()}
    assert found == {where: [] for where in places}, found


def test_no_secret_in_responses_logs_tasks_history_catalog_or_database_backups(
    stack: Stack, start_storage_server: Any, s3_server: Any
) -> None:
    flower_port = free_port()
    stack.spawn("flower", ["flower", "--port", str(flower_port)], env={"FLOWER_UNAUTHENTICATED_API": "true"})
    stack.start_beat()
    run = back_up_and_copy(stack, start_storage_server, s3_server)
    client, recorder, backup, store = run.client, run.recorder, run.backup, run.store
    group = client.create_job_group(
        "g", "volumeBackup", backupStorageUuids=[backup["backupStorageRefs"][0]["backupStorageUuid"], store["uuid"]]
    )
    client.add_targets(group["uuid"], [backup["volumeUuid"]])
    client.run_job_group(group["uuid"])
    stack.wait_for("a history row", lambda: len(client.histories(f"schedulerJobGroupUuid={group['uuid']}")) == 1)
    database_backup = client.wait(client.backup_database(name="catalog"), timeout=120)
    s3_server.down()  # a copy that fails: its error must not carry the keys either
    try:
        with pytest.raises(JobFailed) as failed:
            client.wait(client.sync_backup(backup["uuid"], store["uuid"]), timeout=180)
    finally:
        s3_server.up()
    assert failed.value.code == "STORAGE_UNAVAILABLE", failed.value.description
    recorder.bodies.append(failed.value.description)
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
    url = stack.env["BLOCKVAULT_DATABASE_URL"]
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        jobs = [dict(r._mapping) for r in conn.execute(text("SELECT params, result, error FROM api_job"))]
        history = [
            dict(r._mapping)
            for r in conn.execute(text('SELECT "requestDump", "resultDump" FROM scheduler_job_history'))
        ]
    engine.dispose()
    # the whole catalog, as pg_dump gives it
    uri, pg_env = libpq_url(url)
    dumped = subprocess.run(["pg_dump", uri], env=pg_env, capture_output=True, text=True, timeout=120, check=True)
    assert "backup_storage" in dumped.stdout and "sealed" in dumped.stdout
    assert len(recorder.bodies) > 20
    assert_nowhere(
        run.secrets,
        {
            "API responses": "\n".join(recorder.bodies),
            "logs": logs(stack),
            "Flower tasks": json.dumps(tasks),
            "API job rows": json.dumps(jobs, default=str),
            "history rows": json.dumps(history, default=str),
            "pg_dump of the catalog": dumped.stdout,
            "the database backup": restored_dump(stack.tmp / "local", database_backup, run.local["uuid"]),
        },
    )


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Stack]:
    """The embedded default: SQLite catalog, filesystem broker and the server secret kept in
    the one data dir every process shares (no BLOCKVAULT_SECRET_KEY)."""
    deployment = Stack(tmp_path, "", "")
    for name in ("BLOCKVAULT_DATABASE_URL", "BLOCKVAULT_BROKER_URL", "BLOCKVAULT_SECRET_KEY"):
        deployment.env.pop(name)
    try:
        deployment.start_api()
        yield deployment
    finally:
        deployment.stop_all()


def test_the_embedded_sqlite_catalog_and_its_database_backups_hold_no_secret(
    embedded: Stack, start_storage_server: Any, s3_server: Any
) -> None:
    stack = embedded
    run = back_up_and_copy(stack, start_storage_server, s3_server)
    database_backup = run.client.wait(run.client.backup_database(name="catalog"), timeout=120)
    run.client.wait(run.client.sync_database_backup(database_backup["uuid"], run.store["uuid"]), timeout=120)
    data = stack.tmp / "data"
    at_rest = {
        path.name: path.read_bytes().decode("latin-1")
        for path in data.rglob("*")
        if path.is_file() and path.name != "secret.key"
    }
    assert {"catalog.db", "catalog.db-wal"} <= set(at_rest)
    assert "sealed" in at_rest["catalog.db"] + at_rest["catalog.db-wal"]
    assert_nowhere(
        run.secrets,
        {
            "API responses": "\n".join(run.recorder.bodies),
            "logs": logs(stack),
            "the data dir (catalog, broker)": "\n".join(at_rest.values()),
            "the database backup": restored_dump(stack.tmp / "local", database_backup, run.local["uuid"]),
        },
    )
