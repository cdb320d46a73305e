"""Streaming a backup into an overlay: QEMU's ``block-stream`` over QMP.

An instant restore's volume is a qcow2 overlay whose backing is the backup's NBD export
(nbdserver.py). ``block-stream`` copies every cluster the overlay does not hold from the
backing into it, never over a cluster the guest has written meanwhile, and when done drops the
backing from the image's header: the volume then stands alone. It runs in the QEMU of a VM that
runs from the overlay, or in a ``qemu-storage-daemon`` (qemu.py) for an overlay no VM has open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shared.errors import MonitorError, StreamFailed

from .qmp import Monitor

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2


def stream(
    monitor: Monitor,
    node: str,
    job_id: str,
    what: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    poll: float = POLL_SECONDS,
    speed: int = 0,
) -> None:
    """Run ``block-stream`` on block node ``node`` until it has concluded; StreamFailed with
    QEMU's reason when it ends in error or is cancelled (the overlay then still has its
    backing, and every byte the guest wrote). ``speed``: at most that many bytes/s (0: no limit)."""
    args: dict[str, object] = {"job-id": job_id, "device": node, "auto-dismiss": False}
    if speed:
        args["speed"] = speed
    monitor.cmd("block-stream", **args)
    log.info("stream.started what=%s node=%s job=%s", what, node, job_id)
    try:
        while True:
            jobs = {job["id"]: job for job in monitor.cmd("query-jobs")}
            job = jobs.get(job_id)
            if job is None:
                raise StreamFailed(what=what, detail=f"QEMU's job {job_id} is gone")
            if progress is not None and job.get("total-progress"):
                progress(int(job["current-progress"]), int(job["total-progress"]))
            if job["status"] == "concluded":
                if job.get("error"):
                    raise StreamFailed(what=what, detail=f"block-stream failed: {job['error']}")
                break
            time.sleep(poll)
    finally:
        try:
            if _running(monitor, job_id):  # interrupted: QEMU must not go on alone
                monitor.cmd("job-cancel", id=job_id)
            _dismiss(monitor, job_id)
        except MonitorError as exc:  # the VM is gone: nothing left to tidy
            log.warning("stream.dismiss_failed what=%s job=%s error=%s", what, job_id, exc)
    log.info("stream.done what=%s node=%s", what, node)


def _running(monitor: Monitor, job_id: str) -> bool:
    return any(j["id"] == job_id and j["status"] != "concluded" for j in monitor.cmd("query-jobs"))


def _dismiss(monitor: Monitor, job_id: str, timeout: float = 30.0) -> None:
    """Dismiss the job once it has concluded (after a cancel it takes a moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in monitor.cmd("query-jobs") if j["id"] == job_id]
        if not jobs:
            return
        if jobs[0]["status"] == "concluded":
            monitor.cmd("job-dismiss", id=job_id)
            return
        time.sleep(POLL_SECONDS)


def backing_node(monitor: Monitor, node: str) -> str | None:
    """The backing file QEMU's node ``node`` still reads from (None once it stands alone)."""
    for found in monitor.block_nodes():
        if found.get("node-name") == node:
            image = found.get("image") or {}
            return image.get("backing-filename") or found.get("backing_file")
    raise MonitorError(socket=monitor.socket_path, detail=f"no block node {node}")
