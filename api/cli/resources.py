"""``blockvault <resource> <verb>``: client calls over :class:`api.client.Client`.

Exit codes: 0 success, 1 the job failed or the server erred, 2 the request was refused (4xx:
bad input, unknown resource, wrong state, no key), 3 the API could not be reached. ``--json``
prints the API's JSON; otherwise a short line or table. ``--wait`` follows an API job with a
progress bar (on a terminal) and prints its result.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from api.cli.storage_flags import StorageCommand, credential_params
from api.client import ApiError, Client, JobFailed
from shared.schedule import MAX_SECONDS


def _client() -> Client:
    return Client()


def _exit_for(error: ApiError) -> int:
    if isinstance(error, JobFailed):
        return 1
    if error.status == 0:
        return 3
    return 2 if 400 <= error.status < 500 else 1


class ClientGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            click.echo(f"blockvault: error: {exc.code}: {exc.description}", err=True)
            sys.exit(_exit_for(exc))


def _print(data: Any, as_json: bool, columns: tuple[str, ...] = ("uuid", "name")) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=None))
        return
    rows = data if isinstance(data, list) else [data]
    for row in rows:
        click.echo("  ".join(str(row.get(c, "")) for c in columns))


def _wait(client: Client, job: str, as_json: bool, columns: tuple[str, ...]) -> None:
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeElapsedColumn

        with Progress(
            "job " + job[:8], BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), console=Console(stderr=True)
        ) as bar:
            task = bar.add_task("job", total=100)
            result = client.wait(job, progress=lambda pct: bar.update(task, completed=pct))
    else:
        result = client.wait(job)
    _print(result, as_json, columns)


def _submit(client: Client, job: str, wait: bool, as_json: bool, columns: tuple[str, ...]) -> None:
    if wait:
        _wait(client, job, as_json, columns)
    elif as_json:
        click.echo(json.dumps({"jobUuid": job}))
    else:
        click.echo(job)


def _list_command(collection: str, columns: tuple[str, ...]) -> click.Command:
    @click.command("list")
    @click.option("-q", "conditions", multiple=True, help="A condition, e.g. -q 'size>1000' (repeatable).")
    @click.option("--sort", help="+field or -field")
    @click.option("--limit", type=int)
    @click.option("--start", type=int)
    @click.option("--count", is_flag=True)
    @click.option("--group-by")
    @click.option("--json", "as_json", is_flag=True)
    def command(
        conditions: tuple[str, ...],
        sort: str | None,
        limit: int | None,
        start: int | None,
        count: bool,
        group_by: str | None,
        as_json: bool,
    ) -> None:
        """Query the collection with the query language."""
        body = _client().query(
            collection, *conditions, sort=sort, limit=limit, start=start, count=count, group_by=group_by
        )
        if as_json:
            click.echo(json.dumps(body))
        elif count:
            click.echo(body.get("total", 0))
        else:
            _print(body["inventories"], False, (group_by, "count") if group_by else columns)

    return command


def _group(name: str, collection: str, columns: tuple[str, ...], help_text: str) -> click.Group:
    group = ClientGroup(name, help=help_text)
    group.add_command(_list_command(collection, columns))
    return group


WAIT = click.option("--wait", is_flag=True, help="Follow the API job to its end and print its result.")
JSON = click.option("--json", "as_json", is_flag=True)

host = _group("host", "hosts", ("uuid", "name", "managementIp", "status"), "Hosts (registered by their workers).")
vm = _group("vm", "vm-instances", ("uuid", "name", "hostUuid", "state"), "VM instances.")
volume = _group("volume", "volumes", ("uuid", "name", "type", "format", "installPath", "size"), "Volumes.")
storage = _group(
    "backup-storage", "backup-storage", ("uuid", "name", "type", "role", "status", "url"), "Backup storage."
)
volume_backup = _group(
    "volume-backup",
    "volume-backups",
    ("uuid", "name", "mode", "status", "volumeUuid", "size"),
    "Volume backups.",
)
database_backup = _group(
    "database-backup", "database-backups", ("uuid", "name", "status", "size", "createDate"), "Catalog database backups."
)
job = ClientGroup("job", help="API jobs.")


job_group = _group(
    "job-group", "scheduler/jobgroups", ("uuid", "name", "jobType", "state", "triggersUuid"), "Scheduled job groups."
)
trigger = _group(
    "trigger",
    "scheduler/triggers",
    ("uuid", "name", "schedulerType", "schedulerInterval", "repeatCount", "cron", "state"),
    "Scheduler triggers.",
)
history = _group(
    "history",
    "scheduler/jobhistories",
    ("id", "executeTime", "success", "targetResourceUuid", "resultDump"),
    "Scheduler job history.",
)
BACKUP_COLUMNS = ("uuid", "name", "mode", "status", "volumeUuid", "size")


@vm.command("create")
@click.option("--name", required=True)
@click.option("--host", "host_uuid")
@click.option("--state", type=click.Choice(["Running", "Stopped"]), default="Stopped")
@click.option("--qmp-socket", help="QMP socket of its QEMU on the host (for live backups)")
@click.option("--guest-agent-socket", help="its guest agent socket on the host (freezes filesystems for backups)")
@click.option("--libvirt-domain", "domain_uuid", help="a libvirt domain: its uuid (backed up through libvirt)")
@JSON
def vm_create(
    name: str,
    host_uuid: str | None,
    state: str,
    qmp_socket: str | None,
    guest_agent_socket: str | None,
    domain_uuid: str | None,
    as_json: bool,
) -> None:
    """Register a VM instance."""
    params: dict[str, Any] = {
        "hostUuid": host_uuid,
        "state": state,
        "qmpSocket": qmp_socket,
        "guestAgentSocket": guest_agent_socket,
    }
    if domain_uuid:
        params.update(libvirtDomain=True, resourceUuid=domain_uuid)
    _print(_client().register_vm(name, **{k: v for k, v in params.items() if v}), as_json)


@vm.command("update")
@click.argument("uuid")
@click.option("--state", type=click.Choice(["Running", "Stopped"]))
@click.option("--name")
@click.option("--qmp-socket")
@click.option("--guest-agent-socket")
@JSON
def vm_update(
    uuid: str,
    state: str | None,
    name: str | None,
    qmp_socket: str | None,
    guest_agent_socket: str | None,
    as_json: bool,
) -> None:
    """Update a VM instance (its name, sockets, or the state the hypervisor reports)."""
    given = {"state": state, "name": name, "qmpSocket": qmp_socket, "guestAgentSocket": guest_agent_socket}
    params = {k: v for k, v in given.items() if v}
    _print(_client().action("vm-instances", uuid, "updateVmInstance", params), as_json)


@volume.command("create")
@click.option("--host", "host_uuid", required=True)
@click.option("--path", "install_path", required=True, help="Absolute path of the raw or qcow2 file on that host.")
@click.option("--name")
@click.option("--type", "kind", type=click.Choice(["Root", "Data"]), default="Data")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]))
@click.option("--vm", "vm_uuid")
@JSON
def volume_create(
    host_uuid: str, install_path: str, name: str | None, kind: str, fmt: str | None, vm_uuid: str | None, as_json: bool
) -> None:
    """Register a volume file on a host."""
    params = {"name": name, "type": kind, "format": fmt, "vmInstanceUuid": vm_uuid}
    _print(_client().register_volume(host_uuid, install_path, **{k: v for k, v in params.items() if v}), as_json)


@volume.command("create-many")
@click.argument("source", type=click.File("r"))
@click.option("--batch", type=click.IntRange(1, 5000), default=1000, help="Volumes per request.")
@JSON
def volume_create_many(source: Any, batch: int, as_json: bool) -> None:
    """Register the volumes SOURCE lists (a file, or - for stdin): a JSON list of objects,
    or one object per line, each with the fields of ``volume create`` as the API names them
    (hostUuid, installPath, type, format, vmInstanceUuid, name). A request registers
    ``--batch`` of them at once, all or none."""
    text = source.read()
    try:
        items = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except ValueError as exc:
        raise click.UsageError(f"{source.name} is not JSON (a list, or an object per line): {exc}") from None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise click.UsageError(f"{source.name} must hold JSON objects")
    client = _client()
    made: list[dict[str, Any]] = []
    for start in range(0, len(items), batch):
        made += client.register_volumes(items[start : start + batch])
    _print(made, as_json)


@storage.command("add", cls=StorageCommand, with_type=True)
@click.option("--name", required=True)
@click.option("--role", type=click.Choice(["master", "standby"]), default="master")
@JSON
def storage_add(name: str, url: str, kind: str, role: str, as_json: bool, **flags: str | None) -> None:
    """Register backup storage (secrets may come from the environment instead of flags); the
    types and their flags are the backend registry's."""
    params: dict[str, Any] = {"type": kind, **credential_params(kind, flags)}
    if kind == "ImageStore":
        params["role"] = role
    _print(_client().add_backup_storage(name, url, **params), as_json)


