"""The worker's start (workers/main.py): what must happen in the main thread before its
background threads run and its pool forks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
