"""The http backend against real storage-server processes: tokens, append-only, TLS, ranges,
a server killed and restarted, and whole repositories (backup, restore, sync) over http."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from shared.errors import (
    BackendAuthFailed,
    BackendError,
    BackendForbidden,
    BackendUnavailable,
    ObjectNotFound,
    StorageFull,
    UsageError,
)
from shared.repository.backends import RetryingBackend, open_backend
from shared.repository.backends.http import MISSING_BATCH, STATUS_TABLE, HttpBackend, Status, _file_stamp, tls_context
from shared.repository.backup import backup_volume
from shared.repository.maintenance import Policy, gc, prune
from shared.repository.repo import Repository, manifest_key
from shared.repository.restore import restore_backup
from shared.repository.sync import sync
from tests.conftest import ROOT, MiB
from tests.storage_server_fixtures import StorageServer

Start = Callable[..., StorageServer]


def test_wrong_token_is_auth_failed_and_never_shown(start_storage_server: Start, tmp_path: Path) -> None:
    server = start_storage_server(tmp_path / "root", token="the-right-token-4711")
    wrong = server.backend("r", token="a-wrong-token-0815")
    with pytest.raises(BackendAuthFailed) as caught:
        wrong.put("k", b"x")
    assert "rejected" in str(caught.value)
    for secret in ("a-wrong-token-0815", "the-right-token-4711"):
        assert secret not in str(caught.value)
        assert secret not in server.log.read_text()
    with pytest.raises(BackendAuthFailed):
        wrong.list("chunks/").__next__()
    assert httpx.get(f"{server.url}/v1/health").json() == {"status": "ok"}  # no token needed
    assert server.backend("r").capacity() is not None


def test_append_only_adds_but_never_overwrites_or_deletes(start_storage_server: Start, tmp_path: Path) -> None:
    server = start_storage_server(tmp_path / "root", append_only=True, admin_token="admin-secret-1")
    appender = server.backend("repo")
    appender.create()
    appender.put("chunks/aa/aa1", b"first")
    appender.put("chunks/aa/aa1", b"again", overwrite=False)  # a duplicate chunk: fine, kept
    assert appender.get("chunks/aa/aa1") == b"first"
    with pytest.raises(BackendForbidden):
        appender.put("chunks/aa/aa1", b"second")
    with pytest.raises(BackendForbidden):
        appender.delete("chunks/aa/aa1")
    assert appender.get("chunks/aa/aa1") == b"first"
    lock = {"kind": "shared", "purpose": "backup", "host": "h", "pid": 1, "pstart": "1", "created": time.time()}
    appender.put("locks/l1", json.dumps({**lock, "refreshed": lock["created"]}).encode())  # lock files: write,
    appender.put("locks/l1", json.dumps({**lock, "refreshed": time.time()}).encode())  # refresh, remove
    appender.delete("locks/l1")
    assert not appender.exists("locks/l1")
    admin = server.backend("repo", token="admin-secret-1")
    admin.put("chunks/aa/aa1", b"rewritten")
    admin.delete("chunks/aa/aa1")
    assert appender.missing(["chunks/aa/aa1"]) == {"chunks/aa/aa1"}


def test_ranged_reads(storage_server: StorageServer) -> None:
    store = storage_server.backend("ranges")
    store.create()
    big = os.urandom(5 * MiB)
    store.put("big", big)
    assert store.get("big", 4 * MiB + 3, 1000) == big[4 * MiB + 3 : 4 * MiB + 1003]
    assert store.get("big", 5 * MiB - 10) == big[-10:]
    assert store.get("big", 5 * MiB) == b""
    assert store.get("big", 0, 0) == b""
    assert store.get("big", 5 * MiB - 5, 100) == big[-5:]
    headers = {"authorization": f"Bearer {storage_server.token}"}
    url = f"{storage_server.url}/ranges/v1/objects/big"
    suffix = httpx.get(url, headers={**headers, "range": "bytes=-7"})
    assert suffix.status_code == 206 and suffix.content == big[-7:]
    assert suffix.headers["content-range"] == f"bytes {5 * MiB - 7}-{5 * MiB - 1}/{5 * MiB}"
    assert httpx.get(url, headers={**headers, "range": "lines=1-2"}).status_code == 400
    head = httpx.head(url, headers=headers)
    assert head.status_code == 200 and int(head.headers["x-object-size"]) == 5 * MiB


def test_repositories_on_one_server_are_separate(storage_server: StorageServer) -> None:
    a, b, bare = storage_server.backend("site-a"), storage_server.backend("site-b"), storage_server.backend()
    with pytest.raises(BackendError) as caught:
        a.put("config", b"a")  # only Repository.init (create) makes a repository's folder
    assert "410" in str(caught.value) and not isinstance(caught.value, BackendUnavailable)
    a.create()
    b.create()
    bare.create()
    a.put("config", b"a")
    b.put("config", b"b")
    assert (a.get("config"), b.get("config")) == (b"a", b"b")
    assert (storage_server.root / "site-a" / "config").read_bytes() == b"a"
    assert bare.get("site-b/config") == b"b"  # the bare URL is the root itself
    with pytest.raises(UsageError):
        HttpBackend(f"{storage_server.url}/../x", "t")
    with pytest.raises(UsageError):
        open_backend(f"{storage_server.url}/site-a", {})  # no token anywhere
    with pytest.raises(UsageError):
        HttpBackend(f"http://user:pw@127.0.0.1:{storage_server.port}/x", "t")


def test_missing_is_one_request_per_thousand_keys_and_list_streams(storage_server: StorageServer) -> None:
    store = storage_server.backend("batch")
    store.create()
    keys = [f"chunks/{i % 256:02x}/{i:064x}" for i in range(2 * MISSING_BATCH + 500)]
    for key in keys[::100]:
        store.put(key, b"x" * 10)
    before = storage_server.stats()["requests"]
    assert store.missing(keys) == set(keys) - set(keys[::100])
    assert storage_server.stats()["requests"] - before == 3 + 1  # three batches (+ this stats call)
    for i in range(3000):  # a listing longer than one streamed block
        store.put(f"many/{i:05d}", b"")
    listed = {info.key for info in store.list("many/")}
    assert listed == {f"many/{i:05d}" for i in range(3000)}


def test_object_over_the_size_limit_is_refused(start_storage_server: Start, tmp_path: Path) -> None:
    server = start_storage_server(tmp_path / "root", extra_args=("--max-object-size", "1000"))
    store = server.backend("r")
    store.create()
    store.put("small", b"x" * 1000)
    with pytest.raises(BackendError) as caught:
        store.put("large", b"x" * 1001)
    assert not isinstance(caught.value, BackendUnavailable)
    assert "413" in str(caught.value)
    assert store.missing(["large"]) == {"large"}


def test_tls_with_a_self_signed_certificate(start_storage_server: Start, tmp_path: Path) -> None:
    server = start_storage_server(tmp_path / "root", tls=True)
    assert server.url.startswith("https://")
    trusted = open_backend(f"{server.url}/r", {"token": server.token, "cafile": server.cafile})
    trusted.create()
    trusted.put("k", b"over tls")
    assert trusted.get("k") == b"over tls"
    untrusted = open_backend(f"{server.url}/r", {"token": server.token})
    with pytest.raises(BackendError) as caught:
        untrusted.get("k")
    assert not isinstance(caught.value, BackendUnavailable)  # not retried: it cannot get better
    assert "certificate" in str(caught.value) and "cafile" in str(caught.value)
    plain = HttpBackend(server.url.replace("https:", "http:") + "/r", server.token)
    with pytest.raises(BackendError):
        plain.get("k")


def test_the_tls_context_is_made_once_per_ca_file_and_again_when_the_file_changes(
    start_storage_server: Start, tmp_path: Path
) -> None:
    first = start_storage_server(tmp_path / "one", tls=True)
    second = start_storage_server(tmp_path / "two", tls=True)
    assert first.cafile and second.cafile
    ca = tmp_path / "ca.pem"
    ca.write_bytes(Path(first.cafile).read_bytes())
    made = tls_context(str(ca), _file_stamp(str(ca)))
    assert tls_context(str(ca), _file_stamp(str(ca))) is made  # not loaded again per backend
    trusted = open_backend(f"{first.url}/r", {"token": first.token, "cafile": str(ca)})
    trusted.create()
    assert trusted.exists("config") is False
    # the operator puts another CA in the same file: the next backend trusts that one only
    ca.write_bytes(Path(second.cafile).read_bytes() + b"\n")
    assert tls_context(str(ca), _file_stamp(str(ca))) is not made
    with pytest.raises(BackendError) as caught:
        open_backend(f"{first.url}/r", {"token": first.token, "cafile": str(ca)}).exists("config")
    assert "certificate" in str(caught.value)
    again = open_backend(f"{second.url}/r", {"token": second.token, "cafile": str(ca)})
    again.create()
    assert again.exists("config") is False


def test_killed_server_is_unavailable_then_works_again(start_storage_server: Start, tmp_path: Path) -> None:
    server = start_storage_server(tmp_path / "root")
    store = RetryingBackend(server.backend("r"), attempts=2, max_seconds=1)
    store.create()
    store.put("k", b"before")
    server.kill()
    with pytest.raises(BackendUnavailable):
        store.get("k")
    with pytest.raises(BackendUnavailable):
        store.capacity()
    server.start()
    assert store.get("k") == b"before"  # a stale pooled connection is retried away
    store.put("k2", b"after")
    assert store.missing(["k", "k2", "k3"]) == {"k3"}


def test_repository_round_trip_over_http(
    start_storage_server: Start, make_raw: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_storage_server(tmp_path / "root")
    monkeypatch.setenv("BLOCKVAULT_STORAGE_TOKEN", server.token)
    url = f"{server.url}/site-a"
    volume = make_raw(size=16 * MiB)
    with Repository.init(url) as repository:
        result = backup_volume(repository, str(volume))
    with Repository.open(url) as repository:
        assert repository.manifest_ids() == [result.id]
        target = tmp_path / "restored.raw"
        restore_backup(repository, result.id, str(target))
    assert target.read_bytes() == volume.read_bytes()
    stats = server.stats()
    assert stats["objectsWritten"] >= result.newChunks + 2  # chunks, config, manifest
    assert stats["bytesReceived"] >= result.bytesWritten


@pytest.mark.parametrize("point", ["first chunk", "middle", "last chunk"])
def test_sync_into_http_sends_only_what_is_missing_after_a_kill(
    start_storage_server: Start, make_raw: Callable[..., Path], tmp_path: Path, point: str
) -> None:
    src = Repository.init(str(tmp_path / "src"), chunk_size=256 * 1024)
    backup = backup_volume(src, str(make_raw(size=24 * MiB)))
    chunks = {info.key: info.size for info in src.backend.list("chunks/")}
    manifest = src.backend.stat(manifest_key(backup.id)).size
    overhead = 32 * 1024 + 100 * len(chunks)  # lock files and the batch questions' bodies

    # Two configs and a lock are written first, then the chunks: the server SIGKILLs itself
    # right after storing the first chunk, the 17th, or the last one (before the manifest).
    kill_at = {"first chunk": 4, "middle": 20, "last chunk": 3 + len(chunks)}[point]
    server = start_storage_server(tmp_path / "remote", failpoints=f"storage_server.object_written={kill_at}:kill")
    # A clean sync (below) shows what the wire carries with no fault: the chunks, the manifest.
    clean = Repository.init(server.backend("clean"), like=src)
    target = Repository.init(RetryingBackend(server.backend("site-a"), attempts=2, max_seconds=1), like=src)
    assert clean.manifest_ids() == [] and target.manifest_ids() == []
    with pytest.raises(BackendUnavailable):
        sync(src, target)
    assert server.wait_dead() == -9
    server.start()

    assert target.manifest_ids() == []  # manifests go last: no backup it cannot restore
    present = {info.key for info in target.backend.list("chunks/")}
    assert 0 < len(present) <= len(chunks)
    assert (len(present) == len(chunks)) == (point == "last chunk")
    missing_bytes = sum(size for key, size in chunks.items() if key not in present)
    received = server.stats()["bytesReceived"]
    report = sync(src, target)
    resumed = server.stats()["bytesReceived"] - received
    assert report.backups == [backup.id]
    assert report.chunksCopied == len(chunks) - len(present)
    assert report.chunksVerified == 0  # a plain target: its server checked what it holds
    assert missing_bytes + manifest <= resumed <= missing_bytes + manifest + overhead
    assert target.manifest_ids() == [backup.id]

    before = server.stats()["bytesReceived"]
    full = sync(src, clean)
    sent = server.stats()["bytesReceived"] - before
    assert full.chunksCopied == len(chunks)
    assert sum(chunks.values()) + manifest <= sent <= sum(chunks.values()) + manifest + overhead
    assert resumed < sent

    restored = tmp_path / "restored.raw"
    restore_backup(target, backup.id, str(restored))
    assert restored.read_bytes() == (tmp_path / "vol.raw").read_bytes()


def test_cli_refuses_to_start_without_a_token_or_a_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "api.cli", "storage-server", *args]
        return subprocess.run(
            command, check=False, capture_output=True, text=True, env={**env, **extra}, cwd=ROOT, timeout=60
        )

    no_token = run("--root", str(tmp_path))
    assert no_token.returncode == 2
    assert no_token.stderr.strip().count("\n") == 0 and "token" in no_token.stderr
    no_root = run("--root", str(tmp_path / "absent"), BLOCKVAULT_STORAGE_TOKEN="t")
    assert no_root.returncode == 2
    assert no_root.stderr.strip().count("\n") == 0 and "not a folder" in no_root.stderr
    half_tls = run("--root", str(tmp_path), "--token", "t", "--tls-cert", str(tmp_path / "c.pem"))
    assert half_tls.returncode == 2 and "--tls-key" in half_tls.stderr


SITE_A, SITE_B, ADMIN = "site-a-token-1111", "site-b-token-2222", "admin-token-3333"


def test_site_token_backs_up_and_syncs_into_its_own_repository_append_only(
    start_storage_server: Start, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    server = start_storage_server(
        tmp_path / "root", site_tokens={"site-a": SITE_A, "site-b": SITE_B}, admin_token=ADMIN, global_token=False
    )
    with Repository.init(server.backend("site-a", token=SITE_A)) as site_a:
        first = backup_volume(site_a, str(make_raw(seed=1, size=8 * MiB)))
        again = backup_volume(site_a, str(make_raw(seed=1, size=8 * MiB)))  # every chunk deduplicated
        last = backup_volume(site_a, str(make_raw(seed=2, size=8 * MiB)))
        assert again.newChunks == 0
        # a compromised site cannot destroy its remote copies
        with pytest.raises(BackendForbidden):
            site_a.backend.delete(manifest_key(first.id))
        with pytest.raises(BackendForbidden):
            site_a.backend.put("config", b"{}")
        with pytest.raises(BackendForbidden):
            prune(site_a, Policy(keep_last=1))
        assert sorted(site_a.manifest_ids()) == sorted([first.id, again.id, last.id])
        assert not list(site_a.backend.list("locks/"))  # its lock files it did remove

    src = Repository.init(str(tmp_path / "src"))
    synced = backup_volume(src, str(make_raw(name="other.raw", seed=3, size=8 * MiB)))
    target = Repository.init(server.backend("site-b", token=SITE_B), like=src)
    assert sync(src, target).backups == [synced.id]
    assert sync(src, target).chunksCopied == 0
    restored = tmp_path / "restored.raw"
    restore_backup(target, synced.id, str(restored))
    assert restored.read_bytes() == (tmp_path / "other.raw").read_bytes()

    with Repository.open(server.backend("site-a", token=ADMIN)) as admin:  # prune and gc need the admin
        assert sorted(prune(admin, Policy(keep_last=1)).removed) == sorted([first.id, again.id])
        assert gc(admin).chunksDeleted > 0
    with Repository.open(server.backend("site-a", token=SITE_A)) as site_a:
        assert site_a.manifest_ids() == [last.id]
        restore_backup(site_a, last.id, str(tmp_path / "last.raw"))
    assert (tmp_path / "last.raw").read_bytes() == (tmp_path / "vol.raw").read_bytes()


def test_site_token_opens_no_other_repository(start_storage_server: Start, tmp_path: Path) -> None:
    server = start_storage_server(  # the refusals below are many: not throttled here (test_http_server.py)
        tmp_path / "root",
        site_tokens={"a": SITE_A, "dc1/b": SITE_B},
        admin_token=ADMIN,
        extra_args=("--auth-max-failures", "1000"),
    )
    a, b = server.backend("a", token=SITE_A), server.backend("dc1/b", token=SITE_B)
    for store in (a, b):
        store.create()
        store.put("config", b"mine")
    assert a.capacity() is not None
    a_elsewhere = [server.backend(prefix, token=SITE_A) for prefix in ("dc1/b", "", "dc1", "a/sub", "absent")]
    for store in a_elsewhere:
        with pytest.raises(BackendAuthFailed):
            store.get("config")
        with pytest.raises(BackendAuthFailed):
            next(iter(store.list("")))
        with pytest.raises(BackendAuthFailed):
            store.missing(["config"])
        with pytest.raises(BackendAuthFailed):
            store.create()
        with pytest.raises(BackendAuthFailed):
            store.put("config", b"theirs")
    with pytest.raises(BackendAuthFailed):
        server.backend("a", token=SITE_B).get("config")
    assert not (server.root / "a" / "sub").exists() and not (server.root / "absent").exists()
    # another site's repository and one that does not exist are refused alike
    other, absent, wrong = (
        httpx.get(f"{server.url}/{path}/v1/objects/config", headers={"authorization": f"Bearer {token}"})
        for path, token in (("dc1/b", SITE_A), ("nobody", SITE_A), ("dc1/b", "not-a-token"))
    )
    assert other.status_code == absent.status_code == wrong.status_code == 401
    assert other.json() == absent.json() == wrong.json()
    stats = httpx.get(f"{server.url}/a/v1/stats", headers={"authorization": f"Bearer {SITE_A}"})
    assert stats.status_code == 403  # server-wide counters tell of the other sites
    # the global token works as before: every repository, the root, full rights
    assert server.backend("dc1/b").get("config") == b"mine"
    assert {info.key for info in server.backend().list("")} == {"a/config", "dc1/b/config"}
    server.backend("a").put("config", b"replaced")
    assert server.backend("a", token=ADMIN).get("config") == b"replaced"
    server.backend("dc1/b", token=ADMIN).delete("config")
    assert server.stats()["requests"] > 0
    for secret in (SITE_A, SITE_B, ADMIN, server.token):
        assert secret not in server.log.read_text()


def test_cli_refuses_malformed_site_tokens(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}

    def refused(*args: str, sites: str | None = None) -> str:
        extra = {} if sites is None else {"BLOCKVAULT_STORAGE_SITE_TOKENS": sites}
        command = [sys.executable, "-m", "api.cli", "storage-server", "--root", str(tmp_path), *args]
        done = subprocess.run(
            command, check=False, capture_output=True, text=True, env={**env, **extra}, cwd=ROOT, timeout=60
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().count("\n") == 0, done.stderr
        assert "secret-" not in done.stderr  # never a token in the message
        return done.stderr

    assert "NAME=TOKEN" in refused("--site-token", "secret-without-a-name")
    assert "NAME=TOKEN" in refused("--site-token", "a=")
    assert "valid repository name" in refused("--site-token", "../up=secret-1")
    assert "valid repository name" in refused("--site-token", "a/v1=secret-1")
    assert "printable" in refused("--site-token", "a=secret- 1")
    assert "twice" in refused(sites="a=secret-1,a=secret-2")
    assert "nest" in refused(sites="a=secret-1,a/b=secret-2")
    assert "same as" in refused("--site-token", "a=secret-1", "--admin-token", "secret-1")
    assert "--append-only" in refused("--append-only", "--site-token", "a=secret-1")
    assert "token" in refused(sites=" , ")


def test_listing_everything_stays_inside_the_repository(storage_server: StorageServer) -> None:
    store = storage_server.backend("inside")
    store.create()
    store.put("config", b"c")
    store.put("chunks/aa/aa1", b"x")
    assert {info.key for info in store.list("")} == {"config", "chunks/aa/aa1"}
    headers = {"authorization": f"Bearer {storage_server.token}"}
    for bad in ("../", "/etc/", "a/../../"):
        answer = httpx.get(f"{storage_server.url}/inside/v1/list", params={"prefix": bad}, headers=headers)
        assert answer.status_code == 400
    # ".." percent-encoded, so that the client sends it rather than resolving it: every one is a
    # bad repository name or key, 400 (docs/storage-server.md), never a lookup elsewhere
    for path in (
        "/%2e%2e/v1/objects/x",
        "/inside/%2e%2e/v1/objects/x",
        "/inside/v1/objects/a/%2e%2e/%2e%2e/x",
        "/inside/v1/objects/",
    ):
        answer = httpx.get(f"{storage_server.url}{path}", headers=headers)
        assert (answer.status_code, answer.json()["error"]) == (400, "bad_request"), (path, answer.text)


def test_status_table_maps_every_status_to_one_error() -> None:
    for status, (meaning, error) in STATUS_TABLE.items():
        assert meaning and status.meaning == meaning
        if status < 300 or status == Status.RANGE_PAST_END:
            assert error is None
        else:
            assert Status.error_for(status) is error
    assert Status.error_for(502) is BackendUnavailable and Status.error_for(504) is BackendUnavailable
    assert Status.error_for(405) is BackendError
    assert Status.for_error(ObjectNotFound(location="x", key="k")) == Status.NOT_FOUND
    assert Status.for_error(BackendUnavailable(location="x", detail="d")) == Status.UNAVAILABLE
    assert Status.for_error(BackendError(location="x", detail="d")) == Status.SERVER_ERROR
    assert Status.for_error(StorageFull(location="x", detail="d")) == Status.INSUFFICIENT_STORAGE
