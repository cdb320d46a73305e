"""The service layer's unit tests: one process plays the API and the worker.

:class:`Site` is one deployment on an empty, migrated PostgreSQL catalog (:func:`catalog_url`):
the ``BLOCKVAULT_*`` settings name the test's folder as the data dir, the volume roots and the
VM socket folder; a host is registered the way a worker does it (:func:`shared.hosts.register`);
backup storages are real file repositories (the first one made with a small chunk size, the
others like it, as ``register_storage`` makes them); volumes are real raw or qcow2 files.
``request_*`` functions send their task to Celery's filesystem broker in the data dir, where
nobody consumes it (:meth:`Site.sent` reads it); :meth:`Site.run` then runs the job as its
worker would, in a session of its own, without Celery, and :meth:`Site.fail` records a failure
as the worker does (``apijobs.fail_job``).
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from shared import hosts
from shared.apijobs import fail_job, finish_job, start_job
from shared.catalog import db
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    Base,
    VmInstance,
    Volume,
    VolumeBackup,
    new_uuid,
)
from shared.celery_app import celery_app
from shared.config import get_settings
from shared.errors import BlockvaultError
from shared.repository.repo import Repository, parse_install_path
from shared.repository.restore import restore_backup
from shared.service import volume_backups
from shared.service.rows import AnyBackup, AnyRef, ref_on
from shared.storage import open_repository, register_storage
from tests.conftest import write_regions
from tests.services import DB_PREFIX, delete_every_row
from tests.summaries import assert_summary_right

KiB = 1024
CHUNK = 64 * KiB  # the repositories' chunk size: a volume of 1 MiB is 16 chunks
SIZE = 16 * CHUNK
Runner = Callable[[Session, ApiJob], dict[str, Any]]


def volume_regions(size: int, seed: int) -> list[tuple[int, bytes]]:
    """A VM disk in chunks: holes, log text and random bytes, every data chunk unlike any other
    (of any seed), so that the engine's chunk counts are those of the volume."""
    rng = random.Random(seed)
    regions = []
    for offset in range(0, size, CHUNK):
        kind = rng.random()
        if kind < 0.5:
            regions.append((offset, rng.randbytes(CHUNK)))
        elif kind < 0.75:
            line = f"{seed}:{offset} some log text\n".encode()
            regions.append((offset, (line * (CHUNK // len(line) + 1))[:CHUNK]))
    return regions


@dataclass
class Message:
    """One task message on the filesystem broker."""

    task: str
    id: str
    queue: str
    args: list[Any]


class Site:
    """One deployment as the service layer sees it; ``session`` is the API's."""

    def __init__(self, tmp: Path, session: Session, host: str) -> None:
        self.tmp, self.session, self.host = tmp, session, host

    # -- rows and files ----------------------------------------------------------------------
    def storage(self, name: str = "master", role: str = "master") -> BackupStorage:
        """A registered ImageStore storage in ``<tmp>/<name>``; the first one holds a
        repository of chunk size :data:`CHUNK` (registering attaches it), the others are made
        like it by ``register_storage``."""
        folder = self.tmp / name
        if self.session.scalar(select(func.count()).select_from(BackupStorage)) == 0:
            Repository.init(str(folder), chunk_size=CHUNK).close()
        storage = register_storage(self.session, {"name": name, "url": f"file://{folder}", "role": role})
        self.session.commit()
        return storage

    def vm(self, state: str = "Stopped", qmp_socket: str | None = None) -> VmInstance:
        vm = VmInstance(name=f"vm-{new_uuid()[:6]}", hostUuid=self.host, state=state, qmpSocket=qmp_socket)
        self.session.add(vm)
        self.session.commit()
        return vm

    def volume_file(self, name: str, size: int = SIZE, seed: int = 1, fmt: str = "raw") -> Path:
        path = self.tmp / name
        if fmt == "raw":
            write_regions(path, size, volume_regions(size, seed))
            return path
        source = self.tmp / f"{name}.src"
        write_regions(source, size, volume_regions(size, seed))
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(source), str(path)], check=True)
        source.unlink()
        return path

    def volume(
        self,
        name: str = "data.raw",
        *,
        size: int = SIZE,
        seed: int = 1,
        vm: VmInstance | None = None,
        kind: str = "Data",
        path: Path | None = None,
        status: str = "Ready",
    ) -> Volume:
        """A registered volume; its file (raw, or qcow2 when ``name`` ends in .qcow2) is made
        unless ``path`` names one."""
        fmt = "qcow2" if name.endswith(".qcow2") else "raw"
        path = path or self.volume_file(name, size, seed, fmt)
        volume = Volume(
            name=name,
            hostUuid=self.host,
            vmInstanceUuid=vm.uuid if vm else None,
            type=kind,
            format=fmt,
            installPath=str(path),
            size=size,
            status=status,
        )
        self.session.add(volume)
        self.session.commit()
        return volume

    def backup(self, volume: Volume, **params: Any) -> VolumeBackup:
        """A Ready backup of ``volume``, taken through createVolumeBackup."""
        job = volume_backups.request_volume_backup(self.session, volume.uuid, params, None)
        self.run(volume_backups.run_volume_backups, job)
        backup: VolumeBackup = self.session.get_one(VolumeBackup, job.resourceUuid)
        return backup

    def parent_and_child(self, volume: Volume) -> tuple[VolumeBackup, VolumeBackup]:
        """A backup of ``volume``, then one chunk rewritten and the incremental backup on it."""
        parent = self.backup(volume)
        overwrite(volume)
        child = self.backup(volume)
        assert (child.mode, child.parentUuid) == ("incremental", parent.uuid)
        return parent, child

    # -- jobs ----------------------------------------------------------------------------------
    def run(self, runner: Runner, job: ApiJob) -> dict[str, Any]:
        """Run ``job`` as its worker would: claimed (Running), then ``runner`` in a session of
        its own, committed when it returns; the API's session sees the outcome afterwards."""
        try:
            with db.session() as worker:
                claimed = start_job(worker, job.uuid)
                assert claimed is not None, f"job {job.uuid} is {job.state}, not Pending"
                return runner(worker, claimed)
        finally:
            self.session.expire_all()

    def finish(self, job: ApiJob, result: dict[str, Any]) -> ApiJob:
        """Record the job's success as the worker does."""
        with db.session() as worker:
            finish_job(worker, worker.get_one(ApiJob, job.uuid), result)
        self.session.expire_all()
        return self.session.get_one(ApiJob, job.uuid)

    def fail(self, runner: Runner, job: ApiJob, error: type[BlockvaultError]) -> ApiJob:
        """Run ``job``, which raises ``error``; record its failure as the worker does."""
        with pytest.raises(error) as caught:
            self.run(runner, job)
        assert type(caught.value) is error
        with db.session() as worker:
            fail_job(worker, worker.get_one(ApiJob, job.uuid), code=caught.value.code, description=str(caught.value))
        self.session.expire_all()
        return self.session.get_one(ApiJob, job.uuid)

    def messages(self) -> list[Message]:
        """Every task message sent to the broker (in no particular order)."""
        folder = get_settings().broker_folder / "queue"
        found = []
        for path in sorted(folder.iterdir()) if folder.exists() else []:
            message = json.loads(path.read_text())
            headers = message["headers"]
            queue = message["properties"]["delivery_info"]["routing_key"]
            found.append(Message(headers["task"], headers["id"], queue, json.loads(_body(message))[0]))
        return found

    def sent(self, job: ApiJob) -> Message:
        """The one message sent for ``job``."""
        (message,) = (m for m in self.messages() if m.id == job.uuid)
        return message

    def refused(self, error: type[BlockvaultError], request: Callable[[], object]) -> BlockvaultError:
        """A request the API refuses with ``error`` (exactly that class): like the API, the
        session is rolled back; nothing was sent."""
        sent = len(self.messages())
        with pytest.raises(error) as caught:
            request()
        assert type(caught.value) is error, caught.value
        self.session.rollback()
        assert len(self.messages()) == sent
        return caught.value

    def count(self, model: type[Any]) -> int:
        return int(self.session.scalar(select(func.count()).select_from(model)) or 0)

    # -- repositories --------------------------------------------------------------------------
    def repository(self, storage: BackupStorage) -> Repository:
        return open_repository(storage)

    def ref(self, row: AnyBackup, storage: BackupStorage) -> AnyRef:
        ref = ref_on(row, storage.uuid)
        assert ref is not None, f"{row.uuid} has no copy on {storage.name}"
        return ref

    def restored(self, storage: BackupStorage, row: AnyBackup) -> bytes:
        """The bytes of ``row``'s copy on ``storage`` (whose installPath names that storage's
        repository), restored."""
        repository_id, manifest = parse_install_path(self.ref(row, storage).installPath)
        assert repository_id == storage.repositoryUuid
        target = self.tmp / f"restored-{new_uuid()[:8]}.raw"
        with self.repository(storage) as repo:
            restore_backup(repo, manifest, str(target))
        return target.read_bytes()

    def vanish(self, storage: BackupStorage) -> Path:
        """The storage's folder is gone at once (a failed disk, an unmounted share), even while
        a job writes into it; where it went."""
        return (self.tmp / storage.name).rename(self.tmp / f"gone-{storage.name}-{new_uuid()[:8]}")


def _body(message: dict[str, Any]) -> str:
    body = message["body"]
    return base64.b64decode(body).decode() if message["properties"].get("body_encoding") == "base64" else body


def overwrite(volume: Volume, index: int = 0) -> None:
    """The guest rewrites chunk ``index`` of ``volume`` (a raw one) with new random bytes."""
    with open(volume.installPath, "r+b") as handle:
        handle.seek(index * CHUNK)
        handle.write(os.urandom(CHUNK))


def content(volume: Volume) -> bytes:
    """What the volume's guest sees now, byte for byte."""
    return raw_bytes(Path(volume.installPath))


def raw_bytes(path: Path) -> bytes:
    """The guest-visible bytes of a raw or qcow2 image."""
    if path.suffix != ".qcow2":
        return path.read_bytes()
    raw = path.with_suffix(".raw-view")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(path), str(raw)], check=True)
    try:
        return raw.read_bytes()
    finally:
        raw.unlink()


