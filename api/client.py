"""``Client``: blockvault's REST API from Python, for enqueueing jobs programmatically.

    from api.client import Client
    bv = Client()                                   # BLOCKVAULT_API_URL, BLOCKVAULT_API_KEY
    job = bv.backup_volume(volume_uuid, mode="auto")        # returns the API job uuid
    backup = bv.wait(job, progress=lambda pct: print(pct))  # the backup's inventory
    bv.query("volume-backups", "volumeUuid=" + volume_uuid, sort="-createDate", limit=5)

Every failure is an :class:`ApiError` carrying the HTTP status and the API's stable code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx

from shared.accesskey_signature import signature, signed_path
from shared.config import setting


class ApiError(Exception):
    """An error answer of the API (or no answer at all: status 0, code UNREACHABLE)."""

    def __init__(self, status: int, code: str, description: str, details: str = "") -> None:
        super().__init__(f"{code}: {description}")
        self.status, self.code, self.description, self.details = status, code, description, details


class JobFailed(ApiError):
    """An API job that ended Failed (its error is the job's)."""


class AccessKeyAuth(httpx.Auth):
    """Signs each request with a ZStack access key, as ZStack's SDKs do (shared.accesskey_signature)."""

    def __init__(self, key_id: str, secret: str) -> None:
        self.key_id, self.secret = key_id, secret

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        date = format_datetime(datetime.now(UTC), usegmt=True)
        signed = signature(self.secret, request.method, date, signed_path(request.url.path))
        request.headers["Date"] = date
        request.headers["Authorization"] = f"ZStack {self.key_id}:{signed}"
        yield request


class Client:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        access_key: tuple[str, str] | None = None,
    ) -> None:
        """``api_key`` (default BLOCKVAULT_API_KEY), or ``access_key`` (AccessKeyID, secret):
        every request signed with it instead."""
        self.base_url = (base_url or setting("api_url") or "http://127.0.0.1:8080").rstrip("/")
        key = api_key if api_key is not None else setting("api_key")
        headers = {"Authorization": f"Bearer {key}"} if key and access_key is None else {}
        auth = AccessKeyAuth(*access_key) if access_key is not None else None
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, auth=auth)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, params: Any = None, json: Any = None) -> tuple[int, dict[str, Any]]:
        try:
            response = self.http.request(method, path, params=params, json=json)
        except httpx.HTTPError as exc:
            raise ApiError(0, "UNREACHABLE", f"cannot reach {self.base_url}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            raise ApiError(response.status_code, "BAD_RESPONSE", response.text[:200]) from None
        if response.status_code >= 400 or body.get("success") is False:
            error = body.get("error") or {}
            raise ApiError(
                response.status_code,
                str(error.get("code", "HTTP_ERROR")),
                str(error.get("description", response.reason_phrase)),
                str(error.get("details", "")),
            )
        return response.status_code, body

    def _job(self, method: str, path: str, *, params: Any = None, json: Any = None) -> str:
        _status, body = self.request(method, path, params=params, json=json)
        return str(body["jobUuid"])

    # -- generic -----------------------------------------------------------------------------------
    def query(
        self,
        collection: str,
        *conditions: str,
        sort: str | None = None,
        limit: int | None = None,
        start: int | None = None,
        count: bool = False,
        reply_with_count: bool = False,
        fields: Sequence[str] | None = None,
        group_by: str | None = None,
    ) -> dict[str, Any]:
        """The whole envelope (``inventories``, and ``total`` when asked)."""
        params: list[tuple[str, str]] = [("q", c) for c in conditions]
        for key, value in (
            ("sort", sort),
            ("limit", limit),
            ("start", start),
            ("count", "true" if count else None),
            ("replyWithCount", "true" if reply_with_count else None),
            ("fields", ",".join(fields) if fields else None),
            ("groupBy", group_by),
        ):
            if value is not None:
                params.append((key, str(value)))
        return self.request("GET", f"/v1/{collection}", params=params)[1]

    def get(self, collection: str, uuid: str) -> dict[str, Any]:
        inventories: list[dict[str, Any]] = self.request("GET", f"/v1/{collection}/{uuid}")[1]["inventories"]
        return inventories[0]

    def create(self, collection: str, params: dict[str, Any], *, user_tags: Sequence[str] = ()) -> dict[str, Any]:
        body = {"params": params, "userTags": list(user_tags)}
        inventory: dict[str, Any] = self.request("POST", f"/v1/{collection}", json=body)[1]["inventory"]
        return inventory

    def action(
        self, collection: str, uuid: str, name: str, params: dict[str, Any] | None = None
    ) -> dict[str, Any] | str:
        """A synchronous action returns the inventory; an asynchronous one the job uuid."""
        status, body = self.request("PUT", f"/v1/{collection}/{uuid}/actions", json={name: params or {}})
        return str(body["jobUuid"]) if status == 202 else dict(body["inventory"])

    def job(self, job_uuid: str) -> dict[str, Any]:
        status, body = self.request("GET", f"/v1/api-jobs/{job_uuid}")
        return {"state": "Running", **body} if status == 202 else {"state": "Succeeded", **body}

    def wait(
        self,
        job_uuid: str,
        *,
        progress: Callable[[int], None] | None = None,
        timeout: float | None = None,
        poll: float = 0.5,
    ) -> dict[str, Any]:
        """Poll a job until it ends: its inventory, or ApiError with the job's error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                status, body = self.request("GET", f"/v1/api-jobs/{job_uuid}")
            except ApiError as exc:
                if exc.status in (0, 401, 404, 503):  # the poll itself failed, not the job
                    raise
                raise JobFailed(exc.status, exc.code, exc.description, exc.details) from None
            if status == 200:
                if progress:
                    progress(100)
                return dict(body["inventory"])
            if progress:
                progress(int(body.get("progress", 0)))
            if deadline is not None and time.monotonic() > deadline:
                raise ApiError(0, "TIMEOUT", f"job {job_uuid} still running after {timeout} s")
            time.sleep(poll)

    # -- conveniences ------------------------------------------------------------------------------
    def register_vm(self, name: str, **params: Any) -> dict[str, Any]:
        return self.create("vm-instances", {"name": name, **params})

    def register_volume(self, host_uuid: str, install_path: str, **params: Any) -> dict[str, Any]:
        return self.create("volumes", {"hostUuid": host_uuid, "installPath": install_path, **params})

    def register_volumes(self, volumes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Register many volumes in one request (all or none)."""
        body = {"params": {"volumes": list(volumes)}}
        inventories: list[dict[str, Any]] = self.request("POST", "/v1/volumes", json=body)[1]["inventories"]
        return inventories

    def add_backup_storage(self, name: str, url: str, **params: Any) -> dict[str, Any]:
        return self.create("backup-storage", {"name": name, "url": url, "type": "ImageStore", **params})

    def backup_volume(self, volume_uuid: str, **params: Any) -> str:
        return self._job("POST", f"/v1/volumes/{volume_uuid}/volume-backups", json={"params": params})

    def backup_vm(self, root_volume_uuid: str, **params: Any) -> str:
        return self._job("POST", f"/v1/volumes/{root_volume_uuid}/vm-backups", json={"params": params})

    def revert_volume(self, backup_uuid: str, **params: Any) -> str:
        return str(self.action("volume-backups", backup_uuid, "revertVolumeFromVolumeBackup", params))

    def create_volume_from_backup(self, backup_uuid: str, **params: Any) -> str:
        return str(self.action("volume-backups", backup_uuid, "createDataVolumeFromVolumeBackup", params))

    def verify_backup(self, backup_uuid: str, **params: Any) -> str:
        return str(self.action("volume-backups", backup_uuid, "verifyVolumeBackup", params))

    def sync_backup(self, backup_uuid: str, dst_storage_uuid: str, **params: Any) -> str:
        """Copy a backup to another storage (srcBackupStorageUuid, bandwidthLimit optional)."""
        params = {"dstBackupStorageUuid": dst_storage_uuid, **params}
        return str(self.action("volume-backups", backup_uuid, "syncBackupFromImageStoreBackupStorage", params))

    def recover_backup(self, backup_uuid: str, src_storage_uuid: str, dst_storage_uuid: str, **params: Any) -> str:
        """Copy a backup back from ``src`` (e.g. a remote site) to ``dst`` (e.g. a new local storage)."""
        params = {"srcBackupStorageUuid": src_storage_uuid, "dstBackupStorageUuid": dst_storage_uuid, **params}
        return str(self.action("volume-backups", backup_uuid, "recoverBackupFromImageStoreBackupStorage", params))

    def sync_vm_backup(self, group_uuid: str, dst_storage_uuid: str, **params: Any) -> str:
        params = {"dstBackupStorageUuid": dst_storage_uuid, **params}
        return str(self.action("vm-backups", group_uuid, "syncVmBackupFromImageStoreBackupStorage", params))

    def recover_vm_backup(self, group_uuid: str, src_storage_uuid: str, dst_storage_uuid: str, **params: Any) -> str:
        params = {"srcBackupStorageUuid": src_storage_uuid, "dstBackupStorageUuid": dst_storage_uuid, **params}
        return str(self.action("vm-backups", group_uuid, "recoverVmBackupFromImageStoreBackupStorage", params))

    def switch_storage_role(self, storage_uuid: str) -> dict[str, Any]:
        """Promote this standby ImageStore to master (the master becomes its standby)."""
        return dict(self.action("backup-storage", storage_uuid, "switchBackupStorageRole"))  # type: ignore[arg-type]

    def scan_storage(self, storage_uuid: str) -> str:
        """Import every backup the storage holds into the catalog (an API job)."""
        return str(self.action("backup-storage", storage_uuid, "scanBackupStorage"))

    def reclaim_storage(self, storage_uuid: str) -> str:
        return str(self.action("backup-storage", storage_uuid, "reclaimSpaceFromImageStore"))

    def reconnect_storage(self, storage_uuid: str) -> dict[str, Any]:
        return dict(self.action("backup-storage", storage_uuid, "reconnectBackupStorage"))  # type: ignore[arg-type]

    def backup_database(self, **params: Any) -> str:
        """Back the catalog up (name, description, backupStorageUuid optional): the job uuid."""
        return self._job("POST", "/v1/database-backups", json={"params": params})

    def register_database(self, name: str, url: str, **params: Any) -> dict[str, Any]:
        """A MySQL/MariaDB database to back up (``mysql://user:password@host:port/database``)."""
        return self.create("databases", {"name": name, "url": url, **params})

    def recover_database(self, backup_uuid: str, **params: Any) -> str:
        """recoverDatabaseBackup {backupStorageUuid, databaseUrl, force} (the catalog's), or
        {databaseUuid, databaseName, force} (a registered database's): the job uuid."""
        return str(self.action("database-backups", backup_uuid, "recoverDatabaseBackup", params))

    def sync_database_backup(self, backup_uuid: str, dst_storage_uuid: str, **params: Any) -> str:
        params = {"dstBackupStorageUuid": dst_storage_uuid, **params}
        return str(
            self.action("database-backups", backup_uuid, "syncDatabaseBackupFromImageStoreBackupStorage", params)
        )

    def instant_restore_volume(self, backup_uuid: str, **params: Any) -> str:
        """instantRestoreVolumeFromVolumeBackup {name, vmInstanceUuid, hostUuid, installPath,
        backupStorageUuid, attachTimeout}: the job uuid. The new volume (its resourceUuid on the
        job, its overlay's installPath on the volume) is usable while the job streams."""
        return str(self.action("volume-backups", backup_uuid, "instantRestoreVolumeFromVolumeBackup", params))

    def instant_restore_vm(self, group_uuid: str, **params: Any) -> str:
        """instantRestoreVmFromVmBackup {vmInstanceUuid, backupStorageUuid, attachTimeout}."""
        return str(self.action("vm-backups", group_uuid, "instantRestoreVmFromVmBackup", params))

    # -- files inside a backup -----------------------------------------------------------------------
    def backup_partitions(self, backup_uuid: str, **params: Any) -> list[dict[str, Any]]:
        """Where filesystems may be in the backup: partitions, LVM volumes, the whole volume."""
        found: list[dict[str, Any]] = self.request(
            "GET", f"/v1/volume-backups/{backup_uuid}/partitions", params=params
        )[1]["inventories"]
        return found

    def list_files(
        self, backup_uuid: str, path: str = "/", *, partition: int | None = None, start: int = 0, limit: int = 1000
    ) -> dict[str, Any]:
        """A directory's entries in a backup (``inventories``, ``total``, ``partition``)."""
        params: dict[str, Any] = {"path": path, "start": start, "limit": limit}
        if partition is not None:
            params["partition"] = partition
        return self.request("GET", f"/v1/volume-backups/{backup_uuid}/files", params=params)[1]

    def read_file(self, backup_uuid: str, path: str, *, partition: int | None = None) -> Iterator[bytes]:
        """The bytes of a file in a backup, as they come (ApiError before the first piece)."""
        params: dict[str, Any] = {"path": path}
        if partition is not None:
            params["partition"] = partition
        url = f"/v1/volume-backups/{backup_uuid}/files/content"
        try:
            with self.http.stream("GET", url, params=params, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    error = (response.json() if response.content else {}).get("error") or {}
                    raise ApiError(
                        response.status_code,
                        str(error.get("code", "HTTP_ERROR")),
                        str(error.get("description", response.reason_phrase)),
                    )
                expected = int(response.headers.get("Content-Length", -1))
                got = 0
                for piece in response.iter_bytes():
                    got += len(piece)
                    yield piece
                if 0 <= expected != got:
                    raise ApiError(502, "TRUNCATED", f"{path}: got {got} of {expected} bytes")
        except httpx.HTTPError as exc:
            raise ApiError(0, "UNREACHABLE", f"cannot read {path} from {self.base_url}: {exc}") from None

    def change_protection(self, kind: str, uuid: str, protected: bool) -> Any:
        """Protect or unprotect a backup: ``kind`` is ``volume`` (answers its inventory),
        ``vm`` (a VM backup by its groupUuid: answers its volume backups) or ``database``."""
        action = {"volume": "changeVolumeBackupProtection", "vm": "changeVmBackupProtection"}.get(
            kind, "changeDatabaseBackupProtection"
        )
        _status, body = self.request(
            "PUT", f"/v1/{kind}-backups/{uuid}/actions", json={action: {"protected": protected}}
        )
        return body["inventories"] if kind == "vm" else body["inventory"]

    def set_project_quota(self, project_uuid: str, **quotas: int | None) -> dict[str, Any]:
        """updateProjectQuota (admins): ``quotaBackupBytes`` and/or ``quotaBackupCount``, None
        for no limit."""
        return dict(self.action("projects", project_uuid, "updateProjectQuota", quotas))  # type: ignore[arg-type]

    def revert_vm(self, group_uuid: str, **params: Any) -> str:
        return str(self.action("vm-backups", group_uuid, "revertVmFromVmBackup", params))

    def create_vm_from_backup(self, group_uuid: str, **params: Any) -> str:
        """createVmInstanceFromVmBackup {name, description, hostUuid, backupStorageUuid,
        strategy: InstantStart|CreateStopped, keepMacs}: a new libvirt domain (docs/libvirt.md)."""
        return str(self.action("vm-backups", group_uuid, "createVmInstanceFromVmBackup", params))

    def delete_vm_backup(self, group_uuid: str, backup_storage_uuids: Sequence[str] = ()) -> str:
        params = {"backupStorageUuids": ",".join(backup_storage_uuids)} if backup_storage_uuids else None
        return self._job("DELETE", f"/v1/vm-backups/{group_uuid}", params=params)

    # -- access keys ---------------------------------------------------------------------------------
    def create_access_key(self, account_uuid: str, description: str | None = None) -> dict[str, Any]:
        """A ZStack access key of the account (admins): its inventory, with ``AccessKeySecret``
        (shown this once)."""
        params = {"accountUuid": account_uuid, "userUuid": account_uuid}
        if description is not None:
            params["description"] = description
        return self.create("accesskeys", params)

    def access_keys(self, *conditions: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.query("accesskeys", *conditions)["inventories"]
        return rows

    def change_access_key_state(self, key_uuid: str, state_event: str) -> dict[str, Any]:
        """``enable`` or ``disable`` (admins)."""
        return dict(self.action("accesskeys", key_uuid, "changeAccessKeyState", {"stateEvent": state_event}))  # type: ignore[arg-type]

    def delete_access_key(self, key_uuid: str) -> None:
        self.request("DELETE", f"/v1/accesskeys/{key_uuid}")

    # -- notifications (admins) ----------------------------------------------------------------------
    def create_notification_target(self, name: str, target_type: str, **params: Any) -> dict[str, Any]:
        """A webhook or smtp target (docs/notifications.md); its secrets are never answered."""
        return self.create("notification-targets", {"name": name, "type": target_type, **params})

    def update_notification_target(self, target_uuid: str, **params: Any) -> dict[str, Any]:
        return dict(self.action("notification-targets", target_uuid, "updateNotificationTarget", params))  # type: ignore[arg-type]

    def test_notification_target(self, target_uuid: str) -> dict[str, Any]:
        """Send a test message now: the history row (``status`` Sent, or Failed with ``lastError``)."""
        return dict(self.action("notification-targets", target_uuid, "testNotificationTarget"))  # type: ignore[arg-type]

    def delete_notification_target(self, target_uuid: str) -> None:
        self.request("DELETE", f"/v1/notification-targets/{target_uuid}")

    def create_notification_rule(
        self, name: str, event_type: str, target_uuids: Sequence[str], **parameters: Any
    ) -> dict[str, Any]:
        params = {"name": name, "eventType": event_type, "targetUuids": list(target_uuids)}
        return self.create("notification-rules", {**params, **({"parameters": parameters} if parameters else {})})

    def delete_notification_rule(self, rule_uuid: str) -> None:
        self.request("DELETE", f"/v1/notification-rules/{rule_uuid}")

    def notification_histories(self, *conditions: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.query("notification-histories", *conditions, sort="-createDate")[
            "inventories"
        ]
        return rows

    # -- scheduling ----------------------------------------------------------------------------------
    def create_job_group(self, name: str, job_type: str, **job_data: Any) -> dict[str, Any]:
        """A job group of ``job_type`` (volumeBackup, vmBackup, databaseBackup); ``job_data``
        is its jobData (backupStorageUuids, fullBackupInterval, retention, bandwidthLimit)."""
        return self.create("scheduler/jobgroups", {"name": name, "type": job_type, "parameters": job_data})

    def add_targets(self, group_uuid: str, target_uuids: Sequence[str]) -> dict[str, Any]:
        body = {"params": {"targetResourceUuids": list(target_uuids)}}
        return dict(self.request("POST", f"/v1/scheduler/jobgroups/{group_uuid}/jobs", json=body)[1]["inventory"])

    def remove_targets(self, group_uuid: str, target_uuids: Sequence[str]) -> dict[str, Any]:
        params = {"targetResourceUuids": ",".join(target_uuids)}
        return dict(self.request("DELETE", f"/v1/scheduler/jobgroups/{group_uuid}/jobs", params=params)[1]["inventory"])

    def create_trigger(self, name: str, **params: Any) -> dict[str, Any]:
        """schedulerType simple (schedulerInterval s, repeatCount) or cron (cron: five fields or
        Quartz's six or seven, timeZone); startTime/stopTime in Unix seconds (no startTime: now)."""
        return self.create("scheduler/triggers", {"name": name, **params})

    def attach_trigger(self, trigger_uuid: str, group_uuid: str, *, trigger_now: bool = False) -> dict[str, Any]:
        path = f"/v1/scheduler/triggers/{trigger_uuid}/jobgroups/{group_uuid}"
        return dict(self.request("POST", path, json={"params": {"triggerNow": trigger_now}})[1]["inventory"])

    def detach_trigger(self, trigger_uuid: str, group_uuid: str) -> None:
        self.request("DELETE", f"/v1/scheduler/triggers/{trigger_uuid}/jobgroups/{group_uuid}")

    def run_job_group(self, group_uuid: str) -> dict[str, Any]:
        return dict(self.action("scheduler/jobgroups", group_uuid, "runSchedulerJobGroup"))  # type: ignore[arg-type]

    def histories(self, *conditions: str, **query: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.query("scheduler/jobhistories", *conditions, **query)["inventories"]
        return rows

    def delete_backup(self, backup_uuid: str, backup_storage_uuids: Sequence[str] = ()) -> str:
        params = {"backupStorageUuids": ",".join(backup_storage_uuids)} if backup_storage_uuids else None
        return self._job("DELETE", f"/v1/volume-backups/{backup_uuid}", params=params)
