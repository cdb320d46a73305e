"""The backend contract: every backend joins this suite by adding a factory to BACKENDS."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import BackendError, BackendUnavailable, ObjectNotFound
from shared.repository.backends import Backend, FileBackend, RetryingBackend, open_backend
from shared.repository.backends.file import DIRECT_MIN, DIRECT_PIECE, SPARE_BUFFERS


def _s3_backend(request: pytest.FixtureRequest, root: Path) -> Backend:
    """The s3 backend on the moto server, through open_backend (and so the retry wrapper):
    one bucket, a fresh prefix per test."""
    server = request.getfixturevalue("s3_server")
    bucket = server.make_bucket("bv-contract")
    return open_backend(f"s3://{bucket}/{uuid.uuid4().hex}", server.options(bucket))


def _http_backend(request: pytest.FixtureRequest, root: Path) -> Backend:
    """The http backend on the session's storage-server, through open_backend (and so the
    retry wrapper): a fresh repository path per test."""
    server = request.getfixturevalue("storage_server")
    return open_backend(f"{server.url}/{uuid.uuid4().hex}", {"token": server.token})


# A factory gets the test's request (to ask for server fixtures) and a fresh folder.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {
    "file": lambda request, root: FileBackend(root / "store"),
    "file+retry": lambda request, root: RetryingBackend(FileBackend(root / "store")),
    "s3": _s3_backend,
    "http": _http_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    store = BACKENDS[request.param](request, tmp_path)
    store.create()
    yield store
    store.close()


def test_put_then_get_returns_the_same_bytes(backend: Backend) -> None:
    backend.put("chunks/ab/abcd", b"hello world")
    assert backend.get("chunks/ab/abcd") == b"hello world"


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.binary(max_size=100_000), key=st.from_regex(r"[a-z0-9]{1,12}/[a-z0-9]{1,12}", fullmatch=True))
def test_round_trip_property(backend: Backend, data: bytes, key: str) -> None:
    backend.put(f"prop/{key}", data)
    assert backend.get(f"prop/{key}") == data
    assert backend.stat(f"prop/{key}").size == len(data)


def test_ranged_get(backend: Backend) -> None:
    backend.put("obj", bytes(range(256)))
    assert backend.get("obj", 10, 5) == bytes(range(10, 15))
    assert backend.get("obj", 250) == bytes(range(250, 256))
    assert backend.get("obj", 300) == b""


def test_missing_object_is_object_not_found(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.get("nope")
    with pytest.raises(ObjectNotFound):
        backend.stat("nope")


def test_overwrite_false_keeps_the_first_object(backend: Backend) -> None:
    backend.put("k", b"first")
    backend.put("k", b"second", overwrite=False)
    assert backend.get("k") == b"first"
    backend.put("k", b"third")
    assert backend.get("k") == b"third"


def test_begin_put_completes_with_its_call(backend: Backend) -> None:
    data = bytearray(b"staged object")
    finish = backend.begin_put("chunks/st/staged", data)
    data[:] = b"changed after"  # the write is done: the caller need not keep the bytes
    finish()
    assert backend.get("chunks/st/staged") == b"staged object"
    backend.begin_put("chunks/st/staged", b"second", overwrite=False)()
    assert backend.get("chunks/st/staged") == b"staged object"


def test_file_begin_put_names_the_object_only_when_completed(tmp_path: Path) -> None:
    store = FileBackend(tmp_path / "store")
    store.create()
    finish = store.begin_put("chunks/ab/abcd", b"x" * 100_000)
    assert not store.exists("chunks/ab/abcd")
    assert list(store.list("chunks/")) == []
    assert len(list((tmp_path / "store" / "tmp").iterdir())) == 1  # written, not yet named
    finish()
    assert store.get("chunks/ab/abcd") == b"x" * 100_000
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put("k", b"x")
    backend.delete("k")
    backend.delete("k")
    assert not backend.exists("k")


def test_list_by_prefix(backend: Backend) -> None:
    keys = {"chunks/aa/aa1", "chunks/aa/aa2", "chunks/bb/bb1", "manifests/m1", "config"}
    for key in keys:
        backend.put(key, key.encode())
    assert {info.key for info in backend.list("chunks/")} == {k for k in keys if k.startswith("chunks/")}
    assert {info.key for info in backend.list("manifests/")} == {"manifests/m1"}
    assert list(backend.list("locks/")) == []
    sizes = {info.key: info.size for info in backend.list("chunks/")}
    assert sizes["chunks/aa/aa1"] == len(b"chunks/aa/aa1")


def test_missing_answers_for_a_batch(backend: Backend) -> None:
    backend.put("a", b"1")
    backend.put("c", b"3")
    assert backend.missing(["a", "b", "c", "d"]) == {"b", "d"}
    assert backend.missing([]) == set()


def test_invalid_keys_are_refused(backend: Backend) -> None:
    for key in ("", "/etc/passwd", "../outside", "a/../../b"):
        with pytest.raises(BackendError):
            backend.put(key, b"x")


def test_readers_never_see_a_partial_object(backend: Backend) -> None:
    big_a, big_b = b"a" * (4 << 20), b"b" * (4 << 20)
    backend.put("obj", big_a)
    stop = threading.Event()
    seen: set[bytes] = set()

    def reader() -> None:
        while not stop.is_set():
            data = backend.get("obj")
            seen.add(data[:1] + data[-1:] + bytes([len(set(data))]))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(20):
        backend.put("obj", big_a if i % 2 else big_b)
    stop.set()
    thread.join()
    assert seen <= {b"aa\x01", b"bb\x01"}


def test_file_backend_never_recreates_a_vanished_folder(tmp_path: Path) -> None:
    store = FileBackend(tmp_path / "store")
    with pytest.raises(BackendError):
        store.put("chunks/aa/aa1", b"x")  # never created: no repository here
    store.create()
    store.put("chunks/aa/aa1", b"x")
    (tmp_path / "store").rename(tmp_path / "unmounted")
    with pytest.raises(BackendError):
        store.put("chunks/bb/bb1", b"y")
    assert not (tmp_path / "store").exists()


def test_file_backend_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = FileBackend(tmp_path / "store")
    store.create()
    for i in range(5):
        store.put(f"k{i}", b"x" * 1000)
    assert list(store.list("tmp/")) == []


def test_file_backend_flush_syncs_folders_at_once_and_keeps_them_on_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flush fsyncs every folder that gained names, several at once (each fsync waits on a
    journal commit: one after the other they were the serial end of a backup); a failing
    one leaves every folder to the next flush."""
    store = FileBackend(tmp_path / "store")
    store.create()
    for prefix in ("aa", "bb", "cc"):
        store.put(f"chunks/{prefix}/{prefix}1", b"x")
    real_fsync = os.fsync
    together = threading.Barrier(3, timeout=30)  # passes only with the three fsyncs in flight at once
    synced: list[str] = []
    fail = threading.Event()

    def fsync(fd: int) -> None:
        folder = os.readlink(f"/proc/self/fd/{fd}")
        together.wait()
        if fail.is_set() and folder.endswith("bb"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)
        synced.append(os.path.basename(folder))

    monkeypatch.setattr(os, "fsync", fsync)
    fail.set()
    with pytest.raises(BackendError):
        store.flush()
    fail.clear()
    synced.clear()
    store.flush()  # the failed flush's folders again, all three
    assert sorted(synced) == ["aa", "bb", "cc"]
    synced.clear()
    store.flush()  # nothing new since
    assert synced == []


