"""scanBackupStorage: rebuild the catalog's rows from what a backup storage holds.

Every manifest carries its own metadata: a volume backup its uuid, name, VM group, the
volume's and the VM's inventories; a database backup its uuid and name. Scanning makes the
catalog list every backup the storage holds (and the hosts, VMs and volumes they were taken
of, when the catalog lacks them), with a Ready ref to this storage. It is idempotent: a second
scan changes nothing. A backup whose job died after its manifest was committed becomes Ready.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from shared.catalog.models import ApiJob, BackupStorage, DatabaseBackup, Host, VmInstance, Volume, VolumeBackup
from shared.repository.manifest import BackupEntry, parse_time
from shared.repository.repo import Repository
from shared.service.rows import AnyBackup, add_ref, get, ref_on
from shared.storage import open_repository, refresh_capacity

log = logging.getLogger(__name__)


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_time(value)
    except ValueError:
        return None


def _host(session: Session, uuid: str | None) -> str | None:
    if uuid and session.get(Host, uuid) is None:
        session.add(Host(uuid=uuid, name=uuid[:8], status="Disconnected"))
        session.flush()
    return uuid


def _resources(session: Session, metadata: dict[str, Any], imported: dict[str, list[str]]) -> None:
    """The VM and the volumes a volume backup's metadata describes, when the catalog lacks them."""
    vm = metadata.get("vmInstance") or {}
    if vm.get("uuid") and session.get(VmInstance, vm["uuid"]) is None:
        session.add(
            VmInstance(
                uuid=vm["uuid"],
                name=vm.get("name") or "",
                description=vm.get("description"),
                hostUuid=_host(session, vm.get("hostUuid")),
                platform=vm.get("platform") or "Linux",
                cpuNum=vm.get("cpuNum") or 1,
                memorySize=vm.get("memorySize") or 0,
                projectUuid=vm.get("projectUuid"),
                state="Stopped",
                qmpSocket=vm.get("qmpSocket"),
                guestAgentSocket=vm.get("guestAgentSocket"),
                createDate=_when(vm.get("createDate")),
            )
        )
        session.flush()
        imported["vmInstances"].append(vm["uuid"])
    for volume in [metadata.get("volume") or {}, *(metadata.get("volumes") or [])]:
        if not volume.get("uuid") or not volume.get("hostUuid") or session.get(Volume, volume["uuid"]) is not None:
            continue
        if volume.get("vmInstanceUuid") and session.get(VmInstance, volume["vmInstanceUuid"]) is None:
            continue
        session.add(
            Volume(
                uuid=volume["uuid"],
                name=volume.get("name") or "",
                description=volume.get("description"),
                vmInstanceUuid=volume.get("vmInstanceUuid"),
                hostUuid=_host(session, volume["hostUuid"]),
                projectUuid=volume.get("projectUuid"),
                type=volume.get("type") or "Data",
                format=volume.get("format") or "raw",
                installPath=volume.get("installPath") or "",
                size=volume.get("size") or 0,
                createDate=_when(volume.get("createDate")),
            )
        )
        session.flush()
        imported["volumes"].append(volume["uuid"])


def _volume_backup_row(session: Session, repo: Repository, entry: BackupEntry) -> tuple[AnyBackup, bool]:
    manifest, metadata = entry.manifest, entry.manifest.metadata or {}
    info = metadata.get("backup") or {}
    uuid = str(info.get("uuid") or uuidlib.uuid5(uuidlib.UUID(repo.id), entry.id).hex)
    row = session.get(VolumeBackup, uuid)
    if row is not None:
        if row.status in ("Creating", "Failed"):
            row.status = "Ready"  # its manifest was committed: the job died before the catalog knew
            row.mode, row.size, row.metadata_ = manifest.mode, manifest.size, metadata or row.metadata_
        return row, False
    volume = metadata.get("volume") or {}
    row = VolumeBackup(
        uuid=uuid,
        name=str(info.get("name") or manifest.name or entry.id[:12]),
        volumeUuid=str(volume.get("uuid") or ""),
        type=str(volume.get("type") or "Data"),
        mode=manifest.mode,
        groupUuid=info.get("groupUuid"),
        size=manifest.size,
        status="Ready",
        metadata_=metadata or None,
        createDate=manifest.created_at,
        bytesRead=(manifest.stats or {}).get("bytesRead"),
        bytesWritten=(manifest.stats or {}).get("bytesWritten"),
        chunks=sum(1 for digest in manifest.chunks if digest),
        newChunks=(manifest.stats or {}).get("newChunks"),
    )
    session.add(row)
    return row, True


