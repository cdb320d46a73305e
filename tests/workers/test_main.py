"""The worker's start (workers/main.py): what must happen in the main thread before its
background threads run and its pool forks."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from shared.repository.backends import registry
import workers.main
before = [n for n in registry.BUILTIN if f"shared.repository.backends.{n}" not in sys.modules]
workers.main.import_before_threads()
after = [n for n in registry.BUILTIN if f"shared.repository.backends.{n}" not in sys.modules]
print(before, after)
"""


def test_the_backends_are_imported_before_the_threads_that_would_import_them_lazily() -> None:
    # A pool child forked while the storage-health thread held a backend module's import lock
    # hung for good in that import (the soak, tests/bench/soak.py). A fresh interpreter: in
    # this one the suite has long imported them.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after = out.stdout.strip().rsplit("] [", 1)
    assert before != "[", f"nothing left to import lazily, the probe proves nothing: {out.stdout}"
    assert after == "]", f"still imported lazily, after a fork too: {out.stdout}"


LOCKS = (
    ("shared.catalog.clock", "_lock"),
    ("shared.catalog.db", "_lock"),
    ("shared.failpoints", "_lock"),
    ("shared.libvirt.connection", "_lock"),
    ("shared.repository.backends.registry", "_lock"),
    ("shared.repository.backends.s3", "_client_lock"),
    ("shared.repository.keys", "_UNWRAPPED_LOCK"),
)


@pytest.mark.parametrize(("module", "name"), LOCKS)
def test_a_child_forked_while_a_thread_holds_a_module_lock_can_take_it(module: str, name: str) -> None:
    # The soak's second hang: a pool child forked while the storage-health thread created an
    # S3 client (holding s3._client_lock) waited for that lock forever in its first copy to S3.
    lock = getattr(importlib.import_module(module), name)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(30)
    try:
        pid = os.fork()
        if pid == 0:  # the child: one thread, the module's lock must be free
            taken = getattr(importlib.import_module(module), name).acquire(timeout=5)
            os._exit(0 if taken else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        holder.join()
    assert os.waitstatus_to_exitcode(status) == 0, f"{module}.{name} stayed held in the forked child"


@pytest.mark.parametrize(("uri", "loops"), [("off", False), ("qemu+tcp://127.0.0.1:1/system", True)])
def test_libvirt_sync_repeats_only_when_libvirt_may_answer(
    uri: str, loops: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With libvirt off a test worker's sync thread opened a catalog session every heartbeat to
    # write that there is no libvirt (0.06 of its 0.30 CPU s in 30 idle seconds); a URI, or
    # none (libvirtd may start later), is synced every heartbeat.
    from shared.config import get_settings
    from workers.main import LibvirtSync

    monkeypatch.setenv("BLOCKVAULT_LIBVIRT_URI", uri)
    get_settings.cache_clear()
    synced = threading.Event()
    thread = LibvirtSync("ab" * 16, every=0.01)
    monkeypatch.setattr(thread, "sync", synced.set)
    thread.start()
    try:
        if loops:
            assert synced.wait(30), "a configured libvirt is never synced after the start"
        else:
            thread.join(30)
            assert not thread.is_alive() and not synced.is_set(), "libvirt is off, yet the thread syncs it"
    finally:
        thread.stopped.set()
        thread.join(30)
        get_settings.cache_clear()
