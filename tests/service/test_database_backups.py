"""Database backups of the catalog and rebuilding a site from one backup storage alone, with
real PostgreSQL, Celery workers, the storage-server and the S3 server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from api.client import ApiError, JobFailed
from shared.catalog.models import new_uuid
from shared.repository.repo import Repository
from tests.conftest import ROOT, MiB
from tests.service.conftest import Stack
from tests.service.test_cli import bv
from tests.service.test_storage_topologies import (
    cloud_params,
    refs,
    remote_params,
    start_host,
    storage,
    vm_with_volumes,
)
from tests.shared.test_mysqldump import SERVER, fill, sql, tables

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)

# Rows that change on their own while a test runs (jobs finishing, heartbeats, probes).
LIVE_TABLES = {"api_job", "host", "backup_storage", "database_backup", "database_backup_storage_ref"}


def table_rows(url: str, tables: set[str] | None = None) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        names = set(inspect(engine).get_table_names()) if tables is None else tables
        out = {}
        with engine.connect() as conn:
            for name in sorted(names):
                out[name] = [tuple(row) for row in conn.execute(text(f'SELECT * FROM "{name}" ORDER BY 1'))]
        return out
    finally:
        engine.dispose()


def test_backup_change_recover_into_a_second_database_table_by_table(stack: Stack, make_pg_database: Any) -> None:
    host = start_host(stack)
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    _vm, volumes = vm_with_volumes(stack, host, "db1")
    client.wait(client.backup_vm(volumes[0][0]["uuid"], name="before"), timeout=120)
    group = client.create_job_group("catalog-nightly", "databaseBackup", retention={"keepLast": 5})
    first = client.wait(client.backup_database(name="first"), timeout=120)
    meta = first["metadata"]
    assert first["status"] == "Ready" and {"name", "version", "createdTime", "md5"} <= set(meta)
    assert meta["name"] == "first" and len(meta["md5"]) == 32
    snapshot = table_rows(stack.env["BLOCKVAULT_DATABASE_URL"])
    # the catalog changes a little; the second dump stores only the chunks around the change
    client.register_vm("added-later", hostUuid=host)
    second = client.wait(client.backup_database(name="second"), timeout=120)
    assert second["stats"]["newChunks"] <= max(2, second["stats"]["chunks"] // 2), second["stats"]
    # recover the first into an empty database: every table as it was at the backup
    target = make_pg_database(migrate=False)
    job = client.recover_database(first["uuid"], databaseUrl=target)
    assert client.wait(job, timeout=120)["databaseBackupUuid"] == first["uuid"]
    recovered = table_rows(target)
    assert set(recovered) == set(snapshot)
    for name in sorted(set(snapshot) - LIVE_TABLES):
        assert recovered[name] == snapshot[name], name
    assert "added-later" not in json.dumps(recovered["vm_instance"], default=str)
    # a database that is not empty is refused, unless forced
    with pytest.raises(JobFailed) as refused:
        client.wait(client.recover_database(second["uuid"], databaseUrl=target), timeout=120)
    assert refused.value.code == "CONFLICT" and "not empty" in refused.value.description
    client.wait(client.recover_database(second["uuid"], databaseUrl=target, force=True), timeout=120)
    assert "added-later" in json.dumps(table_rows(target, {"vm_instance"}), default=str)
    # bad input
    for params, status in [
        ({"databaseUrl": "mysql://x/y"}, 400),
        ({"databaseUrl": target, "force": "yes"}, 400),
        ({"databaseUrl": target, "backupStorageUuid": new_uuid()}, 404),
    ]:
        with pytest.raises(ApiError) as error:
            client.recover_database(first["uuid"], **params)
        assert error.value.status == status, params
    # a scheduled databaseBackup group
    trigger = client.create_trigger("now", schedulerType="simple", schedulerInterval=3600, repeatCount=1)
    stack.start_beat()
    client.attach_trigger(trigger["uuid"], group["uuid"])
    stack.wait_for("the scheduled dump", lambda: len(client.histories(f"schedulerJobGroupUuid={group['uuid']}")) == 1)
    history = client.histories(f"schedulerJobGroupUuid={group['uuid']}")[0]
    assert history["success"], history["resultDump"]
    result = json.loads(history["resultDump"])
    assert client.get("database-backups", result["databaseBackupUuid"])["status"] == "Ready"


def test_a_dump_killed_mid_way_leaves_no_ready_database_backup(stack: Stack) -> None:
    host = start_host(stack, {"BLOCKVAULT_FAILPOINTS": "stream.chunk_stored=1:kill"})
    client = stack.client
    local = client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    job = client.backup_database(name="doomed")
    with pytest.raises(JobFailed) as lost:  # the worker's main process records the dead child's job
        client.wait(job, timeout=120)
    assert lost.value.code == "WORKER_LOST", lost.value.description
    log = stack.log(f"worker-{host[:8]}")
    assert "exited prematurely" in log or "signal 9" in log
    rows = client.query("database-backups", "name=doomed")["inventories"]
    assert [r["status"] for r in rows] == ["Failed"]
    repo = Repository.open(str(stack.tmp / "local"))
    assert [e for e in repo.backups() if e.manifest.kind == "stream"] == []
    # with a worker that is not told to die, the next dump succeeds
    stack.kill(f"worker-{host[:8]}")
    start_host(stack)
    done = client.wait(client.backup_database(name="after"), timeout=120)
    assert done["status"] == "Ready" and refs_of(done) == {local["uuid"]: "Ready"}


def refs_of(row: dict[str, Any]) -> dict[str, str]:
    return {r["backupStorageUuid"]: r["status"] for r in row["backupStorageRefs"]}


def rebuild(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", "rebuild", *args],
        env=env,
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("kind", ["Remote", "PublicCloud"])
def test_disaster_drill_rebuilds_the_site_from_the_remote_storage_alone(
    stack: Stack, start_storage_server: Any, s3_server: Any, make_pg_database: Any, kind: str
) -> None:
    host = start_host(stack)
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    if kind == "Remote":
        server = start_storage_server(stack.tmp / "dc2")
        params = remote_params(server)
        flags = ["--backup-storage-url", server.url, "--token", server.token]
    else:
        bucket = s3_server.make_bucket()
        params = cloud_params(s3_server, bucket, "site")
        opts = s3_server.options(bucket)
        flags = ["--backup-storage-url", params["url"], "--endpoint", opts["endpoint"], "--region", opts["region"]]
        flags += ["--access-key", opts["accessKey"], "--secret-key", opts["secretKey"]]
    remote = client.create("backup-storage", {"name": "remote", **params})
    vm, volumes = vm_with_volumes(stack, host, "web")
    (root, root_path), (data, data_path) = volumes
    first = client.wait(client.backup_vm(root["uuid"], name="monday"), timeout=120)
    client.wait(client.sync_vm_backup(first["groupUuid"], remote["uuid"]), timeout=120)
    dump = client.wait(client.backup_database(name="catalog"), timeout=120)
    client.wait(client.sync_database_backup(dump["uuid"], remote["uuid"]), timeout=120)
    # a backup taken after the database backup: the rebuild finds it by scanning
    with open(data_path, "r+b") as handle:
        handle.seek(MiB)
        handle.write(b"tuesday" * 10000)
    second = client.wait(client.backup_vm(root["uuid"], name="tuesday"), timeout=120)
    client.wait(client.sync_vm_backup(second["groupUuid"], remote["uuid"]), timeout=120)
    expected = {root["uuid"]: root_path.read_bytes(), data["uuid"]: data_path.read_bytes()}
    assert refs(stack, second["volumeBackups"][0]["uuid"])[remote["uuid"]]["status"] == "Ready"

    # the site burns down: catalog, local storage and volumes gone; the remote storage stays
    stack.stop_all()
    for path in (root_path, data_path):
        path.unlink()
    shutil.rmtree(stack.tmp / "local")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    env |= {
        "BLOCKVAULT_DATA_DIR": str(stack.tmp / "new-site"),
        "BLOCKVAULT_DATABASE_URL": make_pg_database(migrate=False),
        "BLOCKVAULT_SECRET_KEY": "the-new-sites-server-secret",  # not the burnt site's
    }
    if kind == "PublicCloud":
        wrong = rebuild(env, *flags, "--encryption-passphrase", "not it", "--json")
        assert wrong.returncode != 0 and "wrong passphrase" in wrong.stderr, wrong.stderr
        flags += ["--encryption-passphrase", params["encryptionPassphrase"]]
    done = rebuild(env, *flags, "--restore-volumes", str(stack.tmp / "restored"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert vm["uuid"] in report["vmInstances"]
    assert {root["uuid"], data["uuid"]} <= set(report["volumes"])
    assert report["volumeBackups"] == 4 and report["databaseBackups"] >= 1
    assert sorted(report["scan"]["imported"]) == sorted(b["uuid"] for b in second["volumeBackups"])
    restored = {item["volumeUuid"]: Path(item["path"]).read_bytes() for item in report["restored"]}
    assert restored == expected, "every volume back, byte for byte, as of its newest backup"
    # the rebuilt catalog is a working one: the service starts on it and lists what came back
    rebuilt = Stack(stack.tmp / "new-site-stack", env["BLOCKVAULT_DATABASE_URL"], "")
    rebuilt.env["BLOCKVAULT_SECRET_KEY"] = env["BLOCKVAULT_SECRET_KEY"]
    (stack.tmp / "new-site-stack").mkdir()
    try:
        rebuilt.start_api()
        backups = rebuilt.client.query("volume-backups", "status=Ready", count=True)["total"]
        assert backups == 4
        assert storage(rebuilt, report["backupStorageUuid"])["status"] == "Connected"
        # rebuild sealed the credentials it was given under the new site's secret: they open
        assert rebuilt.client.reconnect_storage(report["backupStorageUuid"])["status"] == "Connected"
    finally:
        rebuilt.stop_all()


def test_rebuild_refuses_clearly(stack: Stack, start_storage_server: Any, make_pg_database: Any) -> None:
    server = start_storage_server(stack.tmp / "empty-site")
    from shared.repository.backends import open_backend

    Repository.init(open_backend(f"{server.url}/none", {"token": server.token}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    env |= {"BLOCKVAULT_DATA_DIR": str(stack.tmp / "x"), "BLOCKVAULT_DATABASE_URL": make_pg_database(migrate=False)}
    nothing = rebuild(env, "--backup-storage-url", f"{server.url}/none", "--token", server.token)
    assert nothing.returncode != 0 and "database backup" in nothing.stderr and len(nothing.stderr.splitlines()) == 1
    bad_token = rebuild(env, "--backup-storage-url", f"{server.url}/none", "--token", "wrong")
    assert bad_token.returncode != 0 and "rejected" in bad_token.stderr and "wrong" not in bad_token.stderr
    bad_url = rebuild(env, "--backup-storage-url", "ftp://x/y")
    assert bad_url.returncode == 2


def test_a_registered_mariadb_database_is_backed_up_and_recovered_into_a_new_database(stack: Stack) -> None:
    """ZStack's management database runs on MariaDB: an admin registers one (TCP URL, the
    password sealed), backs it up through the API and a worker (mariadb-dump
    --single-transaction into the chunks), and recovers it into a new database on that server."""

    names = [f"bv_test_{os.getpid()}_{new_uuid()[:8]}_{i}" for i in range(2)]
    source, copy = names
    try:
        fill(source)
        start_host(stack)
        client = stack.client
        client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
        url = f"mysql://{SERVER.user}:{SERVER.password}@127.0.0.1:3306/{source}"
        # by the CLI, the password on stdin (never on its command line)
        args = ["--url", f"mysql://{SERVER.user}@127.0.0.1:3306/{source}", "--password-stdin"]
        done = bv(stack, "database", "register", "--name", "zstack-db", "--json", *args, stdin=SERVER.password + "\n")
        assert done.returncode == 0, done.stderr
        registered = json.loads(done.stdout)
        assert registered["host"] == "127.0.0.1" and registered["databaseName"] == source
        listed = json.dumps(client.query("databases"))  # (the tests' password is also the user's name)
        assert url not in listed and f":{SERVER.password}@" not in listed and "sealedPassword" not in listed
        first = client.wait(client.backup_database(databaseUuid=registered["uuid"]), timeout=300)
        assert first["status"] == "Ready" and first["databaseUuid"] == registered["uuid"]
        assert {"name", "version", "createdTime", "md5"} <= set(first["metadata"])
        assert first["metadata"]["engine"] == "mysqldump"
        done = bv(stack, "database-backup", "recover", first["uuid"], "--database-name", copy, "--wait", "--json")
        assert done.returncode == 0, done.stderr
        recovered = json.loads(done.stdout)
        assert recovered == {**recovered, "databaseUuid": registered["uuid"], "databaseName": copy}
        assert tables(copy) == tables(source)
        # recovering over a database with tables needs force
        with pytest.raises(JobFailed) as failed:
            client.wait(client.recover_database(first["uuid"], databaseName=copy), timeout=300)
        assert failed.value.code == "CONFLICT"
        # a second backup after a small change stores a few chunks only
        sql("UPDATE vm SET name = 'renamed' WHERE id = 1234", source)
        second = client.wait(client.backup_database(databaseUuid=registered["uuid"]), timeout=300)
        assert second["metadata"]["md5"] != first["metadata"]["md5"]
        for bad in (
            {"databaseUuid": registered["uuid"], "databaseUrl": "postgresql://x/y"},
            {"databaseName": "no;way"},
        ):
            with pytest.raises(ApiError) as refused:
                client.recover_database(first["uuid"], **bad)
            assert refused.value.status == 400
        for bad_url in (
            "mysql://u:p@/db",  # a socket, not a host
            "mysql://u:p@127.0.0.1/db?unix_socket=/run/mysqld/mysqld.sock",
            "postgresql://u:p@127.0.0.1/db",
            f"mysql://u:p@127.0.0.1:3306/{'x;drop'}",
        ):
            with pytest.raises(ApiError) as refused:
                client.create("databases", {"name": "bad", "url": bad_url})
            assert refused.value.status == 400, bad_url
        # a databaseBackup job group that names the database backs it up on each run
        group = client.create_job_group("zstack-db-nightly", "databaseBackup", databaseUuid=registered["uuid"])
        assert group["jobData"]["databaseUuid"] == registered["uuid"]
        client.run_job_group(group["uuid"])
        where = f"schedulerJobGroupUuid={group['uuid']}"
        stack.wait_for("the scheduled dump", lambda: len(client.histories(where)) == 1)
        assert client.histories(where)[0]["success"] is True, client.histories(where)
        scheduled = client.query("database-backups", f"databaseUuid={registered['uuid']}", sort="-createDate")
        assert len(scheduled["inventories"]) == 3 and scheduled["inventories"][0]["status"] == "Ready"
        with pytest.raises(ApiError) as refused:
            client.create_job_group("bad", "databaseBackup", databaseUuid=new_uuid())
        assert refused.value.status == 404
        assert f":{SERVER.password}@" not in stack.log("api")
    finally:
        for name in names:
            sql(f"DROP DATABASE IF EXISTS `{name}`")
