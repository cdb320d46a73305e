"""The API job and Celery task a log line belongs to, on every line logged while a job runs.

:func:`job_context` sets them (context variables: each thread and each asyncio task has its
own; :func:`shared.repository.pipeline.parallel_map` hands them to its pool threads), and
:class:`JobContextFilter`, installed on a handler, adds them to every record it sees as
``job`` and ``task`` (empty outside a job) and ``jobcontext`` (``"job=<uuid> task=<id> "``, or
nothing outside a job) for the text format. :func:`install` puts both on a logger's handlers;
the worker calls it from Celery's logging signals.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

_job: ContextVar[str] = ContextVar("blockvault_job", default="")
_task: ContextVar[str] = ContextVar("blockvault_task", default="")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s %(jobcontext)s%(message)s"


@contextlib.contextmanager
def job_context(job_uuid: str | None = None, task_id: str | None = None) -> Iterator[None]:
    """Every line logged in this block (in this thread, or in threads given its context)
    names ``job_uuid`` and ``task_id``."""
    job_token = _job.set(job_uuid or "")
    task_token = _task.set(task_id or "")
    try:
        yield
    finally:
        _task.reset(task_token)
        _job.reset(job_token)


def current() -> tuple[str, str]:
    """The (job uuid, task id) of the running job; empty strings outside one."""
    return _job.get(), _task.get()


class JobContextFilter(logging.Filter):
    """Adds ``job``, ``task`` and ``jobcontext`` to every record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        job, task = _job.get(), _task.get()
        record.job, record.task = job, task
        parts = [f"job={job}"] if job else []
        parts += [f"task={task}"] if task else []
        record.jobcontext = " ".join(parts) + " " if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, process, message, job, task (and the
    traceback when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
            "job": getattr(record, "job", ""),
            "task": getattr(record, "task", ""),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def formatter(kind: str = "text") -> logging.Formatter:
    """The worker's formatter: ``text`` (:data:`TEXT_FORMAT`) or ``json``."""
    return JsonFormatter() if kind == "json" else logging.Formatter(TEXT_FORMAT)


def install(logger: logging.Logger, kind: str = "text") -> None:
    """Give every handler of ``logger`` the job context filter and the worker's format
    (idempotent)."""
    for handler in logger.handlers:
        if not any(isinstance(f, JobContextFilter) for f in handler.filters):
            handler.addFilter(JobContextFilter())
        handler.setFormatter(formatter(kind))