@storage.command("switch-role")
@click.argument("uuid")
@JSON
def storage_switch_role(uuid: str, as_json: bool) -> None:
    """Promote a standby ImageStore to master (switchBackupStorageRole)."""
    _print(_client().switch_storage_role(uuid), as_json, ("uuid", "name", "role", "status"))


@storage.command("reconnect")
@click.argument("uuid")
@JSON
def storage_reconnect(uuid: str, as_json: bool) -> None:
    """Check the storage now: status and capacity."""
    _print(_client().reconnect_storage(uuid), as_json, ("uuid", "name", "role", "status", "availableCapacity"))


@storage.command("scan")
@click.argument("uuid")
@WAIT
@JSON
def storage_scan(uuid: str, wait: bool, as_json: bool) -> None:
    """Import every backup the storage holds into the catalog (scanBackupStorage)."""
    client = _client()
    _submit(client, client.scan_storage(uuid), wait, as_json, ("backupStorageUuid", "backups", "imported"))


@storage.command("reclaim")
@click.argument("uuid")
@WAIT
@JSON
def storage_reclaim(uuid: str, wait: bool, as_json: bool) -> None:
    """Garbage-collect chunks no backup references (reclaimSpaceFromImageStore)."""
    client = _client()
    _submit(client, client.reclaim_storage(uuid), wait, as_json, ("backupStorageUuid", "chunksDeleted", "bytesFreed"))