def _database_backup_row(session: Session, repo: Repository, entry: BackupEntry) -> tuple[AnyBackup, bool]:
    manifest, metadata = entry.manifest, entry.manifest.metadata or {}
    info = metadata.get("databaseBackup") or {}
    uuid = str(info.get("uuid") or uuidlib.uuid5(uuidlib.UUID(repo.id), entry.id).hex)
    summary = {
        "name": info.get("name") or manifest.name,
        "version": metadata.get("version"),
        "createdTime": metadata.get("createdTime") or manifest.created,
        "md5": getattr(manifest, "md5", None) or (manifest.stats or {}).get("md5"),
        "engine": metadata.get("engine") or manifest.format,
        "serverVersion": metadata.get("serverVersion"),
        **({"schedulerJobGroupUuid": info["schedulerJobGroupUuid"]} if info.get("schedulerJobGroupUuid") else {}),
    }
    row = session.get(DatabaseBackup, uuid)
    if row is not None:
        if row.status in ("Creating", "Failed"):
            row.status, row.size, row.metadata_ = "Ready", manifest.size, summary
        return row, False
    row = DatabaseBackup(
        uuid=uuid,
        name=str(summary["name"] or entry.id[:12]),
        description=info.get("description"),
        size=manifest.size,
        status="Ready",
        metadata_=summary,
        createDate=manifest.created_at,
    )
    session.add(row)
    return row, True


def scan_storage(session: Session, storage: BackupStorage) -> dict[str, Any]:
    """Import every backup ``storage`` holds into the catalog; what was imported."""
    repo = open_repository(storage)
    entries = repo.backups()
    protected = repo.protected_ids()  # a protected backup is imported protected
    imported: dict[str, list[str]] = {"volumeBackups": [], "databaseBackups": [], "vmInstances": [], "volumes": []}
    attached: list[str] = []
    by_manifest: dict[str, VolumeBackup] = {}
    for entry in entries:
        database = getattr(entry.manifest, "kind", "volume") == "stream"
        if not database:
            _resources(session, entry.manifest.metadata or {}, imported)
        row, new = (_database_backup_row if database else _volume_backup_row)(session, repo, entry)
        if new:
            imported["databaseBackups" if database else "volumeBackups"].append(row.uuid)
            row.protected = entry.id in protected
        ref = ref_on(row, storage.uuid)
        if ref is None or ref.status not in ("Ready", "Corrupted"):  # a scan lists, it does not verify
            ref = ref or add_ref(row, storage.uuid)
            ref.status, ref.installPath = "Ready", repo.install_path(entry.id)
            attached.append(row.uuid)
        if isinstance(row, VolumeBackup):
            by_manifest[entry.id] = row
    for entry in entries:
        row_or_none = by_manifest.get(entry.id)
        parent = by_manifest.get(entry.manifest.parent or "")
        if row_or_none is not None and parent is not None and row_or_none.parentUuid is None:
            row_or_none.parentUuid = parent.uuid
    refresh_capacity(storage, force=True)
    session.commit()
    log.info("storage.scanned uuid=%s backups=%d imported=%s", storage.uuid, len(entries), imported)
    return {
        "backupStorageUuid": storage.uuid,
        "backups": len(entries),
        "imported": imported["volumeBackups"],
        "importedDatabaseBackups": imported["databaseBackups"],
        "importedVmInstances": imported["vmInstances"],
        "importedVolumes": imported["volumes"],
        "attached": attached,
    }


def run_scan(session: Session, job: ApiJob) -> dict[str, Any]:
    """The worker side of scanBackupStorage."""
    storage: BackupStorage = get(session, BackupStorage, (job.params or {})["backupStorageUuid"], "backup storage")
    return scan_storage(session, storage)
