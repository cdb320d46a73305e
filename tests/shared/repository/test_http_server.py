"""The storage server against a holder of a site (append-only) token, with real server
processes: lock objects are checked, objects of a plain repository must match their names,
and bad tokens are throttled per address without ever refusing a good one."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.errors import BackendAuthFailed, BackendError, BackendForbidden, BackendUnavailable
from shared.repository.backends.http_checks import Place, classify, read_rules
from shared.repository.backup import backup_volume
from shared.repository.keys import KeyMaterial, ObjectCodec
from shared.repository.locks import CLOCK_SKEW_SECONDS, LOCK_MAX_BYTES, MAX_PURPOSE
from shared.repository.maintenance import gc
from shared.repository.repo import Repository, chunk_key, manifest_key
from shared.repository.restore import restore_backup
from tests.conftest import MiB
from tests.storage_server_fixtures import StorageServer

Start = Callable[..., StorageServer]
SITE, ADMIN = "site-a-token-1111", "admin-token-3333"
PLAIN = ObjectCodec(KeyMaterial(None, None))


def site_server(start: Start, root: Path, *extra: str) -> StorageServer:
    return start(root, site_tokens={"site-a": SITE}, admin_token=ADMIN, global_token=False, extra_args=extra)


def put(server: StorageServer, key: str, body: bytes, token: str = SITE, repository: str = "site-a") -> httpx.Response:
    url = f"{server.url}/{repository}/v1/objects/{key}"
    return httpx.put(url, content=body, headers={"authorization": f"Bearer {token}"})


def lock(**changes: Any) -> bytes:
    now = time.time()
    body = {"kind": "shared", "purpose": "backup", "host": "h1", "pid": 7, "pstart": "9", "created": now}
    return json.dumps({**body, "refreshed": now, **changes}).encode()


def test_a_site_token_cannot_plant_a_lock_that_blocks_or_crashes_readers(
    start_storage_server: Start, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    server = site_server(start_storage_server, tmp_path / "root")
    repository = Repository.init(server.backend("site-a", token=SITE))
    future = time.time() + 10 * 365 * 86400
    refused = {
        "future": (lock(refreshed=future), 400, "in the future"),
        "created-future": (lock(created=future, refreshed=future), 400, "in the future"),
        "strings": (lock(created="2026-01-01", refreshed="2036-01-01"), 400, "created must be"),
        "list": (b"[1, 2]", 400, "not a JSON object"),
        "not-json": (b"lock", 400, "not JSON"),
        "purpose-long": (lock(purpose="p" * (MAX_PURPOSE + 1)), 400, "purpose must be"),
        "purpose-huge": (lock(purpose="p" * LOCK_MAX_BYTES), 413, "over the limit"),
        "pid-text": (lock(pid="7"), 400, "pid must be"),
        "extra-field": (lock(until=future), 400, "fields must be exactly"),
        "backwards": (lock(created=time.time(), refreshed=time.time() - 60), 400, "before created"),
        "exclusive": (lock(kind="exclusive"), 403, "exclusive lock"),
    }
    for name, (body, status, detail) in refused.items():
        answer = put(server, f"locks/{name}", body)
        assert (answer.status_code, name) == (status, name)
        assert detail in answer.json()["detail"], answer.json()
    assert put(server, "locks/skewed", lock(refreshed=time.time() + CLOCK_SKEW_SECONDS / 2)).status_code == 201
    assert put(server, "locks/gc", lock(kind="exclusive"), token=ADMIN).status_code == 201  # gc's token may
    assert put(server, "locks/admin-future", lock(refreshed=future), token=ADMIN).status_code == 400
    stored = {info.key for info in repository.backend.list("locks/")}
    assert stored == {"locks/skewed", "locks/gc"}  # nothing refused was written
    assert not list((server.root / "site-a" / "tmp").iterdir())
    with pytest.raises(BackendError) as caught:  # the client: a permanent error, not retried
        repository.backend.put("locks/x", lock(refreshed=future))
    assert not isinstance(caught.value, BackendUnavailable) and "in the future" in str(caught.value)
    with pytest.raises(BackendForbidden):
        repository.backend.put("locks/y", lock(kind="exclusive"))
    admin = Repository.open(server.backend("site-a", token=ADMIN))
    for key in stored:
        admin.backend.delete(key)
    backup_volume(repository, str(make_raw(size=4 * MiB)))  # the site's own locks pass the checks
    assert gc(admin).chunksKept > 0
    assert "storage_server.object_refused" in server.log.read_text()


def chunk_digests(volume: Path, chunk_size: int) -> list[str]:
    """The names the chunks of ``volume`` get in a plain repository (all-zero chunks are not stored)."""
    data = volume.read_bytes()
    pieces = (data[offset : offset + chunk_size] for offset in range(0, len(data), chunk_size))
    return [PLAIN.digest(piece).hex() for piece in pieces if piece.count(0) != len(piece)]


def test_a_garbage_chunk_under_the_name_of_a_chunk_to_come_is_refused(
    start_storage_server: Start, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    server = site_server(start_storage_server, tmp_path / "root")
    repository = Repository.init(server.backend("site-a", token=SITE), chunk_size=256 * 1024)
    backup_volume(repository, str(make_raw(size=4 * MiB)))
    volume = make_raw(name="next.raw", seed=7, size=4 * MiB)
    coming = chunk_digests(volume, repository.chunk_size)
    target = next(digest for digest in coming if repository.missing_chunks([digest]))  # the next backup needs it
    other = os.urandom(1000)
    garbage = {
        "random bytes": os.urandom(5000),
        "a zstd frame of other bytes": bytes(PLAIN.encode(PLAIN.digest(other), other)),
        "a stored copy of other bytes": b"\x02" + other,
        "a sealed object": b"\x01" + os.urandom(100),
    }
    for name, body in garbage.items():
        answer = put(server, chunk_key(target), body)
        assert (answer.status_code, answer.json()["error"], name) == (400, "integrity", name)
        assert target in answer.json()["detail"]
    assert repository.missing_chunks([target]) == {target}  # nothing written
    manifest_id = PLAIN.digest(b"{}").hex()
    assert put(server, manifest_key(manifest_id), os.urandom(64)).json()["error"] == "integrity"
    shapes = [
        f"chunks/zz/{target}",
        f"chunks/{target[:2]}/{target[:40]}",
        "chunks/x",
        "manifests/not-hex",
        f"manifests/{target}/x",
    ]
    for key in shapes:
        answer = put(server, key, b"x")
        assert (answer.status_code, answer.json()["error"], key) == (400, "bad_request", key)
    with pytest.raises(BackendError) as caught:
        repository.backend.put(chunk_key(target), b"\x00garbage")
    assert "integrity" in str(caught.value) and not isinstance(caught.value, BackendUnavailable)

    result = backup_volume(repository, str(volume))  # the real chunk still goes in
    restored = tmp_path / "restored.raw"
    restore_backup(repository, result.id, str(restored))
    assert restored.read_bytes() == volume.read_bytes()
    assert "storage_server.object_refused" in server.log.read_text()


def test_an_encrypted_repository_is_checked_for_names_only(start_storage_server: Start, tmp_path: Path) -> None:
    server = site_server(start_storage_server, tmp_path / "root")
    Repository.init(server.backend("site-a", token=SITE), encrypt=True, passphrase="pw")
    name = os.urandom(32).hex()
    assert put(server, chunk_key(name), os.urandom(100)).status_code == 201  # no keys: cannot tell
    assert put(server, f"chunks/{name[:2]}/{name[:-1]}", os.urandom(100)).status_code == 400


def test_bad_tokens_are_throttled_per_address_but_good_ones_always_served(
    start_storage_server: Start, tmp_path: Path
) -> None:
    # a window far longer than the test: the address stays throttled however slow the machine
    window = 3600
    server = site_server(
        start_storage_server, tmp_path / "root", "--auth-max-failures", "3", "--auth-failure-window", str(window)
    )
    good = server.backend("site-a", token=SITE)
    good.create()
    url = f"{server.url}/site-a/v1/objects/config"
    for _ in range(3):
        assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    throttled = httpx.get(url, headers={"authorization": "Bearer wrong"})
    assert throttled.status_code == 429 and 1 <= int(throttled.headers["retry-after"]) <= window
    assert httpx.get(url).status_code == 429  # no token at all
    other_site = httpx.get(f"{server.url}/site-b/v1/objects/config", headers={"authorization": f"Bearer {SITE}"})
    assert other_site.status_code == 429  # a token for another repository is a wrong token here
    good.put("config", b"{}")  # a valid token from the same address: served
    assert server.backend("site-a", token=ADMIN).get("config") == b"{}"
    with pytest.raises(BackendAuthFailed) as caught:
        server.backend("site-a", token="wrong").get("config")
    assert "refused for" in str(caught.value) and "wrong" not in str(caught.value)
    assert httpx.get(f"{server.url}/v1/health").status_code == 200
    assert "storage_server.auth_throttled client=127.0.0.1" in server.log.read_text()
    assert "wrong" not in server.log.read_text().replace("wrong or missing", "")


def test_a_throttled_address_is_heard_again_once_its_window_passes(start_storage_server: Start, tmp_path: Path) -> None:
    """The window's end, through a real server (its arithmetic is tests/shared/test_ratelimit.py's,
    on a fake clock): nothing here asserts how long a step takes, it waits for each state."""
    window = 2
    server = site_server(
        start_storage_server, tmp_path / "root", "--auth-max-failures", "3", "--auth-failure-window", str(window)
    )
    url = f"{server.url}/site-a/v1/objects/config"

    def answers_until(status: int) -> list[httpx.Response]:
        """Bad tokens until one is answered ``status`` (each 401 counts as a failure)."""
        answers: list[httpx.Response] = []
        deadline = time.monotonic() + 120
        while not answers or answers[-1].status_code != status:
            assert time.monotonic() < deadline, [answer.status_code for answer in answers]
            answers.append(httpx.get(url, headers={"authorization": "Bearer wrong"}))
            if status == 401 and answers[-1].status_code == 429:
                time.sleep(0.1)
        return answers

    # three failures within the window (on a machine too slow for that, more): throttled
    assert {answer.status_code for answer in answers_until(429)} == {401, 429}
    refused = answers_until(401)  # the window passes: the address is heard again
    assert all(answer.status_code == 429 for answer in refused[:-1])
    assert all(1 <= int(answer.headers["retry-after"]) <= window for answer in refused[:-1])
    assert "storage_server.auth_throttled client=127.0.0.1" in server.log.read_text()


def test_places_follow_the_repository_layout(tmp_path: Path) -> None:
    digest = "ab" + "0" * 62
    assert classify(tmp_path, "site-a", chunk_key(digest)) == Place(tmp_path / "site-a", "chunks", ("ab", digest))
    assert classify(tmp_path, "", f"dc1/b/manifests/{digest}") == Place(tmp_path / "dc1/b", "manifests", (digest,))
    assert classify(tmp_path, "", "site-a/locks/l1") == Place(tmp_path / "site-a", "locks", ("l1",))
    assert classify(tmp_path, "x/locks", "config") is None  # the repository's own name does not count
    assert classify(tmp_path, "r", "locks") is None and classify(tmp_path, "r", "tmp/abc") is None
    config = tmp_path / "config"
    for text, plain in (
        ('{"encryption": "none", "naming": "blake3", "chunkSize": 4096}', True),
        ('{"encryption": "none", "naming": "blake3-keyed", "chunkSize": 4096}', True),  # open() ignores naming
        ('{"encryption": "aes-256-gcm", "naming": "blake3-keyed", "chunkSize": 4096}', False),
    ):
        config.write_text(text)
        rules = read_rules(config)
        assert rules is not None and rules.chunk_size == 4096 and (rules.codec is not None) == plain
    for text in ("[]", "not json", '{"encryption": "none"}', '{"encryption": "none", "chunkSize": "4096"}'):
        config.write_text(text)
        assert read_rules(config) is None
    assert read_rules(tmp_path / "absent") is None