@volume_backup.command("create")
@click.option("--volume", "volume_uuid", required=True)
@click.option("--name")
@click.option("--mode", type=click.Choice(["auto", "full", "incremental"]), default="auto")
@click.option("--backup-storage", "storage_uuid")
@WAIT
@JSON
def backup_create(
    volume_uuid: str, name: str | None, mode: str, storage_uuid: str | None, wait: bool, as_json: bool
) -> None:
    """Back up one volume."""
    params = {k: v for k, v in {"name": name, "mode": mode, "backupStorageUuid": storage_uuid}.items() if v}
    client = _client()
    _submit(client, client.backup_volume(volume_uuid, **params), wait, as_json, BACKUP_COLUMNS)


@volume_backup.command("create-vm")
@click.option("--root-volume", "root_volume_uuid", required=True)
@click.option("--name")
@click.option("--mode", type=click.Choice(["auto", "full", "incremental"]), default="auto")
@click.option("--backup-storage", "storage_uuid")
@WAIT
@JSON
def backup_new_vm(
    root_volume_uuid: str, name: str | None, mode: str, storage_uuid: str | None, wait: bool, as_json: bool
) -> None:
    """Back up every volume of a VM (one groupUuid)."""
    params = {k: v for k, v in {"name": name, "mode": mode, "backupStorageUuid": storage_uuid}.items() if v}
    client = _client()
    _submit(client, client.backup_vm(root_volume_uuid, **params), wait, as_json, ("groupUuid",))


def _async_action(name: str, call: Callable[[Client, str, dict[str, Any]], str], help_text: str) -> None:
    @volume_backup.command(name, help=help_text)
    @click.argument("uuid")
    @click.option("--param", "-p", "pairs", multiple=True, help="key=value parameter (repeatable).")
    @WAIT
    @JSON
    def command(uuid: str, pairs: tuple[str, ...], wait: bool, as_json: bool) -> None:
        params: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise click.UsageError(f"--param takes key=value, got {pair!r}")
            params[key] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
        client = _client()
        _submit(client, call(client, uuid, params), wait, as_json, ("uuid", "name", "status"))


