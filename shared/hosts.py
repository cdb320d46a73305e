"""Hosts: a worker registers its host on start and heartbeats; a host that stops heartbeating
turns Disconnected, and the jobs waiting on its queue fail with a clear error instead of
hanging."""

from __future__ import annotations

import logging
import socket
import uuid as uuidlib
from collections.abc import Collection
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared import hostpaths
from shared.catalog.models import ApiJob, Host, aware, now
from shared.config import get_settings
from shared.private import private_dir

log = logging.getLogger(__name__)


def local_host_uuid() -> str:
    """This machine's host identity: BLOCKVAULT_HOST_UUID, else one kept in the data dir."""
    settings = get_settings()
    if settings.host_uuid:
        return settings.host_uuid.replace("-", "").lower()
    path = settings.data_path / "host-uuid"
    if path.exists():
        return path.read_text().strip()
    private_dir(path.parent)
    value = uuidlib.uuid4().hex
    tmp = Path(f"{path}.tmp")
    tmp.write_text(value + "\n")
    tmp.replace(path)
    return path.read_text().strip()


def _management_ip() -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))  # no packet is sent for a UDP connect
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def register(session: Session, host_uuid: str) -> Host:
    """Create or refresh this host's row with its volume roots and VM socket folder; it is
    Connected from now on. UsageError (the worker does not start) for bad roots."""
    roots, sockets = hostpaths.volume_roots(), hostpaths.socket_dir()
    host = session.get(Host, host_uuid)
    if host is None:
        host = Host(uuid=host_uuid, name=socket.gethostname())
        session.add(host)
    host.hostname = socket.gethostname()
    host.managementIp = _management_ip()
    host.volumeRoots = roots
    host.vmSocketDir = sockets
    host.status = "Connected"
    host.lastHeartbeat = now()
    return host


def heartbeat(session: Session, host_uuid: str) -> None:
    host = session.get(Host, host_uuid)
    if host is None:
        register(session, host_uuid)
        return
    host.lastHeartbeat = now()
    if host.status != "Connected":
        log.info("host.reconnected uuid=%s", host_uuid)
        host.status = "Connected"


def touch_jobs(session: Session, job_uuids: Collection[str]) -> None:
    """The Running jobs this worker is running (its pool's tasks, whatever process runs them)
    are alive: their ``lastOpDate`` is now. A job nobody touches is an orphan (:func:`reap_orphans`)."""
    if job_uuids:
        session.execute(
            update(ApiJob)
            .where(ApiJob.uuid.in_(sorted(job_uuids)), ApiJob.state == "Running")
            .values(lastOpDate=now())
            .execution_options(synchronize_session=False)
        )
        session.commit()


def orphan_seconds() -> float:
    """How long a Running job may go untouched by any worker before it is failed: three host
    timeouts (a live worker touches its jobs every heartbeat)."""
    return 3 * get_settings().host_timeout_seconds


def reap_orphans(session: Session) -> list[str]:
    """Fail the Running jobs no worker has touched for :func:`orphan_seconds`: their worker was
    killed whole (pool and all) and, restarted under the same host uuid before the host timed
    out, never learnt of them; a message delivered again finds them Running and skips them
    (``start_job``), so without this they would stay Running for ever. Only workers call it:
    only they run jobs and touch them. Returns the uuids of the jobs failed."""
    from shared.apijobs import fail_job

    cutoff = now() - timedelta(seconds=orphan_seconds())
    failed = []
    for job in session.scalars(select(ApiJob).where(ApiJob.state == "Running", ApiJob.lastOpDate < cutoff)):
        log.warning("job.orphaned uuid=%s host=%s last_touched=%s", job.uuid, job.hostUuid, job.lastOpDate)
        fail_job(
            session,
            job,
            code="WORKER_LOST",
            description=f"no worker has run this job for {orphan_seconds():.0f} s: "
            "its worker was killed and nothing resumed it",
        )
        failed.append(job.uuid)
    return failed


def is_alive(host: Host, at: datetime | None = None) -> bool:
    timeout = timedelta(seconds=get_settings().host_timeout_seconds)
    return host.lastHeartbeat is not None and (at or now()) - aware(host.lastHeartbeat) <= timeout


def reap(session: Session) -> list[str]:
    """Mark hosts whose heartbeat is too old Disconnected and fail the jobs routed to them
    that have not finished. Returns the uuids of the hosts it disconnected."""
    moment = now()
    gone = []
    for host in session.scalars(select(Host).where(Host.status == "Connected")):
        if not is_alive(host, moment):
            host.status = "Disconnected"
            gone.append(host.uuid)
            log.warning("host.disconnected uuid=%s last_heartbeat=%s", host.uuid, host.lastHeartbeat)
    stale = select(Host.uuid).where(Host.status == "Disconnected")
    for job in session.scalars(
        select(ApiJob).where(ApiJob.state.in_(("Pending", "Running")), ApiJob.hostUuid.in_(stale))
    ):
        from shared.apijobs import fail_job

        fail_job(
            session,
            job,
            code="HOST_DISCONNECTED",
            description=f"host {job.hostUuid} is disconnected: its worker stopped heartbeating",
        )
    return gone