def test_open_backend_schemes(tmp_path: Path) -> None:
    assert open_backend(str(tmp_path)).location == str(tmp_path)
    assert open_backend(f"file://{tmp_path}").location == str(tmp_path)
    with pytest.raises(BackendError.__mro__[1]):  # BlockvaultError: a usage error
        open_backend("ftp://host/x")


class _Flaky(FileBackend):
    """A real file backend whose first ``failures`` gets fail as a network blip would."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures
        self.calls = 0

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise BackendUnavailable(location=self.location, detail="connection reset")
        return super().get(key, offset, length)


def test_retry_wrapper_retries_transient_errors_only(tmp_path: Path) -> None:
    flaky = _Flaky(tmp_path / "s", failures=2)
    flaky.create()
    flaky.put("k", b"v")
    wrapped = RetryingBackend(flaky, attempts=5)
    assert wrapped.get("k") == b"v"
    assert flaky.calls == 3
    with pytest.raises(ObjectNotFound):
        wrapped.get("absent")
    assert flaky.calls == 4  # a permanent error is not retried


def test_retry_wrapper_gives_up(tmp_path: Path) -> None:
    flaky = _Flaky(tmp_path / "s", failures=100)
    flaky.create()
    flaky.put("k", b"v")
    with pytest.raises(BackendUnavailable):
        RetryingBackend(flaky, attempts=3).get("k")
    assert flaky.calls == 3


def _resident_pages(path: Path) -> int:
    """How many of ``path``'s pages are in the page cache (mincore over a mapping of it)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as handle:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
        assert address not in (None, ctypes.c_void_p(-1).value)
        try:
            vector = ctypes.create_string_buffer(pages)
            assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    return sum(byte & 1 for byte in vector.raw)