_async_action(
    "revert", lambda c, u, p: c.revert_volume(u, **p), "Revert the backup's volume to it (-p backupStorageUuid=...)."
)
_async_action(
    "create-volume",
    lambda c, u, p: c.create_volume_from_backup(u, **p),
    "Create a new data volume from the backup (-p name=... -p hostUuid=... -p installPath=...).",
)
_async_action(
    "instant-restore",
    lambda c, u, p: c.instant_restore_volume(u, **p),
    "Run a new qcow2 volume from the backup at once, the rest streamed in behind it "
    "(-p name=... -p vmInstanceUuid=... -p attachTimeout=SECONDS).",
)
_async_action(
    "instant-restore-vm",
    lambda c, u, p: c.instant_restore_vm(u, **p),
    "Run a VM from its VM backup (the argument: its groupUuid) at once (-p vmInstanceUuid=...).",
)
_async_action("verify", lambda c, u, p: c.verify_backup(u, **p), "Verify the backup on storage (-p readData=true).")
_async_action(
    "sync",
    lambda c, u, p: str(c.action("volume-backups", u, "syncBackupFromImageStoreBackupStorage", p)),
    "Copy the backup to another storage (-p dstBackupStorageUuid=... [-p bandwidthLimit=BYTES_PER_S]).",
)
_async_action(
    "recover",
    lambda c, u, p: str(c.action("volume-backups", u, "recoverBackupFromImageStoreBackupStorage", p)),
    "Copy the backup back (-p srcBackupStorageUuid=... -p dstBackupStorageUuid=...).",
)


@volume_backup.command("delete")
@click.argument("uuid")
@click.option("--backup-storage", "storages", multiple=True, help="Only from these storages (repeatable).")
@WAIT
@JSON
def backup_delete(uuid: str, storages: tuple[str, ...], wait: bool, as_json: bool) -> None:
    """Delete a backup from its storages."""
    client = _client()
    _submit(client, client.delete_backup(uuid, storages), wait, as_json, ("uuid",))


@volume_backup.command("revert-vm")
@click.argument("group_uuid")
@click.option("--backup-storage", "storage_uuid")
@WAIT
@JSON
def backup_revert_vm(group_uuid: str, storage_uuid: str | None, wait: bool, as_json: bool) -> None:
    """Revert every volume of a VM to one VM backup (its groupUuid)."""
    client = _client()
    params = {"backupStorageUuid": storage_uuid} if storage_uuid else {}
    _submit(client, client.revert_vm(group_uuid, **params), wait, as_json, ("volumes",))


