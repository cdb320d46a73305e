"""The service CLI (`blockvault <resource> <verb>`) against a running deployment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.catalog.models import new_uuid
from tests.conftest import ROOT, MiB, vm_like_regions, write_regions
from tests.service.conftest import Stack, free_port

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)


def bv(stack: Stack, *args: str, url: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **stack.env,
        "BLOCKVAULT_API_URL": url or f"http://127.0.0.1:{stack.port}",
        "BLOCKVAULT_API_KEY": stack.key,
    }
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        env=env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_round_trip_and_exit_codes(stack: Stack, tmp_path: Path) -> None:
    host = new_uuid()
    stack.start_worker(host)
    volume_file = tmp_path / "disk.raw"
    write_regions(volume_file, 12 * MiB, vm_like_regions(12 * MiB, seed=3))
    added = bv(stack, "backup-storage", "add", "--name", "local", "--url", f"file://{tmp_path / 'store'}", "--json")
    assert added.returncode == 0, added.stderr
    volume = json.loads(bv(stack, "volume", "create", "--host", host, "--path", str(volume_file), "--json").stdout)
    created = bv(stack, "volume-backup", "create", "--volume", volume["uuid"], "--wait", "--json")
    assert created.returncode == 0, created.stderr
    backup = json.loads(created.stdout)
    assert backup["status"] == "Ready" and backup["mode"] == "full"
    listed = bv(stack, "volume-backup", "list", "-q", f"volumeUuid={volume['uuid']}", "--json")
    assert [b["uuid"] for b in json.loads(listed.stdout)["inventories"]] == [backup["uuid"]]
    assert bv(stack, "volume-backup", "list", "--count").stdout.strip() == "1"
    job = bv(stack, "volume-backup", "verify", backup["uuid"], "-p", "readData=true").stdout.strip()
    waited = bv(stack, "job", "wait", job, "--json")
    assert waited.returncode == 0 and json.loads(waited.stdout)["verified"]["chunks"] > 0
    # refused requests exit 2 with one line; an unreachable API exits 3
    missing = bv(stack, "volume-backup", "revert", new_uuid())
    assert missing.returncode == 2 and missing.stderr.startswith("blockvault: error: NOT_FOUND")
    bad = bv(stack, "volume-backup", "list", "-q", "bogus=1")
    assert bad.returncode == 2 and "bogus" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    away = bv(stack, "host", "list", url=f"http://127.0.0.1:{free_port()}")
    assert away.returncode == 3 and "UNREACHABLE" in away.stderr
    # a job that fails exits 1: the volume file is gone from its host
    volume_file.unlink()
    failed = bv(stack, "volume-backup", "create", "--volume", volume["uuid"], "--wait")
    assert failed.returncode == 1 and "no such file" in failed.stderr