@pytest.fixture(scope="session")
def catalog_url(pg_server_url: str) -> Iterator[str]:
    """One migrated catalog for every test of this layer, each test starting on it emptied
    (:func:`site`). The service commits, and its worker side opens sessions of its own, so a
    test cannot run in one transaction rolled back at its end; and a database made and dropped
    per test (``pg_database``) costs 0.3 s on an idle machine and 1 to 2 s on a loaded one,
    more than most of these tests themselves."""
    base = make_url(pg_server_url)
    name = f"{DB_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"  # (tests/services.py drops it if we die)
    admin = create_engine(base.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        db.migrate(url)
        yield url
    finally:
        db.engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _emptied(url: str) -> str:
    """``url``'s catalog with every row of every table deleted (the schema stays migrated)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            delete_every_row(conn, Base.metadata.sorted_tables)
    finally:
        engine.dispose()
    return url


@pytest.fixture
def site(catalog_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """A deployment on an empty catalog, in the test's folder, with one host registered."""
    for name in list(os.environ):
        if name.startswith("BLOCKVAULT_"):
            monkeypatch.delenv(name)
    settings = {
        "DATABASE_URL": _emptied(catalog_url),
        "DATA_DIR": str(tmp_path / "data"),
        "VOLUME_ROOTS": str(tmp_path),
        "VM_SOCKET_DIR": str(tmp_path),
        "SECRET_KEY": "svctests-server-secret-0123456789",
        "STORAGE_RETRY_SECONDS": "0",  # a storage that is gone fails at once
        "LOCK_WAIT_SECONDS": "0",  # nothing else holds a repository: no waiting for gc
    }
    for name, value in settings.items():
        monkeypatch.setenv("BLOCKVAULT_" + name, value)
    get_settings.cache_clear()
    db.reset()
    celery_app.cache_clear()  # the broker follows this test's settings
    session = Session(db.engine(), expire_on_commit=False)
    try:
        host = hosts.register(session, new_uuid())
        session.commit()
        yield Site(tmp_path, session, host.uuid)
        with db.session() as check:  # whatever the test did to backups, the overview's summary follows
            assert_summary_right(check)
    finally:
        session.close()
        db.engine().dispose()
        db.reset()
        celery_app.cache_clear()
        get_settings.cache_clear()


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside every volume root."""
    return tmp_path_factory.mktemp("outside")