@vm.command("create-from-backup")
@click.argument("group_uuid")
@click.option("--name", help="The new domain's name (default: the backed-up one's plus a suffix).")
@click.option("--host", "host_uuid", help="The libvirt host to define it on (admins; default: the backed-up VM's).")
@click.option("--backup-storage", "storage_uuid")
@click.option("--stopped", is_flag=True, help="Define it without starting it (strategy CreateStopped).")
@click.option("--keep-macs", is_flag=True, help="Keep the backed-up NICs' MAC addresses (default: new ones).")
@WAIT
@JSON
def backup_create_vm(
    group_uuid: str,
    name: str | None,
    host_uuid: str | None,
    storage_uuid: str | None,
    stopped: bool,
    keep_macs: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """A new libvirt VM from a VM backup (its groupUuid): disks restored, domain defined, started."""
    client = _client()
    given = {"name": name, "hostUuid": host_uuid, "backupStorageUuid": storage_uuid}
    params: dict[str, Any] = {key: value for key, value in given.items() if value}
    params["strategy"] = "CreateStopped" if stopped else "InstantStart"
    params["keepMacs"] = keep_macs
    _submit(client, client.create_vm_from_backup(group_uuid, **params), wait, as_json, ("uuid", "name", "state"))


@volume_backup.command("delete-vm")
@click.argument("group_uuid")
@WAIT
@JSON
def backup_delete_vm(group_uuid: str, wait: bool, as_json: bool) -> None:
    """Delete every volume backup of one VM backup."""
    client = _client()
    _submit(client, client.delete_vm_backup(group_uuid), wait, as_json, ("volumeBackups",))


@job.command("wait")
@click.argument("uuid")
@JSON
def job_wait(uuid: str, as_json: bool) -> None:
    """Wait for an API job and print its result."""
    _wait(_client(), uuid, as_json, ("uuid", "name", "status"))


@job.command("show")
@click.argument("uuid")
def job_show(uuid: str) -> None:
    """An API job's state now."""
    click.echo(json.dumps(_client().job(uuid)))


@job_group.command("create")
@click.option("--name", required=True)
@click.option(
    "--type",
    "kind",
    type=click.Choice(["volumeBackup", "vmBackup", "databaseBackup", "verify", "reclaim", "storageSync"]),
    required=True,
)
@click.option("--backup-storage", "storages", multiple=True, help="Where copies go; the first takes the backup.")
@click.option("--chunks-per-run", type=click.IntRange(min=1), help="verify: chunks checked per run (default all).")
@click.option("--read-data/--no-read-data", default=None, help="verify: re-read each chunk (default) or not.")
@click.option("--repair/--no-repair", default=None, help="verify: rewrite bad chunks from a good copy (default).")
@click.option("--source", help="storageSync: srcBackupStorageUuid (default the master).")
@click.option("--full-every", type=click.IntRange(min=0), help="fullBackupInterval: every Nth run is full.")
@click.option("--keep-last", type=click.IntRange(min=0))
@click.option("--keep-daily", type=click.IntRange(min=0))
@click.option("--keep-weekly", type=click.IntRange(min=0))
@click.option("--keep-monthly", type=click.IntRange(min=0))
@click.option("--bandwidth-limit", type=click.IntRange(min=1), help="bytes/s for copies to other storages")
@JSON
def group_create(
    name: str,
    kind: str,
    storages: tuple[str, ...],
    full_every: int | None,
    keep_last: int | None,
    keep_daily: int | None,
    keep_weekly: int | None,
    keep_monthly: int | None,
    bandwidth_limit: int | None,
    chunks_per_run: int | None,
    read_data: bool | None,
    repair: bool | None,
    source: str | None,
    as_json: bool,
) -> None:
    """Create a job group (its jobData from the options)."""
    maintenance = {"chunksPerRun": chunks_per_run, "readData": read_data, "repair": repair}
    data: dict[str, Any] = {k: v for k, v in {**maintenance, "srcBackupStorageUuid": source}.items() if v is not None}
    if storages:
        data["backupStorageUuids"] = list(storages)
    if full_every is not None:
        data["fullBackupInterval"] = full_every
    retention = {
        k: v
        for k, v in {
            "keepLast": keep_last,
            "keepDaily": keep_daily,
            "keepWeekly": keep_weekly,
            "keepMonthly": keep_monthly,
        }.items()
        if v is not None
    }
    if retention:
        data["retention"] = retention
    if bandwidth_limit:
        data["bandwidthLimit"] = bandwidth_limit
    _print(_client().create_job_group(name, kind, **data), as_json, ("uuid", "name", "jobType"))


@job_group.command("add-target")
@click.argument("group_uuid")
@click.argument("targets", nargs=-1, required=True)
@JSON
def group_add_target(group_uuid: str, targets: tuple[str, ...], as_json: bool) -> None:
    """Add target volumes (volumeBackup), VM instances (vmBackup) or backup storages (verify,
    reclaim, storageSync) to a group."""
    _print(_client().add_targets(group_uuid, targets), as_json, ("uuid", "jobsUuid"))


@job_group.command("remove-target")
@click.argument("group_uuid")
@click.argument("targets", nargs=-1, required=True)
@JSON
def group_remove_target(group_uuid: str, targets: tuple[str, ...], as_json: bool) -> None:
    """Remove targets from a group."""
    _print(_client().remove_targets(group_uuid, targets), as_json, ("uuid", "jobsUuid"))


@job_group.command("run")
@click.argument("group_uuid")
@JSON
def group_run(group_uuid: str, as_json: bool) -> None:
    """Fire every job of the group now."""
    _print(_client().run_job_group(group_uuid), as_json, ("uuid", "jobsStarted"))


@job_group.command("state")
@click.argument("group_uuid")
@click.argument("state", type=click.Choice(["enable", "disable"]))
@JSON
def group_state(group_uuid: str, state: str, as_json: bool) -> None:
    """Enable or disable a group."""
    result = _client().action("scheduler/jobgroups", group_uuid, "changeSchedulerJobGroupState", {"stateEvent": state})
    _print(result, as_json, ("uuid", "state"))


@trigger.command("create")
@click.option("--name", required=True)
@click.option("--interval", type=click.IntRange(min=1), help="simple: seconds between fires")
@click.option("--repeat", type=click.IntRange(min=1), help="simple: how many fires (default: forever)")
@click.option("--cron", help="cron: five fields, or Quartz's six or seven (seconds first)")
@click.option("--time-zone", help="cron: e.g. Europe/Berlin (default UTC)")
@click.option("--start", "start_s", type=click.IntRange(min=0, max=MAX_SECONDS), help="Unix seconds (default: now)")
@click.option("--stop", "stop_s", type=click.IntRange(min=0, max=MAX_SECONDS), help="Unix seconds")
@JSON
def trigger_create(
    name: str,
    interval: int | None,
    repeat: int | None,
    cron: str | None,
    time_zone: str | None,
    start_s: int | None,
    stop_s: int | None,
    as_json: bool,
) -> None:
    """Create a simple (--interval) or cron (--cron) trigger."""
    if bool(interval) == bool(cron):
        raise click.UsageError("give exactly one of --interval (simple) and --cron")
    params: dict[str, Any] = {"schedulerType": "cron" if cron else "simple"}
    for key, value in (
        ("schedulerInterval", interval),
        ("repeatCount", repeat),
        ("cron", cron),
        ("timeZone", time_zone),
        ("startTime", start_s),
        ("stopTime", stop_s),
    ):
        if value is not None:
            params[key] = value
    _print(_client().create_trigger(name, **params), as_json, ("uuid", "name", "schedulerType"))


@trigger.command("attach")
@click.argument("trigger_uuid")
@click.argument("group_uuid")
@click.option("--now", "trigger_now", is_flag=True, help="Also fire once now (triggerNow).")
@JSON
def trigger_attach(trigger_uuid: str, group_uuid: str, trigger_now: bool, as_json: bool) -> None:
    """Attach a trigger to a job group."""
    _print(
        _client().attach_trigger(trigger_uuid, group_uuid, trigger_now=trigger_now), as_json, ("uuid", "triggersUuid")
    )


@trigger.command("detach")
@click.argument("trigger_uuid")
@click.argument("group_uuid")
def trigger_detach(trigger_uuid: str, group_uuid: str) -> None:
    """Detach a trigger from a job group."""
    _client().detach_trigger(trigger_uuid, group_uuid)


@database_backup.command("create")
@click.option("--name")
@click.option("--backup-storage", "storage_uuid")
@click.option("--database", "database_uuid", help="A registered database (default: the catalog).")
@WAIT
@JSON
def database_backup_create(
    name: str | None, storage_uuid: str | None, database_uuid: str | None, wait: bool, as_json: bool
) -> None:
    """Back up the catalog database, or a registered one."""
    given = {"name": name, "backupStorageUuid": storage_uuid, "databaseUuid": database_uuid}
    params = {k: v for k, v in given.items() if v}
    client = _client()
    _submit(client, client.backup_database(**params), wait, as_json, ("uuid", "name", "status", "size"))


@database_backup.command("recover")
@click.argument("uuid")
@click.option("--database-url", "database_url", help="SQLAlchemy URL of an empty database (a catalog backup)")
@click.option("--database", "database_uuid", help="A registered database's server (its backups; default: theirs)")
@click.option("--database-name", "database_name", help="The database on that server (a new name: a new one)")
@click.option("--backup-storage", "storage_uuid")
@click.option("--force", is_flag=True, help="Load over a database that is not empty.")
@WAIT
@JSON
def database_backup_recover(uuid: str, storage_uuid: str | None, force: bool, wait: bool, **target: str | None) -> None:
    """Load a database backup into a database (recoverDatabaseBackup)."""
    as_json = bool(target.pop("as_json"))
    names = {"database_url": "databaseUrl", "database_uuid": "databaseUuid", "database_name": "databaseName"}
    params: dict[str, Any] = {names[k]: v for k, v in target.items() if v}
    params["force"] = force
    if storage_uuid:
        params["backupStorageUuid"] = storage_uuid
    client = _client()
    _submit(client, client.recover_database(uuid, **params), wait, as_json, ("databaseBackupUuid",))


@database_backup.command("sync")
@click.argument("uuid")
@click.option("--to", "dst", required=True, help="Destination backup storage uuid.")
@click.option("--bandwidth-limit", "limit", type=int)
@WAIT
@JSON
def database_backup_sync(uuid: str, dst: str, limit: int | None, wait: bool, as_json: bool) -> None:
    """Copy a database backup to another storage."""
    client = _client()
    params = {"bandwidthLimit": limit} if limit else {}
    _submit(client, client.sync_database_backup(uuid, dst, **params), wait, as_json, ("dstBackupStorageUuid",))
