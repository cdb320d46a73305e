"""The s3 backend against a real S3-protocol server (moto server mode, boto3 over HTTP):
what the contract suite does not cover: multipart, error mapping, outages, and whole
repositories (encrypted backup and restore, sync with an outage in the middle)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from shared.errors import (
    BackendAuthFailed,
    BackendError,
    BackendUnavailable,
    BucketNotFound,
    ObjectNotFound,
    WrongPassphrase,
)
from shared.repository.backends import Backend, RetryingBackend, open_backend
from shared.repository.backends import s3 as s3_module
from shared.repository.backends.s3 import S3Backend
from shared.repository.backup import backup_volume
from shared.repository.repo import Repository
from shared.repository.restore import restore_backup
from shared.repository.sync import sync
from tests.conftest import MiB
from tests.s3_fixtures import S3AuthServer, S3Server


def s3_backend(server: S3Server, bucket: str, **kwargs: object) -> S3Backend:
    return S3Backend(
        bucket,
        uuid.uuid4().hex,
        endpoint=server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.make_bucket()


def bucket_objects(server: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = server.client()
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", ())
    ]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


# -- multipart --------------------------------------------------------------------------------
def test_multipart_round_trip(s3_server: S3Server, bucket: str) -> None:
    store = s3_backend(s3_server, bucket, multipart_threshold=6 * MiB, part_size=5 * MiB)
    data = os.urandom(12 * MiB + 123)
    store.put("big", data)
    assert store.get("big") == data
    assert store.get("big", 5 * MiB - 10, 20) == data[5 * MiB - 10 : 5 * MiB + 10]
    assert store.stat("big").size == len(data)
    head = s3_server.client().head_object(Bucket=bucket, Key=store.prefix + "big")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB parts: it really was multipart
    store.put("big", os.urandom(7 * MiB), overwrite=False)  # a conditional multipart complete
    assert store.get("big") == data
    store.put("small", b"one PUT")
    assert "-" not in s3_server.client().head_object(Bucket=bucket, Key=store.prefix + "small")["ETag"]
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    store.close()


def test_failed_multipart_upload_is_aborted(s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = s3_backend(s3_server, bucket, multipart_threshold=6 * MiB, part_size=5 * MiB)
    real_upload_part = store._client.upload_part
    calls = []

    def failing_upload_part(**kwargs: object) -> object:
        calls.append(kwargs["PartNumber"])
        if len(calls) == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "boom"}}, "UploadPart")
        return real_upload_part(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store._client, "upload_part", failing_upload_part)
    with pytest.raises(BackendUnavailable):
        store.put("big", os.urandom(11 * MiB))
    uploads = s3_server.client().list_multipart_uploads(Bucket=bucket, Prefix=store.prefix).get("Uploads", [])
    assert uploads == []
    with pytest.raises(ObjectNotFound):
        store.stat("big")
    store.close()


# -- missing(): HEADs and LISTs --------------------------------------------------------------
@pytest.mark.parametrize("page", [1000, 7])
def test_missing_by_listing_a_folder(
    s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch, page: int
) -> None:
    monkeypatch.setattr(s3_module, "LIST_PAGE", page)
    store = s3_backend(s3_server, bucket)
    present = {f"chunks/ab/ab{i:04d}" for i in range(0, 120, 2)} | {f"chunks/cd/cd{i}" for i in range(3)}
    for key in present:
        store.put(key, b"x")
    asked = {f"chunks/ab/ab{i:04d}" for i in range(10, 100)} | {f"chunks/cd/cd{i}" for i in range(5)}
    asked |= {f"chunks/ef/ef{i:04d}" for i in range(40)}  # an empty folder: one LIST answers it
    real_head, heads = store._client.head_object, list[str]()

    def head_object(**kwargs: object) -> object:
        heads.append(str(kwargs["Key"]))
        return real_head(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store._client, "head_object", head_object)
    assert store.missing(asked) == asked - present
    if page == 1000:  # ab/ and ef/ listed; only the 5 keys of cd/ were asked one by one
        assert sorted(heads) == sorted(store.prefix + f"chunks/cd/cd{i}" for i in range(5))
    assert store.missing([]) == set()
    store.close()
    top = S3Backend(  # a bucket used without a prefix: keys at its top level
        s3_server.make_bucket(),
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    for i in range(0, 60, 3):
        top.put(f"k{i:03d}", b"x")
    asked = {f"k{i:03d}" for i in range(60)}
    assert top.missing(asked) == {f"k{i:03d}" for i in range(60) if i % 3}
    top.close()


# -- errors -----------------------------------------------------------------------------------
def test_missing_bucket_is_bucket_not_found(s3_server: S3Server) -> None:
    store = open_backend("s3://no-such-bucket-here/repo", s3_server.options())
    for call in (
        lambda: store.put("config", b"x"),
        lambda: store.get("config"),
        lambda: list(store.list("chunks/")),
        store.capacity,
        lambda: Repository.init(store),
    ):
        with pytest.raises(BucketNotFound) as caught:
            call()
        assert "no-such-bucket-here" in str(caught.value)
    store.close()


def test_capacity_is_none_for_a_reachable_bucket(s3_server: S3Server, bucket: str) -> None:
    store = open_backend(f"s3://{bucket}/x", s3_server.options(bucket))
    assert store.capacity() is None
    store.close()


def test_bad_credentials_are_auth_failed_and_never_show_the_secret(s3_auth_server: S3AuthServer) -> None:
    server = s3_auth_server
    good = open_backend(f"s3://{server.bucket}/repo", server.options())
    good.put("k", b"v")
    assert good.get("k") == b"v"
    good.close()
    wrong_secret = "wrong-SECRET-" + uuid.uuid4().hex
    cases = {
        "unknown key": server.options(access_key="AKIAUNKNOWNKEY000000", secret_key=wrong_secret),
        "wrong secret": server.options(secret_key=wrong_secret),
        "no permission": server.options(server.denied_access_key, server.denied_secret_key),
    }
    for name, options in cases.items():
        store = open_backend(f"s3://{server.bucket}/repo", options)
        calls: list[Callable[[], object]] = [
            partial(store.put, "k", b"v"),
            partial(store.get, "k"),
            partial(store.stat, "k"),
            store.capacity,
        ]
        for call in calls:
            with pytest.raises(BackendAuthFailed) as caught:
                call()
            text = f"{caught.value} {caught.value!r} {caught.value.fields}"
            assert str(options["secretKey"]) not in text, name
            assert server.secret_key not in text
        store.close()


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        ("SlowDown", 503, BackendUnavailable),
        ("InternalError", 500, BackendUnavailable),
        ("ServiceUnavailable", 503, BackendUnavailable),
        ("RequestTimeout", 400, BackendUnavailable),
        ("502", 502, BackendUnavailable),
        ("InvalidAccessKeyId", 403, BackendAuthFailed),
        ("SignatureDoesNotMatch", 403, BackendAuthFailed),
        ("AccessDenied", 403, BackendAuthFailed),
        ("NoSuchKey", 404, ObjectNotFound),
        ("NoSuchBucket", 404, BucketNotFound),
        ("InvalidArgument", 400, BackendError),
    ],
)
def test_error_mapping(s3_server: S3Server, code: str, status: int, error: type[BackendError]) -> None:
    """The codes moto cannot be made to answer, through the same function the calls use."""
    store = S3Backend("b", "p", endpoint=s3_server.endpoint, access_key="AK", secret_key="s3cr3t-value")
    response = {
        "Error": {"Code": code, "Message": "the server said s3cr3t-value"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    mapped = store._error(ClientError(response, "GetObject"), "chunks/ab/abcd")  # type: ignore[arg-type]
    assert type(mapped) is error
    assert "s3cr3t-value" not in str(mapped)
    if error is BackendError:
        assert code in str(mapped)
    store.close()


def test_server_down_is_unavailable_quickly_then_recovers(s3_server: S3Server, bucket: str) -> None:
    store = RetryingBackend(s3_backend(s3_server, bucket, connect_timeout=1.0), attempts=2, max_seconds=2.0)
    store.put("before", b"kept")
    s3_server.down()
    started = time.monotonic()
    for call in (lambda: store.put("during", b"x"), lambda: store.get("before"), lambda: store.missing(["before"])):
        with pytest.raises(BackendUnavailable):
            call()
    assert time.monotonic() - started < 10
    s3_server.up()
    assert store.get("before") == b"kept"  # moto kept the data; the client reconnects by itself
    store.put("after", b"y")
    assert store.missing(["before", "after", "during"]) == {"during"}
    store.close()


# -- whole repositories -----------------------------------------------------------------------
MARKER = b"BLOCKVAULT-PLAINTEXT-MARKER"


def test_encrypted_repository_round_trip(
    s3_server: S3Server, bucket: str, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    volume = make_raw(size=12 * MiB, seed=5)
    with open(volume, "r+b") as handle:
        handle.seek(MiB)
        handle.write(b"".join(MARKER + b" %08d\n" % i for i in range(20_000)))
    prefix = f"enc-{uuid.uuid4().hex}"
    location = f"s3://{bucket}/{prefix}"
    with Repository.init(open_backend(location, s3_server.options(bucket)), encrypt=True, passphrase="pw") as repo:
        result = backup_volume(repo, str(volume))
    with Repository.open(open_backend(location, s3_server.options(bucket)), passphrase="pw") as repo:
        assert [entry.id for entry in repo.backups()] == [result.id]
        target = tmp_path / "out.raw"
        restore_backup(repo, result.id, str(target))
    assert target.read_bytes() == volume.read_bytes()
    with pytest.raises(WrongPassphrase):
        Repository.open(open_backend(location, s3_server.options(bucket)), passphrase="not it")
    stored = bucket_objects(s3_server, bucket, prefix + "/")
    assert any(key.startswith(f"{prefix}/chunks/") for key in stored)
    assert MARKER in volume.read_bytes()
    assert not [key for key, data in stored.items() if MARKER in data]


def test_sync_into_s3_resumes_after_an_outage(
    s3_server: S3Server, bucket: str, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    src = Repository.init(str(tmp_path / "src"))
    volume = tmp_path / "vol.raw"
    volume.write_bytes(os.urandom(48 * MiB))  # 12 incompressible chunks
    backup = backup_volume(src, str(volume))
    location = f"s3://{bucket}/sync-{uuid.uuid4().hex}"

    def target() -> Backend:  # a short retry policy: the outage outlasts it
        inner = S3Backend.from_url(location, s3_server.options(bucket))
        return RetryingBackend(inner, attempts=2, max_seconds=2.0)

    dst = Repository.init(target(), like=src)

    def cut_off(count: int, total: int) -> None:
        if count == 4:
            s3_server.down()

    with pytest.raises(BackendUnavailable):  # paced, so that the outage lands mid-way
        sync(src, dst, progress=cut_off, bandwidth_limit=40 * MiB)
    s3_server.up()
    assert dst.manifest_ids() == []  # chunks first, manifest last: no half backup listed
    stored_before = len(list(dst.backend.list("chunks/")))
    assert 4 <= stored_before < 12

    sent_before = s3_server.bytes_in()
    report = sync(src, dst)
    sent = s3_server.bytes_in() - sent_before
    assert report.backups == [backup.id]
    assert report.chunksCopied == 12 - stored_before
    # Only the missing chunks went over the wire again (plus requests and the manifest).
    assert report.bytesCopied <= sent <= report.bytesCopied + 512 * 1024
    assert sent < (12 - stored_before + 1) * 4 * MiB + 512 * 1024
    dst.close()

    with Repository.open(target()) as again:
        assert again.manifest_ids() == [backup.id]
        out = tmp_path / "out.raw"
        restore_backup(again, backup.id, str(out))
    assert out.read_bytes() == volume.read_bytes()
    src.close()


def test_a_child_forked_while_another_thread_makes_a_client_can_make_its_own() -> None:
    """A worker's pool forks while its storage health thread makes an S3 client: the child
    must not inherit the client lock held (it hung at its first S3 backend for ever)."""
    from shared.repository.backends import s3

    s3._client_lock.acquire()  # the health thread, inside _new_client at fork time
    try:
        pid = os.fork()
        if pid == 0:  # the child: its own lock is free at once, whatever the parent's thread does
            os._exit(0 if s3._client_lock.acquire(blocking=False) else 1)
    finally:
        s3._client_lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
