"""The job and task on every log line of a job: the context manager, the filter and formats,
and the engine's pool threads inheriting them."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from shared.logcontext import JobContextFilter, current, install, job_context
from shared.repository.pipeline import parallel_map


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test_logcontext")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)


def test_job_context_sets_and_restores() -> None:
    assert current() == ("", "")
    with job_context("job-1", "task-1"):
        assert current() == ("job-1", "task-1")
        with job_context("job-2"):
            assert current() == ("job-2", "")
        assert current() == ("job-1", "task-1")
    assert current() == ("", "")
    with pytest.raises(RuntimeError), job_context("job-3", "task-3"):
        raise RuntimeError
    assert current() == ("", "")  # restored on an error too


def test_filter_adds_job_and_task_to_every_record() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    assert JobContextFilter().filter(record)
    assert (record.job, record.task, record.jobcontext) == ("", "", "")
    with job_context("abc", "def"):
        assert JobContextFilter().filter(record)
    assert (record.job, record.task, record.jobcontext) == ("abc", "def", "job=abc task=def ")


def test_lines_of_pool_threads_name_the_job(captured: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, handler = captured
    install(logger)
    install(logger)  # idempotent: one filter
    assert sum(isinstance(f, JobContextFilter) for f in handler.filters) == 1
    threads: set[str] = set()

    def work(index: int) -> int:
        threads.add(threading.current_thread().name)
        logger.info("chunk.done index=%d", index)
        return index

    logger.info("before")
    with job_context("job-uuid-1", "task-id-1"):
        logger.info("job.started")
        assert sorted(parallel_map(work, range(20), workers=4)) == list(range(20))
        logger.info("job.succeeded")
    logger.info("after")
    assert any(name.startswith("chunk") for name in threads) and threading.current_thread().name not in threads

    lines = stream.getvalue().splitlines()
    assert len(lines) == 24
    assert "job=" not in lines[0] and lines[0].endswith("test_logcontext before")
    assert "job=" not in lines[-1]
    inside = lines[1:-1]
    assert all(" job=job-uuid-1 task=task-id-1 " in line for line in inside), inside
    assert sum("chunk.done" in line for line in inside) == 20


def test_a_pool_started_outside_a_job_stays_outside(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, _handler = captured
    install(logger)
    list(parallel_map(lambda i: logger.info("chunk %d", i), range(4), workers=2))
    with job_context("other-job"):
        pass
    assert "job=" not in stream.getvalue()


def test_json_format(captured: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, _handler = captured
    install(logger, "json")
    with job_context("j1", "t1"):
        logger.info("backup.committed id=%s", "abc")
    logger.info("outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["message"] == "backup.committed id=abc" and (inside["job"], inside["task"]) == ("j1", "t1")
    assert inside["level"] == "INFO" and inside["logger"] == "test_logcontext"
    assert (outside["job"], outside["task"]) == ("", "")
