"""shared.service.recovery: revert in place, a new volume from a backup, verify."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from shared.catalog.models import ApiJob, Host, Volume, VolumeBackup, new_uuid, now
from shared.celery_app import STORAGE_QUEUE, STORAGE_VERIFY, VOLUME_CREATE, VOLUME_REVERT
from shared.errors import (
    BlockvaultError,
    Conflict,
    IntegrityError,
    InvalidArgument,
    NotFound,
    PathNotAllowed,
    TargetExists,
)
from shared.repository.repo import parse_install_path
from shared.service.recovery import (
    request_create_volume,
    request_revert,
    request_verify,
    request_vm_revert,
    run_create_volume,
    run_revert,
    run_verify,
)
from shared.service.volume_backups import request_vm_backup, run_volume_backups
from tests.shared.service.conftest import CHUNK, SIZE, Message, Site, content, overwrite, raw_bytes


def _scribble(volume: Volume) -> None:
    """The volume changes after its backup."""
    for index in range(0, SIZE // CHUNK, 4):
        overwrite(volume, index)


def test_revert_puts_the_backup_back_in_the_file_with_its_mode(site: Site) -> None:
    storage = site.storage()
    volume = site.volume()
    backup = site.backup(volume)
    before = content(volume)
    _scribble(volume)
    path = Path(volume.installPath)
    path.chmod(0o640)

    job = request_revert(site.session, backup.uuid, {}, "account-1")
    assert (job.action, job.resourceUuid, job.hostUuid) == ("revertVolumeFromVolumeBackup", volume.uuid, site.host)
    assert job.params == {
        "backupUuid": backup.uuid,
        "backupStorageUuid": storage.uuid,
        "_task": VOLUME_REVERT,
        "_queue": f"host.{site.host}",
    }
    assert site.sent(job) == Message(VOLUME_REVERT, job.uuid, f"host.{site.host}", [job.uuid])
    result = site.run(run_revert, job)

    assert content(volume) == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in site.tmp.glob(".*revert*")) == []
    assert result["uuid"] == volume.uuid


def test_revert_of_a_symlinked_volume_writes_its_target_and_keeps_the_link(site: Site) -> None:
    site.storage()
    real = site.volume_file("real.raw", seed=3)
    before = real.read_bytes()
    link = site.tmp / "link.raw"
    link.symlink_to(real)
    volume = site.volume(path=link)
    backup = site.backup(volume)
    _scribble(volume)

    site.run(run_revert, request_revert(site.session, backup.uuid, {}, None))

    assert (link.is_symlink(), real.read_bytes()) == (True, before)


def test_revert_reads_the_copy_on_the_storage_named_in_either_spelling(site: Site) -> None:
    site.storage("master")
    standby = site.storage("standby", role="standby")
    backup = site.backup(site.volume())
    for key in ("backupStorageUuid", "backupStrogeUuid"):  # ZStack's API misspells it
        job = request_revert(site.session, backup.uuid, {key: standby.uuid}, None)
        assert (job.params or {})["backupStorageUuid"] == standby.uuid


def test_a_vm_revert_reverts_every_volume_of_the_group(site: Site) -> None:
    site.storage()
    vm = site.vm()
    root = site.volume("root.raw", vm=vm, kind="Root", seed=11)
    data = site.volume("data.raw", vm=vm, seed=12)
    before = [content(root), content(data)]
    made = request_vm_backup(site.session, root.uuid, {}, None)
    site.run(run_volume_backups, made)
    for volume in (root, data):
        _scribble(volume)

    job = request_vm_revert(site.session, str(made.resourceUuid), {}, None)
    assert (job.action, job.resourceUuid) == ("revertVmFromVmBackup", vm.uuid)
    result = site.run(run_revert, job)

    assert [v["uuid"] for v in result["volumes"]] == [root.uuid, data.uuid]
    assert [content(root), content(data)] == before
    vm.state = "Running"
    site.session.commit()
    site.refused(Conflict, lambda: request_vm_revert(site.session, str(made.resourceUuid), {}, None))
    site.refused(NotFound, lambda: request_vm_revert(site.session, new_uuid(), {}, None))


def test_request_revert_refuses_what_cannot_be_reverted_now(site: Site) -> None:
    site.storage("master")
    standby = site.storage("standby", role="standby")
    vm = site.vm()
    volume = site.volume(vm=vm)
    backup = site.backup(volume)
    site.ref(backup, standby).status = "Failed"
    site.session.commit()
    jobs = site.count(ApiJob)

    def refused(error: type[BlockvaultError], params: dict[str, Any] | None = None, uuid: str = backup.uuid) -> None:
        site.refused(error, lambda: request_revert(site.session, uuid, params or {}, None))

    refused(NotFound, uuid=new_uuid())
    refused(Conflict, {"backupStorageUuid": standby.uuid})  # its copy there is not Ready
    refused(NotFound, {"backupStorageUuid": new_uuid()})
    for row, field, value in (
        (backup, "status", "Creating"),
        (backup, "state", "Disabled"),
        (volume, "status", "Creating"),
        (vm, "state", "Running"),
        (site.session.get_one(Host, site.host), "status", "Disconnected"),
    ):
        kept = getattr(row, field)
        setattr(row, field, value)
        site.session.commit()
        refused(Conflict)
        setattr(row, field, kept)
        site.session.commit()

    assert site.count(ApiJob) == jobs


def test_a_vm_started_before_the_revert_runs_keeps_its_disk(site: Site) -> None:
    site.storage()
    vm = site.vm()
    volume = site.volume(vm=vm)
    backup = site.backup(volume)
    _scribble(volume)
    now_content = content(volume)
    job = request_revert(site.session, backup.uuid, {}, None)
    vm.state = "Running"
    site.session.commit()

    failed = site.fail(run_revert, job, Conflict)

    assert ((failed.error or {})["code"], content(volume)) == ("CONFLICT", now_content)


def test_a_new_volume_is_placed_beside_the_source_and_filled_byte_for_byte(site: Site) -> None:
    storage = site.storage()
    source = site.volume()
    backup = site.backup(source)
    job = request_create_volume(site.session, backup.uuid, {"name": "copy"}, None)
    volume = site.session.get_one(Volume, job.resourceUuid)
    assert (volume.status, volume.type, volume.size, volume.hostUuid, volume.format) == (
        "Creating",
        "Data",
        SIZE,
        site.host,
        "raw",
    )
    assert volume.installPath == f"{site.tmp}/{volume.uuid}.raw"
    assert job.params == {
        "backupUuid": backup.uuid,
        "backupStorageUuid": storage.uuid,
        "volumeUuid": volume.uuid,
        "_task": VOLUME_CREATE,
        "_queue": f"host.{site.host}",
    }

    result = site.run(run_create_volume, job)

    site.session.refresh(volume)
    assert (volume.status, result["uuid"]) == ("Ready", volume.uuid)
    assert content(volume) == content(source)


def test_a_new_qcow2_volume_at_a_given_path_joins_a_vm_with_the_backups_bytes(site: Site) -> None:
    site.storage()
    source = site.volume()
    backup = site.backup(source)
    vm = site.vm()
    vm.projectUuid = "p-vm"
    site.session.commit()
    target = site.tmp / "sub" / "restored.qcow2"
    target.parent.mkdir()
    params = {"name": "q", "installPath": str(target), "vmInstanceUuid": vm.uuid}
    job = request_create_volume(site.session, backup.uuid, params, None)
    site.run(run_create_volume, job)

    volume = site.session.get_one(Volume, job.resourceUuid)
    assert (volume.format, volume.status, volume.installPath) == ("qcow2", "Ready", str(target))
    assert (volume.vmInstanceUuid, volume.projectUuid) == (vm.uuid, "p-vm")
    assert raw_bytes(target) == content(source)


def test_request_create_volume_refuses_bad_places_and_states(site: Site, outside: Path) -> None:
    site.storage()
    source = site.volume()
    backup = site.backup(source)
    jobs = site.count(ApiJob)

    def refused(error: type[BlockvaultError], params: dict[str, Any], uuid: str = backup.uuid) -> None:
        site.refused(error, lambda: request_create_volume(site.session, uuid, {"name": "n", **params}, None))

    refused(NotFound, {}, uuid=new_uuid())
    site.refused(InvalidArgument, lambda: request_create_volume(site.session, backup.uuid, {}, None))
    refused(NotFound, {"hostUuid": new_uuid()})
    refused(NotFound, {"vmInstanceUuid": new_uuid()})
    refused(PathNotAllowed, {"installPath": str(outside / "x.raw")})
    refused(PathNotAllowed, {"installPath": f"{site.tmp}/../x.raw"})
    refused(InvalidArgument, {"format": "vmdk"})
    refused(InvalidArgument, {"installPath": f"{site.tmp}/x.raw", "format": "qcow2"})
    refused(Conflict, {"installPath": source.installPath})  # a registered volume's file
    refused(Conflict, {"backupStorageUuid": site.storage("empty", role="standby").uuid})
    other = Host(name="other", status="Connected", lastHeartbeat=now(), volumeRoots=[str(site.tmp)])
    site.session.add(other)
    site.session.commit()
    refused(Conflict, {"hostUuid": other.uuid, "vmInstanceUuid": site.vm().uuid})  # the VM runs elsewhere
    other.status = "Disconnected"
    site.session.commit()
    refused(Conflict, {"hostUuid": other.uuid})
    backup.status = "Deleting"
    site.session.commit()
    refused(Conflict, {})
    backup.status = "Ready"
    site.session.delete(source)
    site.session.commit()
    refused(InvalidArgument, {})  # no host to put it on

    assert (site.count(ApiJob), site.count(Volume)) == (jobs, 0)


def test_a_create_whose_target_appeared_fails_and_leaves_no_row(site: Site) -> None:
    site.storage()
    backup = site.backup(site.volume())
    job = request_create_volume(site.session, backup.uuid, {"name": "late"}, None)
    volume = site.session.get_one(Volume, job.resourceUuid)
    assert volume.status == "Creating"
    squatter = Path(volume.installPath)
    squatter.write_bytes(b"someone else's file")

    failed = site.fail(run_create_volume, job, TargetExists)

    assert ((failed.error or {})["code"], squatter.read_bytes()) == ("TARGET_EXISTS", b"someone else's file")
    assert site.session.get(Volume, job.resourceUuid) is None


def test_verify_reads_every_chunk_and_marks_a_damaged_copy_corrupted(site: Site) -> None:
    storage = site.storage()
    backup = site.backup(site.volume())
    job = request_verify(site.session, backup.uuid, {"readData": True}, None)
    assert (job.action, job.resourceType) == ("verifyVolumeBackup", "VolumeBackupVerify")
    assert job.params == {
        "backupUuid": backup.uuid,
        "backupStorageUuid": storage.uuid,
        "readData": True,
        "_task": STORAGE_VERIFY,
        "_queue": STORAGE_QUEUE,
    }
    result = site.run(run_verify, job)
    assert result["verified"] == {"chunks": backup.chunks, "bytesRead": (backup.chunks or 0) * CHUNK}

    with site.repository(storage) as repo:
        manifest = repo.load_manifest(parse_install_path(site.ref(backup, storage).installPath)[1])
    digest = next(d for d in manifest.chunks if d)
    chunk = site.tmp / storage.name / "chunks" / digest[:2] / digest
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    shallow = site.run(run_verify, request_verify(site.session, backup.uuid, {}, None))
    assert shallow["verified"] == {"chunks": backup.chunks, "bytesRead": 0}  # it is there: only reading tells

    failed = site.fail(run_verify, request_verify(site.session, backup.uuid, {"readData": True}, None), IntegrityError)

    assert ((failed.error or {})["code"], site.ref(backup, storage).status) == ("INTEGRITY_ERROR", "Corrupted")
    site.refused(Conflict, lambda: request_verify(site.session, backup.uuid, {}, None))  # no Ready copy left
    assert site.session.get_one(VolumeBackup, backup.uuid).status == "Ready"
    # the chunk put right again (repaired from elsewhere): a named re-check of every chunk makes the copy Ready
    chunk.write_bytes(
        bytes(damaged[: len(damaged) // 2])
        + bytes([damaged[len(damaged) // 2] ^ 0xFF])
        + bytes(damaged[len(damaged) // 2 + 1 :])
    )
    shallow_again = request_verify(site.session, backup.uuid, {"backupStorageUuid": storage.uuid}, None)
    site.run(run_verify, shallow_again)
    assert site.ref(backup, storage).status == "Corrupted"  # presence alone proves nothing
    site.run(
        run_verify,
        request_verify(site.session, backup.uuid, {"backupStorageUuid": storage.uuid, "readData": True}, None),
    )
    assert site.ref(backup, storage).status == "Ready"
