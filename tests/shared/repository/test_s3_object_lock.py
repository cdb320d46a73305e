"""Object lock against moto's S3 server with a bucket made with Object Lock enabled: chunks and
manifests are written with a retain-until date, a delete before it is refused (moto refuses a
version delete too; a plain DELETE would only hide the object), after it every version goes;
gc keeps locked chunks and lengthens the locks of chunks a newer backup still uses. Locks here
last a few seconds: tests wait for the retain-until date the store gives, they time nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from shared.errors import BackendUnavailable, ObjectLocked, UsageError
from shared.repository.backends.s3 import S3Backend
from shared.repository.backup import backup_volume
from shared.repository.maintenance import gc
from shared.repository.repo import Repository, chunk_key, manifest_key
from tests.conftest import MiB
from tests.s3_fixtures import S3Server

# How long the tests' objects stay locked: long enough that the steps which must happen while
# a lock holds (a backup, then the refused deletes; a stray chunk's put, then gc) fit in it on a
# machine at load 14 (3 s did not always); the tests that need a lock over wait for its date.
LOCK_SECONDS = 10.0


def locked_bucket(server: S3Server) -> str:
    bucket = f"bv-lock-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    return bucket


def locked_backend(
    server: S3Server, bucket: str, prefix: str, mode: str = "COMPLIANCE", seconds: float = LOCK_SECONDS
) -> S3Backend:
    return S3Backend(
        bucket,
        prefix,
        endpoint=server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key,
        lock_mode=mode,
        lock_days=seconds / 86400,
    )


def retain_until(server: S3Server, backend: S3Backend, key: str) -> float:
    head = server.client().head_object(Bucket=backend.bucket, Key=backend.prefix + key)
    return float(head["ObjectLockRetainUntilDate"].timestamp())


def wait_past(moment: float) -> None:
    """Sleep until ``moment`` (a retain-until date) has passed."""
    while time.time() <= moment + 0.2:
        time.sleep(min(0.5, max(0.05, moment + 0.2 - time.time())))


def versions(server: S3Server, backend: S3Backend, key: str) -> int:
    listed = server.client().list_object_versions(Bucket=backend.bucket, Prefix=backend.prefix + key)
    return len(listed.get("Versions", [])) + len(listed.get("DeleteMarkers", []))


def test_a_locked_manifest_is_refused_until_its_date_then_every_version_goes(
    s3_server: S3Server, make_raw: Callable[..., Path]
) -> None:
    backend = locked_backend(s3_server, locked_bucket(s3_server), uuid.uuid4().hex)
    repo = Repository.init(backend)
    done = backup_volume(repo, str(make_raw("a.raw", 2 * MiB)))
    key = manifest_key(done.id)
    head = s3_server.client().head_object(Bucket=backend.bucket, Key=backend.prefix + key)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    until = retain_until(s3_server, backend, key)
    assert time.time() < until <= time.time() + LOCK_SECONDS + 1
    a_chunk = next(iter(backend.list("chunks/"))).key
    assert retain_until(s3_server, backend, a_chunk) > time.time()
    assert backend.locked_until("config") is None  # only chunks and manifests are locked

    with pytest.raises(ObjectLocked) as refused:
        repo.delete_manifest(done.id)
    assert refused.value.code == "BACKUP_LOCKED" and refused.value.http_status == 409
    assert f"{key} is under object lock until" in str(refused.value)
    version = s3_server.client().head_object(Bucket=backend.bucket, Key=backend.prefix + key)["VersionId"]
    with pytest.raises(ClientError) as moto_refused:  # the store itself refuses the version too
        s3_server.client().delete_object(Bucket=backend.bucket, Key=backend.prefix + key, VersionId=version)
    assert moto_refused.value.response["Error"]["Code"] == "AccessDenied"
    assert versions(s3_server, backend, key) == 1 and repo.manifest_ids() == [done.id]

    wait_past(until)
    repo.delete_manifest(done.id)
    assert (repo.manifest_ids(), versions(s3_server, backend, key)) == ([], 0)


def test_gc_keeps_locked_chunks_and_lengthens_the_locks_newer_backups_need(
    s3_server: S3Server, make_raw: Callable[..., Path]
) -> None:
    backend = locked_backend(s3_server, locked_bucket(s3_server), uuid.uuid4().hex, mode="GOVERNANCE")
    repo = Repository.init(backend)
    volume = str(make_raw("a.raw", 2 * MiB))
    first = backup_volume(repo, volume, full=True)
    shared = sorted(info.key for info in backend.list("chunks/"))
    before = {key: retain_until(s3_server, backend, key) for key in shared}
    time.sleep(1.5)  # the second backup starts a second or more later: its lock ends later
    second = backup_volume(repo, volume, full=True)  # the same chunks: not written again
    assert second.newChunks == 0
    stray = chunk_key("ab" * 32)  # a chunk nothing references, locked as it is written
    backend.put(stray, b"stray")

    report = gc(repo)

    assert (report.chunksDeleted, report.chunksLocked, report.locksExtended) == (0, 1, len(shared))
    created = repo.load_manifest(second.id).created_at.timestamp()
    for key in shared:
        extended = retain_until(s3_server, backend, key)
        assert extended > before[key] and abs(extended - (created + LOCK_SECONDS)) < 1.5
    assert backend.exists(stray)

    wait_past(max(retain_until(s3_server, backend, stray), retain_until(s3_server, backend, manifest_key(first.id))))
    repo.delete_manifest(first.id)  # its chunks are the second's too: they stay
    later = gc(repo)
    assert (later.chunksDeleted, later.chunksLocked, backend.exists(stray)) == (1, 0, False)
    assert sorted(info.key for info in backend.list("chunks/")) == shared


def test_object_lock_options_are_checked(s3_server: S3Server) -> None:
    plain = s3_server.make_bucket()
    with pytest.raises(UsageError) as no_lock:
        Repository.init(locked_backend(s3_server, plain, uuid.uuid4().hex))
    assert str(no_lock.value) == f"bucket {plain} has no Object Lock enabled: objectLockMode refused"
    for options, message in (
        ({"objectLockMode": "FOREVER", "objectLockDays": "1"}, "objectLockMode must be GOVERNANCE or COMPLIANCE"),
        ({"objectLockMode": "COMPLIANCE"}, "object lock takes objectLockMode and objectLockDays"),
        ({"objectLockDays": "7"}, "object lock takes objectLockMode and objectLockDays"),
        ({"objectLockMode": "COMPLIANCE", "objectLockDays": "a week"}, "objectLockDays must be a number"),
        ({"objectLockMode": "COMPLIANCE", "objectLockDays": "-1"}, "objectLockDays must be a positive number"),
        ({"objectLockMode": "COMPLIANCE", "objectLockDays": "1e300"}, "objectLockDays must be a positive number"),
    ):
        with pytest.raises(UsageError) as bad:
            S3Backend.from_url(f"s3://{plain}/x", {**s3_server.options(plain), **options})
        assert str(bad.value).startswith(message), (options, bad.value)


def test_a_delete_while_the_server_is_down_deletes_nothing(s3_server: S3Server, make_raw: Callable[..., Path]) -> None:
    backend = locked_backend(s3_server, locked_bucket(s3_server), uuid.uuid4().hex, seconds=1)  # only waited out
    repo = Repository.init(backend)
    done = backup_volume(repo, str(make_raw("a.raw", MiB)))
    wait_past(retain_until(s3_server, backend, manifest_key(done.id)))
    s3_server.down()
    try:
        with pytest.raises(BackendUnavailable):
            repo.delete_manifest(done.id)
    finally:
        s3_server.up()
    assert repo.manifest_ids() == [done.id]
    repo.delete_manifest(done.id)
    assert repo.manifest_ids() == []
