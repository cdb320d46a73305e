"""What the API refuses on what libvirt owns (docs/libvirt.md): a discovered VM's name, state
and sockets, its deletion while the domain exists, its disks' deletion and registration; what
an admin may set (projectUuid); createVmInstanceFromVmBackup's bad inputs; another project's
domain answered 404. The rows are a discovered domain's as the worker writes them (discovery
itself runs against the real libvirtd in tests/shared/service/test_libvirt.py)."""

from __future__ import annotations

from typing import Any

from shared.catalog import db
from shared.catalog.models import VmInstance, Volume, VolumeBackup
from tests.api.conftest import World


def managed(world: World, side: str) -> dict[str, str]:
    """A fresh VM backup in ``side``'s project whose VM and volumes libvirt owns (with the
    definition a VM backup keeps)."""
    group = world.fresh("vm-backup", side)
    with db.session() as session:
        backups = session.query(VolumeBackup).filter(VolumeBackup.groupUuid == group).all()
        volumes = [session.get_one(Volume, b.volumeUuid) for b in backups]
        vm = session.get_one(VmInstance, volumes[0].vmInstanceUuid)
        vm.managedBy = "libvirt"
        for index, (backup, volume) in enumerate(zip(backups, volumes, strict=True)):
            volume.managedBy, volume.deviceName = "libvirt", f"vd{'ab'[index]}"
            xml = f"<domain type='qemu'><name>{vm.name}</name><uuid>{vm.uuid}</uuid></domain>"
            backup.metadata_ = {"vmDefinition": {"uuid": vm.uuid, "name": vm.name, "domainXml": xml}}
        root = next(v.uuid for v in volumes if v.type == "Root")
        return {"vm": vm.uuid, "root": root, "group": group, "host": str(vm.hostUuid)}


def code(answer: Any) -> str:
    return str(answer["error"]["code"])


def test_what_libvirt_owns_is_not_changed_through_the_api(world: World) -> None:
    own = managed(world, "own")
    key = world.parties["own"].key
    for params in ({"state": "Stopped"}, {"name": "renamed"}, {"cpuNum": 4}, {"qmpSocket": f"{world.tmp}/q.sock"}):
        status, answer = world.call("PUT", f"/v1/vm-instances/{own['vm']}/actions", key, {"updateVmInstance": params})
        assert (status, code(answer)) == (409, "MANAGED_BY_LIBVIRT"), (params, answer)
        assert "libvirt owns its" in answer["error"]["description"]
    status, answer = world.call("DELETE", f"/v1/vm-instances/{own['vm']}", world.admin_key)
    assert (status, code(answer)) == (409, "MANAGED_BY_LIBVIRT")
    status, answer = world.call("DELETE", f"/v1/volumes/{own['root']}", world.admin_key)
    assert (status, code(answer)) == (409, "MANAGED_BY_LIBVIRT")
    path = world.tmp / "another.raw"
    path.write_bytes(b"\0" * 4096)
    body = {"params": {"hostUuid": own["host"], "installPath": str(path), "vmInstanceUuid": own["vm"]}}
    status, answer = world.call("POST", "/v1/volumes", world.admin_key, body)
    assert (status, code(answer)) == (409, "MANAGED_BY_LIBVIRT")
    # a description is the caller's; an admin files the discovered VM into a project
    other_project = world.parties["other"].project
    status, answer = world.call(
        "PUT", f"/v1/vm-instances/{own['vm']}/actions", key, {"updateVmInstance": {"projectUuid": other_project}}
    )
    assert status == 403, answer
    action = {"updateVmInstance": {"projectUuid": other_project, "description": "web"}}
    answer = world.admin("PUT", f"/vm-instances/{own['vm']}/actions", action)
    assert (answer["inventory"]["projectUuid"], answer["inventory"]["description"]) == (other_project, "web")
    status, _ = world.call("GET", f"/v1/volumes/{own['root']}", key)
    assert status == 404  # its volumes went with it: the own member sees them no more
    status, answer = world.call("GET", f"/v1/volumes/{own['root']}", world.parties["other"].key)
    assert status == 200, answer
    bad = {"updateVmInstance": {"projectUuid": "0" * 32}}
    status, answer = world.call("PUT", f"/v1/vm-instances/{own['vm']}/actions", world.admin_key, bad)
    assert (status, code(answer)) == (404, "NOT_FOUND")


def test_another_projects_domain_is_not_found(world: World) -> None:
    other = managed(world, "other")
    key = world.parties["own"].key
    for method, path, body in (
        ("GET", f"/v1/vm-instances/{other['vm']}", None),
        ("PUT", f"/v1/vm-instances/{other['vm']}/actions", {"updateVmInstance": {"description": "x"}}),
        ("PUT", f"/v1/vm-backups/{other['group']}/actions", {"createVmInstanceFromVmBackup": {}}),
        ("PUT", f"/v1/vm-backups/{other['group']}/actions", {"revertVmFromVmBackup": {}}),
    ):
        status, answer = world.call(method, path, key, body)
        assert (status, code(answer)) == (404, "NOT_FOUND"), (path, answer)
        assert other["vm"] not in str(answer) or other["vm"] in path


def test_create_vm_from_backup_bad_inputs(world: World) -> None:
    own = managed(world, "own")
    key = world.parties["own"].key
    path = f"/v1/vm-backups/{own['group']}/actions"
    for params, status_code, error in (
        ({"strategy": "Later"}, 400, "INVALID_ARGUMENT"),
        ({"keepMacs": "yes"}, 400, "INVALID_ARGUMENT"),
        ({"name": "a/b"}, 400, "INVALID_ARGUMENT"),
        ({"hostUuid": own["host"]}, 403, "FORBIDDEN"),  # members do not choose hosts
        ({}, 409, "CONFLICT"),  # the world's host has no libvirt
    ):
        status, answer = world.call("PUT", path, key, {"createVmInstanceFromVmBackup": params})
        assert (status, code(answer)) == (status_code, error), (params, answer)
    status, answer = world.call("PUT", path, world.admin_key, {"createVmInstanceFromVmBackup": {"hostUuid": "x"}})
    assert (status, code(answer)) == (400, "INVALID_ARGUMENT")
    assert "no libvirt" in world.call("PUT", path, key, {"createVmInstanceFromVmBackup": {}})[1]["error"]["description"]
    # a plain VM's backup keeps no domain XML
    plain = world.parties["own"].rows["vm-backup"]
    status, answer = world.call("PUT", f"/v1/vm-backups/{plain}/actions", key, {"createVmInstanceFromVmBackup": {}})
    assert (status, code(answer)) == (409, "CONFLICT")
    assert "no libvirt domain definition" in answer["error"]["description"]
