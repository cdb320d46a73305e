"""A worker process on a libvirt host (docs/libvirt.md): its domains appear through the API
and follow libvirt; a worker whose libvirt does not answer runs all the same and says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.catalog.models import new_uuid
from tests.libvirt_fixtures import DomainFactory
from tests.service.conftest import Stack
from tests.service.test_cli import bv

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)


def one(stack: Stack, collection: str, uuid: str) -> dict[str, Any]:
    found = stack.client.query(collection, f"uuid={uuid}")["inventories"]
    return dict(found[0]) if found else {}


def test_a_worker_discovers_its_domains_and_survives_a_silent_libvirt(
    stack: Stack, libvirt_uri: str, libvirt_folder: Path, libvirt_domains: DomainFactory
) -> None:
    disk = libvirt_folder / "root.raw"
    disk.write_bytes(b"\1" * 1024 * 1024)
    dom = libvirt_domains([(str(disk), "raw")])
    vm_uuid = dom.UUIDString().replace("-", "")
    roots = {"BLOCKVAULT_VOLUME_ROOTS": f"{libvirt_folder}:{stack.tmp}", "BLOCKVAULT_LIBVIRT_URI": libvirt_uri}
    host = new_uuid()
    stack.start_worker(host, roots)
    stack.wait_for("the domain", lambda: one(stack, "vm-instances", vm_uuid).get("state") == "Stopped")
    vm = one(stack, "vm-instances", vm_uuid)
    assert (vm["managedBy"], vm["hostUuid"], vm["name"]) == ("libvirt", host, dom.name())
    (volume,) = stack.client.query("volumes", f"vmInstanceUuid={vm_uuid}")["inventories"]
    assert (volume["installPath"], volume["type"], volume["deviceName"]) == (str(disk), "Root", "vda")
    assert one(stack, "hosts", host)["libvirtStatus"] == "Connected"
    # the CLI: a VM backup that does not exist, a host that is no uuid: one line, non-zero exit
    missing = bv(stack, "vm", "create-from-backup", new_uuid(), "--wait")
    assert missing.returncode == 2 and missing.stderr.startswith("blockvault: error: NOT_FOUND"), missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    dom.create()
    stack.wait_for("Running", lambda: one(stack, "vm-instances", vm_uuid).get("state") == "Running")
    dom.destroy()
    dom.undefine()
    stack.wait_for("Destroyed", lambda: one(stack, "vm-instances", vm_uuid).get("state") == "Destroyed")

    silent = new_uuid()  # a libvirt that refuses: the worker runs, the host says why
    proc = stack.start_worker(silent, {**roots, "BLOCKVAULT_LIBVIRT_URI": "qemu+tcp://127.0.0.1:1/system"})
    stack.wait_for("Disconnected", lambda: one(stack, "hosts", silent).get("libvirtStatus") == "Disconnected")
    row = one(stack, "hosts", silent)
    assert "Connection refused" in row["libvirtReason"] and row["status"] == "Connected"
    for _beat in range(2):  # two heartbeats later (one a second) it still runs, still Connected
        last = one(stack, "hosts", silent)["lastHeartbeat"]
        stack.wait_for("a heartbeat", lambda last=last: one(stack, "hosts", silent)["lastHeartbeat"] != last)
    assert proc.poll() is None
    assert one(stack, "hosts", silent)["status"] == "Connected"
