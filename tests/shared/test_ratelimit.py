"""FailureWindow: a sliding window of failed authentications per client, on a fake clock."""

from __future__ import annotations

import threading

import pytest

from shared.ratelimit import FailureWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limit_failures_lock_a_client_out_until_the_oldest_leaves_the_window() -> None:
    clock = Clock()
    window = FailureWindow(3, 60.0, clock=clock)
    for _ in range(2):
        window.failed("10.0.0.1")
        clock.now += 10
    assert window.retry_after("10.0.0.1") is None  # two of three
    window.failed("10.0.0.1")
    assert window.retry_after("10.0.0.1") == pytest.approx(40.0)  # the first failed at 1000
    assert window.retry_after("10.0.0.2") is None  # other clients are not affected
    clock.now += 39.9
    assert window.retry_after("10.0.0.1") == pytest.approx(0.1)
    clock.now += 0.1
    assert window.retry_after("10.0.0.1") is None  # the oldest left the window


def test_a_client_that_stops_failing_is_forgotten() -> None:
    clock = Clock()
    window = FailureWindow(2, 5.0, clock=clock)
    window.failed("a")
    clock.now += 5.0
    assert window.retry_after("a") is None
    assert window._failures == {}  # swept: memory does not grow with past clients


def test_many_clients_are_swept_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FailureWindow, "MAX_CLIENTS", 10)
    clock = Clock()
    window = FailureWindow(1, 1.0, clock=clock)
    for number in range(10):
        window.failed(f"old-{number}")
    clock.now += 2.0
    window.failed("new")
    assert set(window._failures) == {"new"}


def test_failures_from_threads_all_count() -> None:
    window = FailureWindow(400, 60.0)
    threads = [threading.Thread(target=lambda: [window.failed("c") for _ in range(100)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert window.retry_after("c") is not None
