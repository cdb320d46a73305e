"""shared.service.rows: the rows every action works on, and the checks on them."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.catalog.models import (
    BackupStorage,
    DatabaseBackup,
    DatabaseBackupStorageRef,
    Host,
    VolumeBackup,
    VolumeBackupStorageRef,
    new_uuid,
    now,
)
from shared.errors import Conflict, InvalidArgument, NotFound, PathNotAllowed
from shared.repository.repo import install_path
from shared.service import rows
from tests.shared.service.conftest import Site


def _ready_copies(site: Site, *storages: BackupStorage, group: str | None = None) -> VolumeBackup:
    """A Ready backup row of a new volume with a Ready copy on each of ``storages``, in that order."""
    volume = site.volume(f"{new_uuid()[:8]}.raw")
    backup = VolumeBackup(volumeUuid=volume.uuid, type=volume.type, status="Ready", groupUuid=group)
    for storage in storages:
        where = install_path(str(storage.repositoryUuid), secrets.token_hex(32))
        backup.backupStorageRefs.append(
            VolumeBackupStorageRef(backupStorageUuid=storage.uuid, status="Ready", installPath=where)
        )
    site.session.add(backup)
    site.session.commit()
    return backup


def test_get_finds_the_row_or_says_what_is_not_found(site: Site) -> None:
    host = rows.get(site.session, Host, site.host, "host")
    missing = new_uuid()
    with pytest.raises(NotFound, match=f"host {missing}"):
        rows.get(site.session, Host, missing, "host")
    assert host.uuid == site.host


def test_connected_host_disconnects_a_host_that_stopped_heartbeating(site: Site) -> None:
    assert rows.connected_host(site.session, site.host).status == "Connected"
    site.session.get_one(Host, site.host).lastHeartbeat = now() - timedelta(hours=1)
    with pytest.raises(Conflict, match="no worker is running"):
        rows.connected_host(site.session, site.host)
    assert site.session.get_one(Host, site.host).status == "Disconnected"


def test_pick_storage_defaults_to_the_enabled_master_and_refuses_a_disabled_one(site: Site) -> None:
    with pytest.raises(Conflict, match="no enabled master"):
        rows.pick_storage(site.session, None)
    master = site.storage("master")
    standby = site.storage("standby", role="standby")
    assert rows.pick_storage(site.session, None) is master
    assert rows.pick_storage(site.session, standby.uuid) is standby
    with pytest.raises(NotFound):
        rows.pick_storage(site.session, new_uuid())
    standby.state = "Disabled"
    with pytest.raises(Conflict, match="Disabled"):
        rows.pick_storage(site.session, standby.uuid)
    assert rows.pick_storage(site.session, standby.uuid, for_write=False) is standby


def test_ready_volume_and_ready_backup_refuse_rows_in_another_status(site: Site) -> None:
    volume = site.volume()
    assert rows.ready_volume(site.session, volume.uuid) is volume
    volume.status = "Creating"
    with pytest.raises(Conflict, match="is Creating"):
        rows.ready_volume(site.session, volume.uuid)
    backup = _ready_copies(site)
    assert rows.ready_backup(site.session, backup.uuid) is backup
    backup.status = "Deleting"
    with pytest.raises(Conflict, match="is Deleting"):
        rows.ready_backup(site.session, backup.uuid)


def test_check_vm_stopped_refuses_a_running_vm(site: Site) -> None:
    vm = site.vm()
    volume = site.volume(vm=vm)
    rows.check_vm_stopped(site.session, volume, "revert")
    vm.state = "Running"
    with pytest.raises(Conflict, match="revert needs it Stopped"):
        rows.check_vm_stopped(site.session, volume, "revert")


def test_new_backup_row_is_creating_with_one_creating_copy(site: Site) -> None:
    storage = site.storage()
    volume = site.volume(kind="Root", vm=site.vm())
    backup = rows.new_backup_row(site.session, volume, storage, "b", "g1", "about")
    assert (backup.volumeUuid, backup.type, backup.size, backup.groupUuid, backup.status) == (
        volume.uuid,
        "Root",
        volume.size,
        "g1",
        "Creating",
    )
    assert [(r.backupStorageUuid, r.status) for r in backup.backupStorageRefs] == [(storage.uuid, "Creating")]


def test_volume_file_is_the_checked_real_path(site: Site, outside: Path) -> None:
    volume = site.volume("target.raw")
    link = site.tmp / "link.raw"
    link.symlink_to(volume.installPath)
    linked = site.volume(path=link)
    escaping = site.tmp / "escape.raw"
    (outside / "elsewhere.raw").write_bytes(b"x" * 4096)
    escaping.symlink_to(outside / "elsewhere.raw")

    assert rows.volume_file(site.session, volume) == volume.installPath
    with pytest.raises(PathNotAllowed, match=f"it is the file of volume {volume.uuid}"):
        rows.volume_file(site.session, linked)  # another registered volume's file
    with pytest.raises(PathNotAllowed, match="not inside"):
        rows.volume_file(site.session, site.volume(path=escaping))
    site.session.delete(volume)
    site.session.commit()
    assert rows.volume_file(site.session, linked) == str(site.tmp / "target.raw")
    linked.status = "Creating"
    with pytest.raises(Conflict):
        rows.volume_file(site.session, linked)


def test_add_ref_makes_the_ref_type_of_the_row_and_ref_on_finds_it(site: Site) -> None:
    storage = site.storage()
    database = DatabaseBackup(name="db")
    volume = VolumeBackup(volumeUuid=new_uuid())
    assert isinstance(rows.add_ref(database, storage.uuid), DatabaseBackupStorageRef)
    assert isinstance(rows.add_ref(volume, storage.uuid, "Ready"), VolumeBackupStorageRef)
    assert rows.ref_on(volume, storage.uuid) is volume.backupStorageRefs[0]
    assert rows.ref_on(volume, new_uuid()) is None


def test_copy_on_needs_a_copy_on_that_storage(site: Site) -> None:
    master = site.storage("master")
    standby = site.storage("standby", role="standby")
    backup = _ready_copies(site, master)
    assert rows.copy_on(site.session, backup, master.uuid) == (master, backup.backupStorageRefs[0])
    with pytest.raises(Conflict, match="no copy on backup storage"):
        rows.copy_on(site.session, backup, standby.uuid)
    with pytest.raises(NotFound):
        rows.copy_on(site.session, backup, new_uuid())


def test_ready_ref_reads_the_masters_copy_first_then_one_that_answers(site: Site) -> None:
    master = site.storage("master")
    standby = site.storage("standby", role="standby")
    backup = _ready_copies(site, standby, master)
    on_standby, on_master = backup.backupStorageRefs

    assert rows.ready_ref(backup, None, site.session) is on_master
    assert rows.ready_ref(backup, standby.uuid, site.session) is on_standby
    master.status = "Disconnected"
    assert rows.ready_ref(backup, None, site.session) is on_standby
    on_standby.status = "Failed"
    with pytest.raises(Conflict, match=f"no Ready copy on backup storage {standby.uuid}"):
        rows.ready_ref(backup, standby.uuid, site.session)
    with pytest.raises(NotFound):
        rows.ready_ref(backup, new_uuid(), site.session)
    on_master.status = "Failed"
    with pytest.raises(Conflict, match="has no Ready copy"):
        rows.ready_ref(backup, None, site.session)


def test_group_backups_lists_the_root_volumes_backup_first(site: Site) -> None:
    site.storage()
    group = new_uuid()
    vm = site.vm()
    data = site.volume("data.raw", vm=vm)
    root = site.volume("root.raw", vm=vm, kind="Root")
    for volume in (data, root):
        site.session.add(VolumeBackup(volumeUuid=volume.uuid, type=volume.type, groupUuid=group, status="Ready"))
    site.session.commit()
    assert [b.volumeUuid for b in rows.group_backups(site.session, group)] == [root.uuid, data.uuid]
    with pytest.raises(NotFound, match="VM backup"):
        rows.group_backups(site.session, new_uuid())


@given(repository=st.uuids().map(str), manifest=st.binary(min_size=32, max_size=32).map(bytes.hex))
def test_manifest_id_reads_back_what_install_path_wrote(repository: str, manifest: str) -> None:
    ref = VolumeBackupStorageRef(installPath=install_path(repository, manifest))
    assert rows.manifest_id(ref) == manifest


@pytest.mark.parametrize("mode", ["Permissive", "Enforcing"])
def test_check_delete_mode_takes_the_two_modes(mode: str) -> None:
    rows.check_delete_mode(mode)


@pytest.mark.parametrize("mode", ["permissive", "", "Force"])
def test_check_delete_mode_refuses_anything_else(mode: str) -> None:
    with pytest.raises(InvalidArgument, match="deleteMode"):
        rows.check_delete_mode(mode)


def test_project_of_is_the_volumes_own_else_its_vms(site: Site) -> None:
    vm = site.vm()
    vm.projectUuid = "p-vm"
    volume = site.volume(vm=vm)
    assert rows.project_of(site.session, volume) == "p-vm"
    volume.projectUuid = "p-own"
    assert rows.project_of(site.session, volume) == "p-own"
    assert rows.project_of(site.session, None) is None
