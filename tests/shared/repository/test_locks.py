"""Repository locks as readers see them: planted, malformed and stale locks never block or
crash a backup or gc, whether the reader may remove them or not; and what a storage server
accepts (accept_lock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.errors import BackendForbidden, MalformedLock, RepositoryLocked
from shared.repository import locks
from shared.repository.backends import FileBackend
from shared.repository.backup import backup_volume
from shared.repository.locks import (
    CLOCK_SKEW_SECONDS,
    HOSTNAME,
    LOCK_MAX_BYTES,
    MAX_PURPOSE,
    STALE_SECONDS,
    accept_lock,
    parse_lock,
    read_locks,
    repository_lock,
)
from shared.repository.maintenance import gc
from shared.repository.repo import Repository
from tests.conftest import MiB


def lock_body(**changes: Any) -> dict[str, Any]:
    """A lock as repository_lock writes it (another host's, refreshed now), with ``changes``."""
    now = time.time()
    body = {
        "kind": "shared",
        "purpose": "backup of /v",
        "host": "elsewhere",
        "pid": 4242,
        "pstart": "77",
        "created": now,
        "refreshed": now,
    }
    body.update(changes)
    return body


def plant(repo: Repository, name: str, content: bytes | dict[str, Any], *, age: float = 0.0) -> str:
    """Write a lock object straight into the repository's folder, as no server would check it;
    ``age``: seconds since the storage last wrote it (its modification time)."""
    key = f"locks/{name}"
    repo.backend.put(key, content if isinstance(content, bytes) else json.dumps(content).encode())
    if age:
        written = time.time() - age
        os.utime(Path(repo.backend.location) / key, (written, written))
    return key


def lock_keys(repo: Repository) -> set[str]:
    return {info.key for info in repo.backend.list("locks/")}


FAR_FUTURE = time.time() + 10 * 365 * 86400
MALFORMED: dict[str, bytes | dict[str, Any]] = {
    "not-json": b"{not json",
    "not-utf8": b"\xff\xfe{}",
    "a-list": b"[1, 2, 3]",
    "a-string": b'"shared"',
    "nested-deep": b"[" * 5000 + b"]" * 5000,
    "times-as-strings": lock_body(created="yesterday", refreshed="now"),
    "time-nan": b'{"kind": "shared", "purpose": "p", "host": "h", "pid": 1, "pstart": "1", '
    b'"created": NaN, "refreshed": NaN}',
    "time-huge": lock_body(created=1e300, refreshed=1e300),
    "time-negative": lock_body(created=-5.0, refreshed=-1.0),
    "pid-bool": lock_body(pid=True),
    "pid-string": lock_body(pid="4242"),
    "pid-zero": lock_body(pid=0),
    "kind-other": lock_body(kind="forever"),
    "purpose-huge": lock_body(purpose="x" * (MAX_PURPOSE + 1)),
    "purpose-number": lock_body(purpose=5),
    "host-empty": lock_body(host=""),
    "pstart-letters": lock_body(pstart="abc"),
    "field-missing": {k: v for k, v in lock_body().items() if k != "pstart"},
    "field-extra": lock_body(expires=FAR_FUTURE),
    "refreshed-before-created": lock_body(created=time.time(), refreshed=time.time() - 10),
    "oversized": lock_body(purpose="y" * (2 * LOCK_MAX_BYTES)),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_parse_lock_refuses_anything_repository_lock_would_not_write(name: str) -> None:
    content = MALFORMED[name]
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    with pytest.raises(MalformedLock) as caught:
        parse_lock(f"locks/{name}", data)
    assert f"locks/{name}" in str(caught.value)


def test_parse_lock_takes_what_repository_lock_writes(repo: Repository) -> None:
    with repository_lock(repo.backend, "shared", "p" * (3 * MAX_PURPOSE)):  # a long purpose is cut
        (key,) = lock_keys(repo)
        record = parse_lock(key, repo.backend.get(key))
    assert record.host == HOSTNAME and record.pid == os.getpid() and len(record.purpose) == MAX_PURPOSE
    assert record.created == record.refreshed and record.pstart.isdigit()
    accept_lock(key, json.dumps(lock_body(purpose="ü" * MAX_PURPOSE, host="h" * 255)).encode(), time.time())


def test_accept_lock_allows_clock_skew_but_not_the_future() -> None:
    now = time.time()
    ahead = json.dumps(lock_body(created=now, refreshed=now + CLOCK_SKEW_SECONDS - 5)).encode()
    assert accept_lock("locks/a", ahead, now).refreshed == now + CLOCK_SKEW_SECONDS - 5
    planted = json.dumps(lock_body(created=now, refreshed=FAR_FUTURE)).encode()
    with pytest.raises(MalformedLock, match="in the future"):
        accept_lock("locks/b", planted, now)
    both = json.dumps(lock_body(created=now + 2 * CLOCK_SKEW_SECONDS, refreshed=now + 2 * CLOCK_SKEW_SECONDS)).encode()
    with pytest.raises(MalformedLock, match="in the future"):
        accept_lock("locks/c", both, now)
    old = json.dumps(lock_body(created=now - 86400, refreshed=now - 86400)).encode()
    assert accept_lock("locks/d", old, now).kind == "shared"  # stale is the readers' business


def test_planted_and_malformed_locks_block_neither_backup_nor_gc(
    repo: Repository, make_raw: Callable[..., Path]
) -> None:
    planted = plant(repo, "future", lock_body(kind="exclusive", refreshed=FAR_FUTURE))
    for name, content in MALFORMED.items():
        plant(repo, name, content)
    result = backup_volume(repo, str(make_raw(size=4 * MiB)))  # not held up by the "exclusive" one
    assert lock_keys(repo) == set()  # every one of them removed by the backup's lock
    plant(repo, "future-again", lock_body(refreshed=FAR_FUTURE))
    plant(repo, "strings-again", lock_body(created="a", refreshed="b"))
    report = gc(repo)  # the exclusive lock: no live shared lock in the way
    assert report.chunksKept > 0 and lock_keys(repo) == set()
    assert repo.manifest_ids() == [result.id]
    assert planted not in lock_keys(repo)


def test_live_locks_conflict_whatever_the_holders_clock_says(repo: Repository) -> None:
    """Staleness is read on the storage's clock (the lock object's modification time): a holder
    whose clock is ten minutes ahead or behind keeps its lock while it rewrites it."""
    for skew in (+600, -600, STALE_SECONDS + 60, -(STALE_SECONDS + 60)):
        plant(repo, "live", lock_body(created=time.time() + skew, refreshed=time.time() + skew))
        with pytest.raises(RepositoryLocked, match="elsewhere"):
            gc(repo)
    plant(repo, "live", lock_body(), age=STALE_SECONDS + 60)  # not rewritten for that long: gone
    assert gc(repo).chunksDeleted == 0
    assert lock_keys(repo) == set()
    plant(repo, "live", lock_body(refreshed=time.time() + CLOCK_SKEW_SECONDS + STALE_SECONDS + 60))
    assert gc(repo).chunksDeleted == 0  # further off than any clock: planted, removed
    assert lock_keys(repo) == set()


def dead_pid() -> int:
    """A process id no process has (one that just exited)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    pid = int(done.stdout)
    assert not Path(f"/proc/{pid}").exists()
    return pid


def test_a_lock_of_this_host_is_stale_when_its_process_is_gone(repo: Repository) -> None:
    mine = locks._process_start(os.getpid())
    assert mine
    gone = dead_pid()
    plant(repo, "gone-no-pstart", lock_body(host=HOSTNAME, pid=gone, pstart=""))
    plant(repo, "gone", lock_body(host=HOSTNAME, pid=gone, pstart="123"))
    plant(repo, "reused-pid", lock_body(host=HOSTNAME, pid=os.getpid(), pstart=""))
    aged = time.time() - 2 * STALE_SECONDS
    plant(repo, "old", lock_body(host=HOSTNAME, pid=os.getpid(), pstart=mine, created=aged, refreshed=aged), age=600)
    plant(repo, "alive", lock_body(host=HOSTNAME, pid=os.getpid(), pstart=mine))
    assert [record.key for record in read_locks(repo.backend)] == ["locks/alive"]
    assert lock_keys(repo) == {"locks/alive"}


def test_a_system_without_proc_keeps_this_hosts_locks_until_they_age(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(locks, "_process_start", lambda pid: None)
    plant(repo, "fresh", lock_body(host=HOSTNAME, pstart=""))
    plant(repo, "aged", lock_body(host=HOSTNAME, pstart="", refreshed=time.time() - 2 * STALE_SECONDS), age=600)
    assert [record.key for record in read_locks(repo.backend)] == ["locks/fresh"]


class NoDeletes(FileBackend):
    """A store that refuses this token every delete of another's lock (a stricter server)."""

    def delete(self, key: str) -> None:
        if key.startswith("locks/planted"):
            raise BackendForbidden(location=self.location, detail=f"cannot delete {key}")
        super().delete(key)


def test_a_reader_that_may_not_remove_a_bad_lock_ignores_it(
    tmp_path: Path, make_raw: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    repo = Repository.init(NoDeletes(tmp_path / "repo"))
    plant(repo, "planted-future", lock_body(kind="exclusive", refreshed=FAR_FUTURE))
    plant(repo, "planted-garbage", b"\x00garbage")
    assert read_locks(repo.backend) == []
    backup_volume(repo, str(make_raw(size=4 * MiB)))
    assert gc(repo).chunksDeleted == 0
    assert lock_keys(repo) == {"locks/planted-future", "locks/planted-garbage"}  # still there, ignored
    assert "lock.malformed_ignored lock locks/planted-garbage is malformed: not JSON" in caplog.text