@pytest.mark.parametrize("size", [DIRECT_MIN, DIRECT_PIECE + 1, 3 * DIRECT_PIECE + 12345])
def test_file_backend_writes_large_objects_past_the_page_cache(tmp_path: Path, size: int) -> None:
    store = FileBackend(tmp_path / "store")
    store.create()
    data = os.urandom(size)
    store.put("data/ab/big", data)
    path = tmp_path / "store" / "data" / "ab" / "big"
    assert path.stat().st_size == size  # the padding of the last aligned write is cut off
    assert _resident_pages(path) == 0  # written with O_DIRECT: no page-cache page touched
    assert store.get("data/ab/big") == data
    store.put("data/ab/small", data[:1000])  # small objects go through the page cache
    assert store.get("data/ab/small") == data[:1000]
    assert not list(store.list("tmp/"))


@pytest.fixture
def no_direct_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on a file system that refuses O_DIRECT: a ramfs mounted for the test (the
    tests run as root; tmpfs takes O_DIRECT since Linux 6.6)."""
    folder = tmp_path / "ramfs"
    folder.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_file_backend_on_a_file_system_without_o_direct_writes_through_the_page_cache(no_direct_folder: Path) -> None:
    store = FileBackend(no_direct_folder / "store")
    store.create()
    data = os.urandom(DIRECT_PIECE + 7)
    store.put("data/cd/big", data)
    store.put("data/cd/second", data[::-1])
    assert store.get("data/cd/big") == data
    assert store.get("data/cd/second") == data[::-1]
    assert (no_direct_folder / "store" / "data" / "cd" / "big").stat().st_size == len(data)
    assert store.lend_buffer(len(data)) is None  # refused once: no buffer lent for it since
    assert not list(store.list("tmp/"))


@pytest.mark.parametrize("size", [DIRECT_MIN, DIRECT_PIECE + 1, 4 * DIRECT_PIECE + 29])
def test_file_backend_writes_a_lent_buffer_as_it_lies(tmp_path: Path, size: int) -> None:
    """What is built in the buffer lend_buffer gives is written from it with O_DIRECT (the
    padding past the object cut off); a view of it that does not start at its first byte is
    not aligned, and goes through the piece buffer instead: both read back byte for byte."""
    store = FileBackend(tmp_path / "store")
    store.create()
    assert store.lend_buffer(DIRECT_MIN - 1) is None  # small objects: no use for one
    data = os.urandom(size)
    lent = store.lend_buffer(size)
    assert lent is not None and len(lent) == size
    lent[:] = data
    store.begin_put("data/ab/lent", lent)()
    path = tmp_path / "store" / "data" / "ab" / "lent"
    assert path.stat().st_size == size
    assert _resident_pages(path) == 0
    assert store.get("data/ab/lent") == data
    again = store.lend_buffer(size)  # the same thread's buffer, reused
    assert again is not None
    again[:] = data[::-1]
    store.put("data/ab/offset", again[1:])  # not from the first byte: copied, not refused
    assert store.get("data/ab/offset") == data[::-1][1:]
    assert store.get("data/ab/lent") == data  # what was written from the buffer stays
    assert RetryingBackend(store).lend_buffer(size) is not None


def test_file_backend_writes_a_lent_buffer_in_the_call_begin_put_returns(tmp_path: Path) -> None:
    """An object sealed in a lent buffer is written by the call begin_put returns (a
    finishing thread's), not by begin_put: the chunk thread goes on meanwhile, and its next
    loan is another buffer, so nothing it builds there reaches the write in flight."""
    store = FileBackend(tmp_path / "store")
    store.create()
    size = DIRECT_PIECE + 4096 + 5
    data = os.urandom(size)
    lent = store.lend_buffer(size)
    assert lent is not None
    lent[:] = data
    finish = store.begin_put("chunks/ab/lent", lent)
    tmp = tmp_path / "store" / "tmp"
    assert not tmp.exists() or not list(tmp.iterdir())  # begin_put returned before writing a byte
    following = store.lend_buffer(size)
    assert following is not None
    following[:] = bytes(size)  # the thread's next chunk, while the first is not yet written
    finishing = threading.Thread(target=finish)  # as a Finisher's thread calls it
    finishing.start()
    finishing.join()
    assert _resident_pages(tmp_path / "store" / "chunks" / "ab" / "lent") == 0  # with O_DIRECT
    assert store.get("chunks/ab/lent") == data
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def _begin_until_written_at_once(
    store: FileBackend, size: int
) -> tuple[list[Callable[[], object]], Callable[[], object]]:
    """Lend, fill and begin a put from the lent buffer, none completed, until begin_put writes
    the object before it returns: the calls that complete the puts it left to them, in order
    (objects ``chunks/cd/<n>``, ``size`` bytes of value ``n``), and the one written at once."""
    tmp = store.root / "tmp"
    pending: list[Callable[[], object]] = []
    while len(pending) <= 2 * (1 + SPARE_BUFFERS):
        lent = store.lend_buffer(size)
        assert lent is not None
        lent[:] = bytes([len(pending)]) * size
        before = set(tmp.iterdir()) if tmp.exists() else set()
        finish = store.begin_put(f"chunks/cd/{len(pending)}", lent)
        new = set(tmp.iterdir()) - before if tmp.exists() else set()
        if new:  # begin_put wrote it
            assert [path.stat().st_size for path in new] == [size]
            return pending, finish
        pending.append(finish)
    raise AssertionError(f"{len(pending)} puts left to their calls, none written at once")


def test_file_backend_hands_a_bounded_number_of_buffers_over_and_never_waits(tmp_path: Path) -> None:
    """A thread keeps one buffer, and at most SPARE_BUFFERS more (each chunk-sized) are in
    writes not yet completed (or dropped): with every spare out, begin_put writes the object
    before it returns, from the thread's buffer as it lies, which the thread then reuses; a
    completed write's buffer is a spare again."""
    store = FileBackend(tmp_path / "store")
    store.create()
    size = DIRECT_MIN + 100
    pending, written = _begin_until_written_at_once(store, size)
    assert len(pending) == SPARE_BUFFERS
    own = store.lend_buffer(size)  # the buffer written from at once stays the thread's
    assert own is not None and own[:1] == bytes([SPARE_BUFFERS])
    written()
    assert _resident_pages(tmp_path / "store" / "chunks" / "cd" / str(SPARE_BUFFERS)) == 0  # O_DIRECT, as it lay
    lent_elsewhere: list[memoryview | None] = []
    other = threading.Thread(target=lambda: lent_elsewhere.append(store.lend_buffer(size)))
    other.start()
    other.join()
    assert lent_elsewhere[0] is not None  # every thread has one of its own
    pending.pop(0)()  # its buffer is a spare again
    own[:] = bytes([99]) * size
    finish = store.begin_put("chunks/ef/again", own)
    assert list((tmp_path / "store" / "tmp").iterdir()) == []  # left to its call, like the pending ones
    for call in [*pending, finish]:
        call()
    for n in range(1 + SPARE_BUFFERS):
        assert store.get(f"chunks/cd/{n}") == bytes([n]) * size
    assert store.get("chunks/ef/again") == bytes([99]) * size


def test_file_backend_gives_a_lent_buffer_back_when_its_write_fails(tmp_path: Path) -> None:
    """A lent buffer's write that fails raises from the call that completes the put (a
    Finisher raises it), leaves no temporary file and no object, and gives the buffer back."""
    store = FileBackend(tmp_path / "store")
    store.create()
    store.put("chunks/g1/first", b"the folder exists")
    (tmp_path / "store" / "chunks" / "g0").write_bytes(b"a file where the folder goes")
    size = DIRECT_MIN
    for attempt, error in enumerate(("File exists", "folder missing", "folder missing")):
        lent = store.lend_buffer(size)
        assert lent is not None
        lent[:] = os.urandom(size)
        finish = store.begin_put(f"chunks/g{min(attempt, 1)}/lent", lent)
        if attempt:
            shutil.rmtree(tmp_path / "store" / "chunks" / "g1", ignore_errors=True)  # vanished: no name
        with pytest.raises(BackendError, match=error):
            finish()
        assert list((tmp_path / "store" / "tmp").iterdir()) == []
        assert not (tmp_path / "store" / "chunks" / "g1" / "lent").exists()
    pending, written = _begin_until_written_at_once(store, size)
    assert len(pending) == SPARE_BUFFERS  # no buffer was lost to the failed writes
    for call in [*pending, written]:
        call()


def test_file_backend_writes_a_lent_buffer_where_o_direct_is_refused(no_direct_folder: Path) -> None:
    """Before the file system has refused O_DIRECT a buffer is lent; its write, refused, goes
    through the page cache, and no buffer is lent from then on."""
    store = FileBackend(no_direct_folder / "store")
    store.create()
    data = os.urandom(DIRECT_PIECE + 7)
    lent = store.lend_buffer(len(data))
    assert lent is not None
    lent[:] = data
    store.begin_put("data/ij/lent", lent)()
    assert store.get("data/ij/lent") == data
    assert store.lend_buffer(len(data)) is None
    assert not list(store.list("tmp/"))
